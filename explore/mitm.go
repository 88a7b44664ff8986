package explore

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// The host's attacks on the guest's freshness confirmation, as `mitm KIND[@N]` steps.
var confirmKinds = map[string]string{
	"forge":        "answer the confirmation in the verifier's place with a made-up MAC",
	"forge-v0.2":   "answer with the old unauthenticated 0.2.0 success",
	"replay":       "answer with the last genuine answer from an earlier boot",
	"replace":      "let the verifier confirm, then hand the guest an earlier answer",
	"reflect":      "send the guest's own request back as the answer",
	"forge-req":    "raise the request's counter under a MAC of the host's making",
	"drop-request": "close the channel instead of forwarding the confirmation",
	"drop-answer":  "let the verifier confirm, then close instead of answering",
}

// The host's attacks on the attestation (KBS) exchange, as `mitm KIND` steps.
var attestKinds = map[string]string{
	"attest-replay": "answer the attestation with the last genuine answer from an earlier boot",
	"attest-flip":   "flip a byte of the released secret on its way to the guest",
	"attest-key":    "put the host's own key in the attestation request, so the secret would be wrapped to the host",
	"attest-drop":   "let the verifier release, then close instead of answering",
}

// Perturbations that are not attacks: the boot must still succeed.
var benignKinds = map[string]string{
	"delay": "hold every answer to the guest for 2 s (inside the guest's bounds)",
}

// benignDelay is how long a delay step holds each answer: well inside the guest's 10 s
// bound in mitm steps.
const benignDelay = 2 * time.Second

func confirmKindNames() []string { return slices.Sorted(maps.Keys(confirmKinds)) }
func attestKindNames() []string  { return slices.Sorted(maps.Keys(attestKinds)) }
func benignKindNames() []string  { return slices.Sorted(maps.Keys(benignKinds)) }

func mitmKindNames() []string {
	return slices.Sorted(slices.Values(slices.Concat(confirmKindNames(), attestKindNames(), benignKindNames())))
}

// parseMITM reads a mitm step's argument: a kind, and for confirmation attacks an optional
// @N (attack only the boot's N-th confirmation request, 1-based; 0 means all).
func parseMITM(arg string) (kind string, nth int, err error) {
	kind, n, hasN := strings.Cut(arg, "@")
	_, isConfirm := confirmKinds[kind]
	_, isAttest := attestKinds[kind]
	_, isBenign := benignKinds[kind]
	if !isConfirm && !isAttest && !isBenign {
		return "", 0, fmt.Errorf("the attack is one of %s", strings.Join(mitmKindNames(), ", "))
	}
	if hasN {
		if !isConfirm {
			return "", 0, fmt.Errorf("%s takes no @N: only confirmation attacks choose a confirmation", kind)
		}
		if nth, err = strconv.Atoi(n); err != nil || nth < 1 || nth > 16 {
			return "", 0, fmt.Errorf("@%s: want a confirmation number from 1 to 16", n)
		}
	}
	return kind, nth, nil
}

// confirmMITM sits between the VMs and the proxy for the whole run: a transparent relay
// except during a `mitm` step, when it attacks the attestation or a confirmation of that boot.
type confirmMITM struct {
	m       *harness.MITM
	hostKey protocol.ECPublicKey // the host's key for attest-key
	mu      sync.Mutex
	attack  string // "" = relay
	armed   string // the step's argument, for messages
	nth     int    // attack only this confirmation of the boot (0: every one)
	seen    int    // confirmation requests since set
	target  int    // the connection of the attacked confirmation (-1: none yet)
	conns   map[int]bool
	attests map[int]bool
	answers [][]byte // genuine confirmation answers seen
	granted [][]byte // genuine attestation answers seen
	hits    int      // frames the current attack acted on
}

func startConfirmMITM(path, target string, hostKey protocol.ECPublicKey) (*confirmMITM, error) {
	t := &confirmMITM{conns: map[int]bool{}, attests: map[int]bool{}, hostKey: hostKey, target: -1}
	m, err := harness.StartMITM(path, target, t.frame)
	if err != nil {
		return nil, err
	}
	t.m = m
	return t, nil
}

// set arms an attack ("" relays); arg is a mitm step's argument.
func (t *confirmMITM) set(arg string) {
	kind, nth, _ := parseMITM(arg) // checked by Parse
	t.mu.Lock()
	t.attack, t.armed, t.nth, t.seen, t.target, t.hits = kind, arg, nth, 0, -1, 0
	t.mu.Unlock()
}

// refusedByHost says whether the current attack, having acted, makes the guest refuse an
// answer the verifier never refused (an answer replayed in its place, altered or cut after
// the release): the refusal is the guest's alone and has no row in the verifier's audit.
func (t *confirmMITM) refusedByHost() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch t.attack {
	case "attest-replay", "attest-flip", "attest-drop":
		return t.hits > 0
	}
	return false
}

// arg is the armed attack as the step wrote it.
func (t *confirmMITM) arg() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.armed
}

func (t *confirmMITM) acted() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.hits
}

func (t *confirmMITM) frame(f harness.Frame) harness.Verdict {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.attack == "delay" && f.Dir == harness.ToGuest {
		return harness.Verdict{Delay: benignDelay}
	}
	if f.Dir == harness.ToProxy && bytes.Contains(f.Body, []byte(`"evidence":`)) {
		t.attests[f.Conn] = true
		return t.attestVerdict(f, true)
	}
	if f.Dir == harness.ToGuest && t.attests[f.Conn] {
		delete(t.attests, f.Conn)
		v := t.attestVerdict(f, false)
		if v.Body == nil && !v.Drop && bytes.Contains(f.Body, []byte(`"success":true`)) {
			t.granted = append(t.granted, bytes.Clone(f.Body))
		}
		return v
	}
	isReq := f.Dir == harness.ToProxy && bytes.Contains(f.Body, []byte(`"confirm":{`))
	if isReq {
		t.conns[f.Conn] = true
		t.seen++
		if t.nth == 0 || t.seen == t.nth {
			t.target = f.Conn
		}
	}
	isAnswer := f.Dir == harness.ToGuest && t.conns[f.Conn]
	if isAnswer {
		delete(t.conns, f.Conn)
	}
	if !isReq && !isAnswer {
		return harness.Verdict{}
	}
	var last []byte
	if len(t.answers) > 0 {
		last = t.answers[len(t.answers)-1]
	}
	v := harness.Verdict{}
	if _, ok := confirmKinds[t.attack]; ok && f.Conn == t.target && (!isReq || t.nth == 0 || t.seen == t.nth) {
		v = t.verdict(f, isReq, last)
	}
	if isAnswer && v.Body == nil && !v.Drop {
		t.answers = append(t.answers, bytes.Clone(f.Body)) // genuine, forwarded
	}
	return v
}

// attestVerdict attacks the attestation request (req) or its answer.
func (t *confirmMITM) attestVerdict(f harness.Frame, req bool) harness.Verdict {
	switch {
	case t.attack == "attest-replay" && req && len(t.granted) > 0:
		t.hits++
		return harness.Verdict{Reply: t.granted[len(t.granted)-1]}
	case t.attack == "attest-key" && req:
		var r protocol.AttestationRequest
		if json.Unmarshal(f.Body, &r) != nil {
			return harness.Verdict{}
		}
		r.Key = t.hostKey
		b, err := json.Marshal(r)
		if err != nil {
			return harness.Verdict{}
		}
		t.hits++
		return harness.Verdict{Body: b}
	case t.attack == "attest-flip" && !req:
		var a protocol.AttestationResponse
		if json.Unmarshal(f.Body, &a) != nil || !a.Success || len(a.Secret) == 0 {
			return harness.Verdict{}
		}
		a.Secret[len(a.Secret)/2] ^= 0x01
		b, err := json.Marshal(a)
		if err != nil {
			return harness.Verdict{}
		}
		t.hits++
		return harness.Verdict{Body: b}
	case t.attack == "attest-drop" && !req:
		t.hits++
		return harness.Verdict{Drop: true}
	}
	return harness.Verdict{}
}

func (t *confirmMITM) verdict(f harness.Frame, isReq bool, last []byte) harness.Verdict {
	var req *protocol.ConfirmRequest
	if isReq {
		var neg protocol.NegotiationRequest
		if json.Unmarshal(f.Body, &neg) != nil || neg.Confirm == nil {
			return harness.Verdict{}
		}
		req = neg.Confirm
	}
	reply := func(v any) harness.Verdict {
		b, _ := json.Marshal(v)
		t.hits++
		return harness.Verdict{Reply: b}
	}
	switch {
	case t.attack == "forge" && isReq:
		return reply(protocol.NewConfirmAnswer(protocol.ConfirmKeys{}, req, true, req.Counter, ""))
	case t.attack == "forge-v0.2" && isReq:
		t.hits++
		return harness.Verdict{Reply: []byte(fmt.Sprintf(`{"success":true,"counter":%d}`, req.Counter))}
	case t.attack == "replay" && isReq && last != nil:
		t.hits++
		return harness.Verdict{Reply: last}
	case t.attack == "replace" && !isReq && last != nil:
		t.hits++
		return harness.Verdict{Body: last}
	case t.attack == "reflect" && isReq:
		return reply(map[string]any{"version": protocol.VersionConfirm, "success": true, "boot_id": req.BootID,
			"counter": req.Counter, "nonce": req.Nonce, "confirmed": req.Counter, "mac": req.MAC})
	case t.attack == "forge-req" && isReq:
		forged := *req
		forged.Counter += 5
		forged.MAC = bytes.Repeat([]byte{0xAA}, len(req.MAC))
		b, _ := json.Marshal(protocol.NegotiationRequest{Version: protocol.VersionConfirm, Tee: protocol.TeeSNP, Confirm: &forged})
		t.hits++
		return harness.Verdict{Body: b}
	case t.attack == "drop-request" && isReq, t.attack == "drop-answer" && !isReq:
		t.hits++
		return harness.Verdict{Drop: true}
	}
	return harness.Verdict{}
}
