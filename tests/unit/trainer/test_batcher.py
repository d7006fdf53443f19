"""Batches of whole groups; duplicates and stale rollouts dropped and counted; the checkpoint
position makes a restart re-read exactly the unused records."""

from __future__ import annotations

from services.genproto.rlhf.v1 import events_pb2
from services.trainer.consumer import Received, RolloutBatcher, partitions_of_rank


def _r(rid: str, group: str, size: int = 2, version: int = 1) -> events_pb2.Rollout:
    return events_pb2.Rollout(
        rollout_id=rid, group_id=group, group_size=size, weights_version=version
    )


def _feed(batcher, items):
    return [batcher.add(Received(p, o, r)) for p, o, r in items]


def ids(items):
    return [i.rollout.rollout_id for i in items]


def test_groups_are_buffered_until_whole():
    b = RolloutBatcher(batch_size=4, max_staleness=2)
    _feed(b, [(0, 0, _r("a1", "A")), (0, 1, _r("b1", "B")), (0, 2, _r("a2", "A"))])
    assert b.peek() is None  # A is whole but 2 < 4 rollouts
    _feed(b, [(1, 0, _r("c1", "C")), (1, 1, _r("c2", "C"))])
    groups = b.peek()
    assert [g.group_id for g in groups] == ["A", "C"]  # B is still missing a member
    assert ids(b.take(groups)) == ["a1", "a2", "c1", "c2"]
    assert b.counts["consumed"] == 4
    assert list(b.groups) == ["B"]


def test_duplicates_are_dropped_and_counted():
    b = RolloutBatcher(batch_size=2, max_staleness=2)
    out = _feed(b, [(0, 0, _r("a1", "A")), (0, 1, _r("a1", "A")), (0, 2, _r("a2", "A"))])
    assert out == ["pending", "duplicate", "pending"]
    b.take(b.peek())
    assert _feed(b, [(0, 3, _r("a2", "A"))]) == ["duplicate"]  # already used
    assert b.counts["duplicate"] == 2 and b.counts["consumed"] == 2


def test_stale_rollouts_are_dropped_and_counted():
    b = RolloutBatcher(batch_size=2, max_staleness=1)
    _feed(b, [(0, 0, _r("old1", "O", version=3)), (0, 1, _r("new1", "N", version=4)),
              (0, 2, _r("new2", "N", version=4)), (0, 3, _r("old2", "O", version=3))])  # fmt: skip
    assert b.drop_stale(trainer_version=4) == []  # staleness 1 is allowed
    dropped = b.drop_stale(trainer_version=5)  # staleness 2 > 1
    assert sorted(ids(dropped)) == ["old1", "old2"]
    assert b.counts["stale"] == 2
    assert ids(b.take(b.peek())) == ["new1", "new2"]


def test_an_incomplete_group_holds_the_resume_offset_only_until_it_is_stale():
    """A group whose other members never arrive (a worker died mid-publish) keeps its partition's
    resume offset at its first member, until the trainer is max_staleness versions past it."""
    b = RolloutBatcher(batch_size=2, max_staleness=2)
    _feed(
        b,
        [
            (0, 0, _r("lone1", "L", version=1)),
            (0, 1, _r("w1", "W", version=3)),
            (0, 2, _r("w2", "W", version=3)),
        ],
    )
    b.take(b.peek())
    assert b.position().offsets == {0: 0}
    assert b.drop_stale(trainer_version=3) == []  # staleness 2: it might still be completed
    assert ids(b.drop_stale(trainer_version=4)) == ["lone1"]
    assert b.position().offsets == {0: 3} and b.counts["stale"] == 1


def test_position_resumes_at_first_unused_and_skips_used_after_it():
    b = RolloutBatcher(batch_size=2, max_staleness=9)
    _feed(
        b,
        [
            (0, 10, _r("x1", "X")),
            (0, 11, _r("y1", "Y")),
            (0, 12, _r("y2", "Y")),
            (1, 5, _r("z1", "Z", size=1)),
        ],
    )
    b.take([b.groups["Y"]])
    pos = b.position()
    assert pos.offsets == {0: 10, 1: 5}  # x1 (offset 10) and z1 pending
    assert pos.skip_ids == ["y1", "y2"]
    # A restart from this position re-reads offsets 10.. and 5..: only unused rollouts come back.
    again = RolloutBatcher(batch_size=2, max_staleness=9)
    again.restore(pos)
    out = _feed(again, [(0, 10, _r("x1", "X")), (0, 11, _r("y1", "Y")), (0, 12, _r("y2", "Y")),
                        (0, 13, _r("x2", "X")), (1, 5, _r("z1", "Z", size=1))])  # fmt: skip
    assert out == ["pending", "duplicate", "duplicate", "pending", "pending"]
    assert ids(again.take(again.peek())) == ["x1", "x2"]
    # Handled records below the new resume offset are forgotten.
    assert again.position().offsets == {0: 14, 1: 5}
    assert again.position().skip_ids == []


def test_invalid_records_advance_the_position():
    b = RolloutBatcher(batch_size=1, max_staleness=0)
    b.add_invalid(2, 7)
    assert b.position().offsets == {2: 8} and b.counts["invalid"] == 1


def test_partitions_are_shared_by_rank():
    assert partitions_of_rank([0, 1, 2, 3], 0, 2) == [0, 2]
    assert partitions_of_rank([3, 1, 2, 0], 1, 2) == [1, 3]
    assert partitions_of_rank([0, 1, 2, 3], 0, 1) == [0, 1, 2, 3]
