"""Schema fuzzing of the HTTP API with schemathesis (issue 4, "Tests that must pass" 2).

Every operation of the app's OpenAPI document is fuzzed in-process (ASGI) on the demo run, with
schema-valid ("positive") and schema-violating ("negative") requests: no 5xx, every response
conforms to the documented status codes, content types and schemas, requests without the right
API key are refused. Bounded and reproducible: ``max_examples`` per operation and mode, derandomized (60 each:
the whole file took 45 s on 2 shared CPU cores, demo run included).
"""

from __future__ import annotations

import pytest
import schemathesis  # the `dev` extra; a missing install must fail, not skip
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from gradstore.server.http.app import create_app
from gradstore.server.run.config import RunConfig, ServerConfig

API_KEY = "fuzz-key"
MAX_EXAMPLES = 60

# (method, path, whether it has inputs to break in negative mode); checked against the schema below.
OPERATIONS = [
    ("POST", "/v1/influence", True),
    ("POST", "/v1/self-influence", True),
    ("POST", "/v1/explain", True),
    ("GET", "/v1/examples/{example_id}", True),
    ("GET", "/v1/run", True),  # the API-key header is its input
    ("GET", "/healthz", False),
    ("GET", "/readyz", False),
    ("GET", "/metrics", False),
]

CONFIG = {
    # The key for the schema's APIKeyHeader scheme: fuzzed requests authenticate, and the ignored_auth
    # check also replays them with no key and with a wrong one, expecting 401.
    "auth": {"openapi": {"APIKeyHeader": {"api_key": API_KEY}}},
    # Every built-in check is on: not_a_server_error, status_code/content_type/response_schema/
    # response_headers conformance, negative_data_rejection, ignored_auth, positive_data_acceptance, ...
    # The schema cannot say which query payloads the run's Task accepts (an open JSON object), which example
    # ids exist, nor this server's top_k and batch limits (settings, not schema), so a schema-valid request
    # may rightly get a 404 or a 422 naming why; any other refusal of valid data (400, 413, 5xx) fails.
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2XX", "401", "404", "422"]}},
}


@pytest.fixture(scope="module")
def fuzz_schema(demo_config):
    from gradstore.server.run import open_engine

    engine = open_engine(RunConfig.load(demo_config), device="cpu")
    app = create_app(engine=engine, settings=ServerConfig(api_key=API_KEY, max_top_k=50, max_queries=8))
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=schemathesis.Config.from_dict(CONFIG))


def test_operations_cover_the_schema(fuzz_schema):
    """The fuzzed list is the schema's full list of operations (a new route cannot escape fuzzing)."""
    found = sorted((op.method.upper(), op.path) for op in (result.ok() for result in fuzz_schema.get_all_operations()))
    assert found == sorted((method, path) for method, path, _ in OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
@pytest.mark.parametrize("method,path,has_inputs", OPERATIONS, ids=[f"{m} {p}" for m, p, _ in OPERATIONS])
def test_fuzz_operation(fuzz_schema, method, path, has_inputs, mode):
    if mode is GenerationMode.NEGATIVE and not has_inputs:
        pytest.skip("no parameters or body to make invalid")
    operation = fuzz_schema[path][method]
    seen: list[int] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call_and_validate()
        seen.append(response.status_code)

    check()
    assert seen and all(status < 500 for status in seen)
    if mode is GenerationMode.POSITIVE and path in ("/v1/run", "/healthz", "/readyz", "/metrics"):
        assert set(seen) == {200}


def _valid_influence_bodies(n_test: int, checkpoints: list[str]):
    """Requests the demo Task accepts: generated fuzzing rarely hits one, so the 200 path gets its own."""
    from hypothesis import strategies as st

    digit = st.one_of(
        st.builds(lambda i: {"test_index": i}, st.integers(0, n_test - 1)),
        st.builds(
            lambda pixels, label: {"pixels": pixels, "label": label},
            st.lists(st.one_of(st.integers(0, 16), st.floats(0, 16)), min_size=64, max_size=64),
            st.integers(0, 9),
        ),
    )
    return st.fixed_dictionaries(
        {"queries": st.lists(digit, min_size=1, max_size=8)},
        optional={
            "top_k": st.integers(1, 50),
            "lr_weighting": st.sampled_from(["schedule", "uniform", "normalized"]),
            "checkpoints": st.none() | st.lists(st.sampled_from(checkpoints), min_size=1, max_size=4),
            "measurement": st.sampled_from(["loss", "measurement"]),
            "normalize": st.none() | st.just(False),
        },
    )


@pytest.mark.slow
def test_fuzz_valid_influence_requests(fuzz_schema, demo_config):
    """Task-valid influence requests: all 200, and the answers conform to the response schema."""
    from gradstore.demos.digits import DigitsTask

    task = DigitsTask()
    n_test = len(task.labels) - task.n_train
    checkpoints = [c.name for c in RunConfig.load(demo_config).checkpoints]
    operation = fuzz_schema["/v1/influence"]["POST"]

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=_valid_influence_bodies(n_test, checkpoints))
    def check(body):
        case = operation.Case(body=body, media_type="application/json", headers={"X-API-Key": API_KEY})
        response = case.call_and_validate()
        assert response.status_code == 200, response.text
        answer = response.json()
        assert len(answer["results"]) == len(body["queries"])
        top_k = body.get("top_k", 10)
        assert all(len(r["proponents"]) == len(r["opponents"]) == top_k for r in answer["results"])

    check()
