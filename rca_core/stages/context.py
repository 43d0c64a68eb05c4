"""What a stage gets to run: its output in the store, its inputs by role, its image ids, the data set, the device."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rca_core.config import RunConfig
from rca_core.store import ArtifactStore, StageOutput

from .planning import StagePlan, plan

CHECKPOINT_FILE = "checkpoint.pt"


class Inputs(dict):
    """role -> StageOutput of the upstream stage; asking for a role the stage's record does not declare
    names the stage and its roles."""

    def __init__(self, stage: str, outputs: dict[str, StageOutput]):
        super().__init__(outputs)
        self.stage = stage

    def __missing__(self, role: str):
        raise KeyError(f"stage {self.stage} has no input role {role!r} for this config; its roles: "
                       f"{', '.join(self) or 'none'} (rca_core/stages/registry.py)")


@dataclass
class StageContext:
    out: StageOutput                                  # this stage's outputs
    inputs: dict[str, StageOutput]                    # input role -> the upstream stage's outputs
    ids: list[str]                                    # image ids this stage runs on
    dataset: Any                                      # rca_core.data.voc.VOCDataset of that split
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Callable[[int, int], None] | None = None  # callback(done, total)
    extra: dict = field(default_factory=dict)         # split, stage key, the scored subset
    checkpoint: Any = None                            # a train_utils.Checkpointer (None: files/checkpoint.pt)
    plan: StagePlan | None = None                     # the stage's plan (its record: fields, prefetch, ...)
    compute: Any = None                               # the run's compute section (precision, channels_last)

    def fast(self):
        """The networks' fast path (autocast precision, channels-last) on this context's device."""
        from rca_core.device import fast_path

        return fast_path(self.compute, self.device)

    def checkpointer(self):
        """Where a training stage saves and resumes: the given Checkpointer (Ray Train's under Ray),
        else the stage's files/checkpoint.pt in the store."""
        from rca_core.train_utils import FileCheckpointer

        return self.checkpoint if self.checkpoint is not None else FileCheckpointer(self.out.file(CHECKPOINT_FILE))


def make_context(name: str, cfg: RunConfig, store: ArtifactStore, plans: dict[str, StagePlan] | None = None,
                 progress: Callable[[int, int], None] | None = None, generate: bool = True) -> StageContext:
    """A stage's context. Workers pass generate=False: they never generate the demo data set."""
    from rca_core.data import make_dataset
    from rca_core.device import pick_device

    plans = plans or plan(cfg)
    p = plans[name]
    ds = make_dataset(cfg.data, p.split, generate=generate, progress=generate, storage_options=cfg.storage)
    if not ds.ids:
        split_file = f"{cfg.data.root}/ImageSets/Segmentation/{p.split}.txt"
        raise ValueError(f"stage {name}: split {p.split!r} lists no images ({split_file}); nothing to run on")
    inputs = Inputs(name, {role: store.stage(up, plans[up].fingerprint) for role, up in p.roles.items()})
    return StageContext(
        out=store.stage(name, p.fingerprint), inputs=inputs, ids=list(ds.ids), dataset=ds,
        device=pick_device(cfg.compute.device), progress=progress, plan=p, compute=cfg.compute,
        extra={"split": p.split, "stage_key": p.key, **eval_subset(cfg, p.split, ds.ids)},
    )


def eval_subset(cfg: RunConfig, split: str, ids: list[str]) -> dict:
    """Which of a stage's images are scored: those of data.eval_split (pseudo-masks are made for the whole
    training split, e.g. VOC train_aug, and scored on VOC train, as every paper does)."""
    eval_split = cfg.data.eval_split
    if eval_split == split:
        return {"eval_split": eval_split, "eval_ids": None}
    from rca_core.data.voc import read_split

    wanted = read_split(cfg.data.root, eval_split, cfg.storage)
    if cfg.data.max_images is not None:
        wanted = wanted[:cfg.data.max_images]
    return {"eval_split": eval_split, "eval_ids": set(wanted) & set(ids)}


__all__ = ["StageContext", "Inputs", "make_context", "eval_subset", "CHECKPOINT_FILE"]
