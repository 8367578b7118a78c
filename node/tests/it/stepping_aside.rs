//! A contributing node steps aside for its owner, on real node processes: it pauses while
//! other programs keep the CPUs busy and while the machine runs on battery (each with its
//! reason, advertising no free slot) and resumes after; on SIGTERM it finishes the task it
//! holds, answers it, and exits cleanly.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Proc, wait_until};
use corvid_node::{Client, Status};
use corvid_sdk::{Graph, Settings};

fn status(dir: &Path) -> Option<Status> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(common::process_status(dir))
}

fn short_bench(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.toml"), "bench_budget = \"300ms\"\n").unwrap();
}

/// Programs that keep every core busy until dropped.
fn hogs() -> Vec<Proc> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..cores)
        .map(|_| {
            Proc(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_busy_machine_pauses_the_node_until_it_is_quiet() {
    let dir = tempfile::tempdir().unwrap();
    short_bench(dir.path());
    let _node = common::node_process(dir.path(), None, &["--pause-when-busy", "90%"]);
    let s = wait_until("the node to run", Duration::from_secs(60), || {
        status(dir.path())
    });
    assert_eq!(s.advert.slots_free, 1);

    let hogs = hogs();
    let s = wait_until(
        "the node to pause for a busy machine",
        Duration::from_secs(60),
        || status(dir.path()).filter(|s| s.paused.is_some()),
    );
    let why = s.paused.clone().unwrap();
    println!("paused: {why}");
    assert!(why.contains("the machine is busy"), "{why}");
    assert!(why.contains("(limit 90%)"), "{why}");
    assert_eq!(s.advert.slots_free, 0, "a paused node offers no slot");

    drop(hogs);
    let s = wait_until(
        "the node to resume once the machine is quiet",
        Duration::from_secs(120),
        || status(dir.path()).filter(|s| s.paused.is_none()),
    );
    assert_eq!(s.advert.slots_free, 1);
}

fn supply(dir: &Path, name: &str, files: &[(&str, &str)]) {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for (f, v) in files {
        std::fs::write(d.join(f), format!("{v}\n")).unwrap();
    }
}

/// The battery rule reads the Linux power-supply class; the test gives the node a directory
/// laid out like `/sys/class/power_supply` and unplugs and replugs the machine there.
#[test]
fn unplugging_the_machine_pauses_the_node_and_plugging_it_in_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    short_bench(dir.path());
    let power = tempfile::tempdir().unwrap();
    let ac = |online: &str| supply(power.path(), "AC", &[("type", "Mains"), ("online", online)]);
    let battery = |state: &str| {
        supply(
            power.path(),
            "BAT0",
            &[("type", "Battery"), ("status", state)],
        )
    };
    ac("1");
    battery("Charging");
    let ps = power.path().to_str().unwrap();
    let _node = Proc(
        common::node_command(dir.path(), None, &["--power-supply-dir", ps])
            .spawn()
            .unwrap(),
    );
    let s = wait_until("the node to run", Duration::from_secs(60), || {
        status(dir.path())
    });
    assert_eq!(s.paused, None);

    ac("0");
    battery("Discharging");
    let s = wait_until(
        "the node to pause on battery",
        Duration::from_secs(30),
        || status(dir.path()).filter(|s| s.paused.is_some()),
    );
    assert_eq!(s.paused.as_deref(), Some("the machine runs on battery"));
    assert_eq!(s.advert.slots_free, 0);

    ac("1");
    battery("Charging");
    let s = wait_until(
        "the node to resume on mains",
        Duration::from_secs(30),
        || status(dir.path()).filter(|s| s.paused.is_none()),
    );
    assert_eq!(s.advert.slots_free, 1);
}

/// SIGTERM while a node holds a requester's only task: the task runs to the end and is
/// answered (the job succeeds: there is no other worker, and the requester never computes
/// in its place), then the node exits with status 0.
#[test]
fn sigterm_finishes_the_task_in_hand_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    short_bench(dir.path());
    let mut node = common::node_process(dir.path(), None, &[]);
    let s = wait_until("the node to run", Duration::from_secs(60), || {
        status(dir.path()).filter(|s| !s.listen_addrs.is_empty())
    });
    let boot = format!("{}/p2p/{}", s.listen_addrs[0], s.peer_id);
    let client = Client::connect([boot.as_str()])
        .unwrap()
        .with_settings(Settings {
            block: 4096,
            ..Settings::default()
        });
    client.wait_for_workers(1, Duration::from_secs(60)).unwrap();

    // One matmul of 58 GFLOP: one task, a second or more on this machine's CPUs.
    let g = Graph::new("sigterm").with_executor(client.executor());
    let out = g
        .random(&[3072, 3072], -1.0, 1.0, 1)
        .matmul(&g.random(&[3072, 3072], -1.0, 1.0, 2))
        .unwrap();
    let eval = std::thread::spawn(move || out.eval_data());
    wait_until("the node to hold the task", Duration::from_secs(60), || {
        status(dir.path()).filter(|s| s.tasks_in_hand > 0)
    });
    let pid = node.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let got = eval.join().unwrap();
    let summary = client.last_summary();
    let got = got.unwrap_or_else(|e| panic!("the job failed: {e}\n{summary:?}"));
    assert_eq!(got.meta().shape, vec![3072, 3072]);
    let exit = wait_until("the node to exit", Duration::from_secs(60), || {
        node.0.try_wait().unwrap()
    });
    assert!(exit.success(), "the node exited with {exit}");
}
