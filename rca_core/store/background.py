"""Work a stage's I/O threads do beside the computation: writes behind it (WriteBehind) and reads ahead of it
(Prefetch). Both are dropped when their owner is pickled (DataLoader workers, Ray): no threads, no futures cross
a process."""
from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable

from rca_core.store.errors import StoreError

WRITE_BEHIND_THREADS = 4  # images written at once behind the one being computed (object storage: ~50 ms each)
WRITE_BEHIND_DEPTH = 2 * WRITE_BEHIND_THREADS  # images queued for writing at most


class WriteBehind:
    """Writes on WRITE_BEHIND_THREADS background threads while `running`, so that the next images are computed while
    earlier ones are written (object storage: tens of ms per request). At most WRITE_BEHIND_DEPTH writes wait;
    a failure surfaces in the caller at a later `submit` or at `flush`, and after it nothing more is written."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._failed = False

    def __getstate__(self):
        return {"_pool": None, "_pending": [], "_failed": False}

    @property
    def active(self) -> bool:
        return self._pool is not None

    def submit(self, what: str, fn: Callable[..., None], *args) -> None:
        """Queue `fn(*args)` (the write of `what`, named should it be skipped); first waits while the queue is full,
        and raises the first failure of the writes finished so far."""
        while self._pending and (self._pending[0].done() or len(self._pending) >= WRITE_BEHIND_DEPTH):
            self._pending.pop(0).result()  # raises the first failure here, in the caller
        self._pending.append(self._pool.submit(self._run, what, fn, args))

    def _run(self, what: str, fn: Callable[..., None], args: tuple) -> None:
        if self._failed:  # after a failed write nothing more is written (the stage stops there)
            raise StoreError(f"write of {what} skipped after an earlier write failed")
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    @contextlib.contextmanager
    def running(self, owner: Any = None):
        """Context (yields `owner`): writes submitted inside it run on the threads; leaving it waits for every one
        and raises the first failure. Nested, the outer one waits."""
        if self._pool is not None:
            yield owner
            return
        self._pool = ThreadPoolExecutor(WRITE_BEHIND_THREADS, thread_name_prefix="rca-write")
        self._failed = False
        try:
            yield owner
            self.flush()
        finally:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True)
            self._pending = []

    def flush(self) -> None:
        """Wait for every queued write; raise the first failure."""
        pending, self._pending = self._pending, []
        errors = [e for e in (f.exception() for f in pending) if e is not None]
        if errors:
            raise errors[0]


class Prefetch:
    """Reads started ahead on a caller's executor, each taken once by the read it stands for."""

    def __init__(self):
        self._futures: dict[Hashable, Future] = {}

    def __getstate__(self):
        return {"_futures": {}}

    def start(self, key: Hashable, executor, fn: Callable[..., Any], *args) -> None:
        """Start `fn(*args)` on `executor` unless a read of `key` is already under way."""
        if key not in self._futures:
            self._futures[key] = executor.submit(fn, *args)

    def take(self, key: Hashable) -> Future | None:
        """The read of `key` started ahead (None: none was); it is no longer held here."""
        return self._futures.pop(key, None) if self._futures else None

    def drop(self) -> None:
        """Cancel the reads not started yet and forget every one."""
        for f in self._futures.values():
            f.cancel()
        self._futures = {}
