//! Finding Fissile's binaries.

use std::path::{Path, PathBuf};

use crate::SandboxError;

/// Finds binary `name`: in `$FISSILE_BIN_DIR`, next to the running program (also one level
/// up, for test binaries in `target/release/deps`), then on `PATH`.
pub fn find_binary(name: &str) -> Result<PathBuf, SandboxError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("FISSILE_BIN_DIR") {
        dirs.push(d.into());
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        dirs.push(dir.to_path_buf());
        if dir.ends_with("deps")
            && let Some(up) = dir.parent()
        {
            dirs.push(up.to_path_buf());
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| SandboxError::MissingBinary(name.to_string()))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_is_found_on_path_and_nonsense_is_not() {
        assert!(find_binary("sh").is_ok());
        let err = find_binary("no-such-fissile-binary").unwrap_err();
        assert!(err.to_string().contains("no-such-fissile-binary"), "{err}");
    }
}
