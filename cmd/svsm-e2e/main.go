// Command svsm-e2e is the user-facing entry point of the harness: `host up` runs a host side
// (fakesnp, svsm-verifier, svsm-proxy) that any guest can attest through, `host prime` allows
// its next boot. See PROTOCOLS.md §6.
package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func main() {
	root := &cobra.Command{Use: "svsm-e2e", Short: "End-to-end harness for COCONUT-SVSM attestation and persistent state", SilenceUsage: true, SilenceErrors: true}
	root.AddCommand(hostCmd(), demoCmd(), imagesCmd(), measureCmd(), crashPointsCmd(), exploreCmd(), qualifyCmd())
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "svsm-e2e:", err)
		os.Exit(1)
	}
}
