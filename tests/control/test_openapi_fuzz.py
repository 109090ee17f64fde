"""Schemathesis against the published OpenAPI: whatever a client sends, the API answers without a 5xx."""

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from hicache_ha.control.api import create_app
from tests.control.conftest import AUTH, KEY, MEM


def test_no_input_makes_a_server_error(cluster_factory):
    c = cluster_factory({"backends": MEM}, ranks=2)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(c.controller, KEY))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "GET /hicache/storage-backend", "PUT /hicache/storage-backend", "DELETE /hicache/storage-backend",
        "GET /hicache/storage-backend/events", "GET /healthz"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.call_and_validate(headers=AUTH, checks=[not_a_server_error])

        fuzz()
