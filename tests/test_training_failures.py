"""An error that a restart cannot fix fails a training stage at once; restarts are for lost workers and nodes."""
from __future__ import annotations

import pytest

from conftest import write_config

pytestmark = pytest.mark.slow


def test_non_finite_loss_with_a_worker_group_fails_at_once(tmp_path):
    """seg_train on 2 Ray Train workers with a learning rate that makes the loss non-finite: the stage fails on the
    first attempt naming the error (with ray.max_failures 2, Ray Train used to run it three times over)."""
    import ray

    from rca_core.config import load_config
    from tasks.actor_pool import release_pools
    from tasks.training import TrainingStageError, run_training_stage

    cfg = load_config(write_config(tmp_path / "run", segmenter={"labels": "gt", "lr": 1.0e12, "epochs": 2,
                                                                 "optimizer": "sgd"},
                                   ray={"num_workers": 2, "max_failures": 2}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        from rca_core.data import make_dataset

        make_dataset(cfg.data, cfg.data.train_split)  # the driver makes the demo set (workers never do)
        with pytest.raises(TrainingStageError) as e:
            run_training_stage("seg_train", cfg, cfg.store)
    finally:
        release_pools()
        ray.shutdown()
    msg = str(e.value)
    assert "stage seg_train failed on rank" in msg and "not finite" in msg, msg
    assert "not restarted" in msg and "0 restart(s) before this" in msg, msg


def test_lost_workers_are_told_from_the_stages_own_errors():
    import ray.exceptions as rex
    from ray.train import WorkerGroupError

    from tasks.training import workers_lost

    died = rex.ActorDiedError()
    assert workers_lost(WorkerGroupError("x", {0: died, 1: died}))
    # rank 1's node died; rank 0 failed with the collective's own error because of it: a restart helps
    assert workers_lost(WorkerGroupError("x", {0: RuntimeError("gloo: Connection closed by peer"), 1: died}))
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    # as Ray Train reports a worker whose node died: a failed health check with the actor's death inside
    assert workers_lost(WorkerGroupError("x", {0: RuntimeError("gloo: Connection closed by peer"),
                                               1: WorkerHealthCheckFailedError("A worker health check failed.", died)}))
    assert not workers_lost(WorkerGroupError("x", {0: FloatingPointError("loss is nan"),
                                                   1: FloatingPointError("loss is nan")}))
    assert not workers_lost(ValueError("bad config"))
