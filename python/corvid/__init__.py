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
import sys
import threading
import time
from typing import Iterable, Iterator, List, Optional, Sequence

from . import _corvid
from ._corvid import (
    BuildError,
    Cancelled,
    Client,
    ClientError,
    CorvidError,
    EvalError,
    Tensor,
    ops,
)

__all__ = [
    "BuildError",
    "Cancelled",
    "Client",
    "ClientError",
    "CorvidError",
    "EvalError",
    "Graph",
    "Job",
    "Tensor",
    "as_completed",
    "ops",
]


class Job(concurrent.futures.Future):
    """A job started by `Graph.submit`: a `concurrent.futures.Future` whose result is the list
    of output arrays, which can also be awaited (`await job`).

    `cancel()` stops it where it runs (its tasks on workers are cancelled); `progress()` is
    (subgraphs done, subgraphs in all). Until it ends, `running()` is true.
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

    def running(self) -> bool:
        return not self.done()

    def progress(self) -> tuple:
        return self._handle.progress()

    def __await__(self):
        return asyncio.wrap_future(self).__await__()

    def _settle(self) -> None:
        """Called by the waiter once the handle has ended."""
        if not self.set_running_or_notify_cancel():
            return  # cancelled here first: the future already says so
        try:
            self.set_result(self._handle.result(0))
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
            with self._lock:
                jobs = list(self._jobs)
            if not jobs:
                self._wake.wait()
                self._wake.clear()
                continue
            ended = _corvid.wait_any([j._handle for j in jobs], 0.05)
            if not ended:
                continue
            done = {id(jobs[i]) for i in ended}
            with self._lock:
                self._jobs = [j for j in self._jobs if id(j) not in done]
            for i in ended:
                jobs[i]._settle()


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


class Graph(_corvid.Graph):
    """A graph of tensor ops, evaluated on `client`'s swarm (or on this machine without one).

    `tensor(array)`, `scalar(v)` and `random(shape, lo, hi, seed)` make its leaves; every op
    is a method of `Tensor`. `eval([tensors])` returns NumPy arrays; `submit([tensors])`
    returns a `Job` at once; `end()` raises a `CorvidError` listing every op that failed.
    """

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
