"""What a stage gets to run: its output in the store, its inputs, its image ids, the data set, the device."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rca_core.store import StageOutput

CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class StageContext:
    out: StageOutput                                  # this stage's outputs
    inputs: dict[str, StageOutput]                    # upstream stage name -> its outputs
    ids: list[str]                                    # image ids this stage runs on
    dataset: Any                                      # rca_core.data.voc.VOCDataset of that split
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Callable[[int, int], None] | None = None  # callback(done, total)
    extra: dict = field(default_factory=dict)         # stage-specific pointers (e.g. split name)
    checkpoint: Any = None                            # a train_utils.Checkpointer (None: files/checkpoint.pt)

    def checkpointer(self):
        """Where a training stage saves and resumes: the given Checkpointer (Ray Train's under Ray),
        else the stage's files/checkpoint.pt in the store."""
        from rca_core.train_utils import FileCheckpointer

        return self.checkpoint if self.checkpoint is not None else FileCheckpointer(self.out.file(CHECKPOINT_FILE))
