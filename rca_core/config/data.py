"""Data set configuration: which tree, which splits, how many classes, and the demo generator."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import StrictModel

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]


class DemoConfig(StrictModel):
    """The built-in synthetic data set (VOC layout, known masks), generated on demand."""

    n_train: int = Field(1600, ge=4, description="training images")
    n_val: int = Field(400, ge=2, description="validation images")
    size: int = Field(96, ge=32, le=1024, description="image side in pixels")
    num_object_classes: int = Field(6, ge=2, le=20, description="foreground classes")
    max_objects: int = Field(3, ge=1, le=6, description="objects per image (1..max)")
    seed: int = Field(0, description="generator seed: same seed, same bytes")


class DataConfig(StrictModel):
    kind: Literal["demo", "voc", "coco"] = Field("demo", description="demo = built-in synthetic set")
    root: str = Field("data/demo", description="data set root in VOC layout (generated here for demo)")
    train_split: str = Field("train", description="split used to train CAMs/affinity/segmenter")
    eval_split: str = Field("train", description="split on which pseudo-masks are evaluated")
    val_split: str = Field("val", description="split on which the segmenter is evaluated")
    num_classes: int = Field(7, ge=2, description="including background")
    class_names: list[str] | None = Field(None, description="names, background first")
    mask_dir: Literal["auto", "SegmentationClassAug", "SegmentationClass"] = "auto"
    labels_file: str | None = Field(None, description="image-level tags file (default: from masks)")
    saliency_dir: str | None = Field(None, description="optional saliency maps (PNG, 0-255)")
    max_images: int | None = Field(None, ge=1, description="use only the first N ids of each split")
    demo: DemoConfig = DemoConfig()

    @model_validator(mode="after")
    def _names(self):
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} entries but num_classes is {self.num_classes}")
        if self.kind == "demo" and self.num_classes != self.demo.num_object_classes + 1:
            raise ValueError(
                f"num_classes ({self.num_classes}) must be demo.num_object_classes + 1 ({self.demo.num_object_classes + 1})")
        return self
