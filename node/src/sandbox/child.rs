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
use corvid_kernels::{Backend, BackendChoice, Cancel, Op, Program, Tensor};
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
    /// Abort on every n-th task (fault injection for tests of the node's recovery)
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
    serve(&sock, &writer, Arc::new(backend), args.crash_every)
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

fn serve(sock: &UnixStream, writer: &Writer, backend: Arc<Backend>, crash_every: u64) -> ExitCode {
    let running: Arc<Mutex<HashMap<u64, Cancel>>> = Arc::default();
    let mut fds: VecDeque<OwnedFd> = VecDeque::new();
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
                budget,
                deadline,
            } => {
                count += 1;
                if crash_every > 0 && count.is_multiple_of(crash_every) {
                    tracing::warn!(task = id, "crashing on purpose (fault injection)");
                    std::process::abort();
                }
                // Descriptors are taken in message order, here, before the next message.
                let mut shared = Vec::new();
                for slot in &inputs {
                    if let Slot::Shared(_) = slot {
                        shared.push(fds.pop_front());
                    }
                }
                let flag = Cancel::none();
                running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id, flag.clone());
                let (backend, out, running) = (backend.clone(), writer.clone(), running.clone());
                let guard = Guard::new(budget, flag.with_deadline(deadline));
                let spawned = std::thread::Builder::new()
                    .name(format!("task-{id}"))
                    .spawn(move || {
                        let result = run(&backend, &program, inputs, shared, &guard);
                        running
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                        let sent = match result {
                            Ok((outputs, hashes, shms)) => {
                                let fds: Vec<_> = shms.iter().map(shm::Shm::fd).collect();
                                reply(
                                    &out,
                                    &FromExecutor::Done {
                                        id,
                                        outputs,
                                        hashes,
                                    },
                                    &fds,
                                )
                            }
                            Err(error) => reply(&out, &FromExecutor::Failed { id, error }, &[]),
                        };
                        if let Err(e) = sent {
                            tracing::warn!(task = id, error = %e, "cannot answer the node");
                        }
                    });
                if let Err(e) = spawned {
                    let error =
                        TaskError::Failed(format!("the executor cannot start a thread: {e}"));
                    let _ = reply(writer, &FromExecutor::Failed { id, error }, &[]);
                }
            }
        }
    }
}

type Outcome = (Vec<Slot>, Vec<corvid_kernels::ContentId>, Vec<shm::Shm>);

/// One task: inputs mapped in place, the traced run, outputs shared or inlined.
fn run(
    backend: &Backend,
    program: &Program,
    inputs: Vec<Slot>,
    mut shared: Vec<Option<OwnedFd>>,
    guard: &Guard,
) -> Result<Outcome, TaskError> {
    shared.reverse();
    let mut tensors = Vec::with_capacity(inputs.len());
    for slot in inputs {
        let t = match slot {
            Slot::Inline(t) => t,
            Slot::Shared(meta) => {
                let fd = shared.pop().flatten().ok_or_else(|| {
                    TaskError::Failed("an input's shared memory did not arrive".into())
                })?;
                let len = usize::try_from(meta.bytes())
                    .map_err(|_| TaskError::Invalid(format!("{meta} is too large")))?;
                let map = shm::Shm::map(fd, len).map_err(|e| TaskError::Failed(e.to_string()))?;
                shm::tensor(&meta, map).map_err(TaskError::Failed)?
            }
        };
        tensors.push(Arc::new(t));
    }
    let (outputs, hashes) = backend
        .run_traced(program, &tensors, guard)
        .map_err(crate::work::task_error)?;
    let mut slots = Vec::with_capacity(outputs.len());
    let mut shms = Vec::new();
    for t in outputs {
        if shm::worth_sharing(&t.meta()) {
            shms.push(shm::copy(&t).map_err(|e| TaskError::Failed(e.to_string()))?);
            slots.push(Slot::Shared(t.meta()));
        } else {
            slots.push(Slot::Inline(t));
        }
    }
    Ok((slots, hashes, shms))
}
