//! The termination signals of a program that may be the first process of a pid namespace
//! (a jailed VMM or snapshotd): the kernel drops every signal such a process has no handler
//! for, except SIGKILL and SIGSTOP, wherever it comes from. Without a handler, an interrupt
//! or hang-up of the orchestrator's process group (Ctrl-C on `fissile demo`, a closed
//! terminal, an interrupted `cargo test`) would leave the jailed program running.

use std::io;

/// Makes SIGINT, SIGTERM and SIGHUP end the process at once with `_exit(128 + signal)`,
/// what their default action does (the status is the shell's convention for it), whether or
/// not this process is the first of a pid namespace. Call it before threads start and before
/// a seccomp filter forbids `rt_sigaction`.
pub fn exit_on_termination_signals() -> io::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags, SIG_DFL),
        // which we then point at a handler of the one-argument form (no SA_SIGINFO).
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_termination as extern "C" fn(libc::c_int) as usize;
        // SAFETY: sigaction reads `action`, which lives across the call; no old action is
        // asked for.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

extern "C" fn on_termination(signal: libc::c_int) {
    // SAFETY: _exit is async-signal-safe; it ends the process without running anything else.
    unsafe { libc::_exit(128 + signal) }
}
