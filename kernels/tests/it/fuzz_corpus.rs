//! The fuzz corpora (`fuzz/corpus/`), replayed as ordinary tests on the stable toolchain: every
//! input the fuzzers kept, and every crash they found (`fuzz/regressions/`), must run through
//! the targets without a panic.
#![cfg(feature = "fuzzing")]
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use corvid_kernels::fuzzing::{run_structured, validate_bytes};

/// Runs `target` on every file kept for `name`; returns how many there were.
fn replay(name: &str, target: fn(&[u8])) -> usize {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in [
        root.join("corpus").join(name),
        root.join("regressions").join(name),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let started = std::time::Instant::now();
            target(&data);
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "{} took {:?}",
                path.display(),
                started.elapsed()
            );
            n += 1;
        }
    }
    n
}

#[test]
fn the_program_validate_corpus_replays() {
    let n = replay("program_validate", validate_bytes);
    assert!(n >= 10, "only {n} inputs in the corpus");
}

#[test]
fn the_program_run_corpus_replays() {
    let n = replay("program_run", run_structured);
    assert!(n >= 10, "only {n} inputs in the corpus");
}
