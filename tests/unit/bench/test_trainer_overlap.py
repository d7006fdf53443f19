"""bench/trainer_vs_trl.py's overlap part and its facts about TRL and the pipeline, without
running a trainer: the staleness rule the generator follows, the overlap arithmetic, the
arguments it refuses, and a run of one part keeping the other part's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench.trainer_vs_trl as bench_module
from bench.overlap import overlap_summary, too_stale

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, Path]:
    """A model folder (only its config is read without a run) and a file of 6 prompts."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(6)))
    return model, prompts


def test_the_generator_follows_the_rollout_workers_staleness_bound():
    # Strict alternation: batch k waits for the weights of update k-1.
    assert too_stale(1, 0, max_staleness=0)
    assert not too_stale(1, 1, max_staleness=0)
    # One version of slack: batch k+1 is made beside update k, batch k+2 is not.
    assert not too_stale(1, 0, max_staleness=1)
    assert too_stale(2, 0, max_staleness=1)
    assert not too_stale(2, 1, max_staleness=1)


def test_the_overlap_gain_is_each_modes_best_run_with_the_repeats_beside_it():
    runs = {
        0: [
            {"samples_per_s": 1.0, "staleness": [0, 0]},
            {"samples_per_s": 2.0, "staleness": [0, 0]},
        ],
        1: [
            {"samples_per_s": 3.0, "staleness": [0, 1]},
            {"samples_per_s": 2.5, "staleness": [0, 1]},
        ],
    }
    summary = overlap_summary(runs, overlapped=1)
    assert summary["overlap_gain"] == pytest.approx(3.0 / 2.0)
    assert summary["overlap_gain_per_repeat"] == pytest.approx([3.0, 1.25])
    assert summary["overlap_samples_per_s"] == {
        "max_staleness_0": [1.0, 2.0],
        "max_staleness_1": [3.0, 2.5],
    }
    assert summary["overlap_staleness_seen"]["max_staleness_1"] == [[0, 1], [0, 1]]


def dry_run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bench.trainer_vs_trl", "--dry-run", "--prompts-per-step", "2",
         "--steps", "3", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (
            ["--parts", "trl,ppo"],
            "--parts takes a comma list of trl, overlap, pipeline, got 'trl,ppo'",
        ),
        (["--device", "tpu"], "device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--overlap-staleness", "0"], "overlap_staleness >= 1"),
        (["--overlap-threads", "0"], "overlap_threads must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(work, args, reason):
    model, prompts = work
    done = dry_run("--model-dir", str(model), "--prompts", str(prompts), *args)
    assert done.returncode == 2
    assert reason in done.stderr


def test_the_dry_run_accepts_a_cuda_device_without_one_and_names_the_parts(work):
    model, prompts = work
    done = dry_run("--model-dir", str(model), "--prompts", str(prompts), "--device", "cuda",
                   "--parts", "overlap")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["config"]["device"] == "cuda"
    assert report["parts"] == ["overlap"]
    assert report["trl_ppo_trainer"] == bench_module.trl_ppo_trainer()


def test_what_trl_ships_for_ppo_is_recorded():
    import trl

    figures = bench_module.ppo_figures()
    assert figures["ppo_vs_trl"] is None
    if bench_module.trl_ppo_trainer() is None:
        assert not hasattr(trl, "PPOTrainer")
        assert f"TRL {trl.__version__} ships no PPO trainer" in figures["ppo_vs_trl_missing"]
    else:
        assert figures["trl_ppo_trainer"] in figures["ppo_vs_trl_missing"]


def test_a_run_of_one_part_keeps_the_other_parts_figures(work, tmp_path, monkeypatch):
    model, prompts = work
    out = tmp_path / "trainer_vs_trl.json"
    before = {
        "learner_ratio_vs_trl": 1.27,
        "raw_runs": {"ours": [], "trl": []},
        "peak_rss_mb": {"ours": [4745.5], "trl": [4609.8]},  # per run, before bench/memory.py
    }
    out.write_text(json.dumps(before))
    monkeypatch.setattr(bench_module, "measure_overlap", lambda config: {"overlap_gain": 1.3})
    code = bench_module.main(
        ["--parts", "overlap", "--out", str(out), "--model-dir", str(model),
         "--prompts", str(prompts), "--prompts-per-step", "2", "--steps", "3"]
    )  # fmt: skip
    assert code == 0
    after = json.loads(out.read_text())
    assert after["learner_ratio_vs_trl"] == 1.27 and after["raw_runs"] == before["raw_runs"]
    assert after["overlap_gain"] == 1.3
    assert after["parts"] == ["overlap"]
    assert after["peak_rss_mb_per_run"] == {"ours": [4745.5], "trl": [4609.8]}
    assert all(isinstance(v, float) for v in after["peak_rss_mb"].values())  # {role: MB}
    assert after["ratio_vs_trl"] is None  # the pipeline part did not run, nor before
    assert "--parts pipeline" in after["ratio_vs_trl_missing"]
    assert after["ppo_vs_trl"] is None and "ppo_vs_trl_missing" in after
