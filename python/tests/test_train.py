"""Training: gradients as graphs, and the digits example trained across real `corvid node`
processes, one of them killed mid-training."""

import pathlib
import sys

import numpy as np
import pytest

import corvid

from test_map import bootstrap_of, start_node

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python" / "examples"))

import train_digits  # noqa: E402


def test_grad_of_a_softmax_regression_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    g = corvid.Graph("grad")
    xt, wt, yt = g.tensor(x), g.tensor(w), g.tensor(y)
    loss = -((xt @ wt).log_softmax(1) * yt).sum([0, 1]) / 6.0
    (dw,) = g.grad(loss, [wt])
    got = g.eval([dw])[0]
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(got, x.T @ (p - y) / 6.0, rtol=1e-4, atol=1e-6)
    with pytest.raises(corvid.BuildError, match="no gradient through .cast"):
        g.grad((xt @ wt).argmax(1).cast("f32").sum([0]), [wt])
    with pytest.raises(corvid.BuildError, match="one f32 value"):
        g.grad(xt @ wt, [wt])


def test_digits_train_across_worker_processes_and_a_killed_worker_changes_nothing(tmp_path):
    procs = {}
    try:
        d0, procs["a"] = start_node(tmp_path, "a")
        boot = bootstrap_of(d0)
        for name in ("b", "c"):
            _, procs[name] = start_node(tmp_path, name, boot)
        client = corvid.Client.connect(boot, workers=3, timeout=60)
        quiet = lambda *_: None  # noqa: E731

        model, acc = train_digits.train(client, log=quiet)
        assert acc >= 0.95, acc
        summary = client.last_summary()
        workers = [line.split()[0] for line in summary.splitlines() if line.startswith("12D3")]
        assert len(workers) >= 2, summary

        def kill_c(step):
            if step == 20:
                procs["c"].kill()
                procs["c"].wait()

        again, acc_again = train_digits.train(client, on_step=kill_c, log=quiet)
        assert procs["c"].poll() is not None, "the worker was killed"
        # Summed in shard order, redone elsewhere: the same weights to the bit.
        assert again.id == model.id, (acc, acc_again)
        local, _ = train_digits.train(None, log=quiet)
        assert local.id == model.id
        for name in model.names():
            np.testing.assert_array_equal(again[name], model[name])
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
