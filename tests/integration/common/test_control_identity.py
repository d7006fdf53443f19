"""The control plane also takes callers by their mTLS client identity: on a real gRPC server
with mutual TLS (the services' ModelServer, its interceptors, real certificates), a control
method admits a client whose certificate names an allowed identity, and refuses, with
UNAUTHENTICATED, one of the same CA that names another. The token still works beside it, and
data-plane methods need neither."""

from __future__ import annotations

import grpc
import pytest

from services.common.channels import ClientTLS, client_channel
from services.common.control_auth import ControlSettings
from services.common.grpc_server import GrpcSettings, ModelServer
from tests.support.certs import CertificateAuthority

SERVICE = "test.v1.Steering"
CONTROL = f"/{SERVICE}/Steer"
DATA = f"/{SERVICE}/Read"
TOKEN = "identity-test-token-8c1e"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(root / "ca")
    return {
        "ca": ca,
        "server": ca.issue(root / "server", "policy", server=True),
        "trainer": ca.issue(root / "trainer", "trainer"),
        "rollout": ca.issue(root / "rollout", "rollout"),
    }


def echo(request: bytes, _context) -> bytes:
    return b"done:" + request


def register(_servicer, server: grpc.Server) -> None:
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Steer": grpc.unary_unary_rpc_method_handler(echo),
                    "Read": grpc.unary_unary_rpc_method_handler(echo),
                },
            )
        ]
    )


@pytest.fixture
def server(pki, monkeypatch):
    monkeypatch.setenv("RLHF_CONTROL_TOKEN", TOKEN)
    monkeypatch.setenv("RLHF_CONTROL_ALLOWED_IDENTITIES", " trainer , refresh ")
    settings = GrpcSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        shutdown_grace_s=0.5,
        tls_cert_file=pki["server"].cert_file,
        tls_key_file=pki["server"].key_file,
        tls_client_ca_file=pki["ca"].cert_file,
    )
    model_server = ModelServer("steering", settings, control_methods=(CONTROL,))
    model_server.add(register, None, SERVICE)
    port = model_server.start()
    yield f"localhost:{port}"
    model_server.stop(0)


def call(address: str, pki, who: str, method: str, metadata=()) -> bytes:
    tls = ClientTLS(
        tls_ca_file=pki["ca"].cert_file,
        tls_cert_file=pki[who].cert_file,
        tls_key_file=pki[who].key_file,
    )
    with client_channel(address, tls=tls) as channel:
        stub = channel.unary_unary(method)
        return stub(b"x", timeout=10, metadata=metadata)


def test_settings_split_the_identity_list(monkeypatch):
    monkeypatch.setenv("RLHF_CONTROL_ALLOWED_IDENTITIES", "trainer, refresh,,")
    assert ControlSettings().allowed_identities == ("trainer", "refresh")


def test_an_allowed_certificate_steers_and_another_is_refused(server, pki):
    assert call(server, pki, "trainer", CONTROL) == b"done:x"
    with pytest.raises(grpc.RpcError) as refused:
        call(server, pki, "rollout", CONTROL)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "allowed client certificate" in refused.value.details()
    # The token admits any verified client; a wrong token falls back to the identity.
    token = [("authorization", f"Bearer {TOKEN}")]
    assert call(server, pki, "rollout", CONTROL, token) == b"done:x"
    wrong = [("authorization", "Bearer not-it")]
    assert call(server, pki, "trainer", CONTROL, wrong) == b"done:x"
    with pytest.raises(grpc.RpcError) as refused:
        call(server, pki, "rollout", CONTROL, wrong)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Data-plane calls need neither.
    assert call(server, pki, "rollout", DATA) == b"done:x"
