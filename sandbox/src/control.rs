//! Client of a VMM's control socket (JSON lines, see `fissile_proto::control`).

use std::io::{BufRead, BufReader, Write};
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
    #[error("the VMM refused: {0}")]
    Refused(String),
}

/// A connection to one VMM's control socket.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, ControlError> {
        let s = UnixStream::connect(path)
            .map_err(|e| ControlError::Connect(path.display().to_string(), e))?;
        let writer = s.try_clone().map_err(ControlError::Io)?;
        Ok(Self {
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sets a read/write timeout (`None`: wait forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ControlError> {
        self.writer.set_read_timeout(t).map_err(ControlError::Io)?;
        self.writer.set_write_timeout(t).map_err(ControlError::Io)
    }

    /// Sends one request, returns its response; `ok: false` becomes [`ControlError::Refused`].
    pub fn call(&mut self, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ControlError::Io(e.into()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(ControlError::Io)?;
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .map_err(ControlError::Io)?;
        let resp: ControlResponse =
            serde_json::from_str(&answer).map_err(|_| ControlError::BadResponse(answer.clone()))?;
        if !resp.ok {
            return Err(ControlError::Refused(resp.error.unwrap_or_default()));
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
