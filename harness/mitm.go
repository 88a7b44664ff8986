package harness

import (
	"bytes"
	"errors"
	"net"
	"sync"
	"time"

	"github.com/svsm-e2e/svsm-e2e/protocol"
)

// Direction of a frame through the MITM.
type Direction int

// Directions.
const (
	ToProxy Direction = iota // guest → proxy
	ToGuest                  // proxy → guest
)

// Frame is one §1 message seen by the MITM.
type Frame struct {
	Conn  int // connection number, from 0
	Dir   Direction
	Index int // message number in this direction on this connection, from 0
	Body  []byte
}

// Verdict is what the MITM does with a frame.
type Verdict struct {
	Body  []byte        // sent instead of the original when non-nil
	Drop  bool          // close both sides instead of forwarding
	Delay time.Duration // wait before forwarding
	// Reply, when non-nil, is sent back to the frame's sender instead of forwarding the frame:
	// the host answering in the other side's place.
	Reply []byte
}

// MITM sits on the §1 channel between a guest and svsm-proxy: the host's power to drop,
// delay, replay and alter messages. It relays whole frames and records what it saw.
type MITM struct {
	ln     net.Listener
	target string
	mutate func(Frame) Verdict
	mu     sync.Mutex
	frames []Frame
	conns  int
	wg     sync.WaitGroup
}

// StartMITM listens on the unix socket path and relays to target (the proxy's socket).
// mutate may be nil (a transparent relay); Set changes it later.
func StartMITM(path, target string, mutate func(Frame) Verdict) (*MITM, error) {
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	m := &MITM{ln: ln, target: target, mutate: mutate}
	m.wg.Add(1)
	go m.accept()
	return m, nil
}

// Set replaces what the MITM does with each frame from now on (nil: relay it unchanged).
func (m *MITM) Set(mutate func(Frame) Verdict) {
	m.mu.Lock()
	m.mutate = mutate
	m.mu.Unlock()
}

// Path is where guests connect.
func (m *MITM) Path() string { return m.ln.Addr().String() }

// Frames returns copies of the frames seen so far (as received, before any change).
func (m *MITM) Frames() []Frame {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]Frame(nil), m.frames...)
}

// Close stops listening and waits for relays to end.
func (m *MITM) Close() {
	m.ln.Close()
	m.wg.Wait()
}

func (m *MITM) accept() {
	defer m.wg.Done()
	for {
		c, err := m.ln.Accept()
		if err != nil {
			return
		}
		m.mu.Lock()
		n := m.conns
		m.conns++
		m.mu.Unlock()
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			m.relay(n, c)
		}()
	}
}

func (m *MITM) relay(n int, guest net.Conn) {
	defer guest.Close()
	proxy, err := net.DialTimeout("unix", m.target, 5*time.Second)
	if err != nil {
		return
	}
	defer proxy.Close()
	deadline := time.Now().Add(2 * time.Minute) // bound every relay
	_ = guest.SetDeadline(deadline)
	_ = proxy.SetDeadline(deadline)
	var wg sync.WaitGroup
	var wmu [2]sync.Mutex // one writer at a time per side: replies share the sender's side
	write := func(side int, c net.Conn, body []byte) error {
		wmu[side].Lock()
		defer wmu[side].Unlock()
		return protocol.WriteFrame(c, body)
	}
	pipe := func(dir Direction, from, to net.Conn) {
		defer wg.Done()
		defer from.Close()
		defer to.Close()
		for i := 0; ; i++ {
			body, err := protocol.ReadFrame(from, protocol.MaxFrameSize)
			if err != nil {
				return
			}
			f := Frame{Conn: n, Dir: dir, Index: i, Body: bytes.Clone(body)}
			m.mu.Lock()
			m.frames = append(m.frames, f)
			mutate := m.mutate
			m.mu.Unlock()
			var v Verdict
			if mutate != nil {
				v = mutate(f)
			}
			if v.Drop {
				return
			}
			if v.Delay > 0 {
				time.Sleep(v.Delay)
			}
			if v.Reply != nil {
				if err := write(int(dir), from, v.Reply); err != nil {
					return
				}
				continue
			}
			if v.Body != nil {
				body = v.Body
			}
			if err := write(1-int(dir), to, body); err != nil && !errors.Is(err, net.ErrClosed) {
				return
			}
		}
	}
	wg.Add(2)
	go pipe(ToProxy, guest, proxy)
	go pipe(ToGuest, proxy, guest)
	wg.Wait()
}

// SetProxySocket points the VM's host.json at another §1 socket (a MITM's).
func (v *VM) SetProxySocket(path string) error {
	hj := *v.hj
	hj.ProxySocket = path
	v.hj = &hj
	return WriteHostJSON(v.HostJSON, &hj)
}

// ProxySocket is the real proxy's socket.
func (s *Stack) ProxySocket() string { return s.Host.ProxySocket }
