//! Three real `corvid node` processes on loopback; `corvid peers` on the first lists the other
//! two. Children are killed on drop, so a failing test leaks nothing.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Proc, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_corvid");

fn corvid(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("CORVID_LOG", "warn")
        .output()
        .unwrap()
}

fn start_node(dir: &Path, bootstrap: Option<&str>) -> Proc {
    // The config file layer: a short benchmark (it has no flag) and the slot count.
    std::fs::write(
        dir.join("config.toml"),
        "bench_budget = \"300ms\"\nslots = 3\n",
    )
    .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("node")
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .env("CORVID_BACKEND", "cpu") // the environment layer
        .env("CORVID_NO_PAUSE_ON_BATTERY", "1")
        .args(["--advert-interval", "1s", "--peer-expiry", "5s"])
        .env("CORVID_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", b]);
    }
    Proc(cmd.spawn().unwrap())
}

/// `corvid id --json` of the node running in `dir`, once its control endpoint answers.
fn id_of(dir: &Path) -> serde_json::Value {
    wait_until("the node to be running", Duration::from_secs(30), || {
        if !dir.join("control.addr").exists() {
            return None;
        }
        let out = corvid(&["id", "--json", "--data-dir", dir.to_str()?]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["running"] == true).then_some(v)
    })
}

fn short(id: &str) -> String {
    format!("{}…{}", &id[..8], &id[id.len() - 6..])
}

#[test]
fn three_processes_and_corvid_peers() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut children = vec![start_node(dirs[0].path(), None)];
    let first = id_of(dirs[0].path());
    let bootstrap = first["bootstrap"][0].as_str().unwrap().to_string();
    assert!(
        first["bootstrap_line"]
            .as_str()
            .unwrap()
            .contains(&bootstrap)
    );
    let start = Instant::now();
    for d in &dirs[1..] {
        children.push(start_node(d.path(), Some(&bootstrap)));
    }
    let others: Vec<String> = dirs[1..]
        .iter()
        .map(|d| id_of(d.path())["peer_id"].as_str().unwrap().to_string())
        .collect();

    let dir0 = dirs[0].path().to_str().unwrap();
    let table = wait_until(
        "`corvid peers` to list both others",
        Duration::from_secs(20),
        || {
            let out = corvid(&["peers", "--data-dir", dir0]);
            let text = String::from_utf8(out.stdout).ok()?;
            others
                .iter()
                .all(|id| text.contains(&short(id)))
                .then_some(text)
        },
    );
    println!(
        "peers listed {:?} after the joiners started:\n{table}",
        start.elapsed()
    );
    assert!(table.starts_with("PEER"));
    assert!(table.contains("3/3"), "slots from the config file: {table}");
    assert!(table.contains("2 peers known"));

    // JSON output carries the full peer ids and the scores.
    let out = corvid(&["peers", "--json", "--data-dir", dir0]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for p in v["peers"].as_array().unwrap() {
        assert!(p["matmul_gflops"].as_f64().unwrap() > 0.0);
    }

    // `corvid config dump` shows the key's path and peer id, never the key.
    let out = corvid(&["config", "dump", "--data-dir", dir0]);
    let dump = String::from_utf8(out.stdout).unwrap();
    assert!(
        dump.contains("identity.key") && dump.contains(first["peer_id"].as_str().unwrap()),
        "{dump}"
    );
    let key = std::fs::read(dirs[0].path().join("identity.key")).unwrap();
    assert!(!dump.contains(&format!("{key:?}")));

    drop(children);
    // With the node gone, `corvid peers` says why it cannot answer.
    let out = corvid(&["peers", "--control", "127.0.0.1:9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:9"));
}

/// `corvid id` for a node set to listen on every interface, before it runs, prints addresses
/// others can dial (this machine's interfaces), never `0.0.0.0`.
#[test]
fn corvid_id_never_prints_an_unspecified_address() {
    let dir = tempfile::tempdir().unwrap();
    let out = corvid(&[
        "id",
        "--json",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--listen",
        "/ip4/0.0.0.0/tcp/4001",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["running"], false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("0.0.0.0"), "{text}");
    let addrs = v["bootstrap"].as_array().unwrap();
    assert!(
        !addrs.is_empty()
            && addrs
                .iter()
                .all(|a| a.as_str().unwrap().contains("/tcp/4001/p2p/")),
        "{text}"
    );
    // Loopback is always there; the line names a non-loopback interface when there is one.
    assert!(
        addrs
            .iter()
            .any(|a| a.as_str().unwrap().starts_with("/ip4/127.0.0.1/")),
        "{text}"
    );
    let line = v["bootstrap_line"].as_str().unwrap();
    assert!(line.contains("/tcp/4001/p2p/"), "{line}");
}

/// One raw HTTP/1.1 `GET path` to `addr` with this `Host` header; the status code.
fn get_with_host(addr: &str, path: &str, host: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Endpoint and log hygiene on a real node process: a request addressed to another host name
/// (what a web page gets through DNS rebinding) is refused, one to the loopback address is
/// answered; the log written to a file has no colour codes.
#[test]
fn the_control_endpoint_answers_loopback_hosts_only_and_logs_carry_no_colour() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), "bench_budget = \"300ms\"\n").unwrap();
    let log = dir.path().join("node.log");
    let _node = Proc(
        Command::new(BIN)
            .arg("node")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--backend", "cpu"])
            .env("CORVID_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    id_of(dir.path());
    let addr = std::fs::read_to_string(dir.path().join("control.addr")).unwrap();
    let addr = addr.trim();
    assert_eq!(get_with_host(addr, "/status", addr), 200);
    assert_eq!(get_with_host(addr, "/status", "localhost"), 200);
    for host in [
        "attacker.example",
        "attacker.example:80",
        "127.0.0.1.attacker.example",
    ] {
        assert_eq!(get_with_host(addr, "/status", host), 421, "Host: {host}");
        assert_eq!(get_with_host(addr, "/peers", host), 421, "Host: {host}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("node started"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file:\n{text}"
    );
}

/// `corvid pause` and `corvid resume` on a real node: paused, it advertises no free slot and
/// says why; a request without the token from the data dir (mode 0600) changes nothing.
#[test]
fn pause_and_resume_need_the_token_and_change_the_advert() {
    let dir = tempfile::tempdir().unwrap();
    let _node = start_node(dir.path(), None);
    id_of(dir.path());
    let d = dir.path().to_str().unwrap();
    let status = || -> serde_json::Value {
        let out = corvid(&["peers", "--json", "--data-dir", d]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["status"].clone()
    };
    assert_eq!(status()["advert"]["slots_free"], 3);

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("control.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Without the token, or with another: refused.
    let addr = std::fs::read_to_string(dir.path().join("control.addr")).unwrap();
    let post = |token: Option<&str>| -> u16 {
        use std::io::{Read, Write};
        let addr = addr.trim();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "POST /pause HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(post(None), 401);
    assert_eq!(post(Some("0000")), 401);
    assert_eq!(status()["paused"], serde_json::Value::Null);

    let out = corvid(&["pause", "--reason", "gaming", "--data-dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("paused (gaming)"));
    let s = status();
    assert_eq!(s["paused"], "gaming");
    assert_eq!(s["advert"]["slots_free"], 0);
    assert!(
        String::from_utf8_lossy(&corvid(&["peers", "--data-dir", d]).stdout)
            .contains("paused (gaming)")
    );
    let summary = corvid(&["status", "--data-dir", d]);
    let summary = String::from_utf8_lossy(&summary.stdout);
    assert!(
        summary.contains("state        paused (gaming)"),
        "{summary}"
    );
    assert!(
        summary.contains("status page  http://127.0.0.1:"),
        "{summary}"
    );

    let out = corvid(&["resume", "--data-dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = status();
    assert_eq!(s["paused"], serde_json::Value::Null);
    assert_eq!(s["advert"]["slots_free"], 3);
}

/// CPU seconds (user and system) process `pid` has used so far.
fn cpu_seconds(pid: u64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name), in
    // clock ticks: 100 a second on Linux (USER_HZ).
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) as f64 / 100.0
}

/// `--cpus 1`: a node kept busy by a requester uses about one core (node and executor
/// processes together, from /proc), where the machine has more. The bound is on CPU time per
/// wall time, not on either alone.
#[test]
fn one_cpu_keeps_a_busy_node_to_about_one_core() {
    use corvid_sdk::{Graph, Settings};
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("SKIPPED: one core here, nothing to cap");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), "bench_budget = \"300ms\"\n").unwrap();
    let node = common::node_process(dir.path(), None, &["--cpus", "1"]);
    let id = id_of(dir.path());
    let boot = id["bootstrap"][0].as_str().unwrap().to_string();
    let d = dir.path().to_str().unwrap().to_string();
    let status = corvid(&["peers", "--json", "--data-dir", &d]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let executor = status["status"]["executor"]["pid"].as_u64().unwrap();
    let node_pid = u64::from(node.0.id());

    let client = corvid_node::Client::builder()
        .bootstrap(&boot)
        .wait_for_workers(1, Duration::from_secs(30))
        .connect()
        .unwrap()
        .with_settings(Settings {
            block: 1024,
            ..Settings::default()
        });
    let busy = || cpu_seconds(node_pid) + cpu_seconds(executor);
    let (cpu0, t0) = (busy(), Instant::now());
    let g = Graph::new("busy").with_executor(client.executor());
    let mut x = g.random(&[1024, 1024], -1.0, 1.0, 1);
    for i in 0..16 {
        x = x
            .matmul(&g.random(&[1024, 1024], -0.03, 0.03, 10 + i))
            .unwrap();
    }
    x.eval_data().unwrap();
    let (cpu, wall) = (busy() - cpu0, t0.elapsed().as_secs_f64());
    let s = client.last_summary().unwrap();
    println!(
        "--cpus 1 on {cores} cores: {cpu:.2} CPU s in {wall:.2} s = {:.2} cores\n{s}",
        cpu / wall
    );
    assert!(cpu > 0.3, "the node did little work ({cpu:.2} CPU s): {s}");
    assert!(
        cpu / wall < 1.35,
        "--cpus 1 used {:.2} cores ({cpu:.2} CPU s in {wall:.2} s)",
        cpu / wall
    );
}
