"""The dashboard in a real browser (issue 4, test 5).

The app ``gradstore serve`` runs is served on the demo run by uvicorn (in a thread) on a free loopback port;
headless Chromium (the Debian ``chromium`` package, driven by Playwright's Python API with that system binary: no
``playwright install`` download) loads ``/`` and is used as a person would use it:

- test-digit mode: pick a held-out digit, set top k and the lr weighting, click "Find influences";
  the proponent and opponent cards show, in the API's order, the API's ids, labels, scores (as the page
  formats them), one contribution bar per checkpoint, and a canvas whose pixels are the example's image;
- draw mode: draw a stroke on the 8x8 pad, choose a label, query; the page sends the drawn pixels and
  shows the API's answer for exactly that payload;
- the Self-influence tab: the listed cards are the API's top self-influence examples, with the
  mislabeled ones marked.

The API's answer for the same request is fetched independently with httpx from the same server.
Skipped (with the reason) only when Chromium or Playwright is missing; ``scripts/setup.sh`` installs both, and
CI sets ``GRADSTORE_REQUIRE_BROWSER=1`` so that there a missing browser fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

REQUIRED = os.environ.get("GRADSTORE_REQUIRE_BROWSER") == "1"  # CI: a missing browser is a failure, not a skip
try:
    from playwright import sync_api
except ImportError:
    if REQUIRED:
        raise
    pytest.skip(
        "playwright is not installed (pip install -e '.[dev]'; scripts/setup.sh does it)", allow_module_level=True
    )

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
TEST_INDEX = 7
TOP_K = 6
SELF_K = 12
TIMEOUT_MS = 30_000


def _chromium() -> str | None:
    explicit = os.environ.get("GRADSTORE_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CHROMIUM = _chromium()
if CHROMIUM is None and REQUIRED:
    raise RuntimeError(
        "GRADSTORE_REQUIRE_BROWSER=1 but no Chromium binary was found (scripts/setup.sh installs the chromium package)"
    )
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary (apt-get install chromium; scripts/setup.sh does it, or set GRADSTORE_CHROMIUM)",
)


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    executable = CHROMIUM
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"], headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def live(demo_config):
    """The app of ``gradstore serve --config <demo run.toml>`` under uvicorn in a thread, on a free loopback port.

    (tests/test_server.py covers the ``gradstore serve`` subprocess; a thread saves re-importing torch here.)
    """
    import uvicorn

    from gradstore.server.app import create_app
    from gradstore.server.config import RunConfig, ServerConfig

    port = _free_port()
    app = create_app(RunConfig.load(demo_config), settings=ServerConfig(host="127.0.0.1", port=port))
    app.state.api_key = None  # no API key, whatever GRADSTORE_API_KEY says
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="gradstore-browser-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive():
            pytest.fail("the server thread exited during startup (see the log above)")
        if time.monotonic() > deadline:
            pytest.fail("the server did not start within 120 s")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    try:
        yield SimpleNamespace(url=url, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server_url(live) -> str:
    return live.url


@pytest.fixture()
def page_problems() -> list[str]:
    """Uncaught exceptions and console errors of the test's page (a test expecting one removes it)."""
    return []


@pytest.fixture()
def page(browser, server_url, page_problems):
    """A fresh page on the dashboard, with the run info loaded; fails the test on any page error."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems = page_problems
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console.{msg.type}: {msg.text} ({msg.location.get('url', '')})")
            if msg.type == "error" and "favicon" not in msg.location.get("url", "")
            else None
        ),
    )
    page.goto(f"{server_url}/")
    sync_api.expect(page.locator("#run-info")).to_contain_text("examples", timeout=TIMEOUT_MS)
    yield page
    context.close()
    assert not problems, "errors in the page:\n" + "\n".join(problems)


# -- helpers -----------------------------------------------------------------------------------------


def _api(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _rendered_cards(page, grid: str) -> list[dict]:
    """What each card of ``#<grid>`` shows: id, label, score text, flipped mark, bars, image pixels.

    The image is read back from the card's canvas (the centre of each of the 8x8 cells), so a blank or
    wrong drawing is caught, not only the presence of a <canvas>.
    """
    return page.evaluate(
        """(grid) => [...document.querySelectorAll(`#${grid} .card`)].map((card) => {
            const canvas = card.querySelector("canvas");
            let cells = null;
            if (canvas) {
              const ctx = canvas.getContext("2d"), cell = canvas.width / 8;
              const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
              cells = [];
              for (let i = 0; i < 64; i++) {
                const x = Math.floor((i % 8) * cell + cell / 2), y = Math.floor(Math.floor(i / 8) * cell + cell / 2);
                cells.push(data[(y * canvas.width + x) * 4]);
              }
            }
            return {
              id: Number(card.dataset.id),
              label: card.querySelector(".meta b")?.textContent,
              score: card.querySelector(".meta > .score")?.textContent,
              flipped: card.classList.contains("flipped"),
              bars: card.querySelectorAll(".bar").length,
              canvas: canvas ? [canvas.width, canvas.height] : null,
              cells,
              visible: card.offsetParent !== null,
            };
          })""",
        grid,
    )


def _grey(pixel: int) -> int:
    """The grey level the dashboard paints for a 0..16 pixel value (white background, dark ink)."""
    return 255 - round(pixel / 16 * 255)


def _check_cards(page, grid: str, expected: list[dict], checkpoints: list[str]) -> None:
    """The cards of ``#<grid>`` are ``expected`` (the API's influences), in order, as the page should draw them."""
    cards = _rendered_cards(page, grid)
    assert [c["id"] for c in cards] == [e["id"] for e in expected], f"{grid}: card ids differ from the API's"
    formatted = page.evaluate("(xs) => xs.map((x) => x.toPrecision(4))", [e["score"] for e in expected])
    for card, item, score_text in zip(cards, expected, formatted):
        ex = item["example"]
        where = f"{grid} card #{item['id']}"
        assert card["visible"], f"{where} is not visible"
        assert card["label"] == str(ex["label"]), f"{where}: label {card['label']!r}, API {ex['label']}"
        assert card["score"] == score_text, f"{where}: score {card['score']!r}, API {item['score']!r}"
        assert float(card["score"]) == pytest.approx(item["score"], rel=1e-3)
        assert card["flipped"] == bool(ex.get("flipped")), f"{where}: mislabeled mark disagrees with the API"
        assert card["bars"] == len(checkpoints) == len(item["contributions"]), f"{where}: {card['bars']} bars"
        assert card["canvas"] == [64, 64], f"{where}: no 64x64 image canvas"
        assert card["cells"] == [_grey(v) for v in ex["pixels"]], f"{where}: the image is not the example's pixels"


# -- tests -------------------------------------------------------------------------------------------


def test_test_digit_query_renders_the_apis_proponents_and_opponents(page, server_url):
    run = httpx.get(f"{server_url}/v1/run", timeout=30).json()
    checkpoints = [c["name"] for c in run["checkpoints"]]
    sync_api.expect(page.locator("#run-info")).to_contain_text(f"{run['index']['rows']} examples")

    page.select_option("#mode", "test")
    page.fill("#test-index", str(TEST_INDEX))
    page.fill("#top-k", str(TOP_K))
    page.select_option("#weighting", "uniform")
    with page.expect_request("**/v1/influence") as sent:
        page.click("#run-query")
    assert sent.value.post_data_json == {
        "queries": [{"test_index": TEST_INDEX}],
        "top_k": TOP_K,
        "lr_weighting": "uniform",
    }
    sync_api.expect(page.locator("#proponents .card")).to_have_count(TOP_K)
    sync_api.expect(page.locator("#opponents .card")).to_have_count(TOP_K)
    assert page.text_content("#query-error") == ""

    answer = _api(
        server_url,
        "/v1/influence",
        {"queries": [{"test_index": TEST_INDEX}], "top_k": TOP_K, "lr_weighting": "uniform"},
    )
    result = answer["results"][0]
    _check_cards(page, "proponents", result["proponents"], checkpoints)
    _check_cards(page, "opponents", result["opponents"], checkpoints)
    assert all(p["score"] >= o["score"] for p in result["proponents"] for o in result["opponents"])

    # the query itself: its image, its label, and the stats line
    assert page.is_visible("#query-panel")
    assert page.evaluate("document.querySelector('#query-card canvas')?.width") == 96
    assert f"label {result['query']['label']}" in page.text_content("#query-card")
    assert "took" in page.text_content("#query-stats")


def test_draw_mode_queries_the_drawn_digit(page, server_url):
    run = httpx.get(f"{server_url}/v1/run", timeout=30).json()
    checkpoints = [c["name"] for c in run["checkpoints"]]
    page.select_option("#mode", "draw")
    assert page.is_visible("#draw") and not page.is_visible("#test-index")
    box = page.locator("#draw").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    for step in range(1, 11):  # a vertical stroke: something like a 1
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * (0.15 + 0.07 * step))
    page.mouse.up()
    page.select_option("#draw-label", "1")
    page.fill("#top-k", "4")
    with page.expect_request("**/v1/influence") as sent:
        page.click("#run-query")
    sync_api.expect(page.locator("#proponents .card")).to_have_count(4)
    sync_api.expect(page.locator("#opponents .card")).to_have_count(4)

    body = sent.value.post_data_json
    query = body["queries"][0]
    assert query["label"] == 1 and len(query["pixels"]) == 64
    assert all(isinstance(v, int) and 0 <= v <= 16 for v in query["pixels"])
    column = (
        [query["pixels"][row * 8 + 4] for row in range(8)]
        if query["pixels"][4 * 8 + 4]
        else [query["pixels"][row * 8 + 3] for row in range(8)]
    )
    assert sum(v > 8 for v in column) >= 5, f"the stroke did not reach the payload: {query['pixels']}"

    answer = _api(server_url, "/v1/influence", body)
    _check_cards(page, "proponents", answer["results"][0]["proponents"], checkpoints)
    _check_cards(page, "opponents", answer["results"][0]["opponents"], checkpoints)

    page.click("#clear")  # the pad is cleared, and a cleared pad sends zeros
    with page.expect_request("**/v1/influence") as sent:
        page.click("#run-query")
    assert sent.value.post_data_json["queries"][0]["pixels"] == [0] * 64


def test_self_influence_tab_lists_the_apis_examples(page, server_url):
    run = httpx.get(f"{server_url}/v1/run", timeout=30).json()
    checkpoints = [c["name"] for c in run["checkpoints"]]
    page.click("#tab-self")
    assert page.is_visible("#view-self") and not page.is_visible("#view-query")
    page.fill("#self-k", str(SELF_K))
    with page.expect_request("**/v1/self-influence") as sent:
        page.click("#run-self")
    assert sent.value.post_data_json == {"top_k": SELF_K}
    sync_api.expect(page.locator("#self-list .card")).to_have_count(SELF_K)
    assert page.text_content("#self-error") == ""

    answer = _api(server_url, "/v1/self-influence", {"top_k": SELF_K})
    _check_cards(page, "self-list", answer["results"], checkpoints)
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0

    page.click("#tab-query")  # and back
    assert page.is_visible("#view-query") and not page.is_visible("#view-self")


def test_api_error_is_shown_not_thrown(page, page_problems):
    """A client mistake (a test index past the end) shows the server's 4xx message on the page."""
    page.fill("#test-index", "100000")
    page.click("#run-query")
    sync_api.expect(page.locator("#query-error")).to_contain_text("422")
    sync_api.expect(page.locator("#query-error")).to_contain_text("test_index")
    assert page.is_enabled("#run-query")
    assert not page.is_visible("#proponents-panel")
    # Chromium logs the failed fetch itself; that one is expected, anything else is not
    expected = [p for p in page_problems if "status of 422" in p and "/v1/influence" in p]
    assert len(expected) == 1, page_problems
    page_problems.remove(expected[0])


def test_api_key_typed_into_the_page(browser, live):
    """With an API key on the server the page says why it gets nothing, and works once the key is typed."""
    key = "browser-test-key"
    live.app.state.api_key = key
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{live.url}/")
        sync_api.expect(page.locator("#run-info")).to_contain_text("401")
        page.fill("#test-index", "3")
        page.fill("#top-k", "3")
        page.click("#run-query")
        sync_api.expect(page.locator("#query-error")).to_contain_text("401")
        page.fill("#api-key", key)
        with page.expect_request("**/v1/influence") as sent:
            page.click("#run-query")
        assert sent.value.headers.get("x-api-key") == key
        sync_api.expect(page.locator("#proponents .card")).to_have_count(3)
        assert page.text_content("#query-error") == ""
        assert not errors, errors
    finally:
        live.app.state.api_key = None
        context.close()
