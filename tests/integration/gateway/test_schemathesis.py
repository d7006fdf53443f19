"""Property-based run of schemathesis over the gateway's own OpenAPI document, against the real
gateway, real Kafka and a real policy service: no input produces a 5xx, and every response
matches its documented schema. Bounded examples per operation so it ends in about a minute."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    negative_data_rejection, response_schema_conformance, status_code_conformance,
)


@pytest.fixture(scope="module")
def gateway_schema(chat_gateway):
    schema = schemathesis.openapi.from_url(f"{chat_gateway.url}/openapi.json")
    schema.config.update(base_url=chat_gateway.url, headers=chat_gateway.headers)
    return schema


schema = schemathesis.pytest.from_fixture("gateway_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, chat_gateway):
    case.call_and_validate(
        headers=chat_gateway.headers, timeout=60,
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance,
                negative_data_rejection],
    )
