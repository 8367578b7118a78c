//! The status page (`GET /` on the control endpoint): what a contributor wants to see at a
//! glance, server-rendered HTML. Every value a peer chose (adapter names, ids, reasons) goes
//! through maud's escaping.

use maud::{DOCTYPE, Markup, html};

use crate::peers::PeerInfo;
use crate::status::{Reachability, Status};

/// Seconds between the page's own reloads.
const REFRESH_SECS: u32 = 5;

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

fn ago(ms: u64) -> String {
    format!("{:.0} s ago", ms as f64 / 1000.0)
}

fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    format!("{}h {:02}m {:02}s", s / 3600, s / 60 % 60, s % 60)
}

/// `hh:mm:ss` of a Unix time, UTC.
fn clock(unix_secs: u64) -> String {
    let s = unix_secs % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The page for this node's `status` and the `peers` it knows.
pub fn render(status: &Status, peers: &[PeerInfo]) -> String {
    let me = &status.advert;
    let page: Markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(REFRESH_SECS);
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "corvid node " (short(&status.peer_id)) }
                style { (maud::PreEscaped(STYLE)) }
            }
            body {
                h1 { "corvid node " code { (short(&status.peer_id)) } }
                p.state {
                    @match &status.paused {
                        Some(why) => {
                            span.paused { "Paused: " (why) }
                            @match status.pause_cause {
                                Some(crate::status::PauseCause::Owner) | None => { " — " code { "corvid resume" } " to take tasks again" }
                                Some(c) => { " — " (c.ends()) }
                            }
                        }
                        None if me.contributes => { span.ok { "Taking tasks" } " — " (me.slots_free) " of " (me.slots_total) " slots free" }
                        None => { span { "Requester only: takes no tasks" } }
                    }
                }
                section {
                    h2 { "This machine" }
                    table.kv {
                        tr { th { "Backend" } td { (me.backend) " — " (me.adapter) } }
                        tr { th { "Scores" } td { (format!("{:.1}", me.matmul_gflops)) " GFLOP/s matmul, " (format!("{:.2}", me.elementwise_gbps)) " GB/s elementwise" } }
                        tr { th { "Memory offered" } td { (gib(me.memory_bytes)) } }
                        @if let Some(l) = &status.limits {
                            tr { th { "Caps" } td.caps { (status.caps) } }
                            tr { th { "One task at most" } td { (gib(l.task.max_peak_bytes)) ", " (format!("{:.0}", l.task.max_flops as f64 / 1e9)) " GFLOP" } }
                        }
                        tr { th { "Tasks answered" } td.tasks { (status.tasks_answered) " (" (status.tasks_in_hand) " in hand now)" } }
                        tr { th { "Contributed" } td.contributed { (status.contributed) } }
                        tr { th { "Up" } td { (uptime(status.uptime_ms)) } }
                    }
                }
                section {
                    h2 { "Network" }
                    table.kv {
                        tr { th { "Reachability" } td.reach {
                            @match &status.reachability {
                                Reachability::Checking => { "checking" }
                                Reachability::Reachable { addrs } => { "reachable at " (addrs.join(", ")) }
                                Reachability::Unreachable { tested, .. } => { "not reachable from outside (peers could not dial " (tested) ")" }
                            }
                        } }
                        @if !status.relay_addrs.is_empty() {
                            tr { th { "Through relays" } td { @for a in &status.relay_addrs { code { (a) } br; } } }
                        }
                        tr { th { "Peers" } td { (status.connected_peers) " connected, " (status.known_peers) " known" } }
                        tr { th { "Hole punches" } td { (status.hole_punches.succeeded) " succeeded, " (status.hole_punches.failed) " failed" } }
                        @if let Some(line) = &status.bootstrap_line {
                            tr { th { "Others join with" } td { code { (line) } } }
                        }
                    }
                }
                section {
                    h2 { "Peers" }
                    @if peers.is_empty() {
                        p { "No peer known yet." }
                    } @else {
                        table.peers {
                            tr { th { "Peer" } th { "Backend" } th { "Adapter" } th { "GFLOP/s" } th { "Slots" } th { "Path" } th { "Last advert" } }
                            @for p in peers {
                                tr {
                                    td { code title=(p.peer_id) { (short(&p.peer_id)) } }
                                    td { (p.backend) }
                                    td { (p.adapter) }
                                    td.num { (format!("{:.1}", p.matmul_gflops)) }
                                    td.num { (p.slots_free) "/" (p.slots_total) }
                                    td { (p.path.map_or("—".to_string(), |p| p.to_string())) }
                                    td { (ago(p.last_seen_ms)) }
                                }
                            }
                        }
                    }
                }
                @if !status.recent_errors.is_empty() {
                    section {
                        h2 { "Recent task errors and refusals" }
                        table.errors {
                            tr { th { "When (UTC)" } th { "Requester" } th { "What" } th { "Why" } }
                            @for e in &status.recent_errors {
                                tr {
                                    td { (clock(e.unix_secs)) }
                                    td { code title=(e.peer) { (short(&e.peer)) } }
                                    td { (e.kind) }
                                    td { (e.error) }
                                }
                            }
                        }
                    }
                }
                @let shunned: Vec<_> = status.gossip_scores.iter().filter(|(_, s)| *s < crate::net::GRAYLIST_SCORE).collect();
                @if !shunned.is_empty() {
                    section {
                        h2 { "Peers shunned" }
                        p { "Their gossip scores fell below " (crate::net::GRAYLIST_SCORE) ": their messages are dropped unread." }
                        table.kv {
                            @for (peer, score) in shunned {
                                tr { th { code title=(peer) { (short(peer)) } } td { (format!("{score:.1}")) } }
                            }
                        }
                    }
                }
                @if status.rejections.values().any(|&n| n > 0) {
                    section {
                        h2 { "Adverts refused" }
                        table.kv {
                            @for (why, n) in &status.rejections {
                                tr { th { (why) } td { (n) } }
                            }
                        }
                    }
                }
                footer { "JSON: " a href="/status" { "/status" } " · " a href="/peers" { "/peers" } " · Prometheus: " a href="/metrics" { "/metrics" } }
            }
        }
    };
    page.into_string()
}

/// `12D3KooW…x7Qe`.
fn short(id: &str) -> String {
    if id.chars().count() > 16 {
        let chars: Vec<char> = id.chars().collect();
        format!(
            "{}…{}",
            chars[..8].iter().collect::<String>(),
            chars[chars.len() - 6..].iter().collect::<String>()
        )
    } else {
        id.to_string()
    }
}

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.1rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: .3rem .6rem; vertical-align: top; }
table.peers tr:nth-child(even) { background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 12rem; color: #555; font-weight: normal; }
code { font-size: .9em; word-break: break-all; }
.state { font-size: 1.1rem; } .ok { color: #1a7f37; font-weight: bold; } .paused { color: #b35900; font-weight: bold; }
footer { margin-top: 2rem; color: #777; font-size: .9rem; }
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_is_escaped() {
        let status: Status = serde_json::from_value(serde_json::json!({
            "peer_id": "12D3KooWSelf0000000000000000000000000000000000000000",
            "listen_addrs": [], "bootstrap_line": null, "connected_peers": 1, "known_peers": 1,
            "advert": {
                "peer_id": "12D3KooWSelf0000000000000000000000000000000000000000",
                "backend": "cpu", "adapter": "cpu", "class": "cpu", "matmul_gflops": 10.0,
                "elementwise_gbps": 1.0, "memory_bytes": 1073741824u64, "slots_total": 1,
                "slots_free": 1, "contributes": true, "seq": 1, "last_seen_ms": 0
            },
            "adverts_published": 1, "rejections": {}, "bootstrap": [], "uptime_ms": 61000,
            "paused": "<b>lunch</b>",
            "recent_errors": [{"unix_secs": 3723, "peer": "12D3KooWPeer1111111111111111111111111111111111111111",
                "kind": "refused", "error": "<i>too large</i>"}],
            "contributed": {"total": {"tasks": 7, "gflop": 12.25}, "today": {"tasks": 2, "gflop": 0.5}, "day": 0},
            "limits": {"memory": 1073741824u64, "slots": 1,
                "task": {"max_nodes": 4096, "max_program_bytes": 1048576, "max_tensor_bytes": 268435456u64,
                    "max_peak_bytes": 268435456u64, "max_flops": 1000000000000u64},
                "inbound_bytes": 1, "held_bytes": 1, "cache_bytes": 1,
                "max_task_time": {"secs": 300, "nanos": 0}, "flops_per_sec": 1e9, "bytes_per_sec": 1e9},
            "caps": {"cpus": 2, "pause_when_busy": 0.5, "pause_on_battery": true}
        }))
        .unwrap();
        let mut peer = status.advert.clone();
        peer.peer_id = "12D3KooWPeer1111111111111111111111111111111111111111".into();
        peer.adapter = "<script>alert(1)</script>".into();
        let page = render(&status, &[peer]);
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        assert!(page.contains("Paused: &lt;b&gt;lunch&lt;/b&gt;"), "{page}");
        assert!(page.contains("12D3KooW…111111"), "{page}");
        assert!(page.contains("0h 01m 01s"), "{page}");
        // The requester's error text is theirs: escaped too.
        assert!(page.contains("&lt;i&gt;too large&lt;/i&gt;"), "{page}");
        assert!(page.contains("01:02:03"), "{page}");
        assert!(
            page.contains("today 2 tasks, 0.5 GFLOP · in all 7 tasks, 12.2 GFLOP"),
            "{page}"
        );
        assert!(
            page.contains("2 core(s); pauses when others use over 50% of the CPUs and on battery"),
            "{page}"
        );
    }
}
