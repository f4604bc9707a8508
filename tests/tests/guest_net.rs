//! Guest network tests: the guest's virtio-net device over a tap, against servers this test
//! starts itself on the tap's own address (never an address outside the machine; the lab's
//! own network leads nowhere).
//!
//! The `guest_` tests are ignored by a plain `cargo test`: `net_suite_boots_real_guests`
//! runs them (in one lab boot on a KVM-PVM host, as a child process where KVM is usable) and
//! checks that every one ran and passed (see `fissile_tests::guest`).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fissile_proto::net::{GATEWAY_ADDR, GUEST_ADDR};
use fissile_sandbox::{Network, Sandbox, SandboxConfig, Snapshotd, net};
use fissile_tests::guest::{GuestEnv, guest_env, rss_kib, run_guest_suite};

#[test]
fn net_suite_boots_real_guests() {
    run_guest_suite("guest_", Duration::from_secs(1200));
}

fn config(env: &GuestEnv, dir: &Path, sd: &Snapshotd, tap: &str) -> SandboxConfig {
    let mut cfg = SandboxConfig::from_env(dir).unwrap();
    cfg.kernel = env.kernel.clone();
    cfg.rootfs = env.rootfs.clone();
    cfg.mem_mib = 512;
    cfg.snapshotd = Some(sd.socket().to_path_buf());
    cfg.network = Network::Tap(tap.to_string());
    cfg
}

/// The value of a Python expression (its repr), failing the test on an exception.
fn eval(sb: &mut Sandbox, code: &str) -> String {
    let out = sb.exec(code).unwrap();
    if let Some((ename, evalue, tb)) = out.error() {
        panic!("{code:?} raised {ename}: {evalue}\n{}", tb.join("\n"));
    }
    out.result_text()
        .unwrap_or_else(|| panic!("{code:?} returned nothing: {:?}", out.outputs))
        .to_string()
}

/// An HTTP/1.0 server on `ip` (a port the kernel picks) answering every request with `body`;
/// records each client's address. Serves until the process ends.
struct Server {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<IpAddr>>>,
}

fn ns(sb: &Sandbox) -> &fissile_sandbox::NetNs {
    sb.netns().expect("the sandbox has a namespace of its own")
}

fn serve(ip: IpAddr, body: Vec<u8>) -> Server {
    serve_on(TcpListener::bind((ip, 0)).unwrap(), body)
}

/// [`serve`] on a listener bound elsewhere (inside a sandbox's namespace).
fn serve_on(listener: TcpListener, body: Vec<u8>) -> Server {
    let addr = listener.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let seen = peers.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            if let Ok(peer) = conn.peer_addr() {
                seen.lock().unwrap().push(peer.ip());
            }
            // Read the request head (bounded), then answer.
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            for _ in 0..100 {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(&body);
        }
    });
    Server { addr, peers }
}

/// Python that fetches `url` and evaluates to the body's `(length, sum of bytes)`, or to the
/// error: its errno's name (`'ECONNREFUSED'`, `'EHOSTUNREACH'`, ...) or its type's.
fn fetch(url: &str) -> String {
    format!(
        "import urllib.request, errno\n\
         try:\n    d = urllib.request.urlopen('{url}', timeout=20).read(); r = (len(d), sum(d))\n\
         except Exception as e:\n    x = getattr(e, 'reason', e)\n    \
         r = errno.errorcode.get(getattr(x, 'errno', None) or 0, type(x).__name__)\n\
         r"
    )
}

/// Every VMM in a namespace of its own with the same layout: the sandbox and each child of a
/// fork(3) fetch from a server started in their own namespace on the same gateway address
/// (each gets its own server's bytes, from the same guest address); a child cannot reach a
/// sibling's server, nor a server on the lab host's own namespace.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_fork_children_each_get_their_own_namespace_with_the_same_layout() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let mut cfg = config(&env, &dir.path().join("p"), &sd, "unused");
    cfg.network = Network::Isolated;
    // A server in the host's (the lab's) own namespace, on every address.
    let host = serve(
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        b"host".to_vec(),
    );
    let in_ns = |sb: &Sandbox, port: u16, body: &[u8]| {
        let body = body.to_vec();
        sb.netns()
            .expect("an isolated sandbox has a namespace")
            .run(move || serve_on(TcpListener::bind((GATEWAY_ADDR, port)).unwrap(), body))
            .unwrap()
    };
    let sum = |b: &[u8]| b.iter().map(|&x| u64::from(x)).sum::<u64>();

    let mut parent = Sandbox::boot(&cfg).unwrap();
    let p_server = in_ns(&parent, 8000, b"parent");
    assert_eq!(
        eval(&mut parent, &fetch(&format!("http://{GATEWAY_ADDR}:8000/"))),
        format!("(6, {})", sum(b"parent"))
    );
    assert_eq!(
        eval(
            &mut parent,
            &fetch(&format!("http://{GATEWAY_ADDR}:{}/", host.addr.port()))
        ),
        "'ECONNREFUSED'",
        "the host's own namespace is out of reach"
    );

    let (mut kids, _) = parent.fork(3).unwrap();
    let servers: Vec<Server> = kids
        .iter()
        .enumerate()
        .map(|(i, k)| in_ns(k, 8001 + i as u16, format!("child {i}").as_bytes()))
        .collect();
    for (i, kid) in kids.iter_mut().enumerate() {
        let own = format!("child {i}");
        assert_eq!(
            eval(kid, &fetch(&format!("http://{GATEWAY_ADDR}:{}/", 8001 + i))),
            format!("({}, {})", own.len(), sum(own.as_bytes())),
            "child {i} reaches its own server"
        );
        let sibling = 8001 + (i + 1) % 3;
        assert_eq!(
            eval(kid, &fetch(&format!("http://{GATEWAY_ADDR}:{sibling}/"))),
            "'ECONNREFUSED'",
            "child {i} cannot reach a sibling's server"
        );
    }
    for (i, s) in servers.iter().enumerate() {
        assert_eq!(
            s.peers.lock().unwrap().as_slice(),
            &[IpAddr::V4(GUEST_ADDR)],
            "child {i}'s server saw only its own guest"
        );
    }
    assert_eq!(
        p_server.peers.lock().unwrap().len(),
        1,
        "no child reached the parent's"
    );
    assert!(
        host.peers.lock().unwrap().is_empty(),
        "nothing reached the host"
    );
    // The parent still has its network after the fork.
    assert_eq!(
        eval(&mut parent, &fetch(&format!("http://{GATEWAY_ADDR}:8000/"))),
        format!("(6, {})", sum(b"parent"))
    );
}

/// A routed sandbox reaches a server outside it (in a namespace this test links to the
/// host, as the internet would be) from an address of its own, under its policy: fork(3)
/// children each fetch and the server sees four distinct source addresses; a deny rule, set
/// at runtime, rejects the next connection with a clear error and counts it; internet off
/// with an allow list passes only the listed network; the host's own addresses (its uplink
/// end, its address toward the outside) and other sandboxes are always rejected.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_routed_sandboxes_reach_the_outside_under_their_policy() {
    use fissile_sandbox::net::egress::{self, EgressPolicy, VethEnd};
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    // "The outside": a namespace of the test's own behind a veth, routed by the host.
    let host_side = std::net::Ipv4Addr::new(203, 0, 113, 1);
    let outside_addr = std::net::Ipv4Addr::new(203, 0, 113, 2);
    let outside = fissile_sandbox::NetNs::create().unwrap();
    egress::link_namespace(
        &outside,
        &VethEnd {
            name: "fsl-test-o".into(),
            addr: host_side,
        },
        &VethEnd {
            name: "eth0".into(),
            addr: outside_addr,
        },
        "fsl-test-t",
        24,
        true,
    )
    .unwrap();
    let body = b"outside data".to_vec();
    let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    let want = format!("({}, {sum})", body.len());
    let server = outside
        .run(move || serve_on(TcpListener::bind((outside_addr, 8080)).unwrap(), body))
        .unwrap();
    let url = format!("http://{outside_addr}:8080/data");
    // A server on every host address (the host's own: never reachable from a sandbox).
    let host = TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let host_port = host.local_addr().unwrap().port();
    let host = serve_on(host, b"host".to_vec());

    let mut cfg = config(&env, &dir.path().join("p"), &sd, "unused");
    cfg.network = Network::Routed(EgressPolicy::default());
    let mut parent = Sandbox::boot(&cfg).unwrap();
    let uplink_host = parent.netns().unwrap().uplink().unwrap().host_addr();
    assert_eq!(eval(&mut parent, &fetch(&url)), want);
    for addr in [host_side, uplink_host] {
        assert_eq!(
            eval(&mut parent, &fetch(&format!("http://{addr}:{host_port}/"))),
            "'EHOSTUNREACH'",
            "the host's own address {addr} is out of reach"
        );
    }
    assert!(
        host.peers.lock().unwrap().is_empty(),
        "nothing reached the host"
    );
    let blocked = ns(&parent).blocked_connections().unwrap();
    assert!(blocked >= 2, "the rejections were counted: {blocked}");

    // Forked children: each in its own namespace with its own uplink address.
    let (mut kids, _) = parent.fork(3).unwrap();
    for (i, kid) in kids.iter_mut().enumerate() {
        assert_eq!(eval(kid, &fetch(&url)), want, "child {i}");
    }
    let sources: std::collections::BTreeSet<IpAddr> =
        server.peers.lock().unwrap().iter().copied().collect();
    assert_eq!(
        sources.len(),
        4,
        "one source address per sandbox: {sources:?}"
    );
    assert!(sources.iter().all(|a| match a {
        IpAddr::V4(v4) => egress::UPLINK_NET.contains(*v4),
        IpAddr::V6(_) => false,
    }));
    // A sandbox cannot reach another one (a sibling's uplink address).
    let sibling = ns(&kids[1]).uplink().unwrap().ns_addr();
    assert_eq!(
        eval(&mut kids[0], &fetch(&format!("http://{sibling}:8080/"))),
        "'EHOSTUNREACH'"
    );

    // A deny rule set at runtime applies to the next connection, and is counted.
    let before = ns(&parent).blocked_connections().unwrap();
    parent
        .set_network_policy(EgressPolicy {
            deny: vec![format!("{outside_addr}/32").parse().unwrap()],
            ..EgressPolicy::default()
        })
        .unwrap();
    assert_eq!(eval(&mut parent, &fetch(&url)), "'EHOSTUNREACH'");
    assert!(ns(&parent).blocked_connections().unwrap() > before);
    assert_eq!(
        eval(&mut kids[2], &fetch(&url)),
        want,
        "the children keep theirs"
    );
    // Internet off, the outside network allowed: passes; off with nothing allowed: not.
    parent
        .set_network_policy(EgressPolicy {
            internet: false,
            allow: vec!["203.0.113.0/24".parse().unwrap()],
            ..EgressPolicy::default()
        })
        .unwrap();
    assert_eq!(eval(&mut parent, &fetch(&url)), want);
    parent
        .set_network_policy(EgressPolicy {
            internet: false,
            ..EgressPolicy::default()
        })
        .unwrap();
    assert_eq!(eval(&mut parent, &fetch(&url)), "'EHOSTUNREACH'");
    // A child forked now inherits that policy.
    let (mut late, _) = parent.fork(1).unwrap();
    assert_eq!(eval(&mut late[0], &fetch(&url)), "'EHOSTUNREACH'");
}

/// The guest fetches a file from a server on the host end of its link with `urllib` and gets
/// every byte; its `eth0`, route and resolver are the shared layout. A snapshot restored into
/// a new VMM on the same tap fetches again without any reconfiguration in the guest.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_fetches_over_virtio_net_and_its_restored_snapshot_still_does() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let tap = "fsl-test0";
    net::create_gateway_tap(tap).unwrap();
    // 1 MiB of varied bytes: a frame boundary or ring wrap that lost or repeated data shows.
    let body: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    let server = serve(IpAddr::V4(GATEWAY_ADDR), body);
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();

    let mut sb = Sandbox::boot(&config(&env, &dir.path().join("a"), &sd, tap)).unwrap();
    assert_eq!(
        eval(&mut sb, "open('/etc/resolv.conf').read().strip()"),
        format!("'nameserver {GATEWAY_ADDR}'")
    );
    let fetch = format!(
        "import urllib.request\n\
         d = urllib.request.urlopen('http://{}/blob', timeout=60).read()\n\
         len(d), sum(d)",
        server.addr
    );
    assert_eq!(eval(&mut sb, &fetch), format!("({}, {sum})", 1u32 << 20));
    assert_eq!(
        server.peers.lock().unwrap().as_slice(),
        &[IpAddr::V4(GUEST_ADDR)],
        "one connection, from the guest's address"
    );
    // A port nobody listens on is refused at once (the gateway answers with a reset).
    let refused = eval(
        &mut sb,
        &format!(
            "import socket\n\
             try:\n    socket.create_connection(('{GATEWAY_ADDR}', 1), timeout=20); r = 'connected'\n\
             except ConnectionRefusedError: r = 'refused'\n\
             r"
        ),
    );
    assert_eq!(refused, "'refused'");

    let snap = sb.snapshot(true).unwrap();
    drop(sb); // the VMM exits; the persistent tap stays
    let mut restored =
        Sandbox::restore(&config(&env, &dir.path().join("b"), &sd, tap), &snap.id).unwrap();
    assert_eq!(
        eval(&mut restored, &fetch),
        format!("({}, {sum})", 1u32 << 20)
    );
    assert_eq!(server.peers.lock().unwrap().len(), 2);
    drop(restored);
    net::delete_tap(tap).unwrap();
}

/// Puts `n` copies of an Ethernet frame for the guest (from the tap's MAC, IPv4, 1514 bytes)
/// on interface `ifname` with a packet socket: on a tap, that is `n` frames waiting for the
/// VMM to read. Returns how many the kernel took.
fn inject_frames(ifname: &str, n: usize) -> usize {
    use fissile_proto::net::{GUEST_MAC, TAP_MAC};
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "no interface {ifname}");
    // SAFETY: socket(2) has no memory-safety preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&GUEST_MAC);
    let mut frame = vec![0x5au8; 1514];
    frame[..6].copy_from_slice(&GUEST_MAC);
    frame[6..12].copy_from_slice(&TAP_MAC);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let mut sent = 0;
    for _ in 0..n {
        // SAFETY: `frame` and `addr` are valid for reads of the lengths given; the fd is open.
        let rc = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc > 0 {
            sent += 1;
        }
    }
    sent
}

/// A guest that floods its transmit queue (UDP as fast as Python sends, for 5 s) and then one
/// that stops taking frames (its virtio-net driver unbound: the device reset, no receive
/// buffers) while the host puts 200,000 full-size frames on its tap: the VMM's memory does
/// not grow with either (it holds at most one frame; the rest wait in the tap, whose queue
/// the kernel bounds, or are dropped), and the agent keeps answering.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_net_a_tx_flood_and_a_stalled_rx_do_not_grow_the_vmm() {
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let tap = "fsl-flood0";
    net::create_gateway_tap(tap).unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let mut sb = Sandbox::boot(&config(&env, &dir.path().join("a"), &sd, tap)).unwrap();
    let pid = sb.pid().unwrap();
    // Warm the paths up first, so the baseline includes what any traffic maps once.
    let warm = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for _ in range(2000):\n    s.sendto(b'x' * 1400, ('{GATEWAY_ADDR}', 9))\n\
         'ok'"
    );
    assert_eq!(eval(&mut sb, &warm), "'ok'");
    let before = rss_kib(pid);
    let sent = eval(
        &mut sb,
        &format!(
            "import socket, time\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             n, end = 0, time.time() + 5\n\
             while time.time() < end:\n    \
                 try:\n        s.sendto(b'x' * 1400, ('{GATEWAY_ADDR}', 9)); n += 1\n    \
                 except OSError:\n        pass\n\
             n"
        ),
    );
    let after_tx = rss_kib(pid);
    eprintln!("tx flood: {sent} datagrams of 1400 bytes; VMM RSS {before} -> {after_tx} KiB");
    assert!(sent.parse::<u64>().unwrap() > 1000, "the flood ran: {sent}");
    assert!(
        after_tx < before + 16 * 1024,
        "tx flood grew the VMM: {before} -> {after_tx} KiB"
    );

    let dev = eval(
        &mut sb,
        "import os\n\
         dev = os.path.basename(os.readlink('/sys/class/net/eth0/device'))\n\
         open('/sys/bus/virtio/drivers/virtio_net/unbind', 'w').write(dev)\n\
         dev",
    );
    assert!(dev.starts_with("'virtio"), "{dev}");
    let injected = inject_frames(tap, 200_000);
    std::thread::sleep(Duration::from_secs(2));
    let after_rx = rss_kib(pid);
    eprintln!(
        "rx stall: {injected} frames of 1514 bytes put on the tap; VMM RSS {after_tx} -> {after_rx} KiB"
    );
    assert!(injected > 0);
    assert!(
        after_rx < after_tx + 16 * 1024,
        "frames for a guest that takes none grew the VMM: {after_tx} -> {after_rx} KiB"
    );
    assert_eq!(eval(&mut sb, "6 * 7"), "42", "the agent still answers");
    drop(sb);
    net::delete_tap(tap).unwrap();
}

/// Sandboxes with a policy start in namespaces from the pool (made ahead of time with
/// nothing reachable): the sandbox's own policy is in force from its first connection (a
/// deny rule given at boot blocks the server, none lets it through), a policy changed at
/// runtime applies to a pooled namespace like to a fresh one, and the pool refills.
#[test]
#[ignore = "guest test: boots microVMs; run by this binary's suite entry test"]
fn guest_net_sandboxes_with_a_policy_start_in_pooled_namespaces() {
    use fissile_sandbox::net::egress::{self, EgressPolicy, NetLimits, VethEnd};
    use fissile_sandbox::net::pool;
    let env = guest_env();
    let dir = tempfile::tempdir().unwrap();
    let sd = Snapshotd::start(&dir.path().join("store"), &dir.path().join("sd.sock")).unwrap();
    let outside_addr = std::net::Ipv4Addr::new(100, 64, 7, 2);
    let outside = fissile_sandbox::NetNs::create().unwrap();
    egress::link_namespace(
        &outside,
        &VethEnd {
            name: "fsl-pool-o".into(),
            addr: std::net::Ipv4Addr::new(100, 64, 7, 1),
        },
        &VethEnd {
            name: "eth0".into(),
            addr: outside_addr,
        },
        "fsl-pool-t",
        24,
        true,
    )
    .unwrap();
    let body = b"pooled".to_vec();
    let want = format!(
        "({}, {})",
        body.len(),
        body.iter().map(|&b| u64::from(b)).sum::<u64>()
    );
    outside
        .run(move || serve_on(TcpListener::bind((outside_addr, 8080)).unwrap(), body))
        .unwrap();
    let url = format!("http://{outside_addr}:8080/");
    let wait_ready = || {
        let t = std::time::Instant::now();
        while pool::ready() < 2 {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the pool never filled"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    pool::enable(2, NetLimits::default());
    wait_ready();
    let taken = pool::taken();

    let mut cfg = config(&env, &dir.path().join("a"), &sd, "unused");
    cfg.network = Network::Routed(EgressPolicy::default());
    let mut open = Sandbox::boot(&cfg).unwrap();
    assert_eq!(pool::taken(), taken + 1, "its namespace came from the pool");
    assert_eq!(eval(&mut open, &fetch(&url)), want);

    let mut cfg = config(&env, &dir.path().join("b"), &sd, "unused");
    cfg.network = Network::Routed(EgressPolicy {
        deny: vec![format!("{outside_addr}/32").parse().unwrap()],
        ..EgressPolicy::default()
    });
    let mut denied = Sandbox::boot(&cfg).unwrap();
    assert_eq!(pool::taken(), taken + 2);
    assert_eq!(eval(&mut denied, &fetch(&url)), "'EHOSTUNREACH'");
    assert!(ns(&denied).blocked_connections().unwrap() >= 1);

    open.set_network_policy(EgressPolicy {
        internet: false,
        ..EgressPolicy::default()
    })
    .unwrap();
    assert_eq!(eval(&mut open, &fetch(&url)), "'EHOSTUNREACH'");
    wait_ready();
}
