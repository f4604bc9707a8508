//! `fissiled`: serve the HTTP API, or manage API keys and tenants' limits.
//!
//! ```text
//! fissiled serve --state-dir /var/lib/fissiled [--listen 127.0.0.1:8080]
//! fissiled keys create --state-dir /var/lib/fissiled --tenant ops --admin  # daemon stopped
//! # then, daemon running, with that admin key: POST /v1/keys {"tenant": "acme"}
//! # (or `fissile keys create --tenant acme`)
//! fissiled tenants set --state-dir /var/lib/fissiled --tenant acme --max-sandboxes 4 \
//!     --idle-timeout-s 600 --max-lifetime-s 86400                    # daemon stopped
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fissiled::app::{App, Config};
use fissiled::db::{Db, TenantLimits};

#[derive(Debug, Parser)]
#[command(name = "fissiled", version, about = "Fissile's HTTP API daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of the `serve` variant's flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the API.
    Serve {
        /// State directory (metadata store, snapshot store, sandbox sockets).
        #[arg(long)]
        state_dir: PathBuf,
        /// Address to listen on. Loopback by default; another address exposes the API to
        /// the network and must be given explicitly.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Guest kernel [env: FISSILE_GUEST_KERNEL].
        #[arg(long, env = "FISSILE_GUEST_KERNEL")]
        kernel: PathBuf,
        /// Root image of the python-datasci template [env: FISSILE_GUEST_ROOTFS].
        #[arg(long, env = "FISSILE_GUEST_ROOTFS")]
        rootfs: PathBuf,
        /// Most sandboxes one tenant may run at once.
        #[arg(long, default_value_t = 16)]
        max_sandboxes_per_tenant: usize,
        /// Most guest memory (MiB) one tenant may run at once.
        #[arg(long, default_value_t = 16384)]
        max_memory_mib_per_tenant: u64,
        /// Most children one fork may ask for.
        #[arg(long, default_value_t = 32)]
        max_fork: u32,
        /// Largest file an upload or a download may move (bytes).
        #[arg(long, default_value_t = 1 << 30)]
        max_file_bytes: u64,
        /// Idle timeout (seconds) of sandboxes that set none; 0: none.
        #[arg(long, default_value_t = 0)]
        idle_timeout_s: u64,
        /// Longest a sandbox may run (seconds); 0: no limit.
        #[arg(long, default_value_t = 0)]
        max_lifetime_s: u64,
        /// A sandbox idle this long (seconds) is trimmed, once per idle spell: its VMM gives
        /// back the guest pages it copied (and holds in memory) that hold its snapshot
        /// image's bytes again; 0: never.
        #[arg(long, default_value_t = 10)]
        trim_after_s: u64,
        /// Most sandboxes booting or restoring at once (later creates queue); default: the
        /// number of CPUs.
        #[arg(long)]
        max_concurrent_starts: Option<usize>,
        /// A shape (`MIBxVCPUS`) whose creates restore the template's ready snapshot (booted
        /// once, warmed up: numpy, pandas, matplotlib imported) instead of booting; repeatable.
        #[arg(long = "ready-shape", value_parser = fissiled::templates::parse_shape, default_values = ["512x1"])]
        ready_shapes: Vec<(u64, u8)>,
        /// No ready snapshots: every create boots the template.
        #[arg(long)]
        no_ready_snapshots: bool,
        /// Sandboxes kept running per ready shape, restored from its ready snapshot ahead of
        /// time: a create of that shape (with no egress policy) takes one instead of
        /// restoring. Each costs a VMM and the guest memory it touches; 0: no pool.
        #[arg(long, default_value_t = 1)]
        warm_pool: usize,
        /// VMM processes started ahead of time per ready shape (in their jail, cgroup and
        /// network namespace, their KVM VM made, no guest yet): a fork of a sandbox of that
        /// shape with no egress policy puts its children into them, and a create from a
        /// snapshot or a resume with none restores into one, instead of starting new
        /// processes. Each costs a few MiB; 0: none but those forks ask for
        /// (`--standby-on-demand`).
        #[arg(long, default_value_t = 0)]
        standby_pool: usize,
        /// Most standby VMMs per ready shape started because forks asked: after a fork of n
        /// children of that shape, the pool keeps min(n, this) ready for the next fork (its
        /// largest fork since the shape last went 10 minutes without one; after such a gap,
        /// `--standby-pool` again); 0: off.
        #[arg(long, default_value_t = 4)]
        standby_on_demand: usize,
        /// The cgroup v2 directory under which every VMM gets its own cgroup (memory.max =
        /// guest RAM + overhead, pids.max, cpu.max); `none`: no cgroups. Default:
        /// /sys/fs/cgroup/fissile when run as root on a cgroup v2 host.
        #[arg(long, env = "FISSILE_CGROUP_PARENT")]
        cgroup_parent: Option<String>,
        /// `on`: every sandbox gets a network device in a network namespace of its own
        /// (reaching nothing until it has an egress policy; needs tun, veth and nftables);
        /// `off`: no network device.
        #[arg(long, value_parser = ["on", "off"], default_value = "on", env = "FISSILE_GUEST_NETWORK")]
        guest_network: String,
        /// `on`: every VMM runs in a jail (its own uid and mount namespace, no capabilities;
        /// see fissile_sandbox::jail); `off`: as this daemon's user. Default: on when run as
        /// root.
        #[arg(long, value_parser = ["on", "off"], env = "FISSILE_JAIL")]
        jail: Option<String>,
        /// The DNS resolver (`ADDR` or `ADDR:PORT`) that answers the names guests may
        /// resolve (each sandbox's resolver on its gateway forwards only those); `none`: no
        /// name resolves. Default: the first nameserver of /etc/resolv.conf.
        #[arg(long, env = "FISSILE_DNS_UPSTREAM")]
        dns_upstream: Option<String>,
        /// Most connections one sandbox may have open through the domain proxy (HTTP and
        /// TLS while its policy names domains) at once; more are closed at once.
        #[arg(long, default_value_t = 256)]
        max_proxy_connections: usize,
        /// Most connections one sandbox may have open through its NAT at once (0: no cap);
        /// the next new one is rejected like a denied address, and counted.
        #[arg(long, default_value_t = 1024)]
        guest_max_connections: u32,
        /// Bandwidth cap of one sandbox, each way, in Mbit/s (0: none); packets over it are
        /// dropped (TCP slows down to it), and counted.
        #[arg(long, default_value_t = 0)]
        guest_bandwidth_mbit: u64,
        /// Routed network namespaces (veth, NAT, rules) kept ready, so a create with a
        /// policy does not wait for one; 0: none.
        #[arg(long, default_value_t = 2)]
        netns_pool: usize,
    },
    /// Print the OpenAPI document of the API.
    Openapi,
    /// API keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Tenants' own limits (over the `serve` flags of the same name).
    Tenants {
        #[command(subcommand)]
        cmd: TenantsCmd,
    },
}

#[derive(Debug, Subcommand)]
enum TenantsCmd {
    /// Set some of a tenant's limits (the others keep their value) and print them all. The
    /// daemon must be stopped; it reads them at start.
    Set {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        /// Most sandboxes it may run at once.
        #[arg(long)]
        max_sandboxes: Option<usize>,
        /// Most guest memory (MiB) it may run at once.
        #[arg(long)]
        max_memory_mib: Option<u64>,
        /// Most children one fork may ask for.
        #[arg(long)]
        max_fork: Option<u32>,
        /// Idle timeout (seconds) of its sandboxes that set none; 0: none.
        #[arg(long)]
        idle_timeout_s: Option<u64>,
        /// Longest one of its sandboxes may run (seconds); 0: no limit.
        #[arg(long)]
        max_lifetime_s: Option<u64>,
        /// Forget its limits first (then the daemon's flags apply to what is not given).
        #[arg(long)]
        reset: bool,
    },
    /// Print every tenant's own limits, a JSON object a line.
    Ls {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Create a key for a tenant and print it (once: only its hash is stored). The daemon
    /// must be stopped (the store allows one process at a time); while it runs, an admin
    /// key creates keys over the API (`POST /v1/keys`).
    Create {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Tenant name.
        #[arg(long)]
        tenant: String,
        /// The key may also create, list and revoke keys over the API (`/v1/keys`).
        #[arg(long)]
        admin: bool,
    },
    /// Revoke a key (daemon stopped).
    Revoke {
        /// State directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// The key itself, or its id (`key_…`, as `GET /v1/keys` lists it).
        #[arg(long)]
        key: String,
    },
}

fn check_tenant_name(tenant: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        fissiled::db::valid_tenant_name(tenant),
        "a tenant name is 1-64 of [A-Za-z0-9_-]"
    );
    Ok(())
}

/// `{"tenant": ..., <its limits>}` on one line.
fn tenant_line(tenant: &str, limits: &TenantLimits) -> anyhow::Result<String> {
    let mut v = serde_json::to_value(limits)?;
    v["tenant"] = serde_json::Value::from(tenant);
    Ok(serde_json::to_string(&v)?)
}

fn open_db(state_dir: &std::path::Path) -> anyhow::Result<Db> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    Ok(Db::open(&state_dir.join("fissiled.redb"))?)
}

fn main() -> anyhow::Result<()> {
    let telemetry = fissiled::telemetry::init()?;
    let result = run(Cli::parse().cmd);
    // After the runtime is gone (the exporter's blocking client must not drop inside it).
    telemetry.shutdown();
    result
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Openapi => print!("{}", fissiled::openapi::json()),
        Cmd::Keys {
            cmd:
                KeysCmd::Create {
                    state_dir,
                    tenant,
                    admin,
                },
        } => {
            check_tenant_name(&tenant)?;
            let created = open_db(&state_dir)?.create_key(&tenant, admin)?;
            println!("{}", created.key);
        }
        Cmd::Keys {
            cmd: KeysCmd::Revoke { state_dir, key },
        } => {
            let db = open_db(&state_dir)?;
            let revoked = match fissiled::keys::is_key_id(&key) {
                true => db.revoke_key_id(&key)?.is_some(),
                false => db.revoke_key(&key)?,
            };
            anyhow::ensure!(revoked, "no such key (or already revoked)");
        }
        Cmd::Tenants {
            cmd:
                TenantsCmd::Set {
                    state_dir,
                    tenant,
                    max_sandboxes,
                    max_memory_mib,
                    max_fork,
                    idle_timeout_s,
                    max_lifetime_s,
                    reset,
                },
        } => {
            check_tenant_name(&tenant)?;
            if let Some(n) = max_fork {
                anyhow::ensure!(
                    (1..=fissile_proto::control::MAX_FORK_CHILDREN).contains(&n),
                    "--max-fork must be in 1..={}",
                    fissile_proto::control::MAX_FORK_CHILDREN
                );
            }
            let db = open_db(&state_dir)?;
            let mut limits = match reset {
                true => TenantLimits::default(),
                false => db.tenant_limits(&tenant)?.unwrap_or_default(),
            };
            let given = TenantLimits {
                max_sandboxes,
                max_memory_mib,
                max_fork,
                idle_timeout_s,
                max_lifetime_s,
            };
            limits.max_sandboxes = given.max_sandboxes.or(limits.max_sandboxes);
            limits.max_memory_mib = given.max_memory_mib.or(limits.max_memory_mib);
            limits.max_fork = given.max_fork.or(limits.max_fork);
            limits.idle_timeout_s = given.idle_timeout_s.or(limits.idle_timeout_s);
            limits.max_lifetime_s = given.max_lifetime_s.or(limits.max_lifetime_s);
            db.put_tenant_limits(&tenant, &limits)?;
            println!("{}", tenant_line(&tenant, &limits)?);
        }
        Cmd::Tenants {
            cmd: TenantsCmd::Ls { state_dir },
        } => {
            for (tenant, limits) in open_db(&state_dir)?.all_tenant_limits()? {
                println!("{}", tenant_line(&tenant, &limits)?);
            }
        }
        Cmd::Serve {
            state_dir,
            listen,
            kernel,
            rootfs,
            max_sandboxes_per_tenant,
            max_memory_mib_per_tenant,
            max_fork,
            max_file_bytes,
            idle_timeout_s,
            max_lifetime_s,
            trim_after_s,
            max_concurrent_starts,
            ready_shapes,
            no_ready_snapshots,
            warm_pool,
            standby_pool,
            standby_on_demand,
            cgroup_parent,
            guest_network,
            jail,
            dns_upstream,
            max_proxy_connections,
            guest_max_connections,
            guest_bandwidth_mbit,
            netns_pool,
        } => {
            anyhow::ensure!(
                (1..=fissile_proto::control::MAX_FORK_CHILDREN).contains(&max_fork),
                "--max-fork must be in 1..={}",
                fissile_proto::control::MAX_FORK_CHILDREN
            );
            let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
            let db = open_db(&state_dir)?;
            // from_env reads FISSILE_CGROUP_PARENT, which clap has folded into the flag.
            let mut vmm_limits = fissile_sandbox::VmmLimits::from_env();
            match cgroup_parent.as_deref() {
                None => {}
                Some("none" | "") => vmm_limits.cgroup_parent = None,
                Some(p) => vmm_limits.cgroup_parent = Some(p.into()),
            }
            // from_env read FISSILE_JAIL too; the flag wins.
            match jail.as_deref() {
                Some("on") if vmm_limits.jail.is_none() => {
                    vmm_limits.jail = Some(fissile_sandbox::jail::JailConfig::default());
                }
                Some("off") => vmm_limits.jail = None,
                _ => {}
            }
            vmm_limits.net = fissile_sandbox::net::egress::NetLimits {
                max_connections: guest_max_connections,
                bytes_per_s: guest_bandwidth_mbit.saturating_mul(1_000_000 / 8),
            };
            let dns_upstream = match dns_upstream.as_deref() {
                None => fissiled::egress::system_resolver(),
                Some("none") => None,
                Some(a) => Some(parse_resolver(a)?),
            };
            let config = Config {
                vmm_limits,
                guest_network: guest_network == "on",
                dns_upstream,
                max_proxy_connections,
                netns_pool,
                state_dir,
                vmm: fissile_sandbox::paths::find_binary("fissile-vmm")?,
                kernel,
                rootfs,
                max_sandboxes_per_tenant,
                max_memory_mib_per_tenant,
                max_fork,
                max_file_bytes,
                default_idle_timeout: secs(idle_timeout_s),
                max_lifetime: secs(max_lifetime_s),
                trim_after: secs(trim_after_s),
                boot_timeout: Duration::from_secs(300),
                max_concurrent_starts: max_concurrent_starts.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
                }),
                warm_pool,
                standby_pool,
                standby_on_demand,
                ready_shapes: if no_ready_snapshots {
                    Vec::new()
                } else {
                    ready_shapes
                },
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(serve(db, config, listen))?;
        }
    }
    Ok(())
}

/// `ADDR` (port 53) or `ADDR:PORT`.
fn parse_resolver(s: &str) -> anyhow::Result<SocketAddr> {
    s.parse::<SocketAddr>()
        .or_else(|_| {
            s.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| anyhow::anyhow!("--dns-upstream {s:?}: not ADDR or ADDR:PORT"))
}

async fn serve(db: Db, config: Config, listen: SocketAddr) -> anyhow::Result<()> {
    let app = App::start(db, config).map_err(|e| anyhow::anyhow!(e.message))?;
    app.warm_templates();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    // The stop signals are caught from before the readiness line: a supervisor that stops
    // the daemon right after it must get the graceful stop (sandboxes and snapshotd stopped,
    // spaces persisted), not the default action, which leaves them running.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    tracing::info!(%listen, "fissiled serving");
    // Readiness line for supervisors and tests.
    println!("READY {}", listener.local_addr()?);
    // No Nagle: an exec's NDJSON events are small writes, and with Nagle each one after the
    // first waits for the client's delayed ACK (~40 ms) on a kept-alive connection.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
        }
    });
    let shutdown = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    };
    // Lifecycle timers (idle timeouts, lifetime limits), warm pool and standby refills, every
    // second.
    let reaper = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n: u64 = 0;
            loop {
                tick.tick().await;
                n += 1;
                let app = app.clone();
                app.fill_pools();
                app.fill_standbys();
                let _ = tokio::task::spawn_blocking(move || {
                    app.reap_idle();
                    // Snapshots a deleted template or space left to snapshotd, each minute.
                    if n.is_multiple_of(60) {
                        app.retry_unfreed();
                    }
                })
                .await;
            }
        })
    };
    // Trims of idle sandboxes, every second, on a task of their own: each pauses a VM for a
    // moment, and a slow one must not hold up the timers and refills above.
    let trimmer = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let app = app.clone();
                let _ = tokio::task::spawn_blocking(move || app.trim_idle()).await;
            }
        })
    };
    // snapshotd, started again whenever it exits.
    let supervisor = tokio::spawn(fissiled::snapshotd::watch(app.snapshotd.clone()));
    axum::serve(listener, fissiled::routes::router(app.clone()))
        .with_graceful_shutdown(shutdown)
        .await?;
    reaper.abort();
    trimmer.abort();
    supervisor.abort();
    tracing::info!("shutting down: persisting spaces, stopping sandboxes");
    tokio::task::spawn_blocking(move || app.stop_all()).await?;
    Ok(())
}
