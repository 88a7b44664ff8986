package main

import (
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"
)

func crashPointsCmd() *cobra.Command {
	var component string
	cmd := &cobra.Command{
		Use:   "crash-points",
		Short: "List the registered write points a --crash-at can cut the power at",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "POINT\tTEARABLE\tWHAT")
			for _, p := range crashpoint.All() {
				if component != "" && p.Component != component {
					continue
				}
				torn := ""
				if p.Tearable {
					torn = ":torn"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", p.Name, torn, p.What)
			}
			return tw.Flush()
		},
	}
	cmd.Flags().StringVar(&component, "component", "", "only guest, verifier or proxy")
	return cmd
}
