"""Test-only slowdown of the pipeline, injected from outside its code (nothing in rca_core, tasks or flows knows).

A process started with this folder on PYTHONPATH and RCA_TEST_SLOWDOWN=<a JSON file> wraps two functions of
the library once they are imported:
- rca_core.stages.runner.process_images: sleeps `image_delay` seconds after each image of a shard;
- rca_core.train_utils.save_checkpoint: sleeps `epoch_delay` seconds after each checkpoint.
The file is read at every call (a missing file or key: no delay), so a test can slow a stage down for one run
of a cluster whose nodes were started once. Ray workers inherit both variables from the process that starts
their node (a local Ray started by `rca run`, or the test harness's `ray start`).
"""
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

_FILE = os.environ.get("RCA_TEST_SLOWDOWN")


def _delay(key: str) -> float:
    try:
        with open(_FILE) as f:
            return float(json.load(f).get(key, 0) or 0)
    except (OSError, ValueError):
        return 0.0


def _patch_runner(mod) -> None:
    inner = mod.process_images

    def process_images(*args, **kwargs):
        on_done = kwargs.pop("on_done", None)

        def slow(done: int, total: int) -> None:
            time.sleep(_delay("image_delay"))
            if on_done:
                on_done(done, total)

        return inner(*args, on_done=slow, **kwargs)

    mod.process_images = process_images


def _patch_train_utils(mod) -> None:
    inner = mod.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        inner(*args, **kwargs)
        time.sleep(_delay("epoch_delay"))

    mod.save_checkpoint = save_checkpoint


_PATCHES = {"rca_core.stages.runner": _patch_runner, "rca_core.train_utils": _patch_train_utils}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, _PATCHES[name]

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                patch(module)

        spec.loader = Loader()
        return spec


if _FILE:
    sys.meta_path.insert(0, _Finder())
