//! Files in a sandbox, binary-safe and streamed both ways: an upload is written in pieces as
//! it arrives (to a temporary name, renamed into place when complete, so a failed or
//! oversize upload leaves the old file as it was); a download is read in pieces as the
//! client takes them. Neither is held whole in the daemon. Both are capped
//! ([`crate::app::Config::max_file_bytes`]).

use std::path::PathBuf;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use fissile_agent::AgentClient;
use fissile_proto::agent::{FILE_CHUNK_MAX, FileKind, Request, Response as AgentResponse};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt as _;

use crate::app::{StreamGuard, blocking};
use crate::error::ApiError;
use crate::exec::connect;

/// Longest accepted guest path.
pub const MAX_PATH_BYTES: usize = 4096;

/// Pieces an upload writes at a time (smaller than the agent's frame cap).
const UPLOAD_PIECE: usize = 1 << 20;

/// Checks a guest path from a client: absolute, no NUL, no `..` component, not too long.
pub fn guest_path(path: &str) -> Result<String, ApiError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(ApiError::bad_request(format!(
            "path is longer than {MAX_PATH_BYTES} bytes"
        )));
    }
    if path.contains('\0') {
        return Err(ApiError::bad_request("path contains a NUL byte"));
    }
    if !path.starts_with('/') {
        return Err(ApiError::bad_request(format!(
            "path must be absolute, got {path:?}"
        )));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(ApiError::bad_request(format!(
            "path must not contain `..`, got {path:?}"
        )));
    }
    Ok(path.to_string())
}

/// True for `/` however it is spelled (`//`, `/./`, ...).
pub fn is_root(path: &str) -> bool {
    path.split('/').all(|c| c.is_empty() || c == ".")
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EntryView {
    /// File name.
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Modified (ms since the epoch).
    pub modified_at_ms: i64,
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListView {
    /// Entries by name.
    pub entries: Vec<EntryView>,
    /// More entries than the agent returns at once.
    pub truncated: bool,
}

/// What an upload wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadView {
    /// The path.
    pub path: String,
    /// Bytes written.
    pub size: u64,
}

/// Lists directory `path`.
pub async fn list(vsock: PathBuf, path: String) -> Result<ListView, ApiError> {
    blocking(move || {
        let mut agent = connect(&vsock)?;
        match agent
            .call(&Request::ListDir { path: path.clone() })
            .map_err(|e| ApiError::agent("listing", &e))?
        {
            AgentResponse::DirEntries { entries, truncated } => Ok(ListView {
                entries: entries
                    .into_iter()
                    .map(|e| EntryView {
                        name: e.name,
                        kind: match e.kind {
                            FileKind::File => "file",
                            FileKind::Dir => "dir",
                            FileKind::Symlink => "symlink",
                            FileKind::Other => "other",
                        }
                        .into(),
                        size: e.size,
                        mode: e.mode,
                        modified_at_ms: e.mtime_ns / 1_000_000,
                    })
                    .collect(),
                truncated,
            }),
            AgentResponse::Failed { kind, message } => Err(ApiError::agent(
                "listing",
                &fissile_agent::ClientError::Failed { kind, message },
            )),
            r => Err(ApiError::internal(format!("listing: unexpected {r:?}"))),
        }
    })
    .await
}

/// Removes `path` (a directory only with `recursive`); never the guest's root.
pub async fn remove(vsock: PathBuf, path: String, recursive: bool) -> Result<(), ApiError> {
    if is_root(&path) {
        return Err(ApiError::bad_request(
            "refusing to remove / (the guest's root): name what to remove under it",
        ));
    }
    blocking(move || {
        connect(&vsock)?
            .remove(&path, recursive)
            .map_err(|e| ApiError::agent("removing", &e))
    })
    .await
}

fn read_piece(
    agent: &mut AgentClient,
    path: &str,
    offset: u64,
) -> Result<(Vec<u8>, bool, u64), ApiError> {
    let req = Request::ReadFile {
        path: path.to_string(),
        offset,
        max_len: Some(FILE_CHUNK_MAX as u64),
    };
    match agent
        .call(&req)
        .map_err(|e| ApiError::agent("reading", &e))?
    {
        AgentResponse::FileData { data, eof, size } => Ok((data, eof, size)),
        AgentResponse::Failed { kind, message } => Err(ApiError::agent(
            "reading",
            &fissile_agent::ClientError::Failed { kind, message },
        )),
        r => Err(ApiError::internal(format!("reading: unexpected {r:?}"))),
    }
}

/// Streams file `path` to the client (at most `max` bytes: a larger file is 413 before any
/// byte is sent). The first piece is read before answering, so a missing file is a 404.
pub async fn download(
    vsock: PathBuf,
    path: String,
    max: u64,
    guard: StreamGuard,
) -> Result<Response, ApiError> {
    let (mut agent, first, eof, size) = {
        let path = path.clone();
        blocking(move || {
            let mut agent = connect(&vsock)?;
            let (data, eof, size) = read_piece(&mut agent, &path, 0)?;
            Ok((agent, data, eof, size))
        })
        .await?
    };
    if size > max {
        return Err(ApiError::too_large(format!(
            "{path} is {size} bytes; downloads are limited to {max}"
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let mut offset = first.len() as u64;
        if tx.blocking_send(Ok(Bytes::from(first))).is_err() || eof {
            return;
        }
        loop {
            let piece = read_piece(&mut agent, &path, offset);
            let (data, eof) = match piece {
                Ok((data, eof, _)) => (data, eof),
                Err(e) => {
                    // Mid-stream: the client sees a truncated body (the connection is cut).
                    let _ = tx.blocking_send(Err(std::io::Error::other(e.message)));
                    return;
                }
            };
            offset += data.len() as u64;
            if offset > max {
                let _ =
                    tx.blocking_send(Err(std::io::Error::other("the file grew past the limit")));
                return;
            }
            let empty = data.is_empty();
            if tx.blocking_send(Ok(Bytes::from(data))).is_err() || eof || empty {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (
                axum::http::HeaderName::from_static("x-file-size"),
                size.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

/// Writes the request body to `path` as it arrives (at most `max` bytes), to a temporary
/// name first and renamed into place once complete.
pub async fn upload(
    vsock: PathBuf,
    path: String,
    body: Body,
    max: u64,
    guard: StreamGuard,
) -> Result<UploadView, ApiError> {
    // `Some(bytes)` a piece, `None` the end: a channel that closes without the end marker
    // is an aborted upload, which is never moved into place.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(4);
    let target = path.clone();
    let worker = tokio::task::spawn_blocking(move || -> Result<u64, ApiError> {
        let _guard = guard;
        let mut agent = connect(&vsock)?;
        let suffix = crate::db::random_hex(6)?;
        let tmp = format!("{target}.fissile-upload-{suffix}");
        let result = (|| {
            let mut written = 0u64;
            let mut pending: Vec<u8> = Vec::with_capacity(UPLOAD_PIECE);
            let mut first = true;
            let flush = |agent: &mut AgentClient, pending: &mut Vec<u8>, first: &mut bool| {
                agent
                    .write_file_part(&tmp, pending, !*first, None)
                    .map_err(|e| ApiError::agent("writing", &e))?;
                *first = false;
                pending.clear();
                Ok::<(), ApiError>(())
            };
            loop {
                match rx.blocking_recv() {
                    Some(Some(chunk)) => {
                        written += chunk.len() as u64;
                        pending.extend_from_slice(&chunk);
                        if pending.len() >= UPLOAD_PIECE {
                            flush(&mut agent, &mut pending, &mut first)?;
                        }
                    }
                    Some(None) => break,
                    None => return Err(ApiError::bad_request("the upload was cut short")),
                }
            }
            flush(&mut agent, &mut pending, &mut first)?;
            Ok(written)
        })();
        let finished = result.and_then(|written| {
            rename(&mut agent, &tmp, &target)?;
            Ok(written)
        });
        if finished.is_err() {
            let _ = agent.remove(&tmp, false);
        }
        finished
    });
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                total += c.len() as u64;
                if total > max {
                    failure = Some(ApiError::too_large(format!(
                        "uploads are limited to {max} bytes"
                    )));
                    break;
                }
                if tx.send(Some(c)).await.is_err() {
                    break; // the worker failed; its error is returned below
                }
            }
            Err(e) => {
                failure = Some(ApiError::bad_request(format!("reading the body: {e}")));
                break;
            }
        }
    }
    if let Some(f) = failure {
        // Closing the channel without the end marker makes the worker discard the
        // temporary file.
        drop(tx);
        let _ = worker.await;
        return Err(f);
    }
    // The worker may have failed already (then the send fails and its error is returned).
    let _ = tx.send(None).await;
    drop(tx);
    let size = worker
        .await
        .map_err(|e| ApiError::internal(format!("upload worker: {e}")))??;
    Ok(UploadView { path, size })
}

/// Moves `from` over `to` in the guest (one `rename`, atomic within a file system).
fn rename(agent: &mut AgentClient, from: &str, to: &str) -> Result<(), ApiError> {
    let req = fissile_proto::agent::ShellRequest {
        command: fissile_proto::agent::ShellCommand::Argv(vec![
            "mv".into(),
            "-f".into(),
            "--".into(),
            from.into(),
            to.into(),
        ]),
        cwd: None,
        env: Default::default(),
        stdin: Vec::new(),
        timeout_ms: Some(60_000),
    };
    let out = agent
        .shell(&req)
        .map_err(|e| ApiError::agent("moving the upload into place", &e))?;
    if out.done.exit_status != Some(0) {
        return Err(ApiError::conflict(format!(
            "moving the upload into place: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_must_be_absolute_without_dotdot_or_nul() {
        for root in ["/", "//", "/./", "/.//."] {
            assert!(is_root(root), "{root}");
        }
        for not_root in ["/tmp", "/./tmp", "/.x"] {
            assert!(!is_root(not_root), "{not_root}");
        }
        assert_eq!(guest_path("/tmp/a.txt").unwrap(), "/tmp/a.txt");
        assert_eq!(guest_path("/tmp/..data/x").unwrap(), "/tmp/..data/x");
        for bad in ["tmp/a", "/tmp/../etc/passwd", "/a\0b", "", "/.."] {
            assert_eq!(guest_path(bad).unwrap_err().code, "bad_request", "{bad:?}");
        }
        assert_eq!(
            guest_path(&format!("/{}", "a".repeat(MAX_PATH_BYTES)))
                .unwrap_err()
                .code,
            "bad_request"
        );
    }
}
