#!/usr/bin/env bash
# Shared set-up for scripts/demo, scripts/test and scripts/bench: installs what Fissile needs
# on a Debian 12 host, builds our binaries, the guest kernel and the guest image, and a
# Python venv for host-side tests. Everything expensive is cached under $FISSILE_CACHE
# (default /var/cache/fissile), keyed by content hash, so a second run is quick.
#
# Those scripts source it (they run with `set -euo pipefail`). To get the environment into
# your own shell instead, run it: `eval "$(scripts/setup.sh --print-env)"` builds what is
# missing and prints the exports (FISSILE_GUEST_KERNEL, FISSILE_GUEST_ROOTFS, ...); it does
# not change your shell's options.

fissile_setup() {
  FISSILE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  export FISSILE_CACHE=${FISSILE_CACHE:-/var/cache/fissile}
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$FISSILE_CACHE/target}
  SUDO=
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  if [ ! -w "$(dirname "$FISSILE_CACHE")" ] && [ ! -d "$FISSILE_CACHE" ]; then
    step "creating $FISSILE_CACHE (owned by $(id -un))"
    $SUDO install -d -o "$(id -u)" -g "$(id -g)" "$FISSILE_CACHE"
  fi
  mkdir -p "$FISSILE_CACHE"

  local apt_packages=(
    # the lab: QEMU with TCG, Debian's kernel (kvm_amd module), busybox for its initramfs
    qemu-system-x86 linux-image-amd64 busybox-static cpio e2fsprogs
    # the guest kernel build
    linux-source-6.12 bc bison flex libelf-dev libssl-dev xz-utils make gcc
    # the guest image build
    debootstrap
    # RocksDB (snapshotd) needs clang/libclang for bindgen
    clang libclang-dev
    # a venv for the host-side Python (agent tests, the SDK's tests)
    python3 python3-venv
    # a routed sandbox's NAT and egress rules (fissile-sandbox runs nft in its namespace)
    nftables
  )
  local missing=() p
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    step "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi

  # Rust: the workspace needs stable >= 1.95 (edition 2024); Debian's rustc is far older.
  if ! command -v cargo >/dev/null 2>&1; then
    echo "Fissile needs a Rust toolchain (stable >= 1.95): install it with rustup" \
      "(https://rustup.rs), then run this again." >&2
    return 1
  fi
  local rustc_minor
  rustc_minor=$(rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')
  if [ "${rustc_minor:-0}" -lt 95 ]; then
    echo "Fissile needs Rust >= 1.95, found $(rustc --version): run \`rustup update stable\`." >&2
    return 1
  fi

  # Host-side Python in a venv under the cache (a stock Debian Python refuses `pip install`
  # into the system, PEP 668), keyed by the requirements' content.
  local req="$FISSILE_ROOT/scripts/requirements-dev.txt" key
  key=$( (cat "$req"; python3 --version) | sha256sum | cut -c1-16)
  export FISSILE_VENV=$FISSILE_CACHE/venv-$key
  if [ ! -x "$FISSILE_VENV/bin/python" ] || [ ! -f "$FISSILE_VENV/.complete" ]; then
    step "Python venv for host-side tests ($FISSILE_VENV)"
    rm -rf "$FISSILE_VENV"
    python3 -m venv "$FISSILE_VENV"
    "$FISSILE_VENV/bin/pip" install -q --disable-pip-version-check -r "$req"
    touch "$FISSILE_VENV/.complete"
  fi
  # The agent's host-mode tests run the REPL driver on this interpreter.
  export FISSILE_PYTHON=$FISSILE_VENV/bin/python

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
}

step() { printf '\n==> [%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# Starts fissiled with `fissile-lab serve` (in the lab on a KVM-PVM host) on a free loopback
# port for tenant $1 (the rest: fissiled flags), waits (bounded) for it and exports
# FISSILE_API_URL and FISSILE_API_KEY. `lab_daemon_stop` stops it (call it from an EXIT trap).
lab_daemon_start() {
  local tenant=$1 port extra=()
  shift
  (($#)) && extra=(-- "$@")
  port=$("$FISSILE_PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  lab_daemon_log=$(mktemp)
  step "starting fissiled on 127.0.0.1:$port (fissile-lab serve; in the lab on a KVM-PVM host)"
  "$CARGO_TARGET_DIR/release/fissile-lab" serve --port "$port" --tenant "$tenant" --timeout 3600 \
    ${FISSILE_LAB_ADMIN_KEY:+--admin} \
    "${extra[@]}" >"$lab_daemon_log" &
  lab_daemon_pid=$!
  for _ in $(seq 1 1200); do
    grep -q '^READY ' "$lab_daemon_log" && break
    kill -0 "$lab_daemon_pid" 2>/dev/null || { cat "$lab_daemon_log"; echo "fissiled did not start" >&2; return 1; }
    sleep 1
  done
  grep -q '^READY ' "$lab_daemon_log" || { cat "$lab_daemon_log"; echo "fissiled not ready after 20 min" >&2; return 1; }
  FISSILE_API_URL=$(sed -n 's/^FISSILE_API_URL=//p' "$lab_daemon_log")
  FISSILE_API_KEY=$(sed -n 's/^FISSILE_API_KEY=//p' "$lab_daemon_log")
  export FISSILE_API_URL FISSILE_API_KEY
}

lab_daemon_stop() {
  if [[ -n "${lab_daemon_pid:-}" ]]; then
    kill "$lab_daemon_pid" 2>/dev/null || true
    wait "$lab_daemon_pid" 2>/dev/null || true
  fi
  lab_daemon_pid=
  rm -f "${lab_daemon_log:-}"
}

# True when the daemon lab_daemon_start started has ended because its lab froze
# (`fissile-lab` exit status 75: QEMU's TCG with nested SVM now and then stops running the
# lab's timers). Not a verdict on what ran against it: callers run that again, once, in a
# fresh lab. Waits up to 5 s for the process to end (it ends as soon as it calls the lab
# frozen, and that is what cuts its clients off).
lab_daemon_froze() {
  local status
  [[ -n "${lab_daemon_pid:-}" ]] || return 1
  for _ in $(seq 1 10); do
    kill -0 "$lab_daemon_pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -0 "$lab_daemon_pid" 2>/dev/null && return 1
  status=0
  wait "$lab_daemon_pid" || status=$?
  lab_daemon_pid=
  [[ $status -eq 75 ]]
}

# Waits (up to 30 min) for the python-datasci template's ready snapshot of the daemon
# lab_daemon_start started, so what follows measures warm creates.
lab_daemon_wait_ready() {
  step "waiting for the python-datasci template's ready snapshot (made once per daemon: a boot, then numpy, pandas and matplotlib imported; every sandbox after it starts warm)"
  "$FISSILE_PYTHON" - <<'PY'
import os, sys, time
import httpx
url, key = os.environ["FISSILE_API_URL"], os.environ["FISSILE_API_KEY"]
deadline = time.monotonic() + 1800
while True:
    r = httpx.get(f"{url}/v1/templates", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    r.raise_for_status()
    snap = r.json()[0]["ready"][0]["snapshot"] or {}
    if snap.get("status") == "ready":
        print(f"ready (made in {snap['build_ms'] / 1000:.1f} s)")
        break
    if snap.get("status") == "failed":
        print(f"the ready snapshot failed ({snap.get('message')}); sandboxes will boot", file=sys.stderr)
        break
    if time.monotonic() > deadline:
        print("the ready snapshot is not ready after 30 min; sandboxes will boot", file=sys.stderr)
        break
    time.sleep(1)
PY
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  # Run, not sourced.
  set -euo pipefail
  if [[ "${1:-}" != "--print-env" ]]; then
    echo "usage: eval \"\$(scripts/setup.sh --print-env)\"   (scripts/demo, test and bench source it)" >&2
    exit 2
  fi
  fissile_setup >&2
  for v in FISSILE_CACHE CARGO_TARGET_DIR FISSILE_BIN_DIR FISSILE_GUEST_KERNEL \
    FISSILE_GUEST_ROOTFS FISSILE_VENV FISSILE_PYTHON; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
else
  fissile_setup
fi
