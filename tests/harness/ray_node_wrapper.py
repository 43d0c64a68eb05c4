"""The Ray CLI for a second node on 127.0.0.1: `python ray_node_wrapper.py start --address=127.0.0.1:G ...`.

Stock `ray start` either rewrites 127.0.0.1 to the host's network address (then a second node on the same
host cannot join a loopback head) or, with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, refuses to start a
worker node ("multi-node not supported"). This wrapper lets the worker node start while keeping every
address on loopback: it allows multi-node in this process only and pins the node's IP to 127.0.0.1,
then hands over to Ray's own CLI. The processes Ray starts from here (raylet, agents, workers) keep
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 from the environment, so they resolve 127.0.0.1 as well.
"""
from __future__ import annotations

import sys


def main() -> None:
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services

    ray_constants.ENABLE_RAY_CLUSTER = True
    services.get_node_ip_address = lambda address=None: "127.0.0.1"

    from ray.scripts.scripts import main as ray_main

    sys.argv[0] = "ray"
    ray_main()


if __name__ == "__main__":
    main()
