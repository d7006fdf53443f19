"""The gateway serves HTTPS, and with a client CA only clients with a certificate of that CA: on a
real gateway process with certificates made for the test, through httpx."""

from __future__ import annotations

import ssl

import httpx
import pytest

from tests.integration.gateway.gateway_process import running_gateway
from tests.support.certs import CertificateAuthority


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway-pki")
    ca = CertificateAuthority.create(root / "ca")
    return {
        "ca": ca,
        "server": ca.issue(root / "server", "gateway", server=True),
        "client": ca.issue(root / "client", "product"),
    }


def context(ca, cert=None) -> ssl.SSLContext:
    """What a client trusts (the test CA) and, for mutual TLS, the certificate it presents."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
    return ctx


def test_https_and_mutual_tls(kafka_settings, run_dir, pki):
    server, client = pki["server"], pki["client"]
    ca = context(pki["ca"].cert_file)
    body = {"response_id": "r-tls", "thumb": "up"}
    with running_gateway(
        kafka_settings,
        run_dir / "gateway-tls",
        httpx_options={"verify": ca},
        tls_cert_file=server.cert_file,
        tls_key_file=server.key_file,
    ) as gw:
        assert gw.url.startswith("https://")
        r = httpx.post(f"{gw.url}/v1/feedback", json=body, headers=gw.headers, verify=ca)
        assert r.status_code == 202, r.text
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA
            httpx.get(f"{gw.url}/healthz", timeout=5)
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP on the TLS port
            httpx.get(gw.url.replace("https://", "http://") + "/healthz", timeout=5)

    with_cert = context(pki["ca"].cert_file, client)
    with running_gateway(
        kafka_settings,
        run_dir / "gateway-mtls",
        httpx_options={"verify": with_cert},
        tls_cert_file=server.cert_file,
        tls_key_file=server.key_file,
        tls_client_ca_file=pki["ca"].cert_file,
    ) as gw:
        r = httpx.post(f"{gw.url}/v1/feedback", json=body, headers=gw.headers, verify=with_cert)
        assert r.status_code == 202, r.text
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(f"{gw.url}/healthz", timeout=5, verify=ca)  # no client certificate
