"""`rlhf cai-sft` on the real policy service (tiny model in the real Triton): each row's answer,
critique and revision are what the policy gives for the documented conversations, the principles
are the seeded draw, the rows have TRL's conversational format, and `rlhf sft` trains on them."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from services.cli import main as rlhf
from services.common.training.sft import SFTConfig, run_sft
from services.genproto.rlhf.v1 import policy_pb2, policy_pb2_grpc
from services.judge.cai import draw_principles, wire_prompt
from services.judge.rubric import DEFAULT_CONSTITUTION, load_constitution
from tests.support.policy_stack import policy_stack

PROMPTS = (
    Path(__file__).resolve().parents[3] / "deploy" / "local" / "data" / "red_team_prompts.jsonl"
)
N, SEED, MAX_NEW = 4, 3, 12


@pytest.fixture(scope="module")
def policy(triton_server, tiny_lm_dir, tmp_path_factory):
    with policy_stack(triton_server, None, tiny_lm_dir, tmp_path_factory.mktemp("policy")) as stack:
        yield stack


def sample(stub, messages: list[dict], seed: int) -> str:
    """The policy's answer to one conversation with `seed` (the client gives prompt k of every
    step seed + step + k, and the request's first prompt gets its seed as is)."""
    response = stub.Generate(
        policy_pb2.GenerateRequest(
            prompts=[wire_prompt(messages)],
            sampling=policy_pb2.SamplingParams(
                n=1, max_new_tokens=MAX_NEW, temperature=1.0, seed=seed, has_seed=True
            ),
        ),
        timeout=60,
    )
    return response.completions[0].samples[0].text.strip()


def test_rows_follow_the_constitution_and_train_sft(policy, tiny_lm_dir, tmp_path, capsys):
    output = tmp_path / "cai.jsonl"
    argv = ["cai-sft", "--policy", policy.address, "--prompts", str(PROMPTS)]
    argv += ["--constitution", str(DEFAULT_CONSTITUTION), "--output", str(output)]
    argv += ["--seed", str(SEED), "--set", f"num_prompts={N}", "--set", f"max_new_tokens={MAX_NEW}"]
    argv += ["--set", "temperature=1.0"]
    assert rlhf(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert printed["metrics"]["rows"] == len(rows)
    assert printed["metrics"]["prompts"] == N
    # Sampled text of a random model is never empty here, so every prompt has its row (and
    # prompt k keeps position k in every step, which the seeds below rely on).
    assert printed["metrics"]["skipped_empty"] == 0
    assert len(rows) == N

    constitution = load_constitution(DEFAULT_CONSTITUTION)
    drawn = draw_principles(constitution.principles, N, SEED)
    asked = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[:N]]
    stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(policy.address))
    for row in rows:
        assert set(row) == {"messages", "critique", "principle", "initial", "constitution_version"}
        assert row["constitution_version"] == "constitution-v1"
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        i = asked.index(user["content"])
        principle = drawn[i]
        assert row["principle"] == principle.name
        # Each turn is what the policy samples for the documented conversation, with its seed.
        prompt = [user]
        assert row["initial"] == sample(stub, prompt, SEED + i)
        critique_turn = prompt + [
            {"role": "assistant", "content": row["initial"]},
            {"role": "user", "content": principle.critique},
        ]
        assert row["critique"] == sample(stub, critique_turn, SEED + 1 + i)
        revision_turn = critique_turn + [
            {"role": "assistant", "content": row["critique"]},
            {"role": "user", "content": principle.revision},
        ]
        assert assistant["content"] == sample(stub, revision_turn, SEED + 2 + i)

    # `rlhf sft` accepts the file: one optimizer step on the tiny model.
    summary = run_sft(
        SFTConfig(
            data=output,
            model=tiny_lm_dir,
            output=tmp_path / "sft",
            eval_fraction=0.0,
            batch_size=len(rows),
            max_length=256,
        )
    )
    assert summary["steps"] == 1
    assert summary["data"]["train"]["records"] == len(rows)
    assert (tmp_path / "sft" / "model.safetensors").is_file()


def test_bad_input_is_a_clear_error(policy, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt column"}\n')
    argv = ["cai-sft", "--policy", policy.address, "--prompts", str(bad)]
    assert rlhf(argv + ["--output", str(tmp_path / "out.jsonl")]) == 2
    assert "line 2: expected one of 'prompt' or 'messages'" in capsys.readouterr().err
    assert rlhf(["cai-sft", "--policy", "nowhere", "--prompts", str(PROMPTS), "--output", "x"]) == 2
    assert "config field 'policy': 'nowhere' is not host:port" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
