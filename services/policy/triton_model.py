"""The policy as a Triton Python-backend model: one decoupled model serves unary and streaming
generation.

Design (documented choice):
- One Triton request is one sequence (one sample of one prompt, batch dimension 1; INPUT_IDS and
  STOP are ragged). Two schedulers, by the model parameter `scheduler`:
  - `continuous` (the default): `execute` hands each request to the iteration-level scheduler
    (services.policy.scheduler) and returns at once; a request joins the running batch at the
    next decoding step and leaves it the step it finishes (services.policy.batching), samples
    of one prompt are prefilled once (`share_prefix`), and `max_rows` / `max_kv_tokens` bound
    the rows decoding together (the rest wait in the scheduler's FIFO). Weight swaps wait until
    no row runs, so no sample spans two versions (the scheduler's docstring says why).
  - `static` (today's baseline, kept for bench/generation.py): the dynamic batcher's group is
    generated in one forward loop (services.policy.generation) and nothing joins it.
- Decoupled: a request with STREAM=true gets one response per generated token and an empty
  final one; with STREAM=false it gets one response with all tokens (per-step responses would
  cost an IPC round trip per token per row for nothing). Both carry FINISH_REASON,
  WEIGHTS_VERSION and BATCH_SIZE (rows generated together), and TOP_IDS / TOP_LOGPROBS
  (tokens x NUM_TOP_LOGPROBS alternatives, -inf padded where filters left fewer).
- GROUP_ID / GROUP_SIZE (optional): the call a sequence belongs to (services.policy.engine); the
  continuous scheduler admits a group's sequences together once all have arrived.
- Sampling inputs beyond temperature/top-k/top-p: PRESENCE_PENALTY, FREQUENCY_PENALTY and the
  optional LOGIT_BIAS_IDS / LOGIT_BIAS_VALUES pair (services.policy.sampling).
- A request with MAX_NEW_TOKENS=0 is a control request: no generation, one response with the
  served version and INFO (JSON: dtype, device, parameter count). The gRPC service sends one
  after publishing new weights, so the swap is done before UpdateWeights returns.
- Weights: the model stats `<weights_root>/CURRENT` (services.policy.weights) before every
  step (continuous) or execute (static); when it changed, the new tensors are checked against
  the served ones and put into the parameters (no new stub process, no reload): copied on
  CUDA; on a CPU the parameters become copy-on-write views of the pushed files, which moves no
  byte (`load_into`).
- Cancellation: `request.is_cancelled()` is asked for every running row before every step.
- Custom metrics on Triton's /metrics: `rlhf_policy_model_generated_tokens_total` counts tokens
  generated inside Triton (what proves that a cancelled stream stops work);
  `rlhf_policy_model_running_rows`, `..._waiting_rows` and `..._kv_tokens` (reserved KV-cache
  tokens of the running rows) show the continuous scheduler's load.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
from pathlib import Path

import numpy as np
import torch

from services.common.models import load_causal_lm, load_tokenizer, select_dtype
from services.common.safetensors_file import TORCH_DTYPES
from services.common.safetensors_header import data_layout, header_length
from services.common.triton_repo import TensorIO, instance_device, model_parameters
from services.policy.batching import RunningBatch
from services.policy.generation import Finish, Row, generate_rows
from services.policy.sampling import RowSampling
from services.policy.scheduler import BatchLimits, Control, Scheduler, SchedulerState, Sequence
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
    TensorIO("GROUP_ID", "TYPE_INT64", (1,), optional=True),
    TensorIO("GROUP_SIZE", "TYPE_INT32", (1,), optional=True),
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
        self.pending_marker = None
        self._maybe_swap()
        self.scheduler = None
        if params.get("scheduler", "continuous") == "continuous":
            self.state_families, self.state_metrics = {}, {}
            for name, what in (
                ("running_rows", "Rows the continuous scheduler is decoding."),
                ("waiting_rows", "Sequences waiting in the model to join the running batch."),
                ("kv_tokens", "KV-cache tokens reserved by the running rows."),
            ):
                family = pb_utils.MetricFamily(
                    name=f"rlhf_policy_model_{name}",
                    description=what,
                    kind=pb_utils.MetricFamily.GAUGE,
                )
                self.state_families[name] = family
                self.state_metrics[name] = family.Metric(labels={"model": args["model_name"]})
            batch = RunningBatch(
                self.model,
                self.pad_id,
                self.eos_ids,
                self._decode,
                share_prefix=params.get("share_prefix", "True") == "True",
            )
            limits = BatchLimits(
                max_rows=int(params.get("max_rows", 32)),
                max_kv_tokens=int(params.get("max_kv_tokens", 1 << 17)),
            )
            self.scheduler = Scheduler(
                batch,
                self,
                limits,
                on_step=lambda produced: self.tokens_metric.increment(float(produced)),
                on_state=self._show_state,
            ).start()

    def _show_state(self, state: SchedulerState) -> None:
        self.state_metrics["running_rows"].set(float(state.running))
        self.state_metrics["waiting_rows"].set(float(state.waiting))
        self.state_metrics["kv_tokens"].set(float(state.kv_tokens))

    # Weights ------------------------------------------------------------------------------

    def _maybe_swap(self) -> None:
        """Copies a newly published version into the parameters (static: between batches)."""
        if self.pending():
            self.swap()

    def pending(self) -> bool:
        """True while a newly published, valid version waits (scheduler.WeightsGate)."""
        if self.pending_marker is not None:
            return True
        try:
            st = os.stat(self.weights_root / "CURRENT")
        except FileNotFoundError:
            return False
        stat = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stat == self.marker_stat:
            return False
        self.marker_stat = stat
        marker = read_marker(self.weights_root)
        if marker is None or marker.weights_version == self.version:
            return False
        try:
            compare_specs(
                self.served_specs,
                files_specs(list(marker.files)),
                f"version {marker.weights_version}",
            )
        except Exception:  # a bad set never replaces the served one
            log.exception("weights version %s not loaded", marker.weights_version)
            return False
        self.pending_marker = marker
        return True

    def swap(self) -> None:
        """Copies the waiting version into the parameters (no row is generating)."""
        marker, self.pending_marker = self.pending_marker, None
        try:
            load_into(self.model, list(marker.files), share=self.device.type == "cpu")
        except Exception:
            log.exception("weights version %s not loaded", marker.weights_version)
            return
        self.version = marker.weights_version

    # Serving ------------------------------------------------------------------------------

    def execute(self, requests: list) -> None:
        if self.scheduler is not None:
            for request in requests:
                row, stream = self._row(request)
                if row.max_new_tokens <= 0:
                    answer = lambda version, r=request: self._send(
                        r, [], [], Finish.NONE, 0, final=True, info=True, version=version
                    )
                    self.scheduler.submit(Control(answer))
                else:
                    group = self._group(request)
                    sink = ResponseSink(self, request, stream)
                    self.scheduler.submit(Sequence(row, sink, *group))
            return
        self._execute_static(requests)

    def _execute_static(self, requests: list) -> None:
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

    def _group(self, request) -> tuple[int, int]:
        """(GROUP_ID, GROUP_SIZE): the call this sequence belongs to and its sequence count."""
        get = lambda name: self.pb.get_input_tensor_by_name(request, name)
        group_id, size = get("GROUP_ID"), get("GROUP_SIZE")
        if group_id is None or size is None:
            return 0, 1
        return int(group_id.as_numpy().reshape(-1)[0]), int(size.as_numpy().reshape(-1)[0])

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
        version: int | None = None,
    ) -> None:
        pb = self.pb
        version = self.version if version is None else version
        top_ids, top_logprobs = top_arrays(*top, len(tokens))
        outputs = [
            pb.Tensor("TOKEN_IDS", np.asarray(tokens, dtype=np.int64).reshape(1, -1)),
            pb.Tensor("LOGPROBS", np.asarray(logprobs, dtype=np.float32).reshape(1, -1)),
            pb.Tensor("FINISH_REASON", np.array([[int(finish)]], dtype=np.int32)),
            pb.Tensor("WEIGHTS_VERSION", np.array([[version]], dtype=np.int64)),
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
        if self.scheduler is not None:
            self.scheduler.stop()
            self.state_metrics = self.state_families = None
        self.tokens_metric = None
        self.tokens_family = None
        self.model = None


class ResponseSink:
    """One request's answers from the continuous scheduler (scheduler.Sink): a response per
    token when streaming, else one with every token; the version is the row's own."""

    def __init__(self, model: PolicyTritonModel, request, stream: bool):
        self.model, self.request, self.stream = model, request, stream

    def cancelled(self) -> bool:
        return self.request.is_cancelled()

    def token(self, row: Row, token: int, logprob: float, finish: Finish) -> None:
        if self.stream:
            top = (row.top_ids[-1:], row.top_logprobs[-1:]) if row.top_ids else ([], [])
            self.model._send(
                self.request,
                [token],
                [logprob],
                finish,
                row.batch_size,
                final=False,
                top=top,
                version=row.weights_version,
            )

    def done(self, row: Row) -> None:
        if self.stream:
            tokens, logprobs, top = [], [], ([], [])
        else:
            tokens, logprobs, top = row.tokens, row.logprobs, (row.top_ids, row.top_logprobs)
        self.model._send(
            self.request,
            tokens,
            logprobs,
            row.finish,
            row.batch_size,
            final=True,
            top=top,
            version=row.weights_version,
        )

    def failed(self, message: str) -> None:
        pb = self.model.pb
        self.request.get_response_sender().send(
            pb.InferenceResponse(error=pb.TritonError(message)),
            flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )


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
def load_into(model, files: list[Path], *, share: bool = False) -> None:
    """Puts every tensor of `files` into the model's parameters (tied ones follow).

    Copying (the default): each tensor's bytes are read once, straight into its parameter when
    that is a contiguous CPU tensor of the file's dtype; others (CUDA, another dtype) copy from a
    view of the mapped file (bench/NOTES.md, "Weight sync": `safe_open().get_tensor` made a whole
    second copy).

    `share` (the Triton model on a CPU): a CPU parameter of the file's dtype becomes a view of a
    private (copy-on-write) mapping of the file instead, so the swap moves no byte: the pages are
    the ones the push just wrote into the page cache. Writes into such a parameter stay private
    to this process (the file is never changed through it), and the mapping lives as long as the
    parameters that view it: when a later swap replaces them, the previous version's file is
    unmapped. The rest are copied, as above. The views replace the parameters' data only after
    every file is mapped, so a failure midway leaves the model as it was.

    Every file's layout is checked before the first byte is used, so a malformed file leaves the
    parameters as they were. The caller must not overwrite a file that parameters view: the
    policy's weights store recycles only folders older than the previous version
    (services/policy/weights.py, `WeightsStore._recyclable`).
    """
    state = model.state_dict()
    layouts = [(Path(path), _checked_layout(Path(path), state)) for path in files]
    if share:
        _share_into(model, state, layouts)
        return
    for path, (base, layout) in layouts:
        with open(path, "rb", buffering=0) as f:
            mapped = None
            try:
                for name, (dtype, shape, start, end) in layout.items():
                    if start == end:
                        continue
                    target, torch_dtype = state[name], TORCH_DTYPES[dtype]
                    if (
                        target.device.type == "cpu"
                        and target.dtype == torch_dtype
                        and target.is_contiguous()
                    ):
                        _read_exactly(f, base + start, target.view(-1).view(torch.uint8).numpy())
                        continue
                    if mapped is None:
                        # ACCESS_COPY: a private, writable mapping that torch views without a
                        # warning; nothing is written through it.
                        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                    view = torch.frombuffer(
                        mapped,
                        dtype=torch_dtype,
                        count=(end - start) // torch_dtype.itemsize,
                        offset=base + start,
                    )
                    target.copy_(view.view(shape))
                    del view
            finally:
                if mapped is not None:
                    mapped.close()


def _share_into(model, state: dict, layouts: list) -> None:
    """`load_into(share=True)`: views of the mapped files become the CPU parameters' data."""
    views, copies = [], []
    for path, (base, layout) in layouts:
        with open(path, "rb", buffering=0) as f:
            # Private and writable, so torch views it without a warning; no explicit close: a
            # view keeps its mapping alive (torch.frombuffer holds a reference, not an export).
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, (dtype, shape, start, end) in layout.items():
            torch_dtype = TORCH_DTYPES[dtype]
            view = (
                torch.frombuffer(
                    mapped,
                    dtype=torch_dtype,
                    count=(end - start) // torch_dtype.itemsize,
                    offset=base + start,
                )
                if end > start
                else torch.empty(0, dtype=torch_dtype)
            )
            view, target = view.view(shape), state[name]
            if target.device.type == "cpu" and target.dtype == torch_dtype:
                views.append((name, view))
            else:
                copies.append((target, view))
    for target, view in copies:
        target.copy_(view)
    for name, view in views:
        _tensor(model, name).data = view


def _tensor(model, name: str) -> torch.Tensor:
    """The parameter or buffer of the state-dict key `name` (a tied key names the shared one)."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _checked_layout(path: Path, state: dict) -> tuple[int, dict]:
    """(data start, layout) of one file, each tensor's extent checked against its dtype, its
    shape, the file's size and the parameter it goes into."""
    with open(path, "rb") as f:
        length = header_length(f.read(8), path.name)
        layout = data_layout(f.read(length), path.name)
    base, size = 8 + length, path.stat().st_size
    for name, (dtype, shape, start, end) in layout.items():
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        if name not in state or tuple(state[name].shape) != shape:
            raise ValueError(f"{path.name}: tensor {name} does not fit the served model")
        nbytes = math.prod(shape) * TORCH_DTYPES[dtype].itemsize
        if not (0 <= start and end - start == nbytes and base + end <= size):
            raise ValueError(f"{path.name}: tensor {name} has data offsets {start}..{end}")
    return base, layout


def _read_exactly(f, offset: int, out: np.ndarray) -> None:
    """Fills `out` (bytes) from `f` at `offset`; a short file is an error."""
    view, done = memoryview(out), 0
    f.seek(offset)
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"{f.name}: ends inside a tensor at byte {offset + done}")
        done += got
