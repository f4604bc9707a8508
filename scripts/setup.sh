#!/usr/bin/env bash
# Shared set-up for scripts/demo and scripts/test: installs what Fissile needs on a Debian 12
# host, builds our binaries, the guest kernel and the guest image. Everything expensive is
# cached under $FISSILE_CACHE (default /var/cache/fissile), keyed by content hash, so a second
# run is quick. Source it: `. scripts/setup.sh`.
set -euo pipefail

FISSILE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export FISSILE_CACHE=${FISSILE_CACHE:-/var/cache/fissile}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$FISSILE_CACHE/target}
mkdir -p "$FISSILE_CACHE"
step() { printf '\n==> [%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

APT_PACKAGES=(
  # the lab: QEMU with TCG, Debian's kernel (kvm_amd module), busybox for its initramfs
  qemu-system-x86 linux-image-amd64 busybox-static cpio e2fsprogs
  # the guest kernel build
  linux-source-6.12 bc bison flex libelf-dev libssl-dev xz-utils make gcc
  # the guest image build
  debootstrap
  # RocksDB (snapshotd) needs clang/libclang for bindgen
  clang libclang-dev
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  step "installing Debian packages: ${missing[*]}"
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! python3 -c 'import numpy, matplotlib, PIL' 2>/dev/null; then
  step "installing host Python packages for the agent tests (numpy, matplotlib)"
  python3 -m pip install -q --disable-pip-version-check numpy matplotlib
fi

step "building Fissile (cargo build --release; the first build compiles RocksDB, ~15 min on 2 cores)"
(cd "$FISSILE_ROOT" && cargo build --release --locked --workspace --bins)

step "guest kernel (Debian linux-source-6.12 + kernel/microvm.config; ~7-18 min cold, cached)"
FISSILE_GUEST_KERNEL=$("$FISSILE_ROOT/kernel/build.sh")
export FISSILE_GUEST_KERNEL

step "guest image (template python-datasci: debootstrap + wheels; ~10 min cold, cached)"
FISSILE_GUEST_ROOTFS=$("$CARGO_TARGET_DIR/release/fissile-rootfs" build --template python-datasci \
  --agent "$CARGO_TARGET_DIR/release/fissile-agent")
export FISSILE_GUEST_ROOTFS
export FISSILE_BIN_DIR=$CARGO_TARGET_DIR/release
