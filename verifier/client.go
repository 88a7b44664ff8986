package verifier

import (
	"context"
	"net/http"
	"net/url"
	"strconv"

	"github.com/svsm-e2e/svsm-e2e/internal/jsonhttp"
)

// AdminClient talks to the admin API. The CLI and the harness use it.
type AdminClient struct {
	BaseURL string
	Token   string
	HTTP    *http.Client
}

func (c *AdminClient) do(ctx context.Context, method, path string, in, out any) error {
	h := http.Header{"Authorization": {"Bearer " + c.Token}}
	return jsonhttp.Do(ctx, c.HTTP, method, c.BaseURL+path, h, in, out)
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

// SetMeasurements replaces a VM's launch digest allow-list.
func (c *AdminClient) SetMeasurements(ctx context.Context, name string, ms []HexBytes) (*VMView, error) {
	var v VMView
	return &v, c.do(ctx, http.MethodPut, "/admin/v1/vms/"+url.PathEscape(name)+"/measurements", ms, &v)
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
