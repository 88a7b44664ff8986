package guestos

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/google/go-tpm/legacy/tpm2"
	"github.com/google/go-tpm/tpmutil"

	"github.com/svsm-e2e/svsm-e2e/firmware"
	"github.com/svsm-e2e/svsm-e2e/svsm/uefivars"
)

// NV indices the workload uses (owner range).
const (
	NVCounterIndex = tpmutil.Handle(0x01500020)
	NVDataIndex    = tpmutil.Handle(0x01500021)
	NVDataSize     = 64
	MaxWait        = 10 * time.Minute
)

// ActionHelp documents the workload actions (svsm-guest run --help prints it).
const ActionHelp = `Workload actions (--then, comma-separated, run in order after the OS is up):
  nv-increment      define (once) and increment the NV counter 0x01500020; reports its value
  nv-read           report the NV counter and the NV data index
  nv-write=TEXT     write TEXT (at most 64 bytes) to the NV data index 0x01500021
  uefi-set=FILE     SetVariable with a prepared update (JSON: guid, name, attributes, payload)
  uefi-get=NAME     report a variable (PK, KEK, db, dbx or GUID/NAME): size, SHA-256, entries
  data-write=TEXT   write TEXT as the record on the unlocked data disk (QEMU backend: dm-crypt)
  data-read         report the record on the unlocked data disk
  fde-prepare-update=kernel:FILE | initrd:FILE | cmdline:TEXT
                    before an OS update: re-seal the LUKS key to the PCRs the next boot will
                    have with that component changed (no recovery passphrase needed)
  fde-reseal        re-seal the LUKS key to the current PCRs (needs the recovery passphrase)
  wait=DURATION     stay up for DURATION (Go syntax, at most 10m), e.g. while the host acts
  reboot            shut down cleanly and report a reboot request (must be last)
  poweroff          shut down cleanly (the default end; must be last)`

// Action is one workload step.
type Action struct{ Name, Arg string }

var actionArgs = map[string]bool{"nv-increment": false, "nv-read": false, "nv-write": true, "uefi-set": true, "uefi-get": true, "data-write": true, "data-read": false,
	"fde-reseal": false, "fde-prepare-update": true, "wait": true, "reboot": false, "poweroff": false}

// ParseActions parses the --then list.
func ParseActions(s string) ([]Action, error) {
	var out []Action
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	for i, part := range strings.Split(s, ",") {
		name, arg, hasArg := strings.Cut(strings.TrimSpace(part), "=")
		needs, known := actionArgs[name]
		switch {
		case !known:
			return nil, fmt.Errorf("action %d: unknown action %q", i+1, name)
		case needs && !hasArg:
			return nil, fmt.Errorf("action %q needs =ARGUMENT", name)
		case !needs && hasArg:
			return nil, fmt.Errorf("action %q takes no argument", name)
		}
		if len(out) > 0 && (out[len(out)-1].Name == "reboot" || out[len(out)-1].Name == "poweroff") {
			return nil, fmt.Errorf("action %q after %s", name, out[len(out)-1].Name)
		}
		out = append(out, Action{name, arg})
	}
	return out, nil
}

// Variables is the slice of the variable service the workload uses.
type Variables interface {
	Get(guid uefivars.GUID, name string) (*uefivars.Variable, bool)
	Set(u uefivars.Update) error
}

// variableRef resolves PK, KEK, db, dbx or "GUID/NAME".
func variableRef(s string) (uefivars.GUID, string, error) {
	switch s {
	case "PK", "KEK":
		return uefivars.GlobalVariable, s, nil
	case "db", "dbx":
		return uefivars.ImageSecurityDatabase, s, nil
	}
	g, name, ok := strings.Cut(s, "/")
	if !ok {
		return uefivars.GUID{}, "", fmt.Errorf("variable %q: want PK, KEK, db, dbx or GUID/NAME", s)
	}
	guid, err := uefivars.ParseGUID(g)
	return guid, name, err
}

// Workload runs actions against the OS's view of the platform.
type Workload struct {
	TPM  io.ReadWriter
	Vars Variables
	FDE  *FDE // nil without a data disk
	// DataDevice is the opened dm-crypt device; empty when the key was only verified.
	DataDevice string
}

// Run performs one action and returns the fields of its result event. Terminal actions
// (reboot, poweroff) are the caller's business.
func (w *Workload) Run(ctx context.Context, a Action) (map[string]any, error) {
	switch a.Name {
	case "nv-increment":
		if err := w.ensureNV(NVCounterIndex, tpm2.AttrAuthWrite|tpm2.AttrAuthRead|0x10, 8); err != nil {
			return nil, err
		}
		if err := tpm2.NVIncrement(w.TPM, NVCounterIndex, ""); err != nil {
			return nil, fmt.Errorf("NV increment: %w", err)
		}
		v, err := w.readCounter()
		return map[string]any{"nv_counter": v}, err
	case "nv-read":
		out := map[string]any{}
		if v, err := w.readCounter(); err == nil {
			out["nv_counter"] = v
		}
		if d, err := tpm2.NVReadEx(w.TPM, NVDataIndex, tpm2.HandleOwner, "", 0); err == nil {
			out["nv_data"] = strings.TrimRight(string(d), "\x00")
		}
		return out, nil
	case "nv-write":
		if len(a.Arg) > NVDataSize {
			return nil, fmt.Errorf("nv-write: %d bytes exceeds %d", len(a.Arg), NVDataSize)
		}
		if err := w.ensureNV(NVDataIndex, 0, NVDataSize); err != nil {
			return nil, err
		}
		buf := make([]byte, NVDataSize)
		copy(buf, a.Arg)
		if err := tpm2.NVWrite(w.TPM, tpm2.HandleOwner, NVDataIndex, "", buf, 0); err != nil {
			return nil, fmt.Errorf("NV write: %w", err)
		}
		return map[string]any{"nv_data": a.Arg}, nil
	case "uefi-set":
		b, err := os.ReadFile(a.Arg)
		if err != nil {
			return nil, err
		}
		var u uefivars.Update
		if err := json.Unmarshal(b, &u); err != nil {
			return nil, fmt.Errorf("uefi-set %s: %w", a.Arg, err)
		}
		res := map[string]any{"variable": u.Name}
		if err := w.Vars.Set(u); err != nil {
			var ue *uefivars.Error
			if errors.As(err, &ue) {
				res["status"] = string(ue.Status)
				return res, err
			}
			return res, err
		}
		res["status"] = "EFI_SUCCESS"
		return res, nil
	case "uefi-get":
		guid, name, err := variableRef(a.Arg)
		if err != nil {
			return nil, err
		}
		res := map[string]any{"variable": name}
		v, ok := w.Vars.Get(guid, name)
		if !ok {
			res["present"] = false
			return res, nil
		}
		sum := sha256.Sum256(v.Data)
		res["present"], res["size"], res["sha256"] = true, len(v.Data), hex.EncodeToString(sum[:])
		if sigs, err := uefivars.ParseSignatureLists(v.Data); err == nil && v.Attributes&uefivars.TimeBasedAuthenticatedWriteAccess != 0 {
			res["entries"] = len(sigs)
		}
		return res, nil
	case "data-write", "data-read":
		if w.DataDevice == "" {
			return nil, errors.New(a.Name + ": no unlocked data device (the process backend only verifies the LUKS key; dm-crypt runs in the QEMU backend)")
		}
		if a.Name == "data-write" {
			if err := WriteRecord(w.DataDevice, []byte(a.Arg)); err != nil {
				return nil, err
			}
			return map[string]any{"data": a.Arg}, nil
		}
		rec, err := ReadRecord(w.DataDevice)
		if err != nil {
			return nil, err
		}
		return map[string]any{"data": string(rec)}, nil
	case "fde-prepare-update":
		if w.FDE == nil {
			return nil, errors.New("fde-prepare-update: no data disk")
		}
		what, arg, ok := strings.Cut(a.Arg, ":")
		var pred map[int][]byte
		switch {
		case ok && what == "cmdline":
			pred = firmware.PredictPCRs(nil, nil, &arg)
		case ok && (what == "kernel" || what == "initrd"):
			fi, err := os.Stat(arg)
			if err != nil {
				return nil, err
			}
			if fi.Size() > 512<<20 {
				return nil, fmt.Errorf("%s: %d bytes is too large", arg, fi.Size())
			}
			b, err := os.ReadFile(arg)
			if err != nil {
				return nil, err
			}
			if what == "kernel" {
				pred = firmware.PredictPCRs(b, nil, nil)
			} else {
				pred = firmware.PredictPCRs(nil, b, nil)
			}
		default:
			return nil, fmt.Errorf("fde-prepare-update=%s: want kernel:FILE, initrd:FILE or cmdline:TEXT", a.Arg)
		}
		pcrs := []int{}
		for p := range pred {
			pcrs = append(pcrs, p)
		}
		return map[string]any{"predicted_pcrs": pcrs}, w.FDE.PrepareUpdate(ctx, pred)
	case "fde-reseal":
		if w.FDE == nil {
			return nil, errors.New("fde-reseal: no data disk")
		}
		return map[string]any{}, w.FDE.Reseal(ctx)
	case "wait":
		d, err := time.ParseDuration(a.Arg)
		if err != nil || d < 0 || d > MaxWait {
			return nil, fmt.Errorf("wait=%s: want a duration up to %s", a.Arg, MaxWait)
		}
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return map[string]any{"waited": d.String()}, nil
	}
	return nil, fmt.Errorf("action %q is handled by the caller", a.Name)
}

func (w *Workload) ensureNV(h tpmutil.Handle, typeBits tpm2.NVAttr, size uint16) error {
	if _, err := tpm2.NVReadPublic(w.TPM, h); err == nil {
		return nil
	}
	attrs := tpm2.AttrOwnerWrite | tpm2.AttrOwnerRead | tpm2.AttrNoDA | typeBits
	if err := tpm2.NVDefineSpace(w.TPM, tpm2.HandleOwner, h, "", "", nil, attrs, size); err != nil {
		return fmt.Errorf("define NV index %#x: %w", uint32(h), err)
	}
	return nil
}

func (w *Workload) readCounter() (uint64, error) {
	b, err := tpm2.NVReadEx(w.TPM, NVCounterIndex, tpm2.HandleOwner, "", 0)
	if err != nil {
		return 0, fmt.Errorf("NV counter read: %w", err)
	}
	if len(b) != 8 {
		return 0, fmt.Errorf("NV counter is %d bytes", len(b))
	}
	return binary.BigEndian.Uint64(b), nil
}
