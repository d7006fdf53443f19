"""Iteration-level scheduling (continuous batching) of the policy's sequences, as vLLM does it:
a sequence joins the running batch at the next decoding step and leaves it the step it finishes.
Independent of Triton: the Triton model (services.policy.triton_model) hands each request in as
a `Sequence` with a `Sink` that answers it, and tests drive it in process.

The loop (one thread; every torch call of the model runs on it):
1. take what arrived: sequences go to the waiting queue (FIFO), control requests aside;
2. weights: when a new, valid version waits (`WeightsGate.pending`), admission stops; once the
   running rows have finished, the swap is done (`WeightsGate.swap`), so it lands on a step
   boundary. Control requests are answered when no swap waits, so the gRPC UpdateWeights that
   sent one returns after the swap;
3. drop cancelled waiting sequences, then admit waiting ones while the batch has fewer than
   `max_rows` rows and their reserved KV tokens (prompt + max_new_tokens) fit `max_kv_tokens`
   (one sequence is always admitted into an empty batch, so none waits forever). The
   sequences of one call (a group) join at the same step once all have arrived: one prefill
   for the n samples of a prompt, and the same rows together for the same call, streamed or
   not, so the same numbers to the last bit;
4. one decoding step (services.policy.batching): joiners are prefilled (a shared prompt once),
   every row gets a token, finished rows leave and are answered at once.

Samples never span two weights versions: this is the "finish on the old weights" policy. A
new version is applied only when no row is running (step 2), so every token of a sample comes
from the version recorded in `Row.weights_version`, which the response names, and the
behaviour log-probs the trainer's importance ratio uses are those of that one version. The cost
is that a swap waits for the longest running sample (new sequences queue meanwhile; none
fails), as it did when a static batch had to end first.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.policy.batching import RunningBatch
from services.policy.generation import Finish, Row

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2
"""How often an idle scheduler looks for new weights and a stop request."""
GROUP_WAIT_S = 0.05
"""How long the first sequences of a call wait for the rest of it (they are sent back to back,
so milliseconds) before they are admitted anyway."""


class Sink(Protocol):
    """Where one sequence's results go (a Triton response sender, a test's list)."""

    def cancelled(self) -> bool:
        """Asked before every step: the caller went away."""

    def token(self, row: Row, token: int, logprob: float, finish: Finish) -> None:
        """Each token as it is made (`row.top_ids[-1]` holds its alternatives)."""

    def done(self, row: Row) -> None:
        """The row finished (`row.finish` says why); the last call for this sink."""

    def failed(self, message: str) -> None:
        """Generation failed; the last call for this sink."""


class WeightsGate(Protocol):
    """The served weights, as the scheduler sees them."""

    version: int

    def pending(self) -> bool:
        """True while a new, valid version waits to be applied."""

    def swap(self) -> None:
        """Applies the waiting version (called with no row running)."""


@dataclass
class Sequence:
    row: Row
    sink: Sink
    group_id: int = 0
    """The call the sequence belongs to (0: none); its sequences are admitted together."""
    group_size: int = 1
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Control:
    """A request for the served version: `answer(version)` once no swap waits."""

    answer: Callable[[int], None]


@dataclass(frozen=True)
class BatchLimits:
    max_rows: int = 32
    """Most rows decoded together."""
    max_kv_tokens: int = 1 << 17
    """Most KV-cache tokens the running rows may reserve (prompt + max_new_tokens each)."""


@dataclass
class SchedulerState:
    """What the gauges show, after every step."""

    running: int = 0
    waiting: int = 0
    kv_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        batch: RunningBatch,
        weights: WeightsGate,
        limits: BatchLimits = BatchLimits(),
        on_step: Callable[[int], None] = lambda produced: None,
        on_state: Callable[[SchedulerState], None] = lambda state: None,
    ):
        self.batch = batch
        self.weights = weights
        self.limits = limits
        self.on_step = on_step
        self.on_state = on_state
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[Sequence] = deque()
        self._controls: list[Control] = []
        self._released: set[int] = set()  # groups whose sequences have all arrived
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the loop; what is still running or waiting gets an error, so no caller hangs."""
        self._stop.set()
        self._thread.join(timeout=30)
        self._take(0)
        for sink in [*self.batch.handles, *(s.sink for s in self._waiting)]:
            sink.failed("the policy model is unloading")
        self.batch.clear()
        self._waiting.clear()

    def submit(self, item: Sequence | Control) -> None:
        """Thread-safe; the item is looked at before the next step."""
        self._inbox.put(item)

    # The loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            # Idle: sleep until something arrives; sequences of a call still arriving: a moment.
            idle_s = GROUP_WAIT_S / 5 if self._waiting else IDLE_POLL_S
            self._take(0 if self.batch else idle_s)
            joining: list[Sequence] = []
            try:
                self.iteration(joining)
            except Exception as exc:  # every row of the step gets the error, none hangs
                log.exception("generation step failed")
                for sink in [*self.batch.handles, *(s.sink for s in joining)]:
                    sink.failed(f"generation failed: {exc}")
                self.batch.clear()

    def _take(self, wait_s: float) -> None:
        """Moves what arrived to the waiting queue (waiting up to `wait_s` for the first)."""
        try:
            items = [self._inbox.get(timeout=wait_s) if wait_s > 0 else self._inbox.get_nowait()]
        except queue.Empty:
            return
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for item in items:
            if isinstance(item, Control):
                self._controls.append(item)
            else:
                self._waiting.append(item)

    def _ready(self) -> list[Sequence]:
        """Waiting sequences that may join, in arrival order: all but those of a call whose
        other sequences have not all arrived yet (for at most GROUP_WAIT_S)."""
        arrived = Counter(s.group_id for s in self._waiting if s.group_id)
        now = time.monotonic()
        ready = []
        for seq in self._waiting:
            if seq.group_id and seq.group_id not in self._released:
                if arrived[seq.group_id] < seq.group_size and now - seq.arrived < GROUP_WAIT_S:
                    continue
                self._released.add(seq.group_id)
            ready.append(seq)
        return ready

    def iteration(self, joining: list[Sequence]) -> None:
        """Steps 2 to 4 of the module docstring; `joining` is filled with the admitted ones."""
        # 2. weights at a step boundary, with no row running
        swap_waits = self.weights.pending()
        if swap_waits and not self.batch:
            self.weights.swap()
            swap_waits = False
        if not swap_waits:
            for control in self._controls:
                control.answer(self.weights.version)
            self._controls.clear()
        # 3. admission
        for seq in [s for s in self._waiting if s.sink.cancelled()]:
            self._waiting.remove(seq)
            seq.row.finish = Finish.CANCELLED
            seq.row.weights_version = self.weights.version
            seq.sink.done(seq.row)
        reserved = self.batch.reserved_tokens
        for seq in [] if swap_waits else self._ready():
            need = len(seq.row.prompt_ids) + seq.row.max_new_tokens
            rows = len(self.batch) + len(joining)
            fits = rows < self.limits.max_rows and reserved + need <= self.limits.max_kv_tokens
            if not fits and rows > 0:
                break
            self._waiting.remove(seq)
            joining.append(seq)
            reserved += need
        self._released &= {s.group_id for s in self._waiting}
        for seq in joining:
            seq.row.weights_version = self.weights.version
        # 4. prefill the joiners, one decoding step for everyone
        self.batch.join([s.row for s in joining], [s.sink for s in joining])
        joining.clear()
        if self.batch:
            produced = len(self.batch)
            finished = self.batch.step(
                lambda sink: sink.cancelled(),
                lambda sink, row, token, logprob, finish: sink.token(row, token, logprob, finish),
            )
            self.on_step(produced - sum(r.finish == Finish.CANCELLED for _, r in finished))
            for sink, row in finished:
                sink.done(row)
        self.on_state(
            SchedulerState(len(self.batch), len(self._waiting), self.batch.reserved_tokens)
        )
