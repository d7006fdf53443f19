"""Property-based run of schemathesis over the gateway's own OpenAPI document, against the real
gateway, real Kafka and a real policy service: no input produces a 5xx, and every response
matches its documented status codes and schema. Bounded examples per operation.

(schemathesis' pytest plugin does not load under pytest 9, so the operations' hypothesis
strategies are driven directly.)"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

EXAMPLES = 20


def test_no_server_errors(chat_gateway):
    schema = schemathesis.openapi.from_url(f"{chat_gateway.url}/openapi.json")
    schema.config.update(base_url=chat_gateway.url, headers=chat_gateway.headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            case.call_and_validate(
                headers=chat_gateway.headers,
                timeout=60,
                checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
            )

        check()
