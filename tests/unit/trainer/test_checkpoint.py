"""Checkpoints are atomic: a torn write is never loaded, and the newest complete one wins."""

from __future__ import annotations

import os

import pytest
import torch

from services.trainer import checkpoint
from services.trainer.checkpoint import Checkpoint, ConsumerPosition


def _ckpt(step: int) -> Checkpoint:
    torch.manual_seed(step)
    return Checkpoint(
        step=step,
        weights_version=step + 1,
        tensors={"policy.w": torch.randn(3, 4), "value_head.b": torch.randn(2)},
        trainer_state={
            "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "lr": 0.1},
            "rng": torch.get_rng_state(),
        },
        positions={
            0: ConsumerPosition({0: 5, 3: 9}, ["a", "b"], ["x", "a", "b"]),
            1: ConsumerPosition({1: 2}),
        },
    )


def test_round_trip_keeps_everything(tmp_path):
    saved = _ckpt(3)
    checkpoint.write(tmp_path, saved)
    loaded = checkpoint.latest(tmp_path)
    assert loaded.step == 3 and loaded.weights_version == 4
    assert torch.equal(loaded.tensors["policy.w"], saved.tensors["policy.w"])
    assert torch.equal(loaded.trainer_state["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert torch.equal(loaded.trainer_state["rng"], saved.trainer_state["rng"])
    assert loaded.positions[0].offsets == {0: 5, 3: 9}
    assert loaded.positions[0].skip_ids == ["a", "b"]
    assert loaded.positions[1].offsets == {1: 2}


def test_unfinished_temp_folder_is_never_loaded(tmp_path):
    checkpoint.write(tmp_path, _ckpt(1))
    # A crash during step 2's write leaves only its temp folder (with some files in it).
    tmp = checkpoint.begin(tmp_path, 2)
    checkpoint.write_position(tmp, 0, ConsumerPosition({0: 99}))
    (tmp / checkpoint.MODEL_FILE).write_bytes(b"half a model")
    assert checkpoint.latest(tmp_path).step == 1
    # The next successful checkpoint cleans the debris up.
    checkpoint.write(tmp_path, _ckpt(3))
    assert not tmp.exists()
    assert checkpoint.latest(tmp_path).step == 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "missing_file"])
def test_torn_or_rotten_checkpoint_falls_back_to_the_previous(tmp_path, damage):
    checkpoint.write(tmp_path, _ckpt(1), keep=5)
    newest = checkpoint.write(tmp_path, _ckpt(2), keep=5)
    model = newest / checkpoint.MODEL_FILE
    if damage == "truncate":
        os.truncate(model, model.stat().st_size // 2)
    elif damage == "flip":
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / checkpoint.MANIFEST).unlink()
    else:
        (newest / checkpoint.TRAINER_STATE_FILE).unlink()
    skipped = []
    loaded = checkpoint.latest(tmp_path, on_skip=lambda path, why: skipped.append(path))
    assert loaded.step == 1
    assert skipped == [newest]
    with pytest.raises(ValueError, match="not usable"):
        checkpoint.load(newest)


def test_prune_keeps_the_newest(tmp_path):
    for step in range(1, 6):
        checkpoint.write(tmp_path, _ckpt(step), keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == [
        "step-00000005",
        "step-00000004",
    ]


def test_trainer_state_with_arbitrary_objects_is_refused_on_load(tmp_path):
    import datetime

    bad = _ckpt(1)
    bad.trainer_state = {
        "obj": datetime.date(2024, 1, 1)
    }  # any non-tensor class: unpickling refused
    folder = checkpoint.write(tmp_path, bad)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        checkpoint.load(folder)


def test_the_manifest_lists_blake3_and_an_older_sha256_manifest_still_loads(tmp_path):
    import hashlib
    import json

    import blake3

    folder = checkpoint.write(tmp_path, _ckpt(1))
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    model = (folder / checkpoint.MODEL_FILE).read_bytes()
    assert manifest["blake3"][checkpoint.MODEL_FILE] == blake3.blake3(model).hexdigest()
    # A checkpoint written before BLAKE3 (sha256 only) still verifies, and still catches rot.
    older = {
        "step": 1,
        "sha256": {
            name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
            for name in manifest["blake3"]
        },
    }
    (folder / checkpoint.MANIFEST).write_text(json.dumps(older))
    assert checkpoint.verify(folder) is None
    assert checkpoint.latest(tmp_path).step == 1
    (folder / checkpoint.MODEL_FILE).write_bytes(model[:-1] + bytes([model[-1] ^ 1]))
    assert checkpoint.verify(folder) == "model.safetensors does not match its sha256"


def test_cloned_state_is_not_changed_by_later_in_place_updates():
    live = {"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "ids": [torch.zeros(2), 5]}}
    copy = checkpoint.cloned(live)
    live["optimizer"]["state"][0]["exp_avg"].add_(1)
    live["optimizer"]["ids"][0].fill_(7)
    assert torch.equal(copy["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert torch.equal(copy["optimizer"]["ids"][0], torch.zeros(2))
    assert copy["optimizer"]["ids"][1] == 5


def test_background_writer_reports_each_durable_checkpoint_once_in_order(tmp_path):
    writer = checkpoint.BackgroundWriter(tmp_path, keep=5)
    for step in (1, 2, 3):
        writer.submit(_ckpt(step))
    assert writer.wait_durable(3, timeout_s=60)
    done = writer.durable()
    writer.close()
    assert [p.offsets for p in done] == [{0: 5, 3: 9}, {1: 2}] * 3
    assert writer.durable() == []
    names = [p.name for p in checkpoint.complete_checkpoints(tmp_path)]
    assert names == ["step-00000003", "step-00000002", "step-00000001"]
    assert checkpoint.latest(tmp_path).step == 3


def test_background_writer_hands_a_failed_write_to_the_caller(tmp_path):
    blocker = tmp_path / "root"
    blocker.write_text("a file where the checkpoint folder should be")
    writer = checkpoint.BackgroundWriter(blocker, keep=2)
    writer.submit(_ckpt(1))
    assert writer.wait_durable(1, timeout_s=60) is False
    with pytest.raises(RuntimeError, match="a checkpoint write failed"):
        writer.durable()
    with pytest.raises(RuntimeError, match="a checkpoint write failed"):
        writer.submit(_ckpt(2))
    with pytest.raises(RuntimeError, match="a checkpoint write failed"):
        writer.close()
    assert writer.durable_step == 0
