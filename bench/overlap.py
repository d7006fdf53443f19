"""The gain from overlap: the rollout side generating the next batch while the trainer updates,
within `max_staleness`, against strict alternation, with the same pieces. Part of
bench/trainer_vs_trl.py (`--parts overlap`), which owns the configuration.

Two processes, as deployed (the rollout worker and the trainer), reduced to what decides the
overlap: a generator process (the policy service's decoding loop, the reward rule and the
frozen reference, tests/support/rollouts.py) and a learner process (`Learner.step`). After each
update the learner sends its weights to the generator (a copy through shared memory, standing
in for the push). The generator follows the rollout worker's backpressure rule
(services/rollout/worker.py, `expected_staleness`): batch k is used by the trainer at version
k, so it may be generated with weights version v only while k - v <= max_staleness; otherwise
it waits for newer weights.
  - max_staleness 0: strict alternation. Batch k waits for update k-1 and its weights.
  - max_staleness 1 (the deployed default is 2): batch k+1 is generated beside update k.
Figure: samples/s over the measured steps (the first update, a warm-up, left out), from the end
of update 0 to the end of the last one. `overlap_gain` = overlapped / alternating. Both
processes run `overlap_threads` torch threads in both modes, as the local stack gives every
service half the cores: on this 2-core CPU the two sides compete for the same cores (and
memory bandwidth); on a GPU, where the generator and the trainer hold different devices, they
would not.
"""

from __future__ import annotations

import time
from pathlib import Path


def too_stale(batch: int, weights_version: int, max_staleness: int) -> bool:
    """Batch `batch` is used by the trainer at version `batch`: made with `weights_version` it
    would be that many versions stale (services/rollout/worker.py `expected_staleness`)."""
    return batch - weights_version > max_staleness


def _prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        for q in texts
    ]


def generator_main(config, max_staleness: int, batches, weights) -> None:
    """The rollout side: makes batch k as soon as its weights version allows it."""
    import torch
    from transformers import AutoTokenizer

    from bench.trainer_vs_trl import load_prompts
    from services.common.annotator import load_annotator
    from services.common.models import load_causal_lm
    from tests.support.rollouts import sample_rollouts

    torch.set_num_threads(config.overlap_threads)
    device = torch.device(config.device)
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    annotator = load_annotator(config.reward_rule)
    policy = load_causal_lm(Path(config.model_dir), device, torch.float32)
    reference = load_causal_lm(Path(config.model_dir), device, torch.float32)
    prompts = load_prompts(config.prompts)
    version = 0
    for k in range(config.overlap_steps):
        # Backpressure: wait for weights while batch k would be too stale; take newer ones
        # that are already there without waiting (the policy serves the newest it has).
        while too_stale(k, version, max_staleness) or not weights.empty():
            state, version = weights.get()
            policy.load_state_dict(state)
            del state
        # The prompts in order, as the comparison with TRL uses them, from the start again
        # when overlap_steps needs more than the file holds.
        texts = [
            prompts[(k * config.prompts_per_step + i) % len(prompts)]
            for i in range(config.prompts_per_step)
        ]
        ids = _prompt_ids(tokenizer, texts)
        text_of = {tuple(i): q for i, q in zip(ids, texts)}

        def reward(prompt_ids, response_ids, text_of=text_of) -> float:
            answer = tokenizer.decode(response_ids, skip_special_tokens=True)
            return annotator.score(text_of[tuple(prompt_ids)], answer)

        started = time.perf_counter()
        samples = sample_rollouts(
            policy,
            reference,
            ids,
            samples_per_prompt=config.group_size,
            max_new_tokens=config.max_new_tokens,
            reward_fn=reward,
            eos_token_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            seed=config.seed * 1000 + k,
            weights_version=version,
            group_prefix=f"s{k}-",
        )
        batches.put((k, version, samples, time.perf_counter() - started))
    # Drain the last pushes so that the learner's queue never blocks on a full pipe.
    while True:
        item = weights.get()
        if item is None:
            return


def run_overlap(config, max_staleness: int) -> dict:
    """One run (the learner side, in this process) at `max_staleness`; its timeline."""
    import torch
    import torch.multiprocessing as mp

    from bench.trainer_vs_trl import learner_config
    from services.trainer.learner import Learner

    torch.set_num_threads(config.overlap_threads)
    context = mp.get_context("spawn")
    batches, weights = context.Queue(), context.Queue()
    generator = context.Process(
        target=generator_main, args=(config, max_staleness, batches, weights), daemon=True
    )
    generator.start()
    learner = Learner(learner_config(config), config.model_dir)
    steps = []
    try:
        for k in range(config.overlap_steps):
            waited_from = time.perf_counter()
            index, version, samples, generate_s = batches.get(timeout=1800)
            assert index == k, (index, k)
            started = time.perf_counter()
            learner.step(samples)
            if config.device.startswith("cuda"):
                torch.cuda.synchronize()
            updated = time.perf_counter()
            # 'Push': a host copy (what a push sends, and no CUDA IPC to keep alive) that the
            # generator loads; the learner goes on at once.
            state = {
                name: t.detach().to("cpu", copy=True)
                for name, t in learner.policy.state_dict().items()
            }
            weights.put((state, k + 1))
            steps.append(
                {
                    "waited_for_batch_s": started - waited_from,
                    "update_s": updated - started,
                    "push_s": time.perf_counter() - updated,
                    "generate_s": generate_s,
                    "staleness": k - version,
                    "samples": len(samples),
                    "ended_at": time.perf_counter(),
                }
            )
        weights.put(None)
        generator.join(timeout=120)
    finally:
        if generator.is_alive():
            generator.kill()
    measured = steps[1:]
    wall = measured[-1]["ended_at"] - steps[0]["ended_at"]
    samples = sum(s["samples"] for s in measured)
    return {
        "max_staleness": max_staleness,
        "samples_per_s": samples / wall,
        "wall_s": wall,
        "measured_samples": samples,
        "staleness": [s["staleness"] for s in steps],
        "steps": steps,
    }


def overlap_summary(runs: dict[int, list[dict]], overlapped: int) -> dict:
    """`overlap_gain` from each mode's best run (as the learner headline), with the spread."""
    best = {s: max(r["samples_per_s"] for r in rs) for s, rs in runs.items()}
    per_repeat = [
        o["samples_per_s"] / a["samples_per_s"] for o, a in zip(runs[overlapped], runs[0])
    ]
    return {
        "overlap_gain": best[overlapped] / best[0],
        "overlap_gain_per_repeat": per_repeat,
        "overlap_samples_per_s": {
            f"max_staleness_{s}": [r["samples_per_s"] for r in rs] for s, rs in runs.items()
        },
        "overlap_staleness_seen": {
            f"max_staleness_{s}": [r["staleness"] for r in rs] for s, rs in runs.items()
        },
    }
