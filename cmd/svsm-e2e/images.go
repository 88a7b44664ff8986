package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/images"
	"github.com/svsm-e2e/svsm-e2e/internal/daemon"
	"github.com/svsm-e2e/svsm-e2e/qemu"
)

func imagesCmd() *cobra.Command {
	var cache, guest string
	cmd := &cobra.Command{
		Use:   "images",
		Short: "Build the QEMU guest image (kernel via apt-get download, initramfs with svsm-guest as /init); rebuilt only when inputs change",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := daemon.SignalContext()
			defer stop()
			if guest == "" {
				bins, err := harness.FindBinaries("")
				if err != nil {
					return err
				}
				guest = bins.Guest
			}
			if guest == "" {
				return fmt.Errorf("svsm-guest not found: run `make build` or pass --guest")
			}
			img, err := images.Ensure(ctx, images.Options{Cache: cache, Guest: guest})
			if err != nil {
				return err
			}
			fmt.Printf("kernel     %s (%s)\ninitramfs  %s\n", img.Kernel.Vmlinux, img.Kernel.Package, img.Initramfs)
			caps, err := qemu.Probe(ctx, "")
			if err != nil {
				return err
			}
			choice, err := caps.Choose("")
			if err != nil {
				return err
			}
			fmt.Println("qemu       " + choice.Reason)
			return nil
		},
	}
	cmd.Flags().StringVar(&cache, "cache", harness.DefaultImageCache(), "image cache directory")
	cmd.Flags().StringVar(&guest, "guest", "", "static svsm-guest (default: beside svsm-e2e)")
	return cmd
}
