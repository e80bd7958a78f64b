"""What works without the heavy stack or the internet (issue 18, part 4).

- The SDK (``gradstore.server.client``) imports and talks to a live server in a Python process where torch, FAISS,
  Zarr, FastAPI, transformers and scikit-learn cannot be imported (a ``sys.meta_path`` finder refuses them): a
  dashboard backend or a notebook that only speaks HTTP does not need them (``pip install gradstore[client]``).
  Nor numpy: the SDK is httpx and pydantic.
- ``/docs`` and ``/redoc`` reference only files the server itself serves (no CDN), and those files are there.
- ``gradstore --help`` / ``--version`` import none of that stack either.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import httpx
import pytest

from gradstore.server.http.app import create_app
from gradstore.server.run import open_engine
from gradstore.server.run.config import RunConfig
from tests.helpers.serving import serve_in_thread

HEAVY = ("torch", "faiss", "zarr", "numpy", "fastapi", "starlette", "uvicorn", "transformers", "sklearn", "scipy")

BLOCKER = f"""
import sys

HEAVY = {HEAVY!r}


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{{name}} is not installed (blocked by the test)")
        return None


sys.meta_path.insert(0, Refuse())
"""

CLIENT = """
import json

from gradstore.server.client import Client, GradstoreAPIError, InvalidRequestError
from gradstore.server.run.schemas import InfluenceResponse, RunInfo

answer = {}
with Client(sys.argv[1], retries=0) as client:
    assert client.ready()
    run = client.run()
    assert isinstance(run, RunInfo)
    answer["checkpoints"] = [c.name for c in run.checkpoints]
    response = client.influence([{"test_index": 0}], top_k=3)
    assert isinstance(response, InfluenceResponse)
    answer["proponents"] = [p.id for p in response.results[0].proponents]
    try:
        client.influence([{"test_index": 0}], top_k=0)  # refused by the request model, nothing sent
    except InvalidRequestError as exc:
        answer["refused"] = exc.status_code
    try:
        client.example(10**9)
    except GradstoreAPIError as exc:
        answer["missing"] = exc.status_code
answer["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print(json.dumps(answer))
"""


@pytest.fixture(scope="module")
def engine(demo_config):
    return open_engine(RunConfig.load(demo_config))


@pytest.fixture(scope="module")
def live_url(demo_config, engine):
    """The demo run's app under uvicorn in a thread of this process (which has torch; the client's does not)."""
    with serve_in_thread(create_app(RunConfig.load(demo_config), engine=engine)) as url:
        yield url


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_blocker_blocks():
    done = _run("import torch")
    assert done.returncode != 0 and "torch is not installed (blocked by the test)" in done.stderr


def test_sdk_works_against_a_live_server_without_torch_faiss_zarr(live_url, engine):
    done = _run(CLIENT, live_url)
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    expected = engine.influence([{"test_index": 0}], top_k=3).results[0]
    assert answer["proponents"] == [p.id for p in expected.proponents]
    assert answer["checkpoints"] == list(engine.checkpoints)
    assert answer["refused"] == 422 and answer["missing"] == 404
    assert answer["heavy"] == []


def test_package_root_and_cli_help_import_nothing_heavy():
    code = """
import gradstore.server
from gradstore.server import __version__
from gradstore.server.cli import build_parser
build_parser(["--help"]).format_help()
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))))
"""
    done = _run("import json\n" + code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_docs_pages_load_their_assets_from_the_server(live_url):
    for page in ("/docs", "/redoc"):
        response = httpx.get(f"{live_url}{page}")
        assert response.status_code == 200, page
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?["']([^"']+)["']""", response.text)
        urls = [u for pair in urls for u in pair if u]
        assert urls, page
        assert not [u for u in urls if "://" in u or u.startswith("//")], f"{page} loads from elsewhere: {urls}"
        for url in urls:
            asset = httpx.get(f"{live_url}{url}")
            assert asset.status_code == 200 and len(asset.content) > 0, url
    spec_url = httpx.get(f"{live_url}/openapi.json").json()
    assert spec_url["openapi"].startswith("3.1")  # Swagger UI 5 (the one served) renders OpenAPI 3.1
    bundle = httpx.get(f"{live_url}/docs-assets/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith(("application/javascript", "text/javascript"))
