package guest

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
)

// readTemplate loads a first-boot variable template: a JSON array of uefivars.Update.
func readTemplate(path string) ([]uefivars.Update, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) > uefivars.MaxStoreSize*2 {
		return nil, fmt.Errorf("%s: %d bytes is too large for a variable template", path, len(b))
	}
	var out []uefivars.Update
	if err := json.Unmarshal(b, &out); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}

// WriteTemplate stores updates as a template file.
func WriteTemplate(path string, updates []uefivars.Update) error {
	b, err := json.MarshalIndent(updates, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}
