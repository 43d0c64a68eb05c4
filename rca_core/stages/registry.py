"""The stage registry: every pipeline stage as one `Stage` record, in run order.

A record says everything the orchestration needs to know about a stage without importing its code
(importing this module imports neither torch, zarr nor Ray):
- `name`, `kind` ("per_image": a Worker per actor + finalize; "training": train(cfg, ctx)), `module` (its code);
- `inputs`: the upstream stages it reads, by role (`{"cams": "cam_infer"}`); the stage code reads
  `ctx.inputs["cams"]`, never an upstream stage's name. `Use(stage, when=...)` makes an input conditional
  on the config (seg_train reads no pseudo-masks when trained on the ground truth);
- `config`: the config sections that shape its outputs (they, the inputs' keys, the data set identity,
  the seed and `code_version` make its store key, see rca_core.stages.planning);
- `split`: the data split it runs on (an attribute of cfg.data);
- `fields` (per-image arrays it writes), `prefetch` (inputs read ahead of each image on I/O threads:
  "image", "mask", "<role>/<field>");
- `gpu`: whether its workers ask for a GPU where the cluster has one; `ray.stage_gpus` in the run config
  overrides it per stage (e.g. `{crf_labels: false, cam_infer: true}`);
- `when`: the config values under which the stage is part of the pipeline at all (`When("cam.source", "rca")`;
  None = always). An input may name alternatives, `OneOf("cam_infer", "clip_cam", ...)`: the first of them that
  the config runs is read, so the CAM consumers read `cams` from whichever CAM source the config picks
  (cam_infer, clip_cam or cam_import) and never name one.

Adding a stage = its own module under rca_core/stages/, its config section, and one record here; the
flows and tasks take it from the list (docs/architecture.md, "Adding a stage"). The list is checked when
this module is imported (`validate`): an input naming an unknown or later stage, a prefetch naming an
unknown role, a repeated name or a field name that is not a store key fails at once with a message
naming the stage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # type hints only: the registry imports no config, torch, zarr or Ray at run time
    from rca_core.config import RunConfig

KINDS = ("per_image", "training")
SPLITS = ("train_split", "eval_split", "val_split")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class RegistryError(ValueError):
    """The stage list is inconsistent (an unknown input, a cycle, a bad name)."""


@dataclass(frozen=True)
class Use:
    """An input on a condition: the upstream `stage` is read only when `when(cfg)` is true."""

    stage: str
    when: Callable[["RunConfig"], bool] | None = None

    def active(self, cfg: "RunConfig | None") -> bool:
        return self.when is None or cfg is None or bool(self.when(cfg))


@dataclass(frozen=True)
class When:
    """A config condition that can say what it is: `When("cam.source", "clip")` holds when that key has one of
    the values."""

    key: str
    values: tuple
    def __init__(self, key: str, *values):
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "values", tuple(values))

    def value(self, cfg: "RunConfig"):
        obj = cfg
        for part in self.key.split("."):
            obj = getattr(obj, part)
        return obj

    def __call__(self, cfg: "RunConfig") -> bool:
        return self.value(cfg) in self.values

    def describe(self, cfg: "RunConfig") -> str:
        want = " or ".join(repr(v) for v in self.values)
        return f"{self.key} is {self.value(cfg)!r} (it runs when {self.key} is {want})"


@dataclass(frozen=True)
class OneOf:
    """An input with alternatives: the first of these stages that the config runs (its record's `when` holds)."""

    stages: tuple[str, ...]

    def __init__(self, *stages: str):
        object.__setattr__(self, "stages", tuple(stages))

    def pick(self, cfg: "RunConfig | None") -> str | None:
        if cfg is None:
            return self.stages[0]
        return next((n for n in self.stages if _BY_NAME[n].active(cfg)), None)


def _options(src: "str | Use | OneOf") -> tuple[str, ...]:
    """Every upstream stage an input may name."""
    if isinstance(src, OneOf):
        return src.stages
    return (src.stage if isinstance(src, Use) else src,)


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    module: str
    code_version: str
    config: Callable[["RunConfig"], Any]
    split: str = "train_split"
    inputs: Mapping[str, str | Use] = field(default_factory=dict)
    fields: tuple[str, ...] = ()
    prefetch: tuple[str, ...] = ()
    gpu: bool = False
    doc: str = ""
    when: When | None = None

    def active(self, cfg: "RunConfig | None") -> bool:
        """Whether the stage is part of the pipeline for this config."""
        return self.when is None or cfg is None or self.when(cfg)

    def uses(self, cfg: "RunConfig | None" = None) -> dict[str, str]:
        """role -> upstream stage name, for this config (conditional inputs left out when off)."""
        out = {}
        for role, src in self.inputs.items():
            if isinstance(src, OneOf):
                picked = src.pick(cfg)
                if picked is None:
                    raise RegistryError(f"stage registry, stage {self.name!r}: input {role!r}: none of "
                                        f"{', '.join(src.stages)} is on for this config")
                use = Use(picked)
            else:
                use = src if isinstance(src, Use) else Use(src)
            if use.active(cfg):
                out[role] = use.stage
        return out

    def upstream(self, cfg: "RunConfig | None" = None) -> tuple[str, ...]:
        """The upstream stage names this config makes the stage read (each once, in role order)."""
        return tuple(dict.fromkeys(self.uses(cfg).values()))

    def wants_gpu(self, cfg: "RunConfig") -> bool:
        """Whether this stage's workers ask for a GPU (where the cluster has one): `ray.stage_gpus` wins."""
        chosen = (cfg.ray.stage_gpus or {}).get(self.name)
        return self.gpu if chosen is None else bool(chosen)


_CAM_SOURCE_KEYS = {"source", "clip", "external"}  # the CAM source switch and the other sources' sections


def _cam(c):
    # the RCA network's section: the source switch and the other sources' settings are not part of it, so a
    # clip or external run leaves cam_train's key (and every key of an rca run) as it was; a given checkpoint
    # (cam.checkpoint, hashed by content) is, only when set
    unset = {"checkpoint"} if c.cam.checkpoint is None else set()
    return {"cam": c.cam.model_dump(mode="json", exclude=_CAM_SOURCE_KEYS | unset)}


def _seg_train_section(c):
    return {"seg": c.segmenter.model_dump(exclude={"eval_scales", "eval_flip", "eval_crf", "eval_crf_params"})}


def _seg_eval_section(c):
    return {"seg_eval": c.segmenter.model_dump(include={"eval_scales", "eval_flip", "eval_crf", "eval_crf_params"})}


def _pseudo_labels(c) -> bool:
    return c.segmenter.labels == "pseudo"


_RCA, _CLIP, _EXTERNAL = When("cam.source", "rca"), When("cam.source", "clip"), When("cam.source", "external")
# the CAMs every consumer reads: from the CAM stage the config runs (each one's `when` is its cam.source)
_CAMS = OneOf("cam_infer", "clip_cam", "cam_import")

# code_version history: cam_train 2 and affinity_train 2 (batch_size is the global batch; backbone batchnorm /
# frozen_stages), cam_infer 2 (only the image-resolution CAM stored), seg_train 2 (global batch; freeze_bn =
# FrozenBatchNorm2d).
STAGES: list[Stage] = [
    Stage("cam_train", "training", "rca_core.stages.cam_train", "2", _cam, gpu=True, when=_RCA,
          doc="backbone + CAM head + RCA memory bank, semantic contrast and aggregation"),
    Stage("memory_build", "per_image", "rca_core.stages.memory_build", "1", lambda c: {"agg": c.cam.aggregation},
          inputs={"model": "cam_train"}, fields=("emb",), prefetch=("image",), gpu=True, when=_RCA,
          doc="region embedding of every (image, class); per-class k-means prototypes"),
    Stage("cam_infer", "per_image", "rca_core.stages.cam_infer", "2", lambda c: {"infer": c.cam_infer},
          inputs={"model": "cam_train", "prototypes": "memory_build"}, fields=("cam",), prefetch=("image",),
          gpu=True, when=_RCA, doc="multi-scale + flip CAMs through the aggregation branch"),
    Stage("clip_cam", "per_image", "rca_core.stages.clip_cam", "1",
          lambda c: {"clip": c.cam.clip, "dtype": c.cam_infer.dtype}, fields=("cam",), prefetch=("image",),
          gpu=True, when=_CLIP, doc="CLIP-ES CAMs from a frozen CLIP (no CAM training): GradCAM + CAA"),
    Stage("cam_import", "per_image", "rca_core.stages.cam_import", "1",
          lambda c: {"external": c.cam.external, "dtype": c.cam_infer.dtype}, fields=("cam",), when=_EXTERNAL,
          doc="CAMs made elsewhere (a folder of IRN-layout .npy files), checked and imported"),
    Stage("cam_eval", "per_image", "rca_core.stages.cam_eval", "1", lambda c: {"eval": c.cam_eval},
          split="eval_split", inputs={"cams": _CAMS}, prefetch=("mask", "cams/cam"),
          doc="CAM mIoU over a background-threshold sweep"),
    Stage("crf_labels", "per_image", "rca_core.stages.crf_labels", "1", lambda c: {"crf": c.refine.crf},
          inputs={"cams": _CAMS}, fields=("crf_label",), prefetch=("image", "cams/cam", "mask"),
          doc="dense CRF: confident foreground / background, 255 elsewhere"),
    Stage("affinity_train", "training", "rca_core.stages.affinity_train", "2",
          lambda c: {"aff": c.refine.affinity}, inputs={"labels": "crf_labels"}, gpu=True,
          doc="AffinityNet on pairs from the confident labels"),
    Stage("random_walk", "per_image", "rca_core.stages.random_walk", "1",
          lambda c: {"rw": c.refine.random_walk, "sal": c.refine.saliency},
          inputs={"cams": _CAMS, "affinity": "affinity_train"}, fields=("pseudo_mask",),
          prefetch=("image", "cams/cam", "mask"), doc="affinity random walk over the CAMs -> pseudo-masks"),
    Stage("seg_train", "training", "rca_core.stages.seg_train", "2", _seg_train_section,
          inputs={"masks": Use("random_walk", when=_pseudo_labels)}, gpu=True,
          doc="DeepLab on the pseudo-masks (or the ground truth: segmenter.labels gt)"),
    Stage("seg_eval", "per_image", "rca_core.stages.seg_eval", "1", _seg_eval_section, split="val_split",
          inputs={"model": "seg_train"}, fields=("pred",), prefetch=("image", "mask"), gpu=True,
          doc="segmenter mIoU on val"),
]


def validate(stages: list[Stage]) -> None:
    """Raise RegistryError for the first inconsistency: a bad or repeated name, an unknown kind or split,
    an input naming a stage that is not registered before this one (unknown, later, or itself: a cycle),
    a prefetch spec naming an unknown role, a bad field name."""
    seen: dict[str, Stage] = {}
    for s in stages:
        where = f"stage registry, stage {s.name!r}"
        if not _NAME.match(s.name):
            raise RegistryError(f"{where}: the name must be lower-case letters, digits and '_'")
        if s.name in seen:
            raise RegistryError(f"{where}: registered twice")
        if s.kind not in KINDS:
            raise RegistryError(f"{where}: kind {s.kind!r} is not one of {', '.join(KINDS)}")
        if s.split not in SPLITS:
            raise RegistryError(f"{where}: split {s.split!r} is not one of {', '.join(SPLITS)}")
        if s.kind == "training" and (s.fields or s.prefetch):
            raise RegistryError(f"{where}: a training stage writes no per-image fields and prefetches nothing")
        for role, src in s.inputs.items():
            if not _NAME.match(role):
                raise RegistryError(f"{where}: input role {role!r} must be lower-case letters, digits and '_'")
            for up in _options(src):
                if up == s.name:
                    raise RegistryError(f"{where}: input {role!r} names the stage itself (a cycle)")
                if up not in seen:
                    later = any(t.name == up for t in stages)
                    raise RegistryError(
                        f"{where}: input {role!r} names {up!r}, " + (
                            "which is registered after it (stages are listed in run order; an input that comes "
                            "later would make a cycle)" if later else
                            f"which is not a registered stage (stages: {', '.join(t.name for t in stages)})"))
        for f in s.fields:
            if not _NAME.match(f):
                raise RegistryError(f"{where}: field {f!r} must be lower-case letters, digits and '_'")
        for spec in s.prefetch:
            if spec in ("image", "mask"):
                continue
            role, _, fld = spec.partition("/")
            if role not in s.inputs or not fld:
                raise RegistryError(f"{where}: prefetch {spec!r} must be 'image', 'mask' or '<role>/<field>' with "
                                    f"one of its input roles ({', '.join(s.inputs) or 'none'})")
            for up in _options(s.inputs[role]):
                up_stage = seen[up]
                if fld not in up_stage.fields:
                    raise RegistryError(f"{where}: prefetch {spec!r}: stage {up_stage.name!r} writes no field "
                                        f"{fld!r} (its fields: {', '.join(up_stage.fields) or 'none'})")
        seen[s.name] = s


validate(STAGES)
STAGE_NAMES: list[str] = [s.name for s in STAGES]
_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    """The record of a stage; KeyError naming the registered stages for an unknown name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}") from None


def by_kind(kind: str) -> list[Stage]:
    return [s for s in STAGES if s.kind == kind]


def active(cfg: "RunConfig | None") -> list[Stage]:
    """The stages that make up the pipeline for this config, in run order."""
    return [s for s in STAGES if s.active(cfg)]


__all__ = ["Stage", "Use", "When", "OneOf", "active", "STAGES", "STAGE_NAMES", "RegistryError", "validate", "get", "by_kind",
           "KINDS", "SPLITS"]
