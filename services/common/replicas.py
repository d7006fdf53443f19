"""Every replica of a service, for calls that must reach all of them (weight pushes, reloads)."""

from __future__ import annotations

import socket


def replica_addresses(addresses: list[str]) -> list[str]:
    """Every replica behind each `host:port`: a Kubernetes headless Service name resolves to one
    address per ready pod, so a push or a reload reaches all of them; an IP stays as it is."""
    replicas: list[str] = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror:
            infos = []
        ips = sorted({info[4][0] for info in infos}) or [host]
        for ip in ips:
            replica = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            if replica not in replicas:
                replicas.append(replica)
    return replicas
