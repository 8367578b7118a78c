//! `corvid service install|status|uninstall` on a machine without a systemd user session (as
//! in CI): the unit is written, systemd's own checker accepts it, the command it names starts
//! a real node that `corvid service status` finds and that stops cleanly on SIGTERM (what
//! systemd sends); bad node flags are refused at install time.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Proc, wait_until};

/// `corvid` with its systemd user session out of reach and its config dir in `home`.
fn corvid(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_corvid"))
        .args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_RUNTIME_DIR", home.join("no-session"))
        .env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
        .env("CORVID_LOG", "warn")
        .output()
        .unwrap()
}

/// `ExecStart=` of a unit, unquoted as systemd does for the quoting `corvid` writes.
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let mut args = Vec::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            assert_eq!(c, ' ', "every argument is quoted: {line}");
            continue;
        }
        let mut arg = String::new();
        loop {
            match chars.next().unwrap() {
                '"' => break,
                '\\' => arg.push(chars.next().unwrap()),
                c @ ('%' | '$') => {
                    assert_eq!(chars.next(), Some(c), "{line}");
                    arg.push(c);
                }
                c => arg.push(c),
            }
        }
        args.push(arg);
    }
    args
}

#[test]
fn the_service_unit_runs_a_node_that_stops_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path();
    let data = home.join("data dir");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("config.toml"), "bench_budget = \"300ms\"\n").unwrap();
    let d = data.to_str().unwrap();

    // Flags that would fail at start are refused now, naming the field; nothing is written.
    let bad = corvid(
        home,
        &["service", "install", "--", "--data-dir", d, "--cpus", "0"],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cpus"));
    let unit_path = home.join("config/systemd/user/corvid.service");
    assert!(!unit_path.exists());
    assert_eq!(corvid(home, &["service", "status"]).status.code(), Some(3));

    let flags = [
        "--data-dir",
        d,
        "--backend",
        "cpu",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--pause-when-busy",
        "95%",
    ];
    let mut args = vec!["service", "install", "--"];
    args.extend(flags);
    let out = corvid(home, &args);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{said}");
    assert!(said.contains("not started (no systemd user session answers here)"));
    assert!(said.contains("systemctl --user enable --now corvid.service"));
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    println!("{unit}");
    assert!(unit.contains(&format!("X-CorvidDataDir={d}\n")));

    // systemd's checker, where systemd is installed.
    match Command::new("systemd-analyze")
        .args(["verify"])
        .arg(&unit_path)
        .output()
    {
        Ok(v) => assert!(
            v.status.success(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&v.stderr)
        ),
        Err(e) => eprintln!("no systemd-analyze here ({e}): the unit is not checked by systemd"),
    }

    // What systemd would run.
    let cmd = exec_start(&unit);
    let mut want = vec![env!("CARGO_BIN_EXE_corvid").to_string(), "node".into()];
    want.extend(flags.iter().map(ToString::to_string));
    assert_eq!(cmd, want);
    let mut node = Proc(
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .env("CORVID_NO_PAUSE_ON_BATTERY", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = wait_until(
        "`corvid service status` to find the node",
        Duration::from_secs(60),
        || {
            let out = corvid(home, &["service", "status"]);
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            (out.status.success() && s.contains("corvid node ")).then_some(s)
        },
    );
    println!("{status}");
    assert!(status.contains("unknown (no systemd user session answers here)"));
    assert!(status.contains("taking tasks"), "{status}");

    let pid = node.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = wait_until("the node to stop", Duration::from_secs(60), || {
        node.0.try_wait().unwrap()
    });
    assert!(exit.success(), "{exit}");

    let out = corvid(home, &["service", "uninstall"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped and removed"));
    assert!(!unit_path.exists());
    assert_eq!(corvid(home, &["service", "status"]).status.code(), Some(3));
}
