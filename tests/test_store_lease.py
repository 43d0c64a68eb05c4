"""One writer per stage of a store: the stage lease (rca_core.store.lease) on a local disk and on a real S3 server
(SeaweedFS, conditional requests): exclusive, renewed, taken over after expiry, never two holders."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from rca_core import object_io
from rca_core.store import ArtifactStore, LeaseBusy, LeaseLost
from rca_core.store.lease import StageLease, hold


def _two_holders_never(out) -> None:
    a, b = StageLease(out, ttl_s=30, run_id="run-a"), StageLease(out, ttl_s=30, run_id="run-b")
    assert a.try_acquire() is None
    busy = b.try_acquire()
    assert busy is not None and busy.run_id == "run-a"
    assert a.renew() and a.try_acquire() is None  # its own lease: renewed, still held
    a.release()
    assert b.try_acquire() is None and a.try_acquire().run_id == "run-b"
    b.release()


def _expired_lease_is_taken_over_and_the_old_holder_cannot_complete(out) -> None:
    old = StageLease(out, ttl_s=0.5, run_id="killed")
    assert old.try_acquire() is None
    old.start_heartbeat()   # registered as held by this process (as a driver does) ...
    old._stop.set()         # ... but its heartbeats stop, as when its driver is killed
    time.sleep(1.0)
    new = StageLease(out, ttl_s=30, run_id="next")
    assert new.try_acquire() is None and new.took_over.run_id == "killed"
    with pytest.raises(LeaseLost, match="taken over by another run"):
        out.mark_complete({"by": "killed"})  # the old holder never marks the stage complete
    old.stop_heartbeat()
    assert not out.is_complete()
    new.release()


def _racing_drivers_one_wins(out) -> None:
    leases = [StageLease(out, ttl_s=30, run_id=f"run-{i}") for i in range(6)]
    won, start = [], threading.Barrier(len(leases))

    def grab(lease):
        start.wait()
        if lease.try_acquire() is None:
            won.append(lease.run_id)

    threads = [threading.Thread(target=grab, args=(lease,)) for lease in leases]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert len(won) == 1, won
    assert leases[0].read()[0].run_id == won[0]
    next(lease for lease in leases if lease.run_id == won[0]).release()


def _hold_waits_or_fails(out) -> None:
    with hold(out, ttl_s=30, on_busy="wait") as first:
        with pytest.raises(LeaseBusy, match="being computed by another run: run .* on host .* \\(pid"):
            with hold(out, ttl_s=30, on_busy="fail", run_id="second"):
                pass
        first_id = first.run_id
        other = StageLease(out, ttl_s=30, run_id="other")
        waited: list = []
        t = threading.Timer(1.0, first.release)
        t.start()
        t0 = time.time()
        while other.try_acquire() is not None:  # what hold(on_busy="wait") does, with another run id
            waited.append(time.time() - t0)
            time.sleep(0.2)
        assert waited and other.read()[0].run_id == "other" and first_id != "other"
        other.release()
        t.join()


def _killed_holder_on_this_machine_is_taken_over_at_once(out) -> None:
    """A driver killed with -9 on this machine: its lease (ttl 600 s, far from expiry) is taken over at once, since
    no process with its pid and start time exists any more; a holder on another machine is waited for."""
    code = ("import sys, time\n"
            "from rca_core.store import ArtifactStore\n"
            "from rca_core.store.lease import StageLease\n"
            "out = ArtifactStore(sys.argv[1]).stage('cam_infer', 'abc')\n"
            "assert StageLease(out, ttl_s=600, run_id='killed-driver').try_acquire() is None\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code, out.store.url], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        alive = StageLease(out, ttl_s=30, run_id="next")
        busy = alive.try_acquire()  # while it lives: busy
        assert busy is not None and busy.run_id == "killed-driver" and not busy.gone()
    finally:
        p.kill()
        p.wait(timeout=30)
    new = StageLease(out, ttl_s=30, run_id="next")
    assert new.try_acquire() is None and new.took_over.run_id == "killed-driver"
    assert new.took_over_why == "its process is gone (this machine)"
    new.release()
    # the same record from another machine (another boot): its pid means nothing here, so it is waited for
    other = StageLease(out, ttl_s=600, run_id="elsewhere")
    rec = json.loads(other._record())
    rec.update(machine="another-boot/pid:[1]", pid=p.pid)
    object_io.put_if(other.fs, other.path, json.dumps(rec).encode(), None)
    busy = StageLease(out, ttl_s=30, run_id="next").try_acquire()
    assert busy is not None and busy.run_id == "elsewhere" and not busy.gone()
    object_io.delete_if(other.fs, other.path, other.read()[1])


CASES = [_two_holders_never, _killed_holder_on_this_machine_is_taken_over_at_once, _expired_lease_is_taken_over_and_the_old_holder_cannot_complete,
         _racing_drivers_one_wins, _hold_waits_or_fails]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
def test_lease_on_a_local_store(tmp_path, case):
    case(ArtifactStore(tmp_path / "store").stage("cam_infer", "abc").prepare(["cam"]))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from harness.s3_server import SeaweedS3

    srv = SeaweedS3(tmp_path_factory.mktemp("lease_s3"))
    srv.start()
    srv.make_bucket("lease")
    try:
        yield srv
    finally:
        srv.kill()  # throwaway data: SIGKILL is immediate, where stop() waits out weed's ~15 s gRPC grace


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.strip("_"))
def test_lease_on_s3(s3, monkeypatch, case):
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    case(ArtifactStore(f"s3://lease/{case.__name__.strip('_')}").stage("cam_infer", "abc").prepare(["cam"]))
