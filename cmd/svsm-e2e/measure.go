package main

import (
	"encoding/hex"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/igvm"
)

var pageTypeNames = map[uint8]string{igvm.PageNormal: "normal", igvm.PageVMSA: "vmsa", igvm.PageZero: "zero",
	igvm.PageUnmeasured: "unmeasured", igvm.PageSecrets: "secrets", igvm.PageCPUID: "cpuid"}

func measureCmd() *cobra.Command {
	var verbose, nativeZero bool
	cmd := &cobra.Command{
		Use:   "measure FILE.igvm",
		Short: "Print the SEV-SNP launch digest of an IGVM file (PROTOCOLS.md §5, as igvmmeasure -b)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			fi, err := os.Stat(args[0])
			if err != nil {
				return err
			}
			if fi.Size() >= igvm.MaxFileSize {
				return fmt.Errorf("%s: %d bytes is too large for an IGVM file", args[0], fi.Size())
			}
			b, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			f, err := igvm.Parse(b)
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			d, pages, err := igvm.MeasureSNP(f, igvm.MeasureOptions{NativeZero: nativeZero})
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			if verbose {
				for i, p := range pages {
					fmt.Printf("%6d gpa=%#014x type=%-10s contents=%s digest=%s\n", i, p.GPA, pageTypeNames[p.Type],
						hex.EncodeToString(p.Contents[:]), hex.EncodeToString(p.Digest[:]))
				}
			}
			fmt.Println(hex.EncodeToString(d[:]))
			return nil
		},
	}
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "print each measured page")
	cmd.Flags().BoolVar(&nativeZero, "native-zero", false, "measure empty page data as SNP zero pages")
	return cmd
}
