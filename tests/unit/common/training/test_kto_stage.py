"""`kto` moves desirable completions' log-probability up relative to undesirable ones."""

from __future__ import annotations

from services.common.training.kto import KTOConfig, run_kto
from tests.unit.common.training.synthetic import colour_labels, write_jsonl


def test_kto_separates_desirable_from_undesirable_on_held_out_records(tmp_path, tiny_lm_dir):
    train = write_jsonl(tmp_path / "train.jsonl", colour_labels(32, seed=1))
    held_out = write_jsonl(tmp_path / "eval.jsonl", colour_labels(16, seed=2))
    config = KTOConfig(
        model=tiny_lm_dir, data=train, eval_data=held_out, output=tmp_path / "kto",
        epochs=1, batch_size=8, learning_rate=1e-3, beta=0.1,
    )  # fmt: skip
    summary = run_kto(config)
    metrics = summary["metrics"]

    assert summary["data"]["train"]["desirable"] == 16
    assert metrics["eval/reward_gap_before"] == 0.0  # policy == reference before any step
    assert metrics["eval/reward_gap_after"] > 0.05
    assert metrics["eval/logp_gap_after"] > metrics["eval/logp_gap_before"] + 0.5
