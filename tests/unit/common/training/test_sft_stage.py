"""`sft` lowers the held-out loss on completion tokens, from plain and chat demonstrations, and
writes a folder the policy service loads."""

from __future__ import annotations

import torch

from services.common.models import load_causal_lm, load_tokenizer
from services.common.training.data import DataKind, load_records
from services.common.training.sft import SFTConfig, encode_records, held_out_loss, run_sft
from services.common.training.stage import make_runtime
from tests.unit.common.training.synthetic import counting_demonstrations, write_jsonl


def as_chat(row: dict) -> dict:
    return {
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
    }


def test_sft_lowers_held_out_loss(tmp_path, tiny_lm_dir):
    rows = counting_demonstrations(32, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", rows[:28] + [as_chat(r) for r in rows[28:]])
    held_out = write_jsonl(tmp_path / "eval.jsonl", counting_demonstrations(16, seed=2))
    config = SFTConfig(
        model=tiny_lm_dir,
        data=train,
        eval_data=held_out,
        output=tmp_path / "sft",
        epochs=1,
        learning_rate=1e-3,
    )
    summary = run_sft(config)

    metrics = summary["metrics"]
    assert summary["steps"] == 4
    assert metrics["eval/loss_after"] < metrics["eval/loss_before"] - 0.3

    # The written folder is the trained model: it gives the same held-out loss when loaded back.
    model, tokenizer = (
        load_causal_lm(config.output, torch.device("cpu"), torch.float32),
        load_tokenizer(config.output),
    )
    encoded = encode_records(
        tokenizer, load_records(held_out, DataKind.DEMONSTRATION), config.max_length, "eval"
    )
    cpu = SFTConfig(**{**vars(config), "device": "cpu", "dtype": "float32", "overwrite": True})
    assert (
        abs(
            held_out_loss(model, encoded, tokenizer.pad_token_id, cpu, make_runtime(cpu))
            - metrics["eval/loss_after"]
        )
        < 2e-2
    )
