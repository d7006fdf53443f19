"""The curator's join on a real sqlite store: waiting feedback, pairs and labels, duplicates,
bounds, and a store reopened after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.preferences import thumb_desirable
from services.curator.join import JoinCounts, JoinLimits, expire_waiting, on_feedback, on_generation
from services.curator.store import JoinStore
from services.genproto.rlhf.v1 import common_pb2, events_pb2

UP, DOWN = events_pb2.THUMB_UP, events_pb2.THUMB_DOWN
LIMITS = JoinLimits(max_pending_per_partition=3, max_pending_age_s=60.0, max_pairs=16)


def gen(rid: str, prompt: str, response: str) -> events_pb2.GenerationRecord:
    return events_pb2.GenerationRecord(
        response_id=rid,
        prompt=common_pb2.Prompt(text=prompt),
        prompt_text=prompt,
        response_text=response,
    )


def fb(fid: str, rid: str, thumb: int = 0, rating: int = 0) -> events_pb2.FeedbackEvent:
    return events_pb2.FeedbackEvent(feedback_id=fid, response_id=rid, thumb=thumb, rating=rating)


@pytest.fixture()
def store(tmp_path: Path):
    s = JoinStore(tmp_path)
    yield s
    s.close()


def summary(records) -> list[tuple]:
    out = []
    for r in records:
        if r.WhichOneof("kind") == "pair":
            out.append(("pair", r.prompt, r.pair.chosen, r.pair.rejected))
        else:
            out.append(("label", r.prompt, r.label.completion, r.label.desirable))
    return out


def test_up_and_down_answers_of_one_prompt_make_a_pair_plus_labels(store):
    c = JoinCounts()
    on_generation(store, 0, gen("r1", "2+2?", "4"), 0.0, LIMITS, c)
    on_generation(store, 1, gen("r2", "2+2?", "5"), 0.0, LIMITS, c)
    first = on_feedback(store, 0, fb("f1", "r1", UP), 1.0, LIMITS, c)
    assert summary(first) == [("label", "2+2?", "4", True)]
    second = on_feedback(store, 1, fb("f2", "r2", DOWN), 2.0, LIMITS, c)
    assert summary(second) == [("label", "2+2?", "5", False), ("pair", "2+2?", "4", "5")]
    assert list(second[1].derived_from) == ["r1", "r2"]
    assert second[1].source == events_pb2.PREFERENCE_SOURCE_LIVE_FEEDBACK
    # A second thumbs-down on the same answer: a new label, but the pair exists already.
    third = on_feedback(store, 1, fb("f3", "r2", DOWN), 3.0, LIMITS, c)
    assert summary(third) == [("label", "2+2?", "5", False)]
    assert (c.joined, c.waiting, c.duplicates) == (3, 0, 0)


def test_the_down_answer_judged_first_is_still_the_rejected_one(store):
    c = JoinCounts()
    on_generation(store, 0, gen("a", "p", "bad"), 0.0, LIMITS, c)
    on_generation(store, 0, gen("b", "p", "good"), 0.0, LIMITS, c)
    on_feedback(store, 0, fb("f1", "a", DOWN), 1.0, LIMITS, c)
    out = on_feedback(store, 0, fb("f2", "b", rating=5), 2.0, LIMITS, c)
    assert summary(out)[1] == ("pair", "p", "good", "bad")


def test_feedback_before_its_generation_waits_then_joins(store):
    c = JoinCounts()
    assert on_feedback(store, 2, fb("f1", "late", DOWN), 1.0, LIMITS, c) == []
    assert store.pending_count(2) == 1 and c.waiting == 1
    out = on_generation(store, 2, gen("late", "q", "answer"), 5.0, LIMITS, c)
    assert summary(out) == [("label", "q", "answer", False)]
    assert store.pending_count() == 0


def test_duplicate_feedback_id_is_joined_once(store):
    c = JoinCounts()
    on_generation(store, 0, gen("r1", "p", "x"), 0.0, LIMITS, c)
    assert len(on_feedback(store, 0, fb("f1", "r1", UP), 1.0, LIMITS, c)) == 1
    assert on_feedback(store, 0, fb("f1", "r1", UP), 2.0, LIMITS, c) == []
    assert c.duplicates == 1


def test_neutral_rating_joins_but_emits_nothing(store):
    c = JoinCounts()
    on_generation(store, 0, gen("r1", "p", "x"), 0.0, LIMITS, c)
    assert on_feedback(store, 0, fb("f1", "r1", rating=3), 1.0, LIMITS, c) == []
    assert c.joined == 1
    assert [thumb_desirable(0, r) for r in (1, 2, 3, 4, 5)] == [False, False, None, True, True]


def test_waiting_is_bounded_in_count_and_age(store):
    c = JoinCounts()
    for i in range(5):
        on_feedback(store, 0, fb(f"f{i}", f"missing{i}", UP), float(i), LIMITS, c)
    on_feedback(store, 1, fb("other", "missing-x", UP), 0.0, LIMITS, c)
    assert store.pending_count(0) == 3 and c.expired == 2  # the two oldest of partition 0 went
    assert store.pending_count(1) == 1  # another partition's bound is its own
    expire_waiting(store, 62.5, LIMITS, c)  # f2 (t=2) and "other" (t=0) are older than 60 s
    assert store.pending_count() == 2 and c.expired == 4
    # The survivors still join.
    out = on_generation(store, 0, gen("missing4", "p", "x"), 63.0, LIMITS, c)
    assert len(out) == 1


def test_state_survives_reopening_the_store(tmp_path: Path):
    c = JoinCounts()
    store = JoinStore(tmp_path)
    on_generation(store, 0, gen("r1", "p", "yes"), 0.0, LIMITS, c)
    on_feedback(store, 0, fb("f1", "r1", UP), 1.0, LIMITS, c)
    on_feedback(store, 0, fb("f2", "r9", DOWN), 1.0, LIMITS, c)  # waits
    store.set_offset("rlhf.feedback.v1", 0, 42)
    store.commit()
    on_generation(store, 0, gen("r2", "p", "uncommitted"), 2.0, LIMITS, c)
    store.close()  # the last generation was never committed: it is gone, as after a crash

    store = JoinStore(tmp_path)
    assert store.offsets() == {("rlhf.feedback.v1", 0): 42}
    assert store.generation("r2") is None and store.pending_count() == 1
    assert on_feedback(store, 0, fb("f1", "r1", UP), 3.0, LIMITS, c) == []  # still a duplicate
    on_generation(store, 0, gen("r9", "p", "no"), 4.0, LIMITS, c)  # the waiting f2 joins now
    assert store.pending_count() == 0
    store.close()


def test_records_carry_the_conversation_as_asked_not_a_template(store):
    asked = common_pb2.Prompt(
        messages=common_pb2.ChatMessages(
            messages=[
                common_pb2.ChatMessage(role="system", content="Be brief."),
                common_pb2.ChatMessage(role="user", content="2+2?"),
            ]
        )
    )
    c = JoinCounts()
    for rid, answer in (("r1", "4"), ("r2", "5")):
        record = events_pb2.GenerationRecord(
            response_id=rid,
            prompt=asked,
            prompt_text="<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
            response_text=answer,
        )
        on_generation(store, 0, record, 0.0, LIMITS, c)
    on_feedback(store, 0, fb("f1", "r1", UP), 1.0, LIMITS, c)
    records = on_feedback(store, 0, fb("f2", "r2", DOWN), 2.0, LIMITS, c)
    assert [r.WhichOneof("kind") for r in records] == ["label", "pair"]
    for r in records:
        assert r.conversation == asked
        assert r.prompt == "system: Be brief.\nuser: 2+2?"


def test_a_store_written_before_conversations_existed_still_joins(tmp_path: Path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "curator.sqlite")
    db.execute(
        "CREATE TABLE generations (response_id TEXT PRIMARY KEY, partition INTEGER,"
        " prompt TEXT, prompt_key TEXT, response TEXT, seen_at REAL)"
    )
    db.execute("INSERT INTO generations VALUES ('r0', 0, 'hi', 'k', 'hello', 0.0)")
    db.commit()
    db.close()
    s = JoinStore(tmp_path)
    try:
        assert s.generation("r0") == ("hi", "k", "hello", b"")
        records = on_feedback(s, 0, fb("f0", "r0", UP), 1.0, LIMITS, JoinCounts())
        assert records[0].conversation == common_pb2.Prompt(text="hi")
    finally:
        s.close()


def test_labels_carry_their_cohort_and_a_pair_only_a_shared_one(store):
    c = JoinCounts()
    for rid, response in (("a", "4"), ("b", "5"), ("c", "22")):
        on_generation(store, 0, gen(rid, "2+2?", response), 0.0, LIMITS, c)
    up = fb("f1", "a", UP)
    up.cohort = "vendor-a"
    (label,) = on_feedback(store, 0, up, 1.0, LIMITS, c)
    assert label.cohort == "vendor-a"
    same = fb("f2", "b", DOWN)
    same.cohort = "vendor-a"
    label_b, pair_ab = on_feedback(store, 0, same, 2.0, LIMITS, c)
    assert (label_b.cohort, pair_ab.cohort) == ("vendor-a", "vendor-a")
    other = fb("f3", "c", DOWN)
    other.cohort = "de-DE"
    label_c, pair_ac = on_feedback(store, 0, other, 3.0, LIMITS, c)
    assert summary([pair_ac]) == [("pair", "2+2?", "4", "22")]
    assert (label_c.cohort, pair_ac.cohort) == ("de-DE", "")  # two cohorts: none


def test_a_store_written_before_cohorts_existed_pairs_with_no_cohort(tmp_path: Path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "curator.sqlite")
    db.execute(
        "CREATE TABLE judged (prompt_key TEXT, response_id TEXT, desirable INTEGER,"
        " response TEXT, seen_at REAL, PRIMARY KEY (prompt_key, response_id, desirable))"
    )
    db.commit()
    db.close()
    s = JoinStore(tmp_path)
    try:
        c = JoinCounts()
        on_generation(s, 0, gen("a", "p", "good"), 0.0, LIMITS, c)
        on_generation(s, 0, gen("b", "p", "bad"), 0.0, LIMITS, c)
        on_feedback(s, 0, fb("f1", "a", UP), 1.0, LIMITS, c)
        down = fb("f2", "b", DOWN)
        down.cohort = "tier-1"
        _, pair = on_feedback(s, 0, down, 2.0, LIMITS, c)
        assert (pair.pair.chosen, pair.cohort) == ("good", "")
    finally:
        s.close()
