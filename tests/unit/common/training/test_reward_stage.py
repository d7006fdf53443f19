"""`train-reward` learns a preference rule from pairs and rankings, and writes a folder that the
reward service loads and scores (through `encode_for_reward`) as the trainer did."""

from __future__ import annotations

import hashlib
import json

import torch

from services.common.models import load_reward_model, load_tokenizer
from services.common.training.data import DataKind, load_records
from services.common.training.encoding import reward_batch
from services.common.training.reward import RewardConfig, run_train_reward
from services.common.training.stage import SUMMARY_FILE
from tests.unit.common.training.synthetic import reward_rows, write_jsonl, write_parquet


def test_reward_model_reaches_90_percent_held_out_pairwise_accuracy(tmp_path, tiny_rm_dir):
    train = write_jsonl(
        tmp_path / "train.jsonl", reward_rows(90, seed=1)
    )  # 30 rankings of 3 + 60 pairs
    held_out = write_parquet(tmp_path / "eval.parquet", reward_rows(60, seed=2))
    output = tmp_path / "rm"
    config = RewardConfig(
        model=tiny_rm_dir, data=train, eval_data=held_out, output=output,
        epochs=3, batch_size=16, learning_rate=2e-3, max_length=64,
    )  # fmt: skip
    summary = run_train_reward(config)

    metrics = summary["metrics"]
    assert summary["data"]["train"]["records"] == 30 * 3 + 60  # rankings expanded to K(K-1)/2 pairs
    assert metrics["eval/accuracy_after"] >= 0.9
    assert metrics["eval/loss_after"] < 0.5 < metrics["eval/loss_before"]

    # The folder loads as the service loads it, and scores the held-out pairs the same way.
    on_disk = json.loads((output / SUMMARY_FILE).read_text())
    assert (
        on_disk["data"]["eval"]["sha256"] == hashlib.sha256(held_out.read_bytes()).hexdigest()
        and on_disk["metrics"] == metrics
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval.parquet",
        "rm",
        "train.jsonl",
    ]  # no staging left
    model, tokenizer = (
        load_reward_model(output, torch.device("cpu"), torch.float32),
        load_tokenizer(output),
    )
    pairs = load_records(held_out, DataKind.PREFERENCE)
    prompts = [p.prompt for p in pairs]
    with torch.no_grad():
        chosen = model(
            **reward_batch(tokenizer, prompts, [p.chosen for p in pairs], 64)
        ).logits.squeeze(-1)
        rejected = model(
            **reward_batch(tokenizer, prompts, [p.rejected for p in pairs], 64)
        ).logits.squeeze(-1)
    accuracy = (chosen > rejected).float().mean().item()
    assert abs(accuracy - metrics["eval/accuracy_after"]) < 1e-6
