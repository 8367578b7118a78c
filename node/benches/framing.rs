//! The task codec alone, in memory: a request carrying one 64 MiB tensor written and read
//! back through `TaskCodec` (what `/corvid/task/4` does on either side of a stream, without
//! noise, yamux or TCP), and the same request with the tensor as a recipe. Criterion's
//! `B/s` is tensor bytes through the codec; the swarm bench's transfer figure, over loopback
//! TCP + noise + yamux, set against it shows what the transport costs.
//!
//! `cargo bench -p corvid-node --bench framing`
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;

use corvid_kernels::{Op, Program, Recipe, Tensor, TensorMeta, UnaryOp};
use corvid_node::net::task::{Envelope, TASK_PROTOCOL, TaskCodec};
use corvid_sdk::plan::Subgraph;
use corvid_sdk::wire::{Input, Request, TaskRequest};
use corvid_sdk::{SubgraphId, ValueId};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::executor::block_on;
use futures::io::Cursor;
use libp2p::request_response::Codec;

const SIDE: usize = 4096;

fn request(input: Input) -> Request {
    let sg = Subgraph {
        id: SubgraphId([0; 32]),
        program: Program::single(
            Op::Unary(UnaryOp::Relu),
            vec![TensorMeta::f32([SIDE, SIDE])],
        ),
        inputs: vec![],
        input_ids: vec![ValueId([1; 32])],
        output_ids: vec![ValueId([2; 32])],
        cost: Default::default(),
    };
    Request::Run(TaskRequest::new(1, [0; 16], &sg, vec![input]))
}

fn round_trip(codec: &mut TaskCodec, req: Request, buf: &mut Vec<u8>) -> Envelope {
    block_on(async {
        buf.clear();
        let mut w = Cursor::new(std::mem::take(buf));
        codec
            .write_request(&TASK_PROTOCOL, &mut w, Envelope::from(req))
            .await
            .unwrap();
        *buf = w.into_inner();
        let mut r = Cursor::new(buf.as_slice());
        codec.read_request(&TASK_PROTOCOL, &mut r).await.unwrap()
    })
}

fn framing(c: &mut Criterion) {
    let tensor = Arc::new(Tensor::random_uniform([SIDE, SIDE], -1.0, 1.0, 1));
    let bytes = tensor.meta().bytes();
    let mut codec = TaskCodec::default();
    let mut buf = Vec::with_capacity(bytes as usize + 4096);
    let mut g = c.benchmark_group("task codec");
    g.sample_size(20).throughput(Throughput::Bytes(bytes));
    g.bench_function("64 MiB tensor written and read back", |b| {
        b.iter(|| {
            black_box(round_trip(
                &mut codec,
                request(Input::Data(tensor.clone())),
                &mut buf,
            ))
        })
    });
    // The same input as a recipe: its bytes never travel (the throughput is of the tensor it
    // stands for).
    let recipe = Recipe::uniform([SIDE, SIDE], -1.0, 1.0, 1);
    g.bench_function("64 MiB tensor as a recipe", |b| {
        b.iter(|| {
            black_box(round_trip(
                &mut codec,
                request(Input::Recipe(recipe.clone())),
                &mut buf,
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, framing);
criterion_main!(benches);
