"""`make demo-cai`: Constitutional AI on SmolLM2-135M-Instruct, small enough for a CPU (10-35 min).

    python -m deploy.local.cai_demo [--seed 0] [--train-prompts 16] [--eval-prompts 12]

1. Kafka and Triton start (deploy/local/stack.py), then the base policy (models/smollm2-135m-
   instruct, `make models`) as a PolicyService.
2. `rlhf cai-sft`: the base policy answers the red-team prompts of
   deploy/local/data/red_team_prompts.jsonl (the first `--train-prompts`), critiques each answer
   against a seeded principle of services/judge/constitutions/v1.yaml, and revises it.
3. The judge service starts on the same instruct model with the constitution as its rubric
   (next-token probabilities of "A"/"B", both orders, inside Triton).
4. RLAIF labels: the base policy answers each training prompt twice, `rlhf label-ai` has the
   constitution judge label the pairs, and the labels are published to rlhf.preferences.v1
   (source AI); the demo reads them back from Kafka.
5. `rlhf sft` fine-tunes the base model on the revisions: the CAI-SFT policy.
6. The RL stage: `rlhf train-reward` on the AI labels alone (the judge's preferred answer is
   chosen; ties are left out), then online GRPO from the CAI-SFT policy against that reward model,
   as in production: rollout worker -> policy, reward and reference services -> Kafka -> trainer
   -> weight push (`--rl-steps` updates of `--rl-prompts-per-step` x `--rl-samples-per-prompt`).
7. `rlhf eval --judge` on the held-out red-team prompts (the rest of the file), every pair judged
   by the constitution judge (Compare, both orders), each with its win-rate and 95% Wilson
   interval: the CAI-SFT policy against the base, then (the same answers, kept in the answers
   cache) by the `polite` rule beside it, then the RL policy against CAI-SFT.
8. The report goes to .local/demo-cai/report.json; every process stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import grpc

from deploy.local.demo import Console, chat_prompt, read_jsonl, rlhf, write_jsonl
from deploy.local.stack import REPO_ROOT, Stack, wait_for

MODEL = REPO_ROOT / "models" / "smollm2-135m-instruct"
RED_TEAM = REPO_ROOT / "deploy" / "local" / "data" / "red_team_prompts.jsonl"
WORK = REPO_ROOT / ".local" / "demo-cai"
CONSTITUTION = REPO_ROOT / "services" / "judge" / "constitutions" / "v1.yaml"
EVAL_RULE = "services.common.annotator_rules:polite"


def start_judge(stack: Stack, model_dir: Path) -> str:
    """The constitution judge as its own process, publishing to the stack's Kafka."""
    stack.start_judge(model_dir, CONSTITUTION)
    stack.wait_serving(("judge",))
    return stack.address("judge")


def answer_twice(address: str, questions: list[str], seed: int, max_new_tokens: int) -> list:
    """Two sampled answers per question from the served policy: [(question, a, b), ...]."""
    from services.genproto.rlhf.v1 import policy_pb2, policy_pb2_grpc

    stub = policy_pb2_grpc.PolicyServiceStub(grpc.insecure_channel(address))
    pairs = []
    for start in range(0, len(questions), 16):
        batch = questions[start : start + 16]
        response = stub.Generate(
            policy_pb2.GenerateRequest(
                prompts=[chat_prompt(q) for q in batch],
                sampling=policy_pb2.SamplingParams(
                    n=2,
                    max_new_tokens=max_new_tokens,
                    temperature=0.9,
                    top_p=0.95,
                    seed=seed + start,
                    has_seed=True,
                ),
            ),
            timeout=900,
        )
        for q, completion in zip(batch, response.completions):
            a, b = completion.samples
            pairs.append((q, a, b))
    return pairs


def read_ai_labels(bootstrap: str, ids: set[str], timeout_s: float = 60) -> list:
    """The published AI records with these ids, read back from rlhf.preferences.v1."""
    from kafka import KafkaConsumer, TopicPartition

    from services.common import topics
    from services.genproto.rlhf.v1 import events_pb2

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    found = {}
    try:
        parts = [
            TopicPartition(topics.PREFERENCES, p)
            for p in consumer.partitions_for_topic(topics.PREFERENCES)
        ]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + timeout_s
        while set(found) != ids and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                for record in batch:
                    value = events_pb2.PreferenceRecord.FromString(record.value)
                    if value.preference_id in ids:
                        found[value.preference_id] = value
    finally:
        consumer.close()
    return list(found.values())


def ai_preference_rows(labels: list[dict]) -> list[dict]:
    """The judge's verdicts as `train-reward` pairs (source ai): the answer it preferred is
    chosen; a tie (P(A better) exactly 0.5) says nothing and is left out."""
    rows = []
    for label in labels:
        p = label["p_a_better"]
        if p == 0.5:
            continue
        chosen, rejected = (
            (label["answer_a"], label["answer_b"])
            if p > 0.5
            else (label["answer_b"], label["answer_a"])
        )
        rows.append(
            {"prompt": label["prompt"], "chosen": chosen, "rejected": rejected, "source": "ai"}
        )
    return rows


def train_ai_reward_model(labels_file: Path, seed: int, report: dict) -> Path:
    """`rlhf train-reward` on the constitution judge's labels alone (the RLAIF reward model)."""
    rows = ai_preference_rows(read_jsonl(labels_file))
    if len(rows) < 4:
        raise RuntimeError(f"the judge made {len(rows)} non-tie labels; too few to train on")
    data = write_jsonl(WORK / "rlaif-preferences.jsonl", rows)
    out = WORK / "rlaif-reward-model"
    summary = rlhf(
        "train-reward",
        ["--data", str(data), "--output", str(out)]
        + ["--set", "epochs=3", "--set", "eval_fraction=0.25", "--set", f"seed={seed}"]
        + ["--set", "overwrite=true"],
        WORK / "train-reward.log",
    )
    m = summary["metrics"]
    report["rlaif_reward_model"] = {
        "pairs": len(rows),
        "held_out_accuracy_before": m.get("eval/accuracy_before"),
        "held_out_accuracy": m.get("eval/accuracy_after"),
    }
    return out


def rl_stage(
    stack: Stack,
    sft_dir: Path,
    reward_dir: Path,
    prompts: list[dict],
    seed: int,
    options: argparse.Namespace,
    report: dict,
) -> Path:
    """Online GRPO from the CAI-SFT policy against the RLAIF reward model, as in production
    (rollout worker -> policy, reward, reference services -> Kafka -> trainer -> weight push);
    returns the final policy's model folder."""
    from deploy.local.demo import assemble_policy, trainer_updates

    batch = options.rl_prompts_per_step * options.rl_samples_per_prompt
    stack.start_policy(sft_dir)
    stack.start_reward(reward_dir, WORK / "reward-versions")
    stack.start_reference(sft_dir)
    stack.wait_serving(("policy", "reward", "reference"))
    stack.start_trainer(
        sft_dir, "grpo", batch, options.rl_steps, {"seed": seed, "lr": 3e-5, "kl_coef": 0.05}
    )
    dataset = write_jsonl(
        WORK / "rl-prompts.jsonl",
        [{"messages": [{"role": "user", "content": r["prompt"]}]} for r in prompts],
    )
    stack.start_rollout(
        dataset,
        options.rl_samples_per_prompt,
        options.rl_prompts_per_step,
        options.max_new_tokens,
        batch * options.rl_steps,
        seed=seed,
        max_staleness=1,
        rollouts_per_version=batch,  # a batch per version: the next one is made beside the update
    )
    trainer = stack.daemons["trainer"]
    metrics_log = stack.state / "trainer" / "metrics.jsonl"
    wait_for(lambda: trainer.pid is None, 3600, 2.0, "the trainer's last update")
    updates = trainer_updates(metrics_log)
    if len(updates) < options.rl_steps:
        raise RuntimeError(
            f"the trainer stopped after {len(updates)} of {options.rl_steps} updates; "
            f"see {trainer.log_file}"
        )
    report["rl"] = {
        "algorithm": "grpo",
        "batch": batch,
        "steps": [
            {
                "step": u.get("step"),
                "weights_version": u.get("weights_version"),
                "reward_mean": u.get("reward/mean"),
                "kl": u.get("kl/behaviour_ref_k1"),
            }
            for u in updates
        ],
    }
    for name in ("rollout", "trainer", "reference", "reward", "policy"):
        stack.stop(name)  # the judge stays for the evaluation
    weights = max((stack.state / "trainer" / "weights").glob("v*"))
    return assemble_policy(sft_dir, weights, WORK / "final")


def run(options: argparse.Namespace) -> dict:
    seed, train_prompts = options.seed, options.train_prompts
    eval_prompts, max_new_tokens = options.eval_prompts, options.max_new_tokens
    console = Console()
    if not (MODEL / "model.safetensors").is_file():
        raise SystemExit(f"{MODEL} is missing: run `make models` first")
    WORK.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(RED_TEAM)
    if train_prompts + eval_prompts > len(rows):
        raise SystemExit(f"{RED_TEAM} has {len(rows)} prompts, fewer than asked for")
    train = write_jsonl(WORK / "red-team-train.jsonl", rows[:train_prompts])
    held_out = write_jsonl(WORK / "red-team-eval.jsonl", rows[-eval_prompts:])
    report: dict = {"seed": seed, "model": str(MODEL), "constitution": str(CONSTITUTION)}
    # Half the cores per process: the policy, the judge and a training stage overlap.
    stack = Stack(WORK / "stack", dtype="float32", threads=max(1, (os.cpu_count() or 2) // 2))
    try:
        # 1. Kafka, Triton, the base policy.
        console.stage("1. Kafka, Triton and the base policy (SmolLM2-135M-Instruct)")
        stack.start_core()
        stack.start_policy(MODEL)
        stack.wait_serving(("policy",))
        policy = stack.address("policy")

        # 2. Critiques and revisions by the constitution.
        console.stage(f"2. rlhf cai-sft on {train_prompts} red-team prompts")
        cai_rows = WORK / "cai-sft.jsonl"
        summary = rlhf(
            "cai-sft",
            ["--policy", policy, "--prompts", str(train), "--constitution", str(CONSTITUTION)]
            + ["--output", str(cai_rows), "--seed", str(seed)]
            + ["--set", f"max_new_tokens={max_new_tokens}", "--set", "temperature=0.7"]
            + ["--set", "batch_size=16"],
            WORK / "cai-sft.log",
        )
        report["cai_sft_data"] = summary["metrics"]
        console.line(f"{summary['metrics']['rows']} revised answers -> {cai_rows}")

        # 3. The constitution judge.
        console.stage("3. the judge service: SmolLM2 with the constitution as its rubric")
        judge = start_judge(stack, MODEL)

        # 4. RLAIF labels on Kafka.
        console.stage("4. RLAIF: two answers per prompt, labelled by the judge, to Kafka")
        questions = [r["prompt"] for r in rows[:train_prompts]]
        pairs = answer_twice(policy, questions, seed, max_new_tokens)
        pairs_file = write_jsonl(
            WORK / "rlaif-pairs.jsonl",
            [
                {
                    "prompt": q,
                    "answer_a": a.text or "(no answer)",
                    "answer_b": b.text or "(no answer)",
                    "response_id_a": a.response_id,
                    "response_id_b": b.response_id,
                }
                for q, a, b in pairs
            ],
        )
        labels = rlhf(
            "label-ai",
            ["--judge", judge, "--data", str(pairs_file), "--output", str(WORK / "labels.jsonl")],
            WORK / "label-ai.log",
        )
        ids = {r["preference_id"] for r in read_jsonl(WORK / "labels.jsonl") if r["preference_id"]}
        on_kafka = read_ai_labels(stack.broker.bootstrap_servers, ids)
        report["rlaif_labels"] = {**labels["metrics"], "read_back_from_kafka": len(on_kafka)}
        console.line(
            f"{labels['metrics']['published']} AI labels published, {len(on_kafka)} read back "
            f"(mean confidence {labels['metrics']['confidence_mean']:.3f}, position bias "
            f"{labels['metrics']['position_bias_mean']:+.3f}, both orders agree on "
            f"{labels['metrics']['orders_agree']} of {labels['metrics']['pairs']})"
        )
        stack.stop("policy")  # frees the CPU for training

        # 5. SFT on the revisions.
        console.stage("5. rlhf sft on the revisions: the CAI-SFT policy")
        cai_model = WORK / "cai-sft-model"
        summary = rlhf(
            "sft",
            ["--model", str(MODEL), "--data", str(cai_rows), "--output", str(cai_model)]
            + ["--set", "epochs=2", "--set", "batch_size=4", "--set", "learning_rate=3e-5"]
            + ["--set", "max_length=384", "--set", "eval_fraction=0.0", "--set", "overwrite=true"]
            + ["--set", f"seed={seed}"],
            WORK / "sft.log",
        )
        report["sft"] = summary["metrics"]

        # 6. The RL stage: a reward model on the AI labels, then online GRPO against it.
        console.stage("6. rlhf train-reward on the AI labels, then online GRPO from CAI-SFT")
        rm_dir = train_ai_reward_model(WORK / "labels.jsonl", seed, report)
        final_dir = rl_stage(stack, cai_model, rm_dir, rows[:train_prompts], seed, options, report)
        console.line(
            f"{len(report['rl']['steps'])} GRPO updates: reward "
            + " -> ".join(f"{s['reward_mean']:+.3f}" for s in report["rl"]["steps"])
            + f"; KL to CAI-SFT {report['rl']['steps'][-1]['kl']:.4f}"
        )

        # 7. Evaluation on held-out red-team prompts: by the constitution judge, then (the same
        #    answers, kept in the answers cache) by the polite rule.
        console.stage(f"7. rlhf eval on {eval_prompts} held-out prompts, constitution judge")
        shared = (
            ["--data", str(held_out), "--annotator", EVAL_RULE]
            + ["--set", f"answers_cache={WORK / 'answers-cache'}"]
            + ["--set", f"max_new_tokens={max_new_tokens}", "--set", f"seed={seed}"]
            + ["--set", f"examples={eval_prompts}", "--set", "overwrite=true"]
        )
        common = ["--candidate", str(cai_model), "--baseline", str(MODEL), *shared]
        judged = rlhf(
            "eval",
            [*common, "--judge", judge, "--output", str(WORK / "eval-judge")],
            WORK / "eval-judge.log",
        )
        evaluated = rlhf("eval", [*common, "--output", str(WORK / "eval")], WORK / "eval.log")
        report["eval_polite_rule"] = evaluated["metrics"]
        judge_summary = json.loads((WORK / "eval-judge" / "eval.json").read_text())["judge"]
        report["eval_constitution_judge"] = {**judged["metrics"], **judge_summary}
        rl_vs_sft = rlhf(
            "eval",
            ["--candidate", str(final_dir), "--baseline", str(cai_model), *shared]
            + ["--reference", str(cai_model), "--judge", judge]
            + ["--output", str(WORK / "eval-rl-judge")],
            WORK / "eval-rl-judge.log",
        )
        rl_judge = json.loads((WORK / "eval-rl-judge" / "eval.json").read_text())["judge"]
        report["eval_rl_vs_cai_sft"] = {**rl_vs_sft["metrics"], **rl_judge}
        r = report["eval_rl_vs_cai_sft"]
        console.line(
            f"win-rate of RL (from CAI-SFT, on the AI-label reward model) over CAI-SFT, "
            f"constitution judge: {r['win_rate']:.3f} [{r['win_rate_ci_low']:.3f}, "
            f"{r['win_rate_ci_high']:.3f}] ({r['wins']}W {r['losses']}L {r['ties']}T)"
        )
        j = report["eval_constitution_judge"]
        console.line(
            f"win-rate of CAI-SFT over the base, constitution judge: {j['win_rate']:.3f} "
            f"[{j['win_rate_ci_low']:.3f}, {j['win_rate_ci_high']:.3f}] "
            f"({j['wins']}W {j['losses']}L {j['ties']}T; position bias "
            f"{j['position_bias_mean']:+.2f}); polite rule: "
            f"{evaluated['metrics']['win_rate']:.3f}"
        )
    finally:
        stack.stop()
    report["seconds"] = round(console.now(), 1)
    (WORK / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    console.line(f"report: {WORK / 'report.json'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-prompts", type=int, default=16)
    parser.add_argument("--eval-prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--rl-steps", type=int, default=2, help="GRPO updates of the RL stage")
    parser.add_argument("--rl-prompts-per-step", type=int, default=4)
    parser.add_argument("--rl-samples-per-prompt", type=int, default=4)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
