"""Atomic trainer checkpoints: the single source of truth a restarted trainer resumes from.

A checkpoint is a folder `step-00000012/` holding
    model.safetensors      the learner's tensors (policy weights, value head), safetensors;
                           with LoRA only the adapters (the frozen base is the model folder's)
    trainer_state.pt       optimizer, scheduler, RNG (torch.save; read back with weights_only=True)
    consumer-rank-R.json   where each rank resumes reading Kafka, and the ids it must skip
    state.json             step and weights version
    MANIFEST.json          BLAKE3 of every file above (sha256 in older ones); written last
It is written in `.tmp-step-00000012/`, every file fsynced, then renamed into place and the parent
folder fsynced: a crash leaves either the whole checkpoint or only a `.tmp-` folder, which
`latest` never reads. `latest` also re-checks every digest, so a torn or rotten file is never
loaded (the next older checkpoint is used instead). `BackgroundCheckpoints` (loop.py) writes them on
a thread beside the next update.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from services.common.digest import ALGORITHMS, BLAKE3, UnknownDigest, file_digest
from services.common.safetensors_file import write_safetensors
from services.common.versions import VersionedFolders, fsync_dir, write_durable

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
MODEL_FILE = "model.safetensors"
TRAINER_STATE_FILE = "trainer_state.pt"
STATE_FILE = "state.json"
PREFIX = "step-"


@dataclass
class ConsumerPosition:
    """Where one rank resumes reading: per partition, the first offset not yet fully handled,
    and the ids of records at or after it that were already handled (used or dropped)."""

    offsets: dict[int, int] = field(default_factory=dict)
    """Partition -> offset of the next record to read after a restart."""
    skip_ids: list[str] = field(default_factory=list)
    """Rollout ids at or after those offsets already used or dropped: skipped when re-read."""
    recent_ids: list[str] = field(default_factory=list)
    """A bounded window of recently handled ids, for de-duplicating re-sent rollouts."""

    def to_json(self) -> dict:
        return {
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "skip_ids": list(self.skip_ids),
            "recent_ids": list(self.recent_ids),
        }

    @classmethod
    def from_json(cls, data: dict) -> ConsumerPosition:
        return cls(
            offsets={int(p): int(o) for p, o in data.get("offsets", {}).items()},
            skip_ids=[str(i) for i in data.get("skip_ids", [])],
            recent_ids=[str(i) for i in data.get("recent_ids", [])],
        )


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    step: int
    """Updates done."""
    weights_version: int
    """Version of the weights in `tensors`."""
    tensors: dict[str, torch.Tensor]
    """Learner tensors (policy weights and any value head), by name."""
    trainer_state: dict
    """Optimizer, scheduler, RNG and the like: tensors, numbers, strings, lists, dicts only."""
    positions: dict[int, ConsumerPosition]
    """Rank -> that rank's consumer position."""
    path: Path | None = None


def _store(root: Path) -> VersionedFolders:
    return VersionedFolders(root, PREFIX)


def step_dir_name(step: int) -> str:
    return _store(Path(".")).name(step)


def temp_dir(root: Path, step: int) -> Path:
    return _store(root).temp(step)


def begin(root: Path, step: int) -> Path:
    """Creates an empty temp folder for checkpoint `step` (rank 0, before the ranks write)."""
    return _store(root).begin(step)


def write_position(tmp: Path, rank: int, position: ConsumerPosition) -> None:
    """Each rank writes its own consumer position into the temp folder."""
    write_durable(tmp / f"consumer-rank-{rank}.json", json.dumps(position.to_json()).encode())


def finish(root: Path, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Rank 0: writes the model and state, the manifest last, then renames the folder into place."""
    root = Path(root)
    tmp = temp_dir(root, checkpoint.step)
    # Both written straight to their files (no whole-file buffer in memory: 1.7 GB for
    # SmolLM2-135M with AdamW), fsynced.
    write_safetensors(tmp / MODEL_FILE, checkpoint.tensors)
    with open(tmp / TRAINER_STATE_FILE, "wb") as f:
        torch.save(checkpoint.trainer_state, f)
        f.flush()
        os.fsync(f.fileno())
    state = {"step": checkpoint.step, "weights_version": checkpoint.weights_version}
    write_durable(tmp / STATE_FILE, json.dumps(state).encode())
    files = sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)
    # BLAKE3: 1.7 GB of SmolLM2 weights and Adam state hash in 0.3 s against sha256's 1.5 s.
    manifest = {
        "step": checkpoint.step,
        BLAKE3: {name: file_digest(tmp / name, BLAKE3) for name in files},
    }
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)
    final = _store(root).commit(tmp, checkpoint.step)  # a rerun after a crash: same content
    prune(root, keep)
    return final


def write(root: Path, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Single-process form: the whole checkpoint at once."""
    tmp = begin(root, checkpoint.step)
    for rank, position in checkpoint.positions.items():
        write_position(tmp, rank, position)
    return finish(root, checkpoint, keep)


def verify(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint whose files match its manifest, else why not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        return f"no readable manifest ({exc.__class__.__name__})"
    algorithm = next((a for a in (BLAKE3, *ALGORITHMS) if a in manifest), None)
    if algorithm is None:
        return "manifest lists no digests"
    digests = manifest[algorithm]
    for required in (MODEL_FILE, TRAINER_STATE_FILE, STATE_FILE):
        if required not in digests:
            return f"manifest lacks {required}"
    for name, digest in digests.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            if file_digest(path, algorithm) != digest:
                return f"{name} does not match its {algorithm}"
        except UnknownDigest as exc:
            return str(exc)
    return None


def load(folder: Path) -> Checkpoint:
    """Reads a verified checkpoint folder; never unpickles arbitrary objects."""
    folder = Path(folder)
    problem = verify(folder)
    if problem:
        raise ValueError(f"checkpoint {folder} is not usable: {problem}")
    state = json.loads((folder / STATE_FILE).read_text())
    positions = {
        int(p.stem.rsplit("-", 1)[1]): ConsumerPosition.from_json(json.loads(p.read_text()))
        for p in folder.glob("consumer-rank-*.json")
    }
    return Checkpoint(
        step=int(state["step"]),
        weights_version=int(state["weights_version"]),
        tensors=load_file(folder / MODEL_FILE),
        trainer_state=torch.load(
            folder / TRAINER_STATE_FILE, weights_only=True, map_location="cpu"
        ),
        positions=positions,
        path=folder,
    )


def complete_checkpoints(root: Path) -> list[Path]:
    """Renamed (so once complete) checkpoint folders, newest first."""
    return [path for _, path in reversed(_store(root).folders())]


def latest(root: Path, on_skip: Callable[[Path, str], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None. Broken ones are reported and passed over."""
    for folder in complete_checkpoints(root):
        problem = verify(folder)
        if problem is None:
            return load(folder)
        log.warning("skipping checkpoint", extra={"fields": {"path": str(folder), "why": problem}})
        if on_skip:
            on_skip(folder, problem)
    return None


def prune(root: Path, keep: int) -> None:
    """Keeps the `keep` newest checkpoints and removes temp folders a crash left behind."""
    _store(root).prune(keep)


def cloned(state):
    """A copy of `state` (dicts, lists, tuples, tensors, plain values) that later in-place updates
    of its tensors cannot change: what a checkpoint written beside the next update needs."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cloned(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(cloned(v) for v in state)
    return state


class BackgroundWriter:
    """Writes single-process checkpoints on one thread beside the training loop.

    `submit` hands over a checkpoint whose tensors nothing changes any more (`cloned`); it waits
    while the previous one is still being written, so at most one copy is held. `durable()`
    returns, oldest first, the consumer positions of the checkpoints completed since the last
    call: only those offsets may be committed. A failed write is raised by the next `submit`,
    `durable` or `close` on the caller's thread, as a write on the training path would be.
    """

    def __init__(self, root: Path, keep: int, done_step: int = 0):
        self.root, self.keep = Path(root), keep
        self._cond = threading.Condition()
        self._pending: Checkpoint | None = None
        self._busy = self._closed = False
        self._done: list[ConsumerPosition] = []
        self._error: BaseException | None = None
        self.durable_step = done_step
        """The newest step whose checkpoint is complete on disk."""
        self.waited_s = 0.0
        """Seconds `submit` waited for the previous write (the update outran the disk)."""
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, saved: Checkpoint) -> None:
        started = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: (self._pending is None and not self._busy) or self._error)
            self._raise()
            self._pending = saved
            self._cond.notify_all()
        self.waited_s += time.perf_counter() - started

    def durable(self) -> list[ConsumerPosition]:
        with self._cond:
            self._raise()
            done, self._done = self._done, []
        return done

    def wait_durable(self, step: int, timeout_s: float | None = None) -> bool:
        """True once the checkpoint of `step` (or a newer one) is complete; False if a write
        failed or the wait timed out."""
        with self._cond:
            self._cond.wait_for(lambda: self.durable_step >= step or self._error, timeout_s)
            return self.durable_step >= step and self._error is None

    def close(self) -> None:
        """Finishes the checkpoint being written or waiting, then stops the thread."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is None and not self._busy)
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"a checkpoint write failed: {self._error!r}") from self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                saved, self._busy = self._pending, True
            try:
                write(self.root, saved, self.keep)
            except BaseException as exc:  # handed to the caller's thread
                log.exception("checkpoint %s not written", saved.step)
                with self._cond:
                    self._error = exc
                    self._pending, self._busy = None, False
                    self._cond.notify_all()
                return
            with self._cond:
                self.durable_step = max(self.durable_step, saved.step)
                self._done += list(saved.positions.values())
                self._pending, self._busy = None, False
                self._cond.notify_all()
