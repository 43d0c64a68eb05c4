"""The project's code uses Ray's public API only: Ray's private modules (`ray._private`, and any
`ray.<package>._private`) change without notice between Ray releases. Tests may use them (the cluster
harness starts raylets by hand); the code under rca_core/, tasks/, flows/, bench/ and scripts/ may not."""
from __future__ import annotations

import re

from conftest import ROOT

CHECKED = ["rca_core", "tasks", "flows", "bench", "scripts"]
PRIVATE = [re.compile(r"\bray(?:\.\w+)*\._private\b"),                         # ray._private.worker, ray.x._private
           re.compile(r"\bfrom\s+ray(?:\.\w+)*\s+import\s+(?:\(\s*)?[^#\n]*\b_private\b"),  # from ray import _private
           re.compile(r"""import_module\(\s*["']ray(?:\.\w+)*\._private""")]


def private_uses(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if any(rx.search(ln) for rx in PRIVATE)]


def test_the_patterns_find_private_ray_uses():
    for bad in ("import ray._private.worker as rw", "from ray._private.ray_logging import x",
                "from ray.autoscaler._private.util import f", "from ray import _private",
                "ray._private.worker._global_node", "importlib.import_module('ray._private.services')"):
        assert private_uses(bad) == [bad], bad
    for fine in ("import ray", "ray.util.get_node_ip_address()", '"ray/_private" in cmdline',
                 "self._private = 1", "from ray.train import Checkpoint"):
        assert private_uses(fine) == [], fine


def test_no_private_ray_api_in_the_source_tree():
    files = [p for d in CHECKED for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".sh", ".yaml", ".yml")]
    assert len(files) > 50
    found = {str(p.relative_to(ROOT)): uses for p in files if (uses := private_uses(p.read_text(errors="replace")))}
    assert not found, found
