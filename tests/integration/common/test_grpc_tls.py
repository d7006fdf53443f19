"""TLS and mutual TLS on the model services' gRPC, switched on by settings: a real reference
service with a server certificate answers a TLS client and refuses a plaintext one; with a client
CA set it also refuses a TLS client without a certificate of that CA."""

from __future__ import annotations

import grpc
import pytest

from services.common.channels import ClientTLS, client_channel, replica_channel
from services.common.grpc_server import GrpcSettings
from services.genproto.rlhf.v1 import reference_pb2, reference_pb2_grpc
from tests.support.certs import CertificateAuthority
from tests.support.scoring_stacks import reference_stack

REQUEST = reference_pb2.ComputeLogprobsRequest(
    sequences=[reference_pb2.TokenSequence(prompt_token_ids=[5, 6], response_token_ids=[7])]
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(root / "ca")
    other = CertificateAuthority.create(root / "other-ca", "someone else")
    return {
        "ca": ca,
        "server": ca.issue(root / "server", "reference", server=True),
        "client": ca.issue(root / "client", "rollout"),
        "stranger": other.issue(root / "stranger", "stranger"),
    }


def grpc_settings(pki, mutual: bool) -> GrpcSettings:
    return GrpcSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        shutdown_grace_s=1.0,
        tls_cert_file=pki["server"].cert_file,
        tls_key_file=pki["server"].key_file,
        tls_client_ca_file=pki["ca"].cert_file if mutual else None,
    )


def call(channel) -> int:
    reply = reference_pb2_grpc.ReferenceServiceStub(channel).ComputeLogprobs(REQUEST, timeout=20)
    return len(reply.results[0].logprobs)


def refused(channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(channel)
    return err.value.code()


def test_tls_is_on_by_settings(triton_server, tiny_lm_dir, pki):
    tls = ClientTLS(tls_ca_file=pki["ca"].cert_file)
    with reference_stack(triton_server, tiny_lm_dir, grpc=grpc_settings(pki, False)) as stack:
        port = stack.address.rsplit(":", 1)[1]
        for address in (f"127.0.0.1:{port}", f"localhost:{port}"):  # both names are in the cert
            with client_channel(address, tls=tls) as channel:
                assert call(channel) == 1
        with replica_channel(f"localhost:{port}", ["rlhf.v1.ReferenceService"], tls=tls) as ch:
            assert call(ch) == 1
        with grpc.insecure_channel(stack.address) as plaintext:
            assert refused(plaintext) == grpc.StatusCode.UNAVAILABLE
        wrong_ca = ClientTLS(tls_ca_file=pki["stranger"].cert_file)  # not the server's CA
        with client_channel(stack.address, tls=wrong_ca) as channel:
            assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(
    triton_server, tiny_lm_dir, pki
):
    with reference_stack(triton_server, tiny_lm_dir, grpc=grpc_settings(pki, True)) as stack:
        ca = pki["ca"].cert_file
        good = ClientTLS(
            tls_ca_file=ca,
            tls_cert_file=pki["client"].cert_file,
            tls_key_file=pki["client"].key_file,
        )
        with client_channel(stack.address, tls=good) as channel:
            assert call(channel) == 1
        for tls in (
            ClientTLS(tls_ca_file=ca),  # no client certificate
            ClientTLS(
                tls_ca_file=ca,
                tls_cert_file=pki["stranger"].cert_file,
                tls_key_file=pki["stranger"].key_file,
            ),
        ):
            with client_channel(stack.address, tls=tls) as channel:
                assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_half_configured_tls_is_refused_at_start(pki):
    with pytest.raises(ValueError, match="go together"):
        GrpcSettings(tls_cert_file=pki["server"].cert_file)
    with pytest.raises(ValueError, match="mutual TLS"):
        GrpcSettings(tls_client_ca_file=pki["ca"].cert_file)
    with pytest.raises(ValueError, match="needs tls_ca_file"):
        ClientTLS(tls_cert_file=pki["client"].cert_file, tls_key_file=pki["client"].key_file)
