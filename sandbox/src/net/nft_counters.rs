//! The named counters of an nftables table, read over netlink (`NETLINK_NETFILTER`, an
//! `NFT_MSG_GETOBJ` dump filtered by table and object type): what `nft list counters table
//! ip <table>` prints, without starting a process. `/metrics` reads every sandbox's
//! counters on each scrape, so this is one socket per namespace instead of one `nft` run.
//!
//! Everything the kernel answers is checked like any other input: lengths within the
//! message, at most [`MAX_REPLY_BYTES`] and [`MAX_COUNTERS`] in all, and a bounded wait.

use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

/// A named counter object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedCounter {
    /// Its name in the table.
    pub name: String,
    /// Packets counted.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Reading the counters failed.
#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    /// The netlink socket could not be made, bound or used.
    #[error("netlink socket: {step}")]
    Socket {
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the request.
    #[error("the kernel refused the counter dump: {0}")]
    Refused(#[source] std::io::Error),
    /// The answer is not what a dump of counter objects looks like.
    #[error("malformed netlink answer: {0}")]
    Malformed(String),
}

/// Longest wait for the kernel's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of answer read for one dump.
pub const MAX_REPLY_BYTES: usize = 1 << 20;
/// Most counters one dump may hold.
pub const MAX_COUNTERS: usize = 4096;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// On a dump's message: the table changed meanwhile, the dump may be inconsistent.
const NLM_F_DUMP_INTR: u16 = 0x10;
const NFPROTO_IPV4: u8 = 2;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
/// `nla_type` bits that are flags (nested, network byte order), not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// The counters of table `table` (family `ip`) in the calling thread's network namespace;
/// none when the table does not exist.
pub fn read(table: &str) -> Result<Vec<NamedCounter>, CountersError> {
    let sys = |step| move |source| CountersError::Socket { step, source };
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(sys("socket"))?;
    socket.bind_auto().map_err(sys("bind"))?;
    socket2::SockRef::from(&socket)
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(sys("SO_RCVTIMEO"))?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(sys("connect"))?;
    let seq = 1;
    socket.send(&request(table, seq), 0).map_err(sys("send"))?;
    let mut counters = Vec::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0).map_err(sys("recv"))?;
        if n == 0 {
            return Err(CountersError::Malformed("the socket closed".into()));
        }
        total += n;
        if total > MAX_REPLY_BYTES {
            return Err(CountersError::Malformed(format!(
                "more than {MAX_REPLY_BYTES} bytes of answer"
            )));
        }
        match parse(&buf[..n.min(buf.len())], seq, &mut counters)? {
            Parsed::More => {}
            Parsed::Done => return Ok(counters),
            Parsed::NoTable => return Ok(Vec::new()),
        }
    }
}

/// The dump request: every counter object of `table`, family `ip`.
fn request(table: &str, seq: u32) -> Vec<u8> {
    let mut m = vec![0u8; NLMSG_HDRLEN];
    m.extend_from_slice(&[NFPROTO_IPV4, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
    let mut name = table.as_bytes().to_vec();
    name.push(0);
    put_attr(&mut m, NFTA_OBJ_TABLE, &name);
    put_attr(&mut m, NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
    let len = u32::try_from(m.len()).unwrap_or(u32::MAX);
    m[0..4].copy_from_slice(&len.to_ne_bytes());
    let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ;
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

fn put_attr(m: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(data);
    m.resize(m.len().next_multiple_of(4), 0);
}

/// What one datagram of the answer said.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Counters (or nothing) so far; more follow.
    More,
    /// The dump ended.
    Done,
    /// The table does not exist (`ENOENT`).
    NoTable,
}

fn malformed(what: impl Into<String>) -> CountersError {
    CountersError::Malformed(what.into())
}

/// Parses one datagram of netlink messages answering request `seq` into `out` (public for
/// the fuzz target: the kernel's answer is checked like any input).
pub fn parse(
    mut buf: &[u8],
    seq: u32,
    out: &mut Vec<NamedCounter>,
) -> Result<Parsed, CountersError> {
    while !buf.is_empty() {
        let header = buf
            .get(..NLMSG_HDRLEN)
            .ok_or_else(|| malformed("a truncated message header"))?;
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let flags = u16::from_ne_bytes([header[6], header[7]]);
        let their_seq = u32::from_ne_bytes([header[8], header[9], header[10], header[11]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(malformed(format!(
                "a message of {len} bytes in {} left",
                buf.len()
            )));
        }
        let payload = &buf[NLMSG_HDRLEN..len];
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        if their_seq != seq {
            continue; // not an answer to this request
        }
        match kind {
            NLMSG_NOOP => {}
            NLMSG_DONE => {
                // A dump that failed part way says so in its DONE message.
                return match error_code(payload) {
                    None | Some(0) => Ok(Parsed::Done),
                    Some(c) => Err(refused(c)),
                };
            }
            NLMSG_ERROR => {
                let code =
                    error_code(payload).ok_or_else(|| malformed("a truncated error message"))?;
                return match code {
                    0 => Ok(Parsed::Done),
                    c if c == -libc::ENOENT => Ok(Parsed::NoTable),
                    c => Err(refused(c)),
                };
            }
            _ if flags & NLM_F_DUMP_INTR != 0 => {
                return Err(malformed(
                    "the ruleset changed during the dump (NLM_F_DUMP_INTR)",
                ));
            }
            k if k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ => {
                if out.len() >= MAX_COUNTERS {
                    return Err(malformed(format!("more than {MAX_COUNTERS} counters")));
                }
                let attrs = payload
                    .get(NFGENMSG_LEN..)
                    .ok_or_else(|| malformed("an object message without its nfgenmsg"))?;
                if let Some(c) = counter(attrs)? {
                    out.push(c);
                }
            }
            other => return Err(malformed(format!("message type {other:#x}"))),
        }
    }
    Ok(Parsed::More)
}

/// The (negative errno) code an error or DONE message starts with.
fn error_code(payload: &[u8]) -> Option<i32> {
    payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn refused(code: i32) -> CountersError {
    CountersError::Refused(std::io::Error::from_raw_os_error(code.saturating_neg()))
}

/// The attributes in `buf`: (type without flags, data).
fn attrs(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, CountersError> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return Err(malformed(format!(
                "an attribute of {len} bytes in {} left",
                buf.len()
            )));
        }
        out.push((kind, &buf[4..len]));
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    Ok(out)
}

fn be64(data: &[u8]) -> Result<u64, CountersError> {
    let b: [u8; 8] = data
        .try_into()
        .map_err(|_| malformed(format!("a 64-bit value of {} bytes", data.len())))?;
    Ok(u64::from_be_bytes(b))
}

/// The counter an object message describes (`None`: an object of another type).
fn counter(buf: &[u8]) -> Result<Option<NamedCounter>, CountersError> {
    let (mut name, mut kind, mut data) = (None, None, None);
    for (t, v) in attrs(buf)? {
        match t {
            NFTA_OBJ_NAME => {
                let v = v.strip_suffix(&[0]).unwrap_or(v);
                name = Some(
                    String::from_utf8(v.to_vec()).map_err(|_| malformed("a name not in UTF-8"))?,
                );
            }
            NFTA_OBJ_TYPE => {
                let b: [u8; 4] = v.try_into().map_err(|_| malformed("a type of bad size"))?;
                kind = Some(u32::from_be_bytes(b));
            }
            NFTA_OBJ_DATA => data = Some(v),
            _ => {}
        }
    }
    if kind != Some(NFT_OBJECT_COUNTER) {
        return Ok(None);
    }
    let name = name.ok_or_else(|| malformed("a counter without a name"))?;
    let (mut packets, mut bytes) = (0, 0);
    for (t, v) in attrs(data.unwrap_or(&[]))? {
        match t {
            NFTA_COUNTER_PACKETS => packets = be64(v)?,
            NFTA_COUNTER_BYTES => bytes = be64(v)?,
            _ => {}
        }
    }
    Ok(Some(NamedCounter {
        name,
        packets,
        bytes,
    }))
}

/// An answer as the kernel sends it to request 1: counters `blocked` (3 packets, 180
/// bytes) and `rate_dropped` (40, 60000), then the end of the dump (tests, fuzz seeds).
pub fn example_answer() -> Vec<u8> {
    let mut answer = counter_msg(1, "blocked", 3, 180);
    answer.extend(counter_msg(1, "rate_dropped", 40, 60000));
    answer.extend(msg(NLMSG_DONE, 1, &[0; 4]));
    answer
}

/// A netlink message of `kind` with `payload`, answering `seq`.
fn msg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    let len = u32::try_from(NLMSG_HDRLEN + payload.len()).unwrap_or(u32::MAX);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(payload);
    m.resize(m.len().next_multiple_of(4), 0);
    m
}

fn counter_msg(seq: u32, name: &str, packets: u64, bytes: u64) -> Vec<u8> {
    let mut p = vec![NFPROTO_IPV4, 0, 0, 0];
    put_attr(&mut p, NFTA_OBJ_TABLE, b"fissile\0");
    put_attr(&mut p, NFTA_OBJ_NAME, format!("{name}\0").as_bytes());
    put_attr(&mut p, NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
    let mut data = Vec::new();
    put_attr(&mut data, NFTA_COUNTER_BYTES, &bytes.to_be_bytes());
    put_attr(&mut data, NFTA_COUNTER_PACKETS, &packets.to_be_bytes());
    put_attr(&mut p, NFTA_OBJ_DATA | 0x8000, &data);
    msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ, seq, &p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_asks_for_a_dump_of_one_tables_counters() {
        let r = request("fissile", 7);
        assert_eq!(r.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize,
            r.len()
        );
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 0x0a13);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), 0x301);
        let a = attrs(&r[NLMSG_HDRLEN + NFGENMSG_LEN..]).unwrap();
        assert_eq!(a, [(1, &b"fissile\0"[..]), (3, &[0, 0, 0, 1][..])]);
    }

    #[test]
    fn counters_are_read_until_done_and_other_answers_are_skipped() {
        let mut answer = counter_msg(5, "blocked", 3, 180);
        answer.extend(counter_msg(4, "stale", 1, 1)); // another request's
        answer.extend(counter_msg(5, "rate_dropped", 40, 60000));
        let mut out = Vec::new();

        assert_eq!(parse(&answer, 5, &mut out).unwrap(), Parsed::More);
        assert_eq!(
            parse(&msg(NLMSG_DONE, 5, &[0; 4]), 5, &mut out).unwrap(),
            Parsed::Done
        );

        let named = |n: &str, p, b| NamedCounter {
            name: n.into(),
            packets: p,
            bytes: b,
        };
        assert_eq!(
            out,
            [named("blocked", 3, 180), named("rate_dropped", 40, 60000)]
        );
    }

    #[test]
    fn a_missing_table_is_no_counters_and_other_errors_are_refusals() {
        let enoent = msg(NLMSG_ERROR, 1, &(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse(&enoent, 1, &mut Vec::new()).unwrap(), Parsed::NoTable);
        let eperm = msg(NLMSG_ERROR, 1, &(-libc::EPERM).to_ne_bytes());
        assert!(matches!(
            parse(&eperm, 1, &mut Vec::new()),
            Err(CountersError::Refused(e)) if e.raw_os_error() == Some(libc::EPERM)
        ));
        let failed_dump = msg(NLMSG_DONE, 1, &(-libc::EINTR).to_ne_bytes());
        assert!(matches!(
            parse(&failed_dump, 1, &mut Vec::new()),
            Err(CountersError::Refused(e)) if e.raw_os_error() == Some(libc::EINTR)
        ));
        for code in [i32::MIN, i32::MAX, 1] {
            let odd = msg(NLMSG_ERROR, 1, &code.to_ne_bytes());
            assert!(parse(&odd, 1, &mut Vec::new()).is_err(), "{code}");
        }
    }

    #[test]
    fn an_interrupted_dump_is_an_error_not_partial_counters() {
        let mut m = counter_msg(1, "blocked", 3, 180);
        m[6..8].copy_from_slice(&NLM_F_DUMP_INTR.to_ne_bytes());
        assert!(matches!(
            parse(&m, 1, &mut Vec::new()),
            Err(CountersError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_answers_are_errors_never_panics() {
        let good = counter_msg(1, "blocked", 3, 180);
        // Every truncation, and lengths that point outside the datagram.
        for cut in 0..good.len() {
            let _ = parse(&good[..cut], 1, &mut Vec::new());
        }
        let mut long = good.clone();
        long[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(
            parse(&long, 1, &mut Vec::new()),
            Err(CountersError::Malformed(_))
        ));
        let mut short = good.clone();
        short[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(matches!(
            parse(&short, 1, &mut Vec::new()),
            Err(CountersError::Malformed(_))
        ));
        // A counter value of the wrong size.
        let mut p = vec![NFPROTO_IPV4, 0, 0, 0];
        put_attr(&mut p, NFTA_OBJ_NAME, b"x\0");
        put_attr(&mut p, NFTA_OBJ_TYPE, &NFT_OBJECT_COUNTER.to_be_bytes());
        let mut data = Vec::new();
        put_attr(&mut data, NFTA_COUNTER_PACKETS, &[1, 2, 3]);
        put_attr(&mut p, NFTA_OBJ_DATA, &data);
        let bad = msg((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ, 1, &p);
        assert!(matches!(
            parse(&bad, 1, &mut Vec::new()),
            Err(CountersError::Malformed(_))
        ));
        // An unknown message type.
        assert!(parse(&msg(0x0a99, 1, &[]), 1, &mut Vec::new()).is_err());
    }
}
