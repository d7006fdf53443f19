"""bench/trainer_vs_trl.py without running either trainer: `--dry-run` checks the arguments and
that both sides' code imports (what CI runs), bad arguments exit 2 with the reason, and the
figures are the arithmetic the module docstring promises (warm-up step left out, TRL over ours).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.trainer_vs_trl import BenchConfig, summarise

REPO_ROOT = Path(__file__).resolve().parents[3]


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bench.trainer_vs_trl", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder (only its config is read by a dry run) and a file of 6 prompts."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(6)))
    return model, prompts


def test_dry_run_checks_the_arguments_and_imports_every_piece(work):
    import trl

    model, prompts = work
    done = bench(
        "--dry-run", "--model-dir", str(model), "--prompts", str(prompts),
        "--prompts-per-step", "2", "--steps", "3", "--beta", "0.1",
        "--trl-gradient-checkpointing", "true",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ok"] is True
    assert report["trl_version"] == trl.__version__
    assert report["config"]["model_dir"] == str(model)
    assert report["config"]["prompts_per_step"] == 2
    assert report["config"]["steps"] == 3
    assert report["config"]["beta"] == 0.1
    assert report["config"]["trl_gradient_checkpointing"] is True
    assert report["config"]["ours_optimizer"] == "deployed"


def test_quick_presets_a_smaller_run(work):
    model, prompts = work
    done = bench(
        "--dry-run", "--quick", "--model-dir", str(model), "--prompts", str(prompts),
        "--steps", "3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout.strip().splitlines()[-1])["config"]
    assert config["prompts_per_step"] == 2 and config["max_new_tokens"] == 32
    assert config["max_new_tokens"] < BenchConfig.max_new_tokens
    assert config["trl_gradient_checkpointing"] is False  # the same work as ours by default


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--steps", "1"], "steps must be >= 2"),
        (["--group-size", "1"], "group_size must be >= 2"),
        (["--prompts-per-step", "4", "--steps", "2"], "6 prompts, need 8"),
        (["--beta", "-0.5"], "beta must be >= 0"),
        (["--ours-optimizer", "sgd"], "ours_optimizer must be deployed or fused"),
        (["--trl-gradient-checkpointing", "maybe"], "expected true or false, got 'maybe'"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(work, args, reason):
    model, prompts = work
    done = bench("--dry-run", "--model-dir", str(model), "--prompts", str(prompts), *args)
    assert done.returncode == 2
    assert reason in done.stderr


def test_a_missing_model_folder_is_named(tmp_path, work):
    _, prompts = work
    done = bench("--dry-run", "--model-dir", str(tmp_path / "nowhere"), "--prompts", str(prompts))
    assert done.returncode == 2
    assert "no config.json" in done.stderr and "nowhere" in done.stderr


def run(update_s: list[float], generate_s: list[float], samples: int, tokens: int) -> dict:
    """A run's record as a worker writes it; CPU seconds are half the wall seconds here."""
    steps = [
        {
            "update_s": u,
            "generate_s": g,
            "update_cpu_s": u / 2,
            "samples": samples,
            "response_tokens": tokens,
        }
        for u, g in zip(update_s, generate_s)
    ]
    return {"steps": steps, "peak_rss_mb": 100.0}


def test_figures_leave_out_the_warm_up_and_put_trl_over_ours():
    # Warm-up steps (first) are huge on purpose: they must not count.
    ours = [run([99.0, 1.0, 1.0], [99.0, 2.0, 2.0], 8, 80), run([99.0, 2.0, 2.0], [99.0, 2.0, 2.0], 8, 80)]  # fmt: skip
    trl = [run([99.0, 3.0, 3.0], [99.0, 1.0, 1.0], 8, 40), run([99.0, 3.0, 3.0], [99.0, 1.0, 1.0], 8, 40)]  # fmt: skip
    result = summarise({"ours": ours, "trl": trl})
    # Update seconds per sample: ours 2/16 and 4/16, TRL 6/16 in both runs. The headline takes
    # each side's best run; the median ratio and the per-repeat ratios are beside it.
    assert result["learner_ratio_vs_trl"] == pytest.approx((6 / 16) / (2 / 16))
    assert result["learner_ratio_vs_trl_median"] == pytest.approx((6 / 16) / (3 / 16))
    assert result["learner_ratio_vs_trl_per_repeat"] == pytest.approx([3.0, 1.5])
    assert result["learner_ratio_vs_trl_worst_best"] == pytest.approx([1.5, 3.0])
    assert result["learner_cpu_ratio_vs_trl"] == pytest.approx((3 / 16) / (1 / 16))
    # Per response token, TRL's responses were half as long: 6000/80 ms vs 2000/160 ms.
    assert result["learner_token_ratio_vs_trl"] == pytest.approx((6000 / 80) / (2000 / 160))
    # End to end, TRL: 16 samples in 8 s (2/s); ours at best 16 in 6 s.
    assert result["trl_samples_per_s_end_to_end"] == pytest.approx(2.0)
    assert result["inprocess_end_to_end_ratio_vs_trl"] == pytest.approx((16 / 6) / 2.0)
    assert result["sides"]["ours"]["response_tokens_mean"]["median"] == 10
    assert result["sides"]["trl"]["peak_rss_mb"]["runs"] == [100.0, 100.0]
