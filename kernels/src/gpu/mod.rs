//! The wgpu backend. One dedicated thread owns instance, device, queue, pipelines and buffers;
//! [`GpuBackend`] is a cheap handle that sends it programs over a bounded channel.

mod device;
pub use kernel::GridTooLarge;
pub mod kernel;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, mpsc};
use std::thread;

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cancel::Cancel;
use crate::class::{BackendKind, DeterminismClass};
use crate::exec::{BackendError, ExecError, Guard};
use crate::program::Program;
use crate::tensor::{ContentId, Tensor};

/// What the chosen adapter is, for logs, adverts and the determinism class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterSummary {
    pub name: String,
    /// `vulkan`, `metal`, `dx12`.
    pub backend: String,
    /// `discrete`, `integrated`, `virtual`, `software`, `other`.
    pub device_type: String,
    pub driver: String,
    /// Largest tensor the device binds, in bytes.
    pub max_binding: u64,
}

impl AdapterSummary {
    fn of(info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> Self {
        AdapterSummary {
            name: info.name.clone(),
            backend: info.backend.to_str().to_string(),
            device_type: device_type(info.device_type).into(),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            max_binding: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
        }
    }

    /// Software rasterisers (lavapipe, SwiftShader, WARP) run on the CPU.
    pub fn is_software(&self) -> bool {
        self.device_type == "software"
    }
}

fn device_type(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "software",
        wgpu::DeviceType::Other => "other",
    }
}

/// Lists the adapters wgpu finds on the native GPU APIs (never the GL fallback).
pub fn adapters() -> Vec<AdapterSummary> {
    let instance = instance();
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
        .iter()
        .map(|a| AdapterSummary::of(&a.get_info(), &a.limits()))
        .collect()
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        flags: wgpu::InstanceFlags::empty(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    })
}

/// Orders adapters: hardware first, software last.
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

type Reply = Result<(Vec<Tensor>, Vec<ContentId>), ExecError>;

struct Job {
    program: Program,
    inputs: Vec<Arc<Tensor>>,
    guard: Guard,
    trace: bool,
    reply: mpsc::SyncSender<Reply>,
}

/// Handle to the GPU thread. Cloning shares the thread; it stops when the last handle drops,
/// and that drop waits (a bounded time) for the thread to release the device.
#[derive(Clone, Debug)]
pub struct GpuBackend {
    // Dropped first: with the last sender gone the thread stops, then `_stopped` waits for it.
    jobs: mpsc::SyncSender<Job>,
    adapter: AdapterSummary,
    class: DeterminismClass,
    _stopped: Arc<Stopped>,
}

/// How long the last handle's drop waits for the GPU thread to release its device.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Closed when the GPU thread has ended. A process that exits while a Vulkan driver is still
/// tearing a device down on another thread can crash in the driver (seen with lavapipe at the
/// end of a test binary), so the last handle waits for it.
#[derive(Debug)]
struct Stopped(std::sync::Mutex<mpsc::Receiver<()>>);

impl Drop for Stopped {
    fn drop(&mut self) {
        let done = self.0.get_mut().unwrap_or_else(|p| p.into_inner());
        // The thread sends nothing: it ends, and its end disconnects the channel.
        if let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(STOP_WAIT) {
            tracing::warn!("the gpu thread did not release its device within {STOP_WAIT:?}");
        }
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} nodes)", self.program.nodes.len())
    }
}

impl GpuBackend {
    /// Opens the best adapter. Software adapters are taken only when `allow_software` is set.
    pub fn new(allow_software: bool) -> Result<Self, BackendError> {
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (jobs, rx) = mpsc::sync_channel::<Job>(16);
        let (ended, stopped) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("corvid-gpu".into())
            .spawn(move || {
                // Dropped when the thread ends, device released: the last handle waits for it.
                let _ended = ended;
                let (adapter, gpu) = match open(allow_software) {
                    Ok((adapter, gpu, summary)) => {
                        let _ = ready_tx.send(Ok(summary));
                        (adapter, gpu)
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                serve(adapter, gpu, rx);
            })
            .map_err(|e| BackendError::Thread(e.to_string()))?;
        let adapter = ready_rx
            .recv()
            .map_err(|_| BackendError::Thread("gpu thread exited during start-up".into()))??;
        let class = DeterminismClass::new(
            BackendKind::Gpu,
            adapter.name.clone(),
            format!("{} {}", adapter.backend, adapter.driver),
            &kernel::gpu_kernel_hash(),
        );
        Ok(GpuBackend {
            jobs,
            adapter,
            class,
            _stopped: Arc::new(Stopped(std::sync::Mutex::new(stopped))),
        })
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.adapter
    }

    pub fn class(&self) -> &DeterminismClass {
        &self.class
    }

    /// Runs `program` on the device within the binding limit; blocks until the outputs are
    /// back on the host.
    pub fn run(&self, program: &Program, inputs: &[Tensor]) -> Result<Vec<Tensor>, ExecError> {
        self.run_shared(program, inputs.iter().cloned().map(Arc::new).collect())
    }

    /// [`GpuBackend::run`] on shared inputs: only the handles cross to the GPU thread.
    pub fn run_shared(
        &self,
        program: &Program,
        inputs: Vec<Arc<Tensor>>,
    ) -> Result<Vec<Tensor>, ExecError> {
        let guard = Guard::new(Budget::local(self.adapter.max_binding), Cancel::none());
        Ok(self.execute(program, inputs, &guard, false)?.0)
    }

    /// Runs `program` within `guard`; with `trace`, also the content id of every node's
    /// output (see [`crate::Backend::run_traced`]).
    pub(crate) fn execute(
        &self,
        program: &Program,
        inputs: Vec<Arc<Tensor>>,
        guard: &Guard,
        trace: bool,
    ) -> Reply {
        let (reply, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Job {
                program: program.clone(),
                inputs,
                guard: guard.clone(),
                trace,
                reply,
            })
            .map_err(|_| ExecError::BackendGone)?;
        rx.recv().map_err(|_| ExecError::BackendGone)?
    }
}

fn open(
    allow_software: bool,
) -> Result<(wgpu::Adapter, device::Gpu, AdapterSummary), BackendError> {
    let instance = instance();
    let mut found = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY));
    found.sort_by_key(|a| rank(a.get_info().device_type));
    let names: Vec<String> = found
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!(
                "{} ({}, {})",
                i.name,
                i.backend.to_str(),
                device_type(i.device_type)
            )
        })
        .collect();
    let Some(adapter) = found
        .into_iter()
        .find(|a| allow_software || a.get_info().device_type != wgpu::DeviceType::Cpu)
    else {
        return Err(BackendError::NoAdapter { found: names });
    };
    let summary = AdapterSummary::of(&adapter.get_info(), &adapter.limits());
    let gpu = device::Gpu::open(&adapter).map_err(|reason| BackendError::Device {
        adapter: summary.name.clone(),
        reason,
    })?;
    Ok((adapter, gpu, summary))
}

/// The GPU thread's loop. A device that was lost, panicked or was left running work past a
/// deadline is replaced by a fresh one on the same adapter before the next job (the old one
/// is dropped on a thread of its own, in case dropping waits for that work), so one bad job
/// costs that job, never the ones after it.
fn serve(adapter: wgpu::Adapter, first: device::Gpu, jobs: mpsc::Receiver<Job>) {
    let mut gpu = Some(first);
    while let Ok(job) = jobs.recv() {
        if gpu.as_ref().is_none_or(device::Gpu::needs_replacing) {
            if let Some(old) = gpu.take() {
                retire(old);
            }
            match device::Gpu::open(&adapter) {
                Ok(g) => {
                    tracing::warn!("gpu device re-created");
                    gpu = Some(g);
                }
                Err(e) => tracing::error!(error = %e, "could not re-create the gpu device"),
            }
        }
        let result = match gpu.as_mut() {
            None => Err(ExecError::Device(
                "no gpu device: re-creating it failed".into(),
            )),
            Some(g) => catch_unwind(AssertUnwindSafe(|| {
                g.run(&job.program, &job.inputs, &job.guard, job.trace)
            }))
            .unwrap_or_else(|panic| {
                g.poison();
                Err(ExecError::Device(format!(
                    "the gpu thread panicked: {}",
                    panic_message(&panic)
                )))
            }),
        };
        // The caller may have given up waiting; nothing to do then.
        let _ = job.reply.send(result);
    }
    tracing::debug!("gpu thread stopping");
}

/// Drops a device on a thread of its own: wgpu may wait there for work still running.
fn retire(gpu: device::Gpu) {
    let spawned = thread::Builder::new()
        .name("corvid-gpu-retire".into())
        .spawn(move || drop(gpu));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start a thread to drop the old gpu device");
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
