"""The `judge` model inside Triton: judge conversations in, the log-probabilities of the letters
"A" and "B" as the next token out.

Python backend, dynamic batching. Each conversation (services.judge.rubric.judge_messages,
sent as JSON) is rendered through the instruct model's chat template with the generation
prompt, so the next token is the first token of the assistant's reply: the letter of the better
answer. The verdict is read from those next-token probabilities, never from generated text.
Whatever the batcher groups runs as one right-padded forward pass of the decoder; the output
head runs only on each row's last prompt position (a (B, V) matrix, not (B, T, V)).

Tensors (per request; first dimension is Triton's batch dimension, B conversations):
    MESSAGES       BYTES (B, 1)  JSON [{role, content}, ...]
    LOGPROB_A      FP32  (B, 1)  log P(next token = "A") under the full softmax
    LOGPROB_B      FP32  (B, 1)  log P(next token = "B")
    PROMPT_TOKENS  INT64 (B, 1)  tokens of the rendered prompt

Shapes: `B` conversations, `T` tokens (the longest prompt), `V` vocabulary, `H` hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from services.common.models import load_causal_lm, load_tokenizer, select_dtype
from services.common.triton_repo import TensorIO, instance_device, model_parameters
from services.judge.judges import letter_token_ids

INPUTS = (TensorIO("MESSAGES", "TYPE_STRING", (1,)),)
OUTPUTS = (
    TensorIO("LOGPROB_A", "TYPE_FP32", (1,)),
    TensorIO("LOGPROB_B", "TYPE_FP32", (1,)),
    TensorIO("PROMPT_TOKENS", "TYPE_INT64", (1,)),
)


def encode_conversation(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt tokens: the chat template with the generation prompt, as the policy renders."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def letter_logprobs(
    model, encoded: list[list[int]], letters: tuple[int, int], pad_id: int
) -> np.ndarray:
    """(B, 2) float32: log P("A"), log P("B") at the last position of each prompt."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(ids) for ids in encoded], device=device)  # (B,)
    width = int(lengths.max())
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long, device=device)
    for i, ids in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids, device=device)
    # Right padding: a prompt's own positions and causal attention never see the pad.
    attention = (torch.arange(width, device=device) < lengths[:, None]).long()  # (B, T)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention).last_hidden_state
    last = hidden[torch.arange(len(encoded), device=device), lengths - 1]  # (B, H)
    logits = model.get_output_embeddings()(last).float()  # (B, V)
    return torch.log_softmax(logits, -1)[:, list(letters)].cpu().numpy()  # (B, 2)


class JudgeTritonModel:
    """Triton Python-backend model (TritonPythonModel API) of the letter log-probabilities."""

    def initialize(self, args: dict) -> None:
        params = model_parameters(args)
        path = Path(params["model_dir"])
        device = instance_device(args)
        self.model = load_causal_lm(path, device, select_dtype(device, params["dtype"]))
        self.tokenizer = load_tokenizer(path)
        self.letters = letter_token_ids(self.tokenizer)
        self.max_length = int(params["max_length"])

    def encode(self, raw: bytes | str) -> list[int]:
        """The tokens of one request row; ValueError says what is wrong with it."""
        messages = json.loads(raw)
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("MESSAGES must be a JSON list of {role, content}")
        ids = encode_conversation(self.tokenizer, messages)
        if len(ids) > self.max_length:
            raise ValueError(
                f"the judge prompt has {len(ids)} tokens, more than max_length={self.max_length}"
            )
        return ids

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses: list = [None] * len(requests)
        rows: list[tuple[int, list[list[int]]]] = []
        for i, request in enumerate(requests):
            raw = pb_utils.get_input_tensor_by_name(request, "MESSAGES").as_numpy()[:, 0]
            try:
                rows.append((i, [self.encode(r) for r in raw]))
            except ValueError as err:  # json.JSONDecodeError included
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(err), pb_utils.TritonError.INVALID_ARG)
                )
        if rows:
            encoded = [ids for _, batch in rows for ids in batch]
            logprobs = letter_logprobs(
                self.model, encoded, self.letters, self.tokenizer.pad_token_id
            )
            start = 0
            for i, batch in rows:
                part = logprobs[start : start + len(batch)]  # (n, 2)
                tokens = np.array([[len(ids)] for ids in batch], dtype=np.int64)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("LOGPROB_A", part[:, :1].astype(np.float32)),
                        pb_utils.Tensor("LOGPROB_B", part[:, 1:].astype(np.float32)),
                        pb_utils.Tensor("PROMPT_TOKENS", tokens),
                    ]
                )
                start += len(batch)
        return responses

    def finalize(self) -> None:
        self.model = None
