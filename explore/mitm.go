package explore

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sync"

	"github.com/svsm-e2e/svsm-e2e/harness"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// The host's attacks on the guest's freshness confirmation, as `mitm KIND` steps.
var mitmKinds = map[string]string{
	"forge":        "answer the confirmation in the verifier's place with a made-up MAC",
	"forge-v0.2":   "answer with the old unauthenticated 0.2.0 success",
	"replay":       "answer with the last genuine answer from an earlier boot",
	"replace":      "let the verifier confirm, then hand the guest an earlier answer",
	"reflect":      "send the guest's own request back as the answer",
	"forge-req":    "raise the request's counter under a MAC of the host's making",
	"drop-request": "close the channel instead of forwarding the confirmation",
	"drop-answer":  "let the verifier confirm, then close instead of answering",
}

// confirmMITM sits between the VMs and the proxy for the whole run: a transparent relay
// except during a `mitm` step, when it attacks the confirmation of that boot.
type confirmMITM struct {
	m       *harness.MITM
	mu      sync.Mutex
	attack  string // "" = relay
	conns   map[int]bool
	answers [][]byte // genuine answers seen
	hits    int      // frames the current attack acted on
}

func startConfirmMITM(path, target string) (*confirmMITM, error) {
	t := &confirmMITM{conns: map[int]bool{}}
	m, err := harness.StartMITM(path, target, t.frame)
	if err != nil {
		return nil, err
	}
	t.m = m
	return t, nil
}

func (t *confirmMITM) set(kind string) {
	t.mu.Lock()
	t.attack, t.hits = kind, 0
	t.mu.Unlock()
}

func (t *confirmMITM) acted() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.hits
}

func (t *confirmMITM) frame(f harness.Frame) harness.Verdict {
	t.mu.Lock()
	defer t.mu.Unlock()
	isReq := f.Dir == harness.ToProxy && bytes.Contains(f.Body, []byte(`"confirm":{`))
	if isReq {
		t.conns[f.Conn] = true
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
	v := t.verdict(f, isReq, last)
	if isAnswer && v.Body == nil && !v.Drop {
		t.answers = append(t.answers, bytes.Clone(f.Body)) // genuine, forwarded
	}
	return v
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
