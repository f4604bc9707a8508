//! Template specs: what goes into a guest root image.
//!
//! A spec is TOML (see `templates/python-datasci.toml`). Unknown keys are refused, and every
//! validation error names the offending field, e.g. `apt.packages[2]: "py thon" is not a valid
//! Debian package name`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A parsed and validated template spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Template name; becomes part of the image file name.
    pub name: String,
    /// The Debian base system.
    pub debian: Debian,
    /// Extra Debian packages, installed by debootstrap with their dependencies.
    #[serde(default)]
    pub apt: PackageList,
    /// Python packages installed from wheels (PyPI) for the image's CPython.
    #[serde(default)]
    pub pip: PackageList,
    /// Files copied into the image.
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// Environment for processes the agent starts (written to `/etc/fissile/env`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Commands run inside the image (chroot) at the end of the build.
    #[serde(default)]
    pub run: Vec<RunStep>,
}

/// Debian base system parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debian {
    /// Suite, e.g. `bookworm`.
    pub suite: String,
    /// Mirror URL.
    #[serde(default = "default_mirror")]
    pub mirror: String,
    /// debootstrap variant.
    #[serde(default = "default_variant")]
    pub variant: String,
}

fn default_mirror() -> String {
    "http://deb.debian.org/debian".to_owned()
}

fn default_variant() -> String {
    "minbase".to_owned()
}

/// A list of package names (apt) or requirement specifiers (pip).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageList {
    /// The packages.
    #[serde(default)]
    pub packages: Vec<String>,
}

/// One file to copy into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Source path on the host, relative to the spec file's directory.
    #[serde(default)]
    pub src: Option<PathBuf>,
    /// Inline content (instead of `src`).
    #[serde(default)]
    pub content: Option<String>,
    /// Absolute destination path inside the image.
    pub dest: PathBuf,
    /// Permission bits, e.g. `0o644` (default 0o644).
    #[serde(default = "default_mode")]
    pub mode: u32,
}

fn default_mode() -> u32 {
    0o644
}

/// A command run in the image at build time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunStep {
    /// Shell command, run with `/bin/sh -c` inside the image.
    pub command: String,
}

/// Errors loading a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec file could not be read.
    #[error("cannot read spec {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The TOML is malformed or has unknown/mistyped fields (toml's message names the key).
    #[error("malformed spec {path}: {message}")]
    Parse {
        /// The spec file.
        path: PathBuf,
        /// toml's description, which names the field and position.
        message: String,
    },
    /// A field has a value the builder cannot use.
    #[error("invalid spec field `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the field, e.g. `pip.packages[1]`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// No template of that name ships with the builder.
    #[error("unknown template `{0}` (known: {1})")]
    UnknownTemplate(String, String),
}

/// Templates shipped with the builder: (name, TOML text).
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[(
    "python-datasci",
    include_str!("../templates/python-datasci.toml"),
)];

impl Spec {
    /// Loads a spec from a file, resolving `files[].src` relative to the file's directory.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::Read(path.into(), e))?;
        let mut spec = Spec::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for f in &mut spec.files {
            if let Some(src) = &f.src {
                f.src = Some(base.join(src));
            }
        }
        Ok(spec)
    }

    /// Loads one of the [`BUILTIN_TEMPLATES`].
    pub fn builtin(name: &str) -> Result<Spec, SpecError> {
        let (_, text) = BUILTIN_TEMPLATES
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| {
                let known: Vec<_> = BUILTIN_TEMPLATES.iter().map(|(n, _)| *n).collect();
                SpecError::UnknownTemplate(name.to_owned(), known.join(", "))
            })?;
        Spec::parse(text, Path::new(name))
    }

    /// Parses and validates spec text; `origin` is only used in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Spec, SpecError> {
        let spec: Spec = toml::from_str(text).map_err(|e| SpecError::Parse {
            path: origin.into(),
            message: e.to_string().trim().replace('\n', " | "),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), SpecError> {
        let invalid = |field: String, reason: String| Err(SpecError::Invalid { field, reason });
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return invalid(
                "name".into(),
                format!("{:?} must be non-empty [A-Za-z0-9._-]", self.name),
            );
        }
        if self.debian.suite.is_empty()
            || !self
                .debian
                .suite
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return invalid(
                "debian.suite".into(),
                format!("{:?} is not a Debian suite name", self.debian.suite),
            );
        }
        if !(self.debian.mirror.starts_with("http://")
            || self.debian.mirror.starts_with("https://"))
        {
            return invalid(
                "debian.mirror".into(),
                format!("{:?} is not an http(s) URL", self.debian.mirror),
            );
        }
        if !["minbase", "buildd", "fakechroot"].contains(&self.debian.variant.as_str()) {
            return invalid(
                "debian.variant".into(),
                format!("{:?}: expected minbase or buildd", self.debian.variant),
            );
        }
        for (i, p) in self.apt.packages.iter().enumerate() {
            let ok = !p.is_empty()
                && p.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
            if !ok {
                return invalid(
                    format!("apt.packages[{i}]"),
                    format!("{p:?} is not a valid Debian package name"),
                );
            }
        }
        for (i, p) in self.pip.packages.iter().enumerate() {
            let ok = !p.is_empty()
                && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.[],<>=!~*".contains(c));
            if !ok {
                return invalid(
                    format!("pip.packages[{i}]"),
                    format!("{p:?} is not a valid pip requirement"),
                );
            }
        }
        for (i, f) in self.files.iter().enumerate() {
            if !f.dest.is_absolute() {
                return invalid(
                    format!("files[{i}].dest"),
                    format!("{} must be absolute", f.dest.display()),
                );
            }
            if f.src.is_some() == f.content.is_some() {
                return invalid(
                    format!("files[{i}]"),
                    "exactly one of `src` and `content` is required".into(),
                );
            }
            if f.mode > 0o7777 {
                return invalid(
                    format!("files[{i}].mode"),
                    format!("{:o} is not a permission mode", f.mode),
                );
            }
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return invalid(
                    format!("env.{k}"),
                    "not a valid environment variable name".into(),
                );
            }
        }
        Ok(())
    }

    /// A stable hash of everything that determines the image contents (apart from the agent).
    pub fn content_hash(&self) -> Result<String, SpecError> {
        let mut h = blake3::Hasher::new();
        let canonical = toml::to_string(self).map_err(|e| SpecError::Invalid {
            field: "<spec>".into(),
            reason: e.to_string(),
        })?;
        h.update(canonical.as_bytes());
        for f in &self.files {
            if let Some(src) = &f.src {
                let data = std::fs::read(src).map_err(|e| SpecError::Read(src.clone(), e))?;
                h.update(&data);
            }
        }
        Ok(h.finalize().to_hex()[..16].to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Spec, SpecError> {
        Spec::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn builtin_python_datasci_parses() {
        let spec = Spec::builtin("python-datasci").unwrap();
        assert!(spec.apt.packages.contains(&"python3".to_owned()));
        assert!(spec.pip.packages.iter().any(|p| p.starts_with("pandas")));
    }

    #[test]
    fn unknown_field_error_names_the_field() {
        let err = parse("name='x'\n[debian]\nsuite='bookworm'\nmirorr='http://x'\n").unwrap_err();
        assert!(err.to_string().contains("mirorr"), "{err}");
    }

    #[test]
    fn wrong_type_error_names_the_field() {
        let err =
            parse("name='x'\n[debian]\nsuite='bookworm'\n[apt]\npackages='python3'\n").unwrap_err();
        assert!(err.to_string().contains("packages"), "{err}");
    }

    #[test]
    fn bad_package_name_error_names_index() {
        let err = parse("name='x'\n[debian]\nsuite='bookworm'\n[apt]\npackages=['ok','py thon']\n")
            .unwrap_err();
        assert!(err.to_string().contains("apt.packages[1]"), "{err}");
    }

    #[test]
    fn file_entry_needs_exactly_one_source() {
        let err =
            parse("name='x'\n[debian]\nsuite='bookworm'\n[[files]]\ndest='/etc/x'\n").unwrap_err();
        assert!(err.to_string().contains("files[0]"), "{err}");
    }

    #[test]
    fn content_hash_changes_with_packages() {
        let a = parse("name='x'\n[debian]\nsuite='bookworm'\n[pip]\npackages=['numpy']\n").unwrap();
        let b =
            parse("name='x'\n[debian]\nsuite='bookworm'\n[pip]\npackages=['pandas']\n").unwrap();
        assert_ne!(a.content_hash().unwrap(), b.content_hash().unwrap());
        assert_eq!(a.content_hash().unwrap(), a.clone().content_hash().unwrap());
    }

    #[test]
    fn unknown_template_lists_known_ones() {
        let err = Spec::builtin("nope").unwrap_err();
        assert!(err.to_string().contains("python-datasci"), "{err}");
    }
}
