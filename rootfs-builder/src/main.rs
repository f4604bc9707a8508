//! `fissile-rootfs`: build a guest root image from a template spec.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fissile_rootfs::{BuildRequest, Spec, build, default_cache, progress::Progress};

#[derive(Parser)]
#[command(about = "Build Fissile guest root images from template specs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or find in the cache) an image and print its path on stdout.
    Build {
        /// A built-in template name.
        #[arg(long, conflicts_with = "spec", default_value = "python-datasci")]
        template: String,
        /// A template spec file (TOML) instead of a built-in template.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// The guest agent binary (default: the release build in $CARGO_TARGET_DIR).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Cache root (default $FISSILE_CACHE or /var/cache/fissile).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Parse and validate a spec, print its content hash.
    Check {
        /// The spec file.
        spec: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Build {
            template,
            spec,
            agent,
            cache,
        } => {
            let spec = match spec {
                Some(path) => Spec::load(&path)?,
                None => Spec::builtin(&template)?,
            };
            let cache = cache.unwrap_or_else(default_cache);
            let agent = agent.unwrap_or_else(|| {
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| cache.join("target"));
                target.join("release/fissile-agent")
            });
            let mut progress = Progress::new();
            let image = build(&BuildRequest { spec, agent, cache }, &mut progress)
                .context("image build failed")?;
            println!("{}", image.display());
        }
        Cmd::Check { spec } => {
            let spec = Spec::load(&spec)?;
            println!("{} {}", spec.name, spec.content_hash()?);
        }
    }
    Ok(())
}
