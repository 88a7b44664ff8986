package fakesnp

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/svsm-e2e/svsm-e2e/internal/jsonhttp"
)

// Client drives a fakesnp's admin API (the host's side: what to launch, which faults).
type Client struct {
	BaseURL string
	// Token is the admin bearer token (fakesnp's StateDir/admin.token).
	Token string
	HTTP  *http.Client
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	h := http.Header{"Authorization": {"Bearer " + c.Token}}
	if err := jsonhttp.Do(ctx, c.HTTP, method, c.BaseURL+path, h, in, out); err != nil {
		return fmt.Errorf("fakesnp: %w", err)
	}
	return nil
}

// AddLaunch registers a launch and returns where its channel listens.
func (c *Client) AddLaunch(ctx context.Context, spec LaunchSpec) (*LaunchInfo, error) {
	var info LaunchInfo
	return &info, c.do(ctx, http.MethodPost, "/admin/v1/launches", spec, &info)
}

// Launch describes one launch.
func (c *Client) Launch(ctx context.Context, name string) (*LaunchInfo, error) {
	var info LaunchInfo
	return &info, c.do(ctx, http.MethodGet, "/admin/v1/launches/"+url.PathEscape(name), nil, &info)
}

// SetFaults sets a launch's fault knobs.
func (c *Client) SetFaults(ctx context.Context, name string, f Faults) error {
	return c.do(ctx, http.MethodPut, "/admin/v1/launches/"+url.PathEscape(name)+"/faults", f, nil)
}

// RemoveLaunch forgets a launch.
func (c *Client) RemoveLaunch(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/admin/v1/launches/"+url.PathEscape(name), nil, nil)
}

// Chip creates (if needed) and describes a chip.
func (c *Client) Chip(ctx context.Context, name string) (*ChipInfo, error) {
	var info ChipInfo
	return &info, c.do(ctx, http.MethodPost, "/admin/v1/chips/"+url.PathEscape(name), nil, &info)
}

// getRaw GETs a binary or PEM body of at most 1 MiB; the admin token goes along only where
// the endpoint is the admin API's.
func (c *Client) getRaw(ctx context.Context, path, what string, admin bool) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.BaseURL+path, nil)
	if err != nil {
		return nil, fmt.Errorf("fakesnp %s: %w", what, err)
	}
	if admin {
		req.Header.Set("Authorization", "Bearer "+c.Token)
	}
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fakesnp %s: %w", what, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("fakesnp %s: %w", what, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fakesnp %s: HTTP %d: %s", what, resp.StatusCode, bytes.TrimSpace(b))
	}
	return b, nil
}

// CertChain fetches the KDS cert_chain (ASK then ARK PEM): the roots a verifier should trust.
func (c *Client) CertChain(ctx context.Context) ([]byte, error) {
	return c.getRaw(ctx, "/vcek/v1/"+ProductLine+"/cert_chain", "cert_chain", false)
}

// SetCRL chooses what the served CRL revokes.
func (c *Client) SetCRL(ctx context.Context, set CRLSettings) error {
	return c.do(ctx, http.MethodPut, "/admin/v1/crl", set, nil)
}

// LaunchCerts returns the extended-report certificate table of a launch (binary).
func (c *Client) LaunchCerts(ctx context.Context, name string) ([]byte, error) {
	return c.getRaw(ctx, "/admin/v1/launches/"+url.PathEscape(name)+"/certs", "launch certs", true)
}

// RootsPEM returns every certificate a verifier of this fakesnp needs (ASK, ASVK, ARK), from
// the KDS endpoints.
func (c *Client) RootsPEM(ctx context.Context) ([]byte, error) {
	vcek, err := c.CertChain(ctx)
	if err != nil {
		return nil, err
	}
	vlek, err := c.getRaw(ctx, "/vlek/v1/"+ProductLine+"/cert_chain", "VLEK cert_chain", false)
	if err != nil {
		return nil, err
	}
	// ASK (first of the VCEK chain), ASVK (first of the VLEK chain), ARK.
	askPEM, arkPEM, ok := splitPEMPair(vcek)
	asvkPEM, _, ok2 := splitPEMPair(vlek)
	if !ok || !ok2 {
		return nil, errors.New("fakesnp: a cert_chain is not two PEM certificates")
	}
	return append(append(askPEM, asvkPEM...), arkPEM...), nil
}

func splitPEMPair(b []byte) (first, second []byte, ok bool) {
	p1, rest := pem.Decode(b)
	if p1 == nil {
		return nil, nil, false
	}
	p2, _ := pem.Decode(rest)
	if p2 == nil {
		return nil, nil, false
	}
	return pem.EncodeToMemory(p1), pem.EncodeToMemory(p2), true
}
