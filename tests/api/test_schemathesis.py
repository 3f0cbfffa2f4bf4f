"""Property-based check of the app against its own OpenAPI document (in-process, no network).

Schemathesis generates requests from the document the app serves at ``/openapi.json``;
every response must be a non-5xx, with a documented status code and media type and a body
that matches the documented schema. The schema is built eagerly from ``app.openapi()``
(schemathesis' lazy ``from_fixture`` loader does not work with pytest 9); the app's lifespan
(store, embedded worker) starts with the first request and is shut down after the module.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from alpaca_engine.api import create_app
from alpaca_engine.config import Settings
from tests.helpers import PATIENCE

_DIR = Path(tempfile.mkdtemp(prefix="alpaca-schemathesis-"))
app = create_app(Settings(database_url=f"sqlite:///{_DIR}/api.db", poll_interval=0.02),
                 workflows=["builtin:quickstart"])
schema = schemathesis.openapi.from_dict(json.loads(json.dumps(app.openapi())))
schema.app = app  # requests go to the ASGI app in-process


@pytest.fixture(scope="module", autouse=True)
def _shutdown() -> Iterator[None]:
    yield
    shutdown_lifespans()  # stops the embedded worker and closes the store
    shutil.rmtree(_DIR, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case) -> None:
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance],
        timeout=PATIENCE)
