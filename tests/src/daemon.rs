//! A `fissiled` process for tests and benchmarks: API keys, `serve` on a loopback port chosen
//! by the kernel, its `READY` line, and a graceful stop when dropped (SIGTERM, so it stops
//! its sandboxes and snapshotd; SIGKILL after 60 s).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

/// A running `fissiled serve`.
#[derive(Debug)]
pub struct Fissiled {
    child: Child,
    base: String,
}

/// Creates an API key for `tenant` in the state directory `state` (`fissiled keys create`).
pub fn create_key(bin: &Path, state: &Path, tenant: &str) -> anyhow::Result<String> {
    create_key_with(bin, state, tenant, &[])
}

/// [`create_key`] for an admin key (`--admin`: it may manage keys over the API).
pub fn create_admin_key(bin: &Path, state: &Path, tenant: &str) -> anyhow::Result<String> {
    create_key_with(bin, state, tenant, &["--admin"])
}

fn create_key_with(
    bin: &Path,
    state: &Path,
    tenant: &str,
    flags: &[&str],
) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(["keys", "create", "--tenant", tenant, "--state-dir"])
        .arg(state)
        .args(flags)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "fissiled keys create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

impl Fissiled {
    /// Starts `bin serve --listen 127.0.0.1:0 --state-dir <state> <args>` and waits for its
    /// readiness line.
    pub fn serve<I, S>(bin: &Path, state: &Path, args: I) -> anyhow::Result<Fissiled>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Fissiled::serve_logging(bin, state, args, None)
    }

    /// [`Fissiled::serve`] with its `RUST_LOG` set (a benchmark keeps the daemon to `warn`).
    pub fn serve_logging<I, S>(
        bin: &Path,
        state: &Path,
        args: I,
        rust_log: Option<&str>,
    ) -> anyhow::Result<Fissiled>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let env: Vec<(&str, &str)> = rust_log.map(|f| ("RUST_LOG", f)).into_iter().collect();
        Fissiled::serve_env(bin, state, args, &env)
    }

    /// The value of the `/metrics` sample named `sample` (with its labels, e.g.
    /// `fissiled_sandboxes{state="lost"}`).
    pub fn metric(&self, sample: &str) -> anyhow::Result<String> {
        let [v] = self.metrics([sample])?;
        Ok(v)
    }

    /// The values of `samples` (as in [`Fissiled::metric`]) from one scrape, so counters
    /// that move together are read at the same moment.
    pub fn metrics<const N: usize>(&self, samples: [&str; N]) -> anyhow::Result<[String; N]> {
        let text = ureq::get(&format!("{}/metrics", self.base))
            .timeout(Duration::from_secs(30))
            .call()?
            .into_string()?;
        let mut out: [String; N] = std::array::from_fn(|_| String::new());
        for (o, sample) in out.iter_mut().zip(samples) {
            let prefix = format!("{sample} ");
            *o = text
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .map(|v| v.trim().to_string())
                .with_context(|| format!("no {sample} in /metrics:\n{text}"))?;
        }
        Ok(out)
    }

    /// [`Fissiled::serve_env`] with no kernel or image: nothing it is asked to start can
    /// boot (for tests of what needs no microVM).
    pub fn serve_without_guests(
        bin: &Path,
        state: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Fissiled> {
        // No namespace pool either: nothing here has a network, and making routed namespaces
        // would change this host's forwarding and NAT rules for nothing.
        let args = [
            "--kernel",
            "/nonexistent/vmlinux",
            "--rootfs",
            "/nonexistent/rootfs",
            "--netns-pool",
            "0",
        ];
        Fissiled::serve_env(bin, state, args, env)
    }

    /// [`Fissiled::serve`] with these environment variables set.
    pub fn serve_env<I, S>(
        bin: &Path,
        state: &Path,
        args: I,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Fissiled>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut line = String::new();
        let read = BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line);
        let addr = match (read, line.strip_prefix("READY ")) {
            (Ok(_), Some(addr)) => addr.trim().to_string(),
            (read, _) => {
                let _ = child.kill();
                let status = child.wait();
                anyhow::bail!(
                    "fissiled printed no readiness line ({read:?}, {status:?}): {line:?}"
                );
            }
        };
        Ok(Fissiled {
            child,
            base: format!("http://{addr}"),
        })
    }

    /// Its base URL, `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it without warning (SIGKILL), as a crash would, and reaps it.
    pub fn kill_hard(&mut self) -> std::io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(|_| ())
    }
}

impl Drop for Fissiled {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..600 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
