//! Client of a VMM's control socket (JSON lines, see `fissile_proto::control`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use fissile_proto::control::{ControlRequest, ControlResponse, VmStatus};

/// A control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Connecting to the socket failed.
    #[error("connecting to control socket {0}")]
    Connect(String, #[source] std::io::Error),
    /// Sending or receiving failed.
    #[error("control socket i/o")]
    Io(#[source] std::io::Error),
    /// The VMM's answer is not a response.
    #[error("bad control response {0:?}")]
    BadResponse(String),
    /// The VMM refused the request.
    #[error("the VMM refused ({kind:?}): {message}")]
    Refused {
        /// The failure kind (how an HTTP layer maps it).
        kind: fissile_proto::control::ErrorKind,
        /// The VMM's message.
        message: String,
    },
}

/// How long a control call may take by default: a little longer than the VMM's own bound on
/// an operation (`fissile_vmm::vmm::OP_TIMEOUT`, 600 s), so its error arrives first.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(660);

/// A connection to one VMM's control socket.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to the socket at `path`; every call waits at most [`DEFAULT_TIMEOUT`].
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let s = UnixStream::connect(path)
            .map_err(|e| ControlError::Connect(path.display().to_string(), e))?;
        let writer = s.try_clone().map_err(ControlError::Io)?;
        let client = Self {
            reader: BufReader::new(s),
            writer,
        };
        client.set_timeout(DEFAULT_TIMEOUT)?;
        Ok(client)
    }

    /// Sets the read and write timeout of every call.
    pub fn set_timeout(&self, t: Duration) -> Result<(), ControlError> {
        self.writer
            .set_read_timeout(Some(t))
            .map_err(ControlError::Io)?;
        self.writer
            .set_write_timeout(Some(t))
            .map_err(ControlError::Io)
    }

    /// Sends one request, returns its response; `ok: false` becomes [`ControlError::Refused`].
    pub fn call(&mut self, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Io(e.into()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(ControlError::Io)?;
        let mut answer = String::new();
        (&mut self.reader)
            .take(fissile_proto::control::MAX_REQUEST_LINE as u64 * 64)
            .read_line(&mut answer)
            .map_err(ControlError::Io)?;
        let resp: ControlResponse =
            serde_json::from_str(&answer).map_err(|_| ControlError::BadResponse(answer.clone()))?;
        if !resp.ok {
            return Err(ControlError::Refused {
                kind: resp
                    .error_kind
                    .unwrap_or(fissile_proto::control::ErrorKind::Internal),
                message: resp.error.unwrap_or_default(),
            });
        }
        Ok(resp)
    }

    /// VM status.
    pub fn status(&mut self) -> Result<VmStatus, ControlError> {
        let resp = self.call(&ControlRequest::Status)?;
        resp.status
            .ok_or_else(|| ControlError::BadResponse("status without body".into()))
    }

    /// Pauses the VM.
    pub fn pause(&mut self) -> Result<(), ControlError> {
        self.call(&ControlRequest::Pause).map(drop)
    }

    /// Resumes the VM.
    pub fn resume(&mut self) -> Result<(), ControlError> {
        self.call(&ControlRequest::Resume).map(drop)
    }

    /// Stops the VM.
    pub fn shutdown(&mut self) -> Result<(), ControlError> {
        self.call(&ControlRequest::Shutdown).map(drop)
    }
}
