//! The requester's defences against untrusted workers.
//!
//! - [`open_receipt`]: a result is signed by the peer that was asked, for this task (subgraph and
//!   input content), this request's nonce and the outputs it carries; anything else is proof of
//!   misbehaviour (a replay, a forgery) and bans the peer.
//! - [`Verifier::check`]: every accepted result is checked on the requester, with random choices
//!   drawn after it arrived: Freivalds for matmuls, a sampled recompute of rows against the CPU
//!   reference for row-local programs, a full local recompute for anything else.
//! - [`Trust`]: per-peer streaks of verified results decide how often a result is also
//!   replicated on a second peer of the same determinism class; banned peers (with the
//!   evidence) are persisted to a JSON file and never given work again.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use corvid_kernels::verify::{self, Projection, Verdict};
use corvid_kernels::{ContentId, Op, Program, Tensor as Data};
use corvid_sdk::wire::{Receipt, task_key};
use corvid_sdk::{LocalExecutor, Subgraph};
use libp2p::PeerId;
use libp2p::identity::PublicKey;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Rows recomputed per sampled check.
pub const SAMPLE_ROWS: usize = 4;
/// Verified results a new peer needs before its results are replicated only sometimes.
pub const NEW_PEER_STREAK: u32 = 8;
/// Replication probability once trusted: `max(MIN_REPLICATION, 1 / streak)`.
pub const MIN_REPLICATION: f64 = 0.05;

/// How a result was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CheckKind {
    /// Freivalds' test with [`verify::FREIVALDS_ROUNDS`] random ±1 vectors: a wrong entry
    /// passes with probability ≤ 2⁻²⁰.
    Freivalds,
    /// [`SAMPLE_ROWS`] random rows recomputed: bit for bit on the requester's backend when the
    /// worker shares its class, else with the reference within tolerance.
    SampledRows,
    /// Recomputed in full on the requester.
    Recomputed,
    /// Not checked: only for measuring what checking costs (see
    /// `Client::without_checks_for_benchmarks`).
    Unchecked,
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Freivalds => "freivalds",
            CheckKind::SampledRows => "sampled rows",
            CheckKind::Recomputed => "recomputed",
            CheckKind::Unchecked => "unchecked",
        })
    }
}

/// A peer proven to have misbehaved, and the proof.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ban {
    pub peer: String,
    pub reason: String,
    /// What the peer signed and what it should have been: subgraph, op, index, values.
    pub evidence: String,
    pub unix_secs: u64,
}

/// Why a result was refused.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// Not the peer's fault (or not provably): retry elsewhere.
    Failed(String),
    /// The peer could not be reached: it leaves the job's placement.
    Unreachable(String),
    /// Proof that the peer lied: ban it.
    Cheated { reason: String, evidence: String },
}

/// What a result must be signed for: the task asked, the request's nonce, the outputs that
/// came with it, and the program (one hash per op).
#[derive(Clone, Copy, Debug)]
pub struct Expected<'a> {
    pub task: &'a [u8; 32],
    pub nonce: &'a [u8; 16],
    pub outputs: &'a [ContentId],
    pub program: &'a Program,
}

/// Opens a signed result: the signer is `peer`, the signature covers the receipt, and the
/// receipt is for this task, this nonce and these outputs, with per-op hashes that fit the
/// program and the outputs.
pub fn open_receipt(
    peer: &PeerId,
    signer: &[u8],
    signature: &[u8],
    receipt: &Receipt,
    expected: &Expected<'_>,
) -> Result<(), Refusal> {
    let Expected {
        task: expect_task,
        nonce: expect_nonce,
        outputs,
        program,
    } = *expected;
    let cheated = |reason: &str, evidence: String| Refusal::Cheated {
        reason: reason.into(),
        evidence,
    };
    let key = PublicKey::try_decode_protobuf(signer)
        .map_err(|e| cheated("unreadable signing key", e.to_string()))?;
    if key.to_peer_id() != *peer {
        return Err(cheated(
            "result signed by another peer",
            format!("signer {} answered for {peer}", key.to_peer_id()),
        ));
    }
    if !key.verify(&receipt.message(), signature) {
        return Err(cheated(
            "bad signature",
            "the signature does not verify over the receipt".into(),
        ));
    }
    if receipt.nonce == *expect_nonce && receipt.task != *expect_task {
        return Err(cheated(
            OTHER_INPUTS,
            format!(
                "signed for task {}, asked task {}",
                hex8(&receipt.task),
                hex8(expect_task)
            ),
        ));
    }
    if receipt.task != *expect_task || receipt.nonce != *expect_nonce {
        return Err(cheated(
            "replayed result",
            format!(
                "signed for task {} nonce {}, asked task {} nonce {}",
                hex8(&receipt.task),
                hex8(&receipt.nonce),
                hex8(expect_task),
                hex8(expect_nonce)
            ),
        ));
    }
    if receipt.outputs != outputs {
        return Err(cheated(
            "outputs differ from the signed ones",
            format!("{:?} signed, {:?} sent", receipt.outputs, outputs),
        ));
    }
    // The per-op hashes are what disputes are settled on: one per op, and an output that is
    // an op's value has that op's hash.
    if receipt.op_hashes.len() != program.nodes.len() {
        return Err(cheated(
            "signed per-op hashes do not fit the program",
            format!(
                "{} hashes for {} ops",
                receipt.op_hashes.len(),
                program.nodes.len()
            ),
        ));
    }
    if outputs.len() != program.outputs.len() {
        return Err(cheated(
            "signed outputs do not fit the program",
            format!(
                "{} outputs for a program of {}",
                outputs.len(),
                program.outputs.len()
            ),
        ));
    }
    let n_in = program.inputs.len();
    for (k, &o) in program.outputs.iter().enumerate() {
        if let Some(i) = (o as usize).checked_sub(n_in)
            && receipt.op_hashes[i] != outputs[k]
        {
            return Err(cheated(
                "signed per-op hashes contradict the outputs",
                format!(
                    "output {k} is op {i} ({}): hash {:?}, output {:?}",
                    program.nodes[i].op, receipt.op_hashes[i], outputs[k]
                ),
            ));
        }
    }
    Ok(())
}

/// The reason given when a worker signs for inputs other than the ones the requester meant:
/// cheating if they were sent, a stale held value if the worker was told to use its own.
pub const OTHER_INPUTS: &str = "result for other inputs";

fn hex8(b: &[u8]) -> String {
    b.iter().take(4).map(|x| format!("{x:02x}")).collect()
}

/// The task key of `sg` over inputs with these content ids.
pub fn key_of(sg: &Subgraph, inputs: &[ContentId]) -> [u8; 32] {
    task_key(&sg.id, inputs)
}

/// Checks results on the requester. Shares Freivalds projections of weight matrices between
/// the results of one job that multiply by the same matrix.
#[derive(Debug)]
pub struct Verifier {
    local: Arc<LocalExecutor>,
    skip: bool,
    projections: Mutex<HashMap<ContentId, Arc<Projection>>>,
}

/// Projections kept per job at most (each holds a weight matrix's `k × 20` projection).
const MAX_PROJECTIONS: usize = 256;

impl Verifier {
    pub fn new(local: Arc<LocalExecutor>) -> Verifier {
        Verifier::with_checks(local, true)
    }

    /// A verifier that checks nothing when `checks` is false (benchmarks of its cost only).
    pub fn with_checks(local: Arc<LocalExecutor>, checks: bool) -> Verifier {
        Verifier {
            local,
            skip: !checks,
            projections: Mutex::new(HashMap::new()),
        }
    }

    /// Checks `outputs` of `sg` on `inputs`; returns how, or the mismatch as evidence.
    /// `worker_class` is the class id the worker signed: a full recompute compares bits when
    /// it equals the requester's own class, and within tolerance otherwise.
    pub fn check(
        &self,
        sg: &Subgraph,
        inputs: &[Arc<Data>],
        input_cids: &[ContentId],
        outputs: &[Arc<Data>],
        worker_class: &[u8; 32],
    ) -> Result<CheckKind, Refusal> {
        let wrong = |kind: CheckKind, m: verify::Mismatch| Refusal::Cheated {
            reason: format!("wrong result ({kind})"),
            evidence: format!("subgraph {} ({}): {m}", sg.id.short(), sg.ops()),
        };
        if self.skip {
            return Ok(CheckKind::Unchecked);
        }
        let p = &sg.program;
        // A plain 2-d matmul of the two inputs: Freivalds.
        if p.nodes.len() == 1
            && p.nodes[0].op == Op::MatMul
            && p.nodes[0].args == [0, 1]
            && p.outputs == [2]
            && inputs.len() == 2
            && inputs[0].shape().len() == 2
            && inputs[1].shape().len() == 2
        {
            let proj = self.projection(&inputs[1], &input_cids[1]);
            if let Ok(proj) = proj {
                match proj.check(&inputs[0], &outputs[0]) {
                    Ok(Verdict::Pass) => return Ok(CheckKind::Freivalds),
                    // A ban is permanent: confirm with a full recompute, whose mismatch (an
                    // element, got, want) is the evidence. An honest result that tripped the
                    // threshold (overflow to inf, a lower-precision class) passes it.
                    Ok(Verdict::Fail(m)) => {
                        return self
                            .recompute(sg, inputs, outputs, worker_class)
                            .map_err(Refusal::Failed)?
                            .map(|()| CheckKind::Recomputed)
                            .map_err(|e| Refusal::Cheated {
                                reason: "wrong result (freivalds, confirmed by recompute)".into(),
                                evidence: format!(
                                    "subgraph {} ({}): {e}; {m}",
                                    sg.id.short(),
                                    sg.ops()
                                ),
                            });
                    }
                    Err(_) => {} // non-finite or empty inputs: recompute below
                }
            }
        } else if let Some(rowed) = verify::row_inputs(p) {
            let rows = outputs.first().map_or(0, |o| o.shape()[0]);
            if rows > SAMPLE_ROWS {
                let mut rng = rand::rng();
                let mut sample = rand::seq::index::sample(&mut rng, rows, SAMPLE_ROWS).into_vec();
                sample.sort_unstable();
                let refs: Vec<&Data> = inputs.iter().map(|t| &**t).collect();
                let outs: Vec<&Data> = outputs.iter().map(|t| &**t).collect();
                // Same class as ours: the fast path must agree bit for bit; otherwise the
                // reference within tolerance.
                let verdict = if *worker_class == self.local.backend().class().id() {
                    verify::check_rows_exact(self.local.backend(), p, &rowed, &refs, &outs, &sample)
                } else {
                    verify::check_rows(p, &rowed, &refs, &outs, &sample)
                };
                match verdict {
                    Ok(Verdict::Pass) => return Ok(CheckKind::SampledRows),
                    // The reference disagrees on a sampled row: recompute everything on this
                    // machine's fast path before blaming anyone (it is the same code the
                    // worker runs when the classes match).
                    Ok(Verdict::Fail(_)) | Err(_) => {}
                }
            }
        }
        self.recompute(sg, inputs, outputs, worker_class)
            .map_err(Refusal::Failed)?
            .map(|()| CheckKind::Recomputed)
            .map_err(|m| wrong(CheckKind::Recomputed, m))
    }

    /// Recomputes `sg` here and compares: bit for bit when the worker's class is ours,
    /// within the program's tolerance otherwise. The outer error is a failure to recompute
    /// here, which proves nothing about the worker.
    pub fn recompute(
        &self,
        sg: &Subgraph,
        inputs: &[Arc<Data>],
        outputs: &[Arc<Data>],
        worker_class: &[u8; 32],
    ) -> Result<Result<(), verify::Mismatch>, String> {
        let mine = self
            .local
            .backend()
            .run_shared(&sg.program, inputs)
            .map_err(|e| format!("subgraph {}: local recompute failed: {e}", sg.id.short()))?;
        Ok(compare(
            sg,
            outputs,
            &mine,
            worker_class == &self.local.backend().class().id(),
        ))
    }

    fn projection(
        &self,
        b: &Data,
        cid: &ContentId,
    ) -> Result<Arc<Projection>, verify::NotApplicable> {
        if let Some(p) = self.lock().get(cid) {
            return Ok(p.clone());
        }
        // Drawn now, after the first result that needs it arrived; never leaves this process.
        let p = Arc::new(Projection::new(b, &mut rand::rng())?);
        let mut map = self.lock();
        if map.len() >= MAX_PROJECTIONS {
            map.clear();
        }
        map.insert(*cid, p.clone());
        Ok(p)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ContentId, Arc<Projection>>> {
        self.projections.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the requester knows of each peer's honesty, across jobs.
#[derive(Debug, Default)]
pub struct Trust {
    streaks: HashMap<PeerId, u32>,
    bans: BTreeMap<String, Ban>,
    file: Option<PathBuf>,
}

/// Why the ban file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("ban list '{path}': {reason}")]
pub struct BanFileError {
    pub path: PathBuf,
    pub reason: String,
}

impl Trust {
    /// Trust state that persists bans to `file` (read now if it exists).
    pub fn with_file(file: &Path) -> Result<Trust, BanFileError> {
        let err = |reason: String| BanFileError {
            path: file.to_path_buf(),
            reason,
        };
        let bans: Vec<Ban> = match std::fs::read(file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Trust {
            streaks: HashMap::new(),
            bans: bans.into_iter().map(|b| (b.peer.clone(), b)).collect(),
            file: Some(file.to_path_buf()),
        })
    }

    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.bans.contains_key(&peer.to_string())
    }

    pub fn bans(&self) -> impl Iterator<Item = &Ban> {
        self.bans.values()
    }

    /// Bans `peer` with the evidence, and saves the list. Returns false if it already was.
    pub fn ban(&mut self, peer: &PeerId, reason: &str, evidence: &str) -> bool {
        let key = peer.to_string();
        if self.bans.contains_key(&key) {
            return false;
        }
        tracing::warn!(%peer, reason, evidence, "peer banned");
        self.bans.insert(
            key.clone(),
            Ban {
                peer: key,
                reason: reason.into(),
                evidence: evidence.into(),
                unix_secs: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            },
        );
        self.streaks.remove(peer);
        if let Some(path) = &self.file
            && let Err(e) = self.save(path)
        {
            tracing::error!(path = %path.display(), error = %e, "could not save the ban list");
        }
        true
    }

    fn save(&self, path: &Path) -> std::io::Result<()> {
        let list: Vec<&Ban> = self.bans.values().collect();
        let json = serde_json::to_vec_pretty(&list).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, path)
    }

    /// A verified result from `peer`.
    pub fn credit(&mut self, peer: &PeerId) {
        *self.streaks.entry(*peer).or_default() += 1;
    }

    pub fn streak(&self, peer: &PeerId) -> u32 {
        self.streaks.get(peer).copied().unwrap_or(0)
    }

    /// Whether to replicate a result of `peer`: always while it is new, then with probability
    /// `max(MIN_REPLICATION, 1/streak)`.
    pub fn replicate(&self, peer: &PeerId, rng: &mut impl Rng) -> bool {
        let s = self.streak(peer);
        s < NEW_PEER_STREAK || rng.random::<f64>() < MIN_REPLICATION.max(1.0 / f64::from(s))
    }
}

/// Compares claimed `outputs` of `sg` with `mine`, computed here: bit for bit when `exact`
/// (same determinism class), within the program's tolerance otherwise.
pub fn compare(
    sg: &Subgraph,
    outputs: &[Arc<Data>],
    mine: &[Data],
    exact: bool,
) -> Result<(), verify::Mismatch> {
    let tol = verify::program_tolerance(&sg.program);
    for (k, (got, want)) in outputs.iter().zip(mine).enumerate() {
        if **got == *want {
            continue;
        }
        let what = format!("output {k} ({})", sg.ops());
        let (Ok(g), Ok(w)) = (got.as_f32(), want.as_f32()) else {
            return Err(verify::Mismatch {
                what,
                index: vec![],
                got: f64::NAN,
                want: f64::NAN,
                tolerance: 0.0,
            });
        };
        let bad = (0..g.len()).find(|&e| {
            if exact {
                g[e].to_bits() != w[e].to_bits()
            } else {
                !tol.accepts(g[e], w[e])
            }
        });
        if let Some(e) = bad {
            return Err(verify::Mismatch {
                what,
                index: vec![e],
                got: f64::from(g[e]),
                want: f64::from(w[e]),
                tolerance: if exact {
                    0.0
                } else {
                    f64::from(tol.atol + tol.rtol * w[e].abs())
                },
            });
        }
    }
    Ok(())
}

/// Elapsed time of one check, for the summary.
#[derive(Debug)]
pub struct Stopwatch(Instant);

impl Stopwatch {
    pub fn start() -> Stopwatch {
        Stopwatch(Instant::now())
    }

    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A validly signed receipt whose per-op hashes contradict its outputs, or do not fit the
    /// program, is refused as cheating; the consistent one opens.
    #[test]
    fn signed_op_hashes_must_agree_with_the_outputs() {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let program = Program::single(
            Op::Unary(corvid_kernels::UnaryOp::Relu),
            vec![corvid_kernels::TensorMeta::f32(vec![2])],
        );
        let out = Data::from_f32(vec![2], vec![1.0, 0.0])
            .unwrap()
            .content_id();
        let other = Data::from_f32(vec![2], vec![1.0, 2.0])
            .unwrap()
            .content_id();
        let open = |op_hashes: Vec<ContentId>| {
            let receipt = Receipt {
                task: [1; 32],
                nonce: [2; 16],
                outputs: vec![out],
                op_hashes,
                class: [3; 32],
                class_name: "test".into(),
            };
            let signature = key.sign(&receipt.message()).unwrap();
            let signer = key.public().encode_protobuf();
            let expected = Expected {
                task: &[1; 32],
                nonce: &[2; 16],
                outputs: &[out],
                program: &program,
            };
            open_receipt(&peer, &signer, &signature, &receipt, &expected)
        };
        open(vec![out]).unwrap();
        for (hashes, reason) in [
            (vec![other], "contradict the outputs"),
            (vec![out, out], "do not fit the program"),
            (vec![], "do not fit the program"),
        ] {
            match open(hashes) {
                Err(Refusal::Cheated { reason: r, .. }) => assert!(r.contains(reason), "{r}"),
                got => panic!("expected a refusal for {reason}, got {got:?}"),
            }
        }
    }

    #[test]
    fn bans_persist_with_their_evidence_and_streaks_set_replication() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bans.json");
        let cheat = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let honest = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let mut t = Trust::with_file(&path).unwrap();
        assert!(t.ban(&cheat, "wrong result (freivalds)", "row 3: got 1, want 2"));
        assert!(!t.ban(&cheat, "again", ""), "a second ban changes nothing");
        let back = Trust::with_file(&path).unwrap();
        assert!(back.is_banned(&cheat) && !back.is_banned(&honest));
        let ban = back.bans().next().unwrap();
        assert_eq!(ban.evidence, "row 3: got 1, want 2");
        // A corrupt file is an error that names it, not an empty list.
        std::fs::write(&path, b"{not json").unwrap();
        let e = Trust::with_file(&path).unwrap_err();
        assert!(e.to_string().contains("bans.json"), "{e}");

        // New peers are always replicated; trusted ones about 1 in max(20, streak).
        let mut t = Trust::default();
        let mut rng = rand::rng();
        assert!((0..100).all(|_| t.replicate(&honest, &mut rng)));
        for _ in 0..100 {
            t.credit(&honest);
        }
        let n = (0..10_000)
            .filter(|_| t.replicate(&honest, &mut rng))
            .count();
        assert!((300..700).contains(&n), "{n} of 10000 at streak 100");
    }
}
