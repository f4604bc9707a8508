//! Framed messages over a unix stream with file descriptors attached (SCM_RIGHTS).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use fissile_proto::frame::{self, FrameError};
use fissile_proto::snapshotd::{SNAPSHOTD_FRAME_CAP, SNAPSHOTD_PROTOCOL_VERSION};
use serde::Serialize;
use serde::de::DeserializeOwned;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Most descriptors queued on one connection; extra ones are closed at once.
const MAX_QUEUED_FDS: usize = 4;

/// A unix stream that collects descriptors arriving with its bytes.
#[derive(Debug)]
pub struct FdStream {
    stream: UnixStream,
    fds: VecDeque<OwnedFd>,
}

impl FdStream {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> FdStream {
        FdStream {
            stream,
            fds: VecDeque::new(),
        }
    }

    /// The underlying stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Takes the oldest received descriptor.
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// Closes every queued descriptor (e.g. after a request that did not expect one).
    pub fn drop_fds(&mut self) {
        self.fds.clear();
    }

    /// Reads one snapshotd frame.
    pub fn read_msg<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        frame::read_frame(self, SNAPSHOTD_PROTOCOL_VERSION, SNAPSHOTD_FRAME_CAP)
    }

    /// Writes one snapshotd frame, optionally with a descriptor attached.
    pub fn write_msg<T: Serialize>(
        &mut self,
        msg: &T,
        fd: Option<&dyn AsFd>,
    ) -> Result<(), FrameError> {
        write_msg(&self.stream, msg, fd)
    }
}

/// Writes one snapshotd frame on `stream`, optionally with a descriptor attached to its
/// first byte.
pub fn write_msg<T: Serialize>(
    stream: &UnixStream,
    msg: &T,
    fd: Option<&dyn AsFd>,
) -> Result<(), FrameError> {
    let buf = frame::encode_frame(SNAPSHOTD_PROTOCOL_VERSION, msg)?;
    if buf.len() > SNAPSHOTD_FRAME_CAP as usize + 4 {
        return Err(FrameError::TooLarge {
            len: buf.len() as u64,
            cap: SNAPSHOTD_FRAME_CAP,
        });
    }
    let mut sent = 0;
    if let Some(fd) = fd {
        let raw = fd.as_fd().as_raw_fd();
        sent = stream
            .send_with_fd(&buf[..], raw)
            .map_err(|e| FrameError::Io(io::Error::from(e)))?;
    }
    let mut w = stream;
    w.write_all(&buf[sent..]).map_err(FrameError::Io)?;
    Ok(())
}

/// Writes one snapshotd frame on `stream` without waiting: all of it, or an error
/// (`WouldBlock` when the peer's buffer is full) and nothing written.
pub fn send_msg_nowait<T: Serialize>(stream: &UnixStream, msg: &T) -> Result<(), FrameError> {
    let buf = frame::encode_frame(SNAPSHOTD_PROTOCOL_VERSION, msg)?;
    let sent = crate::sys::send_nowait(stream.as_fd(), &buf).map_err(FrameError::Io)?;
    if sent != buf.len() {
        // A stream socket takes a frame this small whole or not at all; should one be split,
        // the stream is no longer framed and its reader sees the error.
        return Err(FrameError::Io(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of a {}-byte frame", buf.len()),
        )));
    }
    Ok(())
}

impl Read for FdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let mut fds = [-1; MAX_QUEUED_FDS];
        // SAFETY: the iovec points at `buf`, which is valid for writes of its length for the
        // duration of the call.
        let (n, nfds) =
            unsafe { self.stream.recv_with_fds(&mut iov, &mut fds) }.map_err(io::Error::from)?;
        for &fd in &fds[..nfds] {
            // SAFETY: recvmsg just installed `fd` in our table; we are its only owner.
            let owned = unsafe { crate::sys::own_fd(fd) };
            // No process this one starts may inherit a peer's memfd or uffd. (The VMM and
            // the daemon start none; this keeps it so if that ever changes.)
            crate::sys::set_cloexec(&owned)?;
            if self.fds.len() < MAX_QUEUED_FDS {
                self.fds.push_back(owned);
            } else {
                tracing::warn!("peer sent too many descriptors; closing one");
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_descriptors_are_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let memfd = crate::sys::memfd_create("t", 4096).unwrap();
        // A descriptor without FD_CLOEXEC on the sending side.
        // SAFETY: fcntl on a descriptor we own.
        let cleared = unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_SETFD, 0) };
        assert_eq!(cleared, 0);
        write_msg(&a, &fissile_proto::snapshotd::Request::Ping, Some(&memfd)).unwrap();
        let mut conn = FdStream::new(b);

        let _: fissile_proto::snapshotd::Request = conn.read_msg().unwrap();
        let fd = conn.take_fd().expect("a descriptor arrived");

        // SAFETY: fcntl(F_GETFD) on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}
