//! The executor process (`corvid executor`, started by the node, never by hand): confines
//! itself, opens the backend, then runs what the node sends until the node closes the socket.
//!
//! Its socket is its standard input. It holds no key and opens no network connection: a bug in
//! a kernel that the budgets missed costs this process (the node restarts it), never the node.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use corvid_kernels::backend::Guard;
use corvid_kernels::{Backend, BackendChoice, Cancel, ContentId, Op, Program, Tensor, TensorMeta};
use corvid_sdk::wire::TaskError;

use super::confine;
use super::proto::{self, FromExecutor, Ready, Slot, ToExecutor};
use super::shm;

/// Flags of the hidden `corvid executor` command; the node sets them.
#[derive(Clone, Debug, clap::Args)]
pub struct ExecutorArgs {
    /// Backend: cpu or gpu
    #[arg(long)]
    pub backend: BackendChoice,
    /// Address-space limit, bytes
    #[arg(long)]
    pub address_space: Option<u64>,
    /// Lifetime CPU-time limit, seconds
    #[arg(long, default_value_t = DEFAULT_CPU_SECONDS)]
    pub cpu_seconds: u64,
    /// A file the executor must not be able to read (checked and reported), repeatable
    #[arg(long)]
    pub forbid: Vec<PathBuf>,
    /// Tasks run at once (the node's slots)
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Abort on every n-th task (fault injection for tests of the node's recovery)
    #[cfg(feature = "fault-injection")]
    #[arg(long, default_value_t = 0)]
    pub crash_every: u64,
}

/// CPU seconds an executor may use in its life; the node replaces it before then.
pub const DEFAULT_CPU_SECONDS: u64 = 6 * 3600;

type Writer = Arc<Mutex<UnixStream>>;

/// Runs the executor. Called by `main` before any async runtime or thread exists.
pub fn main(args: ExecutorArgs) -> ExitCode {
    let span = tracing::info_span!("executor", pid = std::process::id());
    let _g = span.enter();
    let sock = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            tracing::error!(error = %e, "no socket on standard input");
            return ExitCode::from(2);
        }
    };
    // Die with the node (with the supervisor thread that started us).
    if let Err(e) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
    {
        tracing::warn!(error = %e, "cannot tie the executor's life to the node's");
    }
    // Landlock first: only threads started after it are confined, and none exists yet.
    let landlock = confine::landlock();
    let address_space = match args.backend {
        BackendChoice::Cpu => args.address_space,
        _ => None,
    };
    if let Err(e) = confine::limits(address_space, args.cpu_seconds) {
        tracing::error!(error = %e, "cannot confine the executor");
        return ExitCode::from(2);
    }
    let backend = match Backend::open(args.backend) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot open the backend");
            return ExitCode::from(2);
        }
    };
    warm_up(&backend);
    let seccomp = match confine::seccomp() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "no seccomp filter");
            false
        }
    };
    let ready = Ready {
        class: backend.class().clone(),
        backend: backend.describe(),
        confinement: confine::report(
            landlock,
            seccomp,
            address_space,
            args.cpu_seconds,
            &args.forbid,
        ),
    };
    let writer: Writer = match sock.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            tracing::error!(error = %e, "cannot clone the socket");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = reply(&writer, &FromExecutor::Ready(ready), &[]) {
        tracing::error!(error = %e, "cannot reach the node");
        return ExitCode::from(2);
    }
    serve(&sock, &writer, Arc::new(backend), &args)
}

/// Starts the thread pools and the backend's caches on our own work, before seccomp.
fn warm_up(backend: &Backend) {
    let a = Tensor::random_uniform([64, 64], -1.0, 1.0, 1);
    let p = Program::single(Op::MatMul, vec![a.meta(), a.meta()]);
    if let Err(e) = backend.run(&p, &[a.clone(), a]) {
        tracing::warn!(error = %e, "warm-up run failed");
    }
}

fn reply(
    writer: &Writer,
    msg: &FromExecutor,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<()> {
    let sock = writer.lock().unwrap_or_else(|p| p.into_inner());
    proto::send(&sock, msg, fds)
}

/// One task as the serving loop hands it to a task thread.
struct Job {
    id: u64,
    program: Program,
    inputs: Vec<Slot>,
    /// The mappings of the shared inputs, in order.
    shared: VecDeque<Arc<shm::Mapping>>,
    /// For each output, the buffer the node lent to write it into, if any.
    lent: Vec<Option<Arc<shm::MappingMut>>>,
    guard: Guard,
}

/// Most buffer mappings kept; past this the cache is emptied (the node sends descriptors
/// with every task, so nothing is lost but the time to map again).
const MAX_MAPPINGS: usize = 1 << 14;

/// This executor's mappings of the node's buffers, by the node's buffer id.
#[derive(Default)]
struct Mappings {
    read: HashMap<u64, Arc<shm::Mapping>>,
    write: HashMap<u64, Arc<shm::MappingMut>>,
}

impl Mappings {
    fn forget(&mut self, ids: &[u64]) {
        for id in ids {
            self.read.remove(id);
            self.write.remove(id);
        }
        if self.read.len() + self.write.len() > MAX_MAPPINGS {
            self.read.clear();
            self.write.clear();
        }
    }

    fn read(&mut self, id: u64, fd: OwnedFd) -> Result<Arc<shm::Mapping>, shm::ShmError> {
        if let Some(m) = self.read.get(&id) {
            return Ok(m.clone());
        }
        let m = Arc::new(shm::Mapping::read(fd)?);
        self.read.insert(id, m.clone());
        Ok(m)
    }

    fn write(&mut self, id: u64, fd: OwnedFd) -> Result<Arc<shm::MappingMut>, shm::ShmError> {
        if let Some(m) = self.write.get(&id) {
            return Ok(m.clone());
        }
        let m = Arc::new(shm::MappingMut::write(fd)?);
        self.write.insert(id, m.clone());
        Ok(m)
    }
}

fn serve(
    sock: &UnixStream,
    writer: &Writer,
    backend: Arc<Backend>,
    args: &ExecutorArgs,
) -> ExitCode {
    let running: Arc<Mutex<HashMap<u64, Cancel>>> = Arc::default();
    // A fixed set of task threads, started before any task arrives.
    let (jobs, queue) = std::sync::mpsc::channel::<Job>();
    let queue = Arc::new(Mutex::new(queue));
    for i in 0..args.threads.max(1) {
        let (queue, backend, writer, running) = (
            queue.clone(),
            backend.clone(),
            writer.clone(),
            running.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("task-{i}"))
            .spawn(move || {
                loop {
                    let job = match queue.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    finish(&backend, &writer, &running, job);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a task thread");
            return ExitCode::from(2);
        }
    }
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
    let mut maps = Mappings::default();
    #[cfg(feature = "fault-injection")]
    let mut count = 0u64;
    loop {
        let msg = match proto::recv::<ToExecutor>(sock, &mut fds) {
            Ok(Some(m)) => m,
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "the node's socket failed");
                return ExitCode::from(3);
            }
        };
        match msg {
            ToExecutor::Cancel { id } => {
                if let Some(flag) = running.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
                    flag.cancel();
                }
            }
            ToExecutor::Run {
                id,
                program,
                inputs,
                lent,
                buffers,
                forget,
                budget,
                deadline,
            } => {
                #[cfg(feature = "fault-injection")]
                {
                    count += 1;
                    if args.crash_every > 0 && count.is_multiple_of(args.crash_every) {
                        tracing::warn!(task = id, "crashing on purpose (fault injection)");
                        std::process::abort();
                    }
                }
                maps.forget(&forget);
                // This message's descriptors are taken here, in order, before the next one.
                let mine: Vec<OwnedFd> = fds.drain(..buffers.len().min(fds.len())).collect();
                let n_shared = inputs
                    .iter()
                    .filter(|s| matches!(s, Slot::Shared(_)))
                    .count();
                let mapped = map_buffers(&mut maps, &buffers, mine, n_shared, &lent);
                let (shared, lent) = match mapped {
                    Ok(m) => m,
                    Err(error) => {
                        let _ = reply(writer, &FromExecutor::Failed { id, error }, &[]);
                        continue;
                    }
                };
                let flag = Cancel::none();
                running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, flag.clone());
                let job = Job {
                    id,
                    program,
                    inputs,
                    shared,
                    lent,
                    guard: Guard::new(budget, flag.with_deadline(deadline)),
                };
                // A tiny task runs right here: handing it to a task thread would cost more
                // than running it, and nothing needs cancelling in a microsecond.
                if is_tiny(&job) {
                    finish(&backend, writer, &running, job);
                } else if jobs.send(job).is_err() {
                    return ExitCode::from(3);
                }
            }
        }
    }
}

type Mapped = (
    VecDeque<Arc<shm::Mapping>>,
    Vec<Option<Arc<shm::MappingMut>>>,
);

/// The mappings of a task's buffers: `n_shared` inputs, then one per lent output.
fn map_buffers(
    maps: &mut Mappings,
    ids: &[u64],
    fds: Vec<OwnedFd>,
    n_shared: usize,
    lent: &[bool],
) -> Result<Mapped, TaskError> {
    let failed = |e: shm::ShmError| TaskError::Failed(e.to_string());
    let want = n_shared + lent.iter().filter(|&&l| l).count();
    if fds.len() != want || ids.len() != want {
        return Err(TaskError::Failed(format!(
            "{} buffers arrived with {} ids for {want}",
            fds.len(),
            ids.len()
        )));
    }
    let mut pairs = ids.iter().copied().zip(fds);
    let mut shared = VecDeque::with_capacity(n_shared);
    for (id, fd) in pairs.by_ref().take(n_shared) {
        shared.push_back(maps.read(id, fd).map_err(failed)?);
    }
    let mut out = Vec::with_capacity(lent.len());
    for &l in lent {
        out.push(match l {
            true => {
                let (id, fd) = pairs.next().expect("counted above");
                Some(maps.write(id, fd).map_err(failed)?)
            }
            false => None,
        });
    }
    Ok((shared, out))
}

/// Whether a task is small enough to run on the thread that reads the socket.
fn is_tiny(job: &Job) -> bool {
    const TINY_BYTES: u64 = 64 << 10;
    const TINY_FLOPS: u64 = 1 << 16;
    job.shared.is_empty()
        && job.program.nodes.len() <= 16
        && job
            .program
            .validate(&job.guard.budget)
            .is_ok_and(|f| f.flops <= TINY_FLOPS && f.largest_value <= TINY_BYTES)
}

/// Runs a task and answers the node.
fn finish(backend: &Backend, writer: &Writer, running: &Mutex<HashMap<u64, Cancel>>, job: Job) {
    let id = job.id;
    let result = run(backend, job);
    running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    let msg = match result {
        Ok((outputs, hashes)) => FromExecutor::Done {
            id,
            outputs,
            hashes,
        },
        Err(error) => FromExecutor::Failed { id, error },
    };
    if let Err(e) = reply(writer, &msg, &[]) {
        tracing::warn!(task = id, error = %e, "cannot answer the node");
    }
}

/// One task: inputs mapped in place, the traced run, large outputs written into the buffers
/// the node lent.
fn run(backend: &Backend, job: Job) -> Result<(Vec<Slot>, Vec<ContentId>), TaskError> {
    let Job {
        program,
        inputs,
        mut shared,
        lent,
        guard,
        ..
    } = job;
    let failed = |e: shm::ShmError| TaskError::Failed(e.to_string());
    let size = |meta: &TensorMeta| {
        usize::try_from(meta.bytes())
            .map_err(|_| TaskError::Invalid(format!("{meta} is too large")))
    };
    let mut tensors = Vec::with_capacity(inputs.len());
    for slot in inputs {
        let t = match slot {
            Slot::Inline(t) => t,
            Slot::Shared(meta) => {
                let map = shared.pop_front().ok_or_else(|| {
                    TaskError::Failed("an input's shared memory did not arrive".into())
                })?;
                let view = shm::View::new(map, size(&meta)?).map_err(failed)?;
                shm::tensor(&meta, view).map_err(TaskError::Failed)?
            }
        };
        tensors.push(Arc::new(t));
    }
    let (outputs, hashes) = backend
        .run_traced(&program, &tensors, &guard)
        .map_err(crate::task_error::from_exec)?;
    let mut slots = Vec::with_capacity(outputs.len());
    for (t, lent) in outputs.into_iter().zip(lent) {
        match lent {
            None => slots.push(Slot::Inline(t)),
            Some(out) => {
                out.write_prefix(bytemuck::cast_slice(t.words()))
                    .map_err(failed)?;
                slots.push(Slot::Shared(t.meta()));
            }
        }
    }
    Ok((slots, hashes))
}
