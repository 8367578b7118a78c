//! Linux network namespaces for tests of real network stacks: an "internet" namespace that
//! routes between two public hosts and two homes, each home behind its own NAT router
//! (nftables masquerade); all removed even when the test fails:
//!
//! ```text
//!  home1 192.168.71.2 ─ 192.168.71.1 router1 10.77.1.2 ─ 10.77.1.1 ┐
//!  home2 192.168.72.2 ─ 192.168.72.1 router2 10.77.2.2 ─ 10.77.2.1 ┤ internet
//!  host A 10.77.3.2 ─────────────────────────────────── 10.77.3.1 ┤
//!  host B 10.77.4.2 ─────────────────────────────────── 10.77.4.1 ┘
//! ```
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};

use super::Proc;

/// Runs a command; its status and stderr as the error.
pub fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `nft -f -` with `rules`, inside namespace `ns`.
pub fn nft(ns: &str, rules: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// How a home router picks the public port of a connection from inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// The inside port, when free (Linux's default, and most home routers'): hole punching
    /// can work.
    PortPreserving,
    /// A random port per connection (like a symmetric NAT): the port a peer saw is not the
    /// one the next connection gets, so hole punching cannot work.
    Random,
}

/// The namespaces of one run, deleted when dropped (their interfaces go with them).
pub struct Net {
    tag: String,
    made: Vec<String>,
}

impl Net {
    pub fn ns(&self, name: &str) -> String {
        format!("cv{name}{}", self.tag)
    }

    fn add(&mut self, name: &str) -> Result<String, String> {
        let ns = self.ns(name);
        run("ip", &["netns", "add", &ns])?;
        self.made.push(ns.clone());
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A veth pair between `a` and `b`, with these addresses (a /24 each).
    fn link(&self, a: (&str, &str), b: (&str, &str), name: &str) -> Result<(), String> {
        let (ia, ib) = (
            format!("{name}a{}", self.tag),
            format!("{name}b{}", self.tag),
        );
        run(
            "ip",
            &["link", "add", &ia, "type", "veth", "peer", "name", &ib],
        )?;
        for ((ns, addr), ifname) in [(a, &ia), (b, &ib)] {
            run("ip", &["link", "set", ifname, "netns", ns])?;
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    ifname,
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// The topology above. Returns (public host A, home1, home2, public host B).
    pub fn build() -> Result<(Net, [String; 4]), String> {
        Net::build_with([Mapping::PortPreserving; 2])
    }

    /// The topology above, each home's router mapping ports as given.
    pub fn build_with(mappings: [Mapping; 2]) -> Result<(Net, [String; 4]), String> {
        let mut net = Net {
            // Unique per topology: tests in one process build theirs at the same time (veth
            // names are made in the root namespace; 15 characters at most).
            tag: {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("{}{n}", std::process::id() % 100_000)
            },
            made: Vec::new(),
        };
        let internet = net.add("p")?;
        let mut homes = Vec::new();
        for i in 1..=2 {
            let router = net.add(&format!("r{i}"))?;
            let home = net.add(&format!("h{i}"))?;
            let (wan_pub, wan_router) = (format!("10.77.{i}.1"), format!("10.77.{i}.2"));
            let (lan_router, lan_home) = (format!("192.168.7{i}.1"), format!("192.168.7{i}.2"));
            net.link(
                (&internet, &wan_pub),
                (&router, &wan_router),
                &format!("w{i}"),
            )?;
            net.link((&router, &lan_router), (&home, &lan_home), &format!("l{i}"))?;
            run(
                "ip",
                &["-n", &router, "route", "add", "default", "via", &wan_pub],
            )?;
            run(
                "ip",
                &["-n", &home, "route", "add", "default", "via", &lan_router],
            )?;
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &router,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ],
            )?;
            // The router rewrites whatever leaves its public side to its own address, and
            // drops what arrives there unasked (as home routers do: no reset is sent back).
            let wan = format!("w{i}b{}", net.tag);
            let masquerade = match mappings[i - 1] {
                Mapping::PortPreserving => "masquerade",
                Mapping::Random => "masquerade random",
            };
            nft(
                &router,
                &format!(
                    "table ip nat {{\n chain postrouting {{\n  type nat hook postrouting \
                     priority 100;\n  oifname \"{wan}\" {masquerade}\n }}\n}}\n\
                     table ip filter {{\n chain input {{\n  type filter hook input priority 0;\n  \
                     iifname \"{wan}\" ct state established,related accept\n  \
                     iifname \"{wan}\" drop\n }}\n chain forward {{\n  type filter hook forward \
                     priority 0;\n  iifname \"{wan}\" ct state established,related accept\n  \
                     iifname \"{wan}\" drop\n }}\n}}\n"
                ),
            )?;
            homes.push(home);
        }
        // Two public hosts with an address each (10.77.3.2, 10.77.4.2), behind the internet
        // namespace, which routes between everyone's public addresses.
        let mut hosts = Vec::new();
        for (i, name) in [(3, "a"), (4, "b")] {
            let host = net.add(name)?;
            let (gateway, addr) = (format!("10.77.{i}.1"), format!("10.77.{i}.2"));
            net.link((&internet, &gateway), (&host, &addr), &format!("w{i}"))?;
            run(
                "ip",
                &["-n", &host, "route", "add", "default", "via", &gateway],
            )?;
            hosts.push(host);
        }
        run(
            "ip",
            &[
                "netns",
                "exec",
                &internet,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        let [h1, h2] = <[String; 2]>::try_from(homes).unwrap();
        let [a, b] = <[String; 2]>::try_from(hosts).unwrap();
        Ok((net, [a, h1, h2, b]))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

/// Why this machine cannot run the test, if it cannot.
pub fn unsupported() -> Option<String> {
    if rustix::process::geteuid().as_raw() != 0 {
        return Some("not root: network namespaces need CAP_SYS_ADMIN".into());
    }
    for (cmd, arg) in [("ip", "-V"), ("nft", "--version")] {
        if run(cmd, &[arg]).is_err() {
            return Some(format!("`{cmd}` is missing (scripts/test.sh installs it)"));
        }
    }
    None
}

/// Runs `f` on a thread inside namespace `ns` (sockets it opens, and threads it starts, are
/// there).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_ns(ns, f).join().unwrap()
}

/// A `corvid node` process inside `ns`: CPU, one slot, listening on every address at `port`.
pub fn node_in(ns: &str, dir: &Path, port: u16, boot: Option<&str>) -> Proc {
    node_in_with(ns, dir, port, boot, &[])
}

/// [`node_in`] with more flags.
pub fn node_in_with(ns: &str, dir: &Path, port: u16, boot: Option<&str>, extra: &[&str]) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.toml"), "bench_budget = \"300ms\"\n").unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_corvid")])
        .args([
            "--log",
            &std::env::var("CORVID_NETNS_LOG").unwrap_or("warn".into()),
            "node",
            "--backend",
            "cpu",
            "--slots",
            "1",
            // No port-mapping requests (multicast) from tests: there is no gateway to ask.
            "--no-upnp",
        ])
        .args(["--listen", &format!("/ip4/0.0.0.0/tcp/{port}")])
        .env("CORVID_NO_PAUSE_ON_BATTERY", "1")
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(b) = boot {
        cmd.args(["--bootstrap", b]);
    }
    cmd.args(extra);
    Proc(cmd.spawn().unwrap())
}

/// The peer id of the node whose data directory is `dir` (its key is made if missing).
pub fn peer_id(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_corvid"))
        .args(["id", "--json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["peer_id"].as_str().unwrap().to_string()
}

/// Whether a namespace test can run here; if not, says why (a failure when
/// `CORVID_REQUIRE_NETNS` is set, as the test script sets it for root).
pub fn available(test: &str) -> bool {
    let Some(why) = unsupported() else {
        return true;
    };
    assert!(
        std::env::var("CORVID_REQUIRE_NETNS").is_err(),
        "CORVID_REQUIRE_NETNS is set but {why}"
    );
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// [`in_ns`] without waiting: the thread's handle.
pub fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&fd),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        f()
    })
}

/// The status of the node process whose data directory is `dir`, running in `ns`.
pub fn status_in(ns: &str, dir: &Path) -> Option<corvid_node::Status> {
    let dir = dir.to_path_buf();
    in_ns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(super::process_status(&dir))
    })
}
