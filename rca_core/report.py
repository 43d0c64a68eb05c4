"""The run report: one HTML page (plus PNGs beside it) per run, read from the artifact store.

Sections: per-stage metrics and times; pseudo-mask quality under both protocols (CAM -> CRF ->
random walk) and the segmenter on val; per-class IoU bars; precision/recall; the CAM threshold
curve; training curves; a grid of sample images with CAM, CRF labels, pseudo-mask, segmenter
prediction and ground truth side by side.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

from rca_core.config import RunConfig
from rca_core.stages import registry
from rca_core.stages.planning import plan
from rca_core.store import ArtifactStore, StoreError

QUALITY_STAGES = [("cam_eval", "CAM (best threshold)"), ("crf_labels", "CRF labels"),
                  ("random_walk", "random-walk pseudo-masks"), ("seg_eval", "segmenter (val)")]
REPORT_AFTER = ("random_walk", "seg_eval")  # a pipeline run that makes pseudo-masks or scores the segmenter


def wanted(stages: list[str]) -> bool:
    """Whether a pipeline run of these stages ends with the report (its figures would be there to show)."""
    return any(n in stages for n in REPORT_AFTER)


def _summary(store: ArtifactStore, cfg: RunConfig, name: str) -> dict | None:
    out = store.stage(name, plan(cfg)[name].fingerprint)
    if not out.is_complete():
        return None
    s = out.summary()
    return {**s, **(s.get("metrics") or {})}  # the metrics' split and image count win over the stage's


def _table(store, cfg, name, table):
    try:
        return store.stage(name, plan(cfg)[name].fingerprint).read_table(table).to_pylist()
    except (StoreError, OSError, KeyError):
        return []


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return html.escape(str(v))


def _html_table(rows: list[dict], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _quality_rows(sums: dict) -> list[dict]:
    rows = []
    for name, label in QUALITY_STAGES:
        s = sums.get(name)
        if not s:
            continue
        rows.append({"step": label, "split": s.get("split"), "images": s.get("scored_images", s.get("images")),
                     "miou_all": s.get("miou_all", s.get("miou")),
                     "miou_confident": s.get("miou_confident"), "kept_fraction": s.get("kept_fraction"),
                     "precision": s.get("precision"), "recall": s.get("recall"),
                     "threshold": s.get("best_threshold")})
        if name == "seg_eval" and s.get("miou_single_scale") not in (None, s.get("miou")):
            rows.append({"step": "segmenter (val, single scale, no flip, no CRF)", "split": s.get("split"),
                         "images": s.get("scored_images"), "miou_all": s.get("miou_single_scale")})
    return rows


def _per_class(sums: dict) -> dict[str, dict[str, float]]:
    out = {}
    for name, label in QUALITY_STAGES:
        s = sums.get(name) or {}
        iou = s.get("iou_all") or s.get("iou")
        if isinstance(iou, dict):
            out[label] = {k: v for k, v in iou.items() if v is not None}
    return out


def _bar_chart(per_class: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = list(dict.fromkeys(c for d in per_class.values() for c in d))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(classes) + 2), 3.6))
    w = 0.8 / max(1, len(per_class))
    for k, (label, d) in enumerate(per_class.items()):
        ax.bar(np.arange(len(classes)) + k * w, [d.get(c, 0) for c in classes], w, label=label)
    ax.set_xticks(np.arange(len(classes)) + 0.4 - w / 2, classes, rotation=30, ha="right")
    ax.set_ylabel("IoU"); ax.set_ylim(0, 1); ax.legend(fontsize=8); ax.grid(axis="y", alpha=0.3)
    ax.set_title("Per-class IoU")
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def _curves(histories: dict[str, list[dict]], cam_curve: list[dict], path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, h) for n, h in histories.items() if h]
    if cam_curve:
        panels.append(("cam_eval", cam_curve))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels):
        if name == "cam_eval":
            ax.plot([r["threshold"] for r in rows], [r["miou"] for r in rows], marker="o")
            ax.set_xlabel("background threshold"); ax.set_ylabel("CAM mIoU"); ax.set_title("CAM threshold sweep")
        else:
            x = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
            for key in ("loss", "loss_cls", "loss_sc", "map", "val_miou"):
                ys = [r.get(key) for r in rows]
                if any(isinstance(y, (int, float)) for y in ys):
                    ax.plot(x, [y if isinstance(y, (int, float)) else np.nan for y in ys], marker=".", label=key)
            ax.set_xlabel("epoch"); ax.set_title(f"{name} training"); ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)
    return True


def _cam_rgb(cam: np.ndarray, shape) -> np.ndarray:
    import matplotlib
    from rca_core.cam_ops import decode_cam

    m = decode_cam(cam).max(0) if cam.size else np.zeros(shape, np.float32)
    return (matplotlib.colormaps["jet"](np.clip(m, 0, 1))[..., :3] * 255).astype(np.uint8)


def _sample_grid(store: ArtifactStore, cfg: RunConfig, path: Path, n: int = 6) -> list[str] | None:
    """Rows: image | CAM | CRF labels | pseudo-mask | segmenter | ground truth (train split samples)."""
    from PIL import Image

    from rca_core.data import make_dataset
    from rca_core.data.palette import colourise

    plans = plan(cfg)
    cams = plans["crf_labels"].roles["cams"]  # the stage whose CAMs the refinement reads
    stage = {k: store.stage(k, plans[k].fingerprint) for k in ("crf_labels", "random_walk", "seg_train")}
    stage["cams"] = store.stage(cams, plans[cams].fingerprint)
    if not stage["cams"].is_complete():
        return None
    ds = make_dataset(cfg.data, plans[cams].split, storage_options=cfg.storage)
    ids = [i for i in ds.ids if stage["cams"].is_done(i)][:n]
    if not ids:
        return None
    model = None
    from rca_core.stages.seg_train import MODEL_FILE

    if stage["seg_train"].is_complete() and stage["seg_train"].has_file(MODEL_FILE):
        from rca_core.predict import Predictor, load_segmenter

        net, meta = load_segmenter(stage["seg_train"].file(MODEL_FILE), "cpu")
        model = Predictor(net, meta, "cpu", (1.0,), False)
    cols = ["image", "CAM", "CRF labels", "pseudo-mask", "segmenter", "ground truth"]
    rows = []
    for i in ids:
        img = ds.image(i)
        h, w = img.shape[:2]
        blank = np.full((h, w, 3), 255, np.uint8)
        tiles = [img, _cam_rgb(stage["cams"].read(i, "cam")[0], (h, w))]
        for key, field in (("crf_labels", "crf_label"), ("random_walk", "pseudo_mask")):
            tiles.append(colourise(stage[key].read(i, field)[0]) if stage[key].is_done(i) else blank)
        tiles.append(colourise(model.predict(img[None])[0]) if model is not None else blank)
        tiles.append(colourise(ds.mask(i)) if getattr(ds, "has_mask", lambda _: True)(i) else blank)
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows], 0)
    scale = max(1, 160 // max(1, rows[0].shape[0]))
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return cols


def default_location(cfg: RunConfig) -> str:
    """Where a run's report goes: next to a local store (<store>/../report), inside a remote one (<store>/_report)."""
    from rca_core import storage

    if storage.is_url(cfg.store):
        return storage.join(cfg.store, "_report")
    return str(Path(storage.local_path(cfg.store)).parent / "report")


def write_report(store_url: str, out_dir: str | Path, config: RunConfig) -> str | Path:
    """Write the HTML report (index.html + PNGs + summary.json) to `out_dir`, a local folder or a URL
    (written through the I/O layer: a report of a bucket store lands in the bucket). Returns its index.html."""
    from rca_core import storage

    if storage.is_url(str(out_dir)):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="rca-report-") as tmp:
            write_report(store_url, tmp, config)
            storage.upload_tree(tmp, str(out_dir), config.storage)
        return storage.join(str(out_dir), "index.html")
    cfg = config
    store = ArtifactStore(store_url, cfg.storage, create=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sums = {s.name: _summary(store, cfg, s.name) for s in registry.active(cfg)}
    plans = plan(cfg)
    stage_rows = [{"stage": n, "status": "complete" if s else "missing",
                   "seconds": (s or {}).get("seconds"), "key": plans[n].key,
                   "metric": (s or {}).get("miou_all", (s or {}).get("miou", (s or {}).get("final_map")))}
                  for n, s in sums.items()]
    parts = [f"<h1>RCA run <code>{html.escape(cfg.name)}</code></h1>",
             f"<p>config fingerprint <code>{cfg.fingerprint()}</code>, store <code>{html.escape(store_url)}</code>, "
             f"written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Data: {html.escape(cfg.data.kind)} "
             f"({cfg.data.num_classes} classes incl. background).</p>",
             "<h2>Stages</h2>", _html_table(stage_rows, ["stage", "status", "seconds", "metric", "key"])]
    q = _quality_rows(sums)
    if q:
        parts += ["<h2>Quality at each step</h2>",
                  "<p>mIoU over all pixels (an uncertain 255 counts as background) and over confident pixels only "
                  "(255 dropped; <i>kept_fraction</i> = share of pixels kept). Pseudo-mask steps are scored on the "
                  f"<code>{html.escape(cfg.data.eval_split)}</code> split, the segmenter on "
                  f"<code>{html.escape(cfg.data.val_split)}</code>.</p>",
                  _html_table(q, ["step", "split", "images", "miou_all", "miou_confident", "kept_fraction", "precision",
                                  "recall", "threshold"])]
    pc = _per_class(sums)
    if pc:
        _bar_chart(pc, out_dir / "per_class_iou.png")
        parts += ["<h2>Per-class IoU</h2>", '<img src="per_class_iou.png" alt="per-class IoU">']
        classes = list(dict.fromkeys(c for d in pc.values() for c in d))
        parts.append(_html_table([{"class": c, **{k: d.get(c) for k, d in pc.items()}} for c in classes],
                                 ["class", *pc]))
    for name, label in (("seg_eval", "Segmenter (val)"), ("cam_eval", "CAM")):
        rows = _table(store, cfg, name, "per_class")
        if rows:
            parts += [f"<h3>Precision and recall per class: {label}</h3>",
                      _html_table(rows, ["class", "iou", "precision", "recall"])]
    histories = {r.name: _table(store, cfg, r.name, "history") for r in registry.by_kind("training")}
    if not histories.get("seg_train"):  # seg_train outputs written before its table was named "history" (same key)
        histories["seg_train"] = _table(store, cfg, "seg_train", "epochs")
    if _curves(histories, _table(store, cfg, "cam_eval", "curve"), out_dir / "curves.png"):
        parts += ["<h2>Training curves and CAM threshold sweep</h2>", '<img src="curves.png" alt="training curves">']
    cols = _sample_grid(store, cfg, out_dir / "samples.png")
    if cols:
        parts += ["<h2>Samples</h2>", "<p>Columns: " + ", ".join(cols) + ".</p>",
                  '<img src="samples.png" alt="sample grid" class="grid">']
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>RCA run report</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
            "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right;font-size:14px}th{background:#f0f0f0}td:first-child{text-align:left}"
            "img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}img.grid{image-rendering:pixelated}"
            "code{background:#f4f4f4;padding:0 3px}</style></head><body>" + "\n".join(parts) + "</body></html>")
    path = out_dir / "index.html"
    path.write_text(page)
    (out_dir / "summary.json").write_text(json.dumps({n: s for n, s in sums.items()}, default=str, indent=1))
    return path
