"""The two forms of a policy under evaluation, and the KL between two model folders.

- `FolderPolicy`: a Hugging Face model folder run in this process through transformers'
  `generate`, with `torch.manual_seed(seed + batch_index)` before each batch, so the same folder
  gives the same answers whichever side of the comparison it is on.
- `ServicePolicy`: a running rlhf.v1.PolicyService (`grpc://host:port`), one Generate request per
  batch. The API takes one seed per request and gives prompt i of the request `seed + i`, so a
  batch goes with `seed + index of its first prompt`: prompt k gets seed `seed + k` whatever the
  batch size. It samples with one generator per row, the folder form with one global generator,
  so a folder and a service holding the same weights do not give the same answers.

Both render a conversation through the model's chat template (add_generation_prompt) and decode
answers without special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from services.common.models import select_device, select_dtype

GRPC_SCHEME = "grpc://"
GRPC_TIMEOUT_S = 600.0
"""Deadline of one Generate request (one batch) to a PolicyService."""

Conversation = list[dict[str, str]]
"""Chat turns, each {"role": ..., "content": ...}."""


class PolicyError(ValueError):
    """A policy cannot serve this evaluation (no chat template, no service at the address, a
    request refused as invalid); the message says which and why."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    """0: greedy."""
    top_p: float
    seed: int


@dataclass(frozen=True)
class Answer:
    text: str
    """Decoded without special tokens."""
    token_ids: list[int]
    """The response tokens as generated, through the end-of-sequence token when there is one."""


class Policy(Protocol):
    spec: str

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: Sampling,
        batch_index: int,
        first_index: int,
    ) -> list[Answer]: ...

    def describe(self) -> dict[str, Any]: ...


def generate_all(
    policy: Policy, conversations: Sequence[Conversation], sampling: Sampling, batch_size: int
) -> list[Answer]:
    answers = []
    for batch_index, start in enumerate(range(0, len(conversations), batch_size)):
        batch = conversations[start : start + batch_size]
        answers += policy.generate(batch, sampling, batch_index, start)
    return answers


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, (B, T) each, with every sequence flush right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


class FolderPolicy:
    """A model folder: its tokenizer loads at once (to check the prompts), its weights, in
    `dtype` on `device`, on first use."""

    def __init__(self, spec: str, device: str = "auto", dtype: str = "auto"):
        from transformers import AutoTokenizer

        self.spec, self.folder = spec, Path(spec)
        self.device = select_device(device)
        self.dtype = select_dtype(self.device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._model = None
        self.eos_ids: set[int] = set()

    def check(self, conversations: Sequence[Conversation]) -> None:
        """PolicyError naming the first conversation (1-based) the chat template refuses."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise PolicyError(f"{self.folder}'s tokenizer has no chat template")
        from jinja2 import TemplateError  # what a template's raise_exception() raises

        for index, conversation in enumerate(conversations):
            try:
                self.prompt_ids(conversation)
            except (TemplateError, ValueError, TypeError, KeyError) as err:
                raise PolicyError(f"prompt {index + 1}: the chat template refuses it: {err}")

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        # Rendered to text, then tokenized without special tokens, as the PolicyService does.
        text = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                str(self.folder), dtype=self.dtype, local_files_only=True, use_safetensors=True
            )
            self._model = model.to(self.device).eval()
            eos = model.generation_config.eos_token_id
            eos = eos if isinstance(eos, list) else [eos]
            self.eos_ids = {int(e) for e in [*eos, self.tokenizer.eos_token_id] if e is not None}
        return self._model

    @torch.inference_mode()
    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: Sampling,
        batch_index: int,
        first_index: int,
    ) -> list[Answer]:
        model = self.model
        prompts = [self.prompt_ids(c) for c in conversations]
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)  # (B, P)
        # top_k=0: no top-k filter from the folder's generation_config, as in the service.
        how = (
            {
                "do_sample": True,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": 0,
            }
            if sampling.temperature > 0
            else {"do_sample": False}
        )
        torch.manual_seed(sampling.seed + batch_index)
        out = model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            **how,
        )  # (B, P + A)
        answers = []
        for tokens in out[:, ids.shape[1] :].tolist():
            end = next((i + 1 for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
            tokens = tokens[:end]  # what follows the end of sequence is padding
            answers.append(Answer(self.tokenizer.decode(tokens, skip_special_tokens=True), tokens))
        return answers

    def describe(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "dtype": str(self.dtype).removeprefix("torch.")}


class ServicePolicy:
    """A running rlhf.v1.PolicyService; connecting asks it for its model and weights version."""

    def __init__(self, spec: str):
        import grpc

        from services.common.channels import client_channel
        from services.genproto.rlhf.v1 import policy_pb2, policy_pb2_grpc

        self.spec, self.address = spec, spec.removeprefix(GRPC_SCHEME)
        self.channel = client_channel(self.address)
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        try:
            self.info = self.stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), timeout=30)
        except grpc.RpcError as err:
            self.channel.close()
            raise PolicyError(
                f"no PolicyService at {spec}: {err.code().name} {err.details()}"
            ) from err

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: Sampling,
        batch_index: int,
        first_index: int,
    ) -> list[Answer]:
        import grpc

        from services.genproto.rlhf.v1 import common_pb2, policy_pb2

        request = policy_pb2.GenerateRequest(
            prompts=[
                common_pb2.Prompt(
                    messages=common_pb2.ChatMessages(
                        messages=[common_pb2.ChatMessage(**turn) for turn in conversation]
                    )
                )
                for conversation in conversations
            ],
            sampling=policy_pb2.SamplingParams(
                n=1,
                max_new_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed + first_index,  # prompt i of the request gets seed + i
                has_seed=True,
            ),
        )
        try:
            response = self.stub.Generate(request, timeout=GRPC_TIMEOUT_S)
        except grpc.RpcError as err:
            where = f"{self.spec} on prompts {first_index + 1}-{first_index + len(conversations)}"
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise PolicyError(f"{where}: {err.details()}") from err
            raise RuntimeError(f"{where}: {err.code().name} {err.details()}") from err
        samples = {c.prompt_index: c.samples[0] for c in response.completions}
        return [
            Answer(samples[i].text, list(samples[i].token_ids)) for i in range(len(conversations))
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "address": self.spec,
            "model": self.info.model,
            "weights_version": self.info.weights_version,
        }


# ---------------------------------------------------------------------------------------------
# KL between two folders. Shapes: B sequences, T tokens (prompt and response, left-padded),
# A the longest response, V the vocabulary.


def sequence_kl(
    candidate_logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """KL(candidate || reference) of the full next-token distributions at temperature 1,
    summed over the positions where `mask` is true: (B, A, V), (B, A, V), (B, A) -> (B,) nats."""
    logp = torch.log_softmax(candidate_logits.float(), dim=-1)
    logq = torch.log_softmax(reference_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, A)
    return torch.where(mask, kl, 0.0).sum(-1)  # where, not *: padding may hold NaN


def response_logits(model, sequences: list[list[int]], longest: int, pad_id: int):
    """Logits (B, A = longest, V) predicting the last `longest` columns of the left-padded
    sequences: row t predicts column T - A + t."""
    device = next(model.parameters()).device
    ids, mask = left_pad(sequences, pad_id)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T), numbered as generate numbers them
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        logits_to_keep=longest + 1,
    )
    return out.logits[:, :-1]  # (B, A, V)


@torch.inference_mode()
def kl_to_reference(
    candidate: FolderPolicy,
    reference: FolderPolicy,
    conversations: Sequence[Conversation],
    answers: Sequence[Answer],
    batch_size: int,
) -> list[float]:
    """KL(candidate || reference) of each of the candidate's own answers, in nats."""
    kls = []
    for start in range(0, len(conversations), batch_size):
        batch = range(start, min(start + batch_size, len(conversations)))
        sequences = [candidate.prompt_ids(conversations[i]) + answers[i].token_ids for i in batch]
        lengths = torch.tensor([len(answers[i].token_ids) for i in batch])  # (B,)
        longest, pad_id = int(lengths.max()), candidate.tokenizer.pad_token_id
        logits_p = response_logits(candidate.model, sequences, longest, pad_id)  # (B, A, V)
        logits_q = (
            logits_p
            if reference is candidate
            else response_logits(reference.model, sequences, longest, pad_id)
        )
        if logits_q.shape != logits_p.shape:
            raise PolicyError(
                f"{reference.spec} has {logits_q.shape[-1]} logits, the candidate "
                f"{logits_p.shape[-1]}: the KL needs one vocabulary"
            )
        # A response fills the last `length` of the A columns.
        mask = torch.arange(longest)[None, :] >= (longest - lengths)[:, None]  # (B, A)
        kls += sequence_kl(logits_p, logits_q, mask.to(logits_p.device)).tolist()
    return kls
