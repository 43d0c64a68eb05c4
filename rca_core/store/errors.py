"""The store's errors: StoreError for every store problem, DamagedEntryError for a per-image entry that cannot
be trusted (its reasons are given where entries are decoded, rca_core.store.codec)."""
from __future__ import annotations


class StoreError(RuntimeError):
    """A problem with the artifact store (bad key, missing stage, write failure)."""


class DamagedEntryError(StoreError):
    """A stored per-image entry is missing its marker, unreadable, or fails its checksum."""

    def __init__(self, stage_key: str, image_id: str, field: str, why: str):
        self.stage_key, self.image_id, self.field, self.why = stage_key, image_id, field, why
        super().__init__(f"damaged entry {stage_key}/{field}/{image_id}: {why}")

    def __reduce__(self):  # picklable (it crosses Ray processes)
        return type(self), (self.stage_key, self.image_id, self.field, self.why)
