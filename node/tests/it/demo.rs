//! `corvid demo --cheater`, the README's first command with a cheating worker added: real
//! worker processes compute both workloads bit-equal to local evaluation, and the cheater is
//! caught and banned with evidence. The demo kills its workers itself; `timeout` bounds it.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_corvid");

#[test]
fn the_demo_computes_across_worker_processes_and_bans_a_cheater() {
    let out = Command::new("timeout")
        .args(["120", BIN, "demo", "--cheater", "--size", "256"])
        .env("CORVID_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout
            .matches("matches local evaluation bit for bit")
            .count(),
        2,
        "{stdout}"
    );
    assert!(stdout.contains("verified: "), "{stdout}");
    assert!(
        stdout.contains("banned ") && stdout.contains("evidence: subgraph"),
        "the cheating worker must be caught:\n{stdout}"
    );
    assert!(stdout.contains("workers stopped"), "{stdout}");
}
