//! `fissile-lab`: run a command in the lab (or natively when the host KVM is usable).
//!
//! ```text
//! fissile-lab run [--timeout SECS] [--mem MIB] [--quiet] -- fissile-vmm --kernel ...
//! fissile-lab run --script checks.sh
//! fissile-lab serve [--port 8080]     # fissiled in the lab, on the host's 127.0.0.1:8080
//! fissile-lab info
//! ```
//! Inside the command: `$FISSILE_GUEST_KERNEL`, `$FISSILE_GUEST_ROOTFS`, our binaries on
//! `PATH`, scratch space in `/tmp`.
//!
//! Exit status: the command's (fissiled's for `serve`); [`EXIT_LAB_FROZE`] when the lab
//! itself froze (no verdict on the command: scripts run it again in a fresh lab).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fissile_tests::lab::{Lab, LabConfig, LabError, LabOutput, host_kvm_is_pvm, host_kvm_usable};

/// Exit status when the lab froze (`EX_TEMPFAIL`): QEMU's TCG with nested SVM now and then
/// stops running the lab's timers; the same command may well pass in a fresh lab.
const EXIT_LAB_FROZE: i32 = 75;

/// The command's output, or the error; a frozen lab is said on stderr and ends the process
/// with [`EXIT_LAB_FROZE`].
fn unless_frozen(run: Result<LabOutput, LabError>) -> anyhow::Result<LabOutput> {
    match run {
        Err(e @ LabError::Frozen { .. }) => {
            eprintln!("fissile-lab: {e}");
            eprintln!("fissile-lab: the lab froze (exit status {EXIT_LAB_FROZE}: run it again)");
            std::process::exit(EXIT_LAB_FROZE)
        }
        other => Ok(other?),
    }
}

#[derive(Parser)]
#[command(
    about = "Run commands next to a real KVM: in the lab (QEMU TCG + nested SVM) or natively"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command (the words after `--`) or a script file, print its output, exit with its status.
    Run {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Lab memory in MiB.
        #[arg(long, default_value_t = 3072)]
        mem: u32,
        /// Do not echo the lab console; print only the command's output (as it arrives).
        #[arg(long)]
        quiet: bool,
        /// A shell script to run instead of a command.
        #[arg(long, conflicts_with = "command")]
        script: Option<PathBuf>,
        /// Also put this program on the command's PATH (`PATH` or `PATH:NAME`; repeatable).
        #[arg(long = "with", value_name = "PATH[:NAME]")]
        with: Vec<String>,
        /// The command.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run fissiled in the lab (natively where the host KVM boots standard guests) and make
    /// its API reachable on this host's loopback: QEMU user networking with `restrict=on`
    /// (nothing in the lab reaches outside it) and a `hostfwd` bound to 127.0.0.1. Prints
    /// `FISSILE_API_URL=...` and `FISSILE_API_KEY=...` (a key for `--tenant`, made fresh),
    /// then fissiled's `READY` line; runs until stopped (Ctrl-C) or `--timeout`.
    Serve {
        /// Host port (on 127.0.0.1).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Lab memory in MiB.
        #[arg(long, default_value_t = 6144)]
        mem: u32,
        /// Tenant of the printed key.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The printed key is an admin key (it may manage keys: `/v1/keys`).
        #[arg(long)]
        admin: bool,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 86_400)]
        timeout: u64,
        /// More arguments for `fissiled serve` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Say where commands would run and which inputs would be used.
    Info,
}

fn shell_quote(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run {
            timeout,
            mem,
            quiet,
            script,
            with,
            command,
        } => {
            let script = match script {
                Some(p) => {
                    std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?
                }
                None if command.is_empty() => {
                    anyhow::bail!("nothing to run: give `-- COMMAND...` or --script")
                }
                None => shell_quote(&command),
            };
            let mut cfg = LabConfig::from_env()?;
            cfg.mem_mib = mem;
            cfg.verbose = !quiet;
            cfg.stream_output = quiet;
            let lab = Lab::prepare(cfg)?;
            eprintln!(
                "fissile-lab: running {}",
                if lab.is_native() {
                    "natively (host KVM is usable)"
                } else {
                    "in the lab (QEMU TCG + nested kvm_amd)"
                }
            );
            let extra: Vec<(PathBuf, String)> = with
                .iter()
                .map(|w| {
                    let (path, name) = match w.rsplit_once(':') {
                        Some((p, n)) => (PathBuf::from(p), n.to_string()),
                        None => {
                            let p = PathBuf::from(w);
                            let n = p
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default();
                            (p, n)
                        }
                    };
                    (path, name)
                })
                .collect();
            let out = unless_frozen(lab.run_with(&script, &extra, Duration::from_secs(timeout)))?;
            if quiet && lab.is_native() {
                print!("{}", out.output);
            }
            eprintln!(
                "fissile-lab: exit status {} after {:.1} s",
                out.status,
                out.wall.as_secs_f64()
            );
            std::process::exit(out.status);
        }
        Cmd::Serve {
            port,
            mem,
            tenant,
            admin,
            timeout,
            args,
        } => {
            anyhow::ensure!(
                !tenant.is_empty()
                    && tenant
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "a tenant name is [A-Za-z0-9_-]+"
            );
            let mut cfg = LabConfig::from_env()?;
            cfg.mem_mib = mem;
            cfg.verbose = false;
            cfg.stream_output = true;
            let lab_port = 8080;
            cfg.forward = vec![(port, lab_port)];
            let (bin, kernel, rootfs) = (
                cfg.bin_dir.clone(),
                cfg.guest_kernel.clone(),
                cfg.guest_rootfs.clone(),
            );
            let lab = Lab::prepare(cfg)?;
            // In the lab fissiled listens on the lab's NIC, reachable only through the
            // forward from the host's loopback; natively it listens on loopback itself.
            let (listen, state) = if lab.is_native() {
                (
                    format!("127.0.0.1:{port}"),
                    "${TMPDIR:-/tmp}/fissiled-serve",
                )
            } else {
                (format!("0.0.0.0:{lab_port}"), "/tmp/fissiled")
            };
            // In the lab, one packet from the guest first: QEMU's user networking learns the
            // guest's address from it, so the first forwarded connections (possibly many at
            // once) find the guest.
            let prime = if lab.is_native() {
                ""
            } else {
                "ping -c 1 -W 2 10.0.2.2 >/dev/null 2>&1 || true\n"
            };
            let script = format!(
                "set -e\n{prime}mkdir -p {state}\n\
                 KEY=$(fissiled keys create --state-dir {state} --tenant {tenant}{admin})\n\
                 echo FISSILE_API_URL=http://127.0.0.1:{port}\n\
                 echo FISSILE_API_KEY=$KEY\n\
                 exec fissiled serve --state-dir {state} --listen {listen} {}\n",
                shell_quote(&args),
                admin = if admin { " --admin" } else { "" },
            );
            eprintln!(
                "fissile-lab: serving fissiled {} on http://127.0.0.1:{port}",
                if lab.is_native() {
                    "natively"
                } else {
                    "in the lab (QEMU user networking, restricted; port forwarded)"
                }
            );
            if lab.is_native() {
                // Natively: run the script here, its output straight through.
                let path = format!(
                    "{}:{}",
                    bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                );
                let status = std::process::Command::new("timeout")
                    .arg(timeout.to_string())
                    .args(["sh", "-c", &script])
                    .env("PATH", path)
                    .env("FISSILE_GUEST_KERNEL", &kernel)
                    .env("FISSILE_GUEST_ROOTFS", &rootfs)
                    .status()
                    .context("running fissiled")?;
                std::process::exit(status.code().unwrap_or(1));
            }
            let out = unless_frozen(lab.run(&script, Duration::from_secs(timeout)))?;
            std::process::exit(out.status);
        }
        Cmd::Info => {
            println!("host KVM usable for standard guests: {}", host_kvm_usable());
            println!("host KVM is KVM-PVM: {}", host_kvm_is_pvm());
            let cfg = LabConfig::from_env()?;
            println!("guest kernel: {}", cfg.guest_kernel.display());
            println!("guest rootfs: {}", cfg.guest_rootfs.display());
            println!("binaries:     {}", cfg.bin_dir.display());
        }
    }
    Ok(())
}
