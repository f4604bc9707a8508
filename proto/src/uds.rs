//! Binding unix-socket listeners without clobbering what is not ours: a stale socket file
//! (nobody listening) is replaced, but a path that is not a socket, or a socket another
//! process still serves, is an error. Listeners are made owner-only (`0600`); a socket file
//! is removed on shutdown only if it is still the one we bound. Also: reading a handshake line
//! without consuming what follows it ([`read_line_unbuffered`]).

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// A listener and the identity of its socket file.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listener.
    pub listener: UnixListener,
    path: PathBuf,
    id: (u64, u64),
}

impl BoundSocket {
    /// Binds `path` (see the module docs), owner-only.
    pub fn bind(path: &Path) -> io::Result<BoundSocket> {
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                clear_stale(path)?;
                UnixListener::bind(path)?
            }
            Err(e) => return Err(e),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let meta = std::fs::symlink_metadata(path)?;
        Ok(BoundSocket {
            listener,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
        })
    }

    /// Opens the socket to group `gid` too (`0660`, that group's): jailed peers of that gid
    /// may connect.
    pub fn share_with_group(&self, gid: u32) -> io::Result<()> {
        share_with_group(&self.path, gid)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(st_dev, st_ino)` of the socket file as bound.
    pub fn identity(&self) -> (u64, u64) {
        self.id
    }

    /// Removes the socket file if it is still the one we bound.
    pub fn remove_file(&self) {
        if is_same_file(&self.path, self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Makes the socket file at `path` `0660` and group `gid`'s (its owner stays).
pub fn share_with_group(path: &Path, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, None, Some(gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
}

/// Credentials of a unix socket's peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Reads `SO_PEERCRED` of a connected unix socket.
pub fn peer_cred(sock: &impl AsFd) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` holds the size of `cred`; the
    // descriptor is borrowed for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The peer if it runs as our own user or as root; `PermissionDenied` otherwise.
pub fn trusted_peer(sock: &impl AsFd) -> io::Result<PeerCred> {
    trusted_peer_or_group(sock, None)
}

/// [`trusted_peer`], also admitting a peer whose gid is `group` (jailed VMMs: each has a uid
/// of its own and this gid).
pub fn trusted_peer_or_group(sock: &impl AsFd, group: Option<u32>) -> io::Result<PeerCred> {
    let peer = peer_cred(sock)?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let me = unsafe { libc::getuid() };
    if peer.uid != me && peer.uid != 0 && group != Some(peer.gid) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "peer uid {} gid {} is neither ours ({me}), nor root, nor in the admitted group",
                peer.uid, peer.gid
            ),
        ));
    }
    Ok(peer)
}

/// True when `path` is the file with identity `id`.
pub fn is_same_file(path: &Path, id: (u64, u64)) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id)
}

/// Removes `path` if it is a socket file nobody listens on; errors otherwise.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is served by another process", path.display()),
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

/// Reads from `stream` up to and including the first `\n`, appending the bytes before it to
/// `line`, and never consumes a byte after it (those belong to what the line introduces,
/// such as the hybrid vsock's `CONNECT <port>` and `OK <port>` lines): each round peeks at
/// what has come (`MSG_PEEK`), then takes exactly what belongs to the line. Two system
/// calls for a line that came whole, where reading byte by byte took one per byte.
///
/// `Ok(true)`: the line is complete (the newline was read). `Ok(false)`: the peer closed
/// first. A blocking stream's read timeout, or a non-blocking stream with the line not
/// complete yet, is `WouldBlock` (or `TimedOut`), and what came so far is in `line` (call
/// again to go on). A line of more than `max` bytes is `InvalidData`. Works on any stream
/// socket wrapped as a `UnixStream` that supports `MSG_PEEK` (AF_VSOCK does since Linux 5.x).
pub fn read_line_unbuffered(
    mut stream: &UnixStream,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<bool> {
    let mut buf = [0u8; 256];
    loop {
        // One byte past `max`: a line that long is refused without waiting for its end.
        let want = max
            .saturating_sub(line.len())
            .saturating_add(1)
            .min(buf.len());
        let n = match rustix::net::recv(stream, &mut buf[..want], rustix::net::RecvFlags::PEEK) {
            Ok((n, _)) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Ok(false);
        }
        let end = buf[..n].iter().position(|&b| b == b'\n');
        let take = end.map_or(n, |i| i + 1);
        // The peeked bytes are in the socket and nobody else reads it: this takes them.
        stream.read_exact(&mut buf[..take])?;
        line.extend_from_slice(&buf[..end.unwrap_or(take)]);
        if line.len() > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line of more than {max} bytes"),
            ));
        }
        if end.is_some() {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let first = BoundSocket::bind(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let err = BoundSocket::bind(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(first); // the file stays, nobody listens: stale
        let second = BoundSocket::bind(&path).unwrap();
        second.remove_file();
        assert!(!path.exists());

        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"data").unwrap();
        let err = BoundSocket::bind(&plain).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read(&plain).unwrap(), b"data");
    }

    #[test]
    fn a_line_is_read_without_what_follows_it() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"CONNECT 1024\nearly frame").unwrap();
        let mut line = Vec::new();
        assert!(read_line_unbuffered(&b, &mut line, 32).unwrap());
        assert_eq!(line, b"CONNECT 1024");
        // What followed the newline is still in the socket, whole.
        b.set_nonblocking(true).unwrap();
        let mut rest = [0u8; 64];
        let n = (&b).read(&mut rest).unwrap();
        assert_eq!(&rest[..n], b"early frame");

        // A line in pieces on a non-blocking stream: each call keeps what came.
        let mut line = Vec::new();
        a.write_all(b"OK 12").unwrap();
        let err = read_line_unbuffered(&b, &mut line, 32).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(line, b"OK 12");
        a.write_all(b"34\nnext").unwrap();
        assert!(read_line_unbuffered(&b, &mut line, 32).unwrap());
        assert_eq!(line, b"OK 1234");

        // A line of exactly `max` bytes is read; one byte more is refused once it passes
        // the limit, not at its end.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"12345678\n").unwrap();
        let mut line = Vec::new();
        assert!(read_line_unbuffered(&b, &mut line, 8).unwrap());
        assert_eq!(line, b"12345678");
        a.write_all(b"123456789").unwrap();
        let mut line = Vec::new();
        let err = read_line_unbuffered(&b, &mut line, 8).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");

        // A peer that closes before the newline.
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"OK").unwrap();
        drop(a);
        let mut line = Vec::new();
        assert!(!read_line_unbuffered(&b, &mut line, 32).unwrap());
        assert_eq!(line, b"OK");
    }

    #[test]
    fn peer_credentials_name_this_process() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = trusted_peer(&a).unwrap();
        assert_eq!(peer.pid, std::process::id() as i32);
    }

    #[test]
    fn remove_file_leaves_a_socket_rebound_by_someone_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let ours = BoundSocket::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let theirs = BoundSocket::bind(&path).unwrap();

        ours.remove_file();

        assert!(path.exists());
        assert!(is_same_file(&path, theirs.identity()));
    }
}
