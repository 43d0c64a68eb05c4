"""Prefect tasks: one stage's unit of work, fanned out over Ray."""
import os

# A local Ray binds to 127.0.0.1 only with this set before `import ray` (measured: without it, it
# listens on every interface). A cluster address given in the config is unaffected.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
