"""Training: gradients as graphs, and the digits example trained across real `corvid node`
processes, one of them killed mid-training."""

import pathlib
import sys
import threading

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
    (again,) = loss.backward([wt])
    got, got_again = g.eval([dw, again])
    np.testing.assert_array_equal(got, got_again)
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(got, x.T @ (p - y) / 6.0, rtol=1e-4, atol=1e-6)
    with pytest.raises(corvid.BuildError, match="no gradient through .cast"):
        g.grad((xt @ wt).argmax(1).cast("f32").sum([0]), [wt])
    with pytest.raises(corvid.BuildError, match="one f32 value"):
        g.grad(xt @ wt, [wt])


def test_digits_train_across_worker_processes_and_a_killed_worker_changes_nothing(tmp_path):
    procs, ids = {}, {}
    try:
        d0, procs["a"] = start_node(tmp_path, "a")
        boot = bootstrap_of(d0)
        for name in ("b", "c"):
            d, procs[name] = start_node(tmp_path, name, boot)
            ids[name] = bootstrap_of(d).rsplit("/p2p/", 1)[1]
        client = corvid.Client.connect(boot, workers=3, timeout=60)
        quiet = lambda *_: None  # noqa: E731

        model, acc = train_digits.train(client, log=quiet)
        assert acc >= 0.95, acc
        summary = client.last_summary()
        workers = [line.split()[0] for line in summary.splitlines() if line.startswith("12D3")]
        assert len(workers) >= 2, summary

        # Again, killing (a few ms into step 21) a worker that ran step 20's tasks.
        summaries = {}
        victim = []

        def kill(name):
            procs[name].kill()
            procs[name].wait()

        def on_step(step):
            summaries[step] = client.last_summary()
            if step == 20:
                busy = [n for n, i in ids.items() if i in summaries[step]]
                assert busy, summaries[step]
                victim.append(busy[0])
                threading.Timer(0.005, kill, (busy[0],)).start()

        # A new requester: the first one's verified results would answer every step.
        client = corvid.Client.connect(boot, workers=3, timeout=60)
        again, acc_again = train_digits.train(client, on_step=on_step, log=quiet)
        assert "cached) " in summaries[1] and "(0 cached)" in summaries[1], summaries[1]
        name = victim[0]
        assert procs[name].poll() is not None, "the worker was killed"
        later = [summaries[s] for s in summaries if s >= 23]
        assert later and not any(ids[name] in s for s in later), "the dead worker ran nothing more"
        # Summed in shard order, redone elsewhere: the same weights to the bit.
        assert again.id == model.id, (acc, acc_again)
        local, _ = train_digits.train(None, log=quiet)
        assert local.id == model.id
        for n in model.names():
            np.testing.assert_array_equal(again[n], model[n])
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
