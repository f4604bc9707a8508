//! Image build: debootstrap → pip wheels → files/env → build-time commands → agent → ext4.
//!
//! Two cache levels under `<cache>/rootfs/`:
//! * `tree-<spec hash>/`: the populated root directory (the expensive part: network and
//!   dpkg), keyed by [`Spec::content_hash`] and [`TREE_FORMAT`].
//! * `<name>-<spec hash>-<agent hash>.ext4`: the read-only image, i.e. the tree plus the
//!   agent binary at [`AGENT_PATH`], written with `mkfs.ext4 -d` (no loop mounts, ~10-20 s).
//!
//! A directory or image is renamed into place only once complete, so an interrupted build
//! never leaves a cache entry that looks valid. One build at a time per cache (flock).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::progress::Progress;
use crate::spec::Spec;

/// Where the guest agent lives inside the image; the VMM's default `init=`.
pub const AGENT_PATH: &str = "usr/sbin/fissile-agent";
/// Bumped whenever the tree layout produced by [`build_tree`] changes.
pub const TREE_FORMAT: u32 = 1;
/// Bumped whenever the image produced from a tree changes (mkfs flags, layout).
pub const IMAGE_FORMAT: u32 = 1;

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The validated template spec.
    pub spec: Spec,
    /// The guest agent binary to install as init.
    pub agent: PathBuf,
    /// Cache root (the image lands in `<cache>/rootfs/`).
    pub cache: PathBuf,
}

/// Errors building an image; each names the stage that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A host tool the build needs is missing.
    #[error("required host tool `{0}` not found (install Debian package `{1}`)")]
    MissingTool(&'static str, &'static str),
    /// The agent binary is missing.
    #[error("agent binary {0} not found: build it with `cargo build --release -p fissile-agent`")]
    MissingAgent(PathBuf),
    /// debootstrap could not find some apt packages.
    #[error("apt package(s) not found in {suite}: {packages} (see {log})")]
    AptPackage {
        /// The suite searched.
        suite: String,
        /// The packages debootstrap could not find.
        packages: String,
        /// Full log.
        log: PathBuf,
    },
    /// pip could not install a package.
    #[error("pip package `{package}` failed to install: {reason} (see {log})")]
    PipPackage {
        /// The failing requirement.
        package: String,
        /// pip's own error line.
        reason: String,
        /// Full log.
        log: PathBuf,
    },
    /// A stage's command failed for another reason.
    #[error("stage `{stage}` failed: {detail} (see {log})")]
    Stage {
        /// Stage name.
        stage: &'static str,
        /// Last lines of the command's output.
        detail: String,
        /// Full log.
        log: PathBuf,
    },
    /// A filesystem operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    /// The spec could not be hashed (unreadable `files[].src`).
    #[error("spec")]
    Spec(#[from] crate::spec::SpecError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BuildError {
    let what = what.into();
    move |e| BuildError::Io(what, e)
}

/// Builds (or finds in the cache) the image for `req` and returns its path.
pub fn build(req: &BuildRequest, progress: &mut Progress) -> Result<PathBuf, BuildError> {
    let agent = fs::read(&req.agent).map_err(|_| BuildError::MissingAgent(req.agent.clone()))?;
    let spec_hash = {
        let mut h = blake3::Hasher::new();
        h.update(req.spec.content_hash()?.as_bytes());
        h.update(&TREE_FORMAT.to_le_bytes());
        h.finalize().to_hex()[..16].to_owned()
    };
    let agent_hash = {
        let mut h = blake3::Hasher::new();
        h.update(&agent);
        h.update(&IMAGE_FORMAT.to_le_bytes());
        h.finalize().to_hex()[..12].to_owned()
    };
    let root = req.cache.join("rootfs");
    fs::create_dir_all(root.join("logs")).map_err(io_err(format!("create {}", root.display())))?;
    let image = root.join(format!("{}-{spec_hash}-{agent_hash}.ext4", req.spec.name));
    if image.exists() {
        progress.note(&format!("cache hit: {}", image.display()));
        return Ok(image);
    }
    let _lock = lock(&root)?;
    if image.exists() {
        return Ok(image);
    }
    let tree = root.join(format!("tree-{spec_hash}"));
    if tree.exists() {
        progress.note(&format!("tree cache hit: {}", tree.display()));
    } else {
        build_tree(&req.spec, &tree, &root, progress)?;
    }
    progress.stage("image", "installing the agent and writing the ext4 image");
    let dest = tree.join(AGENT_PATH);
    fs::write(&dest, &agent).map_err(io_err(format!("write {}", dest.display())))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))
        .map_err(io_err(format!("chmod {}", dest.display())))?;
    let tmp = image.with_extension("ext4.tmp");
    make_ext4(&tree, &tmp, &root.join("logs/mkfs.log"))?;
    fs::rename(&tmp, &image).map_err(io_err(format!("rename to {}", image.display())))?;
    let size = fs::metadata(&image).map(|m| m.len()).unwrap_or(0);
    progress.note(&format!("image {} ({} MiB)", image.display(), size >> 20));
    remove_stale_images(&root, &req.spec.name, &image);
    Ok(image)
}

/// Keeps the cache from growing by one image per agent build: older images of the same
/// template are removed once a new one is complete.
fn remove_stale_images(root: &Path, name: &str, keep: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let fname = e.file_name().to_string_lossy().into_owned();
        if p != keep && fname.starts_with(&format!("{name}-")) && fname.ends_with(".ext4") {
            let _ = fs::remove_file(&p);
        }
    }
}

fn lock(root: &Path) -> Result<fs::File, BuildError> {
    let path = root.join(".lock");
    let f = fs::File::create(&path).map_err(io_err(format!("create {}", path.display())))?;
    // SAFETY: flock on a valid, owned file descriptor; blocks until the lock is ours and is
    // released when `f` is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    if rc != 0 {
        return Err(BuildError::Io("flock".into(), io::Error::last_os_error()));
    }
    Ok(f)
}

/// Stage 1: the Debian base from debootstrap, cached on its own (`base-<hash>/`) so that a
/// change to the pip packages or files does not repeat it.
fn build_base(spec: &Spec, root: &Path, progress: &mut Progress) -> Result<PathBuf, BuildError> {
    let key = {
        let mut h = blake3::Hasher::new();
        h.update(&TREE_FORMAT.to_le_bytes());
        for part in [
            &spec.debian.suite,
            &spec.debian.mirror,
            &spec.debian.variant,
        ] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        for p in &spec.apt.packages {
            h.update(p.as_bytes());
            h.update(b"\0");
        }
        h.finalize().to_hex()[..16].to_owned()
    };
    let base = root.join(format!("base-{key}"));
    if base.exists() {
        progress.note(&format!("debian base cache hit: {}", base.display()));
        return Ok(base);
    }
    need_tool("debootstrap", "debootstrap")?;
    let tmp = base.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(format!("remove stale {}", tmp.display())))?;
    }
    fs::create_dir_all(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
    progress.stage(
        "debootstrap",
        &format!(
            "Debian {} {} + {} apt packages",
            spec.debian.suite,
            spec.debian.variant,
            spec.apt.packages.len()
        ),
    );
    let log = root.join("logs/debootstrap.log");
    let mut cmd = Command::new("debootstrap");
    cmd.arg(format!("--variant={}", spec.debian.variant));
    if !spec.apt.packages.is_empty() {
        cmd.arg(format!("--include={}", spec.apt.packages.join(",")));
    }
    cmd.args([
        &spec.debian.suite,
        &tmp.display().to_string(),
        &spec.debian.mirror,
    ]);
    if let Err(e) = run_logged(&mut cmd, &log, "debootstrap") {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("Couldn't find these debs"))
        {
            let packages = line.rsplit(':').next().unwrap_or("").trim().to_owned();
            return Err(BuildError::AptPackage {
                suite: spec.debian.suite.clone(),
                packages,
                log,
            });
        }
        if let Some(line) = text.lines().find(|l| l.contains("Couldn't find package")) {
            return Err(BuildError::AptPackage {
                suite: spec.debian.suite.clone(),
                packages: line.trim().to_owned(),
                log,
            });
        }
        return Err(e);
    }
    fs::rename(&tmp, &base).map_err(io_err(format!("rename to {}", base.display())))?;
    Ok(base)
}

/// Stages 2-5: copy the base, add wheels, files and env, run build steps, trim; the result
/// is renamed to `tree` when complete.
fn build_tree(
    spec: &Spec,
    tree: &Path,
    root: &Path,
    progress: &mut Progress,
) -> Result<(), BuildError> {
    let base = build_base(spec, root, progress)?;
    let tmp = tree.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(format!("remove stale {}", tmp.display())))?;
    }
    let mut cp = Command::new("cp");
    cp.arg("-a").arg(&base).arg(&tmp);
    run_logged(&mut cp, &root.join("logs/copy-base.log"), "copy base")?;

    if !spec.pip.packages.is_empty() {
        progress.stage(
            "pip",
            &format!("{} wheels for the image's CPython", spec.pip.packages.len()),
        );
        pip_install(spec, &tmp, root)?;
    }

    progress.stage(
        "files",
        &format!("{} files, {} env vars", spec.files.len(), spec.env.len()),
    );
    install_files(spec, &tmp)?;

    for (i, step) in spec.run.iter().enumerate() {
        progress.stage("run", &format!("build step {}: {}", i + 1, step.command));
        let log = root.join(format!("logs/run-{i}.log"));
        let mut cmd = Command::new("chroot");
        cmd.arg(&tmp)
            .args(["/bin/sh", "-c", &step.command])
            .env_clear();
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        cmd.env("HOME", "/root");
        cmd.envs(&spec.env);
        run_logged(&mut cmd, &log, "run")?;
    }

    progress.stage("trim", "removing docs, man pages and apt caches");
    for dir in [
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "var/cache/apt",
        "var/lib/apt/lists",
    ] {
        let p = tmp.join(dir);
        if p.exists() {
            fs::remove_dir_all(&p).map_err(io_err(format!("trim {}", p.display())))?;
            fs::create_dir_all(&p).map_err(io_err(format!("recreate {}", p.display())))?;
        }
    }
    fs::rename(&tmp, tree).map_err(io_err(format!("rename to {}", tree.display())))
}

fn pip_install(spec: &Spec, tree: &Path, root: &Path) -> Result<(), BuildError> {
    let pyver = guest_python_version(tree)?;
    let target = tree.join(format!("usr/local/lib/python{pyver}/dist-packages"));
    fs::create_dir_all(&target).map_err(io_err(format!("create {}", target.display())))?;
    let log = root.join("logs/pip.log");
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--upgrade",
    ])
    .arg("--only-binary=:all:")
    .args(manylinux_platforms(&glibc_version(tree)?))
    .args(["--implementation", "cp", "--python-version", &pyver])
    .arg("--cache-dir")
    .arg(root.join("pip-cache"))
    .arg("--target")
    .arg(&target)
    .args(&spec.pip.packages);
    if let Err(e) = run_logged(&mut cmd, &log, "pip") {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if let Some((package, reason)) = pip_failure(&text, &spec.pip.packages) {
            return Err(BuildError::PipPackage {
                package,
                reason,
                log,
            });
        }
        return Err(e);
    }
    // Record what pip resolved, for reproducibility and for users of the image.
    let freeze = Command::new("python3")
        .args([
            "-m",
            "pip",
            "list",
            "--format=freeze",
            "--disable-pip-version-check",
            "--path",
        ])
        .arg(&target)
        .output()
        .map_err(io_err("pip list"))?;
    let etc = tree.join("etc/fissile");
    fs::create_dir_all(&etc).map_err(io_err("create /etc/fissile"))?;
    fs::write(etc.join("pip-freeze.txt"), &freeze.stdout).map_err(io_err("write pip-freeze.txt"))
}

/// `--platform` flags for every manylinux tag a glibc of `(2, minor)` runs: pip 23 does not
/// expand `manylinux_2_36` to the older tags itself.
fn manylinux_platforms(glibc: &(u32, u32)) -> Vec<String> {
    let mut v = Vec::new();
    for minor in (5..=glibc.1).rev() {
        v.push("--platform".to_owned());
        v.push(format!("manylinux_{}_{minor}_x86_64", glibc.0));
    }
    for legacy in [
        "manylinux2014_x86_64",
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
    ] {
        v.push("--platform".to_owned());
        v.push(legacy.to_owned());
    }
    v
}

/// The image's glibc version, from the name of its `libc.so.6` target or `ldd --version`.
fn glibc_version(tree: &Path) -> Result<(u32, u32), BuildError> {
    let out = Command::new("chroot")
        .arg(tree)
        .args(["/usr/bin/ldd", "--version"])
        .output()
        .map_err(io_err("chroot ldd --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("");
    let ver = first.rsplit(' ').next().unwrap_or("");
    let parsed = ver
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    parsed.ok_or_else(|| BuildError::Stage {
        stage: "pip",
        detail: format!("cannot tell the image's glibc version from {first:?}"),
        log: tree.to_path_buf(),
    })
}

/// Finds which requirement pip failed on, from its log.
fn pip_failure(log: &str, requested: &[String]) -> Option<(String, String)> {
    let line = log.lines().find(|l| {
        l.starts_with("ERROR: Could not find a version")
            || l.starts_with("ERROR: No matching distribution")
            || l.starts_with("ERROR: Invalid requirement")
    })?;
    let package = line
        .split_once("for ")
        .map(|(_, rest)| {
            rest.split_whitespace()
                .next()
                .unwrap_or("")
                .trim_matches(|c| c == '"' || c == '\'')
        })
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .or_else(|| {
            requested
                .iter()
                .find(|r| line.contains(r.as_str()))
                .cloned()
        })
        .unwrap_or_else(|| "?".to_owned());
    Some((package, line.trim_start_matches("ERROR: ").to_owned()))
}

fn guest_python_version(tree: &Path) -> Result<String, BuildError> {
    let lib = tree.join("usr/lib");
    let entries = fs::read_dir(&lib).map_err(io_err(format!("read {}", lib.display())))?;
    let mut versions: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter_map(|n| n.strip_prefix("python3.").map(|minor| format!("3.{minor}")))
        .filter(|v| v[2..].chars().all(|c| c.is_ascii_digit()))
        .collect();
    versions.sort();
    versions.pop().ok_or_else(|| BuildError::Stage {
        stage: "pip",
        detail: "the image has no python3 (add `python3` to apt.packages)".into(),
        log: lib,
    })
}

fn install_files(spec: &Spec, tree: &Path) -> Result<(), BuildError> {
    for f in &spec.files {
        let dest = tree.join(f.dest.strip_prefix("/").unwrap_or(&f.dest));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(format!("create {}", parent.display())))?;
        }
        match (&f.src, &f.content) {
            (Some(src), _) => {
                fs::copy(src, &dest).map_err(io_err(format!("copy {}", src.display())))?;
            }
            (None, Some(content)) => {
                fs::write(&dest, content).map_err(io_err(format!("write {}", dest.display())))?;
            }
            (None, None) => {}
        }
        fs::set_permissions(&dest, fs::Permissions::from_mode(f.mode))
            .map_err(io_err(format!("chmod {}", dest.display())))?;
    }
    let etc = tree.join("etc/fissile");
    fs::create_dir_all(&etc).map_err(io_err("create /etc/fissile"))?;
    let mut env = String::new();
    for (k, v) in &spec.env {
        env.push_str(&format!("{k}={v}\n"));
        // Build-time commands may create directories named by the environment (MPLCONFIGDIR).
        if v.starts_with("/etc/fissile/") {
            let p = tree.join(v.trim_start_matches('/'));
            fs::create_dir_all(&p).map_err(io_err(format!("create {}", p.display())))?;
        }
    }
    fs::write(etc.join("env"), env).map_err(io_err("write /etc/fissile/env"))?;
    fs::write(tree.join("etc/hostname"), "fissile\n").map_err(io_err("write /etc/hostname"))
}

fn make_ext4(tree: &Path, image: &Path, log: &Path) -> Result<(), BuildError> {
    need_tool("mkfs.ext4", "e2fsprogs")?;
    let (bytes, files) = tree_usage(tree).map_err(io_err(format!("measure {}", tree.display())))?;
    // Files of a few KiB waste up to a block each; leave room for that and the metadata.
    let size_mib = (bytes + files * 4096) / (1 << 20) * 115 / 100 + 64;
    let inodes = files * 13 / 10 + 10_000;
    let _ = fs::remove_file(image);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args([
        "-q",
        "-F",
        "-L",
        "fissile-root",
        "-b",
        "4096",
        "-O",
        "^has_journal",
    ])
    .args(["-N", &inodes.to_string(), "-E", "root_owner=0:0", "-d"])
    .arg(tree)
    .arg(image)
    .arg(format!("{size_mib}M"));
    run_logged(&mut cmd, log, "image")
}

fn tree_usage(dir: &Path) -> io::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let md = e.path().symlink_metadata()?;
            files += 1;
            if md.is_dir() {
                stack.push(e.path());
            } else {
                bytes += md.len();
            }
        }
    }
    Ok((bytes, files))
}

fn need_tool(tool: &'static str, package: &'static str) -> Result<(), BuildError> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(BuildError::MissingTool(tool, package))
    }
}

/// Runs `cmd` with stdout+stderr appended to `log`; on failure returns the log's tail.
fn run_logged(cmd: &mut Command, log: &Path, stage: &'static str) -> Result<(), BuildError> {
    let mut file = fs::File::create(log).map_err(io_err(format!("create {}", log.display())))?;
    let _ = writeln!(file, "$ {cmd:?}");
    let out = file.try_clone().map_err(io_err("dup log"))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(file))
        .status()
        .map_err(io_err(format!("spawn {:?}", cmd.get_program())))?;
    if status.success() {
        return Ok(());
    }
    let text = fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(8).collect();
    let detail = format!(
        "{status}; last output: {}",
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    );
    Err(BuildError::Stage {
        stage,
        detail,
        log: log.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_failure_names_missing_package() {
        let log = "Collecting numpy\nERROR: Could not find a version that satisfies the requirement nosuchpkg-xyz (from versions: none)\nERROR: No matching distribution found for nosuchpkg-xyz\n";
        let (pkg, reason) = pip_failure(log, &["numpy".into(), "nosuchpkg-xyz".into()]).unwrap();
        assert_eq!(pkg, "nosuchpkg-xyz");
        assert!(reason.contains("Could not find"));
    }

    #[test]
    fn manylinux_platforms_cover_older_glibc_and_legacy_tags() {
        let p = manylinux_platforms(&(2, 36));
        assert!(p.contains(&"manylinux_2_36_x86_64".to_owned()));
        assert!(p.contains(&"manylinux_2_17_x86_64".to_owned()));
        assert!(p.contains(&"manylinux2014_x86_64".to_owned()));
        assert_eq!(p.iter().filter(|a| *a == "--platform").count(), p.len() / 2);
    }

    #[test]
    fn guest_python_version_picks_python3_minor() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("usr/lib/python3.11")).unwrap();
        fs::create_dir_all(dir.path().join("usr/lib/python3")).unwrap();
        assert_eq!(guest_python_version(dir.path()).unwrap(), "3.11");
    }

    #[test]
    fn install_files_writes_content_env_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::parse(
            "name='t'\n[debian]\nsuite='bookworm'\n[[files]]\ncontent='hi'\ndest='/opt/x/hello'\nmode=0o600\n[env]\nA='1'\n",
            Path::new("t"),
        )
        .unwrap();
        install_files(&spec, dir.path()).unwrap();
        let p = dir.path().join("opt/x/hello");
        assert_eq!(fs::read_to_string(&p).unwrap(), "hi");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o600
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("etc/fissile/env")).unwrap(),
            "A=1\n"
        );
    }

    #[test]
    fn make_ext4_produces_an_image_e2fsck_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("etc/hostname"), "fissile\n").unwrap();
        let img = dir.path().join("x.ext4");
        make_ext4(&tree, &img, &dir.path().join("mkfs.log")).unwrap();
        let out = Command::new("e2fsck")
            .args(["-n", "-f"])
            .arg(&img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let out = Command::new("debugfs")
            .args(["-R", "cat /etc/hostname"])
            .arg(&img)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "fissile\n");
    }
}
