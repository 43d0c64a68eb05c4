"""Data sets in VOC layout: the reader, the demo generator, COCO conversion, tree checks, the palette."""
from __future__ import annotations

from rca_core.config.data import DataConfig

from .voc import DataError, VOCDataset


def make_dataset(data_cfg: DataConfig, split: str, *, progress: bool = True, generate: bool = True,
                 storage_options=None) -> VOCDataset:
    """The VOCDataset of `split` described by the config (the demo tree is generated on demand by the
    driver; workers pass generate=False). data.root may be a local path or a URL."""
    root = data_cfg.root
    if data_cfg.kind == "demo":
        from .demo import ensure_demo

        root = ensure_demo(data_cfg, progress=progress, generate=generate, storage_options=storage_options)
    return VOCDataset(root, split=split, num_classes=data_cfg.num_classes, class_names=data_cfg.class_names,
                      mask_dir=data_cfg.mask_dir, labels_file=data_cfg.labels_file,
                      max_images=data_cfg.max_images, storage_options=storage_options)


__all__ = ["make_dataset", "VOCDataset", "DataError"]
