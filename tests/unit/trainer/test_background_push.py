"""The trainer's publisher thread: at most one push in flight, the newest waiting version wins,
and the tensors it pushes are a copy the next update cannot change."""

from __future__ import annotations

import threading

import torch

from services.trainer.weights_push import NewestWins, snapshot


def test_one_job_in_flight_and_the_newest_waiting_one_wins():
    started, release = threading.Event(), threading.Event()
    done, running, most = [], [0], [0]
    lock = threading.Lock()

    def work(version: int) -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        started.set()
        release.wait(10)
        with lock:
            running[0] -= 1
        done.append(version)

    publisher = NewestWins(work)
    publisher.submit(1)
    assert started.wait(5)
    for version in (2, 3, 4):  # arrive while 1 is pushed: only 4 is still wanted
        publisher.submit(version)
    release.set()
    assert publisher.wait_idle(10)
    publisher.close(10)
    assert done == [1, 4]
    assert (publisher.superseded, most[0]) == (2, 1)


def test_a_failed_job_is_counted_and_the_next_one_runs():
    done = []

    def work(version: int) -> None:
        if version == 1:
            raise RuntimeError("replica down")
        done.append(version)

    publisher = NewestWins(work)
    publisher.submit(1)
    publisher.wait_idle(10)
    publisher.submit(2)
    publisher.close(10)
    assert (done, publisher.failed) == ([2], 1)


def test_close_finishes_the_waiting_job():
    done = []
    gate = threading.Event()
    publisher = NewestWins(lambda v: (gate.wait(10), done.append(v)))
    publisher.submit(1)
    publisher.submit(2)
    gate.set()
    publisher.close(10)
    assert done[-1] == 2


def test_snapshot_is_a_copy():
    weight = torch.ones(3)
    copy = snapshot({"w": weight})
    weight.add_(1.0)  # the next update
    assert torch.equal(copy["w"], torch.ones(3))
