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

// readIGVM reads and parses an IGVM file, bounded.
func readIGVM(path string) (*igvm.File, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if fi.Size() >= igvm.MaxFileSize {
		return nil, fmt.Errorf("%s: %d bytes is too large for an IGVM file", path, fi.Size())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	f, err := igvm.Parse(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// igvmDigest is the launch digest of an IGVM file (igvmmeasure's rules).
func igvmDigest(path string) ([]byte, error) {
	f, err := readIGVM(path)
	if err != nil {
		return nil, err
	}
	m, err := igvm.MeasureSNP(f, igvm.MeasureOptions{})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return m.Digest[:], nil
}

func measureCmd() *cobra.Command {
	var verbose, nativeZero, checkKVM bool
	var rules string
	cmd := &cobra.Command{
		Use:   "measure FILE.igvm",
		Short: "Print the SEV-SNP launch digest of an IGVM file (PROTOCOLS.md §5, as igvmmeasure -b)",
		Long: `Print the SEV-SNP launch digest of an IGVM file. The default rules are COCONUT-SVSM's
igvmmeasure (` + "`igvmmeasure -b`" + `); --rules crate follows the microsoft/igvm crate's
measurement, --rules qemu what a real SNP launch by QEMU's IGVM loader makes the firmware
measure. Every construct on which they disagree is printed as a warning on standard error.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			r, err := igvm.ParseRules(rules)
			if err != nil {
				return err
			}
			f, err := readIGVM(args[0])
			if err != nil {
				return err
			}
			if checkKVM {
				if err := igvm.CheckKVM(f); err != nil {
					return err
				}
			}
			m, err := igvm.MeasureSNP(f, igvm.MeasureOptions{Rules: r, NativeZero: nativeZero})
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			for _, w := range m.Warnings {
				fmt.Fprintf(cmd.ErrOrStderr(), "warning: %s\n", w)
			}
			d, pages := m.Digest, m.Pages
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
	cmd.Flags().BoolVar(&nativeZero, "native-zero", false, "measure empty page data as SNP zero pages (igvmmeasure --native-zero)")
	cmd.Flags().StringVar(&rules, "rules", "igvmmeasure", "igvmmeasure, crate or qemu")
	cmd.Flags().BoolVar(&checkKVM, "check-kvm", false, "refuse a file QEMU/KVM cannot launch with this digest (igvmmeasure --check-kvm)")
	return cmd
}
