//! A sandbox namespace's way out: a veth pair to the host, NAT inside the namespace, and an
//! egress policy enforced there (nftables), out of the guest's reach.
//!
//! Each namespace gets a slot `n` and the link `10.200.0.0/16`'s `n`-th /30: the host end
//! (`fsl-h<n>`, `.1`) and the namespace end (`veth0`, `.2`), the namespace's default route via
//! the host end. The guest's traffic is forwarded from the tap to `veth0` and masqueraded
//! there, so every sandbox reaches the host network from an address of its own while the
//! guest keeps the same address everywhere. On the host, forwarding is on and traffic from
//! the uplinks is masqueraded when it leaves by the interface of the host's default route.
//!
//! Policy, checked in order for every new connection the guest opens (replies pass):
//! 1. always rejected: the host's own addresses, loopback, link-local (cloud metadata), the
//!    uplink range (the host's ends and every other sandbox), multicast and reserved ranges;
//! 2. rejected: the policy's `deny` list;
//! 3. accepted: the policy's `allow` list, or anything when it is empty and `internet` is on;
//! 4. everything else rejected.
//!
//! A rejection answers the guest with ICMP "administratively prohibited" (a clear, immediate
//! error, not a timeout) and counts in the namespace's `blocked` counter. The policy lives in
//! sets, so a change is one atomic nftables transaction and the counters stay.
//!
//! Domains: the guest's resolver is the gateway ([`fissile_proto::net::DNS_PORT`]), where
//! the orchestrator serves a forwarder that answers only names the policy allows
//! ([`EgressPolicy::name_allowed`]). While a policy names domains, the guest's connections
//! to the HTTP and TLS ports ([`fissile_proto::net::PROXIED_PORTS`]) are redirected to the
//! orchestrator's proxy on the gateway ([`fissile_proto::net::PROXY_PORT`]), which reads the
//! name the connection is for (Host, SNI: [`super::sniff`]), resolves it itself and decides
//! with [`EgressPolicy::connection_allowed`]: so a guest cannot reach a denied domain by its
//! address, nor an undenied address under an allowed name.

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::route::RouteAttribute;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder, new_connection};

use super::{NetNs, NetNsError, on_thread};
use fissile_proto::net::{PROXIED_PORTS, PROXY_PORT, TAP_NAME};

/// The uplinks' range: a /30 per sandbox namespace.
pub const UPLINK_NET: Cidr = Cidr {
    addr: Ipv4Addr::new(10, 200, 0, 0),
    prefix: 16,
};
/// How many namespaces can have an uplink at once.
pub const MAX_SLOTS: u32 = 1 << 14;
/// The uplink's name inside a namespace.
pub const NS_UPLINK: &str = "veth0";
/// How long `nft` may take to apply a ruleset.
const NFT_TIMEOUT: Duration = Duration::from_secs(20);

/// An IPv4 network, written `a.b.c.d/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    /// The network of `addr` with `prefix` bits (host bits are cleared).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Cidr, String> {
        if prefix > 32 {
            return Err(format!("prefix /{prefix} is longer than 32 bits"));
        }
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        Ok(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// True when `ip` is in this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        Cidr::new(ip, self.prefix).is_ok_and(|c| c.addr == self.addr)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>().map_err(|_| format!("{s:?}: bad prefix"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address or network"))?;
        Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A domain name in a policy: `example.com` matches that name and every name under it;
/// `*.example.com` only the names under it. Lower case, no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Domain {
    name: String,
    subdomains_only: bool,
}

impl Domain {
    /// True when `name` (any case, trailing dot or not) is this domain or under it.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        let under = name.len() > self.name.len()
            && name.ends_with(&self.name)
            && name.as_bytes()[name.len() - self.name.len() - 1] == b'.';
        under || (!self.subdomains_only && name == self.name)
    }
}

impl FromStr for Domain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (subdomains_only, rest) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "{s:?} is not a domain name (letters, digits, '-', '_' in dot-separated labels; \
                 `*.` in front for subdomains only)"
            ));
        }
        if name.parse::<Ipv4Addr>().is_ok() {
            return Err(format!("{s:?} is an address: put it in the CIDR lists"));
        }
        Ok(Domain {
            name,
            subdomains_only,
        })
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subdomains_only {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)
    }
}

/// What a sandbox may reach (see the module docs for the order of the checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Reach anything not denied (when `allow` is empty). Off: only `allow`.
    pub internet: bool,
    /// Only these, when not empty.
    pub allow: Vec<Cidr>,
    /// Never these.
    pub deny: Vec<Cidr>,
    /// These names resolve, and HTTP/TLS connections for them pass (to the addresses they
    /// resolve to, unless always denied or in `deny`) whatever `internet` and `allow` say.
    /// When not empty, other names do not resolve.
    pub allow_domains: Vec<Domain>,
    /// These names never resolve, and HTTP/TLS connections for them are refused.
    pub deny_domains: Vec<Domain>,
}

impl Default for EgressPolicy {
    fn default() -> Self {
        EgressPolicy {
            internet: true,
            allow: Vec::new(),
            deny: Vec::new(),
            allow_domains: Vec::new(),
            deny_domains: Vec::new(),
        }
    }
}

/// Why a connection or a name was refused (what the guest is told, and the counter's label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The address is always out of reach (the host, loopback, link-local, other sandboxes).
    AlwaysDenied,
    /// The address is in the policy's `deny` list.
    DeniedAddress,
    /// The name is in the policy's `deny_domains` list.
    DeniedDomain,
    /// Neither an allowed name nor an allowed address.
    NotAllowed,
}

impl Refusal {
    /// A short label (metrics, guest-visible messages).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::AlwaysDenied => "always_denied",
            Refusal::DeniedAddress => "denied_address",
            Refusal::DeniedDomain => "denied_domain",
            Refusal::NotAllowed => "not_allowed",
        }
    }
}

/// Caps on a sandbox's traffic, set when its namespace gets its way out (the daemon's
/// configuration, not the tenant's policy). 0: no cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetLimits {
    /// Most connections the guest may have open through the namespace's NAT at once (the
    /// proxy has its own cap); the next new one is rejected like a denied address.
    pub max_connections: u32,
    /// Bytes per second each way (guest to the world, and back); packets over it are
    /// dropped, so TCP slows down to it.
    pub bytes_per_s: u64,
}

/// What a namespace's rules counted since it got its way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EgressCounters {
    /// New connections the policy rejected.
    pub blocked_connections: u64,
    /// New connections rejected because [`NetLimits::max_connections`] were open.
    pub connection_cap_hits: u64,
    /// Packets dropped over [`NetLimits::bytes_per_s`].
    pub rate_dropped_packets: u64,
    /// Their bytes.
    pub rate_dropped_bytes: u64,
}

impl EgressPolicy {
    /// True when the policy names domains (so HTTP and TLS go through the proxy).
    pub fn has_domains(&self) -> bool {
        !self.allow_domains.is_empty() || !self.deny_domains.is_empty()
    }

    /// Whether the guest's resolver answers `name`: never for a denied domain; with an
    /// allow list of domains only for those; otherwise when the sandbox may reach anything
    /// at all (a sandbox with no way out learns nothing, and leaks nothing, through DNS).
    pub fn name_allowed(&self, name: &str) -> Result<(), Refusal> {
        if self.deny_domains.iter().any(|d| d.matches(name)) {
            return Err(Refusal::DeniedDomain);
        }
        if !self.allow_domains.is_empty() {
            return if self.allow_domains.iter().any(|d| d.matches(name)) {
                Ok(())
            } else {
                Err(Refusal::NotAllowed)
            };
        }
        if self.internet || !self.allow.is_empty() {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }

    /// Whether the proxy may connect to `ip` for a connection the guest opened for `name`
    /// (none: the guest named nothing, so only the address counts). `host_addrs` are the
    /// host's own addresses (always denied).
    pub fn connection_allowed(
        &self,
        name: Option<&str>,
        ip: Ipv4Addr,
        host_addrs: &[Ipv4Addr],
    ) -> Result<(), Refusal> {
        if let Some(n) = name
            && self.deny_domains.iter().any(|d| d.matches(n))
        {
            return Err(Refusal::DeniedDomain);
        }
        if host_addrs.contains(&ip) || always_denied().iter().any(|c| c.contains(ip)) {
            return Err(Refusal::AlwaysDenied);
        }
        if self.deny.iter().any(|c| c.contains(ip)) {
            return Err(Refusal::DeniedAddress);
        }
        if let Some(n) = name
            && self.allow_domains.iter().any(|d| d.matches(n))
        {
            return Ok(());
        }
        let by_address = if self.allow.is_empty() {
            self.internet
        } else {
            self.allow.iter().any(|c| c.contains(ip))
        };
        if by_address {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }
}

/// Setting up or changing a namespace's way out failed; names the step.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    /// Every uplink slot is taken.
    #[error("no free uplink slot (all {MAX_SLOTS} in use)")]
    NoSlot,
    /// A netlink request failed.
    #[error("uplink: {step}")]
    Netlink {
        /// What was being done.
        step: String,
        /// Cause.
        #[source]
        source: rtnetlink::Error,
    },
    /// The netlink connection or its runtime could not be made.
    #[error("uplink: netlink connection")]
    Connection(#[source] std::io::Error),
    /// Entering the namespace or a worker thread failed.
    #[error("uplink")]
    Ns(#[from] NetNsError),
    /// `nft` failed or could not run.
    #[error("nftables ({what}): {message}")]
    Nft {
        /// Which ruleset.
        what: &'static str,
        /// Its error output, or why it did not run.
        message: String,
    },
    /// A sysctl could not be set.
    #[error("setting {0}")]
    Sysctl(&'static str, #[source] std::io::Error),
}

fn nl(step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> EgressError {
    let step = step.into();
    move |source| EgressError::Netlink { step, source }
}

/// Runs `f` with a netlink handle on a fresh current-thread runtime (callers may be on a
/// tokio worker: the runtime lives on the calling thread only for this call).
fn with_netlink<T>(
    f: impl AsyncFnOnce(&Handle) -> Result<T, EgressError>,
) -> Result<T, EgressError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(EgressError::Connection)?;
    rt.block_on(async move {
        let (conn, handle, _) = new_connection().map_err(EgressError::Connection)?;
        let task = tokio::spawn(conn);
        let out = f(&handle).await;
        task.abort();
        out
    })
}

async fn link_index(handle: &Handle, name: &str) -> Result<u32, EgressError> {
    let found = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(nl(format!("finding link {name}")))?;
    found
        .map(|l| l.header.index)
        .ok_or_else(|| EgressError::Netlink {
            step: format!("finding link {name}"),
            source: rtnetlink::Error::RequestFailed,
        })
}

/// One end of a veth pair: its name and address on a link of `prefix` bits.
#[derive(Debug, Clone)]
pub struct VethEnd {
    /// Interface name.
    pub name: String,
    /// Its address.
    pub addr: Ipv4Addr,
}

/// Connects `ns` to this thread's namespace with a veth pair on a /`prefix` link: `host`
/// here, `inner` in `ns`, both up; `ns` routes everything via the host end when
/// `default_route`. `temp` is the inner end's name before it moves (unique on this side).
pub fn link_namespace(
    ns: &NetNs,
    host: &VethEnd,
    inner: &VethEnd,
    temp: &str,
    prefix: u8,
    default_route: bool,
) -> Result<(), EgressError> {
    let fd = ns.raw_fd();
    on_thread(|| {
        with_netlink(async |h| {
            h.link()
                .add(LinkVeth::new(&host.name, temp).build())
                .execute()
                .await
                .map_err(nl(format!("creating veth {} / {temp}", host.name)))?;
            let peer = link_index(h, temp).await?;
            h.link()
                .set(LinkUnspec::new_with_index(peer).setns_by_fd(fd).build())
                .execute()
                .await
                .map_err(nl(format!("moving {temp} into the namespace")))?;
            let index = link_index(h, &host.name).await?;
            h.address()
                .add(index, IpAddr::V4(host.addr), prefix)
                .execute()
                .await
                .map_err(nl(format!("addressing {}", host.name)))?;
            h.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(nl(format!("bringing {} up", host.name)))
        })
    })??;
    ns.run(|| {
        with_netlink(async |h| {
            let index = link_index(h, temp).await?;
            h.link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .name(inner.name.clone())
                        .build(),
                )
                .execute()
                .await
                .map_err(nl(format!("renaming {temp} to {}", inner.name)))?;
            h.address()
                .add(index, IpAddr::V4(inner.addr), prefix)
                .execute()
                .await
                .map_err(nl(format!("addressing {}", inner.name)))?;
            h.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(nl(format!("bringing {} up", inner.name)))?;
            if default_route {
                h.route()
                    .add(
                        RouteMessageBuilder::<Ipv4Addr>::new()
                            .gateway(host.addr)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(nl("adding the default route"))?;
            }
            Ok(())
        })
    })?
}

/// Taken uplink slots in this process.
static SLOTS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// A namespace's uplink slot, released when dropped (the veth pair goes with the namespace).
#[derive(Debug)]
pub struct Uplink {
    slot: u32,
}

impl Uplink {
    /// The slot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The host end's address.
    pub fn host_addr(&self) -> Ipv4Addr {
        slot_addr(self.slot, 1)
    }

    /// The namespace end's address (the sandbox's source address on the host network).
    pub fn ns_addr(&self) -> Ipv4Addr {
        slot_addr(self.slot, 2)
    }

    /// The host end's interface name.
    pub fn host_name(&self) -> String {
        format!("fsl-h{}", self.slot)
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        SLOTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.slot);
    }
}

fn slot_addr(slot: u32, host: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(UPLINK_NET.addr) + slot * 4 + host)
}

fn take_slot(skip: &BTreeSet<u32>) -> Result<Uplink, EgressError> {
    let mut slots = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
    let slot = (0..MAX_SLOTS)
        .find(|s| !slots.contains(s) && !skip.contains(s))
        .ok_or(EgressError::NoSlot)?;
    slots.insert(slot);
    Ok(Uplink { slot })
}

/// Gives `ns` (holding the guest's tap) its uplink and `policy`. A slot whose interface
/// name another process holds is skipped.
pub fn connect(
    ns: &NetNs,
    policy: &EgressPolicy,
    limits: NetLimits,
) -> Result<Uplink, EgressError> {
    host_setup()?;
    let host_addrs = host_addresses()?;
    let mut busy = BTreeSet::new();
    let uplink = loop {
        let uplink = take_slot(&busy)?;
        let host = VethEnd {
            name: uplink.host_name(),
            addr: uplink.host_addr(),
        };
        let inner = VethEnd {
            name: NS_UPLINK.into(),
            addr: uplink.ns_addr(),
        };
        match link_namespace(
            ns,
            &host,
            &inner,
            &format!("fsl-n{}", uplink.slot),
            30,
            true,
        ) {
            Ok(()) => break uplink,
            Err(EgressError::Netlink { source, .. })
                if matches!(&source, rtnetlink::Error::NetlinkError(m)
                    if m.raw_code() == -libc::EEXIST) =>
            {
                busy.insert(uplink.slot);
            }
            Err(e) => return Err(e),
        }
    };
    ns.run(|| set_sysctl("/proc/sys/net/ipv4/ip_forward", "1"))??;
    nft_in(
        Some(ns),
        "the sandbox namespace's ruleset",
        &ns_ruleset(policy, &host_addrs, limits),
    )?;
    Ok(uplink)
}

/// Replaces `ns`'s policy (one transaction; counters stay).
pub fn set_policy(ns: &NetNs, policy: &EgressPolicy) -> Result<(), EgressError> {
    let host_addrs = host_addresses()?;
    let mut script = String::from(
        "flush set ip fissile always_denied\nflush set ip fissile denied\nflush set ip fissile allowed\nflush set ip fissile proxied\n",
    );
    script.push_str(&policy_elements(policy, &host_addrs));
    nft_in(Some(ns), "a policy change", &script)
}

/// What `ns`'s rules counted so far (its named counters, read over netlink from inside it:
/// no process); zeroes when it has no rules (an isolated namespace, with no way out).
pub fn counters(ns: &NetNs) -> Result<EgressCounters, EgressError> {
    let named = ns
        .run(|| super::nft_counters::read("fissile"))?
        .map_err(|e| EgressError::Nft {
            what: "reading counters",
            message: fissile_proto::error_chain(&e),
        })?;
    Ok(egress_counters(&named))
}

/// Our counters among a table's named counters.
fn egress_counters(named: &[super::nft_counters::NamedCounter]) -> EgressCounters {
    let mut c = EgressCounters::default();
    for n in named {
        match n.name.as_str() {
            "blocked" => c.blocked_connections = n.packets,
            "conn_limited" => c.connection_cap_hits = n.packets,
            "rate_dropped" => (c.rate_dropped_packets, c.rate_dropped_bytes) = (n.packets, n.bytes),
            _ => {}
        }
    }
    c
}

/// The ranges always out of reach, besides the host's own addresses.
pub fn always_denied() -> Vec<Cidr> {
    [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    ]
    .iter()
    .filter_map(|c| c.parse().ok())
    .chain(std::iter::once(UPLINK_NET))
    .collect()
}

fn elements(cidrs: impl IntoIterator<Item = Cidr>) -> String {
    cidrs
        .into_iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `add element` lines for the three sets (none for an empty set).
fn policy_elements(policy: &EgressPolicy, host_addrs: &[Ipv4Addr]) -> String {
    let always: BTreeSet<Cidr> = always_denied()
        .into_iter()
        .chain(host_addrs.iter().filter_map(|a| Cidr::new(*a, 32).ok()))
        .collect();
    let allowed: Vec<Cidr> = if !policy.allow.is_empty() {
        policy.allow.clone()
    } else if policy.internet {
        vec![Cidr {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
        }]
    } else {
        Vec::new()
    };
    let mut s = String::new();
    for (set, cidrs) in [
        ("always_denied", always.into_iter().collect::<Vec<_>>()),
        ("denied", policy.deny.clone()),
        ("allowed", allowed),
    ] {
        if !cidrs.is_empty() {
            s.push_str(&format!(
                "add element ip fissile {set} {{ {} }}\n",
                elements(cidrs)
            ));
        }
    }
    if policy.has_domains() {
        let ports: Vec<String> = PROXIED_PORTS.iter().map(u16::to_string).collect();
        s.push_str(&format!(
            "add element ip fissile proxied {{ {} }}\n",
            ports.join(", ")
        ));
    }
    s
}

/// The namespace's whole ruleset (replacing any earlier one, atomically).
fn ns_ruleset(policy: &EgressPolicy, host_addrs: &[Ipv4Addr], limits: NetLimits) -> String {
    // Rate caps: one token bucket each way, shared by the forwarded path (NAT) and the path
    // to the proxy on the gateway, so neither doubles the cap.
    let (rate_objects, up, down) = if limits.bytes_per_s > 0 {
        let r = limits.bytes_per_s;
        let burst = (r / 4).max(64 * 1024);
        (
            format!(
                "\tlimit guest_up {{ rate over {r} bytes/second burst {burst} bytes; }}\n\
                 \tlimit guest_down {{ rate over {r} bytes/second burst {burst} bytes; }}\n"
            ),
            format!(
                "\t\tiifname \"{TAP_NAME}\" limit name \"guest_up\" counter name \"rate_dropped\" drop\n"
            ),
            format!(
                "\t\toifname \"{TAP_NAME}\" limit name \"guest_down\" counter name \"rate_dropped\" drop\n"
            ),
        )
    } else {
        (String::new(), String::new(), String::new())
    };
    let conn_cap = if limits.max_connections > 0 {
        format!(
            "\t\tct count over {} counter name \"conn_limited\" reject with icmp type admin-prohibited\n",
            limits.max_connections
        )
    } else {
        String::new()
    };
    let mut s = format!(
        "table ip fissile\n\
         delete table ip fissile\n\
         table ip fissile {{\n\
         \tcounter blocked {{ }}\n\
         \tcounter allowed {{ }}\n\
         \tcounter conn_limited {{ }}\n\
         \tcounter rate_dropped {{ }}\n\
         {rate_objects}\
         \tset always_denied {{ type ipv4_addr; flags interval; auto-merge; }}\n\
         \tset denied {{ type ipv4_addr; flags interval; auto-merge; }}\n\
         \tset allowed {{ type ipv4_addr; flags interval; auto-merge; }}\n\
         \tset proxied {{ type inet_service; }}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname \"{TAP_NAME}\" tcp dport @proxied redirect to :{PROXY_PORT}\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         {up}\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype filter hook output priority filter; policy accept;\n\
         {down}\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy drop;\n\
         {up}{down}\
         \t\tct state established,related accept\n\
         \t\tiifname != \"{TAP_NAME}\" drop\n\
         \t\toifname != \"{NS_UPLINK}\" drop\n\
         \t\tip daddr @always_denied counter name \"blocked\" reject with icmp type admin-prohibited\n\
         \t\tip daddr @denied counter name \"blocked\" reject with icmp type admin-prohibited\n\
         {conn_cap}\
         \t\tip daddr @allowed counter name \"allowed\" accept\n\
         \t\tcounter name \"blocked\" reject with icmp type admin-prohibited\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{NS_UPLINK}\" masquerade\n\
         \t}}\n\
         }}\n"
    );
    s.push_str(&policy_elements(policy, host_addrs));
    s
}

/// The host's side, once per process: forwarding on, and masquerading of the uplinks'
/// traffic out of the default route's interface (when there is one).
fn host_setup() -> Result<(), EgressError> {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return Ok(());
    }
    on_thread(|| set_sysctl("/proc/sys/net/ipv4/ip_forward", "1"))??;
    let default_dev = on_thread(|| with_netlink(async |h| default_route_dev(h).await))??;
    let mut script = String::from("table ip fissile_host\ndelete table ip fissile_host\n");
    if let Some(dev) = default_dev {
        script.push_str(&format!(
            "table ip fissile_host {{\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {UPLINK_NET} oifname \"{dev}\" masquerade\n\
             \t}}\n\
             }}\n"
        ));
    }
    nft_in(None, "the host's masquerade", &script)?;
    *done = true;
    Ok(())
}

async fn default_route_dev(h: &Handle) -> Result<Option<String>, EgressError> {
    let mut routes = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    let mut oif = None;
    while let Some(r) = routes
        .try_next()
        .await
        .map_err(nl("listing the host's routes"))?
    {
        if r.header.destination_prefix_length == 0 {
            oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            break;
        }
    }
    let Some(index) = oif else { return Ok(None) };
    let mut links = h.link().get().match_index(index).execute();
    let link = links
        .try_next()
        .await
        .map_err(nl("naming the default route's interface"))?;
    Ok(link.and_then(|l| {
        l.attributes.into_iter().find_map(|a| match a {
            rtnetlink::packet_route::link::LinkAttribute::IfName(n) => Some(n),
            _ => None,
        })
    }))
}

/// Every IPv4 address of the host's interfaces (the root namespace's, as this process sees
/// them).
pub fn host_addresses() -> Result<Vec<Ipv4Addr>, EgressError> {
    on_thread(|| {
        with_netlink(async |h| {
            let mut addrs = h.address().get().execute();
            let mut out = Vec::new();
            while let Some(a) = addrs
                .try_next()
                .await
                .map_err(nl("listing the host's addresses"))?
            {
                for attr in a.attributes {
                    if let AddressAttribute::Address(IpAddr::V4(v4)) = attr {
                        out.push(v4);
                    }
                }
            }
            Ok(out)
        })
    })?
}

fn set_sysctl(path: &'static str, value: &str) -> Result<(), EgressError> {
    std::fs::write(path, value).map_err(|e| EgressError::Sysctl(path, e))
}

/// The `nft` program: `$FISSILE_NFT`, else the first on `PATH`, `/usr/sbin` or `/sbin`.
fn nft_program() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("FISSILE_NFT") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("nft"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "nft".into())
}

fn nft_command(ns: Option<&NetNs>) -> Command {
    let mut cmd = Command::new(nft_program());
    if let Some(ns) = ns {
        ns.enter_on_spawn(&mut cmd);
    }
    cmd
}

/// Runs `nft -f -` with `script` (inside `ns` when given), bounded by [`NFT_TIMEOUT`].
fn nft_in(ns: Option<&NetNs>, what: &'static str, script: &str) -> Result<(), EgressError> {
    let fail = |message: String| EgressError::Nft { what, message };
    let mut child = nft_command(ns)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            fail(format!(
                "cannot run nft ({e}); install the nftables package"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| fail(format!("writing the ruleset: {e}")))?;
    }
    let status = wait_bounded(&mut child).map_err(fail)?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        return Err(fail(format!(
            "{status}: {}\nruleset:\n{script}",
            err.trim()
        )));
    }
    Ok(())
}

fn wait_bounded(child: &mut std::process::Child) -> Result<std::process::ExitStatus, String> {
    let deadline = std::time::Instant::now() + NFT_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("nft did not finish within {NFT_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("waiting for nft: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_normalize_and_refuse_nonsense() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(Ipv4Addr::new(10, 9, 9, 9)));
        assert!(!c.contains(Ipv4Addr::new(11, 0, 0, 1)));
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().to_string(), "1.2.3.4/32");
        for bad in ["1.2.3/8", "1.2.3.4/33", "x", "1.2.3.4/"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn domains_parse_and_match_names_and_subdomains() {
        let d: Domain = "Example.COM.".parse().unwrap();
        assert_eq!(d.to_string(), "example.com");
        assert!(d.matches("example.com") && d.matches("WWW.example.com."));
        assert!(!d.matches("badexample.com") && !d.matches("example.com.evil"));
        let sub: Domain = "*.example.com".parse().unwrap();
        assert!(sub.matches("a.b.example.com") && !sub.matches("example.com"));
        for bad in [
            "", "*.", "a..b", "-a.com", "a b.com", "1.2.3.4", "x/y", "*.*.a",
        ] {
            assert!(bad.parse::<Domain>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_and_connections_follow_the_policy_in_order() {
        let host = [Ipv4Addr::new(192, 168, 1, 5)];
        let ip = Ipv4Addr::new(198, 51, 100, 2);
        let dom = |s: &str| s.parse::<Domain>().unwrap();
        // Only allowed names, even with no internet; other names and bare addresses not.
        let only = EgressPolicy {
            internet: false,
            allow_domains: vec![dom("files.test")],
            ..EgressPolicy::default()
        };
        assert!(only.has_domains());
        assert_eq!(only.name_allowed("cdn.files.test"), Ok(()));
        assert_eq!(only.name_allowed("other.test"), Err(Refusal::NotAllowed));
        assert_eq!(
            only.connection_allowed(Some("files.test"), ip, &host),
            Ok(())
        );
        assert_eq!(
            only.connection_allowed(Some("other.test"), ip, &host),
            Err(Refusal::NotAllowed)
        );
        assert_eq!(
            only.connection_allowed(None, ip, &host),
            Err(Refusal::NotAllowed)
        );
        // An allowed name never reaches an always-denied or denied address.
        for (addr, why) in [
            (host[0], Refusal::AlwaysDenied),
            (Ipv4Addr::LOCALHOST, Refusal::AlwaysDenied),
            (Ipv4Addr::new(169, 254, 169, 254), Refusal::AlwaysDenied),
            (Ipv4Addr::new(10, 200, 0, 6), Refusal::AlwaysDenied),
        ] {
            assert_eq!(
                only.connection_allowed(Some("files.test"), addr, &host),
                Err(why)
            );
        }
        let mut deny_ip = only.clone();
        deny_ip.deny = vec!["198.51.100.0/24".parse().unwrap()];
        assert_eq!(
            deny_ip.connection_allowed(Some("files.test"), ip, &host),
            Err(Refusal::DeniedAddress)
        );
        // Open internet minus one domain.
        let minus = EgressPolicy {
            deny_domains: vec![dom("blocked.test")],
            ..EgressPolicy::default()
        };
        assert_eq!(minus.name_allowed("ok.test"), Ok(()));
        assert_eq!(
            minus.name_allowed("x.Blocked.test."),
            Err(Refusal::DeniedDomain)
        );
        assert_eq!(
            minus.connection_allowed(Some("blocked.test"), ip, &host),
            Err(Refusal::DeniedDomain)
        );
        assert_eq!(minus.connection_allowed(Some("ok.test"), ip, &host), Ok(()));
        assert_eq!(minus.connection_allowed(None, ip, &host), Ok(()));
        // No way out: no names either.
        let closed = EgressPolicy {
            internet: false,
            ..EgressPolicy::default()
        };
        assert!(!closed.has_domains());
        assert_eq!(closed.name_allowed("ok.test"), Err(Refusal::NotAllowed));
    }

    #[test]
    fn domains_in_a_policy_redirect_http_and_tls_to_the_proxy() {
        let host = [Ipv4Addr::new(192, 168, 1, 5)];
        assert!(!policy_elements(&EgressPolicy::default(), &host).contains("proxied"));
        let named = EgressPolicy {
            deny_domains: vec!["blocked.test".parse().unwrap()],
            ..EgressPolicy::default()
        };
        let s = policy_elements(&named, &host);
        assert!(
            s.contains("add element ip fissile proxied { 80, 443 }"),
            "{s}"
        );
        let rules = ns_ruleset(&named, &host, NetLimits::default());
        assert!(
            rules.contains(&format!("tcp dport @proxied redirect to :{PROXY_PORT}")),
            "{rules}"
        );
    }

    #[test]
    fn limits_become_shared_buckets_and_a_connection_count() {
        let host = [Ipv4Addr::new(192, 168, 1, 5)];
        let none = ns_ruleset(&EgressPolicy::default(), &host, NetLimits::default());
        assert!(
            !none.contains("limit name") && !none.contains("ct count"),
            "{none}"
        );
        let capped = ns_ruleset(
            &EgressPolicy::default(),
            &host,
            NetLimits {
                max_connections: 8,
                bytes_per_s: 1_000_000,
            },
        );
        assert!(
            capped
                .contains("limit guest_up { rate over 1000000 bytes/second burst 250000 bytes; }"),
            "{capped}"
        );
        // Each bucket is used on the forwarded path and on the path to the gateway.
        assert_eq!(
            capped.matches("limit name \"guest_up\"").count(),
            2,
            "{capped}"
        );
        assert_eq!(
            capped.matches("limit name \"guest_down\"").count(),
            2,
            "{capped}"
        );
        let cap_at = capped.find("ct count over 8").unwrap();
        assert!(
            capped.find("@denied").unwrap() < cap_at && cap_at < capped.find("@allowed").unwrap()
        );
        // Rate drops come before the established-connection shortcut.
        assert!(capped.find("limit name").unwrap() < capped.find("ct state established").unwrap());
    }

    #[test]
    fn counters_are_read_from_the_kernel_in_the_namespace_and_missing_rules_are_zeroes() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert!(
            euid == 0,
            "network namespaces and nftables need root: run the tests as root"
        );
        let ns = NetNs::create().unwrap();
        assert_eq!(
            counters(&ns).unwrap(),
            EgressCounters::default(),
            "no table yet"
        );
        // Counter objects may be made with values: the kernel then holds exactly these.
        nft_in(
            Some(&ns),
            "a test table",
            "table ip fissile {\n\tcounter blocked { packets 3 bytes 180 }\n\
             \tcounter allowed { packets 9 bytes 540 }\n\
             \tcounter conn_limited { packets 2 bytes 120 }\n\
             \tcounter rate_dropped { packets 40 bytes 60000 }\n}\n",
        )
        .unwrap();

        let read = counters(&ns).unwrap();

        assert_eq!(
            read,
            EgressCounters {
                blocked_connections: 3,
                connection_cap_hits: 2,
                rate_dropped_packets: 40,
                rate_dropped_bytes: 60000,
            }
        );
        // This host's own table (if any) is not what was read: the namespace's is.
        let host = super::super::nft_counters::read("fissile").unwrap();
        assert!(
            !host
                .iter()
                .any(|c| c.name == "allowed" && c.packets == 9 && c.bytes == 540)
        );
    }

    #[test]
    fn uplink_addresses_are_a_30_per_slot() {
        assert_eq!(slot_addr(0, 1), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(slot_addr(0, 2), Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(slot_addr(70, 2), Ipv4Addr::new(10, 200, 1, 26));
        assert!(UPLINK_NET.contains(slot_addr(MAX_SLOTS - 1, 2)));
    }

    #[test]
    fn the_policy_becomes_set_elements() {
        let host = [Ipv4Addr::new(192, 168, 1, 5)];
        let open = policy_elements(&EgressPolicy::default(), &host);
        assert!(open.contains("allowed { 0.0.0.0/0 }"), "{open}");
        assert!(
            open.contains("192.168.1.5/32"),
            "host addresses always denied: {open}"
        );
        assert!(open.contains("169.254.0.0/16") && open.contains("10.200.0.0/16"));
        assert!(
            !open.contains(" denied {"),
            "an empty deny list adds nothing"
        );

        let closed = EgressPolicy {
            internet: false,
            ..EgressPolicy::default()
        };
        assert!(!policy_elements(&closed, &host).contains("allowed"));

        let listed = EgressPolicy {
            internet: false,
            allow: vec!["203.0.113.0/24".parse().unwrap()],
            deny: vec!["203.0.113.7".parse().unwrap()],
            ..EgressPolicy::default()
        };
        let s = policy_elements(&listed, &host);
        assert!(s.contains("allowed { 203.0.113.0/24 }"), "{s}");
        assert!(s.contains("denied { 203.0.113.7/32 }"), "{s}");
        let rules = ns_ruleset(&listed, &host, NetLimits::default());
        let deny_at = rules.find("@denied").unwrap();
        let allow_at = rules.find("@allowed").unwrap();
        assert!(deny_at < allow_at, "deny is checked before allow");
    }
}
