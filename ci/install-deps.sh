#!/usr/bin/env bash
# Installs what svsm-e2e needs on a fresh Debian 12 machine, and nothing that is already there.
# Used by `make demo`, `make test` and CI. Idempotent: a second run installs nothing.
set -euo pipefail

# Base: cgo for the race detector and the TPM simulator (links OpenSSL's libcrypto, statically
# for svsm-guest), and cryptsetup for the LUKS2 data disks.
pkgs=(gcc libc6-dev libssl-dev cryptsetup-bin)
# The QEMU backend (make test runs its scenarios too): QEMU, and xz to unpack the kernel that
# `svsm-e2e images` fetches with apt-get download.
pkgs+=(qemu-system-x86 xz-utils)
# The IGVM-capable QEMU in ../shared/tools/qemu-igvm (backend:coconut specs, when present) is
# linked against these Debian libraries (its README); qemu-system-x86 brings them too, named
# here so that the dependency is explicit.
pkgs+=(libglib2.0-0 libslirp0 libfdt1 zlib1g libpcre2-8-0)

missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "install-deps: apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-deps: Debian packages present (${pkgs[*]})"
fi
# The guest image fetches the kernel package by name: the package lists must know it.
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "install-deps: apt-get update (package lists do not know linux-image-amd64)"
  $sudo apt-get update -qq
fi

if ! command -v go >/dev/null 2>&1; then
  echo "install-deps: Go 1.26 is required and is not on PATH (expected at /usr/local/go/bin)" >&2
  exit 1
fi
go mod download
echo "install-deps: Go modules present"
