//! Builds Fissile guest root images from template specs.
//!
//! `fissile-rootfs build --template python-datasci` produces a read-only ext4 image: a Debian
//! base from debootstrap, Python wheels from PyPI, files, environment, and the guest agent as
//! `/usr/sbin/fissile-agent` (the kernel's `init=`). Results are cached by content hash; see
//! [`build`] for the cache layout.

pub mod build;
pub mod progress;
pub mod spec;

pub use build::{AGENT_PATH, BuildError, BuildRequest, build};
pub use spec::{Spec, SpecError};

/// The default cache root: `$FISSILE_CACHE`, else `/var/cache/fissile`.
pub fn default_cache() -> std::path::PathBuf {
    std::env::var_os("FISSILE_CACHE")
        .map(Into::into)
        .unwrap_or_else(|| "/var/cache/fissile".into())
}
