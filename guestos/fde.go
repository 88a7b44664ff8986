// Package guestos is the OS layer of the simulated guest: full-disk encryption unlocked
// through a vTPM PCR policy, and the workload actions a scenario drives. It talks to the
// vTPM only in TPM commands and to UEFI variables only through the variable service.
package guestos

import (
	"github.com/svsm-e2e/svsm-e2e/internal/crashpoint"

	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"

	"github.com/google/go-tpm-tools/client"
	pb "github.com/google/go-tpm-tools/proto/tpm"
	"github.com/google/go-tpm/legacy/tpm2"
	"google.golang.org/protobuf/proto"

	"github.com/svsm-e2e/svsm-e2e/firmware"
)

// PolicyPCRs are the SHA-256 PCRs the LUKS passphrase is sealed to: the kernel (4), Secure
// Boot configuration (7), the command line (8) and the initrd (9). PCR 0 is left out so
// that a firmware/IGVM rebuild with the same OS does not lock the disk; the launch
// measurement is already enforced by the verifier before any key exists.
var PolicyPCRs = []int{firmware.PCRBootApp, firmware.PCRSecureBoot, firmware.PCRCmdline, firmware.PCRInitrd}

// TokenType marks our LUKS2 token (the sealed passphrase lives in the LUKS header, as
// systemd-cryptenroll keeps its tpm2 token).
const TokenType = "svsm-e2e-tpm2"

// tokenID is the LUKS2 token slot we use.
const tokenID = 0

// Token is the LUKS2 token JSON.
type Token struct {
	Type     string   `json:"type"`
	Keyslots []string `json:"keyslots"`
	PCRs     []int    `json:"svsm-e2e-pcrs"`
	Bank     string   `json:"svsm-e2e-pcr-bank"`
	Blob     []byte   `json:"svsm-e2e-sealed"` // proto SealedBytes, base64 in JSON
}

// Unlock outcomes.
const (
	MethodTPM      = "tpm"
	MethodRecovery = "recovery"
)

// FDE unlocks one LUKS2 data disk.
type FDE struct {
	TPM        io.ReadWriter
	Cryptsetup Cryptsetup
	Device     string
	Recovery   []byte // the passphrase a user would type; nil when nobody is there
	// Open unlocks through device-mapper (QEMU guest); otherwise the passphrase is only
	// verified with --test-passphrase (process backend).
	Open       bool
	MapperName string
	Emit       func(event, reason string, fields map[string]any)
	// Crash marks each step of a (re-)seal at its registered crash point.
	Crash *crashpoint.Injector

	unlockedWith []byte // the passphrase that opened the disk this boot
}

// ErrLocked means neither the TPM nor the recovery passphrase unlocked the disk.
var ErrLocked = errors.New("data disk stays locked")

// Unlock enrolls on first boot, or unseals and unlocks; on a policy failure it reports and
// falls back to the recovery passphrase. It returns the method that worked.
func (f *FDE) Unlock(ctx context.Context) (string, error) {
	md, err := f.Cryptsetup.Metadata(ctx, f.Device)
	if err != nil {
		return "", fmt.Errorf("read LUKS2 header: %w", err)
	}
	tok, err := findToken(md)
	if err != nil {
		return "", err
	}
	if tok == nil {
		if err := f.enroll(ctx); err != nil {
			return "", fmt.Errorf("enroll TPM key: %w", err)
		}
		if md, err = f.Cryptsetup.Metadata(ctx, f.Device); err != nil {
			return "", err
		}
		if tok, err = findToken(md); err != nil || tok == nil {
			return "", fmt.Errorf("token missing after enrollment: %v", err)
		}
	}
	pass, uerr := f.unseal(tok)
	if uerr == nil {
		if err := f.unlockWith(ctx, tokenSlot(tok), pass); err != nil {
			return "", fmt.Errorf("TPM passphrase unsealed but LUKS refused it: %w", err)
		}
		f.unlockedWith = pass
		f.Emit("fde-unlocked", "", map[string]any{"method": MethodTPM, "keyslot": tok.Keyslots[0]})
		return MethodTPM, nil
	}
	f.Emit("fde-policy-failed", uerr.Error(), map[string]any{"pcrs": tok.PCRs})
	if f.Recovery == nil {
		return "", fmt.Errorf("%w: unseal failed (%v) and no recovery passphrase was given", ErrLocked, uerr)
	}
	if err := f.unlockWith(ctx, AnySlot, f.Recovery); err != nil {
		return "", fmt.Errorf("%w: recovery passphrase refused: %v", ErrLocked, err)
	}
	f.unlockedWith = f.Recovery
	f.Emit("fde-unlocked", "", map[string]any{"method": MethodRecovery})
	return MethodRecovery, nil
}

func (f *FDE) unlockWith(ctx context.Context, slot int, pass []byte) error {
	if f.Open {
		return f.Cryptsetup.Open(ctx, f.Device, f.MapperName, slot, pass)
	}
	return f.Cryptsetup.TestPassphrase(ctx, f.Device, slot, pass)
}

// tokenSlot is the keyslot the token's passphrase opens, or AnySlot when the token names
// none that parses (its passphrase is then tried against every keyslot).
func tokenSlot(t *Token) int {
	n, err := strconv.Atoi(t.Keyslots[0])
	if err != nil || n < 0 {
		return AnySlot
	}
	return n
}

func findToken(md *Metadata) (*Token, error) {
	raw, ok := md.Tokens[fmt.Sprint(tokenID)]
	if !ok {
		return nil, nil
	}
	var t Token
	if err := json.Unmarshal(raw, &t); err != nil {
		return nil, fmt.Errorf("LUKS2 token %d: %w", tokenID, err)
	}
	if t.Type != TokenType || len(t.Keyslots) != 1 || len(t.Blob) == 0 {
		return nil, fmt.Errorf("LUKS2 token %d is not a %s token with one keyslot", tokenID, TokenType)
	}
	return &t, nil
}

// enroll adds a random passphrase in a new keyslot (authorised by the recovery passphrase)
// and stores it sealed to the current PolicyPCRs in the LUKS2 token.
func (f *FDE) enroll(ctx context.Context) error {
	if f.Recovery == nil {
		return errors.New("first boot needs the recovery passphrase to add the TPM keyslot")
	}
	_, err := f.enrollWith(ctx, f.Recovery, client.SealOpts{Current: tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: slices.Clone(PolicyPCRs)}}, "fde-enrolled")
	return err
}

// enrollWith adds a new random passphrase, authorised by auth, sealed with opts, stores it
// as the token and returns it.
func (f *FDE) enrollWith(ctx context.Context, auth []byte, opts client.SealOpts, event string) ([]byte, error) {
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, err
	}
	pass := []byte(hex.EncodeToString(raw))
	blob, err := f.seal(pass, opts)
	if err != nil {
		return nil, err
	}
	slot, err := f.Cryptsetup.AddKey(ctx, f.Device, auth, pass)
	if err != nil {
		return nil, err
	}
	f.Crash.At("guest/luks/add-keyslot/done")
	tok := Token{Type: TokenType, Keyslots: []string{fmt.Sprint(slot)}, PCRs: PolicyPCRs, Bank: "sha256", Blob: blob}
	j, err := json.Marshal(tok)
	if err != nil {
		return nil, err
	}
	if err := f.Cryptsetup.ImportToken(ctx, f.Device, tokenID, j); err != nil {
		return nil, err
	}
	f.Crash.At("guest/luks/import-token/done")
	f.Emit(event, "", map[string]any{"keyslot": slot, "pcrs": PolicyPCRs})
	return pass, nil
}

// Reseal replaces the TPM keyslot with a new passphrase sealed to the PCR values the TPM
// holds now (after an OS update, or after a recovery unlock), authorised by the recovery
// passphrase.
func (f *FDE) Reseal(ctx context.Context) error {
	md, err := f.Cryptsetup.Metadata(ctx, f.Device)
	if err != nil {
		return err
	}
	old, err := findToken(md)
	if err != nil {
		return err
	}
	if err := f.enroll(ctx); err != nil {
		return err
	}
	if old != nil {
		var n int
		if _, err := fmt.Sscan(old.Keyslots[0], &n); err == nil {
			if err := f.Cryptsetup.KillSlot(ctx, f.Device, n, f.Recovery); err != nil {
				return fmt.Errorf("remove old TPM keyslot %d: %w", n, err)
			}
			f.Crash.At("guest/luks/kill-old-keyslot/done")
		}
	}
	return nil
}

// PrepareUpdate re-seals before an OS update: a new passphrase sealed to the PCR values the
// next boot will have (predicted for the changed PCRs, the current values for the others),
// authorised by the passphrase that opened the disk this boot; the old TPM keyslot goes.
func (f *FDE) PrepareUpdate(ctx context.Context, predicted map[int][]byte) error {
	if f.unlockedWith == nil {
		return errors.New("the data disk is not unlocked")
	}
	current, err := tpm2.ReadPCRs(f.TPM, tpm2.PCRSelection{Hash: tpm2.AlgSHA256, PCRs: slices.Clone(PolicyPCRs)})
	if err != nil {
		return fmt.Errorf("read PCRs: %w", err)
	}
	target := &pb.PCRs{Hash: pb.HashAlgo_SHA256, Pcrs: map[uint32][]byte{}}
	for _, i := range PolicyPCRs {
		v := current[i]
		if p, ok := predicted[i]; ok {
			v = p
		}
		target.Pcrs[uint32(i)] = v
	}
	md, err := f.Cryptsetup.Metadata(ctx, f.Device)
	if err != nil {
		return err
	}
	old, err := findToken(md)
	if err != nil {
		return err
	}
	pass, err := f.enrollWith(ctx, f.unlockedWith, client.SealOpts{Target: target}, "fde-prepared")
	if err != nil {
		return err
	}
	if old != nil {
		var n int
		if _, err := fmt.Sscan(old.Keyslots[0], &n); err == nil {
			if err := f.Cryptsetup.KillSlot(ctx, f.Device, n, pass); err != nil {
				return fmt.Errorf("remove old TPM keyslot %d: %w", n, err)
			}
			f.Crash.At("guest/luks/kill-old-keyslot/done")
		}
	}
	return nil
}

func (f *FDE) seal(secret []byte, opts client.SealOpts) ([]byte, error) {
	srk, err := client.StorageRootKeyECC(f.TPM)
	if err != nil {
		return nil, fmt.Errorf("SRK: %w", err)
	}
	defer srk.Close()
	sb, err := srk.Seal(secret, opts)
	if err != nil {
		return nil, fmt.Errorf("seal: %w", err)
	}
	return proto.Marshal(sb)
}

func (f *FDE) unseal(t *Token) ([]byte, error) {
	var sb pb.SealedBytes
	if err := proto.Unmarshal(t.Blob, &sb); err != nil {
		return nil, fmt.Errorf("sealed blob: %w", err)
	}
	srk, err := client.StorageRootKeyECC(f.TPM)
	if err != nil {
		return nil, fmt.Errorf("SRK: %w", err)
	}
	defer srk.Close()
	pass, err := srk.Unseal(&sb, client.UnsealOpts{})
	if err != nil {
		return nil, fmt.Errorf("unseal with PCR policy %v: %w", t.PCRs, err)
	}
	return pass, nil
}
