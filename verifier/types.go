package verifier

import (
	"time"

	"github.com/google/go-sev-guest/kds"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// HexBytes travels as hex in the admin API and the database.
type HexBytes = protocol.HexBytes

// VMSpec is what an owner registers (admin API body).
type VMSpec struct {
	Name string `json:"name"`
	// Measurements is the allow-list of launch digests (48 bytes each).
	Measurements []HexBytes `json:"measurements"`
	// HostData, if set, identifies the VM and is pinned (32 bytes).
	HostData HexBytes `json:"host_data,omitempty"`
	// ChipIDs, if set, pins the VM to these chips.
	ChipIDs        []HexBytes    `json:"chip_ids,omitempty"`
	AllowDebug     bool          `json:"allow_debug,omitempty"`
	AllowMigrateMA bool          `json:"allow_migrate_ma,omitempty"`
	MinTCB         *kds.TCBParts `json:"min_tcb,omitempty"`
	// SecretMode is "raw" (the secret is the 32-byte state key) or "v1" (SecretPayloadV1).
	SecretMode string `json:"secret_mode"`
	// WriteThrough: the guest confirms every runtime state write (v1 only).
	WriteThrough bool `json:"write_through,omitempty"`
}

// VM is the stored record: the spec plus the verifier's own state.
type VM struct {
	VMSpec
	ID       HexBytes  `json:"id"`        // 32 random bytes; state is bound to it
	StateKey HexBytes  `json:"state_key"` // never leaves except wrapped to an attested key
	Counter  uint64    `json:"counter"`   // confirmed counter the state must hold
	Primed   bool      `json:"primed"`    // one boot request is pending
	PrimedAt time.Time `json:"primed_at,omitzero"`
	// BootRequest numbers the boot requests (+1 per prime). A release needs evidence that
	// was verified while this very request was pending.
	BootRequest uint64    `json:"boot_request"`
	LastBoot    string    `json:"last_boot,omitempty"`
	Releases    uint64    `json:"releases"`
	Created     time.Time `json:"created"`
}

// VMView is what the admin API shows: no key material.
type VMView struct {
	VMSpec
	ID          HexBytes  `json:"id"`
	Counter     uint64    `json:"counter"`
	Primed      bool      `json:"primed"`
	BootRequest uint64    `json:"boot_request"`
	LastBoot    string    `json:"last_boot,omitempty"`
	Releases    uint64    `json:"releases"`
	Created     time.Time `json:"created"`
}

// View hides key material.
func (v *VM) View() VMView {
	return VMView{VMSpec: v.VMSpec, ID: v.ID, Counter: v.Counter, Primed: v.Primed, BootRequest: v.BootRequest,
		LastBoot: v.LastBoot, Releases: v.Releases, Created: v.Created}
}

// Boot is one release of a VM's key.
type Boot struct {
	ID         string    `json:"id"` // hex of the 16-byte boot id
	VM         string    `json:"vm"`
	Expected   uint64    `json:"expected"`
	Next       uint64    `json:"next"`
	ConfirmKey HexBytes  `json:"confirm_key"`
	Released   time.Time `json:"released"`
	Confirmed  uint64    `json:"confirmed"` // highest counter confirmed by this boot
}

// AuditEvent records one decision with its reason.
type AuditEvent struct {
	Seq     uint64    `json:"seq"`
	Time    time.Time `json:"time"`
	VM      string    `json:"vm,omitempty"`
	Session string    `json:"session,omitempty"`
	Event   string    `json:"event"`   // auth, attest, release, confirm, register, prime
	Outcome string    `json:"outcome"` // allow or deny
	Reason  string    `json:"reason,omitempty"`
	BootID  string    `json:"boot_id,omitempty"`
	Counter *uint64   `json:"counter,omitempty"`
	// Repeats, when set, says this row stands for that many further decisions identical to
	// the row before it with the same event, outcome, VM and reason (coalesced refusals).
	Repeats uint64 `json:"repeats,omitempty"`
	// Instance names the verifier replica that decided (Options.Instance), when set.
	Instance string `json:"instance,omitempty"`
}

// Audit outcomes.
const (
	Allow = "allow"
	Deny  = "deny"
)
