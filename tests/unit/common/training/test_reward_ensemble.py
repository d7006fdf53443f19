"""The reward-model ensemble and the pair weights: bootstrap counts, the weighted per-member
Bradley-Terry loss against a Python loop, an AI weight of 0 leaving the loss to the human pairs,
N-head folders trained, saved and loaded with N heads, and a 1-head run pinned to the numbers the
stage produced before ensembles existed."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from services.common.models import load_reward_model, load_tokenizer
from services.common.training.data import PreferencePair, load_records, parse_preference
from services.common.training.encoding import reward_batch
from services.common.training.losses import get_loss
from services.common.training.reward import (
    RewardConfig,
    bootstrap_weights,
    fit_reward,
    load_reward_for_training,
    run_train_reward,
    saved_heads,
    source_weights,
)
from services.common.training.stage import SUMMARY_FILE, ConfigError, make_runtime
from tests.unit.common.training.synthetic import reward_rows, write_jsonl

TOL = 1e-6


def _random(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_bootstrap_weights_are_reproducible_poisson_counts_that_differ_between_members():
    weights = bootstrap_weights(2000, 4, seed=7)
    assert weights.shape == (2000, 4)
    assert torch.equal(weights, bootstrap_weights(2000, 4, seed=7))  # the same run, the same draw
    assert not torch.equal(weights, bootstrap_weights(2000, 4, seed=8))
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.equal(weights[:, a], weights[:, b])
    assert torch.equal(weights, weights.round()) and weights.min() >= 0  # counts
    # Poisson(1): mean 1, variance 1, P(0) = 1/e.
    assert abs(weights.mean().item() - 1) < 0.05 and abs(weights.var().item() - 1) < 0.1
    assert abs((weights == 0).float().mean().item() - math.exp(-1)) < 0.03
    assert torch.equal(bootstrap_weights(5, 1, seed=7), torch.ones(5, 1))  # one head: every pair


def test_ensemble_loss_is_the_mean_over_members_of_weighted_means_over_pairs():
    chosen, rejected = _random(7, 3, seed=1), _random(7, 3, seed=2)
    weights = torch.tensor(
        [[0, 1, 2], [1, 1, 0], [3, 0, 1], [1, 2, 1], [0, 0, 1], [2, 1, 1], [1, 1, 1]]
    )
    loss, metrics = get_loss("bradley_terry_ensemble")(chosen, rejected, weights)
    per_member = []
    for j in range(3):
        total = sum(
            weights[i, j].item()
            * -math.log(1 / (1 + math.exp(-(chosen[i, j] - rejected[i, j]).item())))
            for i in range(7)
        )
        per_member.append(total / sum(weights[i, j].item() for i in range(7)))
    assert abs(loss.item() - sum(per_member) / 3) < TOL
    mean_c, mean_r = chosen.mean(-1).tolist(), rejected.mean(-1).tolist()
    assert metrics["reward/accuracy"] == pytest.approx(
        sum(c > r for c, r in zip(mean_c, mean_r)) / 7
    )
    margin = sum(c - r for c, r in zip(mean_c, mean_r)) / 7
    assert metrics["reward/margin"] == pytest.approx(margin, abs=TOL)  # float32 inside
    for j in range(3):
        expected = sum(chosen[i, j] > rejected[i, j] for i in range(7)).item() / 7
        assert metrics[f"reward/member_{j}/accuracy"] == pytest.approx(expected)
    responses = chosen.tolist() + rejected.tolist()
    stds = [math.sqrt(sum((v - sum(row) / 3) ** 2 for v in row) / 3) for row in responses]
    assert metrics["reward/spread"] == pytest.approx(sum(stds) / len(stds), abs=TOL)


def test_one_unweighted_member_is_the_plain_bradley_terry_loss():
    chosen, rejected = _random(9, seed=3).float(), _random(9, seed=4).float()
    plain, plain_metrics = get_loss("bradley_terry")(chosen, rejected)
    one, one_metrics = get_loss("bradley_terry_ensemble")(chosen[:, None], rejected[:, None])
    assert one.item() == plain.item()
    assert one_metrics["reward/accuracy"] == plain_metrics["reward/accuracy"]
    assert one_metrics["reward/spread"] == 0.0


def test_a_zero_weight_pair_does_not_change_the_loss_or_its_gradient():
    chosen, rejected = _random(6, 2, seed=5), _random(6, 2, seed=6)
    chosen.requires_grad_(True)
    loss_fn = get_loss("bradley_terry_ensemble")
    human = torch.tensor([True, False, True, True, False, True])
    weights = torch.where(human, 1.0, 0.0)[:, None].expand(6, 2)  # ai_weight = 0
    mixed, _ = loss_fn(chosen, rejected, weights)
    (grad,) = torch.autograd.grad(mixed, chosen)
    alone, _ = loss_fn(chosen[human], rejected[human])
    assert abs(mixed.item() - alone.item()) < 1e-12
    assert torch.all(grad[~human] == 0)
    with_ai, _ = loss_fn(chosen, rejected)  # ai_weight = 1: the AI pairs count
    assert abs(with_ai.item() - alone.item()) > 1e-3


def _pairs(rows: list[dict]) -> list[PreferencePair]:
    return [pair for row in rows for pair in parse_preference(row, "test")]


def _without_dropout(model_dir, out_dir):
    """A copy of the model with dropout off: dropout masks depend on the batch's shape."""
    shutil.copytree(model_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


def _fit_config(model_dir, tmp_path, **fields) -> RewardConfig:
    """A short, fast fit of the tiny reward model: 3 epochs at 5e-3, 48 tokens."""
    return RewardConfig(
        model=model_dir,
        data=tmp_path,
        output=tmp_path / "unused",
        epochs=3,
        learning_rate=5e-3,
        max_length=48,
        **fields,
    )


def test_ai_weight_zero_trains_as_the_human_pairs_alone(tmp_path, tiny_rm_dir):
    """One full batch, so both runs take the same steps: the model after training on human + AI
    pairs with ai_weight 0 is the model trained on the human pairs alone (to float noise)."""
    model_dir = _without_dropout(tiny_rm_dir, tmp_path / "rm")
    human = _pairs(reward_rows(12, seed=1, rankings_every=0))
    # AI labels of the inverted rule: they would pull the model the other way.
    ai = [
        PreferencePair(p.prompt, p.rejected, p.chosen, source="ai")
        for p in _pairs(reward_rows(12, seed=3, rankings_every=0))
    ]
    held_out = _pairs(reward_rows(10, seed=2, rankings_every=0))

    def fit(train, ai_weight):
        config = _fit_config(model_dir, tmp_path, batch_size=64, ai_weight=ai_weight)
        return fit_reward(config, train, held_out, make_runtime(config), random.Random(0))

    alone, zero, counted = fit(human, 1.0), fit(human + ai, 0.0), fit(human + ai, 1.0)
    for name, value in alone.after.items():
        assert zero.after[name] == pytest.approx(value, abs=1e-5), name
    assert abs(counted.after["loss"] - alone.after["loss"]) > 1e-4
    weighing = RewardConfig(model=tiny_rm_dir, data=tmp_path, output=tmp_path, ai_weight=0.25)
    assert source_weights(human[:1] + ai[:1], weighing).tolist() == [1.0, 0.25]


def test_the_weights_and_ensemble_size_are_checked(tmp_path, tiny_rm_dir):
    def config(**fields):
        return RewardConfig(model=tiny_rm_dir, data=tmp_path, output=tmp_path / "out", **fields)

    for fields, message in [
        ({"human_weight": 0, "ai_weight": 0}, "'human_weight' and 'ai_weight' are both 0"),
        ({"ai_weight": -1.0}, "'ai_weight' has an invalid value -1.0"),
        ({"human_weight": -0.5}, "'human_weight' has an invalid value -0.5"),
        ({"ensemble_size": 0}, "'ensemble_size' has an invalid value 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config(**fields).validate()
    ai_only = [PreferencePair("p", "a", "b", source="ai")]
    cfg = config(ai_weight=0.0)
    with pytest.raises(ConfigError, match="every training pair has weight 0"):
        fit_reward(cfg, ai_only, [], make_runtime(cfg), random.Random(0))


def _scores(model, tokenizer, pairs):
    prompts = [p.prompt for p in pairs]
    with torch.no_grad():
        chosen = model(**reward_batch(tokenizer, prompts, [p.chosen for p in pairs], 48)).logits
        rejected = model(**reward_batch(tokenizer, prompts, [p.rejected for p in pairs], 48)).logits
    return chosen, rejected  # (P, M)


def test_fit_reward_reports_which_held_out_pairs_each_version_ranks_right(tmp_path, tiny_rm_dir):
    """The per-pair marks the refresh's significance test counts: before from the starting
    model, after from the trained one, each pair marked as scoring it directly marks it."""
    model_dir = _without_dropout(tiny_rm_dir, tmp_path / "rm")
    train = _pairs(reward_rows(16, seed=1, rankings_every=0))
    held_out = _pairs(reward_rows(12, seed=2, rankings_every=0))
    config = _fit_config(model_dir, tmp_path, batch_size=8)
    start = load_reward_model(model_dir, torch.device("cpu"), torch.float32).eval()
    expected_before = _ranked_right(start, load_tokenizer(model_dir), held_out)
    fitted = fit_reward(config, train, held_out, make_runtime(config), random.Random(0))
    expected_after = _ranked_right(fitted.model, fitted.tokenizer, held_out)
    assert fitted.correct_before == expected_before
    assert fitted.correct_after == expected_after
    assert fitted.correct_before != fitted.correct_after  # training changed some rankings
    for marks, metrics in (
        (fitted.correct_before, fitted.before),
        (fitted.correct_after, fitted.after),
    ):
        assert len(marks) == len(held_out)
        assert metrics["accuracy"] == pytest.approx(sum(marks) / len(marks), abs=1e-6)


def _ranked_right(model, tokenizer, pairs) -> list[bool]:
    chosen, rejected = _scores(model, tokenizer, pairs)
    return (chosen.mean(-1) > rejected.mean(-1)).tolist()


def test_an_ensemble_is_saved_with_its_heads_and_its_metrics_are_the_heads(tmp_path, tiny_rm_dir):
    train = write_jsonl(tmp_path / "train.jsonl", reward_rows(24, seed=1))
    held = write_jsonl(tmp_path / "eval.jsonl", reward_rows(12, seed=2))
    output = tmp_path / "rm3"
    summary = run_train_reward(
        RewardConfig(
            model=tiny_rm_dir,
            data=train,
            eval_data=held,
            output=output,
            epochs=2,
            batch_size=8,
            learning_rate=2e-3,
            max_length=48,
            ensemble_size=3,
        )
    )
    assert summary["ensemble_size"] == 3
    assert len(json.loads((output / "config.json").read_text())["id2label"]) == 3  # num_labels
    assert saved_heads(output) == 3 and saved_heads(tiny_rm_dir) == 1
    model = load_reward_model(output, torch.device("cpu"), torch.float32)
    assert model.config.num_labels == 3
    chosen, rejected = _scores(model, load_tokenizer(output), load_records(held, "preference"))
    metrics = summary["metrics"]
    ensemble = (chosen.mean(-1) > rejected.mean(-1)).float().mean().item()
    assert metrics["eval/accuracy_after"] == pytest.approx(ensemble, abs=1e-6)
    for j in range(3):
        member = (chosen[:, j] > rejected[:, j]).float().mean().item()
        assert metrics[f"eval/member_{j}_accuracy_after"] == pytest.approx(member, abs=1e-6)
    spread = torch.cat([chosen, rejected]).std(-1, unbiased=False).mean().item()
    assert metrics["eval/spread_after"] == pytest.approx(spread, rel=1e-4)
    assert spread > 0  # heads trained on different bootstrap samples disagree
    # Training resumes from it with its 3 heads, not fresh ones.
    again = load_reward_for_training(output, torch.device("cpu"), 3)
    assert torch.equal(again.classifier.weight, model.classifier.weight)


def test_a_bare_encoder_gets_a_fresh_head_and_one_head_loads_as_before(tmp_path, tiny_rm_dir):
    from transformers import BertModel

    classifier = load_reward_model(tiny_rm_dir, torch.device("cpu"), torch.float32)
    assert classifier.config.num_labels == 1
    encoder_dir = tmp_path / "encoder"
    BertModel(classifier.config).save_pretrained(encoder_dir)
    load_tokenizer(tiny_rm_dir).save_pretrained(encoder_dir)
    assert saved_heads(encoder_dir) is None
    assert load_reward_model(encoder_dir, torch.device("cpu"), torch.float32).config.num_labels == 1
    assert load_reward_for_training(encoder_dir, torch.device("cpu"), 4).config.num_labels == 4


# Measured with this configuration on the stage as it was before ensembles and pair weights
# (commit 550172e), CPU float32: a 1-head run with default weights must reproduce them.
ONE_HEAD_BEFORE_ENSEMBLES = {
    "eval/accuracy_before": 0.699999988079071,
    "eval/margin_before": 1.3613049304694869e-05,
    "eval/loss_before": 0.6931403875350952,
    "train/loss_last": 0.6955422759056091,
    "eval/accuracy_after": 0.949999988079071,
    "eval/margin_after": 0.0012248989660292864,
    "eval/loss_after": 0.6925350427627563,
}


def test_a_one_head_run_reproduces_the_numbers_from_before_ensembles(tmp_path, tiny_rm_dir):
    train = write_jsonl(tmp_path / "train.jsonl", reward_rows(24, seed=1))
    held = write_jsonl(tmp_path / "eval.jsonl", reward_rows(12, seed=2))
    summary = run_train_reward(
        RewardConfig(
            model=tiny_rm_dir,
            data=train,
            eval_data=held,
            output=tmp_path / "rm",
            epochs=2,
            batch_size=8,
            learning_rate=2e-3,
            max_length=48,
        )
    )
    assert summary["steps"] == 10 and summary["ensemble_size"] == 1
    assert set(summary["metrics"]) == set(ONE_HEAD_BEFORE_ENSEMBLES)  # no ensemble keys added
    for name, value in ONE_HEAD_BEFORE_ENSEMBLES.items():
        assert summary["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    on_disk = json.loads((tmp_path / "rm" / SUMMARY_FILE).read_text())
    assert on_disk["ensemble_size"] == 1 and on_disk["metrics"] == summary["metrics"]
