"""cam.source external: a folder of IRN-layout .npy CAMs (written here, as IRN's make_cam.py writes them) imported
into the store, checked file by file, then refined and scored by the same stages as RCA's CAMs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from rca_core.config import load_config
from rca_core.data import make_dataset
from rca_core.stages.cam_import import ExternalCamError
from rca_core.stages.local import run_stage
from rca_core.stages.planning import plan
from rca_core.store import ArtifactStore

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _irn_file(path, mask: np.ndarray, tags: list[int], k: int, **changes) -> None:
    """IRN's make_cam.py layout: {"keys": 0-based foreground indices, "cam": strided, "high_res": (K, H, W)}."""
    cams = []
    for c in tags:
        m = np.roll((mask == c).astype(np.float32), (k % 3 - 1, k % 5 - 2), (0, 1))
        m = ndimage.gaussian_filter(m, 2.0)
        cams.append(m / max(m.max(), 1e-6))
    high = np.stack(cams) if cams else np.zeros((0, *mask.shape), np.float32)
    obj = {"keys": np.array(tags, np.int64) - 1, "cam": high[:, ::4, ::4], "high_res": high, **changes}
    np.save(path, obj)


def test_external_cams_are_checked_imported_refined_and_scored(tmp_path):
    torch.set_num_threads(1)
    cams_dir = tmp_path / "irn_cams"
    cams_dir.mkdir()
    cfg = load_config(ROOT / "configs/tiny.yaml", {
        "store": str(tmp_path / "store"), "data": {"root": str(tmp_path / "data")},
        "cam": {"source": "external", "external": {"dir": str(cams_dir)}}})
    ds = make_dataset(cfg.data, cfg.data.train_split)
    ids = list(ds.ids)
    for k, i in enumerate(ids):
        _irn_file(cams_dir / f"{i}.npy", ds.mask(i), sorted(set(ds.tags(i))), k)
    # five bad files, each with its own fault
    bad = ids[:5]
    (cams_dir / f"{bad[0]}.npy").unlink()
    m1 = ds.mask(bad[1])
    tags1 = sorted(set(ds.tags(bad[1])))
    _irn_file(cams_dir / f"{bad[1]}.npy", m1, tags1, 0, keys=np.array([t for t in range(1, 4) if t not in tags1][:1]))
    _irn_file(cams_dir / f"{bad[2]}.npy", ds.mask(bad[2])[:-3], sorted(set(ds.tags(bad[2]))), 0)
    np.save(cams_dir / f"{bad[3]}.npy", {"keys": np.array(sorted(set(ds.tags(bad[3])))) - 1,
                                         "high_res": np.full((len(set(ds.tags(bad[3]))), *ds.size(bad[3])), np.nan)})
    (cams_dir / f"{bad[4]}.npy").write_bytes(b"this is not numpy")

    with pytest.raises(ExternalCamError) as e:
        run_stage("cam_import", cfg, show_progress=False)
    msg = str(e.value)
    assert f"cam_import: 5 of {len(ids)} CAM files in {cams_dir} are missing or bad" in msg, msg
    assert f"{cams_dir}/{bad[0]}.npy: file not found" in msg
    assert f"{cams_dir}/{bad[1]}.npy: its classes" in msg and "are not the image's tags" in msg
    assert f"{cams_dir}/{bad[2]}.npy: 'high_res' has shape" in msg and "(the image's size)" in msg
    assert f"{cams_dir}/{bad[3]}.npy: 'high_res' holds NaN or infinite values" in msg
    assert f"{cams_dir}/{bad[4]}.npy: not a readable .npy file" in msg
    store = ArtifactStore(cfg.store)
    out = store.stage("cam_import", plan(cfg)["cam_import"].fingerprint)
    assert not out.is_complete()
    assert all(out.is_done(i) for i in ids[5:]) and not any(out.is_done(i) for i in bad)  # nothing good is lost

    for k, i in enumerate(bad):  # mended: the re-run imports only these
        _irn_file(cams_dir / f"{i}.npy", ds.mask(i), sorted(set(ds.tags(i))), k)
    summary = run_stage("cam_import", cfg, show_progress=False)
    assert summary["recomputed_images"] == 5 and summary["images"] == len(ids)
    cam, attrs = out.read(ids[7], "cam")
    assert attrs["classes"] == sorted(set(ds.tags(ids[7]))) and cam.shape[1:] == tuple(ds.size(ids[7]))

    cam_eval = run_stage("cam_eval", cfg, show_progress=False)
    walk = run_stage("random_walk", cfg, show_progress=False)  # crf_labels -> affinity_train -> random_walk
    p = plan(cfg)
    assert p["random_walk"].roles["cams"] == "cam_import" and store.stage("random_walk", p["random_walk"].fingerprint).is_complete()
    print("cam_import -> cam_eval mIoU", cam_eval["miou"], "random_walk", walk["metrics"]["miou_all"])
    assert cam_eval["miou"] > 0.6, cam_eval  # CAMs made from the masks score high
    assert walk["metrics"]["miou_all"] > 0.5, walk["metrics"]


def test_a_file_is_read_in_its_own_key_order_and_checked_value_by_value():
    """CLIP-ES writes keys in annotation order: each CAM goes to its class, whatever the order; keys_base 1
    (class ids); values outside [0, 1] are refused."""
    from rca_core.stages.cam_import import check

    size = (4, 5)
    cams = np.stack([np.full(size, 0.25, np.float32), np.full(size, 0.75, np.float32)])
    out = check({"keys": np.array([2, 0]), "high_res": cams}, "x", [1, 3], size, "high_res", 0)
    assert np.allclose(out[0], 0.75) and np.allclose(out[1], 0.25)  # class 1 (key 0), then class 3 (key 2)
    out = check({"keys": np.array([3, 1]), "attn_highres": cams.astype(np.float16)}, "x", [1, 3], size,
                "attn_highres", 1)
    assert np.allclose(out[0], 0.75) and np.allclose(out[1], 0.25)
    with pytest.raises(ValueError, match=r"values run from 1 to 3; expected CAMs in \[0, 1\]"):
        check({"keys": np.array([0, 2]), "high_res": cams * 4}, "x", [1, 3], size, "high_res", 0)
    with pytest.raises(ValueError, match=r"no 'high_res' entry \(entries: \['cam', 'keys'\]"):
        check({"keys": np.array([0, 2]), "cam": cams}, "x", [1, 3], size, "high_res", 0)
