"""Plans: each stage's store key for a run config, and the order stages run in.

A stage's key is `<name>/<fingerprint>`, fingerprint = hash(stage name, its record's code_version, the
config sections its record names (pretrained weight files by content, not by location), the data set
identity, the seed, the fingerprints of its inputs). So changing one stage's config changes its key and
the keys of every stage after it, and nothing before it. Planning imports neither torch, zarr nor Ray.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from rca_core.config import ConfigError, RunConfig, fingerprint
from rca_core.config.cam import RANDOM_WEIGHTS

from . import registry
from .registry import STAGE_NAMES, Stage


@dataclass(frozen=True)
class StagePlan:
    name: str
    fingerprint: str
    inputs: dict[str, str]   # upstream stage name -> its fingerprint
    roles: dict[str, str]    # input role -> upstream stage name
    split: str               # the data split's name (e.g. "train")
    record: Stage

    @property
    def key(self) -> str:
        return f"{self.name}/{self.fingerprint}"

    @property
    def kind(self) -> str:
        return self.record.kind

    @property
    def module(self) -> str:
        return self.record.module


def check_stage_names(cfg: RunConfig) -> None:
    """Config keys that name stages must name registered ones (ConfigError naming the key)."""
    unknown = sorted(set(cfg.ray.stage_gpus) - set(STAGE_NAMES))
    if unknown:
        raise ConfigError(f"ray.stage_gpus names unknown stage(s) {', '.join(unknown)}; stages are: "
                          f"{', '.join(STAGE_NAMES)}")


def plan(cfg: RunConfig) -> dict[str, StagePlan]:
    """The plan of every stage this config runs (its record's `when` holds), in run order."""
    check_stage_names(cfg)
    out: dict[str, StagePlan] = {}
    for rec in registry.active(cfg):
        missing = [i for i in rec.upstream(cfg) if i not in out]
        if missing:  # a registry whose inputs and `when`s disagree: name both
            raise ConfigError(f"stage {rec.name} reads {', '.join(missing)}, which this config does not run: "
                              + "; ".join(inactive_why(m, cfg) for m in missing))
        out[rec.name] = stage_plan(rec.name, cfg, {i: out[i].fingerprint for i in rec.upstream(cfg)})
    return out


def inactive_why(name: str, cfg: RunConfig) -> str:
    """Why a registered stage is not part of this config's pipeline."""
    rec = registry.get(name)
    return f"stage {name} is off: {rec.when.describe(cfg)}" if rec.when is not None else f"stage {name} is on"


def check_active(name: str, cfg: RunConfig) -> None:
    """ConfigError naming the config key when `name` is a registered stage this config does not run."""
    if not registry.get(name).active(cfg):
        raise ConfigError(f"{inactive_why(name, cfg)}; this config's stages: "
                          f"{', '.join(s.name for s in registry.active(cfg))}")


def stage_plan(name: str, cfg: RunConfig, inputs: dict[str, str]) -> StagePlan:
    """One stage's plan given its inputs' fingerprints (e.g. to refine CAMs of another source)."""
    rec = registry.get(name)
    parts = [name, rec.code_version, weights_identity(rec.config(cfg)), data_identity(cfg), cfg.seed, inputs]
    if cfg.compute.precision != "auto":  # an explicit precision is part of every key (auto: the device's default)
        parts.append({"precision": cfg.compute.precision})
    fp = fingerprint(*parts)
    return StagePlan(name, fp, dict(inputs), rec.uses(cfg), getattr(cfg.data, rec.split), rec)


def upstream_closure(name: str, cfg: RunConfig) -> list[str]:
    """`name` and every stage it needs, in run order."""
    need: set[str] = set()
    check_active(name, cfg)

    def visit(n: str) -> None:
        if n in need:
            return
        need.add(n)
        for up in registry.get(n).upstream(cfg):
            visit(up)

    visit(name)
    return [n for n in STAGE_NAMES if n in need]


def run_order(cfg: RunConfig, wanted: list[str] | None = None) -> list[str]:
    """The stages to run for `wanted` (default: all) and everything they need, in run order."""
    if not wanted:
        return [s.name for s in registry.active(cfg)]
    need = {n for w in wanted for n in upstream_closure(w, cfg)}
    return [n for n in STAGE_NAMES if n in need]


def data_identity(cfg: RunConfig) -> dict:
    """What names the data: for the demo set its generator settings and version (not where it lives)."""
    d = cfg.data.model_dump(mode="json")
    if cfg.data.kind == "demo":
        from rca_core.data.demo import GENERATOR_VERSION

        d.pop("root")
        d["generator_version"] = GENERATOR_VERSION
    else:
        d.pop("demo")
    return d


_WEIGHT_HASHES: dict[tuple, str] = {}
WEIGHT_FILE_KEYS = ("pretrained", "weights", "checkpoint")  # config keys that name a weights file ("random": none)


def weights_identity(section: Any) -> Any:
    """The section as JSON with every `pretrained` file replaced by the hash of its content: a stage key
    names the weights, not where they are (a local path, another working directory, or the copy that
    rca_core.config.stage_weights put in the store under _inputs/weights/<hash>/)."""
    from pydantic_core import to_jsonable_python

    def walk(obj):
        if isinstance(obj, dict):
            return {k: (_weights_hash(v) if k in WEIGHT_FILE_KEYS and isinstance(v, str) and v and v != RANDOM_WEIGHTS
                        else walk(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj

    return walk(to_jsonable_python(section))


def _weights_hash(location: str) -> str:
    from rca_core import storage

    m = re.search(r"/_inputs/weights/([0-9a-f]{16})/[^/]+$", location)
    if m:
        return f"sha256:{m.group(1)}"
    if storage.is_url(location):
        key = (location,)
    else:
        try:
            st = os.stat(location)
        except OSError:
            return f"missing:{location}"  # load time names the missing file
        key = (os.path.abspath(location), st.st_size, st.st_mtime_ns)
    if key not in _WEIGHT_HASHES:
        _WEIGHT_HASHES[key] = storage.content_hash(location)
    return f"sha256:{_WEIGHT_HASHES[key]}"


__all__ = ["StagePlan", "plan", "stage_plan", "upstream_closure", "run_order", "data_identity", "weights_identity",
           "check_stage_names", "check_active", "inactive_why"]
