"""What a stage gets to run: its output in the store, its inputs, its image ids, the data set, the device."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rca_core.store import StageOutput


@dataclass
class StageContext:
    out: StageOutput                                  # this stage's outputs
    inputs: dict[str, StageOutput]                    # upstream stage name -> its outputs
    ids: list[str]                                    # image ids this stage runs on
    dataset: Any                                      # rca_core.data.voc.VOCDataset of that split
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Callable[[int, int], None] | None = None  # callback(done, total)
    extra: dict = field(default_factory=dict)         # stage-specific pointers (e.g. split name)
