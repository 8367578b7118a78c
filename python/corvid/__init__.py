"""Corvid: graphs of tensor ops evaluated on a verified peer-to-peer swarm.

    import numpy as np, corvid
    client = corvid.Client.local(2)              # or corvid.Client.connect([addr], psk=path)
    g = corvid.Graph("demo", client)
    x = g.tensor(np.ones((4, 3), np.float32))
    y = (x @ g.random([3, 2], -1.0, 1.0, seed=1)).relu()
    print(y.eval())                              # a NumPy array, verified

`Graph.submit` returns a `Job`, a `concurrent.futures.Future` (and awaitable): several run
at once, and `corvid.as_completed` (or `concurrent.futures.as_completed`) yields them as
they end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import sys
import threading
import time
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

from . import _corvid
from ._corvid import (
    BuildError,
    Cancelled,
    ClientError,
    CorvidError,
    EvalError,
    Model,
    Tensor,
    ops,
    save_npy,
    save_safetensors,
)

__all__ = [
    "BuildError",
    "Cancelled",
    "Client",
    "ClientError",
    "Computation",
    "CorvidError",
    "EvalError",
    "Graph",
    "Job",
    "Model",
    "Tensor",
    "Trainer",
    "as_completed",
    "ops",
    "save_npy",
    "save_safetensors",
]


class Job(concurrent.futures.Future):
    """A job started by `Graph.submit`: a `concurrent.futures.Future` whose result is the list
    of output arrays, which can also be awaited (`await job`).

    `cancel()` stops it where it runs (its tasks on workers are cancelled), whether or not
    it has started; `progress()` is (subgraphs done, subgraphs in all).
    """

    def __init__(self, handle: "_corvid.Handle"):
        super().__init__()
        self._handle = handle
        _waiter().watch(self)

    def cancel(self) -> bool:
        if super().cancel():
            self._handle.cancel()
            return True
        return False

    def progress(self) -> tuple:
        return self._handle.progress()

    def summary(self) -> Optional[str]:
        """What the job did on the swarm (peers, bytes, checks), once it ended."""
        return self._handle.summary()

    def __await__(self):
        return asyncio.wrap_future(self).__await__()

    def _settle(self) -> None:
        """Called by the waiter once the handle has ended."""
        if not self.set_running_or_notify_cancel():
            return  # cancelled here first: the future already says so
        try:
            # Taken out of the handle: the outputs are kept once, here.
            self.set_result(self._handle.take_result())
        except BaseException as e:  # the job's error, for whoever waits
            self.set_exception(e)


class _Waiter:
    """One thread for all jobs of the process: waits (without the GIL) until some end."""

    def __init__(self):
        self._lock = threading.Lock()
        self._jobs: List[Job] = []
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="corvid-jobs", daemon=True).start()

    def watch(self, job: Job) -> None:
        with self._lock:
            self._jobs.append(job)
        self._wake.set()

    def _run(self) -> None:
        while True:
            try:
                self._once()
            except BaseException as e:  # never let the thread die: every job would hang
                print(f"corvid: the job waiter thread: {e!r}", file=sys.stderr)
                time.sleep(0.01)

    def _once(self) -> None:
        with self._lock:
            jobs = list(self._jobs)
        if not jobs:
            self._wake.wait()
            self._wake.clear()
            return
        ended = _corvid.wait_any([j._handle for j in jobs], 0.05)
        if not ended:
            return
        done = {id(jobs[i]) for i in ended}
        with self._lock:
            self._jobs = [j for j in self._jobs if id(j) not in done]
        for i in ended:
            job = jobs[i]
            if job._done_callbacks:
                # Callbacks run where the result is set: on a thread of their own, so that
                # one waiting on another job cannot stop this thread settling it.
                threading.Thread(target=job._settle, name="corvid-callbacks", daemon=True).start()
            else:
                job._settle()


_waiter_lock = threading.Lock()
_the_waiter: Optional[_Waiter] = None


def _waiter() -> _Waiter:
    global _the_waiter
    with _waiter_lock:
        if _the_waiter is None:
            _the_waiter = _Waiter()
        return _the_waiter


def as_completed(jobs: Iterable[Job], timeout: Optional[float] = None) -> Iterator[Job]:
    """Yields each of `jobs` as it ends (`concurrent.futures.as_completed`)."""
    return concurrent.futures.as_completed(list(jobs), timeout=timeout)


def _in_jupyter() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        return shell.get_ipython() is not None
    except Exception:
        return False


class _Progress:
    """A job's progress where the developer looks: Jupyter gets a line updated in place,
    a terminal gets the extension's own bar, anything else a plain line now and then."""

    PLAIN_AFTER = 2.0
    PLAIN_EVERY = 5.0

    def __init__(self, name: str):
        self.name = name
        self.started = time.monotonic()
        self.last_plain = self.started
        self.display = None
        if _in_jupyter():
            from IPython.display import display

            self.display = display(self._text(0, 0), display_id=True)

    def _text(self, done: int, total: int) -> str:
        secs = time.monotonic() - self.started
        return f"corvid: graph '{self.name}': {done}/{total} subgraphs, {secs:.1f} s"

    def show(self, done: int, total: int) -> None:
        if self.display is not None:
            self.display.update(self._text(done, total))
            return
        now = time.monotonic()
        if now - self.started >= self.PLAIN_AFTER and now - self.last_plain >= self.PLAIN_EVERY:
            self.last_plain = now
            print(self._text(done, total), file=sys.stderr, flush=True)


class Client:
    """A swarm to run graphs on: `Client.local(n)` starts `n` embedded workers (development);
    `Client.connect(addrs, psk=None, workers=1, timeout=60)` joins a real swarm as a
    requester and returns once `workers` workers are known (or raises `ClientError`)."""

    def __init__(self, inner: "_corvid.Client"):
        self._inner = inner
        self._map_totals = _corvid.Totals()

    @staticmethod
    def local(n: int) -> "Client":
        return Client(_corvid.Client.local(n))

    @staticmethod
    def connect(
        addrs: Sequence[str], psk: Optional[str] = None, workers: int = 1, timeout: float = 60.0
    ) -> "Client":
        if isinstance(addrs, str):
            addrs = [addrs]
        return Client(_corvid.Client.connect(list(addrs), psk, workers, timeout))

    def last_summary(self) -> Optional[str]:
        """What the last job did: which peer ran what, bytes, time, checks."""
        return self._inner.last_summary()

    def map(
        self, computation: "Computation", inputs: Iterable, window: int = 16, batch: int = 1
    ) -> list:
        """`computation` on each input, as verified jobs (`window` at a time): the results in
        input order. Raises the first failed input's error, naming the input.

        `batch=k` joins `k` inputs along axis 0 into one job (far fewer round trips for
        small inputs) and splits the outputs back: for computations whose rows are
        independent (axis 0 is the batch axis of every input and output)."""
        return list(self.imap(computation, inputs, window, batch))

    def imap(
        self, computation: "Computation", inputs: Iterable, window: int = 16, batch: int = 1
    ) -> Iterator:
        """As `map`, yielding results in input order as soon as each is ready."""
        for chunk, job in self._jobs(computation, inputs, window, True, batch):
            for _, out in _results(chunk, job):
                yield out

    def imap_unordered(
        self, computation: "Computation", inputs: Iterable, window: int = 16, batch: int = 1
    ) -> Iterator:
        """Yields `(input index, result)` as jobs end, whatever their order."""
        for chunk, job in self._jobs(computation, inputs, window, False, batch):
            yield from _results(chunk, job)

    def map_summary(self) -> tuple:
        """The last map's jobs summed: (a table as text, per place {"tasks", "bytes_in",
        "bytes_out", "failures"}); bytes_in is what was sent to the place."""
        return self._map_totals.summary()

    def _jobs(self, computation, inputs, window, ordered, batch):
        """(chunk, job) for each job: a chunk is the inputs' indices and, when batched,
        their row counts."""
        window = max(1, int(window))
        totals = self._map_totals = _corvid.Totals()
        pending = []  # (chunk, job), oldest first
        chunks = _chunks(inputs, max(1, int(batch)))
        first = next(chunks, None)
        if first is None:
            return
        # The first job alone: once it ends the requester knows who holds the model.
        job = computation._submit(self, *first)
        concurrent.futures.wait([job])
        totals.add(job._handle)
        yield first[0], job
        try:
            for chunk, x in chunks:
                pending.append((chunk, computation._submit(self, chunk, x)))
                while len(pending) >= window:
                    yield from _take(pending, ordered, totals)
            while pending:
                yield from _take(pending, ordered, totals)
        finally:
            # A map given up (an error raised, a loop left early): its jobs stop too.
            for _, job in pending:
                job.cancel()


def _chunks(inputs: Iterable, batch: int):
    """(chunk, job inputs) per job: one input each, or `batch` joined along axis 0."""
    items = enumerate(inputs)
    while True:
        group = list(itertools.islice(items, batch))
        if not group:
            return
        if batch == 1:
            i, x = group[0]
            yield (i, None), x
            continue
        index = [i for i, _ in group]
        args = [list(x) if isinstance(x, tuple) else [x] for _, x in group]
        label = f"inputs {index[0]}-{index[-1]}"
        if any(len(a) != len(args[0]) for a in args):
            raise CorvidError(f"{label}: inputs with different numbers of arguments")
        if any(np.ndim(v) == 0 for a in args for v in a):
            raise CorvidError(f"{label}: a batched map joins inputs on axis 0; a scalar has none")
        rows = [np.shape(a[0])[0] for a in args]
        joined = [np.concatenate([np.asarray(a[k]) for a in args]) for k in range(len(args[0]))]
        yield (index, rows), tuple(joined)


def _take(pending: list, ordered: bool, totals):
    """Removes and yields one ended job of `pending` (the oldest, if `ordered`), its summary
    added to `totals`."""
    if ordered:
        chunk, job = pending.pop(0)
        concurrent.futures.wait([job])
    else:
        futures = [j for _, j in pending]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        k = next(k for k, j in enumerate(futures) if j.done())
        chunk, job = pending.pop(k)
    totals.add(job._handle)
    yield chunk, job


def _label(chunk) -> str:
    index, rows = chunk
    return f"input {index}" if rows is None else f"inputs {index[0]}-{index[-1]}"


def _results(chunk, job: Job):
    """(input index, result) for each input of the chunk's job."""
    index, rows = chunk
    try:
        outs = job.result()
    except CorvidError as e:
        raise type(e)(f"{_label(chunk)}: {e}") from e
    single = getattr(job, "_single", False)
    if rows is None:
        yield index, outs[0] if single else outs
        return
    total = sum(rows)
    for k, out in enumerate(outs):
        if np.ndim(out) == 0 or out.shape[0] != total:
            raise CorvidError(
                f"{_label(chunk)}: output {k} has shape {list(np.shape(out))} for {total} input "
                "rows: a batched map needs axis 0 to be the batch axis of every output"
            )
    cuts = np.cumsum(rows)[:-1]
    parts = [np.split(out, cuts) for out in outs]
    for n, i in enumerate(index):
        yield i, parts[0][n] if single else [p[n] for p in parts]


class Computation:
    """A computation defined once, run over many inputs with `Client.map`:
    `fn(*inputs)` or, with a `model`, `fn(*inputs, weights)` (weights: the model's tensors
    by name) returns a tensor or a list of tensors. An input is an array, or a tuple of
    arrays for a function of several. The model is sent to a worker once and kept there;
    `update(model)` replaces it (new content id: new weights go out)."""

    def __init__(self, fn, model: Optional[Model] = None, name: Optional[str] = None):
        self.fn = fn
        self.model = model
        self.name = name or getattr(fn, "__name__", "computation")

    def update(self, model: Model) -> None:
        self.model = model

    def id(self, *inputs) -> str:
        """The content id of the computation's graph over zeros shaped like `inputs`."""
        g = Graph(self.name)
        self._build(g, [np.zeros(np.shape(x), np.asarray(x).dtype) for x in inputs])
        return g.id()

    def _build(self, g: "Graph", inputs: list):
        xs = [g.tensor(x) for x in inputs]
        args = xs + [g.model(self.model)] if self.model is not None else xs
        out = self.fn(*args)
        single = isinstance(out, Tensor)
        return ([out] if single else list(out)), single

    def _submit(self, client: Client, chunk, x) -> Job:
        i = chunk[0] if chunk[1] is None else f"{chunk[0][0]}-{chunk[0][-1]}"
        g = Graph(f"{self.name}[{i}]", client)
        inputs = list(x) if isinstance(x, tuple) else [x]
        try:
            outs, single = self._build(g, inputs)
            job = g.submit(outs)
        except CorvidError as e:
            raise type(e)(f"{_label(chunk)}: {e}") from e
        job._single = single
        return job


class Trainer:
    """Trains a `Model` on a swarm: `loss(*batch, weights)` returns the mean loss over the rows
    it is given (tensors; weights: the model's tensors by name). Each `step(*arrays)` runs
    forward, backward (`Graph.grad`) and the optimizer's update (`"adam"` or `"sgd"` with
    `momentum`) as one verified job and returns the batch's loss; `model` is the parameters as
    they are now. `shards=k` splits each batch into k gradient branches placed on different
    peers (data parallel), summed in a fixed order: the same weights wherever they ran."""

    def __init__(
        self,
        loss,
        model: Model,
        client: Optional[Client] = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        shards: int = 1,
        name: Optional[str] = None,
    ):
        self._client = client
        self._inner = _corvid.Trainer(
            loss, model, optimizer, lr, momentum, shards, name or getattr(loss, "__name__", "train")
        )

    def step(self, *batch) -> float:
        inner = self._client._inner if self._client is not None else None
        return self._inner.step(*batch, client=inner)

    @property
    def model(self) -> Model:
        return self._inner.model

    @property
    def steps(self) -> int:
        return self._inner.steps


class Graph(_corvid.Graph):
    """A graph of tensor ops, evaluated on `client`'s swarm (or on this machine without one).

    `tensor(array)`, `scalar(v)` and `random(shape, lo, hi, seed)` make its leaves; every op
    is a method of `Tensor`. `eval([tensors])` returns NumPy arrays; `submit([tensors])`
    returns a `Job` at once; `end()` raises a `CorvidError` listing every op that failed.
    """

    def __new__(cls, name: str = "graph", client: Optional[Client] = None):
        return super().__new__(cls, name, client._inner if client is not None else None)

    def __init__(self, name: str = "graph", client: Optional[Client] = None):
        self._client = client

    def submit(self, outputs: Sequence[Tensor]) -> Job:
        return Job(super().submit(list(outputs)))

    def eval(self, outputs: Sequence[Tensor]) -> list:
        outputs = list(outputs)
        if self._client is None or sys.stderr.isatty():
            # Local work, or a terminal where the extension draws its own progress bar.
            return super().eval(outputs)
        job = self.submit(outputs)
        progress = _Progress(self.name)
        try:
            while True:
                try:
                    return job.result(timeout=0.1)
                except concurrent.futures.TimeoutError:
                    progress.show(*job.progress())
        except KeyboardInterrupt:
            job.cancel()
            raise
        finally:
            if progress.display is not None:
                progress.show(*job.progress())
