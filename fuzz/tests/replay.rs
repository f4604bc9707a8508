//! Replays every input in `fuzz/corpus/<target>/` (seeds, and inputs that once crashed a
//! target) through its target on stable Rust: a regression fails `cargo test`. Also checks
//! that every target has a corpus and that the seeds in it are the current ones.

use std::path::Path;

#[test]
fn every_corpus_input_runs_through_its_target_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, target) in fissile_fuzz::TARGETS {
        let dir = root.join(name);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&input));
            assert!(outcome.is_ok(), "{name}: {} panics", path.display());
            n += 1;
        }
        assert!(n > 0, "{name}: empty corpus");
    }
}

#[test]
fn the_checked_in_seeds_are_the_current_encodings() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, seeds) in fissile_fuzz::seeds::all().unwrap() {
        for (i, seed) in seeds.iter().enumerate() {
            let path = root.join(name).join(format!("seed-{i}"));
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == *seed,
                "{} is stale: run `cargo run -p fissile-fuzz -- seed` and commit",
                path.display()
            );
        }
    }
}
