"""The Python SDK: graphs, operators, errors, a swarm of embedded workers, jobs as futures."""

import asyncio
import concurrent.futures
import inspect
import pathlib
import re

import numpy as np
import pytest

import corvid


def line_here():
    return inspect.currentframe().f_back.f_lineno


def test_ops_and_operators_match_numpy():
    g = corvid.Graph("ops")
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    b = np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2)
    x, w = g.tensor(a), g.tensor(b)
    y = ((x @ w) * 2.0 - 1).tanh()
    np.testing.assert_allclose(y.eval(), np.tanh((a @ b) * 2 - 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((-x).exp().sum([1]).eval(), np.exp(-a).sum(1), rtol=1e-5)
    np.testing.assert_allclose((1.0 / (x + 1)).eval(), 1 / (a + 1), rtol=1e-6)
    np.testing.assert_allclose(x.maximum(0.5).eval(), np.maximum(a, 0.5))
    s = x.softmax(1).eval()
    np.testing.assert_allclose(s.sum(1), np.ones(3), rtol=1e-5)
    assert x.transpose().shape == [4, 3]
    # Reductions take axes by position or keyword, NumPy's `axis`, one axis or None (all).
    np.testing.assert_allclose(x.sum(axes=[1]).eval(), a.sum(1), rtol=1e-5)
    np.testing.assert_allclose(x.sum(axis=1, keepdims=True).eval(), a.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(x.max(None).eval(), a.max(), rtol=1e-6)
    np.testing.assert_allclose(x.mean(0).eval(), a.mean(0), rtol=1e-6)
    with pytest.raises(TypeError, match="no argument 'axs'"):
        x.sum(axs=[1])
    with pytest.raises(TypeError):
        x.exp(1)
    assert x.argmax(1).eval().dtype == np.int32
    # float64 input is converted; two outputs at once.
    p, q = g.eval([g.tensor(a.astype(np.float64)), x.mean([0], keepdims=True)])
    assert p.dtype == np.float32 and q.shape == (1, 4)
    g.end()


def test_a_bad_op_raises_at_the_line_that_built_it():
    g = corvid.Graph("errors")
    x = g.tensor(np.ones((2, 3), np.float32))
    with pytest.raises(corvid.BuildError) as e:
        line = line_here(); x @ x  # noqa: E702
    text = str(e.value)
    assert "matmul" in text and "f32[2, 3]" in text, text
    assert f"test_corvid.py:{line}" in text, text
    assert ".rs:" not in text, text
    with pytest.raises(AttributeError):
        x.no_such_op()
    with pytest.raises(corvid.BuildError):
        x + "text"


def test_a_swarm_of_embedded_workers_gives_the_local_answer():
    client = corvid.Client.local(2)
    g = corvid.Graph("swarm", client)
    local = corvid.Graph("local")
    want = (local.random([96, 64], seed=1) @ local.random([64, 32], seed=2)).relu().eval()
    got = (g.random([96, 64], seed=1) @ g.random([64, 32], seed=2)).relu().eval()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    summary = client.last_summary()
    assert "verified" in summary, summary


def test_jobs_run_together_and_can_be_cancelled():
    client = corvid.Client.local(2)
    g = corvid.Graph("jobs", client)
    outs = [(g.random([64, 64], seed=s) @ g.random([64, 64], seed=s + 1)).tanh() for s in range(5)]
    jobs = [g.submit([t]) for t in outs]
    ended = [job for job in corvid.as_completed(jobs)]
    assert sorted(map(id, ended)) == sorted(map(id, jobs))
    local = corvid.Graph("local")
    for s, job in enumerate(jobs):
        assert job.done()
        (got,) = job.result()
        want = (local.random([64, 64], seed=s) @ local.random([64, 64], seed=s + 1)).tanh().eval()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        done, total = job.progress()
        assert done == total > 0

    big = g.random([512, 2048], seed=9) @ g.random([2048, 512], seed=10)
    job = g.submit([big])
    assert isinstance(job, concurrent.futures.Future) and not job.done()
    assert job.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        job.result(timeout=30)
    assert job.cancelled() and job.done()
    # The job stopped where it ran: the graph's report says so once the handle has ended.
    deadline = __import__("time").monotonic() + 30
    while "cancelled" not in _end_text(g):
        assert __import__("time").monotonic() < deadline, "the cancel never reached the job"
        __import__("time").sleep(0.01)


def _end_text(g):
    try:
        g.end()
        return ""
    except corvid.CorvidError as e:
        return str(e)


def test_jobs_are_futures_and_awaitable():
    client = corvid.Client.local(2)
    g = corvid.Graph("futures", client)
    local = corvid.Graph("local")
    a = np.random.default_rng(3).standard_normal((32, 48)).astype(np.float32)

    async def both():
        x = g.tensor(a)
        return await asyncio.gather(g.submit([x.relu()]), g.submit([(x * 2).sum([1])]))

    (relu,), (sums,) = asyncio.run(both())
    np.testing.assert_array_equal(relu, np.maximum(a, 0))
    np.testing.assert_allclose(sums, local.tensor(a * 2).sum([1]).eval(), rtol=1e-6)

    # concurrent.futures' own helpers take corvid jobs.
    ok = g.submit([g.tensor(a).exp()])
    other = g.submit([g.tensor(a).tanh()])
    done, _ = concurrent.futures.wait([ok, other], timeout=60)
    assert len(done) == 2
    np.testing.assert_allclose(other.result()[0], np.tanh(a), rtol=1e-5, atol=1e-6)
    seen = []
    ok.add_done_callback(lambda f: seen.append(f))
    assert seen == [ok]


def test_every_op_is_a_method_and_in_the_stubs():
    stub = (pathlib.Path(corvid.__file__).parent / "_corvid.pyi").read_text()
    names = [n for kind in corvid.ops().values() for n in kind]
    assert len(names) > 30, names
    g = corvid.Graph("names")
    x = g.tensor(np.ones((2, 2), np.float32))
    for name in names:
        assert re.search(rf"def {name}\(\s*self", stub), f"{name} has no stub"
        assert callable(getattr(x, name)), name
    for name in ["matmul", "softmax", "select", "cast", "slice", "pad", "conv2d", "max_pool2d"]:
        assert re.search(rf"def {name}\(\s*self", stub), f"{name} has no stub"
        assert hasattr(x, name), name


def test_structural_ops_match_numpy():
    g = corvid.Graph("structural")
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    x = g.tensor(a)
    np.testing.assert_array_equal(x.slice([(0, 2, 1), (1, 3, 1), (0, 4, 2)]).eval(), a[:, 1:3, ::2])
    np.testing.assert_array_equal(x.pad([(0, 0), (1, 0), (0, 1)], 9.0).eval(), np.pad(a, [(0, 0), (1, 0), (0, 1)], constant_values=9.0))
    np.testing.assert_array_equal(g.concat([x, x], 1).eval(), np.concatenate([a, a], 1))
    np.testing.assert_array_equal((x > 10).select(x, 0.0).eval(), np.where(a > 10, a, 0))
    assert x.cast("i32").eval().dtype == np.int32
    img = g.tensor(np.arange(32, dtype=np.float32).reshape(1, 2, 4, 4))
    pooled = img.max_pool2d((2, 2)).eval()
    assert pooled.shape == (1, 2, 2, 2) and pooled[0, 0, 1, 1] == 15
    conv = img.conv2d(g.tensor(np.ones((3, 2, 3, 3), np.float32)), padding=(1, 1)).eval()
    assert conv.shape == (1, 3, 4, 4)
    table = g.plan([x.exp().sum([2])])
    assert "exp" in table, table
    with pytest.raises(corvid.BuildError, match="cast"):
        x.cast("f64")


def test_jupyter_sees_a_progress_line_updated_in_place(monkeypatch):
    import sys
    import types

    shown = []

    class Handle:
        def update(self, text):
            shown.append(text)

    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: object()
    display = types.ModuleType("IPython.display")
    display.display = lambda text, display_id=False: shown.append(text) or Handle()
    ipython.display = display
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "IPython.display", display)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    # A notebook's stderr is no terminal (pytest -s in one would be).
    import io

    monkeypatch.setattr(sys, "stderr", io.StringIO())

    client = corvid.Client.local(1)
    g = corvid.Graph("notebook", client)
    (out,) = g.eval([(g.random([64, 64], seed=1) @ g.random([64, 64], seed=2)).relu()])
    assert out.shape == (64, 64)
    assert shown and all("graph 'notebook'" in t for t in shown), shown
    done, total = map(int, shown[-1].split(": ")[2].split(" ")[0].split("/"))
    assert done == total > 0, shown
