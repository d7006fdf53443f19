"""KafkaSettings' security block: read from RLHF_KAFKA_*, mapped to kafka-python's and
librdkafka's option names, refused with a clear error when the combination cannot work, and
the SASL password kept out of every repr and error message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.settings import KafkaSettings

PASSWORD = "hunter2-not-in-any-log"


@pytest.fixture(autouse=True)
def _no_kafka_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith("RLHF_KAFKA_")]:
        monkeypatch.delenv(name)


def test_plaintext_is_the_default_and_adds_nothing_else():
    settings = KafkaSettings()
    assert settings.kafka_python_config() == {"security_protocol": "PLAINTEXT"}
    assert settings.librdkafka_config() == {"security.protocol": "plaintext"}


def test_mutual_tls_maps_to_both_clients():
    settings = KafkaSettings(
        security_protocol="SSL",
        ssl_ca_file="/tls/ca.crt",
        ssl_cert_file="/tls/tls.crt",
        ssl_key_file="/tls/tls.key",
    )
    assert settings.kafka_python_config() == {
        "security_protocol": "SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": "/tls/ca.crt",
        "ssl_certfile": "/tls/tls.crt",
        "ssl_keyfile": "/tls/tls.key",
    }
    assert settings.librdkafka_config() == {
        "security.protocol": "ssl",
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.ca.location": "/tls/ca.crt",
        "ssl.certificate.location": "/tls/tls.crt",
        "ssl.key.location": "/tls/tls.key",
    }


def test_sasl_ssl_maps_to_both_clients():
    settings = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="gateway",
        sasl_password=PASSWORD,
        ssl_check_hostname=False,
    )
    assert settings.kafka_python_config() == {
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": False,  # and no ssl_cafile: the system trust store
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "gateway",
        "sasl_plain_password": PASSWORD,
    }
    assert settings.librdkafka_config() == {
        "security.protocol": "sasl_ssl",
        "ssl.endpoint.identification.algorithm": "none",
        "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "gateway",
        "sasl.password": PASSWORD,
    }


def test_sasl_plaintext_has_no_tls_options():
    settings = KafkaSettings(
        security_protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password=PASSWORD
    )
    assert settings.sasl_mechanism == "PLAIN"
    assert not any(k.startswith("ssl") for k in settings.kafka_python_config())
    assert not any(k.startswith("ssl") for k in settings.librdkafka_config())


def test_security_settings_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("RLHF_KAFKA_SSL_CA_FILE", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("RLHF_KAFKA_SSL_CHECK_HOSTNAME", "false")
    monkeypatch.setenv("RLHF_KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("RLHF_KAFKA_SASL_USERNAME", "trainer")
    monkeypatch.setenv("RLHF_KAFKA_SASL_PASSWORD", PASSWORD)
    settings = KafkaSettings()
    assert settings.ssl_ca_file == Path(tmp_path / "ca.crt")
    assert settings.ssl_check_hostname is False
    assert (settings.sasl_mechanism, settings.sasl_username) == ("SCRAM-SHA-256", "trainer")
    assert settings.sasl_password.get_secret_value() == PASSWORD


def test_password_is_in_no_repr():
    settings = KafkaSettings(
        security_protocol="SASL_SSL", sasl_username="u", sasl_password=PASSWORD
    )
    config = settings.kafka_python_config()
    for text in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        # kafka-python's admin client logs its configuration dict (a repr of every value).
        repr(config),
    ):
        assert PASSWORD not in text
    assert config["sasl_plain_password"] == PASSWORD  # and the client still gets it


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"security_protocol": "SASL_SSL"}, "SASL_SSL needs RLHF_KAFKA_SASL_USERNAME and"),
        (
            {"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"},
            "SASL_PLAINTEXT needs RLHF_KAFKA_SASL_USERNAME and RLHF_KAFKA_SASL_PASSWORD",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_password": PASSWORD},
            "SASL_SSL needs RLHF_KAFKA_SASL_USERNAME",
        ),
        (
            {"security_protocol": "SSL", "ssl_cert_file": "/tls/tls.crt"},
            "RLHF_KAFKA_SSL_CERT_FILE and RLHF_KAFKA_SSL_KEY_FILE go together",
        ),
        (
            {"security_protocol": "SSL", "ssl_key_file": "/tls/tls.key"},
            "RLHF_KAFKA_SSL_CERT_FILE and RLHF_KAFKA_SSL_KEY_FILE go together",
        ),
        (
            {"ssl_ca_file": "/tls/ca.crt"},
            "RLHF_KAFKA_SSL_CA_FILE given, but PLAINTEXT does not use TLS",
        ),
        (
            {"security_protocol": "SASL_PLAINTEXT", "ssl_ca_file": "/ca", "sasl_username": "u"},
            "SASL_PLAINTEXT does not use TLS",
        ),
        (
            {"security_protocol": "SSL", "sasl_username": "u", "sasl_password": PASSWORD},
            "SASL credentials given, but SSL does not log in",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused(fields, message):
    with pytest.raises(ValidationError, match="Kafka security settings") as refused:
        KafkaSettings(**fields)
    assert message in str(refused.value)
    assert PASSWORD not in str(refused.value)  # the error does not quote its input


@pytest.mark.parametrize(
    "fields",
    [{"security_protocol": "TLS"}, {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}],
)
def test_unknown_protocols_and_mechanisms_are_refused(fields):
    with pytest.raises(ValidationError):
        KafkaSettings(sasl_username="u", sasl_password=PASSWORD, **fields)
