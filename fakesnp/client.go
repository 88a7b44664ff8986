package fakesnp

import (
	"github.com/svsm-e2e/svsm-e2e/internal/jsonhttp"

	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"
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

// CertChain fetches the KDS cert_chain (ASK then ARK PEM): the roots a verifier should trust.
func (c *Client) CertChain(ctx context.Context) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.BaseURL+"/vcek/v1/"+ProductLine+"/cert_chain", nil)
	if err != nil {
		return nil, err
	}
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fakesnp cert_chain: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fakesnp cert_chain: HTTP %d", resp.StatusCode)
	}
	return io.ReadAll(io.LimitReader(resp.Body, 64<<10))
}

// SetCRL chooses what the served CRL revokes.
func (c *Client) SetCRL(ctx context.Context, set CRLSettings) error {
	return c.do(ctx, http.MethodPut, "/admin/v1/crl", set, nil)
}
