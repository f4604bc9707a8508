//! File requests: write, read, list, remove. Binary-safe; sizes capped per response.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use fissile_proto::agent::{
    DirEntry, FILE_CHUNK_MAX, FailureKind, FileKind, LIST_DIR_MAX, Response,
};

/// Maps an I/O error on `path` to a `Failed` response.
fn failed(what: &str, path: &str, e: &io::Error) -> Response {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => FailureKind::NotFound,
        io::ErrorKind::PermissionDenied => FailureKind::PermissionDenied,
        io::ErrorKind::AlreadyExists
        | io::ErrorKind::DirectoryNotEmpty
        | io::ErrorKind::IsADirectory
        | io::ErrorKind::NotADirectory => FailureKind::Conflict,
        _ => FailureKind::Io,
    };
    Response::Failed {
        kind,
        message: format!("{what} {path}: {e}"),
    }
}

/// `WriteFile`: creates parent directories, then writes (or appends) `data`.
pub(crate) fn write(path: &str, data: &[u8], append: bool, mode: Option<u32>) -> Response {
    let p = Path::new(path);
    if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty())
        && let Err(e) = fs::create_dir_all(parent)
    {
        return failed("cannot create the parent directories of", path, &e);
    }
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).mode(mode.unwrap_or(0o644));
    if append {
        opts.append(true);
    } else {
        opts.truncate(true);
    }
    let result = opts.open(p).and_then(|mut f| {
        f.write_all(data)?;
        if let Some(m) = mode {
            f.set_permissions(fs::Permissions::from_mode(m))?;
        }
        Ok(())
    });
    match result {
        Ok(()) => Response::Ok,
        Err(e) => failed("cannot write", path, &e),
    }
}

/// `ReadFile`: up to `max_len` (capped at [`FILE_CHUNK_MAX`]) bytes from `offset`.
pub(crate) fn read(path: &str, offset: u64, max_len: Option<u64>) -> Response {
    let cap = max_len.map_or(FILE_CHUNK_MAX, |m| {
        usize::try_from(m).unwrap_or(usize::MAX).min(FILE_CHUNK_MAX)
    });
    let result = (|| -> io::Result<(Vec<u8>, bool, u64)> {
        let mut f = fs::File::open(path)?;
        let meta = f.metadata()?;
        if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "is a directory",
            ));
        }
        f.seek(SeekFrom::Start(offset))?;
        let mut data = Vec::new();
        (&mut f).take(cap as u64).read_to_end(&mut data)?;
        // At end of file when a read of one more byte returns nothing.
        let eof = data.len() < cap || f.read(&mut [0u8; 1])? == 0;
        Ok((data, eof, meta.len()))
    })();
    match result {
        Ok((data, eof, size)) => Response::FileData { data, eof, size },
        Err(e) => failed("cannot read", path, &e),
    }
}

/// `ListDir`: entries sorted by name, symlinks not followed.
pub(crate) fn list(path: &str) -> Response {
    let rd = match fs::read_dir(path) {
        Ok(rd) => rd,
        Err(e) => return failed("cannot list", path, &e),
    };
    let mut entries = Vec::new();
    let mut truncated = false;
    for ent in rd {
        let ent = match ent {
            Ok(e) => e,
            Err(e) => return failed("cannot list", path, &e),
        };
        if entries.len() == LIST_DIR_MAX {
            truncated = true;
            break;
        }
        let name = ent.file_name().to_string_lossy().into_owned();
        let Ok(meta) = fs::symlink_metadata(ent.path()) else {
            continue; // removed while listing
        };
        let ft = meta.file_type();
        let kind = if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_file() {
            FileKind::File
        } else {
            FileKind::Other
        };
        entries.push(DirEntry {
            name,
            kind,
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Response::DirEntries { entries, truncated }
}

/// `Remove`: a file or symlink; a directory if empty or `recursive`.
pub(crate) fn remove(path: &str, recursive: bool) -> Response {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => return failed("cannot remove", path, &e),
    };
    let result = if !meta.is_dir() {
        fs::remove_file(path)
    } else if recursive {
        fs::remove_dir_all(path)
    } else {
        fs::remove_dir(path)
    };
    match result {
        Ok(()) => Response::Ok,
        Err(e) => failed("cannot remove", path, &e),
    }
}
