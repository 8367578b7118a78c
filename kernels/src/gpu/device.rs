//! The GPU owner: one thread holds the wgpu device, queue, pipeline cache and buffer pool.
//!
//! Every run is wrapped in error scopes (out-of-memory, validation, internal), so a device
//! error is a task error, never wgpu's default handler (which panics); waits are sliced so a
//! cancelled or overdue run stops waiting, and a device left busy or lost is replaced.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wgpu::util::DeviceExt;

use super::kernel::{Kernel, Plan, plan};
use crate::exec::{ExecError, Guard};
use crate::program::Program;
use crate::tensor::{ContentId, Tensor, TensorMeta, content_id_of};

/// At most this many bytes of idle buffers are kept for reuse.
const POOL_BYTES: u64 = 512 << 20;
/// A traced run reads node outputs back in batches of about this many bytes, so the host
/// never holds more than this of them at once.
const STAGE_BYTES: u64 = 64 << 20;
/// Waits on the device are sliced so a cancellation is seen within this.
const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Device state. Lives on the GPU thread only.
pub(super) struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// Largest tensor the device can bind, in bytes.
    max_binding: u64,
    pipelines: HashMap<Kernel, wgpu::ComputePipeline>,
    pool: Pool,
    /// Set by the device-lost callback, a panic, or a run abandoned with work in flight.
    lost: Arc<AtomicBool>,
}

/// What a staged read-back is for: a node's hash, some program outputs, or both.
struct Staged {
    buffer: wgpu::Buffer,
    meta: TensorMeta,
    hash: Option<usize>,
    outputs: Vec<usize>,
}

impl Gpu {
    /// Opens a device on `adapter` with its full limits, errors logged rather than panicking.
    pub fn open(adapter: &wgpu::Adapter) -> Result<Gpu, String> {
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("corvid"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| e.to_string())?;
        let lost = Arc::new(AtomicBool::new(false));
        let name = adapter.get_info().name;
        let flag = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            tracing::error!(adapter = %name, ?reason, %msg, "gpu device lost");
            flag.store(true, Ordering::Relaxed);
        });
        // Errors outside our scopes (there should be none) are logged, not panicked on.
        device.on_uncaptured_error(Arc::new(|e| {
            tracing::error!(error = %e, "uncaptured gpu error");
        }));
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Ok(Gpu {
            device,
            queue,
            max_binding,
            pipelines: HashMap::new(),
            pool: Pool::default(),
            lost,
        })
    }

    /// Whether the device must be replaced before the next run.
    pub fn needs_replacing(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Marks the device for replacement.
    pub fn poison(&self) {
        self.lost.store(true, Ordering::Relaxed);
    }

    fn pipeline(&mut self, k: Kernel) -> &wgpu::ComputePipeline {
        let device = &self.device;
        self.pipelines.entry(k).or_insert_with(|| {
            let label = k.label();
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(k.source().into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&label),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
        })
    }

    /// Runs a whole program: inputs up, every node dispatched, outputs (and, with `trace`,
    /// every node's hash) down. The program is validated against the guard's budget, capped
    /// at the device's binding limit, before anything is allocated.
    pub fn run(
        &mut self,
        program: &Program,
        inputs: &[Arc<Tensor>],
        guard: &Guard,
        trace: bool,
    ) -> Result<(Vec<Tensor>, Vec<ContentId>), ExecError> {
        let refs: Vec<&Tensor> = inputs.iter().map(|t| &**t).collect();
        let mut budget = guard.budget.clone();
        budget.max_tensor_bytes = budget.max_tensor_bytes.min(self.max_binding);
        let metas = crate::exec::check_inputs(program, &refs, &budget)?.metas;
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let result = self.encode_and_run(program, &refs, &metas, guard, trace);
        let errors = [
            pollster::block_on(internal.pop()),
            pollster::block_on(validation.pop()),
            pollster::block_on(oom.pop()),
        ];
        if let Some(e) = errors.into_iter().flatten().next() {
            // Whatever was pooled may be what exhausted the device.
            self.pool = Pool::default();
            return Err(match e {
                wgpu::Error::OutOfMemory { .. } => ExecError::OutOfMemory(e.to_string()),
                e => ExecError::Device(e.to_string()),
            });
        }
        if matches!(result, Err(ExecError::Stopped(_))) {
            // Work may still be running on the device: start the next run on a fresh one.
            self.poison();
        }
        result
    }

    fn encoder(&self) -> wgpu::CommandEncoder {
        self.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("program"),
            })
    }

    fn encode_and_run(
        &mut self,
        program: &Program,
        inputs: &[&Tensor],
        metas: &[TensorMeta],
        guard: &Guard,
        trace: bool,
    ) -> Result<(Vec<Tensor>, Vec<ContentId>), ExecError> {
        let mut values: Vec<Option<Rc<wgpu::Buffer>>> = vec![None; program.value_count()];
        for (i, t) in inputs.iter().enumerate() {
            let buf = self
                .pool
                .take(&self.device, t.meta().bytes(), self.max_binding);
            self.queue
                .write_buffer(&buf, 0, bytemuck::cast_slice(t.words()));
            values[i] = Some(Rc::new(buf));
        }
        let last_use = program.last_uses();
        let n_in = program.inputs.len();
        let mut encoder = self.encoder();
        let mut staged: Vec<Staged> = Vec::new();
        let mut staged_bytes = 0u64;
        let mut hashes: Vec<Option<ContentId>> =
            vec![None; if trace { program.nodes.len() } else { 0 }];
        let mut outputs: Vec<Option<Tensor>> = vec![None; program.outputs.len()];
        let mut output_staged = vec![false; program.outputs.len()];
        for (ni, node) in program.nodes.iter().enumerate() {
            guard.cancel.check()?;
            let arg_metas: Vec<&TensorMeta> =
                node.args.iter().map(|&a| &metas[a as usize]).collect();
            let out_meta = &metas[n_in + ni];
            let args: Vec<Rc<wgpu::Buffer>> = node
                .args
                .iter()
                .map(|&a| {
                    values[a as usize]
                        .clone()
                        .expect("argument computed and not yet released")
                })
                .collect();
            let planned = plan(&node.op, &arg_metas, out_meta).map_err(|e| ExecError::Grid {
                node: ni,
                source: e,
            })?;
            let out = match planned {
                Plan::Alias(i) => args[i].clone(),
                Plan::Run(dispatches) => {
                    let out = self
                        .pool
                        .take(&self.device, out_meta.bytes(), self.max_binding);
                    if out_meta.numel() > 0 {
                        for d in &dispatches {
                            self.dispatch(&mut encoder, d, &out, &args);
                        }
                    }
                    Rc::new(out)
                }
            };
            if trace {
                // Outputs that are this value are read back with its hash.
                let v = (n_in + ni) as u32;
                let outs: Vec<usize> = (0..program.outputs.len())
                    .filter(|&k| program.outputs[k] == v)
                    .collect();
                for &k in &outs {
                    output_staged[k] = true;
                }
                staged_bytes += out_meta.bytes();
                staged.push(self.stage(&mut encoder, &out, out_meta, Some(ni), outs));
            }
            values[n_in + ni] = Some(out);
            drop(args);
            for &a in &node.args {
                if last_use[a as usize] == ni {
                    self.release(values[a as usize].take());
                }
            }
            if last_use[n_in + ni] == ni {
                self.release(values[n_in + ni].take());
            }
            if staged_bytes >= STAGE_BYTES {
                let full = std::mem::replace(&mut encoder, self.encoder());
                self.flush(full, &mut staged, &mut hashes, &mut outputs, guard)?;
                staged_bytes = 0;
            }
        }
        for (k, &o) in program.outputs.iter().enumerate() {
            if output_staged[k] {
                continue;
            }
            // An output named twice is read back once.
            let outs: Vec<usize> = (k..program.outputs.len())
                .filter(|&j| program.outputs[j] == o && !output_staged[j])
                .collect();
            for &j in &outs {
                output_staged[j] = true;
            }
            let src = values[o as usize]
                .clone()
                .expect("outputs are never released");
            staged.push(self.stage(&mut encoder, &src, &metas[o as usize], None, outs));
        }
        self.flush(encoder, &mut staged, &mut hashes, &mut outputs, guard)?;
        for v in values {
            self.release(v);
        }
        let outputs = outputs
            .into_iter()
            .map(|t| t.expect("every output was read back"))
            .collect();
        let hashes = hashes
            .into_iter()
            .map(|h| h.expect("every node was hashed"))
            .collect();
        Ok((outputs, hashes))
    }

    /// Records a copy of `src` into a fresh mappable buffer.
    fn stage(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        meta: &TensorMeta,
        hash: Option<usize>,
        outputs: Vec<usize>,
    ) -> Staged {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: meta.bytes().max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if meta.bytes() > 0 {
            encoder.copy_buffer_to_buffer(src, 0, &buffer, 0, meta.bytes());
        }
        Staged {
            buffer,
            meta: meta.clone(),
            hash,
            outputs,
        }
    }

    /// Submits `encoder`, waits (within the guard), and turns every staged read-back into the
    /// hashes and outputs it is for.
    fn flush(
        &mut self,
        encoder: wgpu::CommandEncoder,
        staged: &mut Vec<Staged>,
        hashes: &mut [Option<ContentId>],
        outputs: &mut [Option<Tensor>],
        guard: &Guard,
    ) -> Result<(), ExecError> {
        let index = self.queue.submit([encoder.finish()]);
        for s in staged.iter() {
            s.buffer.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        }
        loop {
            match self.device.poll(wgpu::PollType::Wait {
                submission_index: Some(index.clone()),
                timeout: Some(WAIT_SLICE),
            }) {
                Ok(_) => break,
                Err(wgpu::PollError::Timeout) => guard.cancel.check()?,
                Err(e) => return Err(ExecError::Device(e.to_string())),
            }
        }
        for s in staged.drain(..) {
            let view = s
                .buffer
                .slice(..)
                .get_mapped_range()
                .map_err(|e| ExecError::Device(e.to_string()))?;
            let bytes = &view[..s.meta.bytes() as usize];
            if let Some(h) = s.hash {
                hashes[h] = Some(content_id_of(s.meta.dtype, &s.meta.shape, bytes));
            }
            if !s.outputs.is_empty() {
                let t = Tensor::from_words(
                    s.meta.dtype,
                    s.meta.shape.clone(),
                    bytemuck::cast_slice(bytes),
                )
                .expect("readback length matches the output meta");
                for &k in &s.outputs {
                    outputs[k] = Some(t.clone());
                }
            }
            drop(view);
            s.buffer.unmap();
        }
        Ok(())
    }

    fn dispatch(
        &mut self,
        encoder: &mut wgpu::CommandEncoder,
        d: &super::kernel::Dispatch,
        out: &wgpu::Buffer,
        args: &[Rc<wgpu::Buffer>],
    ) {
        let params = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: bytemuck::cast_slice(&d.params),
                usage: wgpu::BufferUsages::STORAGE,
            });
        let pipeline = self.pipeline(d.kernel).clone();
        let mut entries = vec![
            wgpu::BindGroupEntry {
                binding: 0,
                resource: params.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: out.as_entire_binding(),
            },
        ];
        for (slot, &i) in d.inputs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: 2 + slot as u32,
                resource: args[i].as_entire_binding(),
            });
        }
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
    }

    fn release(&mut self, v: Option<Rc<wgpu::Buffer>>) {
        if let Some(rc) = v
            && let Ok(buf) = Rc::try_unwrap(rc)
        {
            self.pool.give(buf);
        }
    }
}

/// Idle storage buffers by size class (powers of two), bounded by [`POOL_BYTES`].
#[derive(Default)]
struct Pool {
    free: BTreeMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
}

impl Pool {
    fn take(&mut self, device: &wgpu::Device, bytes: u64, max: u64) -> wgpu::Buffer {
        let size = bytes
            .max(256)
            .next_power_of_two()
            .min(max.max(bytes.max(4)));
        if let Some(buf) = self.free.get_mut(&size).and_then(Vec::pop) {
            self.bytes -= size;
            return buf;
        }
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tensor"),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    fn give(&mut self, buf: wgpu::Buffer) {
        let size = buf.size();
        if self.bytes + size <= POOL_BYTES {
            self.bytes += size;
            self.free.entry(size).or_default().push(buf);
        }
    }
}
