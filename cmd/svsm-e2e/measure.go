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

// measureFile reads an IGVM file and computes its SNP launch digest.
func measureFile(path string, o igvm.MeasureOptions) ([48]byte, []igvm.MeasuredPage, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return [48]byte{}, nil, err
	}
	if fi.Size() >= igvm.MaxFileSize {
		return [48]byte{}, nil, fmt.Errorf("%s: %d bytes is too large for an IGVM file", path, fi.Size())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return [48]byte{}, nil, err
	}
	f, err := igvm.Parse(b)
	if err != nil {
		return [48]byte{}, nil, fmt.Errorf("%s: %w", path, err)
	}
	d, pages, err := igvm.MeasureSNP(f, o)
	if err != nil {
		return [48]byte{}, nil, fmt.Errorf("%s: %w", path, err)
	}
	return d, pages, nil
}

// igvmDigest is the launch digest of an IGVM file.
func igvmDigest(path string) ([]byte, error) {
	d, _, err := measureFile(path, igvm.MeasureOptions{})
	return d[:], err
}

func measureCmd() *cobra.Command {
	var verbose, nativeZero bool
	cmd := &cobra.Command{
		Use:   "measure FILE.igvm",
		Short: "Print the SEV-SNP launch digest of an IGVM file (PROTOCOLS.md §5, as igvmmeasure -b)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			d, pages, err := measureFile(args[0], igvm.MeasureOptions{NativeZero: nativeZero})
			if err != nil {
				return err
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
