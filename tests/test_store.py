"""The artifact store: round trip, resume after kill -9 with identical bytes, damage detection."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rca_core.store import ArtifactStore, DamagedEntryError, StoreError

from _store_writer import data_for

HERE = Path(__file__).parent


def test_round_trip(tmp_path):
    out = ArtifactStore(tmp_path / "s").stage("cam_infer", "abc123").prepare(["cam", "cam_low"])
    cam = np.random.default_rng(0).random((3, 17, 23)).astype(np.float16)
    out.write("2007_000032", {"cam": cam, "cam_low": cam[:, ::4, ::4]}, attrs={"classes": [1, 5, 9]})
    got, attrs = out.read("2007_000032", "cam")
    assert got.dtype == np.float16 and np.array_equal(got, cam)
    assert attrs == {"classes": [1, 5, 9]}
    assert out.pending(["2007_000032", "other"]) == ["other"]
    out.put_array("prototypes", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    assert out.get_array("prototypes")[0].sum() == 276
    out.write_manifest([{"image_id": "2007_000032", "shape": (17, 23), "tags": [1, 5, 9], "seconds": 0.1}])
    t = out.manifest()
    assert t.column("image_id").to_pylist() == ["2007_000032"] and t.column("shape").to_pylist() == [[17, 23]]
    assert not out.is_complete()
    out.mark_complete({"miou": 0.5})
    # a second handle on the same store sees everything
    again = ArtifactStore(tmp_path / "s").stage("cam_infer", "abc123")
    assert again.is_complete() and again.summary()["miou"] == 0.5
    assert sorted(again.fields) == ["cam", "cam_low"]


def test_zero_size_and_variable_shapes(tmp_path):
    out = ArtifactStore(tmp_path / "s").stage("emb", "x").prepare(["emb"])
    out.write("a", {"emb": np.zeros((0, 8), np.float32)})
    out.write("b", {"emb": np.ones((3, 8), np.float32)})
    assert out.read("a", "emb")[0].shape == (0, 8)
    assert out.read("b", "emb")[0].shape == (3, 8)


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", "", "x\\y", ".hidden"])
def test_bad_ids_refused(tmp_path, bad):
    out = ArtifactStore(tmp_path / "s").stage("toy", "f").prepare(["m"])
    with pytest.raises(StoreError, match="invalid image id"):
        out.write(bad, {"m": np.zeros((2, 2), np.uint8)})
    assert not (tmp_path / "etc").exists()


def _run_writer(url, n, delay):
    return subprocess.Popen([sys.executable, str(HERE / "_store_writer.py"), str(url), str(n), str(delay)],
                            stdout=subprocess.PIPE, text=True, cwd=HERE, env={**os.environ, "PYTHONPATH": str(HERE)})


def _stored_bytes(root: Path) -> dict:
    """Chunk files and array metadata of the toy stage, keyed by relative path."""
    base = root / "toy" / "fp0"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and ("/c" in str(p.relative_to(base)) or p.name == "zarr.json")
            and not str(p.relative_to(base)).startswith(("manifest", "_complete"))}


def test_kill9_mid_stage_then_resume_recomputes_only_missing(tmp_path):
    n = 12
    url = tmp_path / "killed"
    p = _run_writer(url, n, 0.15)
    written = []
    deadline = time.time() + 60
    while len(written) < 4 and time.time() < deadline:
        line = p.stdout.readline()
        if line.startswith("wrote"):
            written.append(line.split()[1])
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert len(written) >= 4
    out = ArtifactStore(url).stage("toy", "fp0")
    assert not out.is_complete()
    done_before = [i for i in (f"img_{k:03d}" for k in range(n)) if out.is_done(i)]
    assert set(written) <= set(done_before) and len(done_before) < n

    p2 = _run_writer(url, n, 0.0)
    stdout, _ = p2.communicate(timeout=120)
    assert p2.returncode == 0, stdout
    recomputed = [ln.split()[1] for ln in stdout.splitlines() if ln.startswith("wrote")]
    assert set(recomputed) == {f"img_{k:03d}" for k in range(n)} - set(done_before)
    assert out.is_complete()

    p3 = _run_writer(tmp_path / "clean", n, 0.0)
    p3.communicate(timeout=120)
    assert _stored_bytes(url) == _stored_bytes(tmp_path / "clean")
    for k in range(n):
        got, _ = out.read(f"img_{k:03d}", "cam")
        assert np.array_equal(got, data_for(f"img_{k:03d}")["cam"])


def test_damaged_entries_detected_and_recomputed(tmp_path):
    url = tmp_path / "s"
    p = _run_writer(url, 5, 0.0)
    p.communicate(timeout=120)
    out = ArtifactStore(url).stage("toy", "fp0")
    base = url / "toy" / "fp0"
    # 1) flip bytes in a chunk file
    chunk = next(p for p in (base / "cam" / "img_001").iterdir() if p.name.startswith("c"))  # its one chunk, c.0.0.0
    raw = bytearray(chunk.read_bytes()); raw[-5] ^= 0xFF; chunk.write_bytes(bytes(raw))
    # 2) a half-written entry: data present, marker gone (as if killed before the marker)
    meta = base / "mask" / "img_003" / "zarr.json"
    meta.write_text(meta.read_text().replace("rca_crc32", "rca_other"))
    # 3) truncated metadata
    (base / "cam" / "img_004" / "zarr.json").write_text("{\"zarr_for")
    for image_id, field in [("img_001", "cam"), ("img_003", "mask"), ("img_004", "cam")]:
        with pytest.raises(DamagedEntryError, match=image_id):
            out.read(image_id, field)
    ids = [f"img_{k:03d}" for k in range(5)]
    assert out.pending(ids, verify=True) == ["img_001", "img_003", "img_004"]
    untouched = {i: out.read(i, "cam")[0].tobytes() for i in ("img_000", "img_002")}
    out.clear_complete()
    p = _run_writer(url, 5, 0.0)
    stdout, _ = p.communicate(timeout=120)
    assert sorted(ln.split()[1] for ln in stdout.splitlines() if ln.startswith("wrote")) == ["img_001", "img_003", "img_004"]
    assert out.pending(ids, verify=True) == []
    assert {i: out.read(i, "cam")[0].tobytes() for i in ("img_000", "img_002")} == untouched


def test_write_error_leaves_existing_entries(tmp_path):
    url = tmp_path / "s"
    out = ArtifactStore(url).stage("toy", "f").prepare(["m"])
    out.write("a", {"m": np.ones((4, 4), np.uint8)})
    # a plain file where image b's array directory must go: every write under it fails (even as root)
    (url / "toy" / "f" / "m" / "b").write_bytes(b"in the way")
    with pytest.raises(StoreError, match="toy/f/m/b"):
        out.write("b", {"m": np.ones((4, 4), np.uint8)})
    assert out.pending(["a", "b"], verify=True) == ["b"]
    assert np.array_equal(out.read("a", "m")[0], np.ones((4, 4), np.uint8))


def test_store_at_a_relative_path_reads_back_every_entry(tmp_path, monkeypatch):
    """A store opened with a relative path (a notebook's `ArtifactStore("runs/x")`) reads back what it wrote, the
    second entry of a field too (read with both files in one call, which fsspec keys by absolute path)."""
    monkeypatch.chdir(tmp_path)
    out = ArtifactStore("rel/store").stage("cam_infer", "fp").prepare(["cam"])
    arrays = {f"img{k}": np.full((2, 3, 4), k, np.uint8) for k in range(3)}
    for image_id, arr in arrays.items():
        out.write(image_id, {"cam": arr}, attrs={"classes": [1, 2]})
    for image_id, arr in arrays.items():
        got, attrs = out.read(image_id, "cam")
        assert np.array_equal(got, arr) and attrs == {"classes": [1, 2]}
    assert out.pending(list(arrays), verify=True) == []
