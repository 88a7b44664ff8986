// Package attest is the SVSM layer's attestation driver: it asks the platform for an SNP
// report (through go-sev-guest's quote-provider interface, implemented here over the §4
// guest-request channel so /dev/sev-guest could take its place on real hardware), runs the
// upstream protocol 0.1.0 with the host's proxy, and unwraps the released secret with a fresh
// P-521 key. It also sends the 0.3.0 confirmation and checks its authenticated answer.
package attest

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/google/go-sev-guest/client"
	spb "github.com/google/go-sev-guest/proto/sevsnp"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// ChannelQuoteProvider implements client.QuoteProvider and client.LeveledQuoteProvider over
// a §4 channel (a unix socket or a serial port wired to fakesnp).
type ChannelQuoteProvider struct {
	mu sync.Mutex
	rw io.ReadWriter
	// SetDeadline, if the channel supports it, bounds each exchange.
	deadline func(time.Time) error
	Timeout  time.Duration
}

var (
	_ client.QuoteProvider        = (*ChannelQuoteProvider)(nil)
	_ client.LeveledQuoteProvider = (*ChannelQuoteProvider)(nil)
)

// NewChannelQuoteProvider wraps an open channel. If rw has SetDeadline (net.Conn, *os.File on
// a tty), each exchange is bounded by timeout.
func NewChannelQuoteProvider(rw io.ReadWriter, timeout time.Duration) *ChannelQuoteProvider {
	q := &ChannelQuoteProvider{rw: rw, Timeout: timeout}
	if d, ok := rw.(interface{ SetDeadline(time.Time) error }); ok {
		q.deadline = d.SetDeadline
	}
	return q
}

// IsSupported reports true: the channel is open.
func (q *ChannelQuoteProvider) IsSupported() bool { return q.rw != nil }

// Product is deprecated upstream; the report carries the CPUID family/model/stepping.
func (q *ChannelQuoteProvider) Product() *spb.SevProduct { return nil }

// GetRawQuote requests a report at VMPL 0.
func (q *ChannelQuoteProvider) GetRawQuote(reportData [64]byte) ([]byte, error) {
	return q.GetRawQuoteAtLevel(reportData, 0)
}

// FirmwareError is a non-zero MSG_REPORT_RSP status.
type FirmwareError struct{ Status uint32 }

func (e *FirmwareError) Error() string { return fmt.Sprintf("SNP firmware status %#x", e.Status) }

// GetRawQuoteAtLevel sends MSG_REPORT_REQ and returns the 1184-byte report.
func (q *ChannelQuoteProvider) GetRawQuoteAtLevel(reportData [64]byte, vmpl uint) ([]byte, error) {
	if vmpl > 3 {
		return nil, fmt.Errorf("vmpl %d out of range", vmpl)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.rw == nil {
		return nil, errors.New("report channel closed")
	}
	if q.deadline != nil && q.Timeout > 0 {
		_ = q.deadline(time.Now().Add(q.Timeout))
		defer q.deadline(time.Time{})
	}
	req := protocol.ReportRequest{ReportData: reportData, VMPL: uint32(vmpl)}
	b, _ := req.MarshalBinary()
	if err := protocol.WriteFrame(q.rw, b); err != nil {
		return nil, fmt.Errorf("MSG_REPORT_REQ: %w", err)
	}
	body, err := protocol.ReadFrame(q.rw, protocol.ReportRspSize)
	if err != nil {
		return nil, fmt.Errorf("MSG_REPORT_RSP: %w", err)
	}
	var rsp protocol.ReportResponse
	if err := rsp.UnmarshalBinary(body); err != nil {
		return nil, err
	}
	if rsp.Status != protocol.StatusSuccess {
		return nil, &FirmwareError{Status: rsp.Status}
	}
	return rsp.Report, nil
}
