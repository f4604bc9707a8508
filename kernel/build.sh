#!/usr/bin/env bash
# Build the Fissile guest kernel (an uncompressed vmlinux with a PVH entry note) from Debian's
# linux-source-6.12 package plus kernel/microvm.config, and cache it outside the clone.
#
#   kernel/build.sh            build (or reuse) and print the path of the cached vmlinux
#
# Cache key: sha256 of microvm.config + this script + the linux-source package version.
# Cache root: $FISSILE_CACHE (default /var/cache/fissile). A hit costs a hash and a stat.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${FISSILE_CACHE:-/var/cache/fissile}
log() { printf '[kernel %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

need_pkgs=()
dpkg-query -W -f='${Status}' linux-source-6.12 2>/dev/null | grep -q 'ok installed' || need_pkgs+=(linux-source-6.12)
for p in bc bison flex libelf-dev libssl-dev xz-utils gcc make; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  log "installing build dependencies: ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >&2
fi

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.12)
key=$( { cat "$here/microvm.config" "$here/build.sh"; echo "$src_version"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [[ -f "$out/vmlinux" ]]; then
  log "cache hit: $out/vmlinux"
  echo "$out/vmlinux"
  exit 0
fi

log "building linux-source $src_version (key $key); about 7 minutes on 2 cores from cold"
start=$SECONDS
work="$cache/kernel/build-$key"
rm -rf "$work"
mkdir -p "$work"
tar -xJf /usr/src/linux-source-6.12.tar.xz -C "$work" --strip-components=1
cd "$work"
make -s ARCH=x86_64 tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m -O . .config "$here/microvm.config" >/dev/null
make -s ARCH=x86_64 olddefconfig >/dev/null

# merge_config.sh only warns when a symbol cannot be set; fail loudly instead.
missing=0
while IFS= read -r line; do
  if [[ $line =~ ^(CONFIG_[A-Z0-9_]+)=(.*)$ ]]; then
    want="${BASH_REMATCH[1]}=${BASH_REMATCH[2]}"
    grep -qx "$want" .config || { log "config: wanted $want, got: $(grep "^${BASH_REMATCH[1]}=" .config || echo unset)"; missing=1; }
  elif [[ $line =~ ^#\ (CONFIG_[A-Z0-9_]+)\ is\ not\ set$ ]]; then
    if grep -q "^${BASH_REMATCH[1]}=" .config; then
      log "config: wanted ${BASH_REMATCH[1]} off, got $(grep "^${BASH_REMATCH[1]}=" .config)"; missing=1
    fi
  fi
done <"$here/microvm.config"
((missing == 0)) || { log "kernel config verification failed"; exit 1; }

make -s ARCH=x86_64 -j"$(nproc)" vmlinux >&2
grep -q . <(readelf -n vmlinux | grep -i 'Xen.*0x00000012\|PHYS32_ENTRY\|Unknown note type: (0x00000012)') \
  || { log "vmlinux has no PVH entry note"; exit 1; }

mkdir -p "$out"
cp vmlinux "$out/vmlinux.tmp"
cp .config "$out/config"
mv "$out/vmlinux.tmp" "$out/vmlinux"
cd /
rm -rf "$work"
log "built in $((SECONDS - start)) s: $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1))"
echo "$out/vmlinux"
