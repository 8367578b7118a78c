//! The GPU owner: one thread holds the wgpu device, queue, pipeline cache and buffer pool.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use wgpu::util::DeviceExt;

use super::kernel::{Kernel, Plan, plan};
use crate::backend::ExecError;
use crate::program::Program;
use crate::tensor::{Tensor, TensorMeta};

/// At most this many bytes of idle buffers are kept for reuse.
const POOL_BYTES: u64 = 512 << 20;

/// Device state. Lives on the GPU thread only.
pub(super) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    /// Largest tensor the device can bind, in bytes.
    pub max_binding: u64,
    pipelines: HashMap<Kernel, wgpu::ComputePipeline>,
    pool: Pool,
}

impl Gpu {
    pub fn new(device: wgpu::Device, queue: wgpu::Queue, limits: &wgpu::Limits) -> Self {
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        Gpu {
            device,
            queue,
            max_binding,
            pipelines: HashMap::new(),
            pool: Pool::default(),
        }
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

    fn check_size(&self, what: String, meta: &TensorMeta) -> Result<(), ExecError> {
        if meta.bytes() > self.max_binding {
            return Err(ExecError::TooLarge {
                what,
                meta: meta.clone(),
                bytes: meta.bytes(),
                limit: self.max_binding,
            });
        }
        Ok(())
    }

    /// Runs a whole program: inputs up, every node dispatched in one submission, outputs down.
    pub fn run(
        &mut self,
        program: &Program,
        inputs: &[Arc<Tensor>],
    ) -> Result<Vec<Tensor>, ExecError> {
        let refs: Vec<&Tensor> = inputs.iter().map(|t| &**t).collect();
        let metas = crate::backend::check_inputs(program, &refs)?;
        for (i, m) in metas.iter().enumerate() {
            let what = match i.checked_sub(program.inputs.len()) {
                None => format!("input {i}"),
                Some(n) => format!("node {n} ('{}')", program.nodes[n].op),
            };
            self.check_size(what, m)?;
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let result = self.encode_and_run(program, &refs, &metas);
        let error = pollster::block_on(scope.pop());
        if let Some(e) = error {
            return Err(ExecError::Device(e.to_string()));
        }
        result
    }

    fn encode_and_run(
        &mut self,
        program: &Program,
        inputs: &[&Tensor],
        metas: &[TensorMeta],
    ) -> Result<Vec<Tensor>, ExecError> {
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
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("program"),
            });
        let n_in = program.inputs.len();
        for (ni, node) in program.nodes.iter().enumerate() {
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
            values[n_in + ni] = Some(out);
            drop(args);
            for &a in &node.args {
                if last_use[a as usize] == ni {
                    self.release(values[a as usize].take());
                }
            }
        }
        // Copy outputs into mappable buffers, submit everything once and wait.
        let mut staging = Vec::with_capacity(program.outputs.len());
        for &o in &program.outputs {
            let meta = &metas[o as usize];
            let size = meta.bytes().max(4);
            let s = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("readback"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let src = values[o as usize]
                .as_ref()
                .expect("outputs are never released");
            if meta.bytes() > 0 {
                encoder.copy_buffer_to_buffer(src, 0, &s, 0, meta.bytes());
            }
            staging.push(s);
        }
        self.queue.submit([encoder.finish()]);
        for s in &staging {
            s.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        }
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| ExecError::Device(e.to_string()))?;
        let mut outputs = Vec::with_capacity(staging.len());
        for (s, &o) in staging.iter().zip(&program.outputs) {
            let meta = &metas[o as usize];
            let view = s
                .slice(..)
                .get_mapped_range()
                .map_err(|e| ExecError::Device(e.to_string()))?;
            let words: &[u32] = bytemuck::cast_slice(&view[..meta.bytes() as usize]);
            let t = Tensor::from_words(meta.dtype, meta.shape.clone(), words)
                .expect("readback length matches the output meta");
            drop(view);
            s.unmap();
            outputs.push(t);
        }
        for v in values {
            self.release(v);
        }
        Ok(outputs)
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
