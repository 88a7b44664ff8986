package verifier

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// AdminClient talks to the admin API. The CLI and the harness use it.
type AdminClient struct {
	BaseURL string
	Token   string
	HTTP    *http.Client
}

func (c *AdminClient) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.BaseURL+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	req.Header.Set("Content-Type", "application/json")
	hc := c.HTTP
	if hc == nil {
		hc = &http.Client{Timeout: 30 * time.Second}
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode >= 300 {
		var p protocol.ProblemDetails
		if json.Unmarshal(raw, &p) == nil && p.Detail != "" {
			return fmt.Errorf("%s %s: %w", method, path, &p)
		}
		return fmt.Errorf("%s %s: HTTP %d: %s", method, path, resp.StatusCode, raw)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			return fmt.Errorf("%s %s: decode: %w", method, path, err)
		}
	}
	return nil
}

// Register registers a VM.
func (c *AdminClient) Register(ctx context.Context, spec VMSpec) (*VMView, error) {
	var v VMView
	return &v, c.do(ctx, http.MethodPost, "/admin/v1/vms", spec, &v)
}

// Prime primes one boot request.
func (c *AdminClient) Prime(ctx context.Context, name string) (*VMView, error) {
	var v VMView
	return &v, c.do(ctx, http.MethodPost, "/admin/v1/vms/"+url.PathEscape(name)+"/boot-requests", nil, &v)
}

// Show shows a VM.
func (c *AdminClient) Show(ctx context.Context, name string) (*VMView, error) {
	var v VMView
	return &v, c.do(ctx, http.MethodGet, "/admin/v1/vms/"+url.PathEscape(name), nil, &v)
}

// Audit reads audit events after seq since, for one VM or all ("").
func (c *AdminClient) Audit(ctx context.Context, vm string, since uint64) ([]AuditEvent, error) {
	q := url.Values{}
	if vm != "" {
		q.Set("vm", vm)
	}
	q.Set("since", strconv.FormatUint(since, 10))
	var out []AuditEvent
	return out, c.do(ctx, http.MethodGet, "/admin/v1/audit?"+q.Encode(), nil, &out)
}
