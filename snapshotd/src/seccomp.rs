//! The serving daemon's seccomp filter (`seccomp/x86_64.json`, compiled to BPF by `build.rs`).
//!
//! `fissile-snapshotd serve` opens its store and binds its socket, then installs `serve` on
//! every thread at once (TSYNC: rocksdb's background threads already run) before it reads a
//! request: files, memfds, the sockets it already has and threads stay allowed; exec, new
//! processes, new sockets, ptrace, signals to others, mounts and uid changes are not. Any
//! syscall outside the list kills the whole process with SIGSYS (the kernel's audit log names
//! it); `--seccomp log` lets it run and logs it instead, for finding what a new code path
//! needs. Every daemon the tests start runs filtered, so a missing syscall fails a test.

use fissile_proto::seccomp::Filter;

mod generated {
    use super::Filter;
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// What a syscall outside the filter does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The kernel kills the process (SIGSYS).
    Kill,
    /// The kernel logs it (audit, `type=1326`) and lets it run: never for production.
    Log,
    /// No filter.
    Off,
}

/// Why the filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: no compiled filter named {0:?} (build.rs and seccomp/x86_64.json disagree)")]
    Missing(&'static str),
    #[error("seccomp: installing the {name} filter on every thread: {source}")]
    Install {
        name: &'static str,
        source: seccompiler::Error,
    },
}

/// Installs the serve filter on every thread of the process (in `mode`).
pub fn install(mode: Mode) -> Result<(), SeccompError> {
    let filters = match mode {
        Mode::Off => return Ok(()),
        Mode::Kill => generated::ENFORCE,
        Mode::Log => generated::LOG,
    };
    for name in ["no_clone3", "serve"] {
        let program =
            fissile_proto::seccomp::program(filters, name).ok_or(SeccompError::Missing(name))?;
        seccompiler::apply_filter_all_threads(&program)
            .map_err(|source| SeccompError::Install { name, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_were_compiled_in_both_modes() {
        for filters in [generated::ENFORCE, generated::LOG] {
            for name in ["no_clone3", "serve"] {
                assert!(
                    !fissile_proto::seccomp::program(filters, name)
                        .unwrap()
                        .is_empty()
                );
            }
        }
    }

    #[test]
    fn the_filter_allows_the_background_threads_exactly_their_nice_value() {
        let json: serde_json::Value =
            serde_json::from_str(include_str!("../seccomp/x86_64.json")).unwrap();
        let rules = json["serve"]["filter"].as_array().unwrap();
        let rule = rules
            .iter()
            .find(|r| r["syscall"] == "setpriority")
            .expect("setpriority allowed");
        let vals: Vec<i64> = rule["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["val"].as_i64().unwrap())
            .collect();
        assert_eq!(
            vals,
            vec![
                i64::from(libc::PRIO_PROCESS),
                0,
                i64::from(crate::server::BACKGROUND_NICE)
            ]
        );
    }
}
