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
- TLS: with `RLHF_GRPC_CLIENT_TLS_CA_FILE` every channel of the process is TLS (servers turn it
  on with `RLHF_<SVC>_GRPC_TLS_CERT_FILE`/`_KEY_FILE`); with a client certificate and key too,
  mutual TLS (servers that set `_GRPC_TLS_CLIENT_CA_FILE` require it).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RETRYABLE = ("UNAVAILABLE",)


class ClientTLS(BaseSettings):
    """How this process's gRPC calls to the platform's services are secured (one block per
    process, `RLHF_GRPC_CLIENT_*`): with a CA file, every channel is TLS; with a certificate and
    key too, the process presents them (mutual TLS)."""

    model_config = SettingsConfigDict(env_prefix="RLHF_GRPC_CLIENT_", extra="ignore")

    tls_ca_file: Path | None = Field(None, description="PEM CA bundle the servers' certs chain to.")
    tls_cert_file: Path | None = Field(None, description="PEM client certificate (mutual TLS).")
    tls_key_file: Path | None = Field(None, description="PEM client private key (mutual TLS).")
    tls_server_name: str = Field(
        "", description="Name to verify in the server's certificate, when not the address's host."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ClientTLS:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_cert_file is not None and self.tls_ca_file is None:
            raise ValueError("a client certificate needs tls_ca_file (TLS) as well")
        return self

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca_file is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca_file.read_bytes(),
            private_key=self.tls_key_file.read_bytes() if self.tls_key_file else None,
            certificate_chain=self.tls_cert_file.read_bytes() if self.tls_cert_file else None,
        )

    def options(self) -> list[tuple[str, object]]:
        if self.tls_ca_file is not None and self.tls_server_name:
            return [("grpc.ssl_target_name_override", self.tls_server_name)]
        return []


def client_channel(
    address: str, options: Sequence[tuple[str, object]] = (), tls: ClientTLS | None = None
) -> grpc.Channel:
    """A channel to one `host:port`, TLS when this process's ClientTLS says so."""
    tls = tls or ClientTLS()
    credentials = tls.credentials()
    options = [*options, *tls.options()]
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


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
    tls: ClientTLS | None = None,
) -> grpc.Channel:
    """A channel to every replica behind `address` (see the module docstring), TLS when this
    process's ClientTLS says so."""
    tls = tls or ClientTLS()
    target, credentials = replica_target(address), tls.credentials()
    options = [*channel_options(services, options, max_attempts), *tls.options()]
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def replica_aio_channel(
    address: str,
    services: Sequence[str],
    options: Sequence[tuple[str, object]] = (),
    max_attempts: int = 3,
    tls: ClientTLS | None = None,
) -> grpc.aio.Channel:
    """`replica_channel` for grpc.aio callers (the gateway)."""
    tls = tls or ClientTLS()
    target, credentials = replica_target(address), tls.credentials()
    options = [*channel_options(services, options, max_attempts), *tls.options()]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)
