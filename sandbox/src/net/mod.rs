//! The host end of a guest's network link.
//!
//! * [`NetNs`]: a network namespace of its own for each VMM (a sandbox, each of its fork
//!   children), holding loopback and the guest's gateway tap. Every namespace has the same
//!   layout (`fissile_proto::net`: addresses, MACs, tap name), so a restored or forked guest
//!   needs no reconfiguration, and the VMM process runs inside it, so neither the VMM nor the
//!   guest can reach the host's addresses, its loopback (fissiled, snapshotd) or another
//!   sandbox. The namespace goes when its last user does (the VMM, or this handle): nothing
//!   is left behind to clean up.
//! * [`create_gateway_tap`]: the tap alone, in the calling thread's namespace.
//!
//! A tap is made with the plain interface ioctls (TUNSETIFF, TUNSETPERSIST, SIOCSIFHWADDR,
//! SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFFLAGS). Needs CAP_NET_ADMIN (and CAP_SYS_ADMIN for
//! namespaces).

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use fissile_proto::net::{GATEWAY_ADDR, TAP_MAC, TAP_NAME, netmask};

pub mod egress;
pub mod nft_counters;
pub mod pool;
pub mod sniff;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Setting up or removing a tap failed; names the step.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not a valid interface name.
    #[error("tap name {0:?} is not a valid interface name (1-15 bytes, no NUL or '/')")]
    Name(String),
    /// An ioctl or the tun device failed.
    #[error("tap {name}: {step}")]
    Io {
        /// The tap.
        name: String,
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains(['\0', '/']) {
        return Err(TapError::Name(name.to_string()));
    }
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
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

fn check(rc: libc::c_int, name: &str, step: &'static str) -> Result<(), TapError> {
    if rc < 0 {
        return Err(TapError::Io {
            name: name.to_string(),
            step,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn open_tun(name: &str) -> Result<File, TapError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|source| TapError::Io {
            name: name.to_string(),
            step: "opening /dev/net/tun",
            source,
        })
}

/// Attaches `tun` to tap `name` (creating it when missing) and sets or clears its
/// persistence.
fn attach(tun: &File, name: &str, persist: bool) -> Result<(), TapError> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
    // SAFETY: `tun` is an open /dev/net/tun descriptor; TUNSETIFF reads and writes the
    // `ifreq` it is given, which lives for the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut libc::ifreq) };
    check(rc, name, "TUNSETIFF")?;
    // SAFETY: TUNSETPERSIST takes its argument by value; no memory is passed.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, libc::c_ulong::from(persist)) };
    check(rc, name, "TUNSETPERSIST")
}

/// Creates the persistent tap `name` in this thread's network namespace as the guest's
/// gateway: MAC [`TAP_MAC`], address [`GATEWAY_ADDR`] on the guest's /30, up. An existing
/// tap of that name is reused and reconfigured.
pub fn create_gateway_tap(name: &str) -> Result<(), TapError> {
    let tun = open_tun(name)?;
    attach(&tun, name, true)?;
    drop(tun);
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, name, "socket for interface ioctls")?;
    // SAFETY: socket returned a fresh descriptor that nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |request: libc::c_ulong, req: &libc::ifreq, step| {
        // SAFETY: `req` is a valid ifreq for `request`; the kernel only reads it.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *const libc::ifreq) };
        check(rc, name, step)
    };
    let mut req = ifreq(name)?;
    let mut hw = libc::sockaddr {
        sa_family: libc::ARPHRD_ETHER,
        sa_data: [0; 14],
    };
    for (dst, &src) in hw.sa_data.iter_mut().zip(TAP_MAC.iter()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = hw;
    set(libc::SIOCSIFHWADDR, &req, "setting its MAC")?;
    req.ifr_ifru.ifru_addr = sockaddr(GATEWAY_ADDR);
    set(libc::SIOCSIFADDR, &req, "setting its address")?;
    req.ifr_ifru.ifru_netmask = sockaddr(netmask());
    set(libc::SIOCSIFNETMASK, &req, "setting its netmask")?;
    req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    set(libc::SIOCSIFFLAGS, &req, "bringing it up")
}

/// Sets IFF_UP on `name` in this thread's namespace.
fn link_up(name: &str) -> Result<(), TapError> {
    // SAFETY: socket(2) has no memory-safety preconditions.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd, name, "socket for interface ioctls")?;
    // SAFETY: socket returned a fresh descriptor that nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(name)?;
    // SAFETY: `req` is a valid ifreq; SIOCGIFFLAGS fills its flags.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            &mut req as *mut libc::ifreq,
        )
    };
    check(rc, name, "reading its flags")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: `req` is a valid ifreq; the kernel only reads it.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            &req as *const libc::ifreq,
        )
    };
    check(rc, name, "bringing it up")
}

/// Creating or entering a network namespace failed; names the step.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    /// A thread to do the work in could not be started or died.
    #[error("network namespace: worker thread: {0}")]
    Thread(String),
    /// unshare(CLONE_NEWNET), opening the namespace or setns failed.
    #[error("network namespace: {step}")]
    Ns {
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Setting up an interface inside it failed.
    #[error("network namespace: setting up its interfaces")]
    Link(#[source] TapError),
}

/// A network namespace of one VMM, with loopback up and the gateway tap [`TAP_NAME`] (see the
/// module docs). Held by a descriptor: it exists while this handle or a process in it does.
#[derive(Debug)]
pub struct NetNs {
    ns: File,
    /// Its way out, when it has one ([`NetNs::create_routed`]).
    uplink: Option<egress::Uplink>,
}

impl NetNs {
    /// A fresh namespace with its interfaces set up.
    pub fn create() -> Result<NetNs, NetNsError> {
        let ns = on_thread(|| {
            // SAFETY: unshare has no memory-safety preconditions; CLONE_NEWNET moves only this
            // thread (network namespaces are per task), which ends after this closure.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(NetNsError::Ns {
                    step: "unshare(CLONE_NEWNET)",
                    source: io::Error::last_os_error(),
                });
            }
            link_up("lo").map_err(NetNsError::Link)?;
            create_gateway_tap(TAP_NAME).map_err(NetNsError::Link)?;
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/proc/thread-self/ns/net")
                .map_err(|source| NetNsError::Ns {
                    step: "opening /proc/thread-self/ns/net",
                    source,
                })
        })??;
        Ok(NetNs { ns, uplink: None })
    }

    /// A fresh namespace with its interfaces set up and a way out to the host network under
    /// `policy` (see [`egress`]).
    /// Taken from the namespace pool ([`pool`]) when it has one ready with `limits`.
    pub fn create_routed(
        policy: &egress::EgressPolicy,
        limits: egress::NetLimits,
    ) -> Result<NetNs, egress::EgressError> {
        match pool::take(policy, limits) {
            Some(pooled) => pooled,
            None => NetNs::create_fresh(policy, limits),
        }
    }

    /// [`NetNs::create_routed`], never from the pool.
    pub fn create_fresh(
        policy: &egress::EgressPolicy,
        limits: egress::NetLimits,
    ) -> Result<NetNs, egress::EgressError> {
        let mut ns = NetNs::create()?;
        ns.uplink = Some(egress::connect(&ns, policy, limits)?);
        Ok(ns)
    }

    /// Lets processes of group `gid` attach to the namespace's gateway tap without
    /// `CAP_NET_ADMIN` (a jailed VMM: see [`crate::jail`]). The tap is the only one in the
    /// namespace, so the group reaches no other sandbox's.
    pub fn admit_group(&self, gid: u32) -> Result<(), NetNsError> {
        self.run(|| {
            let tun = open_tun(TAP_NAME)?;
            attach(&tun, TAP_NAME, true)?;
            // SAFETY: TUNSETGROUP takes the gid by value; no memory is passed.
            let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETGROUP, libc::c_ulong::from(gid)) };
            check(rc, TAP_NAME, "TUNSETGROUP")
        })?
        .map_err(NetNsError::Link)
    }

    /// Gives this namespace its way out under `policy` and `limits` if it has none yet, else
    /// replaces its policy (the limits it got first stay).
    pub fn route(
        &mut self,
        policy: &egress::EgressPolicy,
        limits: egress::NetLimits,
    ) -> Result<(), egress::EgressError> {
        match &self.uplink {
            Some(_) => self.set_policy(policy),
            None => {
                self.uplink = Some(egress::connect(self, policy, limits)?);
                Ok(())
            }
        }
    }

    /// Its uplink, when it has one.
    pub fn uplink(&self) -> Option<&egress::Uplink> {
        self.uplink.as_ref()
    }

    /// Replaces its egress policy (next connections follow it; open ones keep going).
    pub fn set_policy(&self, policy: &egress::EgressPolicy) -> Result<(), egress::EgressError> {
        egress::set_policy(self, policy)
    }

    /// New connections its policy rejected so far.
    pub fn blocked_connections(&self) -> Result<u64, egress::EgressError> {
        Ok(self.counters()?.blocked_connections)
    }

    /// What its rules counted so far (an isolated namespace, with no rules: zeroes).
    pub fn counters(&self) -> Result<egress::EgressCounters, egress::EgressError> {
        egress::counters(self)
    }

    /// The namespace process `pid` runs in (an adopted VMM's).
    pub fn of_process(pid: u32) -> Result<NetNs, NetNsError> {
        let ns = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/proc/{pid}/ns/net"))
            .map_err(|source| NetNsError::Ns {
                step: "opening the process's namespace",
                source,
            })?;
        Ok(NetNs { ns, uplink: None })
    }

    /// A second handle on the same namespace (without its uplink: dropping it removes
    /// nothing), for a service that outlives a borrow of this one.
    pub fn try_clone(&self) -> io::Result<NetNs> {
        Ok(NetNs {
            ns: self.ns.try_clone()?,
            uplink: None,
        })
    }

    /// A TCP socket of this namespace (close-on-exec, non-blocking, not connected): a
    /// connection made from it leaves by the namespace's routes and NAT, from the sandbox's
    /// own address.
    pub fn tcp_socket(&self) -> io::Result<std::net::TcpStream> {
        let fd = self
            .run(|| {
                // SAFETY: socket(2) has no memory-safety preconditions; the result is checked.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_INET,
                        libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                        0,
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .map_err(io::Error::other)??;
        Ok(std::net::TcpStream::from(fd))
    }

    /// The namespace descriptor (for setns, or a netlink request moving a link here).
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.ns.as_raw_fd()
    }

    /// Runs `f` on a thread inside this namespace (sockets it creates belong to it: a test's
    /// server on the gateway address, for instance).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetNsError> {
        let fd = self.ns.as_raw_fd();
        on_thread(move || {
            // SAFETY: `fd` is this handle's open namespace descriptor (it outlives the scoped
            // thread); setns moves only this thread, which ends after `f`.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(NetNsError::Ns {
                    step: "setns into the sandbox's namespace",
                    source: io::Error::last_os_error(),
                });
            }
            Ok(f())
        })?
    }

    /// Makes `cmd` start inside this namespace (setns between fork and exec). The handle
    /// must outlive the spawn.
    pub fn enter_on_spawn(&self, cmd: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let fd = self.ns.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
        // which is async-signal-safe, on a descriptor the child inherited (the handle is
        // alive while the parent spawns).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// Where connection `stream` was going before a `redirect` rule of its namespace sent it to
/// this socket (conntrack's `SO_ORIGINAL_DST`).
pub fn original_destination(
    stream: std::os::fd::BorrowedFd<'_>,
) -> io::Result<std::net::SocketAddrV4> {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `addr` and `len` are valid for writes and `len` holds the size of `addr`, so
    // the kernel writes at most that many bytes; the fd is borrowed for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(std::net::SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// Runs `f` on a scoped thread of its own (namespace changes stay on that thread).
pub(crate) fn on_thread<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, NetNsError> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("fissile-netns".into())
            .spawn_scoped(s, f)
            .map_err(|e| NetNsError::Thread(e.to_string()))?
            .join()
            .map_err(|_| NetNsError::Thread("it panicked".into()))
    })
}

/// Removes the persistent tap `name` from this thread's network namespace (attaching to a
/// missing one creates a transient tap that goes at once, so that is no error). A VMM still
/// attached keeps it until it exits.
pub fn delete_tap(name: &str) -> Result<(), TapError> {
    let tun = open_tun(name)?;
    attach(&tun, name, false)
}
