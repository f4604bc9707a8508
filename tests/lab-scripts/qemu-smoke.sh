# Pipeline smoke test, run inside the lab (busybox sh): boot the guest kernel and image with
# QEMU microvm under nested KVM; the guest imports the data-science stack and prints SMOKE-OK.
# AVX/XSAVE are hidden from the guest: the lab's emulated SVM mishandles XSETBV (see
# ARCHITECTURE.md, "The lab"). QEMU's automatic virtio_mmio.device= parameter would land
# after `--` (as an argument of init), so the device (its last transport) is given by hand.
# The kernel keeps a double-quoted argument whole but knows no escapes, so the guest program
# is written with printf, whose \047 is a single quote.
set -e
PROG="import numpy, pandas, polars, matplotlib\nprint(\047SMOKE-OK\047, numpy.__version__, pandas.__version__, polars.__version__, matplotlib.__version__, flush=True)\nimport ctypes\nctypes.CDLL(None).reboot(0x1234567)\n"
qemu-system-x86_64 -M microvm,acpi=off,auto-kernel-cmdline=off -accel kvm \
  -cpu host,-xsave,-avx,-avx2,-f16c,-fma \
  -m 512M -smp 1 -nodefaults -no-user-config -nographic -no-reboot -L /lab/share/qemu \
  -serial stdio -monitor none \
  -kernel "$FISSILE_GUEST_KERNEL" \
  -append "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=ext4 virtio_mmio.device=512@0xfeb00e00:12 init=/bin/sh -- -c \"mount -t proc p /proc; mount -t tmpfs t /tmp; printf '$PROG' > /tmp/smoke.py; /usr/bin/python3 /tmp/smoke.py\"" \
  -drive id=root,file="$FISSILE_GUEST_ROOTFS",format=raw,if=none,readonly=on \
  -device virtio-blk-device,drive=root
