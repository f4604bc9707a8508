//! Thin safe wrappers over the libc calls the agent needs. Every `unsafe` block of the
//! agent lives in this module.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// How a child process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildExit {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in string"))
}

/// Whether the stream socket `fd` is open with nothing to read: a non-blocking `MSG_PEEK`
/// finds no data (`EAGAIN`). False at end of stream, with data pending, or on an error.
pub(crate) fn socket_idle(fd: RawFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv(2) writes at most one byte into `b`, which lives across the call; a bad
    // `fd` is an error (EBADF), not undefined behaviour.
    let r = unsafe {
        libc::recv(
            fd,
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
}

/// Whether the peer of stream socket `fd` has closed its end (hang-up, read side shut, or
/// an error on the socket), without waiting. Data the peer sent before does not count.
pub(crate) fn peer_closed(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call; timeout 0.
    let r = unsafe { libc::poll(&raw mut pfd, 1, 0) };
    r > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Sends `sig` to process `pid` (or to the process group `-pid` when `pid` is negative).
pub(crate) fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// Sends `sig` to the main thread of process `pid` (tgkill(2) with the process's own id as
/// the thread): a signal sent to the process may go to another of its threads (the kernel
/// picks one that does not block it, not always the main one), and CPython runs its signal
/// handlers only in the main thread, which a signal taken by another thread does not wake
/// from a blocking call (a `time.sleep(600)` in a cell would sleep on through an interrupt).
pub(crate) fn signal_main_thread(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: tgkill(2) takes three integers and has no memory-safety preconditions.
    let ret = unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, sig) };
    check(i32::try_from(ret).unwrap_or(-1)).map(|_| ())
}

/// Blocks until any child ends and reaps it.
pub(crate) fn wait_any() -> io::Result<(i32, ChildExit)> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid, writable c_int for the duration of the call.
    let pid = check(unsafe { libc::waitpid(-1, &mut status, 0) })?;
    let exit = if libc::WIFSIGNALED(status) {
        ChildExit::Signaled(libc::WTERMSIG(status))
    } else {
        ChildExit::Exited(libc::WEXITSTATUS(status))
    };
    Ok((pid, exit))
}

/// A pipe: `(read end, write end)`, both close-on-exec.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two c_ints that pipe2 fills in.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Duplicates `fd` to a new close-on-exec descriptor numbered at least `min`.
pub(crate) fn dup_above(fd: &OwnedFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd has no memory-safety preconditions.
    let new = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: fcntl returned a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// In a freshly forked child: makes `src` available as `dst` without close-on-exec, for
/// each `(src, dst)` pair. Every `src` must be above every `dst` (see [`dup_above`]).
///
/// Only async-signal-safe calls (dup2) are made, so this may run in a `pre_exec` hook.
pub(crate) fn map_fds_in_child(pairs: &[(RawFd, RawFd)]) -> io::Result<()> {
    for &(src, dst) in pairs {
        // SAFETY: dup2 on descriptors has no memory-safety preconditions; it is
        // async-signal-safe.
        check(unsafe { libc::dup2(src, dst) })?;
    }
    Ok(())
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is `procs` (writing "0"
/// names the writer).
///
/// Only async-signal-safe calls (open, write, close), so this may run in a `pre_exec` hook.
pub(crate) fn join_cgroup_in_child(procs: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: `procs` is a valid NUL-terminated path; the fd is closed below.
    let fd = check(unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    // SAFETY: writes one byte of a static buffer to the fd opened above.
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    let err = io::Error::last_os_error();
    // SAFETY: closes the fd opened above, once.
    unsafe { libc::close(fd) };
    if n != 1 {
        return Err(err);
    }
    Ok(())
}

/// Waits until one of `fds` is readable or hung up, or `timeout` passes (`None`: forever).
/// Returns one flag per fd.
pub(crate) fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        None => -1,
        Some(t) => i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX),
    };
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// Sets SO_SNDTIMEO on a socket, so a client that stops reading cannot block the agent.
pub(crate) fn set_send_timeout(fd: RawFd, timeout: Duration) -> io::Result<()> {
    set_timeout_opt(fd, libc::SO_SNDTIMEO, timeout)
}

/// Sets SO_RCVTIMEO on a socket (also bounds `accept` on a listener).
pub(crate) fn set_recv_timeout(fd: RawFd, timeout: Duration) -> io::Result<()> {
    set_timeout_opt(fd, libc::SO_RCVTIMEO, timeout)
}

fn set_timeout_opt(fd: RawFd, opt: libc::c_int, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `tv` is a valid timeval and its exact size is passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// A listening AF_VSOCK stream socket bound to `port` on any CID.
pub(crate) fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a fresh descriptor that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm and its exact size is passed.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) on an open socket has no memory-safety preconditions.
    check(unsafe { libc::listen(fd.as_raw_fd(), 128) })?;
    Ok(fd)
}

/// An AF_VSOCK stream socket connected to `cid`:`port` (a host talking to a guest through
/// vhost-vsock, e.g. under QEMU).
pub(crate) fn vsock_connect(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a fresh descriptor that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = cid;
    loop {
        // SAFETY: `addr` is a valid sockaddr_vm and its exact size is passed.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(fd);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Accepts one connection on a listening socket (close-on-exec).
pub(crate) fn accept(listener: &OwnedFd) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: null address pointers are allowed by accept4(2).
        let r = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if r >= 0 {
            // SAFETY: accept4 returned a fresh descriptor that nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(r) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// mount(2).
pub(crate) fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (source, target, fstype) = (cstr(source)?, cstr(target)?, cstr(fstype)?);
    let data = data.map(cstr).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: all pointers are valid NUL-terminated strings (or null for data) that outlive
    // the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    })
    .map(|_| ())
}

/// pivot_root(".", ".") in the current directory, then lazily detaches the old root, which
/// is stacked on top. The caller must have chdir'ed into the new root mount.
pub(crate) fn pivot_root_here() -> io::Result<()> {
    let dot = cstr(".")?;
    // SAFETY: both arguments are valid NUL-terminated strings.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dot` is a valid NUL-terminated string.
    check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }).map(|_| ())
}

/// sethostname(2).
pub(crate) fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}

/// The host name (lossy).
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which gethostname NUL-terminates.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// An AF_INET datagram socket for interface ioctls.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a fresh descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming interface `name`, the rest zero.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// A `sockaddr_in` for `addr` (port 0) as the generic `sockaddr` ioctls take.
fn sockaddr(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain old data; the kernel reads the
    // address back as sockaddr_in because of its family.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives interface `name` the IPv4 address `addr` with netmask `mask`.
pub(crate) fn set_ipv4(
    name: &str,
    addr: std::net::Ipv4Addr,
    mask: std::net::Ipv4Addr,
) -> io::Result<()> {
    let fd = inet_socket()?;
    for (request, value) in [(libc::SIOCSIFADDR, addr), (libc::SIOCSIFNETMASK, mask)] {
        let mut req = ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr(value);
        // SAFETY: `req` is a valid ifreq holding an AF_INET address; the kernel reads it.
        check(unsafe { libc::ioctl(fd.as_raw_fd(), request, &req as *const libc::ifreq) })?;
    }
    Ok(())
}

/// Adds the default route via `gateway` (SIOCADDRT). An existing one is left as it is.
pub(crate) fn add_default_route(gateway: std::net::Ipv4Addr) -> io::Result<()> {
    let fd = inet_socket()?;
    // SAFETY: rtentry is plain old data; all-zero is a valid value (no device name pointer).
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr(std::net::Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: `rt` is a valid rtentry with AF_INET addresses and a null device name.
    match check(unsafe {
        libc::ioctl(fd.as_raw_fd(), libc::SIOCADDRT, &rt as *const libc::rtentry)
    }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Sets IFF_UP on network interface `name` (e.g. "lo").
pub(crate) fn interface_up(name: &str) -> io::Result<()> {
    let fd = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: `req` is a valid ifreq the kernel reads and fills in.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            &mut req as *mut libc::ifreq,
        )
    })?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: `req` is a valid ifreq the kernel reads.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            &req as *const libc::ifreq,
        )
    })
    .map(|_| ())
}

/// Adds `entropy` to the kernel pool, credited, then forces a CRNG reseed
/// (RNDADDENTROPY + RNDRESEEDCRNG on /dev/urandom). Needs CAP_SYS_ADMIN.
pub(crate) fn add_entropy_and_reseed(entropy: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    let entropy = &entropy[..entropy.len().min(4096)];
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<i32> = vec![0; 2 + entropy.len().div_ceil(4)];
    info[0] = i32::try_from(entropy.len() * 8).unwrap_or(i32::MAX);
    info[1] = i32::try_from(entropy.len()).unwrap_or(i32::MAX);
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = i32::from_ne_bytes(word);
    }
    // SAFETY: `info` is a rand_pool_info header followed by buf_size bytes of buffer.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) }).map(|_| ())
}

/// Sets CLOCK_REALTIME.
pub(crate) fn set_wall_clock(ns_since_epoch: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns_since_epoch / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns_since_epoch % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(|_| ())
}

/// sync(2), then reboot(RB_AUTOBOOT): the VMM treats the reset as poweroff. Returns only on
/// failure.
pub(crate) fn sync_and_reboot() -> io::Error {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) has no memory-safety preconditions.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// This process's id.
pub(crate) fn getpid() -> i32 {
    // SAFETY: getpid(2) cannot fail.
    unsafe { libc::getpid() }
}

/// Sets process-wide environment variables. Must run before any other thread starts.
pub(crate) fn set_env_before_threads(vars: &[(&str, &str)]) {
    for (k, v) in vars {
        // SAFETY: called from main before any thread is spawned, so no other thread can be
        // reading the environment concurrently.
        unsafe { std::env::set_var(k, v) };
    }
}
