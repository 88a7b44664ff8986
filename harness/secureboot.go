package harness

import (
	"encoding/json"
	"os"
	"time"

	"github.com/svsm-e2e/svsm-e2e/guest"
	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
)

// OwnerGUID owns the signature-list entries the harness enrolls.
var OwnerGUID = uefivars.MustGUID("5356534d-4532-4545-8000-000000000001")

// SecureBootKeys are a platform owner's keys: PK self-signed, KEK issued by PK, db key.
type SecureBootKeys struct {
	PK, KEK, DB *uefivars.Key
}

// NewSecureBootKeys generates RSA-2048 keys (about 0.1 s each).
func NewSecureBootKeys() (*SecureBootKeys, error) {
	pk, err := uefivars.NewKey("svsm-e2e PK", nil)
	if err != nil {
		return nil, err
	}
	kek, err := uefivars.NewKey("svsm-e2e KEK", pk)
	if err != nil {
		return nil, err
	}
	db, err := uefivars.NewKey("svsm-e2e db", nil)
	if err != nil {
		return nil, err
	}
	return &SecureBootKeys{PK: pk, KEK: kek, DB: db}, nil
}

// EnrollmentEpoch dates the first-boot template; later updates must be later.
var EnrollmentEpoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// WriteTemplate writes the first-boot enrollment template for svsm-guest --uefi-template.
func (k *SecureBootKeys) WriteTemplate(path string) error {
	tmpl, err := uefivars.EnrollmentTemplate(k.PK, k.KEK, k.DB, OwnerGUID, EnrollmentEpoch)
	if err != nil {
		return err
	}
	return guest.WriteTemplate(path, tmpl)
}

// WriteUpdate writes a signed update of a policy variable, for the uefi-set action.
func (k *SecureBootKeys) WriteUpdate(path, name string, sigs []uefivars.Signature, ts time.Time, appendWrite bool, signer *uefivars.Key) error {
	guid := uefivars.ImageSecurityDatabase
	if name == "PK" || name == "KEK" {
		guid = uefivars.GlobalVariable
	}
	u, err := uefivars.SignedUpdate(guid, name, sigs, ts, appendWrite, signer)
	if err != nil {
		return err
	}
	b, err := json.Marshal(u)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// HashSignature is a dbx/db entry for a file's SHA-256.
func HashSignature(sum [32]byte) uefivars.Signature {
	return uefivars.Signature{Type: uefivars.CertSHA256, Owner: OwnerGUID, Data: sum[:]}
}
