//! Seccomp filters per thread class (Firecracker's model): every thread of `fissile-vmm`
//! installs the filter of its class before it handles anything a guest controls, and the main
//! thread installs its own once the VM runs. The filters are data (`seccomp/x86_64.json`,
//! seccompiler's format), compiled to BPF at build time (`build.rs`).
//!
//! A syscall outside a thread's list raises SIGSYS (`Mode::Trap`, the default); the handler,
//! installed before any filter, writes which thread made which syscall to stderr and exits the
//! process with [`EXIT_BAD_SYSCALL`] at once: the VM stops with a reason in its log instead of
//! a silent kill. `rt_sigaction` is in no list, so a compromised thread cannot replace the
//! handler. Every thread first installs `no_clone3` (clone3 fails with ENOSYS, so glibc
//! creates threads with `clone`, whose flags the class filters restrict to threads).
//!
//! Only the `fissile-vmm` binary turns filters on ([`init`]); the library's threads call
//! [`enter`], which does nothing in a process that did not (tests, embedders with their own
//! policy). This module holds the crate's seccomp `unsafe`: the SIGSYS handler.

use std::cell::Cell;
use std::sync::OnceLock;

use fissile_proto::seccomp::Filter;
use seccompiler::BpfProgram;

mod generated {
    use super::Filter;
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// Exit status of a VMM that made a syscall its filters do not allow (or could not install
/// them).
pub const EXIT_BAD_SYSCALL: i32 = 5;

/// What a syscall outside a thread's list does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// SIGSYS: the VMM logs the syscall and exits with [`EXIT_BAD_SYSCALL`].
    Trap,
    /// The kernel logs it (audit, `type=1326`) and lets it run: for finding what a new code
    /// path needs, never for production.
    Log,
    /// No filters.
    Off,
}

/// The thread classes, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ThreadClass {
    /// The main thread once the VM runs.
    Main,
    /// A vCPU thread (KVM_RUN and the device emulation its exits reach).
    Vcpu,
    /// The lifecycle actor (snapshot, fork, merge, rollback, persist).
    Vmm,
    /// The control socket's accept loop and client threads.
    Api,
    /// The vsock muxer's event loop.
    Vsock,
    /// The virtio-net device's receive loop.
    Net,
    /// A snapshotd fault session's watchdog.
    Watchdog,
}

impl ThreadClass {
    /// The filter's name in `seccomp/x86_64.json`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Main => "main",
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::Vmm => "vmm",
            ThreadClass::Api => "api",
            ThreadClass::Vsock => "vsock",
            ThreadClass::Net => "net",
            ThreadClass::Watchdog => "watchdog",
        }
    }
}

/// Why the filters could not be turned on.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: init called twice")]
    AlreadyInitialized,
    #[error("seccomp: installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("seccomp: no compiled filter named {0:?} (build.rs and seccomp/x86_64.json disagree)")]
    Missing(&'static str),
    #[error("seccomp: installing the {class} filter: {source}")]
    Install {
        class: &'static str,
        source: seccompiler::Error,
    },
}

static MODE: OnceLock<Mode> = OnceLock::new();

thread_local! {
    /// The class this thread entered, for the SIGSYS report (a const initializer: no lazy
    /// init or destructor, so the handler may read it).
    static CLASS: Cell<Option<ThreadClass>> = const { Cell::new(None) };
}

/// Turns filters on for this process (once, before any thread starts): in `Trap` mode
/// installs the SIGSYS handler. With filters on, malloc keeps one arena: glibc reads
/// `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread arena's heap, on
/// whichever thread frees, and no filter but the actor's allows `openat` (a lab run of every
/// suite in log mode caught a control client's thread doing it).
pub fn init(mode: Mode) -> Result<(), SeccompError> {
    if mode == Mode::Trap {
        install_sigsys_handler().map_err(SeccompError::Handler)?;
    }
    if mode != Mode::Off {
        // SAFETY: mallopt only sets a malloc parameter; called before any other thread
        // exists (fissile-vmm's main calls init first).
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
    MODE.set(mode).map_err(|_| SeccompError::AlreadyInitialized)
}

/// The mode [`init`] set, if any.
pub fn mode() -> Option<Mode> {
    MODE.get().copied()
}

/// Installs `class`'s filter on the calling thread, if [`init`] turned filters on. A thread
/// that cannot be filtered must not go on: the VMM reports why and exits with
/// [`EXIT_BAD_SYSCALL`].
pub fn enter(class: ThreadClass) {
    if let Err(e) = try_enter(class) {
        eprintln!("fissile-vmm: {e}; stopping");
        std::process::exit(EXIT_BAD_SYSCALL);
    }
}

/// [`enter`], with the error returned.
pub fn try_enter(class: ThreadClass) -> Result<(), SeccompError> {
    let filters = match MODE.get() {
        None | Some(Mode::Off) => return Ok(()),
        Some(Mode::Trap) => generated::ENFORCE,
        Some(Mode::Log) => generated::LOG,
    };
    CLASS.with(|c| c.set(Some(class)));
    for name in ["no_clone3", class.name()] {
        let program = program(filters, name)?;
        seccompiler::apply_filter(&program).map_err(|source| SeccompError::Install {
            class: class.name(),
            source,
        })?;
    }
    Ok(())
}

fn program(filters: &[Filter], name: &'static str) -> Result<BpfProgram, SeccompError> {
    fissile_proto::seccomp::program(filters, name).ok_or(SeccompError::Missing(name))
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) that we then fill.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialized and names a handler with the SA_SIGINFO signature that
    // only calls async-signal-safe functions (write, _exit); the old action is not wanted.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Offset of `si_syscall` in x86_64's `siginfo_t` for SIGSYS: signo, errno, code and padding
/// (16 bytes), then `_call_addr` (8), then `_syscall` (int).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler, and for SIGSYS
    // (SYS_SECCOMP) `_syscall` is an int at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let class = CLASS
        .with(|c| c.get())
        .map_or("unfiltered", ThreadClass::name);
    let mut buf = [0u8; 160];
    let mut len = 0;
    for part in ["fissile-vmm: seccomp: the ", class, " thread made syscall "] {
        len += copy(&mut buf[len..], part.as_bytes());
    }
    len += format_int(&mut buf[len..], nr);
    len += copy(
        &mut buf[len..],
        b", which its filter does not allow (seccomp/x86_64.json); stopping the VM\n",
    );
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is initialized.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}

fn copy(dst: &mut [u8], src: &[u8]) -> usize {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
    n
}

fn format_int(dst: &mut [u8], v: i32) -> usize {
    let mut digits = [0u8; 11];
    let mut n = 0;
    let mut x = v.unsigned_abs();
    loop {
        digits[n] = b'0' + (x % 10) as u8;
        n += 1;
        x /= 10;
        if x == 0 {
            break;
        }
    }
    if v < 0 {
        digits[n] = b'-';
        n += 1;
    }
    digits[..n].reverse();
    copy(dst, &digits[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_and_no_clone3_were_compiled_in_both_modes() {
        for filters in [generated::ENFORCE, generated::LOG] {
            for class in [
                ThreadClass::Main,
                ThreadClass::Vcpu,
                ThreadClass::Vmm,
                ThreadClass::Api,
                ThreadClass::Vsock,
                ThreadClass::Net,
                ThreadClass::Watchdog,
            ] {
                assert!(!program(filters, class.name()).unwrap().is_empty());
            }
            assert!(!program(filters, "no_clone3").unwrap().is_empty());
        }
    }

    #[test]
    fn numbers_format_like_display() {
        for v in [0, 7, 59, 435, -1, i32::MAX, i32::MIN] {
            let mut buf = [0u8; 16];
            let n = format_int(&mut buf, v);
            assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), v.to_string());
        }
    }
}
