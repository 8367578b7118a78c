//! The status page of a real node process, in a real browser: headless Chromium loads it,
//! the test reads the DOM it rendered (the node's state and its peer) and keeps a screenshot.
//! Without Chromium the test says it was skipped; with `CORVID_REQUIRE_BROWSER=1` (the test
//! script sets it as root, after installing Debian's chromium) that is a failure.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Proc, node_process, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_corvid");

/// A node process in `dir` with a short benchmark and second-scale adverts.
fn node(dir: &Path, bootstrap: Option<&str>) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.toml"), "bench_budget = \"300ms\"\n").unwrap();
    node_process(
        dir,
        bootstrap,
        &["--advert-interval", "1s", "--peer-expiry", "5s"],
    )
}

fn json(args: &[&str]) -> Option<serde_json::Value> {
    let out = Command::new(BIN).args(args).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Headless Chromium with a fresh profile and no background traffic, on `url`.
fn chromium(profile: &Path, extra: &[&str], url: &str) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_status_page_renders_in_a_browser_with_the_nodes_peers() {
    if Command::new("chromium").arg("--version").output().is_err() {
        assert!(
            std::env::var("CORVID_REQUIRE_BROWSER").is_err(),
            "CORVID_REQUIRE_BROWSER is set but chromium is missing"
        );
        eprintln!(
            "SKIPPED page::the_status_page_renders_in_a_browser: no chromium (scripts/test.sh installs it as root)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let _a = node(&a, None);
    let id_a = wait_until("node a", Duration::from_secs(60), || {
        let v = json(&["id", "--json", "--data-dir", a.to_str()?])?;
        (v["running"] == true).then_some(v)
    });
    let boot = id_a["bootstrap"][0].as_str().unwrap().to_string();
    let _b = node(&b, Some(&boot));
    let id_b = wait_until("node b", Duration::from_secs(60), || {
        let v = json(&["id", "--json", "--data-dir", b.to_str()?])?;
        (v["running"] == true).then_some(v)
    });
    let peer_b = id_b["peer_id"].as_str().unwrap().to_string();
    wait_until("a to know b", Duration::from_secs(60), || {
        let v = json(&["peers", "--json", "--data-dir", a.to_str()?])?;
        v["peers"]
            .as_array()?
            .iter()
            .any(|p| p["peer_id"] == peer_b.as_str())
            .then_some(())
    });

    // Work for a, so that the page has a contribution to show.
    let client = corvid_node::Client::connect([boot.as_str()])
        .unwrap()
        .with_settings(corvid_sdk::Settings {
            block: 64,
            ..corvid_sdk::Settings::default()
        });
    client.wait_for_workers(2, Duration::from_secs(60)).unwrap();
    let mut seed = 0;
    let tally = wait_until("a to do a task", Duration::from_secs(120), || {
        seed += 2;
        let g = corvid_sdk::Graph::new("page").with_executor(client.executor());
        g.random(&[256, 64], -1.0, 1.0, seed)
            .matmul(&g.random(&[64, 256], -1.0, 1.0, seed + 1))
            .unwrap()
            .eval_data()
            .unwrap();
        let v = json(&["status", "--json", "--data-dir", a.to_str()?])?;
        let tasks = v["contributed"]["total"]["tasks"].as_u64()?;
        (tasks > 0).then_some(tasks)
    });

    let control = std::fs::read_to_string(a.join("control.addr")).unwrap();
    let url = format!("http://{}/", control.trim());
    let profile = dir.path().join("chromium");
    let dom = chromium(&profile, &["--dump-dom"], &url);
    let dom = String::from_utf8_lossy(&dom.stdout);
    let short_b = format!("{}…{}", &peer_b[..8], &peer_b[peer_b.len() - 6..]);
    assert!(dom.contains("Taking tasks"), "{dom}");
    assert!(
        dom.contains(&short_b),
        "the page lists peer {short_b}:\n{dom}"
    );
    assert!(dom.contains("GFLOP/s"), "{dom}");
    assert!(
        dom.contains(&format!("in all {tally} tasks")),
        "the page shows what a contributed ({tally} tasks):\n{dom}"
    );

    let shot = dir.path().join("status.png");
    chromium(
        &profile,
        &[&format!("--screenshot={}", shot.display())],
        &url,
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    assert!(
        png.len() > 10_000,
        "a screenshot of a page with content ({} bytes)",
        png.len()
    );
    // Kept for a look: target/status-page.png.
    let _ = std::fs::copy(
        &shot,
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/status-page.png"),
    );
}
