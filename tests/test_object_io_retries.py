"""The one retry policy of object-storage requests (rca_core.object_io): what is retried, how long, what is
counted. Through real clients and a real server in tests/test_s3_faults_policy.py; here the policy itself."""
from __future__ import annotations

import asyncio
import time

import pytest

from rca_core import object_io
from rca_core.object_io import RetryPolicy, StorageUnavailable, retryable


@pytest.fixture
def policy():
    old = object_io.policy()
    object_io.configure(RetryPolicy(retries=5, deadline_s=2.0, backoff_s=0.01, backoff_max_s=0.05), "http://test:9")
    yield object_io.policy()
    object_io.configure(old)


class Flaky:
    def __init__(self, errors):
        self.errors, self.calls = list(errors), 0

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_transient_errors_are_retried_and_counted(policy):
    before = object_io.STATS.snapshot()
    call = Flaky([OSError("SlowDown: Please reduce your request rate (503)"), ConnectionResetError("reset"),
                  TimeoutError("read timed out")])
    assert object_io.with_retries("GET b/k", call) == "ok" and call.calls == 4
    assert object_io.stats_since(before) == {"requests": 1, "retries": 3, "gave_up": 0,
                                             "last_error": "TimeoutError: read timed out"}


@pytest.mark.parametrize("error", [FileNotFoundError("b/k"), PermissionError("AccessDenied"),
                                   OSError("At least one of the pre-conditions you specified did not hold"),
                                   ValueError("a bug of the caller")])
def test_errors_a_retry_cannot_fix_are_raised_at_once(policy, error):
    call = Flaky([error])
    with pytest.raises(type(error)):
        object_io.with_retries("GET b/k", call)
    assert call.calls == 1


def test_give_up_after_the_attempts_naming_endpoint_request_and_last_error(policy):
    before = object_io.STATS.snapshot()
    call = Flaky([ConnectionRefusedError("Connection refused")] * 20)
    with pytest.raises(StorageUnavailable) as e:
        object_io.with_retries("GET bucket/key", call)
    assert call.calls == 6  # the first and 5 retries
    msg = str(e.value)
    assert "http://test:9" in msg and "GET bucket/key" in msg and "6 tries" in msg, msg
    assert "last error: ConnectionRefusedError: Connection refused" in msg, msg
    assert object_io.stats_since(before)["gave_up"] == 1


def test_the_deadline_bounds_a_request(policy):
    object_io.configure(RetryPolicy(retries=1000, deadline_s=0.5, backoff_s=0.05, backoff_max_s=0.1))
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match="storage.timeout_s 0.5"):
        object_io.with_retries("PUT b/k", Flaky([OSError("503 Service Unavailable")] * 10_000))
    assert time.monotonic() - t0 < 0.5 + 0.2


def test_async_requests_follow_the_same_policy(policy):
    async def run():
        errors = [OSError("InternalError (500)")] * 2

        async def make():
            if errors:
                raise errors.pop()
            return b"data"

        return await object_io.with_retries_async("GET b/k", make)

    before = object_io.STATS.snapshot()
    assert asyncio.run(run()) == b"data"
    assert object_io.stats_since(before)["retries"] == 2


def test_classification():
    assert retryable(OSError("An error occurred (SlowDown) when calling the PutObject operation"))
    assert retryable(ConnectionResetError())
    assert not retryable(FileNotFoundError())
    assert not retryable(StorageUnavailable("given up already"))
