"""`rlhf eval --judge`: the pairwise verdicts come from a real JudgeService over gRPC (here its
rule-based mode, the longer answer is better, so every verdict can be checked by hand), while
the annotator still scores each answer; the summary names the judge; a judge that cannot be
reached is a config error before any model loads."""

from __future__ import annotations

import pytest

from services.eval.run import EvalConfig, EvalError, run_eval
from tests.integration.judge.judge_stack import judge_stack
from tests.support.tiny_models import tiny_causal_lm
from tests.unit.eval.test_run import ROWS, write_prompts

LONGER = "tests.integration.judge.rules:longer"


def test_verdicts_come_from_the_judge_service(tmp_path, tiny_lm_dir):
    other = tiny_causal_lm(tmp_path / "other", seed=3)
    with judge_stack(None, annotator=LONGER) as judge:
        summary = run_eval(
            EvalConfig(
                candidate=str(other),
                baseline=str(tiny_lm_dir),
                data=write_prompts(tmp_path / "prompts.jsonl", ROWS),
                output=tmp_path / "eval",
                annotator="services.common.annotator_rules:polite",
                judge=f"grpc://{judge.address}",
                max_new_tokens=8,
                temperature=1.0,
                device="cpu",
                examples=len(ROWS),
            )
        )
    expected = [
        "win" if len(e["candidate"]) > len(e["baseline"]) else
        "loss" if len(e["candidate"]) < len(e["baseline"]) else "tie"
        for e in summary["examples"]
    ]  # fmt: skip
    assert [e["verdict"] for e in summary["examples"]] == expected
    assert len(set(expected)) > 1, "the answers all had one length: the check proves nothing"
    metrics = summary["metrics"]
    assert (metrics["wins"], metrics["losses"]) == (expected.count("win"), expected.count("loss"))
    assert summary["judge"]["judge_model"] == LONGER and summary["judge"]["mode"] == "rules"
    assert summary["annotator"] == "services.common.annotator_rules:polite"  # scores still its


def test_an_unreachable_judge_is_refused_before_models_load(tmp_path):
    config = EvalConfig(
        candidate=str(tmp_path / "no-such-model"),
        baseline=str(tmp_path / "no-such-model"),
        data=write_prompts(tmp_path / "prompts.jsonl", ROWS),
        output=tmp_path / "eval",
        judge="grpc://127.0.0.1:1",
    )
    with pytest.raises(EvalError, match="config field 'judge'"):
        run_eval(config)
    with pytest.raises(EvalError, match="host:port"):
        run_eval(EvalConfig(**{**config.__dict__, "judge": "not an address"}))
