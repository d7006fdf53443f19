"""Client channels that reach every replica of a service, spread calls over them, and retry a
call that failed on a dead replica on another one, within the call's deadline.

    channel = replica_channel("policy-headless:50051", ["rlhf.v1.PolicyService"])
    channel = replica_channel("10.0.0.5:50051,10.0.0.6:50051", ["rlhf.v1.PolicyService"])

- One `host:port` becomes the target `dns:///host:port`: gRPC resolves it again whenever a
  connection breaks, so a Kubernetes headless Service name reaches every ready pod as pods come
  and go.
- A comma-separated list becomes `ipv4:ip:port,...` (or `ipv6:`), its names resolved once, now:
  for fixed deployments.
- The service config picks `round_robin` (one subchannel per replica, calls in turn) and a
  `retryPolicy` for UNAVAILABLE: the status of a replica that is gone, draining, or whose model
  is down (services/common/grpc_server.py fails such calls at once). A retry goes through the
  load balancer again, so it lands on the next ready replica; all attempts share the deadline.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence

import grpc

RETRYABLE = ("UNAVAILABLE",)


def replica_target(address: str) -> str:
    """The gRPC target for `address` (`host:port`, or a comma-separated list of them)."""
    parts = [a.strip() for a in address.split(",") if a.strip()]
    if not parts:
        raise ValueError("no address given")
    if len(parts) == 1:
        return (
            parts[0]
            if "://" in parts[0] or parts[0].startswith(("ipv4:", "ipv6:", "unix:"))
            else f"dns:///{parts[0]}"
        )
    v4, v6 = [], []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{part!r}: expected host:port")
        host = host.strip("[]")
        for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM):
            ip = info[4][0]
            (v6 if ":" in ip else v4).append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    if v4 and v6:
        raise ValueError(f"{address!r} mixes IPv4 and IPv6 replicas: give one family")
    family, found = ("ipv6", v6) if v6 else ("ipv4", v4)
    return f"{family}:{','.join(dict.fromkeys(found))}"


def service_config(services: Sequence[str], max_attempts: int = 3) -> str:
    """round_robin over the replicas, and UNAVAILABLE retried (on another) up to `max_attempts`."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": s} for s in services],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": list(RETRYABLE),
                    },
                }
            ],
        }
    )


def channel_options(
    services: Sequence[str], options: Sequence[tuple[str, object]] = (), max_attempts: int = 3
) -> list[tuple[str, object]]:
    return [
        *options,
        ("grpc.service_config", service_config(services, max_attempts)),
        ("grpc.enable_retries", 1),
    ]


def replica_channel(
    address: str,
    services: Sequence[str],
    options: Sequence[tuple[str, object]] = (),
    max_attempts: int = 3,
) -> grpc.Channel:
    """A channel to every replica behind `address` (see the module docstring)."""
    return grpc.insecure_channel(
        replica_target(address), options=channel_options(services, options, max_attempts)
    )


def replica_aio_channel(
    address: str,
    services: Sequence[str],
    options: Sequence[tuple[str, object]] = (),
    max_attempts: int = 3,
) -> grpc.aio.Channel:
    """`replica_channel` for grpc.aio callers (the gateway)."""
    return grpc.aio.insecure_channel(
        replica_target(address), options=channel_options(services, options, max_attempts)
    )
