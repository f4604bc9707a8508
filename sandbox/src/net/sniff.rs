//! What a guest's DNS query or connection asks for, read from the bytes the guest sent (all
//! untrusted: every function here takes any input, bounded, and never panics; `fissile-fuzz`
//! feeds them).
//!
//! * [`dns_question`]: the name of a DNS query, for the resolver the orchestrator serves on
//!   the gateway; [`dns_refusal`] the answer to one the policy refuses; [`a_query`] and
//!   [`a_records`] the proxy's own lookups.
//! * [`requested_name`]: the name an HTTP request (Host) or a TLS ClientHello (SNI) is for,
//!   for the proxy that enforces a policy's domains.

use std::net::Ipv4Addr;

use simple_dns::rdata::RData;
use simple_dns::{CLASS, Name, OPCODE, Packet, PacketFlag, QTYPE, Question, RCODE, TYPE};

/// The most bytes [`requested_name`] looks at: a whole TLS record (16 KiB of payload and its
/// header) or an HTTP request head of that size.
pub const MAX_HEAD: usize = 16 * 1024 + 5;

/// The question of a DNS query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuestion {
    /// The query's id.
    pub id: u16,
    /// The name asked for: lower case, labels of letters, digits, `-` and `_`, no trailing
    /// dot.
    pub name: String,
}

/// Why a DNS message is not a query this resolver answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// Not a DNS message at all (no reply can be made).
    #[error("not a DNS message")]
    Malformed,
    /// A reply, or not a standard query with exactly one question.
    #[error("not a standard query with one question")]
    NotAQuery(u16),
    /// A name with a label no host name has (a dot or other bytes inside a label).
    #[error("a name with a label no host name has")]
    BadName(u16),
}

impl DnsError {
    /// The id to answer, when the message had a header.
    pub fn id(&self) -> Option<u16> {
        match self {
            DnsError::Malformed => None,
            DnsError::NotAQuery(id) | DnsError::BadName(id) => Some(*id),
        }
    }
}

/// The one question of a standard DNS query.
pub fn dns_question(msg: &[u8]) -> Result<DnsQuestion, DnsError> {
    let packet = Packet::parse(msg).map_err(|_| DnsError::Malformed)?;
    let id = packet.id();
    if packet.has_flags(PacketFlag::RESPONSE)
        || packet.opcode() != OPCODE::StandardQuery
        || packet.questions.len() != 1
    {
        return Err(DnsError::NotAQuery(id));
    }
    let mut labels = Vec::new();
    for label in packet.questions[0].qname.get_labels() {
        let bytes: &[u8] = label.as_ref();
        if bytes.is_empty()
            || !bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return Err(DnsError::BadName(id));
        }
        labels.push(String::from_utf8_lossy(bytes).to_ascii_lowercase());
    }
    Ok(DnsQuestion {
        id,
        name: labels.join("."),
    })
}

/// Why a query gets no records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsFailure {
    /// FORMERR: not a query this resolver answers.
    Format,
    /// SERVFAIL: no upstream answered.
    Server,
    /// REFUSED: the policy does not allow the name.
    Refused,
}

/// The answer to query `query` (id `id`) with no records, saying `why`; the question is
/// echoed when it parses.
pub fn dns_refusal(query: &[u8], id: u16, why: DnsFailure) -> Vec<u8> {
    let (rcode, code) = match why {
        DnsFailure::Format => (RCODE::FormatError, 1),
        DnsFailure::Server => (RCODE::ServerFailure, 2),
        DnsFailure::Refused => (RCODE::Refused, 5),
    };
    let mut reply = Packet::new_reply(id);
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if let Ok(q) = Packet::parse(query) {
        if q.has_flags(PacketFlag::RECURSION_DESIRED) {
            reply.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        reply.questions = q.questions.into_iter().take(1).collect();
    }
    *reply.rcode_mut() = rcode;
    reply.build_bytes_vec().unwrap_or_else(|_| {
        // A header alone: id, QR, RA and the rcode, no sections.
        let [a, b] = id.to_be_bytes();
        let mut h = vec![a, b, 0x80, 0x80 | code];
        h.resize(12, 0);
        h
    })
}

/// A recursive query for the A records of `name` (already checked to be a host name).
pub fn a_query(id: u16, name: &str) -> Option<Vec<u8>> {
    let mut q = Packet::new_query(id);
    q.set_flags(PacketFlag::RECURSION_DESIRED);
    q.questions.push(Question::new(
        Name::new(name).ok()?,
        QTYPE::TYPE(TYPE::A),
        simple_dns::QCLASS::CLASS(CLASS::IN),
        false,
    ));
    q.build_bytes_vec().ok()
}

/// The A records of reply `msg` to query `id` (empty: none, or not that reply).
pub fn a_records(msg: &[u8], id: u16) -> Vec<Ipv4Addr> {
    let Ok(p) = Packet::parse(msg) else {
        return Vec::new();
    };
    if p.id() != id || !p.has_flags(PacketFlag::RESPONSE) || p.rcode() != RCODE::NoError {
        return Vec::new();
    }
    p.answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(Ipv4Addr::from(a.address)),
            _ => None,
        })
        .collect()
}

/// What the first bytes of a connection say it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Not enough bytes yet to tell (read more, up to [`MAX_HEAD`]).
    NeedMore,
    /// An HTTP request with this Host, or a TLS ClientHello with this server name (lower
    /// case, port and trailing dot removed).
    Name(String),
    /// HTTP or TLS without a name, or something else: only the address counts.
    NoName,
}

/// The name `head` (a connection's first bytes) is for.
pub fn requested_name(head: &[u8]) -> Sniffed {
    match head.first() {
        None => Sniffed::NeedMore,
        Some(0x16) => tls_server_name(head),
        Some(_) => http_host(head),
    }
}

fn clean(name: &str) -> Sniffed {
    let n = name.trim().trim_end_matches('.').to_ascii_lowercase();
    if n.is_empty()
        || n.len() > 253
        || !n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Sniffed::NoName;
    }
    Sniffed::Name(n)
}

fn tls_server_name(head: &[u8]) -> Sniffed {
    use tls_parser::{
        SNIType, TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extensions,
        parse_tls_plaintext,
    };
    if head.len() < 5 {
        return Sniffed::NeedMore;
    }
    let record_len = usize::from(u16::from_be_bytes([head[3], head[4]]));
    if head.len() < 5 + record_len {
        return if 5 + record_len <= MAX_HEAD {
            Sniffed::NeedMore
        } else {
            Sniffed::NoName
        };
    }
    let Ok((_, record)) = parse_tls_plaintext(&head[..5 + record_len]) else {
        return Sniffed::NoName;
    };
    for msg in &record.msg {
        if let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = msg
            && let Some(ext) = hello.ext
            && let Ok((_, exts)) = parse_tls_extensions(ext)
        {
            for e in exts {
                if let TlsExtension::SNI(names) = e
                    && let Some((_, name)) = names.iter().find(|(t, _)| *t == SNIType::HostName)
                {
                    return match std::str::from_utf8(name) {
                        Ok(n) => clean(n),
                        Err(_) => Sniffed::NoName,
                    };
                }
            }
        }
    }
    Sniffed::NoName
}

fn http_host(head: &[u8]) -> Sniffed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) if head.len() < MAX_HEAD => Sniffed::NeedMore,
        Ok(httparse::Status::Complete(_)) => {
            let hosts: Vec<&[u8]> = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"))
                .map(|h| h.value)
                .collect();
            // Two Host headers: which one a server believes is anyone's guess.
            let [host] = hosts[..] else {
                return Sniffed::NoName;
            };
            let Ok(host) = std::str::from_utf8(host) else {
                return Sniffed::NoName;
            };
            let name = clean(without_port(host));
            // A target other than a path (`GET x://other.test/ HTTP/1.1`, whatever the
            // scheme) may pick the server's virtual host over Host: it must name the same
            // host, or the request names none (so does an authority-form `CONNECT` target).
            let target = req.path.unwrap_or_default();
            if !(target.starts_with('/') || target == "*") {
                let Some((_, rest)) = target.split_once("://") else {
                    return Sniffed::NoName;
                };
                let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
                if authority.contains('@') || clean(without_port(authority)) != name {
                    return Sniffed::NoName;
                }
            }
            name
        }
        _ => Sniffed::NoName,
    }
}

/// Most headers a request head may have to be read (and rewritten) by the proxy.
const MAX_HEADERS: usize = 64;

/// Whether `head` (a connection's first bytes) is, or begins, what a web server could read
/// as an HTTP request: one this parser reads (or would, but for too many headers), or a
/// first line that starts with a method and a space (a lenient server reads more than this
/// parser does).
pub fn is_http_request(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::Request::new(&mut headers).parse(head) {
        Ok(_) => !head.is_empty(),
        Err(httparse::Error::TooManyHeaders) => true,
        Err(_) => {
            let line = head.trim_ascii_start();
            let method = line.iter().take_while(|b| b.is_ascii_alphabetic()).count();
            method > 0 && line.get(method) == Some(&b' ')
        }
    }
}

/// `head` (an HTTP request's first bytes, its head complete) as the proxy forwards it: its
/// `Connection`, `Keep-Alive`, `Proxy-Connection`, `Upgrade` and `HTTP2-Settings` headers
/// replaced by `Connection: close`, the bytes after the head kept as they are; `None` if
/// `head` is not a complete HTTP/1 request head (or has [`MAX_HEADERS`] headers and none to
/// drop). A proxy that checked this request's Host sends this instead: the server closes the
/// connection after its answer, so a later request on it, whose Host nobody checked, is never
/// served (the client opens a new connection, checked again). No upgrade is passed on: after
/// a switch (h2c above all) one connection could carry requests for any host.
pub fn close_after_first_request(head: &[u8]) -> Option<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(end)) = req.parse(head) else {
        return None;
    };
    let dropped = |name: &[u8]| {
        [
            &b"connection"[..],
            b"keep-alive",
            b"proxy-connection",
            b"upgrade",
            b"http2-settings",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
    };
    let kept = req
        .headers
        .iter()
        .filter(|h| !dropped(h.name.as_bytes()))
        .count();
    if kept >= MAX_HEADERS {
        return None; // with `Connection: close` it could not be read again
    }
    let (lines, rest) = head.split_at(end);
    let mut out = Vec::with_capacity(head.len() + 19);
    let empty = |line: &[u8]| line == b"\r\n" || line == b"\n";
    // Empty lines before the request line are skipped (as servers do).
    let mut lines = lines
        .split_inclusive(|&b| b == b'\n')
        .skip_while(|l| empty(l));
    out.extend_from_slice(lines.next()?); // the request line
    for line in lines {
        if empty(line) {
            out.extend_from_slice(b"Connection: close\r\n");
            out.extend_from_slice(line);
            break;
        }
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if !dropped(name.trim_ascii()) {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(rest);
    Some(out)
}

/// `host` without a `:port` suffix.
fn without_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => host,
    }
}

/// A minimal TLS 1.2-framed ClientHello naming `name` in its server_name extension (record
/// header, handshake header, version, random, empty session id, one cipher suite, null
/// compression, the extension): for tests and fuzz seeds.
pub fn minimal_client_hello(name: &[u8]) -> Vec<u8> {
    let mut sni = Vec::new();
    let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX - 5);
    let list_len = name_len + 3;
    sni.extend_from_slice(&[0x00, 0x00]); // type server_name
    sni.extend_from_slice(&(list_len + 2).to_be_bytes());
    sni.extend_from_slice(&list_len.to_be_bytes());
    sni.push(0); // host_name
    sni.extend_from_slice(&name_len.to_be_bytes());
    sni.extend_from_slice(&name[..usize::from(name_len)]);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x11; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
    body.extend_from_slice(&[0x01, 0x00]);
    body.extend_from_slice(&u16::try_from(sni.len()).unwrap_or(u16::MAX).to_be_bytes());
    body.extend_from_slice(&sni);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&u16::try_from(hs.len()).unwrap_or(u16::MAX).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_round_trips_and_bad_names_are_refused() {
        let q = a_query(7, "Files.Example.test").unwrap();
        assert_eq!(
            dns_question(&q).unwrap(),
            DnsQuestion {
                id: 7,
                name: "files.example.test".into()
            }
        );
        let refused = dns_refusal(&q, 7, DnsFailure::Refused);
        let p = Packet::parse(&refused).unwrap();
        assert_eq!((p.id(), p.rcode()), (7, RCODE::Refused));
        assert!(p.has_flags(PacketFlag::RESPONSE));
        assert_eq!(p.questions.len(), 1);
        // A reply is not a query; garbage is not a message.
        assert_eq!(dns_question(&refused), Err(DnsError::NotAQuery(7)));
        assert_eq!(dns_question(b"\x01"), Err(DnsError::Malformed));
        assert_eq!(dns_refusal(b"\x01", 9, DnsFailure::Server).len(), 12);
        // A label holding a dot ("evil.allowed" + "test") is not a host name.
        let mut odd = Packet::new_query(3);
        odd.questions.push(Question::new(
            Name::new_with_labels(&[
                simple_dns::Label::new_unchecked(b"evil.allowed"),
                simple_dns::Label::new_unchecked(b"test"),
            ]),
            QTYPE::TYPE(TYPE::A),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        let odd = odd.build_bytes_vec().unwrap();
        assert_eq!(dns_question(&odd), Err(DnsError::BadName(3)));
    }

    #[test]
    fn a_records_come_from_the_matching_reply_only() {
        let mut r = Packet::new_reply(5);
        r.answers.push(simple_dns::ResourceRecord::new(
            Name::new_unchecked("a.test"),
            CLASS::IN,
            60,
            RData::A(simple_dns::rdata::A {
                address: u32::from(Ipv4Addr::new(198, 51, 100, 2)),
            }),
        ));
        let bytes = r.build_bytes_vec().unwrap();
        assert_eq!(a_records(&bytes, 5), vec![Ipv4Addr::new(198, 51, 100, 2)]);
        assert!(a_records(&bytes, 6).is_empty(), "another query's reply");
        assert!(a_records(b"junk", 5).is_empty());
    }

    #[test]
    fn a_checked_request_asks_the_server_to_close_after_answering() {
        let head = b"GET /a HTTP/1.1\r\nHost: files.test\r\nconnection: keep-alive\r\nKeep-Alive: timeout=5\r\nAccept: */*\r\n\r\nGET /b HTTP/1.1\r\nHost: other.test\r\n\r\n";
        let out = close_after_first_request(head).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a HTTP/1.1\r\nHost: files.test\r\nAccept: */*\r\nConnection: close\r\n\r\n\
             GET /b HTTP/1.1\r\nHost: other.test\r\n\r\n",
            "hop-by-hop headers replaced; the bytes after the head untouched"
        );
        // Empty lines before the request line are dropped.
        let out = close_after_first_request(b"\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        );
        // Bare line feeds, a body after the head.
        let out = close_after_first_request(b"POST / HTTP/1.0\nHost: a\n\nbody").unwrap();
        assert_eq!(
            out,
            b"POST / HTTP/1.0\nHost: a\nConnection: close\r\n\nbody"
        );
        // No upgrade is passed on (h2c would carry requests for any host).
        let h2c = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
        assert_eq!(
            close_after_first_request(h2c).unwrap(),
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        );
        // 63 headers and a Connection fit once rewritten; 64 others do not.
        let many = |n: usize| {
            let mut h = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
            for i in 1..n {
                h.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
            }
            h
        };
        let mut h = many(63);
        h.extend_from_slice(b"Connection: keep-alive\r\n\r\n");
        let out = close_after_first_request(&h).unwrap();
        assert_eq!(requested_name(&out), Sniffed::Name("a".into()));
        let mut h = many(64);
        h.extend_from_slice(b"\r\n");
        assert_eq!(requested_name(&h), Sniffed::Name("a".into()));
        assert_eq!(close_after_first_request(&h), None);
        // Not a complete HTTP/1 head: nothing to rewrite.
        assert_eq!(
            close_after_first_request(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            None
        );
        assert_eq!(close_after_first_request(&minimal_client_hello(b"a")), None);
        assert_eq!(close_after_first_request(b""), None);
    }

    #[test]
    fn an_absolute_target_must_name_the_host_and_http_is_told_from_the_rest() {
        let req = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: files.test\r\n\r\n");
        for (target, name) in [
            ("/", Some("files.test")),
            ("http://files.test/x", Some("files.test")),
            ("HTTP://Files.Test:80", Some("files.test")),
            ("https://files.test?q", Some("files.test")),
            ("http://other.test/", None),
            ("http://files.test@other.test/", None),
            ("http://other.test", None),
            ("x://other.test/", None),
            ("x://files.test/", Some("files.test")),
            ("other.test:80", None),
            ("*", Some("files.test")),
        ] {
            let want = name.map_or(Sniffed::NoName, |n| Sniffed::Name(n.into()));
            assert_eq!(requested_name(req(target).as_bytes()), want, "{target}");
        }
        assert!(is_http_request(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(is_http_request(b"GET /"), "the start of one");
        // What a lenient server reads and this parser does not.
        assert!(is_http_request(b"GET  /  HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(is_http_request(b"GET / HTTP/1.1\r\nX Y: z\r\n\r\n"));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..70 {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        assert!(is_http_request(&many));
        assert_eq!(requested_name(&many), Sniffed::NoName);
        assert!(!is_http_request(b""));
        assert!(!is_http_request(b"\x00\x01binary"));
        assert!(!is_http_request(&minimal_client_hello(b"a")));
    }

    #[test]
    fn http_requests_name_their_host() {
        let req = b"GET / HTTP/1.1\r\nHost: Files.Example.test:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            requested_name(req),
            Sniffed::Name("files.example.test".into())
        );
        assert_eq!(requested_name(&req[..20]), Sniffed::NeedMore);
        assert_eq!(requested_name(b""), Sniffed::NeedMore);
        assert_eq!(
            requested_name(b"GET / HTTP/1.0\r\n\r\n"),
            Sniffed::NoName,
            "no Host"
        );
        assert_eq!(
            requested_name(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Sniffed::NoName,
            "two Hosts"
        );
        assert_eq!(requested_name(b"\x00\x01garbage\r\n\r\n"), Sniffed::NoName);
        assert_eq!(
            requested_name(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            Sniffed::NoName
        );
    }

    #[test]
    fn tls_client_hellos_name_their_server() {
        let hello = minimal_client_hello(b"SNI.example.test");
        assert_eq!(
            requested_name(&hello),
            Sniffed::Name("sni.example.test".into())
        );
        for cut in [1, 4, 5, 40, hello.len() - 1] {
            assert_eq!(requested_name(&hello[..cut]), Sniffed::NeedMore, "{cut}");
        }
        let mut nonsense = hello.clone();
        nonsense[9] = 0xff; // handshake body shorter than it says
        nonsense.truncate(nonsense.len() - 3);
        let len = (nonsense.len() - 5) as u16;
        nonsense[3..5].copy_from_slice(&len.to_be_bytes());
        assert_eq!(requested_name(&nonsense), Sniffed::NoName);
        assert_eq!(
            requested_name(&minimal_client_hello(b"bad name")),
            Sniffed::NoName
        );
    }
}
