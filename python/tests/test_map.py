"""Models by content hash and map over many inputs, on embedded workers and real nodes."""

import os
import pathlib
import subprocess
import json
import time

import numpy as np
import pytest

import corvid

REPO = pathlib.Path(__file__).resolve().parents[2]


def mlp_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": (rng.standard_normal((64, 256)) / 8).astype(np.float32),
        "b1": (rng.standard_normal(256) / 10).astype(np.float32),
        "w2": (rng.standard_normal((256, 10)) / 16).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }


def mlp(x, w):
    return ((x @ w["w1"] + w["b1"]).relu() @ w["w2"] + w["b2"]).softmax(1)


def mlp_numpy(x, w):
    h = np.maximum(x @ w["w1"] + w["b1"], 0) @ w["w2"] + w["b2"]
    e = np.exp(h - h.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_models_load_from_npz_safetensors_and_npy_with_one_id(tmp_path):
    w = mlp_weights()
    np.savez(tmp_path / "mlp.npz", **w)
    np.savez_compressed(tmp_path / "packed.npz", **{k: v.astype(np.float64) for k, v in w.items()})
    corvid.save_safetensors(tmp_path / "mlp.safetensors", w)
    models = [corvid.Model.load(tmp_path / f) for f in ["mlp.npz", "packed.npz", "mlp.safetensors"]]
    assert len({m.id for m in models}) == 1, [m.id for m in models]
    assert models[0].id == corvid.Model("any name", w).id
    assert sorted(models[0].names()) == sorted(w)
    np.testing.assert_array_equal(models[2]["w1"], w["w1"])
    assert models[0].nbytes == sum(v.nbytes for v in w.values())

    corvid.save_npy(tmp_path / "w2.npy", w["w2"])
    one = corvid.Model.load(tmp_path / "w2.npy")
    assert one.names() == ["w2"]
    with pytest.raises(KeyError):
        one["w1"]
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 12)
    with pytest.raises(corvid.CorvidError, match="bad.safetensors"):
        corvid.Model.load(tmp_path / "bad.safetensors")
    models[0].save_safetensors(tmp_path / "again.safetensors")
    assert corvid.Model.load(tmp_path / "again.safetensors").id == models[0].id


def test_a_map_over_1000_inputs_sends_the_weights_once_per_worker():
    w = mlp_weights()
    model = corvid.Model("mlp", w)
    comp = corvid.Computation(mlp, model=model)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(1000)]
    client = corvid.Client.local(2)

    results = client.map(comp, inputs)
    assert len(results) == 1000
    want = mlp_numpy(np.concatenate(inputs), w)
    np.testing.assert_allclose(np.concatenate(results), want, rtol=1e-4, atol=1e-6)

    text, places = client.map_summary()
    print(text)
    workers = {p: s for p, s in places.items() if p != "requester"}
    assert sum(s["tasks"] for s in workers.values()) >= 1000, places
    input_bytes = 64 * 4
    for peer, s in workers.items():
        # Beyond the inputs of its tasks: the model once, give or take the inputs of tasks it
        # turned away busy (sent again, here or elsewhere, or kept and then named).
        beyond = s["bytes_in"] - s["tasks"] * input_bytes
        assert abs(beyond - model.nbytes) <= s["failures"] * input_bytes, (peer, s, model.nbytes)
        assert s["resent"] == 0, (peer, s)
    assert "1000 jobs" in text and "verified" in text, text

    seen = {}
    for i, out in client.imap_unordered(comp, inputs[:200], window=32):
        seen[i] = out
    assert sorted(seen) == list(range(200))
    np.testing.assert_allclose(np.concatenate([seen[i] for i in range(200)]), want[:200], rtol=1e-4, atol=1e-6)

    # Batched: 50 inputs a job, the same results from 20 jobs.
    batched = client.map(comp, inputs, batch=50)
    assert len(batched) == 1000 and client.map_summary()[0].startswith("20 jobs"), client.map_summary()[0]
    np.testing.assert_allclose(np.concatenate(batched), want, rtol=1e-4, atol=1e-6)
    got = dict(client.imap_unordered(comp, inputs[:130], batch=50))
    assert sorted(got) == list(range(130))
    np.testing.assert_allclose(got[129], want[129:130], rtol=1e-4, atol=1e-6)
    with pytest.raises(corvid.CorvidError, match="inputs 0-1: .*batch axis"):
        client.map(corvid.Computation(lambda x: x.sum([0], keepdims=True)), inputs[:2], batch=2)

    # New weights: a new content id, new results.
    other = mlp_weights(seed=5)
    before = comp.id(inputs[0])
    comp.update(corvid.Model("mlp", other))
    assert comp.id(inputs[0]) != before
    np.testing.assert_allclose(client.map(comp, inputs[:5])[4], mlp_numpy(inputs[4], other), rtol=1e-4, atol=1e-6)


def test_a_bad_input_names_its_index():
    comp = corvid.Computation(lambda x: x @ x)
    client = corvid.Client.local(1)
    ok = np.ones((3, 3), np.float32)
    with pytest.raises(corvid.BuildError, match="input 1: .*matmul"):
        client.map(comp, [ok, np.ones((2, 3), np.float32)])


def corvid_bin():
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    path = os.environ.get("CORVID_BIN") or str(target / "debug" / "corvid")
    assert os.access(path, os.X_OK), f"no corvid binary at {path}: build it (cargo build -p corvid-node) or set CORVID_BIN"
    return path


def start_node(tmp_path, name, boot=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.toml").write_text('bench_budget = "300ms"\n')
    cmd = [corvid_bin(), "--log", "warn", "node", "--backend", "cpu", "--slots", "2",
           "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", str(d), "--no-pause-on-battery"]
    if boot:
        cmd += ["--bootstrap", boot]
    return d, subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bootstrap_of(d):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (d / "control.addr").exists():
            out = subprocess.run([corvid_bin(), "id", "--json", "--data-dir", str(d)], capture_output=True)
            try:
                v = json.loads(out.stdout)
                if v.get("running") and v.get("bootstrap"):
                    return v["bootstrap"][0]
            except ValueError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"the node in {d} never came up")


def test_map_on_real_corvid_node_processes(tmp_path):
    procs = []
    try:
        d0, p0 = start_node(tmp_path, "a")
        procs.append(p0)
        boot = bootstrap_of(d0)
        _, p1 = start_node(tmp_path, "b", boot)
        procs.append(p1)
        client = corvid.Client.connect(boot, workers=2, timeout=60)
        w = mlp_weights(seed=2)
        comp = corvid.Computation(mlp, model=corvid.Model("mlp", w))
        rng = np.random.default_rng(3)
        inputs = [rng.standard_normal((4, 64)).astype(np.float32) for _ in range(60)]
        got = client.map(comp, inputs, window=8)
        np.testing.assert_allclose(np.concatenate(got), mlp_numpy(np.concatenate(inputs), w), rtol=1e-4, atol=1e-6)
        _, places = client.map_summary()
        assert [p for p in places if p != "requester"], places
    finally:
        for p in procs:
            p.kill()
            p.wait()
