"""The weights push's bulk path: a raw TCP connection beside the gRPC control call, opened with a
one-time token that the control call hands out.

A push through gRPC's stream cost 2.5x a raw loopback copy by itself (bench/NOTES.md, "Weight
sync"): every byte is framed, queued and copied by gRPC at both ends. Here the bytes go through a
plain socket, sent by `sendfile` straight from the page cache and received into buffers that are
written and hashed on a second thread. gRPC keeps what it is good at: authenticating the caller,
the manifest and the result.

  1. the trainer calls `UpdateWeights` (authorised as every control call,
     services/common/control_auth) with a manifest whose `transport` is `TRANSPORT_SIDE_CHANNEL`,
     and sends no chunks;
  2. the policy checks the manifest (version, names, tensors) and `issue`s a ticket: 32 random
     bytes, alive for `ticket_ttl_s`, usable once. It sends the token and its side-channel port in
     the call's initial metadata (`METADATA_TOKEN`, `METADATA_PORT`); only the authorised caller
     of this call sees them;
  3. the trainer connects to the same host at that port and sends `MAGIC + token`, then every
     file of the manifest in name order, back to back (`send_files`);
  4. the listener reads the header within `handshake_timeout_s`; a connection whose token is
     missing, wrong, expired or already used is closed before one byte of it is read further
     (and counted in `dropped`). The token is spent by the first connection that presents it;
  5. the policy reads exactly the manifest's sizes, checks every digest, swaps, and answers the
     gRPC call with the result, as for a streamed push.

Security, stated plainly. The token is as secret as the control channel that carries it: with TLS
on the gRPC port, an eavesdropper does not learn it before it is used. The side channel itself is
plaintext TCP, also when the control channel uses TLS: it is authenticated (only a connection
presenting the live token is read) and its content is integrity-checked (every byte is hashed
with the BLAKE3 or sha256 digest that the manifest, which travelled over the control channel,
names; any change refuses the push and changes nothing), but it is not confidential: someone who
can read the network between trainer and policy can read the weights, and an active attacker
there can make a push fail (never succeed with other bytes). Where the weights must stay
confidential on the wire, set the trainer's `push_transport=stream`: the bytes then travel
inside the TLS-protected gRPC stream, at the stream's speed.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MAGIC = b"RLHFWSC1"
"""First bytes of a side-channel connection: what it is and the version of this framing."""
TOKEN_BYTES = 32
MAX_HANDSHAKES = 16
"""Connections that may be presenting a token at once; more are dropped unread."""
METADATA_PORT = "rlhf-weights-port"
METADATA_TOKEN = "rlhf-weights-token"


class SideChannelError(RuntimeError):
    """The side channel could not carry a push (no connection in time, a short read)."""


@dataclass
class Ticket:
    """A one-time permission to send one push's bytes to this listener."""

    token: bytes
    port: int
    expires_at: float
    """time.monotonic() after which the token opens nothing."""
    _connected: threading.Event = field(default_factory=threading.Event)
    _conn: socket.socket | None = None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What the control call sends back to its caller."""
        return ((METADATA_PORT, str(self.port)), (METADATA_TOKEN, self.token.hex()))

    def wait(self, timeout_s: float) -> socket.socket:
        """The sender's connection, once it has presented the token; SideChannelError if none
        did in time (the ticket is then spent)."""
        if not self._connected.wait(timeout_s) or self._conn is None:
            raise SideChannelError(
                f"no side-channel connection with the token within {timeout_s} s"
            )
        return self._conn


def _key(token: bytes) -> bytes:
    """Tickets are looked up by the token's sha256: comparing dictionary keys then tells a timing
    observer nothing about the token itself."""
    return hashlib.sha256(token).digest()


class SideChannelListener:
    """The policy's end: a listening socket and the live tickets."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 0,
        ticket_ttl_s: float = 30.0,
        handshake_timeout_s: float = 5.0,
        io_timeout_s: float = 60.0,
    ):
        self.ticket_ttl_s = ticket_ttl_s
        self.handshake_timeout_s = handshake_timeout_s
        self.io_timeout_s = io_timeout_s
        self._sock = socket.create_server((host, port), backlog=16, reuse_port=False)
        self.port = self._sock.getsockname()[1]
        self._tickets: dict[bytes, Ticket] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self.dropped = 0
        """Connections closed for a missing, wrong, expired or reused token."""
        self._thread = threading.Thread(
            target=self._accept, name="weights-side-channel", daemon=True
        )
        self._thread.start()

    def issue(self) -> Ticket:
        ticket = Ticket(
            secrets.token_bytes(TOKEN_BYTES), self.port, time.monotonic() + self.ticket_ttl_s
        )
        with self._lock:
            self._purge()
            self._tickets[_key(ticket.token)] = ticket
        return ticket

    def revoke(self, ticket: Ticket) -> None:
        """Ends a ticket, used or not (the push it was for is over)."""
        with self._lock:
            self._tickets.pop(_key(ticket.token), None)
        ticket._connected.set()
        if ticket._conn is not None:
            ticket._conn.close()

    def live_tickets(self) -> int:
        with self._lock:
            self._purge()
            return len(self._tickets)

    def _purge(self) -> None:
        now = time.monotonic()
        for key in [k for k, t in self._tickets.items() if t.expires_at < now]:
            self._tickets.pop(key)._connected.set()

    def _claim(self, token: bytes) -> Ticket | None:
        """The live ticket of `token`, spent by this call; None for any other token."""
        with self._lock:
            self._purge()
            return self._tickets.pop(_key(token), None)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return  # closed
            if not self._handshakes.acquire(blocking=False):
                self._drop(conn, peer)  # a flood of silent connections ties up nothing more
                continue
            threading.Thread(
                target=self._handshake, args=(conn, peer), name="weights-side-channel-handshake",
                daemon=True,
            ).start()  # fmt: skip

    def _drop(self, conn: socket.socket, peer) -> None:
        with self._lock:
            self.dropped += 1
        log.warning("side-channel connection from %s dropped: no live token", peer[0])
        conn.close()

    def _handshake(self, conn: socket.socket, peer) -> None:
        try:
            conn.settimeout(self.handshake_timeout_s)
            header = _read_exact(conn, len(MAGIC) + TOKEN_BYTES)
        except (OSError, SideChannelError):
            header = b""
        finally:
            self._handshakes.release()
        ticket = self._claim(header[len(MAGIC) :]) if header[: len(MAGIC)] == MAGIC else None
        if ticket is None:
            self._drop(conn, peer)
            return
        conn.settimeout(self.io_timeout_s)
        ticket._conn = conn
        ticket._connected.set()

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        with self._lock:
            for ticket in self._tickets.values():
                ticket._connected.set()
            self._tickets.clear()


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise SideChannelError(f"connection closed after {len(data)} of {n} bytes")
        data += part
    return bytes(data)


def ticket_from_metadata(metadata) -> tuple[int, bytes] | None:
    """(port, token) from a control call's initial metadata; None when the policy offered none."""
    values = dict(metadata or ())
    if METADATA_PORT not in values or METADATA_TOKEN not in values:
        return None
    return int(values[METADATA_PORT]), bytes.fromhex(values[METADATA_TOKEN])


def send_files(
    host: str,
    port: int,
    token: bytes,
    paths: list[Path],
    timeout_s: float = 60.0,
    connect_timeout_s: float = 10.0,
) -> int:
    """The trainer's end: presents the token, then sends the files back to back with `sendfile`
    (no copy through this process). Returns the bytes sent. A port that a firewall or a
    NetworkPolicy drops fails within `connect_timeout_s` (the caller then streams the push)."""
    sent = 0
    with socket.create_connection((host, port), timeout=min(connect_timeout_s, timeout_s)) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(MAGIC + token)
        for path in paths:
            with open(path, "rb") as f:
                sent += sock.sendfile(f)
    return sent
