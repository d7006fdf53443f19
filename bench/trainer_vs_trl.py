"""GRPO training throughput of this platform against TRL's `GRPOTrainer`, on the same work in
the same run: SmolLM2-135M, the same prompts, group size, batch, new-token budget, reward rule
(services.common.annotator_rules), KL coefficient (TRL's `beta`, 0 by default, set to ours)
and number of optimizer steps.

    python -m bench.trainer_vs_trl            # writes bench/results/trainer_vs_trl.json
    python -m bench.trainer_vs_trl --quick    # a smaller CPU run (a few minutes)
    python -m bench.trainer_vs_trl --dry-run  # checks the arguments and that every piece imports
    python -m bench.trainer_vs_trl --parts overlap   # one part; the file keeps the other's figures
    python -m bench.trainer_vs_trl --device cuda     # both sides on the GPU (bench/gpu_check.sh)

Each repeat runs each side in a fresh process (ours and TRL alternate, so the noise of the
shared machine falls on both), which reports its own peak RSS. Per side and step:
  1. generate a group of responses per prompt with the current policy, score them with the
     reward rule, add the frozen reference's log-probs;
  2. one GRPO update on the whole batch (one optimizer step).
Ours does 1 in-process with the policy service's decoding loop (tests/support/rollouts.py) and
2 with the trainer's `Learner.step`; TRL does both inside `GRPOTrainer.train`, where 1 is
`_generate_and_score_completions` (timed by a subclass) and 2 the rest of the optimizer step
(timed by callbacks around it). The first step of every run is a warm-up and is left out.

Headline `learner_ratio_vs_trl` = TRL's update seconds per sample / ours (goal >= 1.0), each
side's best repeat (see `summarise`; medians and per-repeat ratios are recorded too), with the
same ratio in CPU seconds (`learner_cpu_ratio_vs_trl`), which the shared machine inflates less.
TRL's gradient checkpointing (on in its GRPOConfig defaults) is off, as ours is: the same
forward, backward and optimizer step. `--profile` runs ours once with cProfile over its updates.
Part `overlap` (bench/overlap.py): `overlap_gain`, samples/s with the generator making the next
batch beside the update (max_staleness `overlap_staleness`) over strict alternation.
PPO: TRL's PPO trainer is compared where TRL still ships one; `ppo_vs_trl_missing` says whether
it does. Part `pipeline` (bench/pipeline.py): `ratio_vs_trl`, the deployed pipeline's samples/s
(deploy/local/stack.py's processes, the reward service scoring with the same rule in process)
over TRL's end to end, rounds of one run each alternating (`measure_pipeline`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from bench.memory import ROLE_ENV

REPO = Path(__file__).resolve().parents[1]
SIDES = ("ours", "trl")


@dataclass
class BenchConfig:
    """The work both sides do; every field is the same for ours and TRL."""

    model_dir: str = str(REPO / "models" / "smollm2-135m-instruct")
    """Policy (and reference) model folder, safetensors + tokenizer."""
    prompts: str = str(REPO / "deploy" / "local" / "data" / "prompts_train.jsonl")
    """JSONL with a `prompt` column; the first prompts_per_step * steps are used, in order."""
    reward_rule: str = "services.common.annotator_rules:helpful_concise"
    """The in-process reward, module:function scoring (prompt, answer)."""
    prompts_per_step: int = 4
    """Prompts per optimizer step."""
    group_size: int = 4
    """Responses per prompt (GRPO's group; TRL's num_generations)."""
    max_new_tokens: int = 48
    """New-token budget of every response."""
    steps: int = 5
    """Optimizer steps per run, the first one a warm-up left out of the figures."""
    repeats: int = 3
    """Runs of each side, alternating."""
    beta: float = 0.05
    """KL coefficient (k3 in the loss on both sides; our GRPO default)."""
    lr: float = 1e-6
    """AdamW learning rate, constant."""
    threads: int = 2
    """torch intra-op threads of each run."""
    seed: int = 0
    """Seed of both sides."""
    trl_gradient_checkpointing: bool = False
    """TRL's GRPOConfig turns gradient checkpointing on by default (a forward recomputed in the
    backward, to save memory); ours does not checkpoint, so off is the same work. On shows what
    TRL's defaults cost."""
    ours_optimizer: str = "deployed"
    """An experiment on our side only: `deployed` is the trainer's learner as it ships; `fused`
    swaps its AdamW for torch's fused kernel (TRL's default through transformers), same
    hyperparameters, to measure what that one change is worth. Headlines use `deployed`."""
    device: str = "cpu"
    """Torch device of both sides: `cpu`, or `cuda` / `cuda:N` (bench/gpu_check.sh). On CUDA
    both keep float32 master weights and compute under bf16 autocast (ours: the learner's `auto`
    dtype; TRL: `bf16=True`)."""
    overlap_steps: int = 4
    """Optimizer steps of each overlap run (`--parts overlap`), the first one a warm-up."""
    overlap_repeats: int = 2
    """Runs of each overlap mode (alternating, overlapped), interleaved."""
    overlap_staleness: int = 1
    """max_staleness of the overlapped mode (0 is strict alternation, the baseline)."""
    overlap_threads: int = 1
    """torch threads of each of the two overlap processes, in both modes: the local stack gives
    every service half the cores (1 here), since oversubscribed OpenMP pools spin."""
    pipeline_repeats: int = 1
    """Rounds of part `pipeline`: each one TRL run and one run of the deployed pipeline, the
    order alternating between rounds."""
    pipeline_staleness: int = 1
    """max_staleness of the pipeline's rollout worker (as `make demo` runs it): the next batch
    is made while the trainer updates."""
    pipeline_threads: int = 1
    """torch/OpenMP threads of every pipeline process (Stack(threads=...)): half the cores here,
    as deploy/local gives each service."""

    @property
    def batch(self) -> int:
        return self.prompts_per_step * self.group_size

    def validate(self) -> BenchConfig:
        """Raises ValueError naming the first bad field; returns self."""
        for name in ("prompts_per_step", "max_new_tokens", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (a GRPO baseline), got {self.group_size}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (the first is a warm-up), got {self.steps}")
        if self.ours_optimizer not in ("deployed", "fused"):
            raise ValueError(
                f"ours_optimizer must be deployed or fused, got {self.ours_optimizer!r}"
            )
        if self.device != "cpu" and not self.device.split(":")[0] == "cuda":
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.overlap_steps < 2 or self.overlap_repeats < 1 or self.overlap_staleness < 1:
            raise ValueError(
                "overlap_steps must be >= 2, overlap_repeats >= 1 and overlap_staleness >= 1, got "
                f"{self.overlap_steps}, {self.overlap_repeats}, {self.overlap_staleness}"
            )
        if self.overlap_threads < 1:
            raise ValueError(f"overlap_threads must be >= 1, got {self.overlap_threads}")
        for name in ("pipeline_repeats", "pipeline_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pipeline_staleness < 0:
            raise ValueError(f"pipeline_staleness must be >= 0, got {self.pipeline_staleness}")
        if not self.beta >= 0 or not self.lr > 0:
            raise ValueError(f"beta must be >= 0 and lr > 0, got {self.beta}, {self.lr}")
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"model_dir {self.model_dir}: no config.json (run `make models`)")
        count = len(load_prompts(self.prompts))
        if count < self.prompts_per_step * self.steps:
            raise ValueError(
                f"prompts {self.prompts}: {count} prompts, need "
                f"{self.prompts_per_step * self.steps} (prompts_per_step x steps)"
            )
        return self


QUICK = {"prompts_per_step": 2, "max_new_tokens": 32, "steps": 3, "repeats": 3}
PARTS = ("trl", "overlap", "pipeline")


def learner_config(config):
    """Our GRPO learner on the bench's work: TRL's lr and beta, the same seed and device (the
    learner part and the overlap runs, bench/overlap.py)."""
    from services.trainer.learner import LearnerConfig

    return LearnerConfig(
        algorithm="grpo", lr=config.lr, kl_coef=config.beta, seed=config.seed, device=config.device
    )


def load_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"prompts {path}: no such file")
    return [json.loads(line)["prompt"] for line in file.read_text().splitlines() if line.strip()]


def peak_rss_mb() -> float:
    """Peak resident set of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_figures(device: str) -> dict:
    """This process's peak RSS, and on CUDA the peak of what torch allocated on the device."""
    figures = {"peak_rss_mb": peak_rss_mb()}
    if device != "cpu":
        import torch

        figures["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return figures


def sync(device: str) -> None:
    """Waits for queued CUDA kernels, so that a clock read after it has timed them."""
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


# ---- the two sides, each run in its own process ---------------------------------------------


def run_ours(config: BenchConfig, profile: bool = False) -> dict:
    """Steps of in-process rollouts + `Learner.step`; seconds of each part per step. With
    `profile`, cProfile records the measured updates and the result carries its top entries."""
    import cProfile
    import io
    import pstats

    import torch
    from transformers import AutoTokenizer

    from services.common.annotator import load_annotator
    from services.common.models import load_causal_lm
    from services.trainer.learner import Learner
    from tests.support.rollouts import sample_rollouts

    torch.set_num_threads(config.threads)
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    annotator = load_annotator(config.reward_rule)
    learner = Learner(learner_config(config), config.model_dir)
    if config.ours_optimizer == "fused":
        # The experiment: the same AdamW (constant lr, no warmup) with torch's fused kernel.
        learner.optimizer = torch.optim.AdamW(
            learner._parameters(),
            lr=config.lr,
            weight_decay=learner.config.weight_decay,
            eps=learner.config.adam_eps,
            fused=True,
        )
        learner.scheduler = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda _: 1.0)
    reference = load_causal_lm(Path(config.model_dir), torch.device(config.device), torch.float32)
    prompts = load_prompts(config.prompts)
    steps, profiler = [], cProfile.Profile()
    for step in range(config.steps):
        texts = prompts[step * config.prompts_per_step : (step + 1) * config.prompts_per_step]
        ids = [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
                )["input_ids"]
            )
            for q in texts
        ]
        text_of = {tuple(i): q for i, q in zip(ids, texts)}

        def reward(prompt_ids: list[int], response_ids: list[int], text_of=text_of) -> float:
            answer = tokenizer.decode(response_ids, skip_special_tokens=True)
            return annotator.score(text_of[tuple(prompt_ids)], answer)

        # 1. generate, score, reference log-probs
        started, started_cpu = time.perf_counter(), time.process_time()
        samples = sample_rollouts(
            learner.policy,
            reference,
            ids,
            samples_per_prompt=config.group_size,
            max_new_tokens=config.max_new_tokens,
            reward_fn=reward,
            eos_token_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            seed=config.seed * 1000 + step,
            group_prefix=f"s{step}-",
        )
        sync(config.device)
        generated, generated_cpu = time.perf_counter(), time.process_time()
        # 2. the update
        if profile and step > 0:
            profiler.enable()
        metrics = learner.step(samples)
        sync(config.device)
        updated, updated_cpu = time.perf_counter(), time.process_time()
        profiler.disable()
        steps.append(
            {
                "generate_s": generated - started,
                "update_s": updated - generated,
                "generate_cpu_s": generated_cpu - started_cpu,
                "update_cpu_s": updated_cpu - generated_cpu,
                "samples": len(samples),
                "response_tokens": sum(len(s.response_token_ids) for s in samples),
                "reward_mean": metrics["reward/mean"],
            }
        )
    adam = learner.optimizer
    kind = "fused" if adam.defaults.get("fused") else "not fused"
    result = {"steps": steps, **memory_figures(config.device), "optimizer": f"AdamW ({kind})"}
    if profile:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result["profile_top_tottime"] = text.getvalue()
    return result


def run_trl(config: BenchConfig) -> dict:
    """`GRPOTrainer.train` for `steps` optimizer steps; generation timed apart from the update."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from services.common.annotator import load_annotator

    torch.set_num_threads(config.threads)
    annotator = load_annotator(config.reward_rule)
    prompts = load_prompts(config.prompts)[: config.prompts_per_step * config.steps]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in prompts])

    def reward(prompts, completions, **_) -> list[float]:
        return [
            annotator.score(p[-1]["content"], c[-1]["content"])
            for p, c in zip(prompts, completions)
        ]

    steps: list[dict] = []

    class TimedGRPOTrainer(GRPOTrainer):
        """Times step 1 (generate, score, reference log-probs) of every optimizer step."""

        def _generate_and_score_completions(self, inputs):
            sync(config.device)
            started, started_cpu = time.perf_counter(), time.process_time()
            out = super()._generate_and_score_completions(inputs)
            sync(config.device)
            steps[-1]["generate_s"] += time.perf_counter() - started
            steps[-1]["generate_cpu_s"] += time.process_time() - started_cpu
            steps[-1]["samples"] += int(out["completion_ids"].shape[0])
            steps[-1]["response_tokens"] += int(out["completion_mask"].sum())
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **_):
            sync(config.device)
            steps.append(
                {"generate_s": 0.0, "generate_cpu_s": 0.0, "samples": 0, "response_tokens": 0}
            )
            steps[-1]["started"] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **_):
            sync(config.device)
            record = steps[-1]
            wall, cpu = record.pop("started")
            record["step_s"] = time.perf_counter() - wall
            record["update_s"] = record["step_s"] - record["generate_s"]
            record["update_cpu_s"] = time.process_time() - cpu - record["generate_cpu_s"]

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out_dir:
        args = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=config.batch,
            gradient_accumulation_steps=1,
            num_generations=config.group_size,
            max_completion_length=config.max_new_tokens,
            max_steps=config.steps,
            learning_rate=config.lr,
            lr_scheduler_type="constant",
            beta=config.beta,
            temperature=1.0,
            shuffle_dataset=False,
            seed=config.seed,
            use_cpu=config.device == "cpu",
            bf16=config.device != "cpu",
            model_init_kwargs={"dtype": torch.float32},
            logging_steps=10**6,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            disable_tqdm=True,
            gradient_checkpointing=config.trl_gradient_checkpointing,
        )
        trainer = TimedGRPOTrainer(
            model=config.model_dir,
            reward_funcs=reward,
            args=args,
            train_dataset=dataset,
            callbacks=[StepClock()],
        )
        trainer.train()
    return {
        "steps": steps,
        **memory_figures(config.device),
        "trl_version": trl.__version__,
        "optimizer": str(trainer.args.optim),
    }


# ---- the figures ----------------------------------------------------------------------------


def per_run(run: dict) -> dict:
    """One run's figures over its measured steps (the first, a warm-up, left out)."""
    measured = run["steps"][1:]
    samples = sum(s["samples"] for s in measured)
    tokens = sum(s["response_tokens"] for s in measured)
    update_s = sum(s["update_s"] for s in measured)
    generate_s = sum(s["generate_s"] for s in measured)
    # CPU seconds (all threads) inflate far less than wall seconds when other processes take
    # the cores: the noise-robust companion of the wall-clock figure.
    update_cpu_s = sum(s.get("update_cpu_s", math.nan) for s in measured)
    return {
        "update_s_per_sample": update_s / samples,
        "update_cpu_s_per_sample": update_cpu_s / samples,
        "update_ms_per_response_token": 1000 * update_s / tokens,
        "generate_s_per_sample": generate_s / samples,
        "samples_per_s_end_to_end": samples / (update_s + generate_s),
        "response_tokens_mean": tokens / samples,
        "measured_samples": samples,
        "peak_rss_mb": run["peak_rss_mb"],
    }


def spread(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Headline ratios from each side's runs, TRL's time over ours (above 1: we are faster).

    Headlines compare each side's best run (least time, most samples/s), as `timeit` does:
    other processes on the shared cores only ever add time, so the best of N repeats is the
    estimate of the work's own cost, and both sides get the same N. The ratio of the medians,
    the per-repeat ratios and the worst-to-best range are recorded beside each headline."""
    figures = {side: [per_run(r) for r in runs[side]] for side in SIDES}
    table = {
        side: {key: spread([f[key] for f in figures[side]]) for key in figures[side][0]}
        for side in SIDES
    }

    def ratio(key: str, stat: str = "min") -> float:
        """TRL over ours of a time figure; ours over TRL of a rate (stat "max")."""
        ours, trl = table["ours"][key][stat], table["trl"][key][stat]
        return ours / trl if stat == "max" else trl / ours

    update = {side: table[side]["update_s_per_sample"] for side in SIDES}
    return {
        "learner_ratio_vs_trl": ratio("update_s_per_sample"),
        "learner_ratio_vs_trl_median": ratio("update_s_per_sample", "median"),
        "learner_ratio_vs_trl_per_repeat": [
            t["update_s_per_sample"] / o["update_s_per_sample"]
            for o, t in zip(figures["ours"], figures["trl"])
        ],
        "learner_ratio_vs_trl_worst_best": [
            update["trl"]["min"] / update["ours"]["max"],
            update["trl"]["max"] / update["ours"]["min"],
        ],
        "learner_token_ratio_vs_trl": ratio("update_ms_per_response_token"),
        "learner_cpu_ratio_vs_trl": ratio("update_cpu_s_per_sample"),
        "inprocess_end_to_end_ratio_vs_trl": ratio("samples_per_s_end_to_end", "max"),
        "trl_samples_per_s_end_to_end": table["trl"]["samples_per_s_end_to_end"]["max"],
        "sides": table,
    }


# ---- orchestration --------------------------------------------------------------------------


def run_side(side: str, config: BenchConfig, timeout_s: float, staleness: int = 0) -> dict:
    """One run of `side` in a fresh interpreter; its last stdout line is its JSON result."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env[ROLE_ENV] = f"trainer_vs_trl {side}"  # its peak RSS entry (bench/memory.py)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bench.trainer_vs_trl", "--worker", side,
         "--staleness", str(staleness), "--config", json.dumps(dataclasses.asdict(config))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - started
    return result


def trl_ppo_trainer() -> str | None:
    """Where this TRL ships a PPO trainer, if anywhere (it moved to trl.experimental before)."""
    import importlib.util

    import trl

    if hasattr(trl, "PPOTrainer"):
        return "trl.PPOTrainer"
    for module in ("trl.experimental.ppo", "trl.trainer.ppo_trainer"):
        with warnings.catch_warnings():
            # Looking inside trl.experimental imports it, which warns that it is experimental.
            warnings.simplefilter("ignore")
            try:
                if importlib.util.find_spec(module) is not None:
                    return module
            except ModuleNotFoundError:
                continue
    return None


def ppo_figures() -> dict:
    import trl

    where = trl_ppo_trainer()
    reason = (
        f"TRL {trl.__version__} ships a PPO trainer ({where}), but this bench does not run it yet"
        if where
        else f"TRL {trl.__version__} ships no PPO trainer: no trl.PPOTrainer, no "
        "trl.experimental.ppo (its on-policy trainers are GRPOTrainer and RLOOTrainer)"
    )
    return {"ppo_vs_trl": None, "ppo_vs_trl_missing": reason, "trl_ppo_trainer": where}


# What a result says where part `pipeline` has never run into it.
PIPELINE_MISSING = "not measured: run `python -m bench.trainer_vs_trl --parts pipeline`"


def check_pieces(config: BenchConfig) -> dict:
    """What --dry-run checks: the config is valid and both sides' code imports."""
    import trl
    from trl import GRPOConfig, GRPOTrainer  # noqa: F401

    from bench.overlap import run_overlap  # noqa: F401
    from bench.pipeline import run_pipeline  # noqa: F401
    from deploy.local.stack import Stack  # noqa: F401
    from services.common.annotator import load_annotator
    from services.trainer.learner import Learner  # noqa: F401
    from tests.support.rollouts import sample_rollouts  # noqa: F401

    config.validate()
    load_annotator(config.reward_rule)
    return {
        "config": dataclasses.asdict(config),
        "trl_version": trl.__version__,
        "trl_ppo_trainer": trl_ppo_trainer(),
        "ok": True,
    }


def truth(value: str) -> bool:
    """A command-line boolean: true/false, yes/no, on/off, 1/0; anything else is an error."""
    answer = {"true": True, "yes": True, "on": True, "1": True}
    answer.update({"false": False, "no": False, "off": False, "0": False})
    if value.lower() not in answer:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return answer[value.lower()]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, BenchConfig]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller CPU run")
    parser.add_argument("--dry-run", action="store_true", help="check arguments and imports")
    parser.add_argument("--out", type=Path, help="result path (default bench/results/...)")
    parser.add_argument(
        "--profile", action="store_true", help="one run of ours, cProfile of its updates"
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="what to measure: trl (the comparison), overlap, pipeline; a run of some parts keeps the "
        "others' figures from the existing result",
    )
    parser.add_argument("--worker", choices=(*SIDES, "overlap"), help=argparse.SUPPRESS)
    parser.add_argument("--staleness", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    for field in dataclasses.fields(BenchConfig):
        kind = type(field.default)
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=truth if kind is bool else kind,
        )
    args = parser.parse_args(argv)
    if args.config:
        return args, BenchConfig(**json.loads(args.config))
    values = {**(QUICK if args.quick else {})}
    for field in dataclasses.fields(BenchConfig):
        if getattr(args, field.name) is not None:
            values[field.name] = getattr(args, field.name)
    return args, BenchConfig(**values)


def compare_with_trl(config: BenchConfig) -> dict:
    """The repeats of both sides, alternating; the figures of `summarise` and every raw run."""
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for repeat in range(config.repeats):
        for side in SIDES if repeat % 2 == 0 else reversed(SIDES):
            print(f">> {side} run {repeat + 1}/{config.repeats}", file=sys.stderr, flush=True)
            runs[side].append(run_side(side, config, timeout_s=1800))
            figures = per_run(runs[side][-1])
            print(
                f"   update {figures['update_s_per_sample']:.3f} s/sample "
                f"({figures['update_cpu_s_per_sample']:.3f} CPU s), "
                f"generate {figures['generate_s_per_sample']:.3f} s/sample, "
                f"peak RSS {figures['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    return {
        **summarise(runs),
        "trl_version": runs["trl"][0]["trl_version"],
        "peak_rss_mb_per_run": {side: [r["peak_rss_mb"] for r in runs[side]] for side in SIDES},
        "raw_runs": runs,
        "trl_measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "trl_bench_wall_s": time.perf_counter() - started,
    }


def measure_overlap(config: BenchConfig) -> dict:
    """Alternating (max_staleness 0) and overlapped runs, interleaved (bench/overlap.py)."""
    from bench.overlap import overlap_summary

    started = time.perf_counter()
    modes = (0, config.overlap_staleness)
    runs: dict[int, list[dict]] = {mode: [] for mode in modes}
    for repeat in range(config.overlap_repeats):
        for mode in modes if repeat % 2 == 0 else reversed(modes):
            print(
                f">> overlap max_staleness={mode} run {repeat + 1}/{config.overlap_repeats}",
                file=sys.stderr,
                flush=True,
            )
            runs[mode].append(run_side("overlap", config, timeout_s=1800, staleness=mode))
            run = runs[mode][-1]
            print(
                f"   {run['samples_per_s']:.3f} samples/s, staleness {run['staleness']}",
                file=sys.stderr,
                flush=True,
            )
    return {
        **overlap_summary(runs, config.overlap_staleness),
        "overlap_raw_runs": {f"max_staleness_{m}": rs for m, rs in runs.items()},
        "overlap_measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "overlap_bench_wall_s": time.perf_counter() - started,
    }


def measure_pipeline(config: BenchConfig) -> dict:
    """`ratio_vs_trl`: rounds of one TRL run (its samples/s over its steps after the first) and
    one run of the deployed pipeline (bench/pipeline.py, over its updates after the first), the
    order alternating; the headline is best over best, as `summarise`'s."""
    from bench.pipeline import run_pipeline

    started = time.perf_counter()
    trl_runs, pipeline_runs = [], []
    for repeat in range(config.pipeline_repeats):
        order = ("trl", "pipeline") if repeat % 2 == 0 else ("pipeline", "trl")
        for side in order:
            print(f">> {side} run {repeat + 1}/{config.pipeline_repeats}", file=sys.stderr)
            if side == "trl":
                trl_runs.append(run_side("trl", config, timeout_s=1800))
                rate = per_run(trl_runs[-1])["samples_per_s_end_to_end"]
            else:
                pipeline_runs.append(
                    run_pipeline(config, config.pipeline_threads, config.pipeline_staleness)
                )
                rate = pipeline_runs[-1]["samples_per_s"]
            print(f"   {rate:.3f} samples/s", file=sys.stderr, flush=True)
    return {
        **pipeline_summary(trl_runs, pipeline_runs),
        "pipeline_raw_runs": pipeline_runs,
        "pipeline_trl_raw_runs": trl_runs,
        "pipeline_config": {
            **dataclasses.asdict(config),
            "batch": config.batch,
            "max_rollouts": config.batch * config.steps,
            "pipeline": "deploy/local/stack.py: kafka, triton, policy, reference, reward "
            f"(RLHF_REWARD_ANNOTATOR={config.reward_rule}), trainer (grpo), rollout",
        },
        "pipeline_measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "pipeline_bench_wall_s": time.perf_counter() - started,
    }


def pipeline_summary(trl_runs: list[dict], pipeline_runs: list[dict]) -> dict:
    """The headline and its spread from part `pipeline`'s runs (raw TRL runs as run_trl returns
    them; pipeline runs as bench.pipeline.run_pipeline does)."""
    trl = [per_run(r)["samples_per_s_end_to_end"] for r in trl_runs]
    ours = [r["samples_per_s"] for r in pipeline_runs]
    return {
        "ratio_vs_trl": max(ours) / max(trl),
        "ratio_vs_trl_per_repeat": [o / t for o, t in zip(ours, trl)],
        "pipeline_samples_per_s": max(ours),
        "trl_samples_per_s": max(trl),
        "pipeline_samples_per_s_runs": ours,
        "trl_samples_per_s_runs": trl,
        "pipeline_samples_per_s_from_first_update_runs": [
            r["samples_per_s_from_first_update"] for r in pipeline_runs
        ],
        "pipeline_samples_per_s_with_startup_runs": [
            r["samples_per_s_with_startup"] for r in pipeline_runs
        ],
        "pipeline_end_to_end_s_runs": [r["end_to_end_s"] for r in pipeline_runs],
        "trl_process_wall_s_runs": [r["process_wall_s"] for r in trl_runs],
    }


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    try:
        config.validate()
        parts = parse_parts(args.parts)
    except ValueError as err:
        print(f"trainer_vs_trl: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps({**check_pieces(config), "parts": parts}))
        return 0
    if args.profile:
        result = run_ours(config, profile=True)
        print(result.pop("profile_top_tottime"))
        print(json.dumps(result))
        return 0
    if args.worker:
        if args.worker == "overlap":
            from bench.overlap import run_overlap

            result = run_overlap(config, args.staleness)
        else:
            result = run_ours(config) if args.worker == "ours" else run_trl(config)
        print(json.dumps(result))
        return 0

    from bench.run import RESULTS, write_result

    path = args.out or RESULTS / "trainer_vs_trl.json"
    started = time.perf_counter()
    # A run of some parts keeps the figures of the others from the last result.
    result = {} if set(parts) == set(PARTS) or not path.exists() else json.loads(path.read_text())
    # write_result merges this run's peak RSS by role into the kept ones; a file from before
    # bench/memory.py holds per-run lists there instead.
    result.pop("peak_rss_sampling", None)
    kept = result.get("peak_rss_mb")
    if isinstance(kept, dict) and any(isinstance(v, list) for v in kept.values()):
        result.setdefault("peak_rss_mb_per_run", result.pop("peak_rss_mb"))
    if "trl" in parts:
        result.update(compare_with_trl(config))
    if "overlap" in parts:
        result.update(measure_overlap(config))
    if "pipeline" in parts:
        result.pop("ratio_vs_trl_missing", None)
        result.update(measure_pipeline(config))
    elif result.get("ratio_vs_trl") is None:
        result.update({"ratio_vs_trl": None, "ratio_vs_trl_missing": PIPELINE_MISSING})
    if "trl" in parts or "config" not in result:
        # The settings of the kept parts' figures stay; each later part records its own too.
        result["config"] = {**dataclasses.asdict(config), "batch": config.batch}
        result["config"]["quick"] = args.quick
    result.update(
        {
            **ppo_figures(),
            "parts": parts,
            "bench_wall_s": time.perf_counter() - started,
            "measured_at": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
            "cpu_count": os.cpu_count(),
            "machine_note": "2-core CPU shared with other engineers' test runs during the "
            "measurement: absolute times are noisy; the sides alternate so noise falls on both",
        }
    )
    path = write_result("trainer_vs_trl", result, path)
    print(
        json.dumps(
            {k: v for k, v in result.items() if "raw_runs" not in k and k != "sides"}, indent=2
        )
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"--parts takes a comma list of {', '.join(PARTS)}, got {text!r}")
    return parts


if __name__ == "__main__":
    sys.exit(main())
