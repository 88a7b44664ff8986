// Package postgres starts a throw-away PostgreSQL server from the distribution's binaries
// (Debian's postgresql package, which ci/install-deps.sh installs) in a fresh temporary
// directory, listening only on a unix socket there, for tests and the harness. PostgreSQL
// refuses to run as root; as root it runs as the "postgres" user the package creates, so the
// directory is made under the system's temporary directory, which that user can reach.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvBinDir overrides where initdb and postgres are looked for.
const EnvBinDir = "SVSM_E2E_PG_BIN"

// ErrNotInstalled means no PostgreSQL server binaries were found.
var ErrNotInstalled = errors.New("postgres: no PostgreSQL server binaries (initdb, postgres): install Debian's postgresql package (ci/install-deps.sh does)")

// Options configure a server.
type Options struct {
	// StartTimeout bounds initdb and the start (default 60 s).
	StartTimeout time.Duration
	// Settings are extra postgres -c name=value settings.
	Settings []string
}

// Server is a running PostgreSQL.
type Server struct {
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
	// URL is a pgx connection string for the "postgres" database as the superuser.
	URL string
}

// BinDir finds the server binaries: $SVSM_E2E_PG_BIN, else the newest
// /usr/lib/postgresql/N/bin, else PATH.
func BinDir() (string, error) {
	if d := os.Getenv(EnvBinDir); d != "" {
		return d, nil
	}
	if vs, _ := filepath.Glob("/usr/lib/postgresql/*/bin"); len(vs) > 0 {
		slices.SortFunc(vs, func(a, b string) int { return version(a) - version(b) })
		return vs[len(vs)-1], nil
	}
	if p, err := exec.LookPath("postgres"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", ErrNotInstalled
}

func version(binDir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return n
}

// Start creates a cluster in o.Dir and starts the server; Stop stops it.
func Start(ctx context.Context, o Options) (*Server, error) {
	if o.StartTimeout == 0 {
		o.StartTimeout = 60 * time.Second
	}
	bin, err := BinDir()
	if err != nil {
		return nil, err
	}
	for _, b := range []string{"initdb", "postgres"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrNotInstalled, err)
		}
	}
	cred, err := runAs()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "svsm-pg-")
	if err != nil {
		return nil, err
	}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			_ = os.RemoveAll(dir)
			return nil, fmt.Errorf("postgres: hand %s to the postgres user: %w", dir, err)
		}
	}
	s, err := start(ctx, o, bin, dir, cred)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

func start(ctx context.Context, o Options, bin, dir string, cred *syscall.Credential) (*Server, error) {
	data, sock := filepath.Join(dir, "data"), dir // the socket in dir: /tmp/svsm-pg-N/.s.PGSQL.5432 fits sun_path
	ictx, cancel := context.WithTimeout(ctx, o.StartTimeout)
	defer cancel()
	initdb := exec.CommandContext(ictx, filepath.Join(bin, "initdb"), "-D", data, "-U", "svsm", "--auth=trust", "--no-instructions", "-E", "UTF8", "--locale=C")
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("postgres: initdb: %w\n%s", err, out)
	}
	logf, err := os.Create(filepath.Join(dir, "postgres.log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	args := []string{"-D", data, "-k", sock, "-c", "listen_addresses=", "-c", "max_connections=100"}
	for _, s := range o.Settings {
		args = append(args, "-c", s)
	}
	cmd := exec.Command(filepath.Join(bin, "postgres"), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("postgres: start: %w", err)
	}
	s := &Server{dir: dir, cmd: cmd, done: make(chan struct{}),
		URL: fmt.Sprintf("host=%s user=svsm dbname=postgres sslmode=disable", sock)}
	go func() { _ = cmd.Wait(); close(s.done) }()
	// Ready when it accepts a connection (the socket appears while it is still starting).
	for {
		if c, err := pgx.Connect(ictx, s.URL); err == nil {
			_ = c.Close(ictx)
			return s, nil
		}
		select {
		case <-s.done:
			return nil, fmt.Errorf("postgres: exited during start (see %s): %s", logf.Name(), tail(logf.Name()))
		case <-ictx.Done():
			_ = s.Stop()
			return nil, fmt.Errorf("postgres: not ready within %v (see %s)", o.StartTimeout, logf.Name())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop shuts the server down (fast shutdown: SIGINT; killed if it lingers) and removes its
// directory. Copy Log first to keep it.
func (s *Server) Stop() error {
	_ = s.cmd.Process.Signal(syscall.SIGINT)
	var err error
	select {
	case <-s.done:
	case <-time.After(20 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
		err = errors.New("postgres: did not stop within 20 s; killed")
	}
	return errors.Join(err, os.RemoveAll(s.dir))
}

// Log is where the server writes its log.
func (s *Server) Log() string { return filepath.Join(s.dir, "postgres.log") }

// runAs is the credential to run the server with: none for an ordinary user, the
// "postgres" user for root.
func runAs() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("postgres: running as root, and there is no postgres user to run the server as (Debian's postgresql package creates it): %w", err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 5 {
		lines = lines[len(lines)-5:]
	}
	return strings.Join(lines, " | ")
}
