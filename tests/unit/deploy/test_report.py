"""The demo's report: report.json round-trips, five real PNGs, one self-contained and escaped
index.html, check_report naming what is missing, and an empty run still rendering."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from deploy.local.report import (
    FIGURES,
    PNG_MAGIC,
    REQUIRED_KEYS,
    check_report,
    feedback_counts,
    reward_model_changes,
    status_line,
    write_report,
)

SCRIPT = "<script>alert('x')</script>"


def _metrics(win_rate: float) -> dict:
    return {
        "win_rate": win_rate,
        "win_rate_ci_low": win_rate - 0.09,
        "win_rate_ci_high": win_rate + 0.07,
        "wins": 70,
        "losses": 24,
        "ties": 6,
        "n": 100,
        "candidate_score_mean": 0.8,
        "baseline_score_mean": 0.6,
        "candidate_length_mean": 30.0,
        "baseline_length_mean": 55.0,
        "kl_to_reference": 3.2,
    }


def _report() -> dict:
    """A 20-step run: the reward model is swapped at step 11, and from step 13 the reward keeps
    rising while the gold score falls (the picture of reward hacking)."""
    steps = [
        {
            "step": i,
            "t_s": 30.0 * i,
            "weights_version": i + 1,
            "reward_model_version": 1 if i <= 10 else 2,
            "reward_mean": 0.05 * i - 0.2,
            "gold_mean": 0.5 + 0.02 * min(i, 12) - 0.03 * max(0, i - 12),
            "kl": 0.15 * i,
            "kl_coef": 0.05 + 0.001 * i,
            "rollouts": 32,
        }
        for i in range(1, 21)
    ]
    examples = [
        {
            "prompt": f'Question {i} & "quotes"?',
            "before": "A long and rambling answer " * 3,
            "after": SCRIPT if i == 0 else f"Short answer {i}.",
            "before_score": 0.6,
            "after_score": 0.9,
        }
        for i in range(7)
    ]
    return {
        "preset": "quick",
        "seed": 0,
        "algorithm": "ppo",
        "annotator": "services.common.annotator_rules:helpful_concise",
        "wall_s": 312.5,
        "win_rate_vs_sft": 0.74,
        "win_rate_vs_sft_ci_low": 0.65,
        "win_rate_vs_sft_ci_high": 0.81,
        "win_rate_vs_base": 0.8,
        "win_rate_vs_base_ci_low": 0.71,
        "win_rate_vs_base_ci_high": 0.86,
        "kl_to_reference": 3.2,
        "kl_budget": 8.0,
        "reward_model_versions": [1, 2],
        "stages": {
            "sft": {"eval_loss_before": 2.1, "eval_loss_after": 1.6, "seconds": 120.0},
            "reward": {"held_out_accuracy": 0.78, "pairs": 900, "rankings": 150, "seconds": 200.0},
            "rl": {"steps": 20, "seconds": 600.0},
            "eval": {"seconds": 90.0},
        },
        "steps": steps,
        "refreshes": [
            {
                "t_s": 300.0,
                "version": 2,
                "accuracy_before": 0.70,
                "accuracy_after": 0.74,
                "published": True,
                "new_pairs": 40,
            },
            {
                "t_s": 450.0,
                "version": 3,
                "accuracy_before": 0.74,
                "accuracy_after": 0.69,
                "published": False,
                "new_pairs": 25,
            },
        ],
        "feedback": [
            {"t_s": 12.0, "kind": "chat"},
            {"t_s": 13.0, "kind": "thumbs_up"},
            {"t_s": 13.5, "kind": "thumbs_down"},
            {"t_s": 40.0, "kind": "chat"},
            {"t_s": 41.0, "kind": "ranking"},
        ],
        "eval_vs_sft": {"metrics": _metrics(0.74)},
        "eval_vs_base": {"metrics": _metrics(0.8)},
        "examples": examples,
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A complete report, written once for the module; tests that damage it work on a copy."""
    folder = tmp_path_factory.mktemp("report")
    write_report(_report(), folder)
    return folder


@pytest.fixture
def damaged(written: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "copy"))


def test_report_json_round_trips_with_every_required_key(written: Path):
    document = json.loads((written / "report.json").read_text(encoding="utf-8"))
    assert set(REQUIRED_KEYS) <= document.keys()
    assert document.pop("figures") == list(FIGURES)
    assert document == _report()


def test_every_figure_is_a_readable_png(written: Path):
    for name in FIGURES:
        png = (written / name).read_bytes()
        assert png.startswith(PNG_MAGIC), name
        with Image.open(written / name) as image:
            width, height = image.size
            assert image.format == "PNG"
        assert 300 <= width <= 1200 and 200 <= height <= 800, (name, width, height)


def test_index_is_self_contained_and_embeds_every_figure(written: Path):
    page = (written / "index.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page


def test_index_escapes_answers_and_shows_five_examples(written: Path):
    page = (written / "index.html").read_text(encoding="utf-8")
    assert SCRIPT not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "Question 0 &amp; &quot;quotes&quot;?" in page
    assert "Question 4 " in page and "Question 5 " not in page


def test_index_shows_the_key_numbers_and_one_row_per_step(written: Path):
    page = (written / "index.html").read_text(encoding="utf-8")
    for text in [
        "quick",
        "ppo",
        "helpful_concise",
        "5 min 12 s",
        "74.0%",
        "65.0%",
        "81.0%",
        "80.0%",
        "3.20 / 8.00 (within)",
        "v1, v2",
        "2.100 → 1.600",
        "78.0%",
    ]:
        assert text in page, text
    steps_table = page.split('<table id="steps">', 1)[1].split("</table>", 1)[0]
    assert steps_table.count("<tr>") == 1 + 20  # header and the steps


def test_check_report_is_empty_for_a_complete_report(written: Path):
    assert check_report(written) == []


def test_check_report_names_a_deleted_figure(damaged: Path):
    (damaged / "kl.png").unlink()
    assert check_report(damaged) == ["missing file kl.png"]


def test_check_report_names_a_missing_key(damaged: Path):
    document = json.loads((damaged / "report.json").read_text(encoding="utf-8"))
    del document["kl_budget"]
    (damaged / "report.json").write_text(json.dumps(document))
    assert check_report(damaged) == ["report.json lacks key 'kl_budget'"]


def test_check_report_names_a_figure_the_page_does_not_embed(damaged: Path):
    (damaged / "feedback.png").write_bytes(PNG_MAGIC + b"another image")
    assert check_report(damaged) == ["feedback.png is not embedded in index.html"]


def test_a_run_without_steps_refreshes_or_feedback_still_renders(tmp_path: Path):
    report = {key: value for key, value in _report().items() if key not in ("stages", "examples")}
    report.update(steps=[], refreshes=[], feedback=[])
    del report["win_rate_vs_base"]
    index = write_report(report, tmp_path)
    # every figure is there ("no data"); only the absent number is reported
    assert check_report(tmp_path) == ["report.json lacks key 'win_rate_vs_base'"]
    page = index.read_text(encoding="utf-8")
    assert page.count("<p>no data</p>") == 2  # the steps table and the examples
    assert "n/a" in page  # the SFT losses and the stage-2 accuracy


def test_status_line():
    step = {
        "step": 3,
        "weights_version": 4,
        "reward_model_version": 2,
        "reward_mean": 0.123,
        "gold_mean": 0.712,
        "kl": 1.234,
    }
    assert status_line(step, of=20) == (
        "rl step 3/20  weights v4  reward-model v2  reward +0.123  gold 0.712  kl 1.234"
    )
    assert status_line({**step, "reward_mean": -0.05}).startswith("rl step 3  weights v4")
    assert "reward -0.050" in status_line({**step, "reward_mean": -0.05})
    assert "gold n/a" in status_line({**step, "gold_mean": None})


def test_reward_model_changes_are_the_first_steps_of_each_new_version():
    versions = [1, 1, 2, 2, 2, 3, 2]
    steps = [{"step": i, "reward_model_version": v} for i, v in enumerate(versions, start=1)]
    assert reward_model_changes(steps) == [(3, 2), (6, 3), (7, 2)]
    assert reward_model_changes(steps[:1]) == reward_model_changes([]) == []


def test_feedback_counts_are_cumulative_per_kind_in_time_order():
    events = [
        {"t_s": 5.0, "kind": "chat"},
        {"t_s": 1.0, "kind": "chat"},
        {"t_s": 3.0, "kind": "thumbs_up"},
    ]
    assert feedback_counts(events) == {"chat": ([1.0, 5.0], [1, 2]), "thumbs_up": ([3.0], [1])}
