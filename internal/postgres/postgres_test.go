package postgres

import (
	"context"
	"errors"
	"os"
	"testing"

	"github.com/jackc/pgx/v5"
)

// EnvRequire is pgtest.EnvRequire (pgtest imports this package).
const EnvRequire = "SVSM_E2E_REQUIRE_POSTGRES"

func TestStartStop(t *testing.T) {
	s, err := Start(t.Context(), Options{})
	if errors.Is(err, ErrNotInstalled) && os.Getenv(EnvRequire) == "" {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(t.Context(), s.URL)
	if err != nil {
		t.Fatal(err)
	}
	var sum int
	if err := conn.QueryRow(context.Background(), "SELECT 40 + 2").Scan(&sum); err != nil || sum != 42 {
		t.Fatalf("SELECT 40 + 2 = %d, %v", sum, err)
	}
	var sync string
	if err := conn.QueryRow(t.Context(), "SHOW synchronous_commit").Scan(&sync); err != nil || sync != "on" {
		t.Fatalf("synchronous_commit = %q, %v: commits must be durable", sync, err)
	}
	conn.Close(t.Context())
	dir := s.dir
	if err := s.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s left behind", dir)
	}
}
