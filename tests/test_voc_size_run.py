"""configs/voc12.yaml through every stage at PASCAL VOC size, as a user runs it.

The test writes a VOC-layout tree of 30 images at 500x375 and 375x500 with all 21 class ids (masks in
both VOC flavours: SegmentationClass palette PNGs and SegmentationClassAug grey PNGs; some images in
both, some in one), and random-init ResNet-50/101 weight files where the ImageNet ones would be, then
runs `rca run -c <checkout>/configs/voc12.yaml --set ...` in a subprocess from a working directory
outside the checkout, against the session's Prefect server. The config's own relative paths
(data/VOC2012, weights/, runs/voc12/store) resolve against that directory. Only budgets are reduced
through --set (epochs, batches, image counts, crop sizes, inference scales, worker count for 2 cores);
the recipe (frozen BatchNorm and stages, OS16/OS8 backbones, IRN's frozen AffinityNet backbone,
DeepLab-v2 with frozen BatchNorm, multi-scale + flip + CRF evaluation) is the config's.

Random-init weights: torchvision's initialisation, with every BatchNorm's running statistics measured
on the randomly initialised network (train-mode passes over some of the tree's images). ImageNet weights have
statistics that fit their activations; a random init's (mean 0, var 1) do not, and with frozen
BatchNorm a random ResNet-50's features grow ~50x through the stages and the CAM loss is NaN after 2
SGD steps at the recipe's lr (measured), which is not what the recipe meets on real weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

N_CLASSES = 21


# ----------------------------------------------------------------------------- the tree
def _draw_image(rng: np.random.Generator, size: tuple[int, int], classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) uint8 mask: textured background, one ellipse or box per class,
    a 255 band on every object boundary (as VOC's)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(40, 200, 3)
    img = (base[None, None, :] + 30 * np.sin(xx[..., None] / rng.uniform(7, 23) + rng.uniform(0, 6, 3))
           + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    pil_img, pil_mask = Image.fromarray(img), Image.fromarray(mask)
    di, dm = ImageDraw.Draw(pil_img), ImageDraw.Draw(pil_mask)
    for c in classes:
        bw, bh = int(rng.uniform(0.25, 0.55) * w), int(rng.uniform(0.25, 0.55) * h)
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        box = [x0, y0, x0 + bw, y0 + bh]
        colour = tuple(int(v) for v in (37 * c % 256, 91 * c % 256, 53 * c % 256))
        shape = di.ellipse if c % 2 else di.rectangle
        shape(box, fill=colour)
        (dm.ellipse if c % 2 else dm.rectangle)(box, fill=255)
        inner = [box[0] + 3, box[1] + 3, box[2] - 3, box[3] - 3]
        (dm.ellipse if c % 2 else dm.rectangle)(inner, fill=c)
    return np.asarray(pil_img), np.asarray(pil_mask)


def write_voc_tree(root: Path, n_val: int = 6, n_train: int = 10, n_sbd: int = 14, seed: int = 0) -> dict:
    """A VOC 2012 + SBD layout under root: JPEGImages, SegmentationClass (palette PNGs: the VOC images, train +
    val), SegmentationClassAug (grey PNGs: train_aug, i.e. VOC train + the SBD-only images; val too),
    ImageSets/Segmentation/{train,val,train_aug}.txt. Sizes alternate 500x375 / 375x500; every class id
    1..20 occurs. Returns the split lists."""
    from rca_core.data.palette import PALETTE

    rng = np.random.default_rng(seed)
    for d in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    splits = {"val": [f"2008_{i:06d}" for i in range(n_val)],
              "train": [f"2007_{i:06d}" for i in range(n_train)],
              "sbd": [f"2009_{i:06d}" for i in range(n_sbd)]}
    k = 0
    for split, ids in splits.items():
        for j, image_id in enumerate(ids):
            size = (500, 375) if k % 2 == 0 else (375, 500)
            classes = sorted({1 + (k % 20), 1 + ((7 * k + 3) % 20)} if k % 3 else {1 + (k % 20)})
            img, mask = _draw_image(rng, size, classes)
            Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
            if split in ("train", "val"):  # VOC images: palette PNG
                p = Image.fromarray(mask, mode="P")
                p.putpalette(PALETTE.reshape(-1).tolist())
                p.save(root / "SegmentationClass" / f"{image_id}.png")
            if split != "val" or j % 2 == 0:  # SBD-augmented set: grey PNG (half of val has only the palette one)
                Image.fromarray(mask, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
            k += 1
    lists = {"train": splits["train"], "val": splits["val"], "train_aug": splits["train"] + splits["sbd"]}
    for name, ids in lists.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return lists


def write_random_init_weights(path: Path, depth: int, images: list[Path], seed: int = 0) -> None:
    """torchvision ResNet-`depth` state dict at its random initialisation, BatchNorm running statistics
    measured on that network (cumulative average over train-mode passes of `images`, ImageNet-normalised,
    at half size)."""
    import torch
    import torchvision

    from rca_core.cam_ops import normalize_image

    torch.manual_seed(seed)
    net = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}[depth](weights=None)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative moving average
    net.train()
    batch = [torch.from_numpy(normalize_image(np.asarray(Image.open(p).convert("RGB").resize((250, 188)))))
             for p in images if Image.open(p).size == (500, 375)]
    with torch.no_grad():
        for k in range(0, len(batch), 4):
            net(torch.stack(batch[k:k + 4]))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)


# ----------------------------------------------------------------------------- the run
# Budgets only: 2 images per split (the first two of train_aug, train and val; val's second has only a
# palette mask, so the run reads both flavours), one optimizer step per training stage (global batch 2 = 1 per
# worker) at small crops, inference at small scales, 2 Ray workers for the 2 cores. The rest is voc12.yaml.
REDUCED = [
    "data.max_images=2",
    "cam.train.epochs=1", "cam.train.batch_size=2", "cam.train.crop_size=160", "cam.train.num_workers=0",
    "cam.memory.size=8", "cam.aggregation.prototypes_per_class=2",
    "cam_infer.scales=[0.5]",
    "refine.affinity.epochs=1", "refine.affinity.batch_size=2", "refine.affinity.crop_size=160",
    "segmenter.epochs=1", "segmenter.batch_size=2", "segmenter.crop_size=161",
    "segmenter.eval_scales=[0.5,0.75]",
    "ray.num_workers=2", "ray.shard_size=1",
]


@pytest.fixture(scope="module")
def voc_run(prefect_server, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("voc_user")  # not the checkout
    lists = write_voc_tree(cwd / "data" / "VOC2012")
    calib = sorted((cwd / "data" / "VOC2012" / "JPEGImages").glob("*.jpg"))[:8]
    write_random_init_weights(cwd / "weights" / "resnet50-imagenet.pth", 50, calib)
    write_random_init_weights(cwd / "weights" / "resnet101-imagenet.pth", 101, calib)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RCA_NO_PROGRESS": "1"}
    cmd = [str(Path(sys.executable).with_name("rca")), "run", "-c", str(ROOT / "configs" / "voc12.yaml")]
    for s in REDUCED:
        cmd += ["--set", s]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    print(f"rca run of configs/voc12.yaml at VOC size: {time.time() - t0:.0f} s")
    print("\n".join(ln for ln in r.stdout.splitlines() if " ran " in ln or "Ray" in ln or "Prefect" in ln))
    return {"cwd": cwd, "lists": lists, "rc": r.returncode, "out": r.stdout + r.stderr}


def test_every_stage_of_voc12_completes_at_voc_size(voc_run):
    assert voc_run["rc"] == 0, voc_run["out"][-6000:]
    import yaml

    from rca_core.config import config_from_dict
    from rca_core.store import ArtifactStore
    store_dir = voc_run["cwd"] / "runs" / "voc12" / "store"  # the config's relative store, under the user's cwd
    (record,) = list((store_dir / "_runs").glob("*/run.json"))  # the run's stage keys, as `rca run` recorded them
    keys = json.loads(record.read_text())["stages"]
    cfg = config_from_dict(yaml.safe_load((record.parent / "config.yaml").read_text()))
    assert cfg.data.root == str(voc_run["cwd"] / "data" / "VOC2012")  # resolved against the working directory
    assert cfg.cam.backbone.pretrained == str(voc_run["cwd"] / "weights" / "resnet50-imagenet.pth")
    store = ArtifactStore(str(store_dir), create=False)
    summaries = {}
    assert list(keys) == ["cam_train", "memory_build", "cam_infer", "cam_eval", "crf_labels", "affinity_train",
                          "random_walk", "seg_train", "seg_eval"]
    for name in keys:
        out = store.stage(*keys[name].split("/"))
        assert out.is_complete(), (name, voc_run["out"][-3000:])
        summaries[name] = out.summary()
    # the recipe ran as configured: global batches, frozen parts, multi-scale + flip + CRF evaluation
    assert summaries["cam_train"]["global_batch"] == 2 and summaries["cam_train"]["per_rank_batch"] == 1
    assert summaries["cam_train"]["train_workers"] == 2 and summaries["cam_train"]["steps"] == 1
    assert summaries["affinity_train"]["global_batch"] == 2 and summaries["affinity_train"]["steps"] == 1
    assert summaries["seg_train"]["global_batch"] == 2 and summaries["seg_train"]["freeze_bn"] is True
    assert np.isfinite(summaries["cam_train"]["final_loss"]) and np.isfinite(summaries["seg_train"]["final_loss"])
    # what trained: the CAM net without conv1 + stages 1-2 (IRN), AffinityNet's head only (IRN's frozen backbone)
    from rca_core.models.affinity_net import AffinityNet
    from rca_core.models.cam_net import CamNet

    def no_weights(bb):
        return bb.model_copy(update={"pretrained": None})

    cam = CamNet(cfg.cam.model_copy(update={"backbone": no_weights(cfg.cam.backbone)}), N_CLASSES)
    bb = cam.backbone
    frozen = sum(p.numel() for m in (bb.conv1, bb.bn1, bb.layer1, bb.layer2) for p in m.parameters())
    assert frozen > 1_000_000  # conv1 + layer1-2 of ResNet-50 (their BatchNorm are buffers now)
    n_all = sum(p.numel() for p in cam.parameters())
    assert summaries["cam_train"]["trainable_parameters"] == n_all - frozen
    aff = AffinityNet(cfg.refine.affinity.model_copy(update={"backbone": no_weights(cfg.refine.affinity.backbone)}))
    head = sum(p.numel() for n, p in aff.named_parameters() if not n.startswith("backbone."))
    assert summaries["affinity_train"]["trainable_parameters"] == head
    ev = summaries["seg_eval"]
    assert ev["eval_scales"] == [0.5, 0.75] and ev["eval_flip"] is True and ev["eval_crf"] is True
    assert ev["scored_images"] == 2
    assert 0.0 <= ev["miou"] <= 1.0 and 0.0 <= summaries["cam_eval"]["miou"] <= 1.0


@pytest.fixture(scope="module")
def voc_clip_run(voc_run, prefect_server):
    """configs/voc12_clip.yaml on the same tree, random CLIP weights, to the pseudo-masks (and the CAM score):
    `rca run --stage cam_eval --stage random_walk` (the segmenter after them is voc12's, run above), one
    training worker (two-worker training at VOC size is the voc12 run's)."""
    cwd = voc_run["cwd"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RCA_NO_PROGRESS": "1"}
    cmd = [str(Path(sys.executable).with_name("rca")), "run", "-c", str(ROOT / "configs" / "voc12_clip.yaml"),
           "--stage", "cam_eval", "--stage", "random_walk", "--set", "cam.clip.weights=random"]
    for s in REDUCED:
        if s.startswith(("data.", "refine.", "ray.")):
            cmd += ["--set", s]
    cmd += ["--set", "ray.num_workers=1"]  # AffinityNet on one worker (the voc12 run above trains on two)
    t0 = time.time()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    print(f"rca run of configs/voc12_clip.yaml to the pseudo-masks at VOC size: {time.time() - t0:.0f} s")
    return {"cwd": cwd, "rc": r.returncode, "out": r.stdout + r.stderr}


def test_clip_source_at_voc_size(voc_clip_run):
    assert voc_clip_run["rc"] == 0, voc_clip_run["out"][-6000:]
    import yaml

    from rca_core.config import config_from_dict
    from rca_core.data.voc import VOCDataset
    from rca_core.store import ArtifactStore

    out = voc_clip_run["out"]
    assert "note: cam.clip.weights is 'random'" in out and "mean nothing" in out
    store_dir = voc_clip_run["cwd"] / "runs" / "voc12_clip" / "store"
    (record,) = list((store_dir / "_runs").glob("*/run.json"))
    keys = json.loads(record.read_text())["stages"]
    cfg = config_from_dict(yaml.safe_load((record.parent / "config.yaml").read_text()))
    assert cfg.cam.source == "clip" and list(keys)[0] == "clip_cam" and "cam_train" not in keys
    store = ArtifactStore(str(store_dir), create=False)
    for name in ("clip_cam", "cam_eval", "crf_labels", "affinity_train", "random_walk"):
        assert store.stage(*keys[name].split("/")).is_complete(), (name, out[-3000:])
    cams, walk = store.stage(*keys["clip_cam"].split("/")), store.stage(*keys["random_walk"].split("/"))
    assert cams.summary()["weights"] == "random"
    ds = VOCDataset(cfg.data.root, split=cfg.data.train_split, num_classes=N_CLASSES)
    for i in ds.ids[:2]:
        cam, attrs = cams.read(i, "cam")
        assert cam.shape == (len(set(ds.tags(i))), *ds.size(i)) and attrs["classes"] == sorted(set(ds.tags(i)))
        mask, _ = walk.read(i, "pseudo_mask")
        assert mask.shape == tuple(ds.size(i)) and set(np.unique(mask)) <= {0, 255, *attrs["classes"]}


def test_voc_tree_has_both_mask_flavours_and_voc_sizes(voc_run):
    from rca_core.data.voc import VOCDataset

    root = voc_run["cwd"] / "data" / "VOC2012"
    seen = set()
    for split in ("train_aug", "val"):
        ds = VOCDataset(root, split=split, num_classes=N_CLASSES)
        for i in ds.ids:
            assert ds.size(i) in ((375, 500), (500, 375))
            m = ds.mask(i)
            seen |= set(np.unique(m).tolist())
    assert seen == set(range(N_CLASSES)) | {255}
    pal = list((root / "SegmentationClass").glob("*.png"))
    grey = list((root / "SegmentationClassAug").glob("*.png"))
    assert pal and grey
    with Image.open(pal[0]) as a, Image.open(grey[0]) as b:
        assert a.mode == "P" and b.mode == "L"
    only_palette = {p.stem for p in pal} - {p.stem for p in grey}
    assert only_palette and set(voc_run["lists"]["val"]) >= only_palette
