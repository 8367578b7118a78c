//! The executor process: where a worker runs strangers' programs, away from the node.
//!
//! Browsers and BOINC keep untrusted work out of the process that holds the user's keys and
//! connections; so does Corvid. The node starts `corvid executor` ([`child`]) as a child that
//! confines itself ([`confine`]: Landlock, resource limits, seccomp) and talks to it over a
//! Unix socket ([`proto`]), passing tensors as sealed shared memory ([`shm`]) so nothing is
//! copied on the way. A supervisor thread owns the child: it restarts it when it dies (the
//! task it was running fails, the node keeps its connections and adverts), kills it when a
//! task overruns its deadline without stopping, and replaces it before it reaches its
//! lifetime CPU limit.

pub mod child;
pub mod confine;
pub mod proto;
pub mod shm;

use std::collections::{HashMap, VecDeque};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use corvid_kernels::backend::Guard;
use corvid_kernels::{BackendChoice, ContentId, Program, Tensor};
use corvid_sdk::wire::TaskError;

use proto::{FromExecutor, Ready, Slot, ToExecutor};
use serde::{Deserialize, Serialize};

/// How long a new executor may take to confine itself and open its backend.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a task waits for an executor that is restarting.
const RESTART_WAIT: Duration = Duration::from_secs(30);
/// How often the supervisor looks at its child.
const WATCH: Duration = Duration::from_millis(20);
/// An executor is replaced once it has used this share of its CPU-time limit, when idle.
const RECYCLE_AT: f64 = 0.75;
/// Environment the executor keeps (logging, and what GPU drivers read); the rest is dropped.
const PASS_ENV: &[&str] = &[
    "CORVID_LOG",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "XDG_RUNTIME_DIR",
    "LD_LIBRARY_PATH",
    "VK_ICD_FILENAMES",
    "VK_DRIVER_FILES",
    "VK_LOADER_DEBUG",
    "LP_NUM_THREADS",
];

/// How to start the executor.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxConfig {
    /// The `corvid` binary.
    pub program: PathBuf,
    pub backend: BackendChoice,
    /// Address-space limit (CPU backend only), bytes.
    pub address_space: Option<u64>,
    pub cpu_seconds: u64,
    /// Files the executor must not read (the identity key): checked and reported at start.
    pub forbid: Vec<PathBuf>,
    /// Tasks the executor runs at once (the node's slots).
    pub threads: usize,
    /// Cores its kernels may use (the CPU backend's thread pool, lavapipe's); `None`: all.
    pub cpus: Option<usize>,
    /// Fault injection: the executor aborts on every n-th task (0: never).
    #[cfg(feature = "fault-injection")]
    pub crash_every: u64,
}

/// The executor as the node's status shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutorStatus {
    pub pid: Option<u32>,
    pub backend: String,
    pub confinement: proto::Confinement,
    pub restarts: u64,
    /// Why the last executor ended, if one did.
    pub last_exit: Option<String>,
}

/// Reports on a [`Sandbox`] without keeping it alive.
#[derive(Clone, Debug)]
pub struct Probe(std::sync::Weak<Inner>);

impl Probe {
    pub fn status(&self) -> Option<ExecutorStatus> {
        let inner = self.0.upgrade()?;
        let st = inner.lock();
        let ready = st.ready.as_ref()?;
        Some(ExecutorStatus {
            pid: st.pid,
            backend: ready.backend.clone(),
            confinement: ready.confinement.clone(),
            restarts: st.restarts,
            last_exit: st.last_exit.clone(),
        })
    }
}

/// Why the executor could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot start the executor process '{program}': {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("the executor process did not start: {0}")]
    Start(String),
}

/// A handle on the supervised executor. Dropping it stops the executor.
#[derive(Debug)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: SandboxConfig,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Incremented at every (re)start; replies from an older child are ignored.
    generation: u64,
    /// The running child's socket, `None` while (re)starting.
    writer: Option<Arc<UnixStream>>,
    pid: Option<u32>,
    ready: Option<Ready>,
    pending: HashMap<u64, Pending>,
    next_id: u64,
    restarts: u64,
    /// Why the last child ended, for errors while none runs.
    last_exit: Option<String>,
    stopping: bool,
}

#[derive(Debug)]
struct Pending {
    generation: u64,
    reply: mpsc::SyncSender<Result<Reply, TaskError>>,
    deadline: Duration,
    kill_at: Instant,
}

type Answer = (Vec<Arc<Tensor>>, Vec<ContentId>);
/// What the executor sends back, before the node takes its lent buffers as the outputs.
type Reply = (Vec<Slot>, Vec<ContentId>);

impl Sandbox {
    /// Starts the executor and its supervisor; returns once the executor is ready (confined,
    /// backend open), with what it reported.
    pub fn start(cfg: SandboxConfig) -> Result<(Sandbox, Ready), SandboxError> {
        let inner = Arc::new(Inner {
            cfg,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let (tx, rx) = mpsc::sync_channel(1);
        let sup = inner.clone();
        // Every child is started from the supervisor thread: a child dies with the thread
        // that started it (its parent-death signal), and this thread lives as long as we do.
        std::thread::Builder::new()
            .name("corvid-sandbox".into())
            .spawn(move || match spawn(&sup.cfg) {
                Ok((child, sock, ready)) => {
                    sup.install(&child, &sock, ready.clone());
                    let _ = tx.send(Ok(ready));
                    supervise(sup, child, sock);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(|e| SandboxError::Start(format!("cannot start its supervisor: {e}")))?;
        let ready = rx
            .recv()
            .map_err(|_| SandboxError::Start("its supervisor ended".into()))??;
        Ok((Sandbox { inner }, ready))
    }

    /// How many times the executor was restarted.
    pub fn restarts(&self) -> u64 {
        self.inner.lock().restarts
    }

    /// A handle that reports on the executor without keeping it alive (for the node's status).
    pub fn probe(&self) -> Probe {
        Probe(Arc::downgrade(&self.inner))
    }

    /// The running executor's process id.
    pub fn pid(&self) -> Option<u32> {
        self.inner.lock().pid
    }

    /// Runs `program` in the executor within `guard` (its budget travels along; its deadline
    /// is enforced there and, failing that, by killing the executor), with every op's hash.
    /// Large inputs go as read-only descriptors of their shared memory, and the node lends a
    /// buffer for each large output.
    pub fn run_traced(
        &self,
        program: &Program,
        inputs: &[Arc<Tensor>],
        guard: &Guard,
    ) -> Result<Answer, TaskError> {
        let failed = |e: shm::ShmError| TaskError::Failed(e.to_string());
        let metas = program
            .infer()
            .map_err(|e| TaskError::Invalid(e.to_string()))?;
        // Inputs not already in shared memory that are worth sharing are copied there.
        let copies: Vec<Option<shm::Shm>> = inputs
            .iter()
            .map(|t| match shm::of(t) {
                None if shm::worth_sharing(&t.meta()) => shm::copy(t).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<_, _>>()
            .map_err(failed)?;
        let mut slots = Vec::with_capacity(inputs.len());
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        let mut buffers = Vec::new();
        for (t, copy) in inputs.iter().zip(&copies) {
            match shm::of(t).or(copy.as_ref()) {
                Some(s) => {
                    fds.push(s.fd().map_err(failed)?);
                    buffers.push(s.id());
                    slots.push(Slot::Shared(t.meta()));
                }
                None => slots.push(Slot::Inline((**t).clone())),
            }
        }
        let mut lent: Vec<Option<shm::ShmMut>> = Vec::with_capacity(program.outputs.len());
        for &o in &program.outputs {
            let meta = &metas[o as usize];
            lent.push(if shm::worth_sharing(meta) {
                let len = usize::try_from(meta.bytes())
                    .map_err(|_| TaskError::Invalid(format!("{meta} is too large")))?;
                Some(shm::ShmMut::new(len).map_err(failed)?)
            } else {
                None
            });
        }
        fds.extend(lent.iter().flatten().map(shm::ShmMut::fd));
        buffers.extend(lent.iter().flatten().map(shm::ShmMut::id));
        let deadline = guard
            .cancel
            .remaining()
            .unwrap_or(Duration::from_secs(3600));
        let (tx, rx) = mpsc::sync_channel(1);
        let id = self.inner.send_run(
            ToExecutor::Run {
                id: 0,
                program: program.clone(),
                inputs: slots,
                lent: lent.iter().map(Option::is_some).collect(),
                buffers,
                forget: shm::take_gone(),
                budget: guard.budget.clone(),
                deadline,
            },
            &fds,
            tx,
            deadline,
        )?;
        drop(fds);
        drop(copies);
        // The lent buffers are held until the executor answers or is gone: never reused
        // while it may still write to them.
        let mut cancel_sent = false;
        let (outputs, hashes) = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(r) => break r,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if guard.cancel.is_cancelled() && !cancel_sent {
                        cancel_sent = true;
                        self.inner.cancel(id);
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    break Err(TaskError::Failed("the executor stopped answering".into()));
                }
            }
        }?;
        let bad = |why: String| TaskError::Failed(format!("the executor answered wrongly: {why}"));
        if outputs.len() != program.outputs.len() || hashes.len() != program.nodes.len() {
            return Err(bad(format!(
                "{} outputs and {} hashes for {} outputs and {} ops",
                outputs.len(),
                hashes.len(),
                program.outputs.len(),
                program.nodes.len()
            )));
        }
        let mut out = Vec::with_capacity(outputs.len());
        for (k, ((slot, buffer), &o)) in outputs
            .into_iter()
            .zip(lent)
            .zip(&program.outputs)
            .enumerate()
        {
            let want = &metas[o as usize];
            let t = match (slot, buffer) {
                (Slot::Inline(t), None) => t,
                (Slot::Shared(meta), Some(b)) if meta == *want => {
                    shm::tensor(&meta, b.freeze()).map_err(bad)?
                }
                (slot, _) => return Err(bad(format!("output {k} came back as {slot:?}"))),
            };
            if t.meta() != *want {
                return Err(bad(format!("output {k} is {}, not {want}", t.meta())));
            }
            out.push(Arc::new(t));
        }
        Ok((out, hashes))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.inner.lock().stopping = true;
        self.inner.changed.notify_all();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn install(&self, child: &Child, sock: &Arc<UnixStream>, ready: Ready) {
        let mut st = self.lock();
        st.generation += 1;
        st.writer = Some(sock.clone());
        st.pid = Some(child.id());
        st.ready = Some(ready);
        drop(st);
        self.changed.notify_all();
    }

    /// Registers a task and sends it; returns its id.
    fn send_run(
        &self,
        mut msg: ToExecutor,
        fds: &[BorrowedFd<'_>],
        reply: mpsc::SyncSender<Result<Reply, TaskError>>,
        deadline: Duration,
    ) -> Result<u64, TaskError> {
        let started = Instant::now();
        let mut st = self.lock();
        while st.writer.is_none() {
            if st.stopping {
                return Err(TaskError::Failed("the node is stopping".into()));
            }
            let waited = started.elapsed();
            if waited >= RESTART_WAIT {
                return Err(TaskError::Failed(format!(
                    "the executor is not running ({})",
                    st.last_exit.as_deref().unwrap_or("starting")
                )));
            }
            st = self
                .changed
                .wait_timeout(st, RESTART_WAIT - waited)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let id = st.next_id;
        st.next_id += 1;
        if let ToExecutor::Run { id: slot, .. } = &mut msg {
            *slot = id;
        }
        let grace = (deadline / 4).max(Duration::from_secs(2));
        let generation = st.generation;
        st.pending.insert(
            id,
            Pending {
                generation,
                reply,
                deadline,
                kill_at: Instant::now() + deadline + grace,
            },
        );
        let writer = st.writer.clone().expect("checked above");
        if let Err(e) = proto::send(&writer, &msg, fds) {
            st.pending.remove(&id);
            return Err(TaskError::Failed(format!("cannot reach the executor: {e}")));
        }
        Ok(id)
    }

    fn cancel(&self, id: u64) {
        let st = self.lock();
        if let Some(w) = &st.writer
            && let Err(e) = proto::send(w, &ToExecutor::Cancel { id }, &[])
        {
            tracing::debug!(task = id, error = %e, "cannot pass a cancel to the executor");
        }
    }

    /// Answers a pending task of this generation.
    fn deliver(&self, generation: u64, id: u64, answer: Result<Reply, TaskError>) {
        let mut st = self.lock();
        if st
            .pending
            .get(&id)
            .is_some_and(|p| p.generation == generation)
            && let Some(p) = st.pending.remove(&id)
        {
            let _ = p.reply.send(answer);
        }
    }
}

/// Starts one executor and waits for it to say it is ready.
fn spawn(cfg: &SandboxConfig) -> Result<(Child, Arc<UnixStream>, Ready), SandboxError> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| SandboxError::Start(e.to_string()))?;
    let mut cmd = Command::new(&cfg.program);
    cmd.arg("executor")
        .arg("--backend")
        .arg(cfg.backend.to_string())
        .arg("--cpu-seconds")
        .arg(cfg.cpu_seconds.to_string());
    if let Some(a) = cfg.address_space {
        cmd.arg("--address-space").arg(a.to_string());
    }
    for f in &cfg.forbid {
        cmd.arg("--forbid").arg(f);
    }
    #[cfg(feature = "fault-injection")]
    if cfg.crash_every > 0 {
        cmd.arg("--crash-every").arg(cfg.crash_every.to_string());
    }
    cmd.arg("--threads").arg(cfg.threads.to_string());
    // Its own process group: a terminal's Ctrl-C reaches the node, which stops it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .env_clear()
        // glibc reserves 64 MiB of address space per malloc arena and thread.
        .env("MALLOC_ARENA_MAX", "2")
        .env("MESA_SHADER_CACHE_DISABLE", "true");
    for k in PASS_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    // The cap on cores: rayon's global pool (every CPU kernel, gemm, checks) and lavapipe's
    // rasterizer threads read these at start.
    if let Some(n) = cfg.cpus {
        cmd.env("RAYON_NUM_THREADS", n.to_string())
            .env("LP_NUM_THREADS", n.to_string());
    }
    let mut child = cmd.spawn().map_err(|source| SandboxError::Spawn {
        program: cfg.program.clone(),
        source,
    })?;
    let ready = (|| {
        ours.set_read_timeout(Some(START_DEADLINE))?;
        let msg = proto::recv::<FromExecutor>(&ours, &mut VecDeque::new())?;
        ours.set_read_timeout(None)?;
        match msg {
            Some(FromExecutor::Ready(r)) => Ok(r),
            Some(other) => Err(std::io::Error::other(format!("unexpected {other:?}"))),
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    })();
    match ready {
        Ok(r) => Ok((child, Arc::new(ours), r)),
        Err(e) => {
            let _ = child.kill();
            let status = child.wait().map(describe).unwrap_or_default();
            Err(SandboxError::Start(format!("{e} ({status})")))
        }
    }
}

/// The supervisor: watches the child, restarts it when it ends, until the sandbox is dropped.
fn supervise(inner: Arc<Inner>, mut child: Child, mut sock: Arc<UnixStream>) {
    let mut quick_failures = 0u32;
    loop {
        let started = Instant::now();
        let generation = inner.lock().generation;
        let reader = {
            let (inner, sock) = (inner.clone(), sock.clone());
            std::thread::Builder::new()
                .name("corvid-sandbox-read".into())
                .spawn(move || read(inner, generation, sock))
        };
        let (why, overdue) = watch(&inner, &mut child, generation);
        {
            let mut st = inner.lock();
            st.writer = None;
            st.pid = None;
            st.last_exit = Some(why.clone());
            let lost: Vec<u64> = st
                .pending
                .iter()
                .filter(|(_, p)| p.generation == generation)
                .map(|(&id, _)| id)
                .collect();
            for id in lost {
                if let Some(p) = st.pending.remove(&id) {
                    let error = if overdue.contains(&id) {
                        TaskError::Deadline(p.deadline)
                    } else {
                        TaskError::Failed(format!("the executor process {why}"))
                    };
                    let _ = p.reply.send(Err(error));
                }
            }
        }
        drop(sock);
        if let Ok(r) = reader {
            let _ = r.join();
        }
        if inner.lock().stopping {
            return;
        }
        quick_failures = if started.elapsed() < Duration::from_secs(5) {
            quick_failures + 1
        } else {
            0
        };
        tracing::warn!(reason = %why, "executor process ended; starting a new one");
        loop {
            // Back off when it keeps dying at once (a broken install, not a bad task).
            let pause =
                Duration::from_millis(50 << quick_failures.min(7)).min(Duration::from_secs(5));
            std::thread::sleep(pause);
            if inner.lock().stopping {
                return;
            }
            match spawn(&inner.cfg) {
                Ok((c, s, ready)) => {
                    inner.lock().restarts += 1;
                    inner.install(&c, &s, ready);
                    (child, sock) = (c, s);
                    break;
                }
                Err(e) => {
                    quick_failures += 1;
                    tracing::error!(error = %e, "cannot restart the executor");
                    inner.lock().last_exit = Some(e.to_string());
                }
            }
        }
    }
}

/// Waits until the child ends, killing it if a task overruns or the sandbox stops. Returns why
/// it ended and which tasks were overdue.
fn watch(inner: &Inner, child: &mut Child, generation: u64) -> (String, Vec<u64>) {
    let limit = inner.cfg.cpu_seconds as f64;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return (describe(status), Vec::new());
        }
        let (stopping, overdue, idle) = {
            let st = inner.lock();
            let now = Instant::now();
            let overdue: Vec<u64> = st
                .pending
                .iter()
                .filter(|(_, p)| p.generation == generation && p.kill_at <= now)
                .map(|(&id, _)| id)
                .collect();
            let idle = !st.pending.values().any(|p| p.generation == generation);
            (st.stopping, overdue, idle)
        };
        let why = if stopping {
            Some("was stopped with the node".to_string())
        } else if !overdue.is_empty() {
            Some(format!(
                "was killed: task {overdue:?} ran past its deadline and did not stop"
            ))
        } else if idle && cpu_seconds(child.id()).is_some_and(|s| s > RECYCLE_AT * limit) {
            Some("was replaced before reaching its CPU-time limit".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.kill();
            let _ = child.wait();
            return (why, overdue);
        }
        let st = inner.lock();
        let _ = inner.changed.wait_timeout(st, WATCH);
    }
}

/// Reads the child's answers until its socket closes.
fn read(inner: Arc<Inner>, generation: u64, sock: Arc<UnixStream>) {
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    loop {
        match proto::recv::<FromExecutor>(&sock, &mut fds) {
            Ok(Some(FromExecutor::Done {
                id,
                outputs,
                hashes,
            })) => inner.deliver(generation, id, Ok((outputs, hashes))),
            Ok(Some(FromExecutor::Failed { id, error })) => {
                inner.deliver(generation, id, Err(error));
            }
            Ok(Some(FromExecutor::Ready(_))) => {}
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "executor socket");
                break;
            }
        }
    }
    inner.changed.notify_all();
}

/// "exited with code 3", "was killed by signal 9 (SIGKILL)".
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name = match sig {
                libc::SIGABRT => " (SIGABRT: it aborted)",
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGSEGV => " (SIGSEGV: a memory fault)",
                libc::SIGBUS => " (SIGBUS)",
                libc::SIGXCPU => " (SIGXCPU: its CPU-time limit)",
                libc::SIGSYS => " (SIGSYS: a forbidden system call)",
                _ => "",
            };
            format!("was killed by signal {sig}{name}")
        }
        None => format!("ended ({status})"),
    }
}

/// CPU seconds process `pid` has used (user + system), from `/proc`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    Some((utime + stime) / ticks)
}
