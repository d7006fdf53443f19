"""`rlhf eval` end to end on tiny random models: a policy against itself ties everywhere with zero
KL; the KL agrees with a slow per-sequence computation; the command line writes eval.json and
refuses bad input with exit status 2 before any model loads; a PolicyService is asked once per
batch with one seed per prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from services.cli import main
from services.eval.policies import Answer, FolderPolicy, kl_to_reference
from services.eval.run import EVAL_FILE, EvalConfig, EvalError, run_eval

METRICS = {
    "win_rate",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "wins",
    "losses",
    "ties",
    "n",
    "candidate_score_mean",
    "baseline_score_mean",
    "candidate_length_mean",
    "baseline_length_mean",
    "candidate_words_mean",
    "baseline_words_mean",
    "kl_to_reference",
}
ROWS = [
    {"prompt": "What is a river?"},
    {"prompt": "Why is the sky blue?"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"prompt": "Name a colour."},
    {"prompt": "How do birds fly?"},
]


def longer_is_better(prompt: str, answer: str) -> float:
    """A judge for these tests (loaded by name, `tests.unit.eval.test_run:longer_is_better`)."""
    return float(len(answer))


def write_prompts(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_folder_against_itself_ties_everywhere_with_zero_kl(tmp_path, tiny_lm_dir):
    # A copy, so that candidate and reference are two models and the KL takes two forwards.
    copy = shutil.copytree(tiny_lm_dir, tmp_path / "copy")
    config = EvalConfig(
        candidate=str(copy),
        baseline=str(tiny_lm_dir),
        data=write_prompts(tmp_path / "prompts.jsonl", ROWS),
        output=tmp_path / "eval",
        max_new_tokens=6,
        batch_size=2,  # 5 prompts: batches of 2, 2 and 1
        device="cpu",
        examples=5,
    )

    summary = run_eval(config)

    metrics = summary["metrics"]
    assert metrics["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
    assert (metrics["n"], metrics["ties"], metrics["wins"], metrics["losses"]) == (5, 5, 0, 0)
    assert metrics["win_rate"] == 0.5
    assert metrics["candidate_length_mean"] == metrics["baseline_length_mean"] > 0
    assert all(
        e["candidate"] == e["baseline"] and e["verdict"] == "tie" for e in summary["examples"]
    )
    # The judge reads the conversation as services.common.prompts renders it.
    assert summary["examples"][2]["prompt"] == "system: Be brief.\nuser: Hi"
    assert summary["policies"]["reference"]["folder"] == str(tiny_lm_dir)
    assert json.loads((config.output / EVAL_FILE).read_text()) == json.loads(json.dumps(summary))


def test_kl_agrees_with_a_slow_per_sequence_computation(tmp_path, tiny_lm_dir):
    from tests.support.tiny_models import tiny_causal_lm

    candidate = FolderPolicy(str(tiny_causal_lm(tmp_path / "other", seed=1)), "cpu", "float32")
    reference = FolderPolicy(str(tiny_lm_dir), "cpu", "float32")
    conversations = [
        r["messages"] if "messages" in r else [{"role": "user", "content": r["prompt"]}]
        for r in ROWS[:3]
    ]
    # Responses of different lengths, so that the batch pads them differently.
    answers = [Answer("", [11, 12, 13, 14, 15]), Answer("", [7]), Answer("", [300, 301, 2])]

    batched = kl_to_reference(candidate, reference, conversations, answers, batch_size=3)

    slow = []
    for conversation, answer in zip(conversations, answers):
        prompt = candidate.prompt_ids(conversation)
        ids = torch.tensor([prompt + answer.token_ids])  # one sequence, no padding
        with torch.no_grad():
            p, q = (m(input_ids=ids).logits[0] for m in (candidate.model, reference.model))
        kl = 0.0
        for t in range(len(prompt), ids.shape[1]):  # the logits at t - 1 predict token t
            kl += torch.distributions.kl_divergence(
                torch.distributions.Categorical(logits=p[t - 1]),
                torch.distributions.Categorical(logits=q[t - 1]),
            ).item()
        slow.append(kl)
    assert batched == pytest.approx(slow, rel=1e-4, abs=1e-6)
    assert min(slow) > 0
    itself = kl_to_reference(candidate, candidate, conversations, answers, batch_size=2)
    assert itself == [0.0, 0.0, 0.0]


def test_the_command_line_writes_eval_json_with_every_metric(tmp_path, tiny_lm_dir, capsys):
    data = write_prompts(tmp_path / "prompts.jsonl", ROWS[:3])
    output = tmp_path / "eval"
    args = [
        "eval",
        "--candidate",
        str(tiny_lm_dir),
        "--baseline",
        str(tiny_lm_dir),
        "--data",
        str(data),
        "--output",
        str(output),
        "--annotator",
        "tests.unit.eval.test_run:longer_is_better",
        "--set",
        "max_new_tokens=4",
        "--set",
        "device=cpu",
        "--set",
        "seed=3",
    ]

    assert main(args) == 0

    printed = json.loads(capsys.readouterr().out)
    written = json.loads((output / EVAL_FILE).read_text())
    assert set(written["metrics"]) == METRICS
    assert printed == {"output": str(output), "metrics": written["metrics"]}
    assert {"examples", "config", "seconds"} <= set(written)
    assert written["config"]["seed"] == 3 and written["annotator"].endswith(":longer_is_better")
    assert written["metrics"]["n"] == 3 and written["metrics"]["kl_to_reference"] == 0.0


def test_help_lists_every_field_and_the_eval_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in EvalConfig.__dataclass_fields__:
        assert f"  {name} = " in text
    for flag in ("--candidate", "--baseline", "--reference", "--data", "--output", "--annotator"):
        assert flag in text
    assert "--model" not in text


BAD_INPUT = {
    "bad JSON row": ({"rows": [ROWS[0], "{not json"]}, "prompts.jsonl line 2: not valid JSON"),
    "row without a prompt": ({"rows": [ROWS[0], {"question": "x"}]}, "line 2: expected one of"),
    "unknown role": (
        {"rows": [{"messages": [{"role": "robot", "content": "x"}]}]},
        "line 1: messages[0].role must be one of",
    ),
    "no user turn": (
        {"rows": [{"messages": [{"role": "system", "content": "x"}]}]},
        "line 1: 'messages' has no user turn",
    ),
    "missing data file": ({"data": "nowhere.jsonl"}, "nowhere.jsonl: no such data file"),
    "unknown annotator": ({"annotator": "no_such_module:score"}, "config field 'annotator'"),
    "candidate neither folder nor grpc": (
        {"candidate": "not/a/model"},
        "config field 'candidate': not/a/model is neither a model folder",
    ),
    "grpc without a port": ({"baseline": "grpc://localhost"}, "is not grpc://host:port"),
    "reference over grpc": ({"reference": "grpc://localhost:1"}, "needs a model folder"),
    "bad field value": ({"set": ["top_p=0"]}, "config field 'top_p' has an invalid value"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_exits_2_before_any_model_loads(case, tmp_path, tiny_lm_dir, capsys, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    change, reason = BAD_INPUT[case]
    data = write_prompts(tmp_path / "prompts.jsonl", change.get("rows", ROWS[:2]))
    output = tmp_path / "eval"
    args = [
        "eval",
        "--candidate",
        change.get("candidate", str(tiny_lm_dir)),
        "--baseline",
        change.get("baseline", str(tiny_lm_dir)),
        "--data",
        str(tmp_path / change["data"]) if "data" in change else str(data),
        "--output",
        str(output),
    ]
    for field in ("annotator", "reference"):
        if field in change:
            args += [f"--{field}", change[field]]
    for setting in change.get("set", []):
        args += ["--set", setting]

    assert main(args) == 2

    assert reason in capsys.readouterr().err
    assert not (output / EVAL_FILE).exists()


def test_an_existing_eval_json_is_kept_unless_overwrite(tmp_path, tiny_lm_dir):
    output = tmp_path / "eval"
    output.mkdir()
    (output / EVAL_FILE).write_text("{}")
    config = EvalConfig(
        candidate=str(tiny_lm_dir),
        baseline=str(tiny_lm_dir),
        data=write_prompts(tmp_path / "p.jsonl", ROWS[:1]),
        output=output,
        max_new_tokens=2,
        device="cpu",
    )
    with pytest.raises(EvalError, match="exists"):
        run_eval(config)
    assert (output / EVAL_FILE).read_text() == "{}"
    config.overwrite = True
    assert run_eval(config)["metrics"]["n"] == 1


def test_a_policy_service_gets_one_request_per_batch_and_a_seed_per_prompt(tmp_path):
    from concurrent import futures

    import grpc

    from services.genproto.rlhf.v1 import policy_pb2, policy_pb2_grpc

    class FakePolicy(policy_pb2_grpc.PolicyServiceServicer):
        """Answers each prompt with its last turn repeated `repeat` times."""

        def __init__(self, repeat: int):
            self.repeat, self.requests = repeat, []

        def GetModelInfo(self, request, context):
            return policy_pb2.GetModelInfoResponse(model="fake", weights_version=7)

        def Generate(self, request, context):
            self.requests.append(request)
            response = policy_pb2.GenerateResponse(model="fake", weights_version=7)
            for i, prompt in enumerate(request.prompts):
                text = " ".join([prompt.messages.messages[-1].content] * self.repeat)
                completion = response.completions.add(prompt_index=i)
                completion.samples.add(text=text, token_ids=[1] * self.repeat, weights_version=7)
            return response

    servers, fakes, addresses = [], [], []
    for repeat in (3, 1):
        fake, server = FakePolicy(repeat), grpc.server(futures.ThreadPoolExecutor(2))
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(fake, server)
        addresses.append(f"grpc://127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        server.start()
        servers.append(server)
        fakes.append(fake)
    try:
        summary = run_eval(
            EvalConfig(
                candidate=addresses[0],
                baseline=addresses[1],
                data=write_prompts(tmp_path / "prompts.jsonl", ROWS),
                output=tmp_path / "eval",
                annotator="tests.unit.eval.test_run:longer_is_better",
                batch_size=2,
                seed=10,
                max_new_tokens=5,
                temperature=0.5,
            )
        )
    finally:
        for server in servers:
            server.stop(None)

    metrics = summary["metrics"]
    assert (metrics["wins"], metrics["n"], metrics["win_rate"]) == (5, 5, 1.0)
    assert metrics["kl_to_reference"] is None  # no folder to measure it against
    assert (metrics["candidate_length_mean"], metrics["baseline_length_mean"]) == (3.0, 1.0)
    assert summary["policies"]["candidate"]["weights_version"] == 7
    for fake in fakes:
        # Prompt k of the data gets seed 10 + k: the server adds the index within the request.
        assert [len(r.prompts) for r in fake.requests] == [2, 2, 1]
        assert [r.sampling.seed for r in fake.requests] == [10, 12, 14]
        sampling = fake.requests[0].sampling
        assert sampling.has_seed and sampling.n == 1 and sampling.max_new_tokens == 5
        assert sampling.temperature == pytest.approx(0.5)
        chat = fake.requests[1].prompts[0].messages.messages  # the system + user row, intact
        assert [(m.role, m.content) for m in chat] == [("system", "Be brief."), ("user", "Hi")]


def test_the_answers_cache_judges_one_candidate_against_two_baselines_generating_once(
    tmp_path, tiny_lm_dir, monkeypatch
):
    from tests.support.tiny_models import tiny_causal_lm

    candidate = shutil.copytree(tiny_lm_dir, tmp_path / "candidate")
    other = tiny_causal_lm(tmp_path / "other", seed=3)
    data = write_prompts(tmp_path / "prompts.jsonl", ROWS)
    cache = tmp_path / "answers"

    def config(baseline: Path, output: str, **extra) -> EvalConfig:
        fields = {"answers_cache": cache, **extra}
        return EvalConfig(
            candidate=str(candidate),
            baseline=str(baseline),
            reference=str(tiny_lm_dir),
            data=data,
            output=tmp_path / output,
            max_new_tokens=6,
            batch_size=2,
            device="cpu",
            examples=5,
            **fields,
        )

    first = run_eval(config(tiny_lm_dir, "vs-base"))
    assert len(list(cache.glob("answers-*.json"))) == 2 and len(list(cache.glob("kl-*.json"))) == 1

    # The second run reads the candidate's answers and KL back: its weights never load.
    loaded = []
    real_model = FolderPolicy.model
    monkeypatch.setattr(
        FolderPolicy,
        "model",
        property(lambda self: loaded.append(self.spec) or real_model.fget(self)),
    )
    second = run_eval(config(other, "vs-other"))
    assert str(candidate) not in loaded and str(tiny_lm_dir) not in loaded and str(other) in loaded
    assert second["metrics"]["kl_to_reference"] == first["metrics"]["kl_to_reference"]
    assert [e["candidate"] for e in second["examples"]] == [
        e["candidate"] for e in first["examples"]
    ]
    uncached = run_eval(config(other, "vs-other-uncached", answers_cache=None))
    assert uncached["metrics"] == second["metrics"]

    # Other sampling settings, or a rewritten candidate folder, are other keys.
    loaded.clear()
    run_eval(config(other, "hotter", temperature=1.3))
    assert str(candidate) in loaded
    loaded.clear()
    (candidate / "config.json").write_text((candidate / "config.json").read_text() + " ")
    run_eval(config(other, "rewritten"))
    assert str(candidate) in loaded
