//! Length-prefixed, versioned, size-capped frames: the transport of every Fissile protocol.
//!
//! # Encoding
//! ```text
//! +----------------------+---------+------------------------------+
//! | len: u32 little-end. | version | payload: postcard(message)   |
//! +----------------------+---------+------------------------------+
//!                        |<-------------- len bytes ------------->|
//! ```
//! * `len` counts the version byte and the payload; `1 <= len <= cap`. The cap is chosen by
//!   the reader (each protocol documents its own) and checked *before* anything is allocated,
//!   so a hostile peer cannot make the reader allocate more than `cap` bytes.
//! * `version` is the protocol's own version byte; a frame with another version is refused
//!   (after its bytes have been consumed, so the stream stays in sync).
//! * The payload is the message encoded with [`postcard`] (serde, varint integers).
//!
//! A clean end of stream exactly at a frame boundary is [`FrameError::Eof`]; an end of stream
//! inside a frame is [`FrameError::Truncated`].

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Default cap on one frame: 16 MiB.
pub const DEFAULT_FRAME_CAP: u32 = 16 << 20;

/// Errors reading or writing one frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The underlying stream failed.
    #[error("frame i/o failed")]
    Io(#[source] io::Error),
    /// The peer closed the stream at a frame boundary.
    #[error("end of stream")]
    Eof,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The length prefix exceeds the reader's cap.
    #[error("frame of {len} bytes exceeds the cap of {cap} bytes")]
    TooLarge {
        /// Length announced by the prefix.
        len: u64,
        /// The reader's cap.
        cap: u32,
    },
    /// A zero-length frame (no version byte).
    #[error("empty frame")]
    Empty,
    /// The frame carries another protocol version.
    #[error("protocol version {got}, expected {want}")]
    WrongVersion {
        /// Version byte found in the frame.
        got: u8,
        /// Version this side speaks.
        want: u8,
    },
    /// The payload is not a valid message.
    #[error("undecodable payload")]
    Decode(#[source] postcard::Error),
    /// The message could not be encoded.
    #[error("unencodable message")]
    Encode(#[source] postcard::Error),
}

impl FrameError {
    /// True when the stream is still usable after this error (the bad frame was consumed).
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            FrameError::WrongVersion { .. } | FrameError::Decode(_)
        )
    }
}

/// Encodes `msg` as one frame with the given protocol `version` and writes it to `w`.
pub fn write_frame<W: Write, T: Serialize>(
    w: &mut W,
    version: u8,
    msg: &T,
) -> Result<(), FrameError> {
    let buf = encode_frame(version, msg)?;
    w.write_all(&buf).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)
}

/// Encodes `msg` into a complete frame (length prefix included).
pub fn encode_frame<T: Serialize>(version: u8, msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 5];
    buf[4] = version;
    let mut buf = postcard::to_extend(msg, buf).map_err(FrameError::Encode)?;
    let len = u32::try_from(buf.len() - 4).map_err(|_| FrameError::TooLarge {
        len: (buf.len() - 4) as u64,
        cap: u32::MAX,
    })?;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    Ok(buf)
}

/// Reads one frame from `r`, checks its version and length against `cap`, and decodes it.
pub fn read_frame<R: Read, T: DeserializeOwned>(
    r: &mut R,
    version: u8,
    cap: u32,
) -> Result<T, FrameError> {
    let body = read_frame_bytes(r, cap)?;
    decode_body(&body, version)
}

/// Reads the raw body (version byte + payload) of one frame, enforcing `cap`.
pub fn read_frame_bytes<R: Read>(r: &mut R, cap: u32) -> Result<Vec<u8>, FrameError> {
    let mut len_buf = [0u8; 4];
    read_exact_or_eof(r, &mut len_buf)?;
    let len = u32::from_le_bytes(len_buf);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > cap {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            cap,
        });
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(body)
}

/// Decodes a frame body (version byte + payload) read by [`read_frame_bytes`].
pub fn decode_body<T: DeserializeOwned>(body: &[u8], version: u8) -> Result<T, FrameError> {
    let (&got, payload) = body.split_first().ok_or(FrameError::Empty)?;
    if got != version {
        return Err(FrameError::WrongVersion { got, want: version });
    }
    postcard::from_bytes(payload).map_err(FrameError::Decode)
}

/// Like `read_exact`, but distinguishes EOF before the first byte (`Eof`) from EOF after it.
fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Err(FrameError::Eof),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping(u32),
        Data(Vec<u8>),
    }

    #[test]
    fn round_trip_preserves_messages_in_order() {
        let mut buf = Vec::new();
        write_frame(&mut buf, 7, &Msg::Ping(3)).unwrap();
        write_frame(&mut buf, 7, &Msg::Data(vec![1, 2, 3])).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<_, Msg>(&mut r, 7, 1024).unwrap(), Msg::Ping(3));
        assert_eq!(
            read_frame::<_, Msg>(&mut r, 7, 1024).unwrap(),
            Msg::Data(vec![1, 2, 3])
        );
        assert!(matches!(
            read_frame::<_, Msg>(&mut r, 7, 1024),
            Err(FrameError::Eof)
        ));
    }

    #[test]
    fn read_frame_oversize_returns_too_large_without_allocating() {
        let buf = u32::MAX.to_le_bytes();
        let err = read_frame::<_, Msg>(&mut &buf[..], 1, 1024).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { cap: 1024, .. }));
    }

    #[test]
    fn read_frame_truncated_body_returns_truncated() {
        let mut buf = Vec::new();
        write_frame(&mut buf, 1, &Msg::Data(vec![9; 100])).unwrap();
        buf.truncate(50);
        let err = read_frame::<_, Msg>(&mut &buf[..], 1, 1024).unwrap_err();
        assert!(matches!(err, FrameError::Truncated));
        let err = read_frame::<_, Msg>(&mut &buf[..2], 1, 1024).unwrap_err();
        assert!(matches!(err, FrameError::Truncated));
    }

    #[test]
    fn read_frame_wrong_version_is_recoverable() {
        let mut buf = Vec::new();
        write_frame(&mut buf, 2, &Msg::Ping(1)).unwrap();
        write_frame(&mut buf, 1, &Msg::Ping(2)).unwrap();
        let mut r = &buf[..];
        let err = read_frame::<_, Msg>(&mut r, 1, 1024).unwrap_err();
        assert!(matches!(err, FrameError::WrongVersion { got: 2, want: 1 }));
        assert!(err.is_recoverable());
        assert_eq!(read_frame::<_, Msg>(&mut r, 1, 1024).unwrap(), Msg::Ping(2));
    }

    #[test]
    fn read_frame_garbage_payload_returns_decode_error() {
        let buf = [3u8, 0, 0, 0, 1, 0xff, 0xff];
        let err = read_frame::<_, Msg>(&mut &buf[..], 1, 1024).unwrap_err();
        assert!(matches!(err, FrameError::Decode(_)));
    }

    #[test]
    fn read_frame_zero_length_returns_empty() {
        let buf = [0u8; 4];
        let err = read_frame::<_, Msg>(&mut &buf[..], 1, 1024).unwrap_err();
        assert!(matches!(err, FrameError::Empty));
    }
}
