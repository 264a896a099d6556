"""The worker threads that purge code hands blocking work to, and the inbox that wakes them."""

from __future__ import annotations

import gc
import os
import sys
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor as global_reactor

from cachesvc.purge.workers import WorkerThread, _EventInbox, _inbox

linux_only = pytest.mark.skipif(not hasattr(os, "eventfd"), reason="eventfd is Linux's")


@linux_only
def test_the_inbox_is_a_fifo_with_another_thread_putting_while_it_is_read() -> None:
    inbox = _EventInbox()
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.extend(inbox.get() for _ in range(20_000)), daemon=True)
    reader.start()
    for i in range(20_000):
        inbox.put(i)
        if i % 1000 == 0:
            os.sched_yield()  # let the reader empty it and block again now and then
    reader.join(10)
    assert not reader.is_alive()
    assert got == list(range(20_000))


@linux_only
def test_a_blocked_reader_wakes_for_one_put() -> None:
    inbox = _EventInbox()
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(inbox.get()), daemon=True)
    reader.start()
    reader.join(0.2)
    assert reader.is_alive() and got == []  # blocked: nothing there
    inbox.put("job")
    reader.join(10)
    assert got == ["job"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd")
def test_workers_that_are_dropped_close_their_eventfd() -> None:
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    lanes = [WorkerThread(global_reactor, f"test-{i}") for i in range(50)]
    assert len(os.listdir("/proc/self/fd")) >= before + (50 if hasattr(os, "eventfd") else 0)
    del lanes
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_other_systems_fall_back_to_a_simple_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "eventfd", raising=False)
    inbox = _inbox()
    inbox.put(1)
    inbox.put(2)
    assert (inbox.get(), inbox.get()) == (1, 2)


@pytest_twisted.ensureDeferred
async def test_jobs_run_in_order_and_those_submitted_before_start_wait_for_it() -> None:
    lane = WorkerThread(global_reactor, "test-order")
    ran: list[int] = []
    early = [lane.submit(lambda i=i: ran.append(i)) for i in range(3)]
    lane.start()
    try:
        late = [lane.submit(lambda i=i: ran.append(i)) for i in range(3, 200)]
        for d in early + late:
            await d.addTimeout(10, global_reactor)
        assert ran == list(range(200))
        worker = await lane.submit(threading.current_thread).addTimeout(10, global_reactor)
        assert worker is not threading.current_thread()
    finally:
        await lane.stop().addTimeout(10, global_reactor)
