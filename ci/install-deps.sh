#!/usr/bin/env bash
# Installs what svsm-e2e needs on a fresh Debian 12 machine, and nothing that is already there.
# Used by `make demo`, `make test` and CI. Idempotent: a second run installs nothing.
# Prints one line per step (what, and why); apt's and dpkg's own output goes to a log file
# that an error names.
set -euo pipefail

log="${SVSM_E2E_SETUP_LOG:-${TMPDIR:-/tmp}/svsm-e2e-install-deps.log}"
: >"$log"

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

# run WHAT CMD...: runs CMD with its output in the log; on failure says where to look.
run() {
  local what="$1"
  shift
  echo "== $what: $*" >>"$log"
  if ! "$@" >>"$log" 2>&1; then
    echo "install-deps: $what failed; its output is in $log (last lines below)" >&2
    tail -n 15 "$log" >&2
    exit 1
  fi
}

# Package groups, each with the reason it is needed. SVSM_E2E_SETUP=tests (make test, bench,
# qualify, mutants) adds the servers the tests start themselves; make demo does not need them.
groups=(
  "gcc libc6-dev libssl-dev|cgo, the race detector, and the TPM simulator (links OpenSSL's libcrypto, statically for svsm-guest)"
  "cryptsetup-bin|LUKS2 data disks (the FDE scenarios)"
  "qemu-system-x86 xz-utils|the QEMU backend, and unpacking the kernel svsm-e2e images fetches with apt-get download"
  "libglib2.0-0 libslirp0 libfdt1 zlib1g libpcre2-8-0|libraries the IGVM-capable QEMU in ../shared/tools/qemu-igvm links against"
)
if [ "${SVSM_E2E_SETUP:-tests}" = tests ]; then
  groups+=(
    "postgresql|the verifier's scale-out store, whose tests start their own PostgreSQL server from these binaries"
    "chromium|checking svsm-e2e qualify's report in headless Chromium, as a person would see it"
  )
fi

updated=""
for g in "${groups[@]}"; do
  pkgs="${g%%|*}"
  why="${g#*|}"
  missing=()
  for p in $pkgs; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  if ((${#missing[@]} == 0)); then
    echo "install-deps: present: $pkgs; for $why"
    continue
  fi
  echo "install-deps: installing ${missing[*]}; for $why"
  if [ -z "$updated" ]; then
    run "apt-get update" $sudo apt-get update -q
    updated=1
  fi
  run "apt-get install ${missing[*]}" $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
done

# The guest image fetches the kernel package by name: the package lists must know it.
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  echo "install-deps: refreshing the package lists (they do not know linux-image-amd64, which the guest image is built from)"
  run "apt-get update" $sudo apt-get update -q
fi

if ! command -v go >/dev/null 2>&1; then
  echo "install-deps: Go 1.26 is required and is not on PATH (expected at /usr/local/go/bin)" >&2
  exit 1
fi
if go mod verify >/dev/null 2>&1; then
  echo "install-deps: present: Go modules (go.sum verified)"
else
  echo "install-deps: downloading Go modules (go.mod's requirements)"
  run "go mod download" go mod download
fi
