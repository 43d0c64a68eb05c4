"""Reliability suite: failures provoked THROUGH the stages (not the building blocks alone).

Each test damages one thing (the disk, the data tree, the config, a checkpoint, an address) under a
copy of a small finished run, runs a stage, and checks that the failure is clear (names the file,
item or key) and that nothing already computed is lost or corrupted (stored bytes compared before
and after; a re-run after the repair recomputes only what is missing, with the same bytes).
Kinds already covered elsewhere are listed in docs/reliability.md with their tests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, copy_stages, write_config

RCA = str(Path(sys.executable).with_name("rca"))
PROBE = 10  # index of the training image that gets damaged mid-stage (images before it are done first)


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One finished run of the tiny config up to cam_infer: the reference for every test here."""
    import torch

    from rca_core.config import load_config
    from rca_core.stages.planning import plan
    from rca_core.stages.local import run_stage

    torch.set_num_threads(1)
    cfg = load_config(write_config(tmp_path_factory.mktemp("reliability_base")))
    run_stage("cam_infer", cfg, show_progress=False)
    return {"cfg": cfg, "plans": plan(cfg)}


def clone(base, path: Path, stages: list[str], **overrides):
    """A run config under `path` with its own copy of the data tree and of the finished `stages`."""
    from rca_core.config import load_config

    shutil.copytree(base["cfg"].data.root, path / "data")
    cfg = load_config(write_config(path, **overrides))
    copy_stages(base["cfg"], cfg, stages)
    return cfg


def stage_bytes(cfg, names: list[str]) -> dict[str, bytes]:
    """Every file of the given stages in the store, keyed by relative path."""
    from rca_core.stages.planning import plan

    root = Path(cfg.store)
    out = {}
    for name in names:
        d = root / plan(cfg)[name].key
        out.update({str(p.relative_to(root)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()})
    return out


def stage_out(cfg, name: str):
    from rca_core.stages.planning import plan
    from rca_core.store import ArtifactStore

    return ArtifactStore(cfg.store).stage(name, plan(cfg)[name].fingerprint)


def same_cams(cfg, base, ids) -> None:
    """The cam_infer entries of `ids` are readable (checksum verified) and equal to the reference run."""
    new, ref = stage_out(cfg, "cam_infer"), stage_out(base["cfg"], "cam_infer")
    for image_id in ids:
        for field in ("cam",):
            a, aa = new.read(image_id, field)
            b, ba = ref.read(image_id, field)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes() and aa == ba, f"{field}/{image_id}"


def train_ids(cfg) -> list[str]:
    return (Path(cfg.data.root) / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def run(name, cfg):
    from rca_core.stages.local import run_stage

    return run_stage(name, cfg, show_progress=False)


def rca(*args, env=None):
    return subprocess.run([RCA, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **(env or {})})


def closed_port() -> int:
    from flows.prefect_server import free_port

    return free_port()  # bound once, then released: nothing listens there


# --------------------------------------------------------------------------------- full disk / write errors
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_disk_full_mid_stage_then_rerun_after_freeing_space(base, tmp_path):
    """The store on a small tmpfs, filled up by a ballast file while cam_infer writes."""
    from rca_core.store import StoreError

    store = tmp_path / "store"
    if not _mount_tmpfs(store, "16m"):
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); "
                    "test_store_write_error_mid_stage_then_rerun covers the injected write error")
    try:
        cfg = clone(base, tmp_path, ["cam_train", "memory_build"])
        before = stage_bytes(cfg, ["cam_train", "memory_build"])
        st = os.statvfs(store)
        ballast = store / "ballast.bin"
        ballast.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 200 * 1024))  # ~4 images' CAMs left
        with pytest.raises(StoreError) as e:
            run("cam_infer", cfg)
        msg = str(e.value)
        assert "No space left on device" in msg and f"{cfg.store}/" in msg and "cam_infer/" in msg, msg
        out = stage_out(cfg, "cam_infer")
        ids = train_ids(cfg)
        done = [i for i in ids if out.is_done(i, verify=True)]
        assert 0 < len(done) < len(ids) and not out.is_complete()
        same_cams(cfg, base, done)                                   # finished images stay readable
        assert stage_bytes(cfg, ["cam_train", "memory_build"]) == before

        ballast.unlink()                                             # free the space, run again
        summary = run("cam_infer", cfg)
        assert summary["recomputed_images"] == len(ids) - len(done)
        assert out.is_complete() and out.pending(ids, verify=True) == []
        same_cams(cfg, base, ids)
        assert stage_bytes(cfg, ["cam_train", "memory_build"]) == before
    finally:
        _umount(store)


def test_store_write_error_mid_stage_then_rerun(base, tmp_path):
    """Injected write errors (a plain file where an image's array folder must go; fails even as root)."""
    from rca_core.store import StoreError

    cfg = clone(base, tmp_path, ["cam_train", "memory_build"])
    ids = train_ids(cfg)
    victim = ids[PROBE]
    out = stage_out(cfg, "cam_infer").prepare(["cam"])
    blocker = Path(cfg.store) / out.key / "cam" / victim
    blocker.write_bytes(b"in the way")
    before = stage_bytes(cfg, ["cam_train", "memory_build"])
    with pytest.raises(StoreError) as e:
        run("cam_infer", cfg)
    assert f"{out.key}/cam/{victim}" in str(e.value), str(e.value)
    assert [i for i in ids if out.is_done(i, verify=True)] == ids[:PROBE] and not out.is_complete()
    same_cams(cfg, base, ids[:PROBE])
    blocker.unlink()
    summary = run("cam_infer", cfg)
    assert summary["recomputed_images"] == len(ids) - PROBE
    same_cams(cfg, base, ids)
    assert stage_bytes(cfg, ["cam_train", "memory_build"]) == before


# ----------------------------------------------------------------------------------- bad inputs
def _truncate_jpeg(root: Path, ids: list[str]) -> tuple[str, str]:
    p = root / "JPEGImages" / f"{ids[PROBE]}.jpg"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return ids[PROBE], str(p)


def _remove_jpeg(root: Path, ids: list[str]) -> tuple[str, str]:
    p = root / "JPEGImages" / f"{ids[PROBE]}.jpg"
    p.unlink()
    return ids[PROBE], str(p)


def _mask_wrong_size(root: Path, ids: list[str]) -> tuple[str, str]:
    p = root / "SegmentationClassAug" / f"{ids[PROBE]}.png"
    m = np.asarray(Image.open(p))
    Image.fromarray(m[:-5]).save(p)
    return ids[PROBE], f"is {m.shape[0] - 5}x{m.shape[1]} but the image is {m.shape[0]}x{m.shape[1]}"


def _mask_class_outside(root: Path, ids: list[str]) -> tuple[str, str]:
    p = root / "SegmentationClassAug" / f"{ids[PROBE]}.png"
    m = np.asarray(Image.open(p)).copy()
    m[:3, :3] = 9  # the tiny set has classes 0..3
    Image.fromarray(m).save(p)
    return ids[PROBE], "class value 9"


def _tag_class_outside(root: Path, ids: list[str]) -> tuple[str, str]:
    p = root / "labels.json"
    labels = json.loads(p.read_text())
    labels[ids[PROBE]] = [1, 7]
    p.write_text(json.dumps(labels))
    return ids[PROBE], "tag 7"


def _dotdot_id(root: Path, ids: list[str]) -> tuple[str, str]:
    split = root / "ImageSets" / "Segmentation" / "train.txt"
    split.write_text("\n".join(ids[:PROBE] + ["../escape"] + ids[PROBE:]) + "\n")
    return "../escape", str(split)


def _empty_split(root: Path, ids: list[str]) -> tuple[str, str]:
    split = root / "ImageSets" / "Segmentation" / "train.txt"
    split.write_text("")
    return "train", str(split)


BAD_INPUTS = [
    # (damage, stage run on the damaged tree, its finished upstream stages)
    pytest.param(_truncate_jpeg, "cam_infer", ["cam_train", "memory_build"], id="truncated_jpeg"),
    pytest.param(_remove_jpeg, "cam_infer", ["cam_train", "memory_build"], id="id_without_file"),
    pytest.param(_tag_class_outside, "cam_infer", ["cam_train", "memory_build"], id="tag_outside_class_list"),
    pytest.param(_dotdot_id, "cam_infer", ["cam_train", "memory_build"], id="dotdot_id"),
    pytest.param(_mask_wrong_size, "cam_eval", ["cam_train", "memory_build", "cam_infer"], id="mask_wrong_size"),
    pytest.param(_mask_class_outside, "cam_eval", ["cam_train", "memory_build", "cam_infer"],
                 id="mask_class_outside_list"),
    pytest.param(_empty_split, "cam_infer", ["cam_train", "memory_build"], id="empty_split"),
]


@pytest.mark.parametrize("damage, stage, upstream", BAD_INPUTS)
def test_bad_input_through_a_stage(base, tmp_path, damage, stage, upstream):
    cfg = clone(base, tmp_path, upstream)
    ids = train_ids(cfg)
    before = stage_bytes(cfg, upstream)
    item, detail = damage(Path(cfg.data.root), ids)
    with pytest.raises(Exception) as e:
        run(stage, cfg)
    msg = str(e.value)
    assert repr(item) in msg and detail in msg, msg     # names the item (and the file / value)
    assert stage_bytes(cfg, upstream) == before          # earlier outputs untouched, byte for byte
    assert not stage_out(cfg, stage).is_complete()
    assert not (tmp_path / "escape").exists() and not (Path(cfg.store).parent / "escape").exists()


def test_truncated_jpeg_mid_stage_keeps_finished_images_and_resumes(base, tmp_path):
    """After the failure, restoring the file and re-running recomputes only the images not yet done."""
    cfg = clone(base, tmp_path, ["cam_train", "memory_build"])
    ids = train_ids(cfg)
    jpeg = Path(cfg.data.root) / "JPEGImages" / f"{ids[PROBE]}.jpg"
    good = jpeg.read_bytes()
    _truncate_jpeg(Path(cfg.data.root), ids)
    with pytest.raises(Exception, match=ids[PROBE]):
        run("cam_infer", cfg)
    out = stage_out(cfg, "cam_infer")
    assert [i for i in ids if out.is_done(i, verify=True)] == ids[:PROBE]
    jpeg.write_bytes(good)
    summary = run("cam_infer", cfg)
    assert summary["recomputed_images"] == len(ids) - PROBE
    same_cams(cfg, base, ids)


# ------------------------------------------------------------------------------------------- config
def test_wrong_type_in_config_file_through_rca_stage(base, tmp_path):
    cfg_path = write_config(tmp_path, cam={"train": {"batch_size": "many"}})
    r = rca("stage", "cam_infer", "-c", cfg_path, "--local")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cam.train.batch_size" in r.stderr and "'many'" in r.stderr and str(cfg_path) in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "store").exists()


def test_wrong_type_in_override_through_rca_run(base, tmp_path):
    cfg = clone(base, tmp_path, ["cam_train"])
    before = stage_bytes(cfg, ["cam_train"])
    r = rca("run", "-c", tmp_path / "config.yaml", "--set", "ray.num_workers=two")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ray.num_workers" in r.stderr and "'two'" in r.stderr and "Traceback" not in r.stderr
    assert stage_bytes(cfg, ["cam_train"]) == before


# -------------------------------------------------------------------------------------- checkpoints
def _other_width_state(cfg) -> dict:
    from rca_core.models.cam_net import CamNet

    other = cfg.cam.model_copy(deep=True)
    other.backbone.width = cfg.cam.backbone.width * 2
    return CamNet(other, cfg.data.num_classes).state_dict()


@pytest.mark.parametrize("kind", [
    "other_architecture",
    "truncated",
])
def test_bad_trained_model_file_for_a_downstream_stage(base, tmp_path, kind):
    """cam_train's model.pt replaced (another backbone width) or cut short: memory_build names the file."""
    import torch

    cfg = clone(base, tmp_path, ["cam_train"])
    model = Path(stage_out(cfg, "cam_train").file("model.pt").path)
    if kind == "other_architecture":
        torch.save(_other_width_state(cfg), model)
    else:
        model.write_bytes(model.read_bytes()[:2000])
    before = stage_bytes(cfg, ["cam_train"])
    with pytest.raises(Exception) as e:
        run("memory_build", cfg)
    assert stage_bytes(cfg, ["cam_train"]) == before and not stage_out(cfg, "memory_build").is_complete()
    assert str(model) in str(e.value), str(e.value)


@pytest.mark.parametrize("kind", [
    "other_architecture",
    "truncated",
])
def test_bad_resume_checkpoint_of_a_training_stage(base, tmp_path, kind):
    """cam_train's checkpoint.pt (the resume point) replaced or cut short: the error names it, it is kept."""
    import torch

    cfg = clone(base, tmp_path, [])
    ckpt = Path(stage_out(cfg, "cam_train").file("checkpoint.pt").path)
    src = Path(stage_out(base["cfg"], "cam_train").file("checkpoint.pt").path)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if kind == "other_architecture":
        torch.save({"model": _other_width_state(cfg), "epoch": 1, "step": 3, "extra": {}}, ckpt)
    else:
        ckpt.write_bytes(src.read_bytes()[:2000])
    kept = ckpt.read_bytes()
    with pytest.raises(Exception) as e:
        run("cam_train", cfg)
    assert ckpt.read_bytes() == kept and not stage_out(cfg, "cam_train").is_complete()
    assert str(ckpt) in str(e.value), str(e.value)


# ------------------------------------------------------------------------------ Ray and Prefect
def test_unreachable_ray_address_fails_fast_in_the_ray_layer():
    import ray

    from rca_core.config import RayConfig
    from tasks.ray_runtime import ray_session

    port = closed_port()
    with pytest.raises(RuntimeError, match=rf"cannot reach the Ray cluster at 127\.0\.0\.1:{port} \(ray\.address\)"):
        with ray_session(RayConfig(address=f"127.0.0.1:{port}")):
            pass
    assert not ray.is_initialized()


@pytest.mark.slow
def test_unreachable_ray_address_through_rca_stage(base, tmp_path, prefect_server):
    cfg = clone(base, tmp_path, ["cam_train", "memory_build"])
    before = stage_bytes(cfg, ["cam_train", "memory_build"])
    port = closed_port()
    r = rca("stage", "cam_infer", "-c", tmp_path / "config.yaml", "--set", f"ray.address=127.0.0.1:{port}",
            env={"PREFECT_API_URL": prefect_server})
    assert r.returncode == 2, r.stdout + r.stderr  # refused before Prefect starts
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port} (ray.address)" in " ".join((r.stdout + r.stderr).split())
    assert stage_bytes(cfg, ["cam_train", "memory_build"]) == before
    assert not stage_out(cfg, "cam_infer").is_complete()


def test_unreachable_prefect_server_through_rca_run(base, tmp_path):
    cfg = clone(base, tmp_path, ["cam_train"])
    before = stage_bytes(cfg, ["cam_train"])
    api = f"http://127.0.0.1:{closed_port()}/api"
    r = rca("run", "-c", tmp_path / "config.yaml", env={"PREFECT_API_URL": api})
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"PREFECT_API_URL={api}" in r.stderr and "Traceback" not in r.stderr
    assert stage_bytes(cfg, ["cam_train"]) == before


LISTENERS = r"""
import json, os
from rca_core.config import RayConfig
from tasks.ray_runtime import ray_session
import ray  # puts Ray's vendored psutil on the path
import psutil
with ray_session(RayConfig(), num_cpus=1) as ray:
    sess = ray._private.worker._global_node.get_session_dir_path()
    mine = {p.pid for p in psutil.process_iter(["cmdline"]) if sess in " ".join(p.info["cmdline"] or [])}
    for pid in list(mine):
        try:
            mine |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.Error:
            pass
    mine.add(os.getpid())
    print(json.dumps(sorted({c.laddr.ip for c in psutil.net_connections("tcp")
                             if c.status == psutil.CONN_LISTEN and c.pid in mine})))
"""


def test_local_ray_listens_on_loopback_only():
    """A local Ray as `rca run` starts it (a user's environment: no test-only variables) binds to 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    r = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    addresses = json.loads(r.stdout.strip().splitlines()[-1])
    assert addresses and all(a in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for a in addresses), addresses


@pytest.mark.slow
def test_prefect_server_listens_on_loopback_only(prefect_server):
    """The Prefect server the tests and `rca run` start (flows.prefect_server) binds to 127.0.0.1 only."""
    import ray  # noqa: F401  (puts Ray's vendored psutil on the path)
    import psutil

    port = int(prefect_server.rsplit(":", 1)[1].split("/")[0])
    api = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert api, f"nothing listens on port {port}"
    pids = {c.pid for c in api}
    addresses = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids}
    assert addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses


def test_a_stopped_local_prefect_server_is_seen_gone_once_it_exits():
    """The command that started the local Prefect server is its parent: after SIGTERM the server is a zombie
    until reaped, and `kill -0` still finds it. The stop must reap it (it used to wait out its 20 s deadline
    and then SIGKILL a process that had long exited, at the end of every `rca run` that started a server)."""
    import time

    from flows.prefect_server import _alive

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.time() + 30
    while stat.read_text().split(") ", 1)[1][0] != "Z":  # exited, not reaped: a zombie
        assert time.time() < deadline, "the child did not exit"
        time.sleep(0.05)
    os.kill(proc.pid, 0)  # kill -0 still finds a zombie ...
    assert not _alive(proc.pid)  # ... _alive does not
    assert not stat.exists()  # and it was reaped
