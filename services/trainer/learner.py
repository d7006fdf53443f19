"""The in-process RL learner: one `Learner.step(samples)` is one RL update of the policy from a
batch of scored rollouts. The Kafka loop (loop.py) feeds it rollouts converted from
`rlhf.v1.Rollout` messages; tests and benchmarks feed it
`tests.support.rollouts.sample_rollouts(...)` in-process.

    learner = Learner(LearnerConfig(algorithm="grpo", lr=1e-6), policy_dir)
    metrics = learner.step(samples)        # list[RolloutSample] -> {"reward/mean": ..., ...}
    torch.save(learner.state_dict(), path) # model, value head, optimizer, scheduler, RNG, KL coef
    learner.load_state_dict(torch.load(path, weights_only=True))
    weights = learner.policy_state_dict()  # CPU tensors for the weights push (tied ones once)

With `lora_rank` > 0 (LearnerConfig) the policy is a peft LoRA model on the frozen base (lora.py):
only the adapters train, `state_dict` holds only them, `adapter_state_dict()` is what a push
sends, and `policy_state_dict()` is the merged weights the policy will serve.

One step, in order:
  1. collate: left-padded prompts, right-padded responses (shapes below);
  2. values of the sampled states from the value head before the update (PPO's critic);
  3. token-level rewards: the reward model's score, shaped by the reward-hacking guards
     (minus k * ensemble spread, length control: algorithms/guards.py), at the last response
     token, minus beta * KL per token when KL sits in the reward;
  4. advantages from the algorithm's registered estimator (GAE, GRPO, RLOO), optionally whitened;
  5. `ppo_epochs` passes of minibatches: registered policy loss (importance ratio against the
     BEHAVIOUR log-probs recorded at generation) + value loss + beta * KL loss when KL sits in
     the loss - entropy bonus; gradients averaged across torch.distributed ranks; clip; step;
  6. the hard KL budget, when set: the policy's per-token KL to the reference on this batch is
     measured before and after step 5; a step that ends over the budget and above where it
     started is undone (parameters, optimizer and scheduler restored bit for bit) and counted;
  7. the KL controller sees the batch's KL (averaged across ranks).

With torch.distributed initialised, every rank must call `step` with the same number of
samples (so all ranks take the same number of optimizer steps); ranks start from rank 0's
weights and stay identical because gradients are averaged before every optimizer step. The
collectives for this are in distributed.py.

Legend: `B` batch, `P` prompt tokens (left-padded), `A` response tokens (right-padded),
`T` = P + A all tokens, `V` vocabulary, `H` hidden size.
The inputs (RolloutSample, collate) live in rollouts.py, the config (LearnerConfig) in
config.py; both are re-exported.
Tests: tests/unit/trainer/test_learner.py, test_learning.py and test_distributed.py.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from services.common.lora_adapter import AdapterConfig
from services.common.models import load_causal_lm, select_device, select_dtype
from services.trainer import distributed, lora
from services.trainer.algorithms import (
    ADVANTAGE_ESTIMATORS,
    ALGORITHMS,
    DEFAULT_KL_ESTIMATOR,
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    KL_PLACEMENT,
    POLICY_LOSSES,
    VALUE_LOSSES,
    KLEstimator,
    KLMode,
    entropy_from_logits,
    kl_loss,
    kl_penalized_rewards,
    length_reward_correlation,
    masked_mean,
    masked_sum,
    masked_whiten,
    shaped_scores,
    token_mean_kl,
)
from services.trainer.config import LearnerConfig
from services.trainer.rollouts import (  # noqa: F401 - re-exported: the learner's inputs
    RolloutBatch,
    RolloutSample,
    collate,
    response_logprobs,
    sequence_logits,
)

__all__ = [
    "Learner",
    "LearnerConfig",
    "RolloutBatch",
    "RolloutSample",
    "ValueHead",
    "collate",
]


class ValueHead(nn.Module):
    """A scalar value per position from the policy's last hidden state: (..., H) -> (...)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)


class Learner:
    """Holds the policy (+ value head), optimizer, scheduler, KL controller; `step` updates them."""

    def __init__(self, config: LearnerConfig, policy_dir: Path | str):
        self.config = config.validate()
        self.spec = ALGORITHMS.get(config.algorithm)
        self.kl_mode = KLMode(config.kl_mode or self.spec.kl_mode)
        self.kl_estimator = KL_ESTIMATORS.key(
            config.kl_estimator or DEFAULT_KL_ESTIMATOR[self.kl_mode]
        )
        self.whiten = (
            self.spec.whiten_advantages
            if config.whiten_advantages is None
            else config.whiten_advantages
        )
        use_value_head = (
            self.spec.value_loss is not None if config.value_head is None else config.value_head
        )
        if use_value_head and self.spec.value_loss is None:
            raise ValueError(
                f"algorithm {config.algorithm!r} has no value loss to train a value head with"
            )
        self.device = select_device(config.device)
        self.compute_dtype = select_dtype(self.device, config.dtype)
        torch.manual_seed(config.seed)
        # Master weights in float32; bf16 (on CUDA) only inside autocast. Dropout stays off
        # (eval mode): it would make the trainer's log-probs disagree with the sampler's.
        self.policy = load_causal_lm(Path(policy_dir), self.device, torch.float32)
        self.lora = bool(config.lora_rank)
        if self.lora:  # adapters only: the base stays frozen (lora.py)
            self.lora_signature = lora.signature(config, lora.base_fingerprint(self.policy))
            self.policy = lora.wrap(self.policy, config)
        else:
            self.lora_signature = {}
            self.policy.requires_grad_(True)
        self.value_head = (
            ValueHead(self.policy.config.hidden_size).to(self.device) if use_value_head else None
        )
        self.optimizer = torch.optim.AdamW(
            self._parameters(), lr=config.lr, weight_decay=config.weight_decay, eps=config.adam_eps
        )
        warmup = config.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.kl_controller = KL_CONTROLLERS.get(config.kl_control)(
            config.kl_coef, config.target_kl, config.kl_horizon
        )
        self.generator = torch.Generator().manual_seed(config.seed)  # minibatch shuffles
        self.global_step = 0
        self.kl_budget_skips = 0
        # Every rank starts from rank 0's weights (and value head).
        distributed.broadcast_parameters(self._parameters())

    # ---- the update ---------------------------------------------------------------------

    def step(self, samples: list[RolloutSample]) -> dict[str, float]:
        """One RL update from a batch of rollouts; returns namespaced float metrics."""
        started = time.perf_counter()
        cfg = self.config
        # 1. Collate and check; with several ranks, all agree first, so a bad batch on one rank
        #    is an error on every rank rather than a hang in the next collective.
        try:
            batch, refusal = collate(samples, pad_id=self._pad_id()).to(self.device), None
            self._check_vocabulary(batch)
        except ValueError as exc:
            batch, refusal = None, exc
        self._agree_on_batch(len(samples), refusal)
        metrics: dict[str, float] = {}

        # 2. Values of the sampled states before the update (the value clipping anchors on them).
        old_values = old_logprobs = None
        if self.value_head is not None:
            with torch.no_grad():
                old_logprobs, _, old_values = self._forward(batch, need_entropy=False)  # (B, A)

        # 3. Token-level rewards, from the scores the guards shaped.
        lengths = batch.response_mask.sum(dim=-1)  # (B,)
        scores, guard_metrics = shaped_scores(
            batch.scores,
            batch.reward_spreads,
            lengths,
            uncertainty_penalty=cfg.uncertainty_penalty,
            length_penalty=cfg.length_penalty,
            length_normalise=cfg.length_normalise,
        )  # (B,)
        metrics.update(guard_metrics)
        beta = self.kl_controller.value
        reward_beta, loss_beta = (beta * m for m in KL_PLACEMENT[self.kl_mode])
        token_rewards, kl_metrics = kl_penalized_rewards(
            scores,
            batch.behaviour_logprobs,
            batch.reference_logprobs,
            batch.response_mask,
            kl_coef=reward_beta,
            estimator=self.kl_estimator if self.kl_mode is KLMode.REWARD else KLEstimator.K1,
        )  # (B, A)
        metrics.update(kl_metrics)

        # 4. Advantages.
        advantages, returns = ADVANTAGE_ESTIMATORS.get(self.spec.advantage)(
            token_level_rewards=token_rewards,
            response_mask=batch.response_mask,
            values=old_values,
            group_index=batch.group_index,
            gamma=cfg.gamma,
            lam=cfg.lam,
            norm_by_std=cfg.grpo_norm_by_std,
        )  # (B, A) each
        if self.whiten and int(batch.response_mask.sum()) > 1:
            advantages = masked_whiten(advantages, batch.response_mask)
        metrics["advantages/mean"] = float(masked_mean(advantages, batch.response_mask))
        metrics["advantages/abs_mean"] = float(masked_mean(advantages.abs(), batch.response_mask))
        metrics["returns/mean"] = float(masked_mean(returns, batch.response_mask))

        # 5. Epochs of minibatch updates (with a KL budget, from a snapshot to fall back on).
        # (PPO's value pass above already gave the log-probs the KL before the step needs.)
        before = self._snapshot_and_kl(batch, old_logprobs) if cfg.kl_budget is not None else None
        size = batch.size
        minibatch = cfg.minibatch_size or size
        sums: dict[str, float] = defaultdict(float)
        updates = 0
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(size, generator=self.generator)
            for begin in range(0, size, minibatch):
                rows = order[begin : begin + minibatch].to(self.device)
                step_metrics = self._update(batch, rows, advantages, returns, old_values, loss_beta)
                for key, value in step_metrics.items():
                    sums[key] += value
                updates += 1
        metrics.update({key: value / updates for key, value in sums.items()})

        # 6. The hard KL budget.
        if before is not None:
            metrics.update(self._enforce_kl_budget(batch, *before))

        # 7. KL controller from the batch's sequence KL (k1, behaviour vs reference).
        sequence_kl = masked_sum(
            batch.behaviour_logprobs - batch.reference_logprobs, batch.response_mask, dim=-1
        )
        observed = distributed.mean_over_ranks(
            torch.stack([sequence_kl.mean(), torch.tensor(float(size))])
        )
        samples_seen = round(float(observed[1]) * distributed.world_size())
        self.kl_controller.update(float(observed[0]), n_steps=samples_seen)
        self.global_step += 1

        metrics.update(length_reward_correlation(lengths, batch.scores))
        gold = batch.gold_scores[~torch.isnan(batch.gold_scores)]
        if gold.numel():
            metrics["gold/mean"] = float(gold.mean())
            metrics["gold/count"] = float(gold.numel())
        metrics.update(
            {
                "reward/mean": float(batch.scores.mean()),
                "reward/std": float(batch.scores.std()) if size > 1 else 0.0,
                "kl/coef": beta,
                "kl/behaviour_ref_k1": float(sequence_kl.mean()),
                "response/length_mean": float(lengths.float().mean()),
                "rollout/weights_version_min": float(batch.weights_version.min()),
                "batch/size": float(size),
                "optim/lr": self.scheduler.get_last_lr()[0],
                "optim/updates": float(updates),
                "time/step_s": time.perf_counter() - started,
            }
        )
        return metrics

    def _update(
        self, batch: RolloutBatch, rows, advantages, returns, old_values, loss_beta: float
    ) -> dict[str, float]:
        """One optimizer step on the minibatch `rows`, accumulated over micro-batches."""
        cfg = self.config
        minibatch_tokens = batch.response_mask[rows].sum().clamp(min=1.0)
        micro = cfg.micro_batch_size or len(rows)
        totals: dict[str, float] = defaultdict(float)
        self.optimizer.zero_grad(set_to_none=False)
        for begin in range(0, len(rows), micro):
            part_rows = rows[begin : begin + micro]
            part = batch.select(part_rows)
            mask = part.response_mask  # (b, A)
            weight = mask.sum() / minibatch_tokens  # token-mean over the whole minibatch
            with lora.adapter_dropout(self.policy, self.lora and cfg.lora_dropout > 0):
                logprobs, entropy, values = self._forward(part, need_entropy=True)  # (b, A) each
            loss, pg_metrics = POLICY_LOSSES.get(self.spec.policy_loss)(
                logprobs,
                part.behaviour_logprobs,
                advantages[part_rows],
                mask,
                cfg.clip_low,
                cfg.clip_high,
            )
            part_metrics = dict(pg_metrics)
            if values is not None:
                value_loss, value_metrics = VALUE_LOSSES.get(self.spec.value_loss)(
                    values, old_values[part_rows], returns[part_rows], mask, cfg.value_clip
                )
                loss = loss + cfg.value_coef * value_loss
                part_metrics.update(value_metrics)
            if loss_beta > 0:
                kl_term, kl_metrics = kl_loss(
                    logprobs, part.reference_logprobs, mask, self.kl_estimator
                )
                loss = loss + loss_beta * kl_term
                part_metrics.update(kl_metrics)
            entropy_mean = masked_mean(entropy, mask)
            if cfg.entropy_coef:
                loss = loss - cfg.entropy_coef * entropy_mean
            part_metrics["policy/entropy"] = float(entropy_mean.detach())
            part_metrics["loss/total"] = float(loss.detach())
            (loss * weight).backward()
            for key, value in part_metrics.items():
                totals[key] += float(weight) * value
        params = self._parameters()
        distributed.average_gradients(params)
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])
            )
        # Gradients are identical on every rank here, so every rank makes the same choice.
        if torch.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        totals["optim/nonfinite_skipped"] = float(not torch.isfinite(grad_norm))
        totals["optim/grad_norm"] = float(grad_norm)
        return totals

    # ---- the hard KL budget -----------------------------------------------------------------

    def _policy_ref_kl(self, batch: RolloutBatch, logprobs: torch.Tensor | None = None) -> float:
        """Per-token KL of the current policy to the reference on `batch` (all ranks' tokens),
        from the policy's log-probs (B, A) when the caller has them, else from a forward pass."""
        totals = torch.zeros(2, dtype=torch.float64)
        parts = [(batch, logprobs)] if logprobs is not None else self._policy_logprobs(batch)
        for part, part_logprobs in parts:
            kl_sum, tokens = token_mean_kl(
                part_logprobs, part.reference_logprobs, part.response_mask,
                self.config.kl_budget_estimator,
            )  # fmt: skip
            totals += torch.stack([kl_sum, tokens]).double().cpu()
        # The mean over ranks of (sum, count) has the ratio of the sums over ranks.
        totals = distributed.mean_over_ranks(totals)
        return float(totals[0] / totals[1].clamp(min=1.0))

    def _policy_logprobs(self, batch: RolloutBatch):
        """(micro-batch, its response log-probs (b, A)) pairs of the current policy, no grad."""
        micro = self.config.micro_batch_size or batch.size
        with torch.no_grad():
            for begin in range(0, batch.size, micro):
                rows = torch.arange(begin, min(begin + micro, batch.size), device=self.device)
                part = batch.select(rows)
                yield part, self._forward(part, need_entropy=False)[0]

    def _snapshot_and_kl(
        self, batch: RolloutBatch, logprobs: torch.Tensor | None = None
    ) -> tuple[dict, float]:
        """What an undone step restores (copies, not views), and the KL before the step."""
        snapshot = {
            "parameters": [p.detach().clone() for p in self._parameters()],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
        }
        return snapshot, self._policy_ref_kl(batch, logprobs)

    def _enforce_kl_budget(
        self, batch: RolloutBatch, snapshot: dict, kl_before: float
    ) -> dict[str, float]:
        """Undoes the step just taken if it ended over the budget and above where it started (a
        step that brings an over-budget policy back towards the reference is kept). Every rank
        measured the same all-rank KL, so every rank makes the same choice."""
        kl_after = self._policy_ref_kl(batch)
        skipped = kl_after > self.config.kl_budget and kl_after > kl_before
        if skipped:
            with torch.no_grad():
                for param, saved in zip(self._parameters(), snapshot["parameters"]):
                    param.copy_(saved)
            self.optimizer.load_state_dict(snapshot["optimizer"])
            self.scheduler.load_state_dict(snapshot["scheduler"])
            self.kl_budget_skips += 1
        return {
            "kl/policy_ref_before": kl_before,
            "kl/policy_ref_after": kl_after,
            "kl/policy_ref": kl_before if skipped else kl_after,
            "kl/budget": float(self.config.kl_budget),
            "guard/kl_budget_skipped": float(skipped),
            "guard/kl_budget_skips": float(self.kl_budget_skips),
        }

    def _forward(self, part: RolloutBatch, need_entropy: bool):
        """Log-probs of the response tokens, their entropies and values: each (b, A) or None."""
        with torch.autocast(
            self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32
        ):
            logits, hidden = sequence_logits(
                self.policy, part, need_hidden=self.value_head is not None
            )
        logits = logits.float() / self.config.temperature  # (b, A, V)
        log_z = torch.logsumexp(logits, dim=-1)  # (b, A)
        token_logits = logits.gather(-1, part.response_ids.unsqueeze(-1)).squeeze(-1)  # (b, A)
        logprobs = (token_logits - log_z) * part.response_mask
        entropy = None
        if need_entropy:
            # Without an entropy bonus it is only a metric: no graph through a (b, A, V) softmax
            # (py-spy: 6.7% of a PPO step on SmolLM2 when it had one).
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.config.entropy_coef)):
                entropy = entropy_from_logits(logits)
        values = (
            self.value_head(hidden.float()) * part.response_mask
            if self.value_head is not None
            else None
        )
        return logprobs, entropy, values

    # ---- state --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed learner needs; tensors, numbers and strings only, so that
        `torch.load(..., weights_only=True)` reads it back."""
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            # With LoRA the base is the model folder's, frozen: only the adapters are state.
            "policy": lora.adapter_state_dict(self.policy)
            if self.lora
            else self.policy.state_dict(),
            "lora": self.lora_signature,
            "value_head": self.value_head.state_dict() if self.value_head is not None else {},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_controller": self.kl_controller.state_dict(),
            "rng": rng,
            "global_step": self.global_step,
            "kl_budget_skips": self.kl_budget_skips,
            "algorithm": self.config.algorithm,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("algorithm") != self.config.algorithm:
            raise ValueError(
                f"checkpoint is for {state.get('algorithm')!r}, "
                f"learner runs {self.config.algorithm!r}"
            )
        if bool(state["value_head"]) != (self.value_head is not None):
            raise ValueError("checkpoint and learner disagree on having a value head")
        if state.get("lora", {}) != self.lora_signature:
            raise ValueError(
                f"checkpoint has LoRA {state.get('lora') or 'off'}, "
                f"learner runs {self.lora_signature or 'off'} (with LoRA the base weights' "
                "BLAKE3 must match too: adapters apply to the base they were trained on)"
            )
        if self.lora:
            lora.load_adapter_state(self.policy, state["policy"])
        else:
            self.policy.load_state_dict(state["policy"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.global_step = int(state["global_step"])
        self.kl_budget_skips = int(state.get("kl_budget_skips", 0))

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The policy's weights as CPU tensors, each storage once: tied weights (lm_head =
        embed_tokens) keep their first name only, as `save_pretrained` does, so the result can
        go straight to `safetensors.torch.save_file`. With LoRA: the merged weights the policy
        serves, base + (alpha/r) B @ A, under the base model's names."""
        weights, seen = {}, set()
        state = lora.merged_state_dict(self.policy) if self.lora else self.policy.state_dict()
        for name, tensor in state.items():
            key = (
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
            )
            if key in seen:
                continue
            seen.add(key)
            weights[name] = tensor.detach().to("cpu", copy=True).contiguous()
        return weights

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA adapter's tensors (CPU, peft's names): what a LoRA run pushes."""
        if not self.lora:
            raise ValueError("this learner trains no LoRA adapter")
        return lora.adapter_state_dict(self.policy)

    def adapter_push(
        self, base_version: int
    ) -> tuple[dict[str, torch.Tensor], AdapterConfig, dict]:
        """What a LoRA push writes (weights_push.write_adapter_version): the adapter's tensors,
        its merge settings on the base of `base_version`, and peft's adapter_config.json."""
        return (
            self.adapter_state_dict(),
            lora.adapter_config(self.config, base_version),
            lora.peft_config_json(self.policy),
        )

    # ---- helpers ------------------------------------------------------------------------

    def _parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.policy.parameters() if p.requires_grad]  # LoRA: adapters only
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        return params

    def _pad_id(self) -> int:
        pad = self.policy.config.pad_token_id
        if pad is None:
            pad = self.policy.config.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        return int(pad) if pad is not None else 0

    def _check_vocabulary(self, batch: RolloutBatch) -> None:
        vocab = self.policy.get_input_embeddings().num_embeddings
        biggest = int(torch.maximum(batch.input_ids.max(), batch.response_ids.max()))
        if biggest >= vocab:
            raise ValueError(f"token id {biggest} is outside the policy's vocabulary of {vocab}")

    def _agree_on_batch(self, size: int, refusal: ValueError | None) -> None:
        """Raises `refusal`, or on every rank if any rank refused or the batch sizes differ."""
        votes = distributed.vote(size, refusal is not None)
        if refusal is not None:
            raise refusal
        if votes.flagged:
            raise ValueError("another rank refused its batch of rollouts; no rank steps")
        if votes.smallest != size or votes.largest != size:
            raise ValueError(
                f"ranks disagree on the batch size (this rank: {size}); "
                "every rank must step on as many samples"
            )
