package verifier

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strconv"

	"github.com/google/go-sev-guest/abi"

	"github.com/svsm-e2e/svsm-e2e/internal/admintoken"
	"github.com/svsm-e2e/svsm-e2e/protocol"
)

var vmNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Validate checks a registration.
func (s *VMSpec) Validate() error {
	if !vmNameRE.MatchString(s.Name) {
		return fmt.Errorf("vm name %q: want %s", s.Name, vmNameRE)
	}
	if len(s.Measurements) == 0 || len(s.Measurements) > 64 {
		return fmt.Errorf("vm %s: want 1..64 measurements, got %d", s.Name, len(s.Measurements))
	}
	for i, m := range s.Measurements {
		if len(m) != abi.MeasurementSize {
			return fmt.Errorf("vm %s: measurement %d is %d bytes, want %d", s.Name, i, len(m), abi.MeasurementSize)
		}
	}
	if len(s.HostData) != 0 && len(s.HostData) != abi.HostDataSize {
		return fmt.Errorf("vm %s: host_data is %d bytes, want %d", s.Name, len(s.HostData), abi.HostDataSize)
	}
	for i, c := range s.ChipIDs {
		if len(c) != abi.ChipIDSize {
			return fmt.Errorf("vm %s: chip_id %d is %d bytes, want %d", s.Name, i, len(c), abi.ChipIDSize)
		}
	}
	switch s.SecretMode {
	case "":
		s.SecretMode = protocol.SecretModeV1
	case protocol.SecretModeRaw:
		if s.WriteThrough {
			return fmt.Errorf("vm %s: write_through needs secret_mode v1", s.Name)
		}
	case protocol.SecretModeV1:
	default:
		return fmt.Errorf("vm %s: secret_mode %q, want raw or v1", s.Name, s.SecretMode)
	}
	return nil
}

// Register creates a VM with a fresh state key and id. Registering an existing name fails.
func (v *Verifier) Register(ctx context.Context, spec VMSpec) (*VMView, error) {
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	vm := &VM{VMSpec: spec, ID: make([]byte, 32), StateKey: make([]byte, protocol.StateKeySize)}
	if _, err := rand.Read(vm.ID); err != nil {
		return nil, err
	}
	if _, err := rand.Read(vm.StateKey); err != nil {
		return nil, err
	}
	err := v.store.Update(ctx, func(tx Tx) error {
		if _, err := tx.VM(spec.Name); err == nil {
			return fmt.Errorf("vm %s already registered", spec.Name)
		}
		vm.Created = tx.Now()
		if err := tx.PutVM(vm); err != nil {
			return err
		}
		return tx.Audit(AuditEvent{Event: "register", Outcome: Allow, VM: spec.Name, Reason: "secret_mode " + spec.SecretMode})
	})
	if err != nil {
		return nil, err
	}
	view := vm.View()
	return &view, nil
}

// SetMeasurements replaces the VM's allow-list of launch digests: the owner approves a new
// launch image (an OS update) or withdraws an old one. Audited.
func (v *Verifier) SetMeasurements(ctx context.Context, name string, ms []HexBytes) (*VMView, error) {
	var view VMView
	err := v.store.Update(ctx, func(tx Tx) error {
		vm, err := tx.VM(name)
		if err != nil {
			return err
		}
		spec := vm.VMSpec
		spec.Measurements = ms
		if err := spec.Validate(); err != nil {
			return fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		vm.VMSpec = spec
		if err := tx.PutVM(vm); err != nil {
			return err
		}
		view = vm.View()
		return tx.Audit(AuditEvent{Event: "policy", Outcome: Allow, VM: name, Reason: fmt.Sprintf("measurements set (%d)", len(ms))})
	})
	if err != nil {
		return nil, err
	}
	return &view, nil
}

// Prime allows exactly one more release for the VM.
func (v *Verifier) Prime(ctx context.Context, name string) (*VMView, error) {
	var view VMView
	err := v.store.Update(ctx, func(tx Tx) error {
		vm, err := tx.VM(name)
		if err != nil {
			return err
		}
		reason := ""
		if vm.Primed {
			reason = "already primed"
		}
		vm.Primed = true
		vm.PrimedAt = tx.Now()
		vm.BootRequest++ // a new request: evidence verified before it cannot spend it
		if err := tx.PutVM(vm); err != nil {
			return err
		}
		view = vm.View()
		if err := tx.Audit(AuditEvent{Event: "prime", Outcome: Allow, VM: name, Reason: reason}); err != nil {
			return err
		}
		v.opts.Crash.At("verifier/prime/before-commit")
		return nil
	})
	if err != nil {
		return nil, err
	}
	v.opts.Crash.At("verifier/prime/after-commit")
	return &view, nil
}

// Show returns one VM's view.
func (v *Verifier) Show(ctx context.Context, name string) (*VMView, error) {
	var view VMView
	err := v.store.View(ctx, func(tx Tx) error {
		vm, err := tx.VM(name)
		if err != nil {
			return err
		}
		view = vm.View()
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &view, nil
}

// AdminHandler serves the token-protected admin API:
//
//	POST /admin/v1/vms                       register (VMSpec)
//	GET  /admin/v1/vms                       list
//	GET  /admin/v1/vms/{name}                show
//	POST /admin/v1/vms/{name}/boot-requests  prime one boot
//	PUT  /admin/v1/vms/{name}/measurements   replace the launch digest allow-list
//	GET  /admin/v1/audit?vm=NAME&since=SEQ&limit=N
func (v *Verifier) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /admin/v1/vms", func(w http.ResponseWriter, r *http.Request) {
		var spec VMSpec
		if err := readJSON(r, &spec); err != nil {
			problem(w, http.StatusBadRequest, "InvalidRequest", err.Error())
			return
		}
		view, err := v.Register(r.Context(), spec)
		if err != nil {
			problem(w, http.StatusBadRequest, "InvalidRequest", err.Error())
			return
		}
		writeJSON(w, http.StatusCreated, view)
	})
	mux.HandleFunc("GET /admin/v1/vms", func(w http.ResponseWriter, r *http.Request) {
		out := []VMView{}
		err := v.store.View(r.Context(), func(tx Tx) error {
			vms, err := tx.VMs()
			for _, vm := range vms {
				out = append(out, vm.View())
			}
			return err
		})
		if err != nil {
			problem(w, http.StatusInternalServerError, "Internal", err.Error())
			return
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET /admin/v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		view, err := v.Show(r.Context(), r.PathValue("name"))
		if err != nil {
			adminError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, view)
	})
	mux.HandleFunc("POST /admin/v1/vms/{name}/boot-requests", func(w http.ResponseWriter, r *http.Request) {
		view, err := v.Prime(r.Context(), r.PathValue("name"))
		if err != nil {
			adminError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, view)
	})
	mux.HandleFunc("PUT /admin/v1/vms/{name}/measurements", func(w http.ResponseWriter, r *http.Request) {
		var ms []HexBytes
		if err := readJSON(r, &ms); err != nil {
			problem(w, http.StatusBadRequest, "InvalidRequest", err.Error())
			return
		}
		view, err := v.SetMeasurements(r.Context(), r.PathValue("name"), ms)
		if err != nil {
			adminError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, view)
	})
	mux.HandleFunc("GET /admin/v1/audit", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		since, _ := strconv.ParseUint(q.Get("since"), 10, 64)
		limit, _ := strconv.Atoi(q.Get("limit"))
		evs, err := v.AuditEvents(r.Context(), q.Get("vm"), since, limit)
		if err != nil {
			problem(w, http.StatusInternalServerError, "Internal", err.Error())
			return
		}
		writeJSON(w, http.StatusOK, evs)
	})
	metrics := v.metrics.handler()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Prometheus scrapes without the admin token: the series name no VM, boot or key.
		if r.Method == http.MethodGet && r.URL.Path == "/metrics" {
			metrics.ServeHTTP(w, r)
			return
		}
		if !admintoken.Valid(r, v.adminToken) {
			problem(w, http.StatusUnauthorized, "AdminUnauthorized", "missing or wrong admin bearer token")
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// ErrInvalid marks an admin request that is well-formed JSON but not acceptable.
var ErrInvalid = errors.New("invalid request")

func adminError(w http.ResponseWriter, err error) {
	if errors.Is(err, ErrNotFound) {
		problem(w, http.StatusNotFound, "NotFound", err.Error())
		return
	}
	if errors.Is(err, ErrInvalid) {
		problem(w, http.StatusBadRequest, "InvalidRequest", err.Error())
		return
	}
	problem(w, http.StatusInternalServerError, "Internal", err.Error())
}
