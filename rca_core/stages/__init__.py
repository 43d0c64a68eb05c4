"""The pipeline's stages: one module per stage (its code), plus the machinery every stage shares.

- `registry`  the stage records, in run order (what each stage reads, writes, needs; no torch/zarr/Ray)
- `planning`  each stage's store key for a run config, run order, upstream closure
- `context`   what a stage gets: its output, its inputs by role, its images, the data set, the device
- `runner`    the one per-image lifecycle (driver and worker side)
- `local`     running stages in this process (no Prefect, no Ray)
- stage code: cam_train, memory_build, cam_infer, cam_eval, crf_labels, affinity_train, random_walk,
  seg_train, seg_eval (and label_scoring, shared by the stages that score label maps)

This package module imports nothing: `import rca_core.stages.registry` stays free of torch, zarr and Ray.
"""
