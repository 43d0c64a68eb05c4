"""The run configuration: every section together, plus store, compute and orchestration settings."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from .base import (ConfigError, StrictModel, canonical_json, deep_update, fingerprint,
                   format_validation_error, read_yaml)
from .cam import CamConfig, CamEvalConfig, CamInferConfig
from .data import DataConfig
from .refine import RefineConfig
from .segmenter import SegmenterConfig


class ComputeConfig(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present")
    threads: int | None = Field(None, ge=1, description="torch threads per process (None = torch default)")


class RayConfig(StrictModel):
    address: str | None = Field(None, description="Ray cluster address; None = start a local Ray")
    num_workers: int = Field(2, ge=1, description="workers for per-image stages and Ray Train")
    shard_size: int = Field(32, ge=1, description="images per Ray task/actor call")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (0 = auto: 1 if GPUs exist)")
    cpus_per_worker: float = Field(1.0, gt=0)


class RunConfig(StrictModel):
    name: str = Field("demo", description="run name")
    seed: int = 0
    store: str = Field("runs/demo/store", description="artifact store: local dir or fsspec URL")
    data: DataConfig = DataConfig()
    cam: CamConfig = CamConfig()
    cam_infer: CamInferConfig = CamInferConfig()
    cam_eval: CamEvalConfig = CamEvalConfig()
    refine: RefineConfig = RefineConfig()
    segmenter: SegmenterConfig = SegmenterConfig()
    compute: ComputeConfig = ComputeConfig()
    ray: RayConfig = RayConfig()

    def fingerprint(self) -> str:
        return fingerprint(self)

    def resolved_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def config_from_dict(data: dict, source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Load a YAML config; `overrides` (nested dict) is applied on top. Errors name the file and key."""
    data = read_yaml(path)
    if overrides:
        data = deep_update(data, overrides)
    cfg = config_from_dict(data, str(path))
    check_paths(cfg, str(path))
    return cfg


def resolve_paths(cfg: RunConfig, base: str | Path | None = None) -> RunConfig:
    """A copy with relative local paths made absolute (Ray workers and served runs may not share the cwd)."""
    base = Path(base or Path.cwd())
    out = cfg.model_copy(deep=True)
    if "://" not in out.store:
        out.store = str((base / out.store).resolve())
    out.data.root = str((base / out.data.root).resolve())
    for attr in ("labels_file", "saliency_dir"):
        v = getattr(out.data, attr)
        if v:
            setattr(out.data, attr, str((base / v).resolve()))
    return out


def check_paths(cfg: RunConfig, source: str = "<config>") -> None:
    """Paths that must exist before a run starts (relative paths are relative to the working directory)."""
    problems = []
    if cfg.data.kind != "demo" and not Path(cfg.data.root).is_dir():
        problems.append(f"  data.root: directory not found: {cfg.data.root}")
    for key, value in [("data.labels_file", cfg.data.labels_file), ("data.saliency_dir", cfg.data.saliency_dir),
                       ("cam.backbone.pretrained", cfg.cam.backbone.pretrained),
                       ("refine.affinity.backbone.pretrained", cfg.refine.affinity.backbone.pretrained),
                       ("segmenter.pretrained", cfg.segmenter.pretrained)]:
        if value and not Path(value).exists():
            problems.append(f"  {key}: path not found: {value}")
    if problems:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(problems))


__all__ = ["RunConfig", "ComputeConfig", "RayConfig", "load_config", "config_from_dict", "check_paths", "resolve_paths", "canonical_json"]
