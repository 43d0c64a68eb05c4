"""A real cluster whose nodes share no disk, with the store and the data on S3.

Node 2 of a two-node Ray cluster on 127.0.0.1 runs in its own mount namespace with private tmpfs mounts
over the checkout's runs/ and data/ and over pytest's temporary directories, so it sees none of the files
the driver writes locally; a real S3 server (SeaweedFS) on 127.0.0.1 holds the store and the data set.
Every run goes through `rca run` (real Prefect server, real Ray) started from a working directory other
than the checkout. The tests run in order: the end-to-end run, then runs that reuse its store.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import prefect_api
from conftest import ROOT, write_config
from harness.ray_cluster import IsolationUnavailable, TwoNodeCluster, check_isolation
from harness.s3_faults import Fault, S3Faults
from harness.s3_server import SeaweedS3
from harness.slowdown import set_delays, slowdown_env

pytestmark = pytest.mark.slow
RCA = str(Path(sys.executable).with_name("rca"))
BUCKET = "rca-cluster"
PER_IMAGE = ("memory_build", "cam_infer", "crf_labels", "random_walk", "seg_eval")
TRAINING = ("cam_train", "affinity_train", "seg_train")


def _bg(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the joiner
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()

    def join(timeout: float):
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"{fn} still running after {timeout:.0f} s")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return join


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, prefect_server):
    base = tmp_path_factory.getbasetemp()
    hidden = [ROOT / "runs", ROOT / "data", base]
    for d in hidden:
        d.mkdir(parents=True, exist_ok=True)
    try:
        check_isolation(hidden)
    except IsolationUnavailable as e:
        pytest.skip(f"cannot give node 2 a private view of the driver's directories here (needs root for "
                    f"unshare/mount): {e}")
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="rca-cluster-"))  # outside the hidden dirs: node 2's own Ray files
    s3 = SeaweedS3(work / "s3")
    # every S3 request of the cluster (driver, both nodes) goes through a fault-injecting proxy, no faults until a
    # test sets them (tests/harness/s3_faults.py)
    faults = S3Faults(s3, seed=5, workdir=work / "faults").start()
    slow = slowdown_env(work / "slowdown")  # no delay until a test sets one (set_delays); node 2 sees the file
    ray_cluster = TwoNodeCluster(work / "ray", hidden_dirs=hidden, head_cpus=2, node2_cpus=1,
                                 env={**faults.env, **slow})
    s3_up = _bg(s3.start)
    saved = {k: os.environ.get(k) for k in faults.env}
    try:
        ray_cluster.start()
        s3_up(timeout=90)
        s3.make_bucket(BUCKET)
        os.environ.update(faults.env)  # the driver (this process and `rca run`) reaches S3 through the env alone
        yield SimpleNamespace(s3=s3, ray=ray_cluster, api=prefect_server, work=work, base=base, slow=slow,
                              faults=faults)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            s3_up(timeout=90)
        except Exception:  # noqa: BLE001 - reported by the fixture set-up already
            pass
        s3_down = _bg(s3.kill)  # throwaway data: no need to wait out weed's ~15 s gRPC grace
        ray_cluster.stop()
        faults.stop()
        s3_down(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def cluster_config(c, path: Path, store: str, **overrides) -> Path:
    from rca_core.config.base import deep_update

    ov = deep_update({"store": store, "data": {"root": f"s3://{BUCKET}/tiny-data"},
                      "ray": {"address": c.ray.address, "train_placement": "SPREAD", "shard_size": 4}}, overrides)
    cfg = write_config(path, **ov)
    return cfg


def rca(c, args: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **c.faults.env, "PREFECT_API_URL": c.api, **(env or {})}
    return subprocess.run([RCA, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def popen(c, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **c.faults.env, "PREFECT_API_URL": c.api, **(env or {})}
    return subprocess.Popen([RCA, *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def load(cfg_path: Path):
    from rca_core.config import load_config

    return load_config(cfg_path)


def stage_out(cfg, name: str):
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    return ArtifactStore.for_config(cfg).stage(name, plan(cfg)[name].fingerprint)


def s3fs_fresh(c):
    """An s3fs client without a listing cache: the objects are written by other processes."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=c.s3.endpoint, key=c.s3.env["AWS_ACCESS_KEY_ID"],
                             secret=c.s3.env["AWS_SECRET_ACCESS_KEY"], use_listings_cache=False,
                             skip_instance_cache=True)


def copy_stages_s3(c, src_cfg, dst_store: str, stages: list[str]) -> None:
    """Server-side copies of finished stages (same keys) from one S3 store to another: a head start."""
    from rca_core.stages.planning import plan

    fs = s3fs_fresh(c)
    src, dst = src_cfg.store.split("://", 1)[1], dst_store.split("://", 1)[1]
    fs.copy(f"{src}/zarr.json", f"{dst}/zarr.json")
    for name in stages:
        key = plan(src_cfg)[name].key
        fs.copy(f"{src}/{name}/zarr.json", f"{dst}/{name}/zarr.json")
        fs.copy(f"{src}/{key}", f"{dst}/{key}", recursive=True)


def _state(c) -> dict:
    return getattr(c, "state", None) or {}


# ---------------------------------------------------------------------------------------------- tests
def test_end_to_end_on_s3_across_two_nodes(cluster, tmp_path_factory):
    """configs/tiny.yaml end to end, store and data on S3, started from a directory other than the checkout, while
    the S3 endpoint answers 5 % of requests with 503 SlowDown and resets 1 % of the connections mid-body: per-image
    shards and training ranks run on both nodes, every fault is ridden out (retries counted, none given up, no
    image lost); the pseudo-masks are byte-identical to the fault-free single-host run (next test)."""
    c = cluster
    where = tmp_path_factory.mktemp("elsewhere")
    cfg_path = cluster_config(c, where / "cfg", f"s3://{BUCKET}/run",
                              storage={"backoff_s": 0.05, "backoff_max_s": 2.0})
    c.faults.reset()
    c.faults.set(slowdown=0.05, reset=Fault(0.01, cut=0.5))
    t0 = time.time()
    try:
        res = rca(c, ["run", "-c", str(cfg_path)], cwd=where / "cwd")
    finally:
        injected = c.faults.counters()
        c.faults.clear()
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    c.state = {"e2e_cfg": cfg_path, "e2e_seconds": time.time() - t0}
    cfg = load(cfg_path)
    summaries = {name: stage_out(cfg, name).summary() for name in (*PER_IMAGE, *TRAINING, "cam_eval")}
    retried = sum(s.get("storage_retries", 0) for s in summaries.values())
    assert injected["slowdown"] >= 20 and injected["reset"] >= 2 and injected["upstream_errors"] == 0, injected
    assert retried > 0 and all(s.get("storage_gave_up", 0) == 0 for s in summaries.values()), \
        {n: (s.get("storage_retries"), s.get("storage_gave_up")) for n, s in summaries.items()}
    n = cfg.data.demo.n_train
    for name in ("memory_build", "cam_infer", "crf_labels", "random_walk"):  # no image lost
        assert len(stage_out(cfg, name).listed_ids()) == n, name
    print(f"faults injected {injected}; retries counted in the stage summaries {retried} (the rest: Prefect's and "
          "the report's requests, outside any stage)")
    nodes = {c.ray.head_id, c.ray.node2_id}
    for name in PER_IMAGE:
        out = stage_out(cfg, name)
        assert out.is_complete(), name
        seen = set(out.manifest().column("node_id").to_pylist())
        if name in ("cam_infer", "crf_labels", "random_walk"):
            assert seen == nodes, f"{name} ran on {seen}"
        else:
            assert seen <= nodes
    for name in TRAINING:
        ranks = stage_out(cfg, name).read_table("workers").to_pylist()
        assert {r["node_id"] for r in ranks} == nodes, f"{name} ranks on {ranks}"
    # nothing of the run is on the driver's disk: the store is the bucket (report included)
    fs = s3fs_fresh(c)
    assert fs.exists(f"{BUCKET}/run/_report/index.html")
    assert fs.exists(f"{BUCKET}/run/_prefect_results")


def test_pseudo_masks_identical_to_a_single_host_run(cluster, reference_run):
    """The two-node S3 run's pseudo-masks are byte-identical to those of one host with a local store."""
    c = cluster
    assert "e2e_cfg" in _state(c), "needs the end-to-end run"
    cfg = load(c.state["e2e_cfg"])
    ref = load(reference_run["config"])
    assert reference_run["rc"] == 0
    new_rw, ref_rw = stage_out(cfg, "random_walk"), stage_out(ref, "random_walk")
    ids = ref_rw.listed_ids()
    assert ids and sorted(new_rw.listed_ids()) == sorted(ids)
    for i in ids:
        a, aa = new_rw.read(i, "pseudo_mask")
        b, ba = ref_rw.read(i, "pseudo_mask")
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes() and aa == ba, i


def test_second_machine_sees_every_stage_cached(cluster, tmp_path_factory):
    """Another working directory (another machine's view: its own copy of the config file) against the same
    S3 store: every stage comes back Cached from Prefect's records in the store."""
    c = cluster
    assert "e2e_cfg" in _state(c), "needs the end-to-end run"
    other = tmp_path_factory.mktemp("second_machine")
    copy = other / "config.yaml"
    copy.write_text(Path(c.state["e2e_cfg"]).read_text())
    t0 = time.time()
    res = rca(c, ["run", "-c", str(copy)], cwd=other / "cwd")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    states = {t["name"]: t["state"]["name"] for t in prefect_api.task_runs_since(c.api, t0)
              if t["name"] in (*PER_IMAGE, *TRAINING, "cam_eval")}
    assert len(states) == 9 and set(states.values()) == {"Cached"}, states


CLIP = {"cam": {"source": "clip", "clip": {"weights": "random"}}}
CLIP_STAGES = ("clip_cam", "crf_labels", "affinity_train", "random_walk")


def test_clip_source_on_two_nodes_beside_the_rca_run(cluster, tmp_path_factory):
    """cam.source=clip (a random-init CLIP) on the same S3 store as the rca run, to the pseudo-masks: clip_cam's
    shards run on both nodes, a re-run comes back Cached, and the rca run's stages are untouched (their keys
    and outputs stay; no stage of one source is reused for the other)."""
    from rca_core.config import load_config
    from rca_core.stages.planning import plan

    c = cluster
    assert "e2e_cfg" in _state(c), "needs the end-to-end run"
    cfg_path = c.state["e2e_cfg"]
    rca_cfg, clip_cfg = load(cfg_path), load_config(cfg_path, CLIP)
    rca_keys, clip_keys = {n: p.key for n, p in plan(rca_cfg).items()}, {n: p.key for n, p in plan(clip_cfg).items()}
    rca_done = {n: stage_out(rca_cfg, n).summary() for n in rca_keys}
    assert not set(rca_keys.values()) & set(clip_keys.values())
    where = tmp_path_factory.mktemp("clip_source")
    args = ["run", "-c", str(cfg_path), "--stage", "random_walk", "--set", "cam.source=clip",
            "--set", "cam.clip.weights=random", "--set", "ray.num_workers=1"]  # DDP over the nodes: the e2e run's
    res = rca(c, args, cwd=where / "cwd")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "stages: clip_cam, crf_labels, affinity_train, random_walk" in res.stdout, res.stdout[-3000:]
    nodes = {c.ray.head_id, c.ray.node2_id}
    for name in CLIP_STAGES:
        assert stage_out(clip_cfg, name).is_complete(), name
    assert set(stage_out(clip_cfg, "clip_cam").manifest().column("node_id").to_pylist()) == nodes
    assert len(stage_out(clip_cfg, "random_walk").listed_ids()) == clip_cfg.data.demo.n_train
    assert {n: stage_out(rca_cfg, n).summary() for n in rca_keys} == rca_done  # the rca run's stages untouched
    t0 = time.time()
    res = rca(c, args, cwd=where / "again")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    states = {t["name"]: t["state"]["name"] for t in prefect_api.task_runs_since(c.api, t0) if t["name"] in CLIP_STAGES}
    assert states == {n: "Cached" for n in CLIP_STAGES}, states


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: " + (proc.stdout.read() or "")[-3000:])
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_node2_killed_mid_per_image_stage(cluster, tmp_path_factory):
    """Node 2's raylet SIGKILLed in the middle of random_walk: the run completes on the head, and no image
    that was finished before the kill is computed again."""
    c = cluster
    assert "e2e_cfg" in _state(c), "needs the end-to-end run"
    src = load(c.state["e2e_cfg"])
    where = tmp_path_factory.mktemp("kill_images")
    store = f"s3://{BUCKET}/kill-images"
    cfg_path = cluster_config(c, where / "cfg", store)
    copy_stages_s3(c, src, store, ["cam_train", "memory_build", "cam_infer", "crf_labels", "affinity_train"])
    cfg = load(cfg_path)
    rw = stage_out(cfg, "random_walk")
    n = cfg.data.demo.n_train
    set_delays(c.slow, image_delay=0.5)  # the cluster's workers slow down: the kill lands mid-stage
    p = popen(c, ["run", "-c", str(cfg_path), "--stage", "random_walk"], cwd=where / "cwd")
    try:
        finished = _wait(lambda: (lambda d: d if 4 <= len(d) <= n - 8 else None)(
            [i for i in (rw.listed_ids() if rw.fields else []) if rw.is_done(i)]), 300, "random_walk half way", p)
        t_snapshot = time.time()
        c.ray.kill_node2_raylet()
        stdout, _ = p.communicate(timeout=600)
    finally:
        set_delays(c.slow)
        if p.poll() is None:
            os.killpg(p.pid, 9)
    c.ray.restart_node2()
    assert p.returncode == 0, stdout[-4000:]
    assert rw.is_complete()
    import pyarrow.parquet as pq

    fs = s3fs_fresh(c)
    parts = fs.glob(f"{store.split('://', 1)[1]}/{rw.key}/manifest/*.parquet")
    rows = [r for part in parts for r in pq.read_table(part, filesystem=fs).to_pylist()]
    again = [r["image_id"] for r in rows if r["image_id"] in finished and r["status"] == "done"
             and r["written_at"] > t_snapshot]
    assert again == [], (f"finished before the kill, computed again: {again}; snapshot at {t_snapshot:.3f}, their "
                         f"manifest rows: {[r for r in rows if r['image_id'] in again]}")
    assert sorted(rw.manifest().column("image_id").to_pylist()) == sorted(rw.listed_ids()) and len(rw.listed_ids()) == n
    # byte-identical to the uninterrupted run
    ref = stage_out(src, "random_walk")
    for i in ref.listed_ids():
        assert rw.read(i, "pseudo_mask")[0].tobytes() == ref.read(i, "pseudo_mask")[0].tobytes(), i


def test_blackout_longer_than_the_deadline_fails_in_time_and_the_rerun_redoes_only_the_rest(cluster, tmp_path_factory):
    """The S3 endpoint blacks out (every connection reset) for longer than storage.timeout_s in the middle of
    random_walk: the run fails within the deadline plus a bounded margin, naming the endpoint and the last error;
    the same command after the blackout recomputes only the images that were not finished."""
    c = cluster
    assert "e2e_cfg" in _state(c), "needs the end-to-end run"
    src = load(c.state["e2e_cfg"])
    where = tmp_path_factory.mktemp("blackout")
    store = f"s3://{BUCKET}/blackout"
    deadline, blackout = 8.0, 20.0  # the workers give up within the deadline, well inside the blackout
    cfg_path = cluster_config(c, where / "cfg", store, storage={"timeout_s": deadline, "backoff_max_s": 1.0})
    copy_stages_s3(c, src, store, ["cam_train", "memory_build", "cam_infer", "crf_labels", "affinity_train"])
    cfg = load(cfg_path)
    rw = stage_out(cfg, "random_walk")
    n = cfg.data.demo.n_train
    set_delays(c.slow, image_delay=0.5)  # the blackout lands mid-stage
    p = popen(c, ["run", "-c", str(cfg_path), "--stage", "random_walk"], cwd=where / "cwd")
    try:
        _wait(lambda: (lambda d: d if 4 <= len(d) <= n - 8 else None)(
            [i for i in (rw.listed_ids() if rw.fields else []) if rw.is_done(i)]), 300, "random_walk half way", p)
        t_black = time.time()
        c.faults.blackout(blackout)
        out, _ = p.communicate(timeout=300)
        failed_after = time.time() - t_black
    finally:
        set_delays(c.slow)
        if p.poll() is None:
            os.killpg(p.pid, 9)
    assert p.returncode != 0, out[-3000:]
    failure = next((ln for ln in out.splitlines() if "failed:" in ln), "")
    assert c.faults.endpoint in failure and "last error:" in failure, out[-3000:]
    assert failed_after < deadline + 40, f"failed {failed_after:.0f} s after the blackout began"
    time.sleep(max(0.0, t_black + blackout + 1 - time.time()))  # the endpoint answers again
    finished = [i for i in rw.listed_ids() if rw.is_done(i, verify=True)]
    assert 4 <= len(finished) < n and not rw.is_complete()
    res = rca(c, ["run", "-c", str(cfg_path), "--stage", "random_walk"], cwd=where / "cwd")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = rw.summary()
    assert summary["recomputed_images"] == n - len(finished), (summary["recomputed_images"], n, len(finished))
    print(f"failed {failed_after:.1f} s after the blackout began (storage.timeout_s {deadline:g}): {failure}; the "
          f"re-run recomputed {summary['recomputed_images']} of {n} images ({len(finished)} were finished)")


def test_node2_killed_mid_training_stage(cluster, tmp_path_factory):
    """Node 2's raylet SIGKILLed while AffinityNet trains with one rank on each node: Ray Train restarts the
    worker group on the head, which resumes from the last reported checkpoint (no finished epoch redone)."""
    c = cluster
    assert "e2e_cfg" in _state(c), "needs the end-to-end run"
    src = load(c.state["e2e_cfg"])
    where = tmp_path_factory.mktemp("kill_training")
    store = f"s3://{BUCKET}/kill-training"
    cfg_path = cluster_config(c, where / "cfg", store, refine={"affinity": {"epochs": 3}})
    copy_stages_s3(c, src, store, ["cam_train", "memory_build", "cam_infer", "crf_labels"])
    cfg = load(cfg_path)
    aff = stage_out(cfg, "affinity_train")
    fs = s3fs_fresh(c)
    ray_train = f"{store.split('://', 1)[1]}/{aff.key}/files/ray_train"
    set_delays(c.slow, epoch_delay=3)  # a pause after every checkpoint: the kill lands between epochs
    p = popen(c, ["run", "-c", str(cfg_path), "--stage", "affinity_train"], cwd=where / "cwd")
    try:
        # a checkpoint counts once Ray Train's controller has registered it (its manager snapshot is written
        # then); the checkpoint's own file appears earlier, and a node lost in between restarts from scratch
        _wait(lambda: fs.glob(f"{ray_train}/*/checkpoint_manager_snapshot.json") if fs.exists(ray_train) else None,
              300, "the first registered AffinityNet checkpoint", p)
        c.ray.kill_node2_raylet()
        stdout, _ = p.communicate(timeout=600)
    finally:
        set_delays(c.slow)
        if p.poll() is None:
            os.killpg(p.pid, 9)
    c.ray.restart_node2()
    assert p.returncode == 0, stdout[-4000:]
    summary = aff.summary()
    assert summary["resumed_from_epoch"] is not None and summary["resumed_from_epoch"] >= 1, summary
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3]


def test_node_that_cannot_see_the_store_fails_fast_naming_it(cluster, tmp_path_factory):
    """A store on the driver's local disk: node 2 cannot see it; the first stage fails in the preflight,
    within 30 s, naming node 2, before anything fans out."""
    c = cluster
    where = tmp_path_factory.mktemp("local_store")
    cfg_path = cluster_config(c, where / "cfg", str(where / "local-store"))
    t0 = time.time()
    res = rca(c, ["run", "-c", str(cfg_path)], cwd=where / "cwd", timeout=180)
    wall = time.time() - t0
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert c.ray.node2_id[:12] in out and "cannot read the store marker" in out, out[-3000:]
    assert wall < 60, f"took {wall:.0f} s"
    from rca_core.stages.planning import plan

    assert not (where / "local-store" / plan(load(cfg_path))["cam_train"].key / "files" / "ray_train").exists()


def test_node_without_credentials_fails_the_preflight_saying_so(cluster, tmp_path_factory):
    """Node 2 started without its AWS credentials (an instance without its profile, a pod without its Secret): the
    run fails in the preflight, within ray.preflight_timeout_s, with a line that says so in words and names node 2."""
    c = cluster
    where = tmp_path_factory.mktemp("no_credentials")
    cfg_path = cluster_config(c, where / "cfg", f"s3://{BUCKET}/no-credentials")
    node2 = c.ray.restart_node2(drop_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    try:
        t0 = time.time()
        res = rca(c, ["run", "-c", str(cfg_path), "--stage", "cam_train"], cwd=where / "cwd", timeout=180)
        wall = time.time() - t0
    finally:
        c.ray.restart_node2()
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    line = next((ln for ln in out.splitlines() if "no AWS credentials on this node" in ln), None)
    assert line is not None and node2[:12] in line and f"s3://{BUCKET}/no-credentials" in line, out[-3000:]
    assert wall < 90, f"took {wall:.0f} s"
    print(line)
