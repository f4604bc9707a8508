//! The host side of each sandbox's network namespace: the guest's DNS resolver and the
//! proxy that enforces a policy's domains (see `fissile_sandbox::net::egress` for the
//! policy and the redirect rule).
//!
//! Both listen on the gateway address inside the sandbox's namespace (sockets made there,
//! served by this daemon's runtime), so a sandbox is known by the socket its traffic
//! arrives on, never by an address it could forge:
//! * **DNS** (`GATEWAY:53`, UDP): a query for a name the policy allows is forwarded to the
//!   upstream resolver (`--dns-upstream`) from this daemon's namespace and the answer sent
//!   back; any other name gets REFUSED at once. A sandbox without a way out resolves
//!   nothing. At most [`DNS_IN_FLIGHT`] queries per sandbox at once (more are dropped, as a
//!   busy resolver would), answers capped at [`DNS_MAX`] bytes, each upstream wait bounded.
//!   Over TCP too (`GATEWAY:53`, what a resolver falls back to for a truncated answer):
//!   forwarded over TCP, at most 16 connections per sandbox, each idle at most 10 s.
//! * **Proxy** (`GATEWAY:15001`, TCP): connections to ports 80 and 443 are redirected here
//!   while the policy names domains. It reads the name the connection is for (Host or SNI,
//!   at most `MAX_HEAD` bytes within [`HEAD_TIMEOUT`]), resolves it itself through the same
//!   upstream (so the guest cannot pair an allowed name with an address of its choosing),
//!   checks name and address against the policy, and connects from inside the namespace (so
//!   the connection leaves from the sandbox's own address, through its NAT). A refused HTTP
//!   request gets a 403 saying why, a refused TLS handshake an `access_denied` alert. At
//!   most [`Config::max_connections`] connections per sandbox at once.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use fissile_proto::net::{DNS_PORT, GATEWAY_ADDR, PROXY_PORT};
use fissile_sandbox::NetNs;
use fissile_sandbox::net::egress::{EgressPolicy, Refusal};
use fissile_sandbox::net::sniff::{self, DnsFailure, Sniffed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// Most DNS queries of one sandbox answered at once.
pub const DNS_IN_FLIGHT: usize = 64;
/// Largest DNS message read from the guest or the upstream.
pub const DNS_MAX: usize = 4096;
/// Most DNS-over-TCP connections of one sandbox at once.
pub const DNS_TCP_CONNECTIONS: usize = 16;
/// How long a DNS-over-TCP connection may wait for its next query (or its rest).
pub const DNS_TCP_IDLE: Duration = Duration::from_secs(10);
/// How long the upstream resolver may take to answer.
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a proxied connection may take to say what it is for.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proxied connection may carry nothing either way before it is closed (so idle
/// connections do not hold the sandbox's connection permits for ever).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// A TLS alert record: fatal, `access_denied`.
const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

/// The daemon's side of every sandbox's resolver and proxy.
#[derive(Debug)]
pub struct Config {
    /// Where allowed names are resolved (none: every name fails with SERVFAIL).
    pub dns_upstream: Option<SocketAddr>,
    /// Most proxied connections of one sandbox at once.
    pub max_connections: usize,
    /// The host's own addresses (always out of reach).
    pub host_addrs: Vec<Ipv4Addr>,
    /// The runtime the services run on.
    pub runtime: tokio::runtime::Handle,
    /// Where their counts go.
    pub metrics: Arc<Metrics>,
}

/// The first `nameserver` of `/etc/resolv.conf` (this daemon's resolver), on port 53.
pub fn system_resolver() -> Option<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next())
            .flatten()
            .and_then(|a| a.parse::<std::net::IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

/// A sandbox's policy as its resolver and proxy see it (`None`: no way out), changed with
/// the namespace's rules.
#[derive(Debug, Default)]
pub struct PolicyCell(RwLock<Option<Arc<EgressPolicy>>>);

impl PolicyCell {
    /// A cell holding `policy`.
    pub fn new(policy: Option<EgressPolicy>) -> PolicyCell {
        PolicyCell(RwLock::new(policy.map(Arc::new)))
    }

    /// The policy now.
    pub fn get(&self) -> Option<Arc<EgressPolicy>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces it (the next query or connection follows it).
    pub fn set(&self, policy: Option<EgressPolicy>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = policy.map(Arc::new);
    }
}

/// A sandbox's resolver and proxy, running until dropped.
#[derive(Debug)]
pub struct Service {
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Service {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Service {
    /// Starts the resolver and the proxy of the sandbox whose namespace is `ns`.
    pub fn start(
        ns: Arc<NetNs>,
        policy: Arc<PolicyCell>,
        config: Arc<Config>,
    ) -> std::io::Result<Service> {
        let (udp, tcp) = ns
            .run(|| -> std::io::Result<_> {
                let udp = std::net::UdpSocket::bind((GATEWAY_ADDR, DNS_PORT))?;
                udp.set_nonblocking(true)?;
                let dns_tcp = std::net::TcpListener::bind((GATEWAY_ADDR, DNS_PORT))?;
                dns_tcp.set_nonblocking(true)?;
                let tcp = std::net::TcpListener::bind((GATEWAY_ADDR, PROXY_PORT))?;
                tcp.set_nonblocking(true)?;
                Ok((udp, (dns_tcp, tcp)))
            })
            .map_err(std::io::Error::other)??;
        let (dns_tcp, tcp) = tcp;
        let _rt = config.runtime.enter();
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let dns_tcp = tokio::net::TcpListener::from_std(dns_tcp)?;
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let dns = tokio::spawn(serve_dns(udp, policy.clone(), config.clone()));
        let dns_over_tcp = tokio::spawn(serve_dns_tcp(dns_tcp, policy.clone(), config.clone()));
        let proxy = tokio::spawn(serve_proxy(tcp, ns, policy, config));
        Ok(Service {
            tasks: vec![
                dns.abort_handle(),
                dns_over_tcp.abort_handle(),
                proxy.abort_handle(),
            ],
        })
    }
}

async fn serve_dns(sock: Arc<UdpSocket>, policy: Arc<PolicyCell>, config: Arc<Config>) {
    let in_flight = Arc::new(Semaphore::new(DNS_IN_FLIGHT));
    let mut buf = vec![0u8; DNS_MAX];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "dns: receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            config.metrics.dns_query("dropped");
            continue;
        };
        let query = buf[..n].to_vec();
        let (sock, policy, config) = (sock.clone(), policy.clone(), config.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = answer(&query, policy.get().as_deref(), &config, false).await {
                let _ = sock.send_to(&reply, from).await;
            }
        });
    }
}

/// Serves DNS over TCP (what a resolver falls back to when a UDP answer was truncated):
/// length-prefixed queries, each answered like one over UDP but forwarded over TCP, at most
/// [`DNS_TCP_CONNECTIONS`] connections at once, each closed after [`DNS_TCP_IDLE`] without a
/// query.
async fn serve_dns_tcp(
    listener: tokio::net::TcpListener,
    policy: Arc<PolicyCell>,
    config: Arc<Config>,
) {
    let open = Arc::new(Semaphore::new(DNS_TCP_CONNECTIONS));
    loop {
        let Some((mut conn, permit)) = accept_within(&listener, &open).await else {
            config.metrics.dns_query("dropped");
            continue;
        };
        let (policy, config) = (policy.clone(), config.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut query = vec![0u8; DNS_MAX];
            loop {
                let mut len = [0u8; 2];
                let read = tokio::time::timeout(DNS_TCP_IDLE, conn.read_exact(&mut len)).await;
                let len = match read {
                    Ok(Ok(_)) => usize::from(u16::from_be_bytes(len)),
                    _ => return,
                };
                if len == 0 || len > DNS_MAX {
                    config.metrics.dns_query("malformed");
                    return;
                }
                let read =
                    tokio::time::timeout(DNS_TCP_IDLE, conn.read_exact(&mut query[..len])).await;
                if !matches!(read, Ok(Ok(_))) {
                    return;
                }
                let Some(reply) =
                    answer(&query[..len], policy.get().as_deref(), &config, true).await
                else {
                    return;
                };
                let Ok(n) = u16::try_from(reply.len()) else {
                    return;
                };
                let mut out = n.to_be_bytes().to_vec();
                out.extend_from_slice(&reply);
                if conn.write_all(&out).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The reply to `query` under `policy` (none: the message had no header to answer),
/// forwarded over TCP when `tcp` (the client asked over TCP: a UDP answer was truncated).
async fn answer(
    query: &[u8],
    policy: Option<&EgressPolicy>,
    config: &Config,
    tcp: bool,
) -> Option<Vec<u8>> {
    let q = match sniff::dns_question(query) {
        Ok(q) => q,
        Err(e) => {
            config.metrics.dns_query("malformed");
            return e
                .id()
                .map(|id| sniff::dns_refusal(query, id, DnsFailure::Format));
        }
    };
    let verdict = policy.map_or(Err(Refusal::NotAllowed), |p| p.name_allowed(&q.name));
    if let Err(why) = verdict {
        config.metrics.dns_query(why.as_str());
        return Some(sniff::dns_refusal(query, q.id, DnsFailure::Refused));
    }
    let reply = if tcp {
        forward_tcp(query, q.id, config.dns_upstream).await
    } else {
        forward(query, q.id, config.dns_upstream).await
    };
    match reply {
        Some(reply) => {
            config.metrics.dns_query("forwarded");
            Some(reply)
        }
        None => {
            config.metrics.dns_query("upstream_failed");
            Some(sniff::dns_refusal(query, q.id, DnsFailure::Server))
        }
    }
}

/// `query`'s answer from `upstream` (the first reply with its id, within [`DNS_TIMEOUT`]).
async fn forward(query: &[u8], id: u16, upstream: Option<SocketAddr>) -> Option<Vec<u8>> {
    let upstream = upstream?;
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.ok()?;
    sock.connect(upstream).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; DNS_MAX];
    tokio::time::timeout(DNS_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await.ok()?;
            if n >= 12 && buf[..2] == id.to_be_bytes() {
                return Some(buf[..n].to_vec());
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// `query`'s answer from `upstream` over TCP (one length-prefixed exchange, at most 64 KiB
/// back, within [`DNS_TIMEOUT`]).
async fn forward_tcp(query: &[u8], id: u16, upstream: Option<SocketAddr>) -> Option<Vec<u8>> {
    let upstream = upstream?;
    let len = u16::try_from(query.len()).ok()?;
    tokio::time::timeout(DNS_TIMEOUT, async {
        let mut c = TcpStream::connect(upstream).await.ok()?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(query);
        c.write_all(&out).await.ok()?;
        let mut n = [0u8; 2];
        c.read_exact(&mut n).await.ok()?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(n))];
        c.read_exact(&mut reply).await.ok()?;
        (reply.len() >= 12 && reply[..2] == id.to_be_bytes()).then_some(reply)
    })
    .await
    .ok()
    .flatten()
}

/// The addresses `name` has (A records), from the upstream resolver.
async fn resolve(name: &str, upstream: Option<SocketAddr>) -> Vec<Ipv4Addr> {
    let id = rand_id();
    let Some(query) = sniff::a_query(id, name) else {
        return Vec::new();
    };
    match forward(&query, id, upstream).await {
        Some(reply) => sniff::a_records(&reply, id),
        None => Vec::new(),
    }
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    // If /dev/urandom cannot be read the id is 0: still a valid id, only a guessable one
    // (the reply must also come from the upstream's address to the socket's own port).
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    u16::from_ne_bytes(b)
}

async fn serve_proxy(
    listener: tokio::net::TcpListener,
    ns: Arc<NetNs>,
    policy: Arc<PolicyCell>,
    config: Arc<Config>,
) {
    let open = Arc::new(Semaphore::new(config.max_connections.max(1)));
    loop {
        let Some((guest, permit)) = accept_within(&listener, &open).await else {
            config.metrics.proxy_connection("connection_cap");
            continue;
        };
        let (ns, policy, config) = (ns.clone(), policy.clone(), config.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let verdict = proxy(guest, &ns, &policy, &config).await;
            config.metrics.proxy_connection(verdict);
        });
    }
}

/// The next connection of `listener` with a permit from `open`; `None` when all permits are
/// out (the connection is closed at once). A failed accept is retried after 10 ms.
async fn accept_within(
    listener: &tokio::net::TcpListener,
    open: &Arc<Semaphore>,
) -> Option<(TcpStream, tokio::sync::OwnedSemaphorePermit)> {
    let conn = loop {
        match listener.accept().await {
            Ok((c, _)) => break c,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let permit = open.clone().try_acquire_owned().ok()?;
    Some((conn, permit))
}

/// Serves one redirected connection; what became of it (the counter's label).
async fn proxy(
    mut guest: TcpStream,
    ns: &Arc<NetNs>,
    policy: &PolicyCell,
    config: &Config,
) -> &'static str {
    let Ok(original) = fissile_sandbox::net::original_destination(guest.as_fd()) else {
        return "no_destination";
    };
    let mut head = Vec::with_capacity(2048);
    let sniffed = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut guest, &mut head))
        .await
        .unwrap_or(Sniffed::NoName);
    let name = match sniffed {
        Sniffed::Name(n) => Some(n),
        Sniffed::NeedMore | Sniffed::NoName => None,
    };
    if head.is_empty() {
        return "empty";
    }
    let Some(policy) = policy.get() else {
        refuse(&mut guest, &head, name.as_deref(), "not_allowed").await;
        return "not_allowed";
    };
    // Plain HTTP naming one host (Host, and a target naming the same if it names any) goes
    // through as one request: the server is asked to close after answering it, so a later
    // request on the connection, for a host nobody checked, is never served. Naming none
    // (no Host, two, or a head this parser cannot read) it goes by its address as before,
    // unless the policy denies domains: then its host is unknown and it is refused.
    let forward = if head.first() != Some(&0x16) && sniff::is_http_request(&head) {
        match (&name, sniff::close_after_first_request(&head)) {
            (Some(_), Some(one)) => Some(one),
            (None, _) if policy.deny_domains.is_empty() => None,
            (None, _) => {
                refuse(&mut guest, &head, None, "no_name").await;
                return "no_name";
            }
            (Some(_), None) => {
                refuse(&mut guest, &head, name.as_deref(), "too_many_headers").await;
                return "too_many_headers";
            }
        }
    } else {
        None
    };
    let target = match &name {
        None => Ok(*original.ip()),
        Some(n) => match n.parse::<Ipv4Addr>() {
            Ok(ip) => Ok(ip),
            Err(_) if policy.deny_domains.iter().any(|d| d.matches(n)) => {
                Err(Refusal::DeniedDomain.as_str())
            }
            Err(_) => resolve(n, config.dns_upstream)
                .await
                .into_iter()
                .next()
                .ok_or("unresolved"),
        },
    };
    let decided = target.and_then(|ip| {
        policy
            .connection_allowed(name.as_deref(), ip, &config.host_addrs)
            .map(|()| ip)
            .map_err(Refusal::as_str)
    });
    let ip = match decided {
        Ok(ip) => ip,
        Err(why) => {
            refuse(&mut guest, &head, name.as_deref(), why).await;
            return why;
        }
    };
    let dest = SocketAddrV4::new(ip, original.port());
    let Ok(mut upstream) = connect_from(ns, dest).await else {
        refuse(&mut guest, &head, name.as_deref(), "connect_failed").await;
        return "connect_failed";
    };
    if upstream
        .write_all(forward.as_deref().unwrap_or(&head))
        .await
        .is_err()
    {
        return "connect_failed";
    }
    relay(guest, upstream, IDLE_TIMEOUT).await;
    "allowed"
}

/// Copies both ways until both sides are done, an error, or `idle` with no byte either way.
async fn relay(guest: TcpStream, upstream: TcpStream, idle: Duration) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let started = tokio::time::Instant::now();
    // Milliseconds since `started` of the last byte moved, either way.
    let last = Arc::new(AtomicU64::new(0));
    let (gr, gw) = guest.into_split();
    let (ur, uw) = upstream.into_split();
    let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                mut to: tokio::net::tcp::OwnedWriteHalf,
                last: Arc<AtomicU64>| async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let read = tokio::time::timeout(idle, from.read(&mut buf)).await;
            let n = match read {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => n,
                Err(_) => {
                    let quiet = started.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
                    if Duration::from_millis(quiet) >= idle {
                        break; // idle both ways
                    }
                    continue; // the other way is busy
                }
            };
            last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    let up = tokio::spawn(pump(gr, uw, last.clone()));
    let down = pump(ur, gw, last);
    down.await;
    // The guest's side ends with the download; its upload half gets the same idle bound.
    let _ = up.await;
}

/// Reads until the name is known (or there is none), at most `MAX_HEAD` bytes.
async fn read_head(guest: &mut TcpStream, head: &mut Vec<u8>) -> Sniffed {
    let mut buf = [0u8; 4096];
    loop {
        match sniff::requested_name(head) {
            Sniffed::NeedMore if head.len() < sniff::MAX_HEAD => {}
            Sniffed::NeedMore => return Sniffed::NoName,
            done => return done,
        }
        let room = (sniff::MAX_HEAD - head.len()).min(buf.len());
        match guest.read(&mut buf[..room]).await {
            Ok(0) | Err(_) => return Sniffed::NoName,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
}

/// Tells the guest why (a 403 for HTTP, an alert for TLS) and closes.
async fn refuse(guest: &mut TcpStream, head: &[u8], name: Option<&str>, why: &str) {
    if head.first() == Some(&0x16) {
        let _ = guest.write_all(&TLS_ACCESS_DENIED).await;
    } else {
        let body = format!(
            "fissile: the sandbox's network policy refuses this connection ({why}{})\n",
            name.map(|n| format!(": {n}")).unwrap_or_default()
        );
        let reply = format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = guest.write_all(reply.as_bytes()).await;
    }
    let _ = guest.shutdown().await;
}

/// A connection to `dest` from inside the sandbox's namespace, within [`CONNECT_TIMEOUT`].
async fn connect_from(ns: &Arc<NetNs>, dest: SocketAddrV4) -> std::io::Result<TcpStream> {
    let ns = ns.clone();
    let socket = tokio::task::spawn_blocking(move || ns.tcp_socket())
        .await
        .map_err(std::io::Error::other)??;
    let socket = tokio::net::TcpSocket::from_std_stream(socket);
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dest.into()))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}
