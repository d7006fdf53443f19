"""Data loading in TRL's column conventions, its errors, the held-out split, and token encoding."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from services.common.models import minilm_dir, smollm2_tokenizer_dir
from services.common.training.data import (
    DataError,
    DataKind,
    Demonstration,
    LabelledCompletion,
    PreferencePair,
    load_records,
    split_by_prompt,
)
from services.common.training.encoding import (
    collate_completions,
    encode_completion,
    encode_for_reward,
    reward_batch,
)
from tests.unit.common.training.synthetic import write_jsonl, write_parquet


@pytest.fixture(scope="module")
def lm_tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())


def test_a_ranking_of_four_becomes_six_ordered_pairs(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c", "d"]}])
    pairs = load_records(path, DataKind.PREFERENCE)
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("a", "b"),
        ("a", "c"),
        ("a", "d"),
        ("b", "c"),
        ("b", "d"),
        ("c", "d"),
    ]


def test_parquet_and_jsonl_give_the_same_records(tmp_path):
    rows = [
        {"prompt": "p1", "completion": "yes", "label": True, "id": 7},
        {"prompt": "p2", "completion": "no", "label": False, "id": 8},
    ]
    from_jsonl = load_records(write_jsonl(tmp_path / "k.jsonl", rows), DataKind.LABELLED)
    from_parquet = load_records(write_parquet(tmp_path / "k.parquet", rows), DataKind.LABELLED)
    assert (
        from_jsonl
        == from_parquet
        == [LabelledCompletion("p1", "yes", True), LabelledCompletion("p2", "no", False)]
    )


def test_chat_messages_become_prompt_and_final_assistant_turn(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": messages}, {"prompt": "p", "completion": "c"}]
    )
    assert load_records(path, DataKind.DEMONSTRATION) == [
        Demonstration(prompt=messages[:1], completion=messages[1:]),
        Demonstration(prompt="p", completion="c"),
    ]


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        (DataKind.PREFERENCE, {"prompt": "p", "chosen": "a"}, "line 2: missing column 'rejected'"),
        (
            DataKind.PREFERENCE,
            {"prompt": "p", "chosen": 3, "rejected": "b"},
            "line 2: column 'chosen' must be a non-empty string",
        ),
        (
            DataKind.PREFERENCE,
            {"prompt": "p", "chosen": "a", "rejected": "a"},
            "line 2: columns 'chosen' and 'rejected' are the same",
        ),
        (
            DataKind.PREFERENCE,
            {"prompt": "p", "responses": ["only"]},
            "line 2: column 'responses' must be a list of K >= 2",
        ),
        (
            DataKind.PREFERENCE,
            {"prompt": "p", "responses": ["a", ""]},
            "line 2: column 'responses[1]' is an empty string",
        ),
        (
            DataKind.LABELLED,
            {"prompt": "p", "completion": "c", "label": "yes"},
            "line 2: column 'label' must be a boolean",
        ),
        (
            DataKind.DEMONSTRATION,
            {"prompt": " ", "completion": "c"},
            "line 2: column 'prompt' is an empty string",
        ),
        (
            DataKind.DEMONSTRATION,
            {"messages": [{"role": "assistant", "content": "x"}]},
            "line 2: column 'messages' needs at least",
        ),
        (
            DataKind.DEMONSTRATION,
            {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
            "line 2: column 'messages' must end with an assistant message",
        ),
    ],
)
def test_bad_rows_are_named_by_file_line_and_column(tmp_path, kind, row, message):
    good = {
        DataKind.PREFERENCE: {"prompt": "p", "chosen": "a", "rejected": "b"},
        DataKind.LABELLED: {"prompt": "p", "completion": "c", "label": True},
        DataKind.DEMONSTRATION: {"prompt": "p", "completion": "c"},
    }[kind]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=str(path)) as caught:
        load_records(path, kind)
    assert message in str(caught.value)


def test_bad_files_are_named(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken.jsonl line 2: not valid JSON"):
        load_records(broken, DataKind.PREFERENCE)
    with pytest.raises(DataError, match="no such data file"):
        load_records(tmp_path / "absent.jsonl", DataKind.PREFERENCE)
    (tmp_path / "d.csv").write_text("prompt,chosen\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_records(tmp_path / "d.csv", DataKind.PREFERENCE)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        load_records(tmp_path / "empty.jsonl", DataKind.PREFERENCE)


def test_reward_data_refuses_chat_lists(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"prompt": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": "b"}],
    )
    with pytest.raises(DataError, match="column 'prompt' must be a non-empty string, got list"):
        load_records(path, DataKind.PREFERENCE, chat_allowed=False)


def test_held_out_split_keeps_each_prompt_on_one_side():
    pairs = [PreferencePair(f"prompt {i % 40}", f"a{i}", f"b{i}") for i in range(400)]
    train, held_out = split_by_prompt(pairs, 0.25)
    assert len(train) + len(held_out) == 400 and 40 <= len(held_out) <= 200
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    assert split_by_prompt(pairs[:200], 0.25)[1] == [
        p for p in held_out if p in pairs[:200]
    ]  # stable under appends


def test_plain_completion_mask_covers_completion_and_eos(lm_tokenizer):
    encoded = encode_completion(lm_tokenizer, "Q: colour?\nA:", " blue", max_length=64)
    prompt_ids = lm_tokenizer("Q: colour?\nA:")["input_ids"]
    assert encoded.input_ids == prompt_ids + lm_tokenizer(" blue", add_special_tokens=False)[
        "input_ids"
    ] + [lm_tokenizer.eos_token_id]
    assert encoded.completion_start == len(prompt_ids)
    longer = encode_completion(lm_tokenizer, "Q: what colour is the lamp?\nA:", " red and blue", 64)
    batch = collate_completions([encoded, longer], lm_tokenizer.pad_token_id)
    assert batch.completion_mask[0].tolist() == [0] * len(prompt_ids) + [1] * (
        len(encoded.input_ids) - len(prompt_ids)
    ) + [0] * (batch.input_ids.shape[1] - len(encoded.input_ids))
    assert batch.attention_mask.sum(dim=1).tolist() == [
        len(encoded.input_ids),
        len(longer.input_ids),
    ]
    assert batch.input_ids.shape[1] == len(longer.input_ids) > len(encoded.input_ids)


def test_chat_completion_mask_covers_the_assistant_turn_only(lm_tokenizer):
    prompt = [{"role": "user", "content": "Hi"}]
    encoded = encode_completion(
        lm_tokenizer, prompt, [{"role": "assistant", "content": "Hello!"}], max_length=256
    )
    completion_text = lm_tokenizer.decode(encoded.input_ids[encoded.completion_start :])
    assert completion_text == "Hello!<|im_end|>\n"
    assert lm_tokenizer.decode(encoded.input_ids[: encoded.completion_start]).endswith(
        "<|im_start|>assistant\n"
    )


def test_truncation_drops_prompt_tokens_from_the_left_first(lm_tokenizer):
    encoded = encode_completion(
        lm_tokenizer, "one two three four five six seven", " end", max_length=4
    )
    assert (
        len(encoded.input_ids) == 4 and encoded.completion_start == 2
    )  # " end" and EOS kept whole
    assert lm_tokenizer.decode(encoded.input_ids) == " six seven end" + lm_tokenizer.eos_token
    kept = encode_completion(lm_tokenizer, "prompt", " a b c d e f", max_length=4)
    assert kept.completion_start == 1 and lm_tokenizer.decode(kept.input_ids) == "prompt a b c"


def test_encode_for_reward_is_the_tokenizers_text_pair():
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    encoded = encode_for_reward(tokenizer, "what is it?", "a lamp", max_length=32)
    assert tokenizer.decode(encoded["input_ids"]) == "[CLS] what is it? [SEP] a lamp [SEP]"
    assert encoded["token_type_ids"] == [0] * 6 + [1] * 3
    assert (
        len(encode_for_reward(tokenizer, "word " * 100, "a lamp", max_length=16)["input_ids"]) == 16
    )
    batch = reward_batch(
        tokenizer, ["what is it?", "q"], ["a lamp", "a much longer answer here"], max_length=32
    )
    assert (
        batch["input_ids"][0, :9].tolist() == encoded["input_ids"]
        and batch["attention_mask"][0].sum() == 9
    )
