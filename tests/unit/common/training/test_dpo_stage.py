"""`dpo` raises the implicit-reward margin of chosen over rejected on held-out pairs."""

from __future__ import annotations

from services.common.training.dpo import DPOConfig, run_dpo
from tests.unit.common.training.synthetic import colour_pairs, write_jsonl


def test_dpo_raises_the_held_out_chosen_vs_rejected_margin(tmp_path, tiny_lm_dir):
    train = write_jsonl(tmp_path / "train.jsonl", colour_pairs(32, seed=1))
    held_out = write_jsonl(tmp_path / "eval.jsonl", colour_pairs(16, seed=2))
    config = DPOConfig(
        model=tiny_lm_dir, data=train, eval_data=held_out, output=tmp_path / "dpo",
        epochs=1, batch_size=8, learning_rate=1e-3, beta=0.1,
    )  # fmt: skip
    metrics = run_dpo(config)["metrics"]

    assert metrics["eval/reward_margin_before"] == 0.0  # policy == reference before any step
    assert metrics["eval/reward_margin_after"] > 0.05
    assert metrics["eval/reward_accuracy_after"] >= 0.9
    assert metrics["eval/logp_margin_after"] > metrics["eval/logp_margin_before"] + 0.5
    assert (config.output / "model.safetensors").is_file() and (
        config.output / "tokenizer.json"
    ).is_file()
