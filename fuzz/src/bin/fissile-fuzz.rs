//! `fissile-fuzz`: a mutation fuzzer on stable Rust for the targets in `fissile_fuzz`.
//!
//! `fissile-fuzz run TARGET --secs N` mutates the inputs of `fuzz/corpus/TARGET` (bit and byte
//! flips, interesting values, inserted, deleted and duplicated ranges, splices of two
//! inputs) and runs the target on each, catching panics; a panicking input is written to
//! `fuzz/artifacts/TARGET/` and the run exits 1. No coverage feedback (that needs nightly
//! and cargo-fuzz): it finds what random structure-aware-ish mutation of valid inputs finds.
//! `fissile-fuzz seed` (re)writes the seed inputs of every target's corpus from valid
//! encodings; `fissile-fuzz list` names the targets.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "fissile-fuzz", about = "Fuzz Fissile's parsers (stable Rust)")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Fuzz one target.
    Run {
        target: String,
        /// How long (seconds).
        #[arg(long, default_value_t = 600)]
        secs: u64,
        /// PRNG seed (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// The corpus root.
        #[arg(long, default_value = "fuzz/corpus")]
        corpus: PathBuf,
        /// Where panicking inputs go.
        #[arg(long, default_value = "fuzz/artifacts")]
        artifacts: PathBuf,
    },
    /// Write the seed inputs (valid encodings) into the corpus.
    Seed {
        #[arg(long, default_value = "fuzz/corpus")]
        corpus: PathBuf,
    },
    /// The targets.
    List,
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::List => {
            for (name, _) in fissile_fuzz::TARGETS {
                println!("{name}");
            }
            Ok(())
        }
        Cmd::Seed { corpus } => fissile_fuzz::seeds::write_all(&corpus),
        Cmd::Run {
            target,
            secs,
            seed,
            corpus,
            artifacts,
        } => run(
            &target,
            Duration::from_secs(secs),
            seed,
            &corpus,
            &artifacts,
        ),
    }
}

/// xorshift64*: deterministic for a seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Largest input the runner makes (the targets' own caps are far above; this keeps a run fast).
const MAX_INPUT: usize = 64 << 10;
const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX,
    u64::MAX >> 1,
];

fn mutate(rng: &mut Rng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..=rng.below(4) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                // An interesting value, little-endian, of width 1, 2, 4 or 8.
                let v = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let w = 1 << rng.below(4);
                let at = rng.below(len);
                for (k, b) in v.iter().take(w).enumerate() {
                    if let Some(slot) = input.get_mut(at + k) {
                        *slot = *b;
                    }
                }
            }
            3 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                input.drain(at..at + n);
            }
            4 if len < MAX_INPUT => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(64);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(at..at, bytes);
            }
            5 if len > 0 && len < MAX_INPUT => {
                // Duplicate a range (repeated structures, long chains).
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                let copy = input[at..at + n].to_vec();
                let to = rng.below(len + 1);
                input.splice(to..to, copy);
            }
            6 if !corpus.is_empty() => {
                // Splice: our head, another input's tail.
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(input.len() + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            _ => {
                if len > 0 {
                    let i = rng.below(len);
                    // A small step either way (counts, lengths, indices off by a few).
                    let delta = rng.below(35) as i8 - 17;
                    input[i] = input[i].wrapping_add_signed(delta);
                }
            }
        }
    }
    input.truncate(MAX_INPUT);
}

fn load_corpus(dir: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut inputs = Vec::new();
    if dir.is_dir() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        paths.sort();
        for p in paths {
            inputs.push(std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?);
        }
    }
    if inputs.is_empty() {
        inputs.push(Vec::new());
    }
    Ok(inputs)
}

fn run(
    name: &str,
    time: Duration,
    seed: Option<u64>,
    corpus_root: &Path,
    artifacts: &Path,
) -> anyhow::Result<()> {
    let Some(target) = fissile_fuzz::target(name) else {
        bail!("no target {name:?}; `fissile-fuzz list` names them");
    };
    let corpus = load_corpus(&corpus_root.join(name))?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    let mut rng = Rng(seed);
    // Panics are findings: keep the default hook from printing each one while we search.
    std::panic::set_hook(Box::new(|_| {}));
    let start = Instant::now();
    let mut execs: u64 = 0;
    let mut last_report = Instant::now();
    while start.elapsed() < time {
        let mut input = corpus[rng.below(corpus.len())].clone();
        mutate(&mut rng, &mut input, &corpus);
        if std::panic::catch_unwind(|| target(&input)).is_err() {
            let _ = std::panic::take_hook();
            let dir = artifacts.join(name);
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(format!("crash-{}", &blake3::hash(&input).to_hex()[..16]));
            std::fs::write(&path, &input)?;
            // Run it again with the default hook, so the panic message is printed.
            let _ = std::panic::catch_unwind(|| target(&input));
            bail!(
                "{name}: input {} panicked after {execs} executions (seed {seed})",
                path.display()
            );
        }
        execs += 1;
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{name}: {execs} executions in {:.0} s",
                start.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name}: {execs} executions in {secs:.0} s ({:.0}/s), {} corpus inputs, seed {seed}, no crash",
        execs as f64 / secs,
        corpus.len()
    );
    Ok(())
}
