"""The publisher writes a version's file while that step's checkpoint is still being written.
With `push_before_durable` (the default) it names and pushes it at once, and a restart numbers
past it (`resume_version`); without, the folder takes its version's name, and is pushed, only
once the checkpoint is on disk: a crash in between leaves no `v{N}` at all."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import torch

from services.trainer.loop import TrainerService, resume_version
from services.trainer.weights_push import read_manifest, stage_version, version_dir


class Checkpoints:
    """Stands in for checkpoint.BackgroundWriter: durable when the test says so."""

    def __init__(self, durable: bool):
        self.durable, self.asked, self.release = durable, threading.Event(), threading.Event()

    def wait_durable(self, step: int, timeout_s: float | None = None) -> bool:
        self.asked.set()
        self.release.wait(10)
        return self.durable


class Counter:
    def __init__(self):
        self.value = 0.0

    def inc(self, n: float = 1.0) -> None:
        self.value += n

    def observe(self, v: float) -> None:
        self.value = v


def trainer(tmp_path, checkpoints, push_before_durable: bool = False) -> TrainerService:
    service = object.__new__(TrainerService)  # only what the publisher's work reads
    service.settings = SimpleNamespace(
        weights_dir=tmp_path,
        policy_addresses=[],
        push_chunk_bytes=1 << 20,
        push_timeout_s=5.0,
        max_message_bytes=64 << 20,
        push_transport="side_channel",
        push_before_durable=push_before_durable,
    )
    service.checkpoints = checkpoints
    service.metrics = SimpleNamespace(push_failures=Counter(), push_time=Counter())
    service.producer = None
    service.written = []
    service.log = SimpleNamespace(write=service.written.append)
    return service


def tensors() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}


def stage_of(tmp_path, staged: list):
    def stage():
        staged.append(stage_version(tmp_path, 3, tensors()))
        return staged[-1]

    return stage


def test_the_file_is_written_beside_the_checkpoint_and_named_once_it_is_durable(tmp_path):
    checkpoints, staged = Checkpoints(durable=True), []
    service = trainer(tmp_path, checkpoints)
    push = threading.Thread(
        target=service._push_version, args=((3, 7, stage_of(tmp_path, staged)),)
    )
    push.start()
    assert checkpoints.asked.wait(10)
    # The publisher waits for step 7's checkpoint with the file already written, unnamed.
    assert staged and (staged[0] / "model.safetensors").is_file()
    assert not version_dir(tmp_path, 3).exists() and service.written == []
    checkpoints.release.set()
    push.join(10)
    folder = version_dir(tmp_path, 3)
    assert folder.is_dir() and not staged[0].exists()
    assert read_manifest(folder).weights_version == 3
    assert [(e["event"], e["weights_version"], e["step"]) for e in service.written] == [
        ("publish", 3, 7)
    ]


def test_a_failed_checkpoint_leaves_neither_the_version_nor_its_file(tmp_path):
    checkpoints, staged = Checkpoints(durable=False), []
    checkpoints.release.set()
    service = trainer(tmp_path, checkpoints)
    service._push_version((3, 7, stage_of(tmp_path, staged)))
    assert staged and not staged[0].exists()
    assert not version_dir(tmp_path, 3).exists()
    assert list(tmp_path.iterdir()) == [] and service.written == []


def test_pushed_before_durable_the_version_is_named_and_pushed_without_waiting(tmp_path):
    checkpoints, staged = Checkpoints(durable=False), []  # never durable: it is not asked
    service = trainer(tmp_path, checkpoints, push_before_durable=True)
    service._push_version((3, 7, stage_of(tmp_path, staged)))
    assert not checkpoints.asked.is_set()
    folder = version_dir(tmp_path, 3)
    assert folder.is_dir() and not staged[0].exists()
    assert read_manifest(folder).weights_version == 3
    assert [(e["event"], e["weights_version"], e["step"]) for e in service.written] == [
        ("publish", 3, 7)
    ]


def test_a_restart_resumes_past_every_version_folder_written():
    assert resume_version(5, 0) == (5, False)  # no folder (nothing pushed yet)
    assert resume_version(5, 5) == (5, False)  # the checkpoint's own version: pushed again
    assert resume_version(5, 4) == (5, False)  # its push had not happened yet
    assert resume_version(5, 7) == (8, True)  # 6 and 7 were pushed past it: 8 is new
    assert resume_version(1, 3) == (4, True)  # no checkpoint at all (the initial version)
