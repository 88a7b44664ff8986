package attest

import (
	"bytes"
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-sev-guest/client"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// Step names the protocol step an error happened in, for events and refusals.
type Step string

// Steps of the attestation protocol.
const (
	StepNegotiate Step = "negotiate"
	StepReport    Step = "report"
	StepAttest    Step = "attest"
	StepDecrypt   Step = "decrypt"
	StepConfirm   Step = "confirm"
)

// Error is an attestation failure at a step.
type Error struct {
	Step Step
	Err  error
}

func (e *Error) Error() string { return fmt.Sprintf("attestation %s: %v", e.Step, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

// ErrRefused means the proxy answered success=false (the verifier refused).
var ErrRefused = errors.New("refused by verifier (success=false)")

// Result is what a successful attestation yields.
type Result struct {
	Secret    []byte
	Challenge []byte
	Report    []byte
}

// Conn is the proxy channel: a byte stream, optionally with deadlines.
type Conn interface {
	io.ReadWriter
}

type deadliner interface{ SetDeadline(time.Time) error }

func withDeadline(ctx context.Context, c Conn) func() {
	d, ok := c.(deadliner)
	if !ok {
		return func() {}
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = d.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = d.SetDeadline(time.Now()) })
	return func() {
		stop()
		_ = d.SetDeadline(time.Time{})
	}
}

func send(c Conn, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return protocol.WriteFrame(c, b)
}

// Attest runs the upstream 0.1.0 protocol on c with a fresh P-521 key, getting the report
// from qp, and returns the decrypted secret. Every failure is an *Error naming the step.
func Attest(ctx context.Context, c Conn, qp client.QuoteProvider) (*Result, error) {
	defer withDeadline(ctx, c)()
	if err := send(c, protocol.NegotiationRequest{Version: protocol.VersionAttest, Tee: protocol.TeeSNP}); err != nil {
		return nil, &Error{StepNegotiate, err}
	}
	body, err := protocol.ReadFrame(c, protocol.MaxFrameSize)
	if err != nil {
		return nil, &Error{StepNegotiate, err}
	}
	neg, err := protocol.DecodeNegotiationResponse(body)
	if err != nil {
		return nil, &Error{StepNegotiate, err}
	}
	priv, err := ecdh.P521().GenerateKey(rand.Reader)
	if err != nil {
		return nil, &Error{StepNegotiate, err}
	}
	pub := protocol.ECPublicKeyFromECDH(priv.PublicKey())
	rd, err := protocol.ReportData(neg.Params, pub, neg.Challenge)
	if err != nil {
		return nil, &Error{StepNegotiate, err}
	}
	report, err := qp.GetRawQuote(rd)
	if err != nil {
		return nil, &Error{StepReport, err}
	}
	if len(report) < protocol.ReportSize {
		return nil, &Error{StepReport, fmt.Errorf("report is %d bytes", len(report))}
	}
	report = report[:protocol.ReportSize] // a raw quote may carry a certificate table after it
	req := protocol.AttestationRequest{
		Tee: protocol.TeeSNP, Evidence: protocol.Evidence{Snp: &protocol.SnpEvidence{Report: report}},
		Challenge: neg.Challenge, Key: pub,
	}
	if err := send(c, req); err != nil {
		return nil, &Error{StepAttest, err}
	}
	body, err = protocol.ReadFrame(c, protocol.MaxFrameSize)
	if err != nil {
		return nil, &Error{StepAttest, err}
	}
	resp, err := protocol.DecodeAttestationResponse(body)
	if err != nil {
		return nil, &Error{StepAttest, err}
	}
	if !resp.Success {
		return nil, &Error{StepAttest, ErrRefused}
	}
	// The secret must be wrapped to *our* fresh key: decryption with priv proves it.
	secret, err := protocol.DecryptSecret(priv, resp.Decryption, resp.Secret)
	if err != nil {
		return nil, &Error{StepDecrypt, err}
	}
	return &Result{Secret: secret, Challenge: bytes.Clone(neg.Challenge), Report: report}, nil
}

// Confirmation failure kinds: the SVSM turns each into its fail-closed reason.
var (
	// ErrConfirmUnauthenticated: an answer came, but not the verifier's authenticated answer
	// to this request (forged, replayed, reflected, downgraded, or an unauthenticated refusal).
	ErrConfirmUnauthenticated = errors.New("confirm answer not authenticated")
	// ErrConfirmRefused: the verifier's authenticated refusal.
	ErrConfirmRefused = errors.New("confirmation refused by the verifier")
	// ErrConfirmTimeout: no answer within the bound.
	ErrConfirmTimeout = errors.New("no confirm answer within the bound")
	// ErrConfirmNoAnswer: the channel closed or failed before an answer.
	ErrConfirmNoAnswer = errors.New("no confirm answer")
)

// Confirm sends a 0.3.0 confirmation on a fresh connection c and returns the verifier's
// authenticated success. Anything else is an *Error wrapping one of the ErrConfirm kinds; the
// response is returned too when it was the verifier's authenticated refusal. sent, if not
// nil, runs once the request is on its way (a crash point).
func Confirm(ctx context.Context, c Conn, keys protocol.ConfirmKeys, bootID []byte, counter uint64, sent func()) (*protocol.ConfirmResponse, error) {
	defer withDeadline(ctx, c)()
	nonce := make([]byte, protocol.ConfirmNonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return nil, &Error{StepConfirm, err}
	}
	creq := protocol.NewConfirmRequest(keys, bootID, counter, nonce)
	wrap := func(kind error, format string, a ...any) error {
		return &Error{StepConfirm, fmt.Errorf("%w: %s", kind, fmt.Sprintf(format, a...))}
	}
	ioErr := func(err error) error {
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
			return wrap(ErrConfirmTimeout, "%v", err)
		}
		return wrap(ErrConfirmNoAnswer, "%v", err)
	}
	if err := send(c, protocol.NegotiationRequest{Version: protocol.VersionConfirm, Tee: protocol.TeeSNP, Confirm: creq}); err != nil {
		return nil, ioErr(err)
	}
	if sent != nil {
		sent()
	}
	body, err := protocol.ReadFrame(c, protocol.MaxFrameSize)
	if err != nil {
		return nil, ioErr(err)
	}
	resp, err := protocol.DecodeConfirmResponse(body)
	if err != nil {
		return nil, wrap(ErrConfirmUnauthenticated, "%v", err)
	}
	if err := resp.VerifyAnswer(keys, creq); err != nil {
		return nil, wrap(ErrConfirmUnauthenticated, "%v", err)
	}
	if !resp.Success {
		return resp, wrap(ErrConfirmRefused, "%s (verifier's counter %d)", resp.Reason, resp.Confirmed)
	}
	if resp.Confirmed != counter {
		// An authenticated success must confirm what was asked; anything else is a verifier bug.
		return resp, wrap(ErrConfirmRefused, "verifier confirmed %d, asked %d", resp.Confirmed, counter)
	}
	return resp, nil
}
