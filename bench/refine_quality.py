"""Pseudo-mask quality along the refinement chain: raw CAM -> CRF labels -> random-walk pseudo-masks.

For the eval split (data.eval_split; only ids that the train-split stages processed), each step is scored
against the ground truth under both protocols of method.md section 7 ("all": 255 counts as background;
"confident": 255 dropped), with mean precision / recall over classes and the kept fraction, plus the
time per image of the CRF and the random walk (from the stages' manifests: the stage's own per-image time).
- Raw CAM: argmax of [t ; CAMs] with the background threshold t swept over cam_eval.thresholds; the best t
  (by mIoU) is reported, as IRN/PSA report CAM quality.
- CRF: the confident crf_label map (stage crf_labels). Under "all" it equals the low-alpha CRF.
- Random walk: the pseudo_mask (stage random_walk).

CAMs: by default the real CAMs of the pipeline (rca_core.stages.run_stage runs cam_train .. random_walk,
reusing whatever is complete in the store). `--noisy-cams` uses CAMs made from the ground-truth masks
(shifted, blurred, partly missing, with spurious blobs) in a stage key of their own, and runs
crf_labels / affinity_train / random_walk on them (keys derived from the real ones + the noise).
Artifacts of an earlier run of the same config are reused.

    python bench/refine_quality.py --config configs/demo.yaml --json OUT.json [--noisy-cams]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import goal, report  # noqa: E402

from rca_core.config import fingerprint, load_config, parse_overrides  # noqa: E402
from rca_core.metrics import PseudoMaskScore  # noqa: E402
from rca_core.stages import (StagePlan, data_identity, make_context, plan, run_planned_stage,  # noqa: E402
                             run_stage, stage_plan)
from rca_core.store import ArtifactStore  # noqa: E402

REFINE = ("crf_labels", "affinity_train", "random_walk")
NOISE = {"shift": 0.06, "blur": 0.06, "drop": 0.7, "spurious": 0.5, "spurious_rate": 0.004, "version": 1}


# ----------------------------------------------------------------------------- noisy CAMs
def noisy_cams(mask: np.ndarray, tags: list[int], rng: np.random.Generator, p: dict = NOISE) -> np.ndarray:
    """(K, H, W) float32 CAMs in [0, 1] from a ground-truth mask: per class the mask, shifted by up to
    p['shift'] of the side, multiplied by a smooth random field (parts fade out, p['drop']), plus faint
    spurious blobs elsewhere (p['spurious']), Gaussian-blurred (sigma p['blur'] of the side), max-normalised."""
    from scipy import ndimage

    h, w = mask.shape
    s = max(h, w)
    out = []
    for c in tags:
        m = (mask == c).astype(np.float32)
        k = int(p["shift"] * s)
        dy, dx = rng.integers(-k, k + 1, 2)
        m = np.roll(m, (int(dy), int(dx)), (0, 1))
        field = ndimage.gaussian_filter(rng.random((h, w)).astype(np.float32), s * 0.08)
        field = (field - field.min()) / (field.max() - field.min() + 1e-6)
        m = m * np.clip(1 - p["drop"] + 2 * p["drop"] * field, 0, 1) ** 2
        sp = ndimage.gaussian_filter((rng.random((h, w)) < p["spurious_rate"]).astype(np.float32), s * 0.04)
        m = m + p["spurious"] * sp / (sp.max() + 1e-6)
        m = ndimage.gaussian_filter(m, p["blur"] * s)
        out.append(m / (m.max() + 1e-6))
    return np.stack(out).astype(np.float32) if out else np.zeros((0, h, w), np.float32)


def noisy_plans(cfg, cam_fp: str | None = None) -> dict[str, StagePlan]:
    """The real plan with cam_infer replaced by the noisy-CAM stage (or the cam_infer output `cam_fp`); the
    refinement keys are computed by rca_core.stages.stage_plan from those CAMs."""
    real = plan(cfg)
    cam_fp = cam_fp or "noisy-" + fingerprint("noisy_cams", NOISE, data_identity(cfg), cfg.seed)
    plans = dict(real)
    plans["cam_infer"] = StagePlan("cam_infer", cam_fp, {}, real["cam_infer"].split, real["cam_infer"].module)
    for name in REFINE:
        plans[name] = stage_plan(name, cfg, {i: plans[i].fingerprint for i in real[name].inputs})
    return plans


def write_noisy_cams(cfg, store: ArtifactStore, plans: dict[str, StagePlan]) -> None:
    from tqdm.auto import tqdm

    ctx = make_context("cam_infer", cfg, store, plans)
    if ctx.out.is_complete():
        return
    ctx.out.prepare(["cam"])
    for k, i in enumerate(tqdm(ctx.ids, desc="noisy CAMs", leave=False)):
        tags = sorted(int(t) for t in ctx.dataset.tags(i))
        cams = noisy_cams(ctx.dataset.mask(i), tags, np.random.default_rng([cfg.seed, k]))
        ctx.out.write(i, {"cam": cams.astype(np.float16)}, attrs={"classes": tags})
    ctx.out.mark_complete({"images": len(ctx.ids), "noise": NOISE})


def run_planned(name: str, cfg, store: ArtifactStore, plans: dict[str, StagePlan]) -> dict:
    """Run one stage with the given plan unless complete (rca_core.stages.run_planned_stage)."""
    out = store.stage(name, plans[name].fingerprint)
    return out.summary() if out.is_complete() else run_planned_stage(name, cfg, store, plans)


# ----------------------------------------------------------------------------- scoring
KEYS = ("miou_all", "miou_confident", "kept_fraction", "precision", "recall")


def _pick(res: dict) -> dict:
    return {k: res[k] for k in KEYS} | {"iou_all": res["all"]["iou"]}


def score_cams(cam_out, ds, ids, num_classes, names, thresholds) -> dict:
    scores = {t: PseudoMaskScore(num_classes, names) for t in thresholds}
    for i in ids:
        cam, attrs = cam_out.read(i, "cam")
        cam = cam.astype(np.float32)
        gt = ds.mask(i)
        keys = np.asarray([0] + [int(c) for c in attrs["classes"]])
        best = cam.max(0) if cam.shape[0] else np.zeros(gt.shape, np.float32)
        arg = cam.argmax(0) + 1 if cam.shape[0] else np.zeros(gt.shape, np.int64)
        for t, s in scores.items():
            s.update(keys[np.where(best > t, arg, 0)].astype(np.uint8), gt)
    results = {t: s.compute() for t, s in scores.items()}
    t_best = max(results, key=lambda t: results[t]["miou_all"])
    return _pick(results[t_best]) | {"bg_threshold": t_best,
                                      "miou_by_threshold": {str(t): r["miou_all"] for t, r in results.items()}}


def score_field(out, field, ds, ids, num_classes, names) -> dict:
    s = PseudoMaskScore(num_classes, names)
    for i in ids:
        pred, _ = out.read(i, field)
        s.update(pred, ds.mask(i))
    return _pick(s.compute())


def seconds_per_image(out) -> float | None:
    t = out.manifest()
    if "seconds" not in t.column_names or t.num_rows == 0:
        return None
    return float(np.mean(t.column("seconds").to_numpy(zero_copy_only=False)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--noisy-cams", action="store_true", help="CAMs made from the ground-truth masks with noise")
    ap.add_argument("--cam-key", metavar="FINGERPRINT",
                    help="use the complete cam_infer/FINGERPRINT of the store (e.g. CAMs of an earlier code version)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. refine.random_walk.logt=6")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: compute.threads or 1)")
    ap.add_argument("--no-doc", action="store_true", help="do not append the table to docs/benchmarks.md")
    args = ap.parse_args(argv)

    import torch

    from rca_core.data import make_dataset

    cfg = load_config(args.config, parse_overrides(args.set) if args.set else None)
    torch.set_num_threads(args.threads or cfg.compute.threads or 1)
    store = ArtifactStore(cfg.store)
    if args.noisy_cams or args.cam_key:
        plans = noisy_plans(cfg, args.cam_key)
        if args.cam_key:
            if not store.stage("cam_infer", args.cam_key).is_complete():
                raise SystemExit(f"cam_infer/{args.cam_key} is not complete in {store.url}")
        else:
            write_noisy_cams(cfg, store, plans)
        for name in REFINE:
            run_planned(name, cfg, store, plans)
    else:
        plans = plan(cfg)
        run_stage("random_walk", cfg, store)
    outs = {n: store.stage(n, plans[n].fingerprint) for n in ("cam_infer",) + REFINE}

    ds = make_dataset(cfg.data, cfg.data.eval_split)
    done = set(outs["random_walk"].listed_ids())
    ids = [i for i in ds.ids if i in done and ds.has_mask(i)]
    if not ids:
        raise SystemExit(f"no image of split {cfg.data.eval_split!r} has a mask and a pseudo-mask in {store.url}")
    nc, names = cfg.data.num_classes, ds.class_names
    result = {
        "cam": score_cams(outs["cam_infer"], ds, ids, nc, names, cfg.cam_eval.thresholds),
        "crf": score_field(outs["crf_labels"], "crf_label", ds, ids, nc, names)
        | {"seconds_per_image": seconds_per_image(outs["crf_labels"])},
        "random_walk": score_field(outs["random_walk"], "pseudo_mask", ds, ids, nc, names)
        | {"seconds_per_image": seconds_per_image(outs["random_walk"])},
    }
    aff = outs["affinity_train"].summary()
    result["affinity_train"] = {k: aff.get(k) for k in ("steps", "epochs", "train_seconds", "final_loss")}
    result["setup"] = {"config": args.config, "overrides": args.set, "cams": "noisy (from masks)" if args.noisy_cams
                       else f"CAM stage ({'cam_infer/' + args.cam_key if args.cam_key else 'this config'})", "split": cfg.data.eval_split, "images": len(ids),
                       "stage_keys": {n: o.key for n, o in outs.items()}}
    result["goal_crf_beats_cam"] = goal("CRF labels beat raw CAMs (mIoU, all pixels)",
                                        f"{result['crf']['miou_all']:.3f} vs {result['cam']['miou_all']:.3f}",
                                        result["crf"]["miou_all"] > result["cam"]["miou_all"])
    result["goal_rw_beats_crf"] = goal("random walk beats CRF labels (mIoU, all pixels)",
                                       f"{result['random_walk']['miou_all']:.3f} vs {result['crf']['miou_all']:.3f}",
                                       result["random_walk"]["miou_all"] > result["crf"]["miou_all"])
    rows = [{"step": n, **{k: result[n][k] for k in KEYS}, "s/img": result[n].get("seconds_per_image")}
            for n in ("cam", "crf", "random_walk")]
    title = f"Refinement quality ({'noisy CAMs from masks' if args.noisy_cams else 'CAMs of the CAM stage'}, " \
            f"{cfg.name}, {cfg.data.eval_split} split, {len(ids)} images)"
    notes = (f"CAM row: best background threshold {result['cam']['bg_threshold']}. s/img: the stage's own time per "
             f"image (CRF: two dense CRFs; random walk: AffinityNet forward + walk), one thread. AffinityNet: "
             f"{result['affinity_train']['steps']} steps, {result['affinity_train']['train_seconds'] or 0:.0f} s.")
    report(title, rows, result, args.json, notes=notes, append=not args.no_doc)
    return result


if __name__ == "__main__":
    main()
