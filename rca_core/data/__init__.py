"""Data sets in VOC layout: the reader, the demo generator, COCO conversion, tree checks, the palette."""
from __future__ import annotations

from rca_core.config.data import DataConfig

from .voc import DataError, VOCDataset


def make_dataset(data_cfg: DataConfig, split: str, *, progress: bool = True) -> VOCDataset:
    """The VOCDataset of `split` described by the config (the demo tree is generated on demand)."""
    root = data_cfg.root
    if data_cfg.kind == "demo":
        from .demo import ensure_demo

        root = ensure_demo(data_cfg, progress=progress)
    return VOCDataset(root, split=split, num_classes=data_cfg.num_classes, class_names=data_cfg.class_names,
                      mask_dir=data_cfg.mask_dir, labels_file=data_cfg.labels_file,
                      max_images=data_cfg.max_images)


__all__ = ["make_dataset", "VOCDataset", "DataError"]
