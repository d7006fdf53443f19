"""The side channel's one-time tokens, and BLAKE3-checked pushes through it into a weights store
(the swap is a plain function here; tests/integration/policy/test_weights.py swaps on Triton)."""

from __future__ import annotations

import socket
import threading
import time

import blake3
import pytest
import torch
from safetensors.torch import save_file

from services.common.digest import BLAKE3, file_digest
from services.common.side_channel import (
    MAGIC,
    TOKEN_BYTES,
    SideChannelError,
    SideChannelListener,
    send_files,
)
from services.genproto.rlhf.v1 import policy_pb2
from services.policy.updates import WeightsUpdater
from services.policy.weights import IncomingFile, WeightsRejected, WeightsStore, files_specs
from services.trainer.weights_push import build_manifest


@pytest.fixture
def listener():
    listener = SideChannelListener("127.0.0.1", 0, ticket_ttl_s=5.0, handshake_timeout_s=2.0)
    yield listener
    listener.close()


def connect(listener: SideChannelListener, header: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    sock.sendall(header)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the listener has closed this connection (recv sees EOF or a reset)."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def wait_dropped(listener: SideChannelListener, count: int) -> None:
    deadline = time.monotonic() + 5
    while listener.dropped < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listener.dropped == count


def test_the_token_opens_one_connection_only(listener):
    ticket = listener.issue()
    first = connect(listener, MAGIC + ticket.token)
    conn = ticket.wait(5)
    first.sendall(b"weights")
    assert conn.recv(7) == b"weights"
    second = connect(listener, MAGIC + ticket.token)  # the same token again
    assert closed_by_peer(second)
    wait_dropped(listener, 1)
    assert listener.live_tickets() == 0
    for s in (first, second, conn):
        s.close()


def test_a_wrong_or_missing_token_is_dropped(listener):
    ticket = listener.issue()
    wrong = connect(listener, MAGIC + bytes(TOKEN_BYTES))
    no_magic = connect(listener, b"GET / HTTP/1.1\r\n" + ticket.token)  # right token, wrong framing
    silent = connect(listener, b"")  # says nothing: dropped at the handshake timeout
    for sock in (wrong, no_magic, silent):
        assert closed_by_peer(sock)
        sock.close()
    wait_dropped(listener, 3)
    # A refused connection claims no ticket, even one that carried the token in a wrong frame:
    # the real sender still gets in.
    sender = connect(listener, MAGIC + ticket.token)
    conn = ticket.wait(5)
    sender.sendall(b"ok")
    assert conn.recv(2) == b"ok"
    sender.close()
    conn.close()


def test_an_expired_token_opens_nothing():
    listener = SideChannelListener("127.0.0.1", 0, ticket_ttl_s=0.2, handshake_timeout_s=2.0)
    try:
        ticket = listener.issue()
        assert listener.live_tickets() == 1
        time.sleep(0.3)
        late = connect(listener, MAGIC + ticket.token)
        assert closed_by_peer(late)
        late.close()
        wait_dropped(listener, 1)
        with pytest.raises(SideChannelError, match="no side-channel connection"):
            ticket.wait(0.5)
        assert listener.live_tickets() == 0
    finally:
        listener.close()


def test_tokens_are_random_and_revocable(listener):
    a, b = listener.issue(), listener.issue()
    assert a.token != b.token and len(a.token) == TOKEN_BYTES
    listener.revoke(a)
    sock = connect(listener, MAGIC + a.token)
    assert closed_by_peer(sock)
    sock.close()
    assert listener.live_tickets() == 1  # b is still live


def test_incoming_file_refuses_a_wrong_blake3_digest(tmp_path):
    data = bytes(range(256)) * 1000
    good = IncomingFile(
        tmp_path / "g.safetensors", len(data), blake3.blake3(data).hexdigest(), BLAKE3
    )
    bad = IncomingFile(tmp_path / "b.safetensors", len(data), "0" * 64, BLAKE3)
    for incoming in (good, bad):
        for o in range(0, len(data), 4096):
            incoming.write(o, data[o : o + 4096])
    good.finish()
    with pytest.raises(WeightsRejected, match="blake3 .* does not match"):
        bad.finish()
    with pytest.raises(WeightsRejected, match="digest algorithm 'md5'"):
        IncomingFile(tmp_path / "c.safetensors", 1, "00", "md5")


def weights(path, seed: int):
    torch.manual_seed(seed)
    save_file({"a.weight": torch.randn(256, 64), "b.bias": torch.randn(64)}, str(path))
    return path


@pytest.fixture
def updater(tmp_path, listener):
    (tmp_path / "served").mkdir()
    served = weights(tmp_path / "served" / "model.safetensors", 0)
    swaps = []
    store = WeightsStore(tmp_path / "root")

    def swap() -> int:
        swaps.append(1)
        return int(store.folders.read_marker()["weights_version"])

    updater = WeightsUpdater(store, files_specs([served]), 1, swap)
    updater.side_channel = listener
    return updater


def side_channel_push(updater, folder, manifest, corrupt: bool = False):
    """Plays the trainer: takes the offered ticket and sends the files (optionally with one
    byte flipped on the way)."""
    sent = {}

    def offer(ticket) -> None:
        def send() -> None:
            paths = sorted(folder.glob("*.safetensors"))
            if not corrupt:
                sent["n"] = send_files("127.0.0.1", ticket.port, ticket.token, paths)
                return
            data = bytearray(paths[0].read_bytes())
            data[len(data) // 2] ^= 1
            with socket.create_connection(("127.0.0.1", ticket.port)) as sock:
                sock.sendall(MAGIC + ticket.token + bytes(data))

        threading.Thread(target=send).start()

    return updater.receive_push(manifest, offer=offer), sent


def test_a_side_channel_push_is_checked_with_blake3_and_swapped(tmp_path, updater, listener):
    folder = tmp_path / "v2"
    folder.mkdir()
    weights(folder / "model.safetensors", 1)
    manifest = build_manifest(folder, 2, digests=(BLAKE3,))
    assert manifest.digest_algorithm == BLAKE3 and not manifest.file_sha256
    (version, received), sent = side_channel_push(updater, folder, manifest)
    size = (folder / "model.safetensors").stat().st_size
    assert (version, received, sent["n"]) == (2, size, size)
    published = updater.store.folders.path(2) / "model.safetensors"
    assert published.read_bytes() == (folder / "model.safetensors").read_bytes()
    assert file_digest(published, BLAKE3) == manifest.file_digest["model.safetensors"]
    assert listener.live_tickets() == 0


def test_a_corrupted_side_channel_push_is_refused_and_changes_nothing(tmp_path, updater):
    folder = tmp_path / "v2"
    folder.mkdir()
    weights(folder / "model.safetensors", 1)
    manifest = build_manifest(folder, 2, digests=(BLAKE3,))
    with pytest.raises(WeightsRejected, match="blake3 .* does not match"):
        side_channel_push(updater, folder, manifest, corrupt=True)
    assert updater.version == 1
    assert updater.store.folders.read_marker() is None  # nothing was published


def test_a_side_channel_push_to_a_replica_without_one_is_refused(tmp_path, updater):
    updater.side_channel = None
    folder = tmp_path / "v2"
    folder.mkdir()
    weights(folder / "model.safetensors", 1)
    manifest = build_manifest(folder, 2, digests=(BLAKE3,))
    with pytest.raises(WeightsRejected, match="offers no side channel"):
        updater.receive_push(manifest, offer=lambda ticket: None)
    assert updater.version == 1


def test_sha256_manifests_of_older_senders_are_still_accepted(tmp_path, updater):
    folder = tmp_path / "v2"
    folder.mkdir()
    weights(folder / "model.safetensors", 1)
    manifest = build_manifest(folder, 2)  # sha256 only, no digest_algorithm
    assert manifest.digest_algorithm == "" and manifest.file_sha256
    data = (folder / "model.safetensors").read_bytes()
    chunks = [
        policy_pb2.WeightsChunk(file_name="model.safetensors", offset=o, data=data[o : o + 4096])
        for o in range(0, len(data), 4096)
    ]
    assert updater.receive_push(manifest, chunks) == (2, len(data))
    manifest = build_manifest(folder, 3)
    manifest.file_sha256["model.safetensors"] = "0" * 64
    with pytest.raises(WeightsRejected, match="sha256"):
        updater.receive_push(manifest, chunks)
    assert updater.version == 2
