package harness

import (
	"context"
	"fmt"
	"net"
	"time"

	"github.com/svsm-e2e/svsm-e2e/protocol"
	"github.com/svsm-e2e/svsm-e2e/svsm/attest"
)

// AttestTimeout bounds one Attest or Confirm exchange.
const AttestTimeout = 60 * time.Second

// Attest plays one guest attestation against a host side described by hj, with the real
// guest driver: report from hj.SNPSocket, protocol through hj.ProxySocket.
// The exchange is bounded by AttestTimeout when ctx carries no earlier deadline.
func Attest(ctx context.Context, hj *protocol.HostJSON) (*attest.Result, error) {
	ctx, cancel := context.WithTimeout(ctx, AttestTimeout)
	defer cancel()
	snp, err := net.Dial("unix", hj.SNPSocket)
	if err != nil {
		return nil, fmt.Errorf("dial report channel: %w", err)
	}
	defer snp.Close()
	px, err := net.Dial("unix", hj.ProxySocket)
	if err != nil {
		return nil, fmt.Errorf("dial proxy: %w", err)
	}
	defer px.Close()
	return attest.Attest(ctx, px, attest.NewChannelQuoteProvider(snp, 10*time.Second))
}

// Confirm sends one confirmation (protocol 0.3.0) through the proxy in hj, with the
// directional keys derived from the payload's confirmation key, and checks the answer as
// the guest does.
func Confirm(ctx context.Context, hj *protocol.HostJSON, confirmKey, bootID []byte, counter uint64) (*protocol.ConfirmResponse, error) {
	keys, err := protocol.DeriveConfirmKeys(confirmKey)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, AttestTimeout)
	defer cancel()
	px, err := net.Dial("unix", hj.ProxySocket)
	if err != nil {
		return nil, fmt.Errorf("dial proxy: %w", err)
	}
	defer px.Close()
	return attest.Confirm(ctx, px, keys, bootID, counter, nil)
}
