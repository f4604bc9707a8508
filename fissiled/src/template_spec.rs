//! The spec of a template built over the API (`POST /v1/templates`): TOML in the shape of
//! `fissile-rootfs`'s specs (`name`, `[apt]`, `[pip]`, `[env]`, `[[files]]`, `[[run]]`) plus
//! `base` and `warmup`. It derives from a template the daemon already has: its sandboxes start
//! from the base's root image with the spec's files written, its packages installed in the
//! guest (`apt-get install`, `pip install`: from the indexes the build's network policy
//! reaches), its commands run and its warm-up run in the REPL, all captured in the template's
//! ready snapshots (the guest's writable layer is in its memory). A new base system
//! (`[debian]`) is a root image built on the host with `fissile-rootfs build`, and is refused
//! here with that advice.
//!
//! Everything comes from a client, so everything is bounded: [`MAX_FILES`] files of at most
//! [`MAX_FILE_BYTES`] ([`MAX_TOTAL_FILE_BYTES`] in all), [`MAX_RUN_STEPS`] commands, env as a
//! create's, a warm-up as long as a cell.

use std::collections::BTreeMap;

use fissile_proto::agent::ShellCommand;
use serde::Deserialize;

use crate::error::ApiError;

/// Most files a spec may write.
pub const MAX_FILES: usize = 64;
/// Largest file a spec may write (its content is inline TOML).
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Most bytes all of a spec's files may hold (under the API's JSON body cap; larger data a
/// `[[run]]` command fetches).
pub const MAX_TOTAL_FILE_BYTES: usize = 3 << 19;
/// Most `[[run]]` commands.
pub const MAX_RUN_STEPS: usize = 32;
/// Longest `[[run]]` command (bytes).
pub const MAX_COMMAND_BYTES: usize = 64 << 10;
/// A `[[run]]` command's time limit unless it sets `timeout_s`.
pub const DEFAULT_RUN_TIMEOUT_S: u64 = 600;
/// The longest `timeout_s` a command may set.
pub const MAX_RUN_TIMEOUT_S: u64 = 3600;
/// Most seconds all of a spec's commands may take (their time limits added up, the package
/// installs' included), so one build cannot hold the daemon's build slot for days.
pub const MAX_BUILD_COMMANDS_S: u64 = 4 * 3600;
/// Longest template name.
pub const MAX_NAME_BYTES: usize = 63;

/// Most packages in `[apt]` or in `[pip]`.
pub const MAX_PACKAGES: usize = 64;
/// Longest package name or pip requirement.
pub const MAX_PACKAGE_BYTES: usize = 200;

/// A validated template spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    /// Its name: `[a-z0-9][a-z0-9._-]*`, at most [`MAX_NAME_BYTES`].
    pub name: String,
    /// The template it derives from.
    pub base: String,
    /// Environment of every cell and command of its sandboxes (under a create's own).
    pub env: BTreeMap<String, String>,
    /// Files written into the guest before the commands.
    pub files: Vec<SpecFile>,
    /// Commands run in order after the files are written: the package installs (`[apt]`,
    /// then `[pip]`), then `[[run]]`'s scripts (`/bin/sh -c`); one that fails fails the
    /// build.
    pub run: Vec<SpecRun>,
    /// Python run in the REPL after the commands, before the snapshot: what it imports and
    /// defines is there in every sandbox of the template.
    pub warmup: Option<String>,
}

/// One file of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecFile {
    /// Absolute guest path (parents are created).
    pub dest: String,
    /// Its content.
    pub content: String,
    /// Permission bits.
    pub mode: u32,
}

/// One command of a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecRun {
    /// What names it in errors: `run[0]`, `apt`, `pip`.
    pub label: String,
    /// What it runs: a `[[run]]` script, or a package manager's argv (no shell).
    pub command: ShellCommand,
    /// Its own environment, over the spec's.
    pub env: BTreeMap<String, String>,
    /// Its time limit.
    pub timeout_s: u64,
}

impl SpecRun {
    /// The first line of what it runs, cut to 120 characters, for a build step's name.
    pub fn headline(&self) -> String {
        let text = match &self.command {
            ShellCommand::Script(s) => s.trim().to_string(),
            ShellCommand::Argv(a) => a.join(" "),
        };
        let line = text.lines().next().unwrap_or("");
        let mut s: String = line.chars().take(120).collect();
        if s.len() < line.len() || text.lines().nth(1).is_some() {
            s.push('…');
        }
        s
    }
}

/// A pip requirement: a name, extras, version constraints — nothing pip could read as an
/// option, a path or a URL.
pub fn valid_requirement(r: &str) -> bool {
    r.len() <= MAX_PACKAGE_BYTES
        && r.starts_with(|c: char| c.is_ascii_alphanumeric())
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-[],<>=!~*+ ".contains(c))
}

/// A Debian package name (lower case letters, digits, `+`, `-`, `.`; two or more).
pub fn valid_apt_name(n: &str) -> bool {
    n.len() >= 2
        && n.len() <= MAX_PACKAGE_BYTES
        && n.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    #[serde(default)]
    base: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    files: Vec<RawFile>,
    #[serde(default)]
    run: Vec<RawRun>,
    #[serde(default)]
    warmup: Option<String>,
    #[serde(default)]
    apt: RawPackages,
    #[serde(default)]
    pip: RawPackages,
    // A root image's base system, refused with advice rather than as an unknown field.
    #[serde(default)]
    debian: Option<toml::Value>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackages {
    #[serde(default)]
    packages: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    dest: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    src: Option<String>,
    #[serde(default)]
    mode: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRun {
    command: String,
    #[serde(default)]
    timeout_s: Option<u64>,
}

/// True for a template name: `[a-z0-9][a-z0-9._-]*`, 1 to [`MAX_NAME_BYTES`] bytes.
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'0'..=b'9'))
        && name.len() <= MAX_NAME_BYTES
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-'))
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!("spec: `{field}`: {reason}"))
}

/// Parses and checks a spec; `base_ok` says whether a base template exists. Every error is a
/// 400 naming the field.
pub fn parse(text: &str, base_ok: impl Fn(&str) -> bool) -> Result<TemplateSpec, ApiError> {
    let raw: Raw = toml::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("spec: malformed TOML: {}", e.message())))?;
    if raw.debian.is_some() {
        return Err(invalid(
            "debian",
            "a template built over the API derives from a base template's image (`base`); \
             a new base system is a root image built on the host with `fissile-rootfs build`",
        ));
    }
    if !valid_name(&raw.name) {
        return Err(invalid(
            "name",
            format!(
                "{:?} is not a template name ([a-z0-9][a-z0-9._-]*, at most {MAX_NAME_BYTES} \
                 bytes)",
                raw.name
            ),
        ));
    }
    let base = raw
        .base
        .unwrap_or_else(|| crate::app::DEFAULT_TEMPLATE.to_string());
    if !base_ok(&base) {
        return Err(invalid(
            "base",
            format!("no template {base:?} to derive from"),
        ));
    }
    if raw.env.len() > crate::app::MAX_ENV_VARS
        || raw.env.iter().any(|(k, v)| {
            k.is_empty() || k.len() > 256 || k.contains(['=', '\0']) || v.len() > 32 << 10
        })
    {
        return Err(invalid(
            "env",
            format!(
                "at most {} variables, names of 1-256 bytes without `=` or NUL, values up to \
                 32 KiB",
                crate::app::MAX_ENV_VARS
            ),
        ));
    }
    if raw.files.len() > MAX_FILES {
        return Err(invalid(
            "files",
            format!("{} files; at most {MAX_FILES}", raw.files.len()),
        ));
    }
    let mut files = Vec::with_capacity(raw.files.len());
    let mut total = 0usize;
    for (i, f) in raw.files.into_iter().enumerate() {
        let field = format!("files[{i}]");
        if f.src.is_some() {
            return Err(invalid(
                &format!("{field}.src"),
                "a host path means nothing to the daemon; give the file's `content` inline",
            ));
        }
        let content = f
            .content
            .ok_or_else(|| invalid(&format!("{field}.content"), "missing"))?;
        if content.len() > MAX_FILE_BYTES {
            return Err(invalid(
                &format!("{field}.content"),
                format!("{} bytes; at most {MAX_FILE_BYTES}", content.len()),
            ));
        }
        total += content.len();
        if total > MAX_TOTAL_FILE_BYTES {
            return Err(invalid(
                "files",
                format!("more than {MAX_TOTAL_FILE_BYTES} bytes in all"),
            ));
        }
        let dest = crate::files::guest_path(&f.dest)
            .map_err(|e| invalid(&format!("{field}.dest"), e.message))?;
        if crate::files::is_root(&dest) || dest.ends_with('/') {
            return Err(invalid(
                &format!("{field}.dest"),
                format!("{dest:?} is not a file path"),
            ));
        }
        let mode = f.mode.unwrap_or(0o644);
        if mode > 0o7777 {
            return Err(invalid(
                &format!("{field}.mode"),
                format!("{mode:#o} is not a permission mode (at most 0o7777)"),
            ));
        }
        files.push(SpecFile {
            dest,
            content,
            mode,
        });
    }
    let mut run = Vec::with_capacity(raw.run.len() + 3);
    for (section, packages) in [("apt", &raw.apt.packages), ("pip", &raw.pip.packages)] {
        let field = format!("{section}.packages");
        if packages.len() > MAX_PACKAGES {
            return Err(invalid(
                &field,
                format!("{} packages; at most {MAX_PACKAGES}", packages.len()),
            ));
        }
        for (i, p) in packages.iter().enumerate() {
            let ok = if section == "apt" {
                valid_apt_name(p)
            } else {
                valid_requirement(p)
            };
            if !ok {
                return Err(invalid(
                    &format!("{field}[{i}]"),
                    format!(
                        "{p:?} is not a {}",
                        if section == "apt" {
                            "Debian package name"
                        } else {
                            "pip requirement (a name, extras and version constraints)"
                        }
                    ),
                ));
            }
        }
    }
    if !raw.apt.packages.is_empty() {
        let apt_env: BTreeMap<String, String> =
            [("DEBIAN_FRONTEND".to_string(), "noninteractive".to_string())].into();
        run.push(SpecRun {
            label: "apt".into(),
            command: ShellCommand::Argv(vec!["apt-get".into(), "update".into()]),
            env: apt_env.clone(),
            timeout_s: DEFAULT_RUN_TIMEOUT_S,
        });
        let mut argv: Vec<String> = ["apt-get", "install", "-y", "--no-install-recommends"]
            .map(String::from)
            .into();
        argv.extend(raw.apt.packages.iter().cloned());
        run.push(SpecRun {
            label: "apt".into(),
            command: ShellCommand::Argv(argv),
            env: apt_env,
            timeout_s: DEFAULT_RUN_TIMEOUT_S,
        });
    }
    if !raw.pip.packages.is_empty() {
        let mut argv: Vec<String> = ["python3", "-m", "pip", "install", "--no-input", "--"]
            .map(String::from)
            .into();
        argv.extend(raw.pip.packages.iter().cloned());
        run.push(SpecRun {
            label: "pip".into(),
            command: ShellCommand::Argv(argv),
            env: BTreeMap::new(),
            timeout_s: DEFAULT_RUN_TIMEOUT_S,
        });
    }
    if raw.run.len() > MAX_RUN_STEPS {
        return Err(invalid(
            "run",
            format!("{} commands; at most {MAX_RUN_STEPS}", raw.run.len()),
        ));
    }
    for (i, r) in raw.run.into_iter().enumerate() {
        let field = format!("run[{i}]");
        if r.command.trim().is_empty() || r.command.len() > MAX_COMMAND_BYTES {
            return Err(invalid(
                &format!("{field}.command"),
                format!("must be 1 to {MAX_COMMAND_BYTES} bytes"),
            ));
        }
        let timeout_s = r.timeout_s.unwrap_or(DEFAULT_RUN_TIMEOUT_S);
        if !(1..=MAX_RUN_TIMEOUT_S).contains(&timeout_s) {
            return Err(invalid(
                &format!("{field}.timeout_s"),
                format!("must be in 1..={MAX_RUN_TIMEOUT_S}, got {timeout_s}"),
            ));
        }
        run.push(SpecRun {
            label: field,
            command: ShellCommand::Script(r.command),
            env: BTreeMap::new(),
            timeout_s,
        });
    }
    let total: u64 = run.iter().map(|r| r.timeout_s).sum();
    if total > MAX_BUILD_COMMANDS_S {
        return Err(invalid(
            "run",
            format!(
                "the commands' time limits add up to {total} s; at most {MAX_BUILD_COMMANDS_S}"
            ),
        ));
    }
    if let Some(w) = &raw.warmup
        && w.len() > crate::exec::MAX_CODE_BYTES
    {
        return Err(invalid(
            "warmup",
            format!("{} bytes; at most {}", w.len(), crate::exec::MAX_CODE_BYTES),
        ));
    }
    Ok(TemplateSpec {
        name: raw.name,
        base,
        env: raw.env,
        files,
        run,
        warmup: raw.warmup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> TemplateSpec {
        parse(text, |b| b == "python-datasci").expect("valid spec")
    }

    fn err(text: &str) -> String {
        parse(text, |b| b == "python-datasci")
            .expect_err("accepted a bad spec")
            .message
    }

    #[test]
    fn a_full_spec_parses_with_its_defaults() {
        let s = ok(r##"
name = "taxi-analysis"
warmup = "import pandas as pd\ndf = pd.DataFrame({'a': [1]})"
[env]
DATA = "/opt/data"
[[files]]
dest = "/opt/data/x.csv"
content = "a,b\n1,2\n"
[[files]]
dest = "/usr/local/bin/hello"
content = "#!/bin/sh\necho hi\n"
mode = 0o755
[[run]]
command = "mkdir -p /opt/out"
[[run]]
command = "python3 -m pip install --no-index /opt/wheels/x.whl"
timeout_s = 120
"##);
        assert_eq!(s.name, "taxi-analysis");
        assert_eq!(s.base, "python-datasci");
        assert_eq!(s.env["DATA"], "/opt/data");
        assert_eq!(s.files[0].mode, 0o644);
        assert_eq!(s.files[1].mode, 0o755);
        assert_eq!(s.run[0].timeout_s, DEFAULT_RUN_TIMEOUT_S);
        assert_eq!(s.run[1].timeout_s, 120);
        assert_eq!(s.run[1].label, "run[1]");
        assert!(s.warmup.as_deref().is_some_and(|w| w.contains("DataFrame")));
    }

    #[test]
    fn each_bad_field_is_named_in_the_error() {
        for (text, field) in [
            ("name = 'Big'", "`name`"),
            ("name = ''", "`name`"),
            ("name = '../x'", "`name`"),
            ("name = 'x'\nbase = 'nope'", "`base`"),
            ("name = 'x'\nsurprise = 1", "unknown field"),
            ("name = 'x'\n[debian]\nsuite = 'bookworm'", "`debian`"),
            (
                "name = 'x'\n[debian]\nsuite = 'trixie'",
                "fissile-rootfs build",
            ),
            (
                "name = 'x'\n[pip]\npackages = ['-e /x']",
                "`pip.packages[0]`",
            ),
            (
                "name = 'x'\n[pip]\npackages = ['numpy', 'https://evil/x.whl']",
                "`pip.packages[1]`",
            ),
            (
                "name = 'x'\n[apt]\npackages = ['Curl']",
                "`apt.packages[0]`",
            ),
            (
                "name = 'x'\n[apt]\npackages = ['-o=x']",
                "`apt.packages[0]`",
            ),
            ("name = 'x'\n[apt]\nsurprise = 1", "unknown field"),
            (
                "name = 'x'\n[[files]]\ndest = '/a'\nsrc = 'a'",
                "`files[0].src`",
            ),
            ("name = 'x'\n[[files]]\ndest = '/a'", "`files[0].content`"),
            (
                "name = 'x'\n[[files]]\ndest = 'rel'\ncontent = ''",
                "`files[0].dest`",
            ),
            (
                "name = 'x'\n[[files]]\ndest = '/a/../b'\ncontent = ''",
                "`files[0].dest`",
            ),
            (
                "name = 'x'\n[[files]]\ndest = '/'\ncontent = ''",
                "`files[0].dest`",
            ),
            (
                "name = 'x'\n[[files]]\ndest = '/a'\ncontent = ''\nmode = 65535",
                "`files[0].mode`",
            ),
            ("name = 'x'\n[[run]]\ncommand = '  '", "`run[0].command`"),
            (
                "name = 'x'\n[[run]]\ncommand = 'true'\ntimeout_s = 0",
                "`run[0].timeout_s`",
            ),
            ("name = 'x'\n[env]\n'A=B' = '1'", "`env`"),
            ("name = [", "malformed TOML"),
        ] {
            let e = err(text);
            assert!(e.contains(field), "{text:?}: {e}");
        }
    }

    #[test]
    fn packages_become_argv_steps_before_the_scripts_in_order() {
        let s = ok(r#"
name = "x"
[apt]
packages = ["curl", "libgl1"]
[pip]
packages = ["tabulate==0.9.0", "pandas[performance]>=2,<4"]
[[run]]
command = "echo done"
"#);
        let argv = |i: usize| match &s.run[i].command {
            ShellCommand::Argv(a) => a.join(" "),
            ShellCommand::Script(s) => panic!("a script: {s}"),
        };
        let labels: Vec<&str> = s.run.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["apt", "apt", "pip", "run[0]"]);
        assert_eq!(argv(0), "apt-get update");
        assert_eq!(
            argv(1),
            "apt-get install -y --no-install-recommends curl libgl1"
        );
        assert_eq!(s.run[1].env["DEBIAN_FRONTEND"], "noninteractive");
        assert_eq!(
            argv(2),
            "python3 -m pip install --no-input -- tabulate==0.9.0 pandas[performance]>=2,<4"
        );
        assert_eq!(s.run[3].command, ShellCommand::Script("echo done".into()));
        assert_eq!(s.run[3].headline(), "echo done");
        let long = SpecRun {
            label: "run[0]".into(),
            command: ShellCommand::Script(format!("  set -e\n{}\n", "a".repeat(200))),
            env: BTreeMap::new(),
            timeout_s: 1,
        };
        assert_eq!(long.headline(), "set -e…");
        let many: Vec<String> = (0..=MAX_PACKAGES).map(|i| format!("'p{i}'")).collect();
        let e = err(&format!(
            "name = 'x'\n[pip]\npackages = [{}]",
            many.join(",")
        ));
        assert!(e.contains("`pip.packages`"), "{e}");
    }

    #[test]
    fn sizes_are_capped() {
        let big = "x".repeat(MAX_FILE_BYTES + 1);
        let e = err(&format!(
            "name = 'x'\n[[files]]\ndest = '/a'\ncontent = '{big}'"
        ));
        assert!(e.contains("files[0].content"), "{e}");
        let many: String = (0..=MAX_RUN_STEPS)
            .map(|_| "[[run]]\ncommand = 'true'\n")
            .collect();
        assert!(err(&format!("name = 'x'\n{many}")).contains("`run`"));
        let half = "y".repeat(MAX_FILE_BYTES);
        let files: String = (0..2)
            .map(|i| format!("[[files]]\ndest = '/f{i}'\ncontent = '{half}'\n"))
            .collect();
        let slow: String = (0..5)
            .map(|_| "[[run]]\ncommand = 'sleep 1'\ntimeout_s = 3600\n")
            .collect();
        assert!(err(&format!("name = 'x'\n{slow}")).contains("add up to 18000 s"));
        assert!(err(&format!("name = 'x'\n{files}")).contains("in all"));
    }

    #[test]
    fn names_are_plain() {
        for good in ["a", "taxi-2026", "py3.12_x"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "-a", ".a", "A", "a/b", "a b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
