//! Training on a swarm: data-parallel steps give the weights a run on this machine gives, bit
//! for bit, and the weights and optimizer state stay with the workers between steps (named,
//! not sent again).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use corvid_kernels::{Backend, CpuBackend, Tensor as Data};
use corvid_node::Client;
use corvid_sdk::sched::Place;
use corvid_sdk::train::{Optimizer, Trainer};
use corvid_sdk::{Executor, Graph, LocalExecutor, Model};

fn data(shape: [usize; 2], seed: u64) -> Data {
    Graph::new("data")
        .random(&shape, -1.0, 1.0, seed)
        .eval_data()
        .unwrap()
}

fn trainer() -> Trainer {
    let model = Model::new(
        "mlp",
        [
            ("w1", data([16, 64], 1)),
            ("w2", data([64, 64], 2)),
            ("w3", data([64, 4], 3)),
        ],
    );
    Trainer::new("it", model, Optimizer::adam(0.01), |_, batch, w| {
        let h = batch[0].matmul(&w["w1"])?.relu()?;
        let h = h.matmul(&w["w2"])?.tanh()?;
        let out = h.matmul(&w["w3"])?;
        let err = &out - &batch[1];
        (&err * &err).mean(&[0, 1], false)
    })
    .with_shards(2)
}

#[test]
fn data_parallel_steps_match_local_ones_and_the_weights_stay_on_the_workers() {
    let client = Client::local(2).unwrap();
    let swarm = client.executor();
    let local: Arc<dyn Executor> = Arc::new(LocalExecutor::new(Backend::Cpu(CpuBackend::new())));
    let (mut a, mut b) = (trainer(), trainer());
    let state_bytes = 3 * a.model().bytes(); // the weights and Adam's two moments
    let mut sent = Vec::new();
    let mut losses = Vec::new();
    for step in 0..12u64 {
        let batch = [data([64, 16], 100 + step), data([64, 4], 200 + step)];
        let got = a.step(&swarm, &batch).unwrap();
        let want = b.step(&local, &batch).unwrap();
        assert_eq!(got.loss.to_bits(), want.loss.to_bits(), "step {step}");
        losses.push(got.loss);
        let s = client.last_summary().unwrap();
        let workers: Vec<_> = s
            .places
            .iter()
            .filter(|(p, st)| matches!(p, Place::Peer(_)) && st.tasks > 0)
            .collect();
        assert_eq!(s.places.get(&Place::Local).map_or(0, |p| p.flops), 0, "{s}");
        sent.push(workers.iter().map(|(_, st)| st.bytes_in).sum::<u64>());
        if step == 11 {
            assert_eq!(workers.len(), 2, "the shards ran on both workers\n{s}");
        }
    }
    assert_eq!(a.model().id(), b.model().id(), "bit-identical weights");
    assert!(losses[11] < losses[0], "{losses:?}");
    // The first step sends the weights (and zero moments); later ones send the batch and
    // what moves between the shards (a shard's gradients, the new weights for the other
    // worker), not the weights and moments again: the update stays with the worker that
    // holds them (on a loaded machine a step now and then still moves them, when the other
    // worker measures much faster).
    let batch_bytes = 64 * (16 + 4) * 4;
    let later = sent[1..].iter().sum::<u64>() / 11;
    eprintln!(
        "bytes to workers per step: {sent:?}; the state is {state_bytes}, a batch {batch_bytes}"
    );
    assert!(
        later < batch_bytes + state_bytes,
        "per step {sent:?}: the state is {state_bytes} bytes, a batch {batch_bytes}"
    );
    assert!(sent[0] > later, "{sent:?}");
}
