"""`make demo --preset quick` end to end, as a user runs it: SmolLM2 through all three stages on
the real Kafka broker and the real Triton server, the live loop closed, the evaluation, the
report. Its learning is not asserted (the quick preset is too short to move the policy); what
is asserted is that every stage ran on the real parts, the report holds every figure and number,
and no process outlived the run. Then `make up` on the models it kept, one chat through it with
the official openai client, and `make down`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import openai
import pytest

from deploy.local.report import FIGURES, REQUIRED_KEYS, check_report
from deploy.local.stack import Stack
from services.genproto.rlhf.v1 import common_pb2, judge_pb2, judge_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[3]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(f"{proc.name}: {cmdline[:120]}")
    return found


@pytest.mark.timeout(1800)  # the quick demo (~6 min), then make up and down (~3 min)
def test_quick_demo_runs_every_stage_writes_the_report_and_stops_everything(run_dir: Path):
    state, report_dir, keep = run_dir / "demo", run_dir / "demo-report", run_dir / "demo-models"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.local",
            "demo",
            "--preset",
            "quick",
            "--state",
            str(state),
            "--report-dir",
            str(report_dir),
            "--keep-models",
            str(keep),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, f"demo failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    # The report: every file, key and figure, embedded in one page.
    assert check_report(report_dir) == []
    report = json.loads((report_dir / "report.json").read_text())
    assert set(REQUIRED_KEYS) <= set(report) and set(report["figures"]) == set(FIGURES)
    assert report["preset"] == "quick" and report["seed"] == 0 and report["wall_s"] > 0

    # Stage 1 and 2 measured themselves; stage 2 went through /v1/rankings to Kafka and back.
    sft, reward = report["stages"]["sft"], report["stages"]["reward"]
    assert sft["eval_loss_after"] < sft["eval_loss_before"]
    assert reward["rankings"] >= 2 and reward["pairs"] >= reward["rankings"]  # K(K-1)/2 >= 1 each
    assert 0.0 <= reward["held_out_accuracy"] <= 1.0

    # Stage 3: every step has the reward model's and the annotator's score and the versions.
    steps = report["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["weights_version"] for s in steps] == [2, 3, 4]
    for s in steps:
        assert s["rollouts"] == 16 and s["gold_mean"] is not None and s["reward_model_version"] >= 1
    assert report["reward_model_versions"] and min(report["reward_model_versions"]) == 1
    assert any(r["published"] and r["version"] == 2 for r in report["refreshes"])
    kinds = {e["kind"] for e in report["feedback"]}
    assert "chat" in kinds and kinds & {"thumbs_up", "thumbs_down"}

    # Stage 4: two evaluations, by the annotator, with intervals, KL and lengths.
    for key in ("eval_vs_sft", "eval_vs_base"):
        metrics = report[key]["metrics"]
        assert metrics["n"] == report["stages"]["eval"]["prompts"] > 0
        assert (
            0.0
            <= metrics["win_rate_ci_low"]
            <= metrics["win_rate"]
            <= metrics["win_rate_ci_high"]
            <= 1.0
        )
        assert metrics["candidate_length_mean"] > 0 and metrics["kl_to_reference"] >= 0
    assert len(report["examples"]) == 5 and all(
        e["before"] and e["after"] for e in report["examples"]
    )

    # The models `make up` serves were kept; nothing the demo started still runs.
    assert (keep / "sft" / "model.safetensors").exists() and (
        keep / "reward" / "model.safetensors"
    ).exists()
    assert Stack.alive_in(state) == []
    assert _processes_mentioning(str(state)) == []

    # `make up` on them: the whole platform stays up after the command returns; a user of the
    # official openai client chats through it; `make down` stops every process.
    platform = run_dir / "platform"
    up = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.local",
            "platform-up",
            "--models",
            str(keep),
            "--state",
            str(platform),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    try:
        assert up.returncode == 0, f"make up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        urls = json.loads((platform / "urls.json").read_text())
        assert urls["OpenAI base URL"] in up.stdout and urls["API key"] in up.stdout
        running = set(Stack.alive_in(platform))
        assert running == {
            "kafka",
            "tritonserver",
            "policy",
            "reward",
            "reference",
            "judge",
            "gateway",
            "curator",
            "refresh",
            "trainer",
            "rollout",
        }
        client = openai.OpenAI(
            base_url=urls["OpenAI base URL"], api_key=urls["API key"], timeout=300
        )
        reply = client.chat.completions.create(
            model="policy",
            messages=[{"role": "user", "content": "What is a prime number?"}],
            max_tokens=16,
        )
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        # The judge answers through the policy's model: both orders asked, a verdict in (0, 1).
        judge = judge_pb2_grpc.JudgeServiceStub(
            grpc.insecure_channel(urls["judge (gRPC JudgeService)"])
        )
        info = judge.GetJudgeInfo(judge_pb2.GetJudgeInfoRequest(), timeout=30)
        assert info.mode == "policy"
        verdict = judge.Compare(
            judge_pb2.CompareRequest(
                pairs=[
                    judge_pb2.JudgedPair(
                        prompt=common_pb2.Prompt(text="What is a prime number?"),
                        answer_a="A whole number above 1 divisible only by 1 and itself.",
                        answer_b="banana",
                    )
                ]
            ),
            timeout=300,
        ).verdicts[0]
        assert 0 < verdict.p_a_first < 1 and 0 < verdict.p_b_first < 1
        combined = (verdict.p_a_first + 1 - verdict.p_b_first) / 2
        assert verdict.p_a_better == pytest.approx(combined, abs=1e-6)
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "deploy.local", "platform-down", "--state", str(platform)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert down.returncode == 0 and "gateway" in down.stdout
    assert Stack.alive_in(platform) == [] and _processes_mentioning(str(platform)) == []
