//! `GET /metrics` on a worker that ran tasks: Prometheus text that a Prometheus parser reads,
//! with libp2p's series and Corvid's, the tasks counted.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::time::Duration;

use corvid_node::Client;
use corvid_sdk::{Graph, Settings};

/// `GET path` from the control endpoint at `addr`: (status code, body).
fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

#[test]
fn metrics_parse_and_count_the_tasks_workers_ran() {
    let client = Client::local(2).unwrap().with_settings(Settings {
        block: 64,
        ..Settings::default()
    });
    let g = Graph::new("metrics").with_executor(client.executor());
    let x = g.random(&[128, 64], -1.0, 1.0, 1);
    x.matmul(&g.random(&[64, 96], -1.0, 1.0, 2))
        .unwrap()
        .tanh()
        .unwrap()
        .eval_data()
        .unwrap();

    let mut done = 0.0;
    let mut bytes_out = 0.0;
    for worker in client.workers() {
        let (code, body) = get(worker.control_addr(), "/metrics");
        assert_eq!(code, 200, "{body}");
        // The body may be chunked: keep the exposition lines only.
        let lines: Vec<String> = body
            .lines()
            .filter(|l| l.starts_with('#') || l.contains(' '))
            .map(str::to_string)
            .collect();
        let scrape = prometheus_parse::Scrape::parse(lines.iter().map(|l| Ok(l.clone()))).unwrap();
        let value = |name: &str, outcome: Option<&str>| -> f64 {
            scrape
                .samples
                .iter()
                .filter(|s| s.metric == name)
                .filter(|s| outcome.is_none_or(|o| s.labels.get("outcome") == Some(o)))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => 0.0,
                })
                .sum()
        };
        done += value("corvid_tasks_total", Some("done"));
        bytes_out += value("corvid_task_bytes_out_total", None);
        assert!(
            value("corvid_resident_bytes", None) > 1e6,
            "resident memory is reported:\n{body}"
        );
        assert!(value("corvid_memory_cap_bytes", None) > 0.0, "{body}");
        assert!(value("corvid_peers_connected", None) >= 1.0, "{body}");
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric.starts_with("libp2p_swarm_connections")),
            "libp2p's own series are there:\n{body}"
        );
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric.starts_with("libp2p_bandwidth")),
            "{body}"
        );
    }
    let s = client.last_summary().unwrap();
    // The requester counts its job's checks.
    let (code, body) = get(client.requester().control_addr(), "/metrics");
    assert_eq!(code, 200);
    let checked = |how: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(&format!("corvid_results_checked_total{{check=\"{how}\"}}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let v = &s.verify;
    assert!(v.freivalds + v.sampled_rows + v.recomputed > 0, "{s}");
    assert_eq!(checked("freivalds"), v.freivalds as f64, "{body}");
    assert_eq!(checked("sampled_rows"), v.sampled_rows as f64, "{body}");
    assert_eq!(checked("recomputed"), v.recomputed as f64, "{body}");
    assert_eq!(checked("canary"), v.canaries as f64, "{body}");
    assert_eq!(checked("replica"), v.replicated as f64, "{body}");
    assert!(body.contains("corvid_peers_banned_total 0"), "{body}");
    let tasks: usize = s.places.values().map(|p| p.tasks).sum();
    assert!(
        done >= 1.0,
        "no task counted as done; the job ran {tasks}:\n{s}"
    );
    assert!(bytes_out > 0.0, "answers carried no bytes");
}

/// A paused worker takes no task (it answers busy, which the metrics count) and advertises no
/// free slot; resumed, it works again.
#[test]
fn paused_workers_take_no_tasks_until_resumed() {
    let client = Client::local(1).unwrap().with_settings(Settings {
        block: 64,
        ..Settings::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let worker = client.workers()[0].client();
    rt.block_on(worker.set_paused(Some("on battery".into())))
        .unwrap();
    let status = rt.block_on(worker.status()).unwrap();
    assert_eq!(status.paused.as_deref(), Some("on battery"));
    assert_eq!(status.advert.slots_free, 0);

    let job = |seed: u64| {
        let g = Graph::new("paused").with_executor(client.executor());
        g.random(&[64, 32], -1.0, 1.0, seed)
            .matmul(&g.random(&[32, 16], -1.0, 1.0, seed + 1))
            .unwrap()
            .eval_data()
    };
    let e = job(1).unwrap_err().to_string();
    assert!(e.to_lowercase().contains("busy"), "{e}");
    let (_, body) = get(client.workers()[0].control_addr(), "/metrics");
    assert!(
        body.lines()
            .any(|l| l.starts_with("corvid_tasks_total{outcome=\"busy\"}") && !l.ends_with(" 0")),
        "the refusals are counted:\n{body}"
    );

    rt.block_on(worker.set_paused(None)).unwrap();
    assert_eq!(rt.block_on(worker.status()).unwrap().paused, None);
    job(3).unwrap();
}
