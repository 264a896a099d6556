"""The worker threads that purge code hands blocking work to."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor

from cachesvc.purge.workers import WorkerThread


def _policy_and_nice() -> tuple[int, int]:
    return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")
@pytest_twisted.ensureDeferred
async def test_a_woken_worker_does_not_preempt_the_reactor() -> None:
    """Workers run under SCHED_BATCH (no wake-up preemption), keeping the nice they are given; the
    reactor thread keeps the normal policy."""
    plain, niced = WorkerThread(global_reactor, "test-plain"), WorkerThread(global_reactor, "test-niced", nice=19)
    for lane in (plain, niced):
        lane.start()
    try:
        mine = _policy_and_nice()
        assert await plain.submit(_policy_and_nice) == (os.SCHED_BATCH, mine[1])
        assert await niced.submit(_policy_and_nice) == (os.SCHED_BATCH, 19)
        assert mine[0] == os.SCHED_OTHER
    finally:
        await plain.stop()
        await niced.stop()
