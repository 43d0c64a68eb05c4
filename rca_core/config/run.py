"""The run configuration: every section together, plus store, compute and orchestration settings."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from .base import (ConfigError, StrictModel, canonical_json, deep_update, fingerprint,
                   format_validation_error, read_yaml)
from .cam import RANDOM_WEIGHTS, CamConfig, CamEvalConfig, CamInferConfig
from .data import DataConfig
from .refine import RefineConfig
from .segmenter import SegmenterConfig


class ComputeConfig(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when present")
    threads: int | None = Field(None, ge=1, description="torch threads per process (None = torch default)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description=(
        "the networks' arithmetic (torch.autocast) in training and inference: auto = bf16 on a GPU that has it "
        "(fp16 on one that has not), fp32 on CPU; bf16 also runs on CPUs (fast where they have AVX-512 BF16 / AMX). "
        "Set explicitly, it is part of the model stages' store keys"))
    channels_last: Literal["auto", "on", "off"] = Field("auto", description=(
        "the networks in channels-last memory format (faster convolutions): auto = on"))


class RayConfig(StrictModel):
    address: str | None = Field(None, description="Ray cluster address; None = start a local Ray")
    num_workers: int = Field(2, ge=1, description="Ray Train workers of each training stage")
    actors: int | None = Field(None, ge=1, description=(
        "actors of each per-image stage: at most this many (None = as many as the cluster's CPUs/GPUs hold)"))
    shard_size: int = Field(32, ge=1, description="images per actor call at most (shards are balanced)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (0 = auto: 1 if GPUs exist)")
    cpus_per_worker: float = Field(1.0, gt=0)
    train_placement: Literal["PACK", "SPREAD"] = Field("PACK", description=(
        "placement of Ray Train workers: PACK fills a node first (fast collectives), SPREAD one per node"))
    max_failures: int = Field(2, ge=0, description="worker-group restarts of a training stage (worker or node lost)")
    train_cpus_per_worker: float | None = Field(None, gt=0, description=(
        "CPUs (torch threads) per training worker (None = cpus_per_worker)"))
    single_worker_group: bool = Field(False, description=(
        "with num_workers 1, still start a Ray Train worker group (default: one Ray task, no group)"))
    resource_wait_s: float = Field(0.0, ge=0, description=(
        "a stage asking for more CPUs/GPUs than the cluster's nodes hold fails at once (0), or after asking the "
        "autoscaler and waiting this long for nodes to join (an autoscaling cluster)"))
    preflight_timeout_s: float = Field(30.0, gt=0, description=(
        "before a stage fans out, each node must read a marker in the store and see the data within this time"))
    stage_gpus: dict[str, bool] = Field(default_factory=dict, description=(
        "per stage: whether its workers ask for a GPU where the cluster has one (true) or run on CPUs only (false); "
        "a stage not named keeps its default (cam_train, memory_build, cam_infer, affinity_train, seg_train, "
        "seg_eval: GPU; cam_eval, crf_labels, random_walk: CPU)"))


class StorageConfig(StrictModel):
    """Non-secret options of object storage (store and data URLs). Credentials never go here: they come
    from the usual environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE,
    GOOGLE_APPLICATION_CREDENTIALS). AWS_ENDPOINT_URL and AWS_DEFAULT_REGION in the environment are
    used when these are empty, so the standard environment alone reaches any S3-compatible server."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:8333")
    region: str | None = Field(None, description="bucket region (default: AWS_DEFAULT_REGION)")
    profile: str | None = Field(None, description="AWS profile name (credentials from ~/.aws)")
    project: str | None = Field(None, description="GCS project")
    anon: bool = Field(False, description="anonymous access (public buckets)")
    # One retry policy for every object-storage request (rca_core.object_io), on both clients (obstore, s3fs):
    # throttling (503 SlowDown), server errors, timeouts and dropped connections are tried again with full-jitter
    # exponential backoff, until `retries` tries after the first or `timeout_s` in all; then the request fails,
    # naming the endpoint and the last error. The defaults ride out minutes-long S3 throttling of a prefix.
    retries: int = Field(10, ge=0, description="object-storage request: tries after the first (throttling, 5xx, timeouts, resets)")
    timeout_s: float = Field(120.0, gt=0, description="object-storage request: give up after this long, tries and waits included")
    backoff_s: float = Field(0.1, gt=0, description="object-storage retries: first wait (full jitter, doubling)")
    backoff_max_s: float = Field(20.0, gt=0, description="object-storage retries: longest wait")


class LeaseConfig(StrictModel):
    """One writer per stage of a store: a driver takes a stage's lease before computing it (rca_core.store.lease)."""

    on_busy: Literal["wait", "fail"] = Field("wait", description=(
        "another run holds the stage's lease: wait for it (then find the stage complete), or fail at once naming it"))
    ttl_s: float = Field(60.0, gt=0, description=(
        "a lease not renewed for this long (its driver killed, its machine gone) is taken over; renewed every ttl/3"))
    wait_timeout_s: float | None = Field(None, gt=0, description=(
        "on_busy wait: give up after this long (None: wait as long as the holder keeps renewing its lease)"))


# Config keys that name a weights file, each with the CAM sources whose stages read it (None: every source).
WEIGHT_KEYS = {"cam.backbone.pretrained": ("rca",), "cam.checkpoint": ("rca",), "cam.clip.weights": ("clip",),
               "refine.affinity.backbone.pretrained": None, "segmenter.pretrained": None}
# Folders of inputs made elsewhere, read where the stage runs, with the source that reads them.
DATA_KEYS = {"cam.external.dir": ("external",)}


def input_keys(cfg: RunConfig, keys: dict[str, tuple | None]) -> list[str]:
    """The keys of `keys` (WEIGHT_KEYS, DATA_KEYS) that this config's stages read and that name a file or folder
    (not empty; cam.clip.weights 'random' names none): what is checked, staged and looked for on each node."""
    return [k for k, sources in keys.items() if (sources is None or cfg.cam.source in sources)
            and names_file(k, get_key(cfg, k))]


def names_file(key: str, value) -> bool:
    return bool(value) and not (key == "cam.clip.weights" and value == RANDOM_WEIGHTS)


class RunConfig(StrictModel):
    name: str = Field("demo", description="run name")
    seed: int = 0
    store: str = Field("runs/demo/store", description="artifact store: local dir or URL (s3://bucket/run, gs://...)")
    storage: StorageConfig = Field(StorageConfig(), description="object-storage options (no credentials)")
    data: DataConfig = DataConfig()
    cam: CamConfig = CamConfig()
    cam_infer: CamInferConfig = CamInferConfig()
    cam_eval: CamEvalConfig = CamEvalConfig()
    refine: RefineConfig = RefineConfig()
    segmenter: SegmenterConfig = SegmenterConfig()
    compute: ComputeConfig = ComputeConfig()
    ray: RayConfig = RayConfig()
    lease: LeaseConfig = Field(LeaseConfig(), description="one writer per stage of a store (two runs on one store)")

    def fingerprint(self) -> str:
        return fingerprint(self)

    def resolved_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def config_notes(cfg: RunConfig) -> list[str]:
    """What a person should know about this config before its numbers are read (one console line each)."""
    notes = []
    if cfg.cam.source == "clip" and cfg.cam.clip.weights == RANDOM_WEIGHTS:
        notes.append("cam.clip.weights is 'random': a random-init CLIP makes the CAMs (for tests and demos); "
                     "its CAMs, and every figure after them, mean nothing")
    return notes


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


def get_key(cfg: RunConfig, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def set_key(cfg: RunConfig, key: str, value) -> None:
    parts = key.split(".")
    obj = cfg
    for part in parts[:-1]:
        obj = getattr(obj, part)
    setattr(obj, parts[-1], value)


def path_keys(cfg: RunConfig) -> list[str]:
    """Every config key that names a file or folder that stages read."""
    return ["store", "data.root", "data.labels_file", "data.saliency_dir", *WEIGHT_KEYS, *DATA_KEYS]


def resolve_paths(cfg: RunConfig, base: str | Path | None = None) -> RunConfig:
    """A copy with every relative local path made absolute against `base` (default: the working directory),
    so that Ray workers, served runs and other nodes read the same files; URLs are kept as they are."""
    from rca_core import storage

    out = cfg.model_copy(deep=True)
    for key in path_keys(out):
        v = get_key(out, key)
        if names_file(key, v):
            set_key(out, key, storage.absolute(v, base))
    return out


def check_paths(cfg: RunConfig, source: str = "<config>") -> None:
    """Paths that must exist before a run starts (local paths relative to the working directory, or URLs)."""
    from rca_core import storage

    problems = []
    opts = cfg.storage

    def there(v: str, want_dir: bool = False) -> bool:
        try:
            return storage.is_dir(v, opts) if want_dir else storage.exists(v, opts)
        except storage.MissingExtraError as e:
            problems.append(f"  {e}")
            return True
        except Exception:  # noqa: BLE001 - unreachable endpoint, bad credentials, ...: say the path is not there
            return False

    if cfg.data.kind != "demo" and not there(cfg.data.root, want_dir=True):
        problems.append(f"  data.root: directory not found: {cfg.data.root}")
    for key in ("data.labels_file", "data.saliency_dir", *input_keys(cfg, WEIGHT_KEYS)):
        value = get_key(cfg, key)
        if value and not there(value):
            problems.append(f"  {key}: path not found: {value}")
    for key in input_keys(cfg, DATA_KEYS):
        if not there(get_key(cfg, key), want_dir=True):
            problems.append(f"  {key}: directory not found: {get_key(cfg, key)}")
    if problems:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(problems))


def stage_weights(cfg: RunConfig, store_url: str | None = None) -> RunConfig:
    """A copy whose local pretrained-weight files are copied into the store (once, by content hash) and
    named by their store URL, so that workers on nodes that cannot see the driver's disk load them.
    Only for remote stores; local stores keep the (absolute) paths. Stage keys do not change: they hash
    the weights' content, not their location (rca_core.stages.planning.weights_identity)."""
    from rca_core import storage

    store_url = store_url or cfg.store
    if not storage.is_url(store_url):
        return cfg
    out = cfg.model_copy(deep=True)
    for key in input_keys(out, WEIGHT_KEYS):
        v = get_key(out, key)
        if storage.is_url(v):
            continue
        digest = storage.content_hash(v)
        target = storage.join(store_url, "_inputs", "weights", digest, Path(v).name)
        if not storage.exists(target, out.storage):
            storage.write_bytes(target, Path(v).read_bytes(), out.storage)
        set_key(out, key, target)
    return out


__all__ = ["RunConfig", "config_notes", "ComputeConfig", "RayConfig", "LeaseConfig", "StorageConfig", "stage_weights", "path_keys", "WEIGHT_KEYS", "DATA_KEYS", "input_keys",
           "names_file", "load_config", "config_from_dict", "check_paths", "resolve_paths", "canonical_json"]
