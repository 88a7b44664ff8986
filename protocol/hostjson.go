package protocol

import (
	"encoding/json"
	"fmt"
	"os"
)

// HostJSON is DIR/host.json written by `svsm-e2e host up` (PROTOCOLS.md §6). The listed keys
// are a stable contract; more may be added.
type HostJSON struct {
	ProxySocket    string `json:"proxy_socket"`
	SNPSocket      string `json:"snp_socket"`
	VerifierURL    string `json:"verifier_url"`
	AdminURL       string `json:"admin_url"`
	AdminTokenFile string `json:"admin_token_file"`
	VM             string `json:"vm"`
	Measurement    string `json:"measurement"`
	HostData       string `json:"host_data"`
	SecretMode     string `json:"secret_mode"`
	// Extensions beyond the stable keys.
	FakeSNPURL string `json:"fakesnp_url,omitempty"`
	// FakeSNPTokenFile holds fakesnp's admin bearer token.
	FakeSNPTokenFile string `json:"fakesnp_admin_token_file,omitempty"`
	Launch           string `json:"launch,omitempty"`
	Chip             string `json:"chip,omitempty"`
}

// ReadHostJSON loads and checks a host.json.
func ReadHostJSON(path string) (*HostJSON, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read host.json: %w", err)
	}
	var h HostJSON
	if err := json.Unmarshal(b, &h); err != nil {
		return nil, fmt.Errorf("host.json %s: %w", path, err)
	}
	if h.ProxySocket == "" || h.SNPSocket == "" {
		return nil, fmt.Errorf("host.json %s: proxy_socket and snp_socket are required", path)
	}
	return &h, nil
}
