# svsm-e2e — see README.md. Two commands on a fresh machine: `make demo`, `make test`.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH):/usr/sbin:/sbin
BACKEND ?= process
GO ?= go
BIN := bin
# An IGVM-capable QEMU beside the project (../shared/tools/qemu-igvm) becomes the QEMU backend's
# QEMU: q35 VMs then boot from their IGVM launch images. Override with SVSM_E2E_QEMU=...
SHARED_QEMU := $(wildcard $(CURDIR)/../shared/tools/qemu-igvm/bin/qemu-system-x86_64)
SVSM_E2E_QEMU ?= $(SHARED_QEMU)
export SVSM_E2E_QEMU

.PHONY: all deps build test scenarios images fixtures fuzz bench demo vet clean mutants explore qualify

all: build

# What a target needs: the demo needs the stack; tests, benchmarks, mutants and qualification
# also need PostgreSQL and Chromium (their tests start them).
SETUP ?= run
test bench qualify mutants: SETUP = tests
deps:
	@BACKEND=$(BACKEND) SVSM_E2E_SETUP=$(SETUP) bash ci/install-deps.sh

# svsm-guest is linked statically (it is also a QEMU guest's /init); the linker's warnings
# about getaddrinfo/dlopen concern OpenSSL code paths the TPM simulator never calls. -w drops
# DWARF (17 % of the binary, which the guest's firmware hashes at every boot) and keeps the
# symbol table (vtpm.CheckBinary reads it) and Go's own stack traces.
GUEST_LDFLAGS := -w -linkmode external -extldflags '-static -Wl,--no-warnings'

build:
	$(GO) build -o $(BIN)/ ./cmd/fakesnp ./cmd/svsm-e2e ./cmd/svsm-proxy ./cmd/svsm-verifier
	CGO_ENABLED=1 $(GO) build -tags netgo,osusergo -ldflags "$(GUEST_LDFLAGS)" -o $(BIN)/svsm-guest ./cmd/svsm-guest

vet:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...

# Every test: unit tests, fuzz seed corpora and integration tests (with the race detector),
# then the Ginkgo scenario suite in parallel (also with -race) against the built binaries.
# The PostgreSQL tests start their own server; here a missing PostgreSQL fails them.
test scenarios: export SVSM_E2E_REQUIRE_POSTGRES := 1
test: export SVSM_E2E_REQUIRE_CHROMIUM := 1
test: deps vet build
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /scenarios$$)
	$(MAKE) --no-print-directory scenarios

# The scenario suite alone. LABELS filters by label (e.g. LABELS='attack && !slow'), FOCUS by
# spec text; JUNIT names a JUnit XML report to write. Failed specs print their artifact bundle.
LABELS ?=
FOCUS ?=
JUNIT ?=
scenarios: build
	SVSM_E2E_BIN=$(CURDIR)/$(BIN) $(GO) tool ginkgo -p -race --timeout 60m \
	  $(if $(LABELS),--label-filter '$(LABELS)') $(if $(FOCUS),--focus '$(FOCUS)') \
	  $(if $(JUNIT),--junit-report $(abspath $(JUNIT))) ./scenarios

# Run each fuzz target for FUZZTIME (default 10s).
FUZZTIME ?= 10s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
	  done; \
	done

# Benchmarks (speed targets live here, never in timed tests).
bench: deps build
	$(GO) test -run '^$$' -bench 'BenchmarkVerifierCapacity' -benchtime 300x ./harness
	$(GO) test -run '^$$' -bench 'BenchmarkAttestRelease' -benchtime 100x ./harness
	$(GO) test -run '^$$' -bench 'BenchmarkIdentify|BenchmarkBoltReleaseTx|BenchmarkNewSession' -benchtime 50x ./verifier
	$(GO) test -run '^$$' -bench 'BenchmarkBootToUnlocked' -benchtime 3x ./harness
	$(GO) test -run '^$$' -bench 'BenchmarkCoconutAttest' -benchtime 5x ./harness
	$(BIN)/svsm-e2e explore --seed 1 --budget 100 --workdir $(CURDIR)/explore-work | tail -2
	@SVSM_E2E_BIN=$(CURDIR)/$(BIN) GINKGO_NO_COLOR=TRUE $(GO) tool ginkgo -p --label-filter 'backend:process && !slow && !explore' ./scenarios \
	  | awk '/^Ran [0-9]+ of/ {printf "suite throughput (process specs, 2 ginkgo processes): %d specs in %.1f s = %.1f specs/min\n", $$2, $$7, $$2*60/$$7}'


demo: deps build
	$(BIN)/svsm-e2e demo --backend $(BACKEND) --workdir $(CURDIR)/demo-work

# Release qualification: the whole suite (LABELS filters) and an exploration, reported in
# reports/qualify/report.html (self-contained), report.json and junit.xml.
qualify: deps build
	$(BIN)/svsm-e2e qualify --out $(CURDIR)/reports/qualify $(if $(LABELS),--labels '$(LABELS)')

# The mutant catalog (ci/mutants): each mutant disables one protection in a temporary worktree
# of HEAD; the run reports what kills each and fails when one survives (about a minute each).
# ONLY=G1,V2 runs some.
ONLY ?=
mutants: deps
	$(GO) run ./ci/mutants $(if $(ONLY),-only $(ONLY)) $(if $(FAST),-fast) $(if $(LOGS),-logs $(abspath $(LOGS))) -out $(CURDIR)/mutants.json

# Long explorations: random host-action sequences against a real stack, checked against the
# reference model (`make test` runs a bounded one). SEED fixes the sequences (default: fresh,
# printed); BUDGET is steps or a duration.
BUDGET ?= 10m
SEED ?=
explore: deps build
	$(BIN)/svsm-e2e explore --budget $(BUDGET) $(if $(SEED),--seed $(SEED)) --workdir $(CURDIR)/explore-work

# Regenerate the IGVM golden vectors with the independent implementation (fixtures/igvm).
fixtures:
	python3 fixtures/igvm/measure.py --make-vectors fixtures/igvm

# The QEMU guest image (kernel from apt, initramfs with the static svsm-guest as /init), in
# $$SVSM_E2E_IMAGES or ~/.cache/svsm-e2e/images; rebuilt only when its inputs change.
images: deps build
	$(BIN)/svsm-e2e images

clean:
	rm -rf $(BIN) demo-work
