"""One writer per stage of a store: a lease taken before a stage computes, renewed while it runs.

The lease is a small JSON record beside the stage's outputs (`<store>/<stage>/<key>/_lease.json`: run id, host,
pid, when it was taken, its last heartbeat, when it expires). It is created only if there is none and replaced
only if it is still the version the writer read (S3's conditional requests, or a lock file on a local disk:
rca_core.object_io.put_if), so two drivers never both hold it. A thread renews it every ttl/3; a holder that
stops heartbeating (a driver killed with -9, a machine gone) leaves a lease that expires after `ttl_s` and is
then taken over; on the holder's own machine (same kernel boot and process namespace, so the same `rca run` host
or container) a holder whose process is gone is taken over at once, so re-running a killed run does not wait
out the ttl. Drivers compare the holder's heartbeat with their own clock: keep the machines' clocks in step
(NTP), or raise `lease.ttl_s` well above their drift.

A second driver that finds the lease held either waits for it (`lease.on_busy: wait`, the default: two people
who press Run on one deployment get one computation, the second finds the stage complete) or fails at once
naming the holder (`fail`). While a process holds a stage's lease, `StageOutput.mark_complete` of that stage
checks that it still does (`check_held`): a holder whose lease was taken over never marks the stage complete.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

from rca_core import object_io

from .errors import StoreError

LEASE_FILE = "_lease.json"
RUN_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this process, as a lease holder


class LeaseBusy(StoreError):
    """The stage is being computed by another run (its lease is held and not expired)."""

    def __init__(self, stage_key: str, holder: "Holder", store_url: str):
        self.stage_key, self.holder, self.store_url = stage_key, holder, store_url
        super().__init__(f"stage {stage_key} of {store_url} is being computed by another run: {holder.describe()}; "
                         "this run stops here (lease.on_busy: fail). Wait for it (lease.on_busy: wait), or, if that "
                         f"run is gone, its lease expires {max(0.0, holder.expires - time.time()):.0f} s from now")

    def __reduce__(self):
        return type(self), (self.stage_key, self.holder, self.store_url)


class LeaseLost(StoreError):
    """This run's lease on a stage was taken over (it stopped heartbeating for longer than the lease's ttl)."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _machine() -> str | None:
    """This kernel boot and process namespace (Linux): where a pid means the same process; None elsewhere."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{ns}" if boot else None


def _started(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat), or None if there is none."""
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[19] if stat else None


@dataclass
class Holder:
    run_id: str
    host: str
    pid: int
    taken: float
    heartbeat: float
    expires: float
    machine: str | None = None  # _machine() of the holder (absent in records of older versions)
    started: str | None = None  # _started(pid) of the holder

    def gone(self) -> bool:
        """Whether the holder's process is known to be gone: it ran on this machine (same boot and process
        namespace) and no process with its pid and start time exists. Never true for another machine's holder."""
        return bool(self.machine and self.started and _MACHINE == self.machine and _started(self.pid) != self.started)

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"run {self.run_id} on host {self.host} (pid {self.pid}), holding it since "
                f"{time.strftime('%H:%M:%S', time.localtime(self.taken))}, last heartbeat {now - self.heartbeat:.0f} s ago")


_MACHINE = _machine()
_HELD: dict[tuple[str, str], "StageLease"] = {}  # (store url, stage key) -> the lease this process holds
_HELD_LOCK = threading.Lock()


class StageLease:
    """The lease of one stage (a StageOutput) for this process."""

    def __init__(self, out, ttl_s: float = 60.0, run_id: str = RUN_ID):
        self.out, self.ttl_s, self.run_id = out, float(ttl_s), run_id
        self.fs, self.path = out.store.loc.fs, out.store.loc.join(out.key, LEASE_FILE)
        self.version: str | None = None
        self.lost = False
        self.took_over: Holder | None = None  # the expired lease of another run this one replaced
        self.took_over_why = ""  # why it could: "no heartbeat for N s ..." or "its process is gone ..."
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- one attempt
    def _record(self, taken: float | None = None) -> bytes:
        now = time.time()
        h = Holder(self.run_id, socket.gethostname(), os.getpid(), taken or now, now, now + self.ttl_s,
                   _MACHINE, _started(os.getpid()))
        return json.dumps(asdict(h)).encode()

    def read(self) -> tuple[Holder, str] | None:
        got = object_io.read_versioned(self.fs, self.path)
        if got is None:
            return None
        data, version = got
        try:
            rec = json.loads(data)
            return Holder(**{k: v for k, v in rec.items() if k in Holder.__dataclass_fields__}), version
        except (ValueError, TypeError, AttributeError):  # a torn or foreign record: treat it as expired
            return Holder("?", "?", 0, 0.0, 0.0, 0.0), version

    def try_acquire(self) -> Holder | None:
        """Take the lease if it is free or expired (None), else hand back its holder."""
        cur = self.read()
        if cur is None:
            version = object_io.put_if(self.fs, self.path, self._record(), None)
        else:
            holder, seen = cur
            if holder.run_id == self.run_id:  # ours already (e.g. a retried request that had gone through)
                self.version = seen
                return None
            expired = holder.expires <= time.time()
            if not expired and not holder.gone():
                return holder
            version = object_io.put_if(self.fs, self.path, self._record(), seen)
            if version is not None:
                self.took_over = holder
                self.took_over_why = (f"no heartbeat for {time.time() - holder.heartbeat:.0f} s (lease.ttl_s "
                                      f"{holder.expires - holder.heartbeat:g})" if expired else
                                      "its process is gone (this machine)")
        if version is None:  # another writer got there first: look again
            again = self.read()
            if again is not None and again[0].run_id == self.run_id:
                self.version = again[1]
                return None
            return again[0] if again is not None else self.try_acquire()
        self.version = version
        return None

    def renew(self) -> bool:
        """Push the expiry forward; False (and `lost`) when another run has taken the lease over."""
        cur = self.read()
        if cur is None or cur[0].run_id != self.run_id:
            self.lost = True
            return False
        version = object_io.put_if(self.fs, self.path, self._record(cur[0].taken), cur[1])
        if version is None:
            self.lost = True
            return False
        self.version = version
        return True

    def release(self) -> None:
        cur = self.read()
        if cur is not None and cur[0].run_id == self.run_id:
            object_io.delete_if(self.fs, self.path, cur[1])

    # ---------------------------------------------------------------- holding it
    def _heartbeat(self) -> None:
        every = self.ttl_s / 3
        while not self._stop.wait(every):
            try:
                if not self.renew():
                    return
            except Exception:  # noqa: BLE001 - storage unreachable for now: try again; the expiry decides
                continue

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name=f"rca-lease-{self.out.key}", daemon=True)
        self._thread.start()
        with _HELD_LOCK:
            _HELD[(self.out.store.url, self.out.key)] = self

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with _HELD_LOCK:
            if _HELD.get((self.out.store.url, self.out.key)) is self:
                del _HELD[(self.out.store.url, self.out.key)]


@contextmanager
def hold(out, *, ttl_s: float = 60.0, on_busy: str = "wait", wait_timeout_s: float | None = None,
         on_wait: Callable[[Holder], None] | None = None, poll_s: float | None = None, run_id: str = RUN_ID):
    """The block runs holding the stage's lease: taken at once, or after waiting for the holder (`on_busy`
    "wait"; `on_wait(holder)` is called once when the wait starts), or LeaseBusy at once ("fail", or when
    `wait_timeout_s` passes). Yields the StageLease; releases it at the end."""
    lease = StageLease(out, ttl_s, run_id)
    poll = poll_s if poll_s is not None else max(0.5, min(2.0, ttl_s / 6))  # one small GET per poll
    t0, told = time.time(), None
    while True:
        holder = lease.try_acquire()
        if holder is None:
            break
        if on_busy != "wait" or (wait_timeout_s is not None and time.time() - t0 > wait_timeout_s):
            raise LeaseBusy(out.key, holder, out.store.url)
        if on_wait is not None and told != holder.run_id:
            told = holder.run_id
            on_wait(holder)
        time.sleep(poll)
    lease.start_heartbeat()
    try:
        yield lease
    finally:
        lease.stop_heartbeat()
        try:
            lease.release()
        except Exception:  # noqa: BLE001 - unreachable storage: the lease expires by itself
            pass


def check_held(out) -> None:
    """Raise LeaseLost when this process took this stage's lease and has lost it since (another run took it over
    after it expired): its outputs may be mixed with the other run's, so it must not mark the stage complete."""
    with _HELD_LOCK:
        lease = _HELD.get((out.store.url, out.key))
    if lease is None:
        return
    if lease.lost or not lease.renew():
        raise LeaseLost(f"stage {out.key} of {out.store.url}: this run's lease was taken over by another run (no "
                        f"heartbeat for more than lease.ttl_s = {lease.ttl_s:.0f} s); the stage is not marked "
                        "complete by this run")


__all__ = ["StageLease", "Holder", "LeaseBusy", "LeaseLost", "hold", "check_held", "LEASE_FILE", "RUN_ID"]
