//! Attaching to a host tap device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`):
//! every frame is read and written behind a 12-byte `virtio_net_hdr_v1`, the same header the
//! guest's driver uses, so checksum and segmentation offloads pass straight through (the
//! kernel validates what a guest writes in it).
//!
//! The VMM only attaches: the tap is created, addressed and brought up by whoever owns the
//! sandbox's network namespace (the VMM runs inside it). Attaching to a tap that does not
//! exist creates a non-persistent one, which is what the device tests do.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD` (`_IOW('T', 208, unsigned int)`).
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ` (`_IOW('T', 216, int)`).
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// `TUN_F_CSUM`: the reader takes frames with partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`: the reader takes TCP/IPv4 segments up to 64 KiB.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`: the reader takes TCP/IPv6 segments up to 64 KiB.
pub const TUN_F_TSO6: u32 = 0x04;
/// Longest interface name (without its NUL).
pub const MAX_NAME: usize = libc::IFNAMSIZ - 1;

/// `struct ifreq` with the flags member of its union (40 bytes on x86_64).
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or has a NUL or `/`.
    #[error("tap name {0:?} is not a valid interface name (1-15 bytes, no NUL or '/')")]
    Name(String),
    /// `/dev/net/tun` could not be opened.
    #[error("opening /dev/net/tun")]
    Open(#[source] std::io::Error),
    /// `TUNSETIFF` failed (no such tap and no right to create one, or it is busy).
    #[error("attaching to tap {0:?} (TUNSETIFF)")]
    Attach(String, #[source] std::io::Error),
    /// `TUNSETOFFLOAD` failed.
    #[error("setting the offloads of tap {0:?} (TUNSETOFFLOAD)")]
    Offload(String, #[source] std::io::Error),
    /// `TUNSETVNETHDRSZ` failed.
    #[error("setting the header size of tap {0:?} (TUNSETVNETHDRSZ)")]
    HeaderSize(String, #[source] std::io::Error),
}

/// Opens `/dev/net/tun` non-blocking and attaches it to the tap `name`.
pub fn open(name: &str) -> Result<File, TapError> {
    if name.is_empty() || name.len() > MAX_NAME || name.bytes().any(|b| b == 0 || b == b'/') {
        return Err(TapError::Name(name.to_string()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun descriptor; TUNSETIFF reads and writes a
    // `struct ifreq`, and `req` is one (40 bytes, name NUL-terminated) that lives for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReqFlags) };
    if rc < 0 {
        return Err(TapError::Attach(
            name.to_string(),
            std::io::Error::last_os_error(),
        ));
    }
    let size: libc::c_int = super::HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at `size`,
    // alive for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &raw const size) };
    if rc < 0 {
        return Err(TapError::HeaderSize(
            name.to_string(),
            std::io::Error::last_os_error(),
        ));
    }
    // Offloads are the device's, not this descriptor's: a tap another VMM used (QEMU turns
    // TSO and checksum offload on) would hand us what the guest has not agreed to take. None
    // until the guest acks some ([`set_offload`]).
    set_offload(&file, 0).map_err(|e| TapError::Offload(name.to_string(), e))?;
    Ok(file)
}

/// Sets the offloads (`TUN_F_*`) the kernel may use in frames it hands `tap`'s reader.
pub fn set_offload(tap: &File, flags: u32) -> std::io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
    let rc = unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for bad in ["", "a/b", "sixteen-chars-xx", "nul\0"] {
            assert!(matches!(open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
    }
}
