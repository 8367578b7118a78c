//! The task decoder's fuzz corpus (`fuzz/corpus/task_decode`, and any crash the fuzzer found in
//! `fuzz/regressions/task_decode`), replayed on the stable toolchain.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

#[test]
fn the_task_decode_corpus_replays() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join("task_decode")) else {
            continue;
        };
        for e in entries {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            corvid_node::net::task::decode_request_for_fuzzing(&data);
            n += 1;
        }
    }
    assert!(n >= 10, "only {n} inputs in the corpus");
}
