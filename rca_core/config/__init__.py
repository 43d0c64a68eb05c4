"""Configuration models (pydantic). `load_config(path)` reads a YAML file into a RunConfig."""
from .base import ConfigError, StrictModel, fingerprint, parse_overrides
from .cam import CamConfig, CamEvalConfig, CamInferConfig
from .data import DataConfig, DemoConfig
from .refine import RefineConfig
from .run import (ComputeConfig, RayConfig, RunConfig, StorageConfig, check_paths, config_from_dict, load_config,
                  resolve_paths, stage_weights)
from .segmenter import SegmenterConfig

__all__ = [
    "ConfigError", "StrictModel", "fingerprint", "parse_overrides", "CamConfig", "CamEvalConfig",
    "CamInferConfig", "DataConfig", "DemoConfig", "RefineConfig", "ComputeConfig", "RayConfig",
    "RunConfig", "check_paths", "resolve_paths", "config_from_dict", "load_config", "SegmenterConfig",
    "StorageConfig", "stage_weights",
]
