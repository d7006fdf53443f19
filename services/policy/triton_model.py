"""The policy as a Triton Python-backend model: one decoupled model serves unary and streaming
generation.

Design (documented choice):
- One Triton request is one sequence (one sample of one prompt, batch dimension 1). The dynamic
  batcher groups concurrent requests of any prompt length (INPUT_IDS and STOP are ragged) and
  `execute` generates the whole group in one forward loop (services.policy.generation) with a KV cache.
- Decoupled: a request with STREAM=true gets one response per generated token and an empty
  final one; with STREAM=false it gets one response with all tokens (per-step responses would
  cost an IPC round trip per token per row for nothing). Both carry FINISH_REASON,
  WEIGHTS_VERSION and BATCH_SIZE (rows generated together), and TOP_IDS / TOP_LOGPROBS
  (tokens x NUM_TOP_LOGPROBS alternatives, -inf padded where filters left fewer).
- Sampling inputs beyond temperature/top-k/top-p: PRESENCE_PENALTY, FREQUENCY_PENALTY and the
  optional LOGIT_BIAS_IDS / LOGIT_BIAS_VALUES pair (services.policy.sampling).
- A request with MAX_NEW_TOKENS=0 is a control request: no generation, one response with the
  served version and INFO (JSON: dtype, device, parameter count). The gRPC service sends one
  after publishing new weights, so the swap is done before UpdateWeights returns.
- Weights: at the start of every execute the model stats `<weights_root>/CURRENT` (services.
  policy.weights); when it changed, the new tensors are checked against the served ones and
  copied into the parameters in place (no new stub process, no reload), between two batches.
- Cancellation: `request.is_cancelled()` is asked for every running row before every step.
- Custom metric `rlhf_policy_model_generated_tokens_total` on Triton's /metrics counts tokens
  generated inside Triton (what proves that a cancelled stream stops work).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from services.common.models import load_causal_lm, load_tokenizer, select_dtype
from services.common.triton_repo import TensorIO, instance_device, model_parameters
from services.policy.generation import Finish, Row, generate_rows
from services.policy.sampling import RowSampling
from services.policy.weights import compare_specs, files_specs, folder_weight_files, read_marker

log = logging.getLogger(__name__)

INPUTS = (
    TensorIO("INPUT_IDS", "TYPE_INT64", (-1,), ragged=True),
    TensorIO("MAX_NEW_TOKENS", "TYPE_INT32", (1,)),
    TensorIO("TEMPERATURE", "TYPE_FP32", (1,)),
    TensorIO("TOP_P", "TYPE_FP32", (1,)),
    TensorIO("TOP_K", "TYPE_INT32", (1,)),
    TensorIO("SEED", "TYPE_INT64", (1,)),
    TensorIO("STREAM", "TYPE_BOOL", (1,)),
    TensorIO("STOP", "TYPE_STRING", (-1,), optional=True, ragged=True),
    TensorIO("PRESENCE_PENALTY", "TYPE_FP32", (1,)),
    TensorIO("FREQUENCY_PENALTY", "TYPE_FP32", (1,)),
    TensorIO("NUM_TOP_LOGPROBS", "TYPE_INT32", (1,)),
    TensorIO("LOGIT_BIAS_IDS", "TYPE_INT64", (-1,), optional=True, ragged=True),
    TensorIO("LOGIT_BIAS_VALUES", "TYPE_FP32", (-1,), optional=True, ragged=True),
)
OUTPUTS = (
    TensorIO("TOKEN_IDS", "TYPE_INT64", (-1,)),
    TensorIO("LOGPROBS", "TYPE_FP32", (-1,)),
    TensorIO("FINISH_REASON", "TYPE_INT32", (1,)),
    TensorIO("WEIGHTS_VERSION", "TYPE_INT64", (1,)),
    TensorIO("BATCH_SIZE", "TYPE_INT64", (1,)),
    TensorIO("INFO", "TYPE_STRING", (1,)),
    TensorIO("TOP_IDS", "TYPE_INT64", (-1, -1)),
    TensorIO("TOP_LOGPROBS", "TYPE_FP32", (-1, -1)),
)


class PolicyTritonModel:
    """TritonPythonModel: batched generation with hot-swappable weights."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = model_parameters(args)
        self.device = instance_device(args)
        self.dtype = select_dtype(self.device, params["dtype"])
        if self.device.type == "cpu":
            torch.set_num_threads(
                int(os.environ.get("RLHF_POLICY_TORCH_THREADS", os.cpu_count() or 1))
            )
        model_dir = Path(params["model_dir"])
        self.model = load_causal_lm(model_dir, self.device, self.dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.weights_root = Path(params["weights_root"])
        self.served_specs = files_specs(folder_weight_files(model_dir))
        self.version = int(params["initial_version"])
        self.marker_stat: tuple | None = None
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in [*eos, self.tokenizer.eos_token_id] if e is not None}
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.info = json.dumps(
            {
                "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device),
                "parameter_count": sum(p.numel() for p in self.model.parameters()),
            }
        )
        # The family must outlive its metric, so both are kept.
        self.tokens_family = pb_utils.MetricFamily(
            name="rlhf_policy_model_generated_tokens_total",
            description="Tokens generated inside the Triton policy model.",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.tokens_metric = self.tokens_family.Metric(labels={"model": args["model_name"]})
        self._maybe_swap()

    # Weights ------------------------------------------------------------------------------

    def _maybe_swap(self) -> None:
        """Copies a newly published version into the parameters (called between batches)."""
        try:
            st = os.stat(self.weights_root / "CURRENT")
        except FileNotFoundError:
            return
        stat = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stat == self.marker_stat:
            return
        self.marker_stat = stat
        marker = read_marker(self.weights_root)
        if marker is None or marker.weights_version == self.version:
            return
        try:
            compare_specs(
                self.served_specs,
                files_specs(list(marker.files)),
                f"version {marker.weights_version}",
            )
            load_into(self.model, list(marker.files))
        except Exception:  # a bad set never replaces the served one
            log.exception("weights version %s not loaded", marker.weights_version)
            return
        self.version = marker.weights_version

    # Serving ------------------------------------------------------------------------------

    def execute(self, requests: list) -> None:
        pb = self.pb
        self._maybe_swap()
        rows, live = [], []
        for request in requests:
            row, stream = self._row(request)
            if row.max_new_tokens <= 0:
                self._send(request, [], [], Finish.NONE, 0, final=True, info=True)
            else:
                rows.append(row)
                live.append((request, stream))
        if not rows:
            return
        batch = len(rows)
        sent = [0] * batch

        def on_token(i: int, token: int, logprob: float, finish: Finish) -> None:
            request, stream = live[i]
            if stream:
                row = rows[i]
                top = (row.top_ids[-1:], row.top_logprobs[-1:]) if row.top_ids else ([], [])
                self._send(request, [token], [logprob], finish, batch, final=False, top=top)
                sent[i] += 1

        try:
            generate_rows(
                self.model,
                rows,
                self.pad_id,
                self.eos_ids,
                self._decode,
                on_token,
                cancelled=lambda i: live[i][0].is_cancelled(),
                on_step=lambda produced: self.tokens_metric.increment(float(produced)),
            )
        except Exception as exc:  # every request of the batch gets the error, none hangs
            log.exception("generation failed")
            for request, _ in live:
                request.get_response_sender().send(
                    pb.InferenceResponse(error=pb.TritonError(f"generation failed: {exc}")),
                    flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
            return
        for (request, stream), row in zip(live, rows):
            if stream:
                self._send(request, [], [], row.finish, batch, final=True)
            else:
                top = (row.top_ids, row.top_logprobs)
                self._send(request, row.tokens, row.logprobs, row.finish, batch, True, top=top)
        return

    def _row(self, request) -> tuple[Row, bool]:
        get = lambda name: self.pb.get_input_tensor_by_name(request, name)
        scalar = lambda name: get(name).as_numpy().reshape(-1)[0]
        optional = lambda name: [] if get(name) is None else get(name).as_numpy().reshape(-1)
        stop = [s.decode() if isinstance(s, bytes) else str(s) for s in optional("STOP")]
        bias = dict(
            zip(
                (int(t) for t in optional("LOGIT_BIAS_IDS")),
                (float(v) for v in optional("LOGIT_BIAS_VALUES")),
            )
        )
        row = Row(
            prompt_ids=get("INPUT_IDS").as_numpy().reshape(-1).tolist(),
            max_new_tokens=int(scalar("MAX_NEW_TOKENS")),
            sampling=RowSampling(
                temperature=float(scalar("TEMPERATURE")),
                top_p=float(scalar("TOP_P")),
                top_k=int(scalar("TOP_K")),
                seed=int(scalar("SEED")),
                presence_penalty=float(scalar("PRESENCE_PENALTY")),
                frequency_penalty=float(scalar("FREQUENCY_PENALTY")),
                logit_bias=bias,
                top_logprobs=int(scalar("NUM_TOP_LOGPROBS")),
            ),
            stop=[s for s in stop if s],
        )
        return row, bool(scalar("STREAM"))

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _send(
        self,
        request,
        tokens,
        logprobs,
        finish: Finish,
        batch: int,
        final: bool,
        info: bool = False,
        top: tuple[list[list[int]], list[list[float]]] = ([], []),
    ) -> None:
        pb = self.pb
        top_ids, top_logprobs = top_arrays(*top, len(tokens))
        outputs = [
            pb.Tensor("TOKEN_IDS", np.asarray(tokens, dtype=np.int64).reshape(1, -1)),
            pb.Tensor("LOGPROBS", np.asarray(logprobs, dtype=np.float32).reshape(1, -1)),
            pb.Tensor("FINISH_REASON", np.array([[int(finish)]], dtype=np.int32)),
            pb.Tensor("WEIGHTS_VERSION", np.array([[self.version]], dtype=np.int64)),
            pb.Tensor("BATCH_SIZE", np.array([[batch]], dtype=np.int64)),
            pb.Tensor("TOP_IDS", top_ids),
            pb.Tensor("TOP_LOGPROBS", top_logprobs),
        ]
        if info:
            outputs.append(pb.Tensor("INFO", np.array([[self.info.encode()]], dtype=np.object_)))
        flags = pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        request.get_response_sender().send(
            pb.InferenceResponse(output_tensors=outputs), flags=flags
        )

    def finalize(self) -> None:
        self.tokens_metric = None
        self.tokens_family = None
        self.model = None


def top_arrays(
    ids: list[list[int]], logprobs: list[list[float]], tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-token alternatives as (1, tokens, K) arrays, K the longest list; shorter lists are
    padded with id -1 and log-prob -inf (the stub needs rectangular tensors)."""
    width = max((len(x) for x in ids), default=0)
    out_ids = np.full((1, tokens, width), -1, dtype=np.int64)
    out_lp = np.full((1, tokens, width), -np.inf, dtype=np.float32)
    for t, (row_ids, row_lp) in enumerate(zip(ids, logprobs)):
        out_ids[0, t, : len(row_ids)] = row_ids
        out_lp[0, t, : len(row_lp)] = row_lp
    return out_ids, out_lp


@torch.no_grad()
def load_into(model, files: list[Path]) -> None:
    """Copies every tensor of `files` into the model's parameters in place (tied ones follow)."""
    from safetensors import safe_open

    state = model.state_dict()
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                state[name].copy_(f.get_tensor(name))
