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
  mislabeled ones marked;
- a JSON payload box on every run.

The text view (issue 10, test 5) on a tiny word-level LM run (tests/helpers/text_run.py, served the same way):
the page picks text mode; typed text, prompt/completion and JSON payloads are sent as the Task reads them; every
proponent and opponent shows its text (long ones folded behind "more"), its other fields as key-values, and a mark
when its score has the other sign (from ``role`` or from the score alone); markup in task text stays text. The
generic renderer draws nested 2-D arrays, flat square ``pixels`` and PNG data of any size (answers fabricated with
``page.route``). "which tokens?" sends ``POST /v1/explain`` and colours each token by the API's share; a server
without that route (404 / 405) gets a clear message. Screenshots go to ``$GRADSTORE_SCREENSHOTS`` (or a tmp folder).

The API's answer for the same request is fetched independently with httpx from the same server.
Skipped (with the reason) only when Chromium or Playwright is missing; ``scripts/setup.sh`` installs both, and
CI sets ``GRADSTORE_REQUIRE_BROWSER=1`` so that there a missing browser fails instead of skipping.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
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
MANY = 32  # checkpoints of the many-checkpoint run
CARD_MAX_PX = 400  # a result card stays below this height whatever the number of checkpoints


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


@contextlib.contextmanager
def _serve(app, port: int) -> Iterator[str]:
    """``app`` under uvicorn in a thread on loopback ``port``; yields its URL once it answers ``/readyz``."""
    import uvicorn

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
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def live(demo_config):
    """The app of ``gradstore serve --config <demo run.toml>`` under uvicorn in a thread, on a free loopback port.

    (tests/test_server.py covers the ``gradstore serve`` subprocess; a thread saves re-importing torch here.) No
    file watch (``watch_s = 0``; tests/test_http_hardening.py and tests/test_integrity_serving.py cover it): its
    content re-check hashes the run's files all along, which slowed the text runs built meanwhile 2-3x on 2 cores.
    """
    from gradstore.server.http.app import create_app
    from gradstore.server.run.config import RunConfig, ServerConfig

    port = _free_port()
    settings = ServerConfig(host="127.0.0.1", port=port, watch_s=0)
    app = create_app(RunConfig.load(demo_config), settings=settings)
    app.state.api_key = None  # no API key, whatever GRADSTORE_API_KEY says
    with _serve(app, port) as url:
        yield SimpleNamespace(url=url, app=app)


@pytest.fixture(scope="module")
def text_live(tmp_path_factory):
    """A tiny word-level LM run (tests/helpers/text_run.py: describe gives text, source, words) served in a thread."""
    from gradstore.server.http.app import create_app
    from gradstore.server.run.config import ServerConfig

    from .helpers.text_run import build_text_run

    run = build_text_run(tmp_path_factory.mktemp("text-run"))
    port = _free_port()
    app = create_app(engine=run.engine(), settings=ServerConfig(host="127.0.0.1", port=port))
    app.state.api_key = None
    with _serve(app, port) as url:
        yield SimpleNamespace(url=url, app=app, run=run)


@pytest.fixture(scope="module")
def many_live(tmp_path_factory):
    """A text run with 32 checkpoints under a cosine lr schedule (tests/helpers/many_checkpoints.py), whose Task
    has no ``describe_positions``, served in a thread."""
    from gradstore.server.http.app import create_app
    from gradstore.server.run.config import ServerConfig

    from .helpers.many_checkpoints import build_many_checkpoint_run

    run, engine = build_many_checkpoint_run(tmp_path_factory.mktemp("many-checkpoints"), n=MANY)
    port = _free_port()
    app = create_app(engine=engine, settings=ServerConfig(host="127.0.0.1", port=port))
    app.state.api_key = None
    with _serve(app, port) as url:
        yield SimpleNamespace(url=url, app=app, run=run)


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the tests save screenshots: ``$GRADSTORE_SCREENSHOTS`` if set (to look at them), else a tmp folder."""
    explicit = os.environ.get("GRADSTORE_SCREENSHOTS")
    if explicit:
        Path(explicit).mkdir(parents=True, exist_ok=True)
        return Path(explicit)
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture(scope="module")
def server_url(live) -> str:
    return live.url


@pytest.fixture()
def page_problems() -> list[str]:
    """Uncaught exceptions and console errors of the test's page (a test expecting one removes it)."""
    return []


@contextlib.contextmanager
def _dashboard(browser, url: str, problems: list[str]) -> Iterator:
    """A fresh page on the dashboard at ``url``, with the run info loaded; fails the test on any page error."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("pageerror", lambda exc: problems.append(f"uncaught: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console.{msg.type}: {msg.text} ({msg.location.get('url', '')})")
            if msg.type == "error" and "favicon" not in msg.location.get("url", "")
            else None
        ),
    )
    page.goto(f"{url}/")
    sync_api.expect(page.locator("#run-info")).to_contain_text("examples", timeout=TIMEOUT_MS)
    try:
        yield page
    finally:
        context.close()
    assert not problems, "errors in the page:\n" + "\n".join(problems)


@pytest.fixture()
def page(browser, server_url, page_problems):
    """The dashboard on the digits demo run."""
    with _dashboard(browser, server_url, page_problems) as page:
        yield page


@pytest.fixture()
def text_page(browser, text_live, page_problems):
    """The dashboard on the text run."""
    with _dashboard(browser, text_live.url, page_problems) as page:
        yield page


@pytest.fixture()
def many_page(browser, many_live, page_problems):
    """The dashboard on the 32-checkpoint run."""
    with _dashboard(browser, many_live.url, page_problems) as page:
        yield page


# -- helpers -----------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """How the dashboard writes a number (its ``fmt``): 4 significant digits without trailing zeros, scientific
    notation outside 1e-3 <= |x| < 1e4 (``0.03193``, ``160.8``, ``1.235e-7``, ``-2.5e+5``)."""
    if x == 0:
        return "0"
    rounded = float(f"{x:.4g}")  # the digits of JavaScript's toPrecision(4)
    if 1e-3 <= abs(rounded) < 1e4:
        shown = repr(rounded)
        return shown.removesuffix(".0")
    mantissa, exponent = f"{x:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent):+d}"


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
    for card, item in zip(cards, expected):
        ex, score_text = item["example"], _fmt(item["score"])
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


def test_test_digit_query_renders_the_apis_proponents_and_opponents(page, server_url, screenshots):
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
    shot = screenshots / "digits-view.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


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
    """A client mistake (a test index past the end) shows the server's 4xx message on the page, and the previous
    query's results are gone (nothing on screen may look like the answer to the failed query)."""
    page.fill("#test-index", "3")
    page.fill("#top-k", "3")
    page.click("#run-query")
    sync_api.expect(page.locator("#proponents .card")).to_have_count(3)
    page.fill("#test-index", "100000")
    page.click("#run-query")
    sync_api.expect(page.locator("#query-error")).to_contain_text("422")
    sync_api.expect(page.locator("#query-error")).to_contain_text("test_index")
    assert page.is_enabled("#run-query")
    for panel in ("#query-panel", "#proponents-panel", "#opponents-panel"):
        assert not page.is_visible(panel), f"{panel} still shows the previous query's results"
    assert page.locator("#proponents .card, #opponents .card, #query-card > *").count() == 0
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


def test_json_payload_mode_on_the_digits_run(page, server_url):
    """The JSON box is there on every run (prefilled with the run's kind of payload); text modes are not offered."""
    assert _enabled_modes(page) == ["test", "draw", "json"]
    page.select_option("#mode", "json")
    assert page.is_visible("#query-json") and not page.is_visible("#test-index")
    assert json.loads(page.input_value("#query-json")) == {"test_index": 0}
    page.fill("#query-json", '{"test_index": 5}')
    page.fill("#top-k", "3")
    with page.expect_request("**/v1/influence") as sent:
        page.click("#run-query")
    assert sent.value.post_data_json == {"queries": [{"test_index": 5}], "top_k": 3}
    sync_api.expect(page.locator("#proponents .card")).to_have_count(3)
    answer = _api(server_url, "/v1/influence", sent.value.post_data_json)["results"][0]
    assert [c["id"] for c in _rendered_cards(page, "proponents")] == [p["id"] for p in answer["proponents"]]


# -- the text view (issue 10, test 5) ----------------------------------------------------------------------

FOLD_CHARS = 240  # the dashboard folds texts longer than this behind a "more" toggle
SIGN_NOTE = {"proponents": "score ≤ 0: not a proponent", "opponents": "score ≥ 0: not an opponent"}
ROLE = {"proponents": "proponent", "opponents": "opponent"}
TEXT_QUERY = "the capital of france is paris ."


def _enabled_modes(page) -> list[str]:
    return page.eval_on_selector("#mode", "(s) => [...s.options].filter((o) => !o.disabled).map((o) => o.value)")


def _text_cards(page, grid: str) -> list[dict]:
    """What each card of ``#<grid>`` shows: id, score, text fields (shown text, folded), key-values, sign mark."""
    return page.evaluate(
        """(grid) => [...document.querySelectorAll(`#${grid} .card`)].map((card) => ({
            id: Number(card.dataset.id),
            score: card.querySelector(".meta > .score")?.textContent,
            texts: Object.fromEntries([...card.querySelectorAll(".field")].map((f) => [f.dataset.key, {
              shown: f.querySelector(".text").textContent,
              folded: f.querySelector(".text").classList.contains("folded"),
              more: f.querySelector("button.more")?.textContent ?? null,
            }])),
            kv: Object.fromEntries([...card.querySelectorAll(".kv > div")].map(
              (d) => [d.querySelector("dt").textContent, d.querySelector("dd").textContent])),
            wrong: card.classList.contains("wrong-sign"),
            badge: card.querySelector(".badge.sign")?.textContent ?? null,
            explain: card.querySelector(".explain-button") !== null,
            bars: card.querySelectorAll(".bar").length,
            visible: card.offsetParent !== null,
          }))""",
        grid,
    )


def _wrong_sign(item: dict, grid: str) -> bool:
    return not item["score"] > 0 if grid == "proponents" else not item["score"] < 0


def _check_text_cards(page, grid: str, expected: list[dict], unfolded: bool = False) -> list[dict]:
    """The cards of ``#<grid>`` show ``expected`` (the API's influences) in order: text (folded when long and not
    ``unfolded``), key-values, and the sign mark exactly on the items whose score has the other sign."""
    cards = _text_cards(page, grid)
    assert [c["id"] for c in cards] == [e["id"] for e in expected], f"{grid}: card ids differ from the API's"
    for card, item in zip(cards, expected):
        ex, where, score_text = item["example"], f"{grid} card #{item['id']}", _fmt(item["score"])
        assert card["visible"] and card["score"] == score_text, where
        assert list(card["texts"]) == ["text"], f"{where}: text fields {list(card['texts'])}"
        shown, full = card["texts"]["text"], ex["text"]
        if len(full) > FOLD_CHARS and not unfolded:
            assert shown["folded"] and shown["more"] == "more", f"{where}: a {len(full)}-char text is not folded"
            head = shown["shown"].removesuffix(" …")
            assert head != shown["shown"] and full.startswith(head) and len(head) <= FOLD_CHARS, where
        else:
            assert shown["shown"] == full and not shown["folded"], f"{where}: shows {shown['shown']!r}"
            assert shown["more"] == ("less" if len(full) > FOLD_CHARS else None), where
        assert card["kv"] == {"source": ex["source"], "words": str(ex["words"])}, f"{where}: key-values"
        wrong = _wrong_sign(item, grid)
        assert card["wrong"] == wrong, f"{where}: score {item['score']} but sign mark {card['wrong']}"
        assert card["badge"] == (SIGN_NOTE[grid] if wrong else None), where
        if item.get("role") is not None:
            assert (item["role"] != ROLE[grid]) == wrong, f"{where}: role {item['role']} disagrees with the sign"
        assert card["explain"], f"{where}: no per-token button"
        assert card["bars"] == len(item["contributions"]), where
    return cards


def test_text_query_renders_texts_key_values_and_sign_marks(text_page, text_live, screenshots):
    """A text run: text mode is chosen, the typed text is sent as ``{"text": ...}``, and every proponent and
    opponent shows its text (long ones folded, unfolded by "more"), its key-values and, where the score has the
    other sign (top k = every example here), the mark that it did not push that way."""
    page, url = text_page, text_live.url
    n = len(text_live.run.task.docs)
    assert page.input_value("#mode") == "text" and _enabled_modes(page) == ["text", "prompt", "json"]
    assert page.is_visible("#query-text") and not page.is_visible("#test-index") and not page.is_visible("#draw")
    page.fill("#query-text", TEXT_QUERY)
    page.fill("#top-k", str(n))
    with page.expect_request("**/v1/influence") as sent:
        page.click("#run-query")
    body = {"queries": [{"text": TEXT_QUERY}], "top_k": n}  # no lr_weighting: the index's default
    assert sent.value.post_data_json == body
    sync_api.expect(page.locator("#proponents .card")).to_have_count(n)
    sync_api.expect(page.locator("#opponents .card")).to_have_count(n)
    assert page.text_content("#query-error") == ""
    assert page.text_content("#query-card .field[data-key=text] .text") == TEXT_QUERY

    result = _api(url, "/v1/influence", body)["results"][0]
    for grid in ("proponents", "opponents"):
        items = result[grid]
        assert page.evaluate("(g) => document.getElementById(g).classList.contains('list')", grid)  # one per row
        _check_text_cards(page, grid, items)
        wrong = [_wrong_sign(item, grid) for item in items]
        assert 0 < sum(wrong) < n and wrong == sorted(wrong), f"{grid}: the wrong-signed ones are not all last"
        note = f"· {n - sum(wrong)} of {n} with a {'positive' if grid == 'proponents' else 'negative'} score"
        assert page.text_content(f"#{grid}-note") == note
        divider = page.locator(f"#{grid} > .sign-divider")
        sync_api.expect(divider).to_have_count(1)
        assert page.evaluate(
            "(g) => [...document.getElementById(g).children].findIndex((c) => c.classList.contains('sign-divider'))",
            grid,
        ) == wrong.index(True)
    long = [p for p in result["proponents"] if len(p["example"]["text"]) > FOLD_CHARS]
    assert long and len(long) < n, "the run should have long and short documents"

    # task text is text: the HTML-like document shows its markup literally and runs nothing
    from .helpers.text_run import HTML_DOC

    html_card = page.locator("#proponents .card", has_text="notes on markup")
    assert html_card.locator(".field .text").text_content() == HTML_DOC
    assert page.locator("#proponents img, #opponents img, #proponents .field b").count() == 0
    assert page.evaluate("window.__gradstore_xss") is None

    shot = screenshots / "text-view.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    for toggle in page.locator("#proponents button.more").all():  # unfold every long text
        toggle.click()
    _check_text_cards(page, "proponents", result["proponents"], unfolded=True)
    page.locator("#proponents button.more").first.click()  # "less" folds it again
    sync_api.expect(page.locator("#proponents .text.folded")).to_have_count(1)


def test_prompt_completion_and_json_modes(text_page, text_live, page_problems):
    """Prompt/completion boxes send ``{"prompt", "completion"}``; the JSON box sends its object, and a payload that
    is not one JSON object is refused on the page without a request."""
    page, url = text_page, text_live.url
    page.select_option("#mode", "prompt")
    assert page.is_visible("#query-prompt") and page.is_visible("#query-completion")
    assert not page.is_visible("#query-text")
    page.fill("#query-prompt", "the capital of italy is")
    page.fill("#query-completion", "rome")
    page.fill("#top-k", "3")
    assert page.text_content("#prompt-preview") == "sent as: the capital of italy is rome"
    with page.expect_request("**/v1/influence") as sent:
        page.click("#run-query")
    query = {"prompt": "the capital of italy is", "completion": " rome"}  # the space the model must see
    assert sent.value.post_data_json == {"queries": [query], "top_k": 3}
    sync_api.expect(page.locator("#proponents .card")).to_have_count(3)
    result = _api(url, "/v1/influence", sent.value.post_data_json)["results"][0]
    _check_text_cards(page, "proponents", result["proponents"])
    _check_text_cards(page, "opponents", result["opponents"])
    echo = "#query-card .field[data-key=prompt-completion]"
    assert page.text_content(f"{echo} .text") == "the capital of italy is rome"
    assert page.text_content(f"{echo} .prompt") == query["prompt"]
    assert page.text_content(f"{echo} .completion") == query["completion"]
    assert page.evaluate(f"getComputedStyle(document.querySelector('{echo} .completion')).fontWeight") == "600"

    page.select_option("#mode", "json")
    assert json.loads(page.input_value("#query-json")) == {"text": ""}
    page.fill("#query-json", '{"text": "the trains to rome are fast"}')
    with page.expect_request("**/v1/influence") as sent:
        page.click("#run-query")
    assert sent.value.post_data_json["queries"] == [{"text": "the trains to rome are fast"}]
    sync_api.expect(page.locator("#query-card .field[data-key=text] .text")).to_have_text("the trains to rome are fast")

    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url) if "/v1/influence" in request.url else None)
    for text, message in (("{not json", "JSON payload"), ("[1, 2]", "must be one object")):
        page.fill("#query-json", text)
        page.click("#run-query")
        sync_api.expect(page.locator("#query-error")).to_contain_text(message)
    page.select_option("#mode", "text")
    page.fill("#query-text", "  ")
    page.click("#run-query")
    sync_api.expect(page.locator("#query-error")).to_contain_text("type a text")
    assert requests == [] and page.is_enabled("#run-query")


def _fulfil_json(route, data, status: int = 200) -> None:
    route.fulfill(status=status, content_type="application/json", body=json.dumps(data))


def test_sign_marking_from_role_or_from_the_score_alone(text_page, text_live):
    """Rows are marked by their score's sign whether the server sends ``role`` or not (an older server), and a
    zero score is marked in both lists."""
    page, url = text_page, text_live.url
    body = {"queries": [{"text": TEXT_QUERY}], "top_k": 3, "lr_weighting": "schedule"}
    answer = _api(url, "/v1/influence", body)
    result = answer["results"][0]
    pos, neg = result["proponents"], result["opponents"]
    assert all(p["score"] > 0 for p in pos) and all(o["score"] < 0 for o in neg)

    def without_role(item: dict, **changes) -> dict:
        return {k: v for k, v in {**item, **changes}.items() if k != "role"}

    result["proponents"] = [
        pos[0],
        without_role(pos[1]),
        {**pos[2], "score": 0.0, "role": "neutral"},
        without_role(neg[0]),
    ]
    result["opponents"] = [neg[0], without_role(neg[1]), without_role(neg[2], score=0.0), {**pos[0]}]
    page.route("**/v1/influence", lambda route: _fulfil_json(route, answer))
    page.fill("#query-text", TEXT_QUERY)
    page.click("#run-query")
    sync_api.expect(page.locator("#opponents .card")).to_have_count(4)
    for grid, expected in (("proponents", [False, False, True, True]), ("opponents", [False, False, True, True])):
        cards = _text_cards(page, grid)
        assert [c["wrong"] for c in cards] == expected, grid
        assert [c["badge"] for c in cards] == [SIGN_NOTE[grid] if w else None for w in expected], grid
        assert page.text_content(f"#{grid}-note") == (
            f"· 2 of 4 with a {'positive' if grid == 'proponents' else 'negative'} score"
        )


def _png_base64(width: int, height: int, rgb: tuple[int, int, int]) -> str:
    """A valid RGB PNG file of one colour, base64-encoded."""
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def test_generic_renderer_images_and_key_values(text_page, text_live, screenshots):
    """Whatever describe returns: a nested 2-D array, a flat square ``pixels`` list in 0..1, an image larger than
    the card, PNG data (a data URL or bare base64), a long string, and other fields as escaped key-values."""
    page, url = text_page, text_live.url
    answer = _api(url, "/v1/influence", {"queries": [{"text": TEXT_QUERY}], "top_k": 2})
    item = answer["results"][0]["proponents"][0]
    wide = [[(r * 20 + c) % 256 for c in range(20)] for r in range(12)]  # 12 x 20 in 0..255
    flat = [round(i / 255, 4) for i in range(256)]  # 16 x 16 in 0..1
    big = [[(r + c) % 2 for c in range(100)] for r in range(100)]  # larger than the 64 px box
    png = _png_base64(3, 2, (200, 30, 40))
    caption = "a long caption " * 20
    described = {
        "label": "cat",
        "image": wide,
        "pixels": flat,
        "big": big,
        "thumb": f"data:image/png;base64,{png}",
        "raw_png": png,
        "caption": caption,
        "meta": {"w": 20, "note": "<b>x</b>"},
        "ok": True,
        "ratio": 0.123456,
        "name": "<script>window.__gradstore_xss = 2</script>",
    }
    answer["results"][0]["proponents"] = [{**item, "example": described}]
    answer["results"][0]["opponents"] = []
    page.route("**/v1/influence", lambda route: _fulfil_json(route, answer))
    page.fill("#query-text", TEXT_QUERY)
    page.click("#run-query")
    card = page.locator("#proponents .card")
    sync_api.expect(card).to_have_count(1)
    page.wait_for_function("[...document.querySelectorAll('#proponents img')].every((i) => i.complete)")
    shown = page.evaluate(
        """() => {
          const card = document.querySelector("#proponents .card");
          const canvases = [...card.querySelectorAll(".media canvas")].map((c) => {
            const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            return { w: c.width, h: c.height, css: c.style.width, data: [...data].filter((_, i) => i % 4 === 0) };
          });
          return {
            canvases,
            imgs: [...card.querySelectorAll(".media img")].map((i) => [i.getAttribute("src"), i.naturalWidth]),
            label: card.querySelector(".meta b")?.textContent,
            kv: Object.fromEntries([...card.querySelectorAll(".kv > div")].map(
              (d) => [d.querySelector("dt").textContent, d.querySelector("dd").textContent])),
            caption: card.querySelector(".field[data-key=caption] .text")?.textContent,
            scripts: card.querySelectorAll("script, b:not(.meta b)").length,
          };
        }"""
    )
    (image, pixels, big_canvas) = shown["canvases"]
    assert (image["w"], image["h"]) == (60, 36)  # 3-px cells: the 20-wide side fits 64 px
    assert [image["data"][(r * 3 + 1) * 60 + c * 3 + 1] for r in range(12) for c in range(20)] == [
        v for row in wide for v in row
    ]
    assert (pixels["w"], pixels["h"]) == (64, 64)  # 16 x 16, 4-px cells, 0..1 -> 0..255
    cells = [pixels["data"][(i // 16 * 4 + 2) * 64 + i % 16 * 4 + 2] for i in range(256)]
    assert cells == [round(v * 255) for v in flat]
    assert (big_canvas["w"], big_canvas["h"], big_canvas["css"]) == (100, 100, "64px")
    assert big_canvas["data"][:4] == [0, 255, 0, 255]
    assert shown["imgs"] == [[f"data:image/png;base64,{png}", 3], [f"data:image/png;base64,{png}", 3]]
    assert shown["label"] == "cat"
    assert shown["kv"] == {
        "meta": '{"w":20,"note":"<b>x</b>"}',
        "ok": "true",
        "ratio": "0.1235",
        "name": "<script>window.__gradstore_xss = 2</script>",
    }
    assert shown["caption"] == caption[: caption.rindex(" ", 0, FOLD_CHARS)].rstrip() + " …"
    assert shown["scripts"] == 0 and page.evaluate("window.__gradstore_xss") is None
    shot = screenshots / "generic-renderer.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")


@pytest.mark.parametrize(
    ("status", "detail", "message"),
    [
        (404, "Not Found", "Per-token explanations are not available on this server"),
        (405, "Method Not Allowed", "Per-token explanations are not available on this server"),
        (404, "no training example with id 3", "explain failed: 404: no training example with id 3"),
    ],
)
def test_explain_button_says_what_went_wrong(text_page, page_problems, status, detail, message):
    """A server without ``POST /v1/explain`` (404 / 405) gets a clear message on the row; other errors are shown."""
    page = text_page
    page.route("**/v1/explain", lambda route: _fulfil_json(route, {"detail": detail}, status=status))
    page.fill("#query-text", TEXT_QUERY)
    page.fill("#top-k", "2")
    page.click("#run-query")
    sync_api.expect(page.locator("#proponents .card")).to_have_count(2)
    page.locator("#proponents .explain-button").first.click()
    error = page.locator("#proponents .card").first.locator(".explain-error")
    sync_api.expect(error).to_contain_text(message)
    assert page.is_enabled("#proponents .explain-button >> nth=0")
    expected = [p for p in page_problems if f"status of {status}" in p and "/v1/explain" in p]
    assert len(expected) == 1, page_problems  # Chromium logs the failed fetch itself
    page_problems.remove(expected[0])


def _has_route(app, path: str) -> bool:
    return path in app.openapi()["paths"]


def test_token_highlighting_shows_the_apis_shares(text_page, text_live, screenshots):
    """The "which tokens?" button of a proponent sends the query and the example to ``POST /v1/explain`` and
    colours each token by its share (green toward the query, red away, alpha proportional to |share|), with the rest."""
    if not _has_route(text_live.app, "/v1/explain"):
        pytest.skip("this server has no POST /v1/explain route yet")
    page, url = text_page, text_live.url
    page.select_option("#mode", "prompt")
    query = {"prompt": "the capital of france is", "completion": " paris"}
    page.fill("#query-prompt", query["prompt"])
    page.fill("#query-completion", "paris")  # sent with the space between
    page.fill("#top-k", "3")
    page.select_option("#weighting", "uniform")
    page.click("#run-query")
    sync_api.expect(page.locator("#proponents .card")).to_have_count(3)
    result = _api(url, "/v1/influence", {"queries": [query], "top_k": 3, "lr_weighting": "uniform"})["results"][0]
    top = result["proponents"][0]
    first = page.locator("#proponents .card").first
    with page.expect_request("**/v1/explain") as sent:
        first.locator(".explain-button").click()
    body = {"query": query, "example_id": top["id"], "lr_weighting": "uniform"}
    assert sent.value.post_data_json == body
    answer = _api(url, "/v1/explain", body)
    tokens = answer["tokens"]
    sync_api.expect(first.locator(".tok")).to_have_count(len(tokens))
    spans = first.locator(".tok").evaluate_all(
        "(spans) => spans.map((s) => [s.textContent, Number(s.dataset.share), getComputedStyle(s).backgroundColor])"
    )
    assert [s[0] for s in spans] == [t["text"] for t in tokens]
    assert [s[1] for s in spans] == [t["share"] for t in tokens]
    scale = max(abs(t["share"]) for t in tokens)
    for text, share, colour in spans:
        r, g, b, *alpha = (float(v) for v in re.findall(r"[\d.]+", colour))
        alpha_value = alpha[0] if alpha else 1.0
        assert (r, g, b) == ((26, 127, 55) if share >= 0 else (207, 34, 46)), f"{text!r}: {colour}"
        assert alpha_value == pytest.approx(0.85 * abs(share) / scale, abs=0.006), f"{text!r}: {colour}"
    assert first.locator(".explain-rest").text_content() == _fmt(answer["rest"])
    assert f"score {_fmt(answer['score'])}" in first.locator(".explain-summary").text_content()
    assert sum(t["share"] for t in tokens) + answer["rest"] == pytest.approx(answer["score"], rel=1e-5)
    assert answer["score"] == pytest.approx(top["score"], rel=1e-4)
    shot = screenshots / "token-highlighting.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")
    first.locator(".explain-button").click()  # a second click hides it
    assert not first.locator(".explain-box").is_visible()


# -- real runs: many checkpoints, number formats, errors (issue 18, part 5) -------------------------------------

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?")


def _significant_digits(number: str) -> int:
    mantissa = number.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


def _charts(page, grid: str) -> list[dict]:
    """Each card's contribution chart(s): bars (checkpoint, value, drawn height), sizes, resting readout."""
    return page.evaluate(
        """(grid) => [...document.querySelectorAll(`#${grid} .card`)].map((card) => {
            const charts = [...card.querySelectorAll(".contrib svg")];
            const svg = charts[0], box = svg?.getBoundingClientRect(), cardBox = card.getBoundingClientRect();
            return {
              id: Number(card.dataset.id),
              charts: charts.length,
              height: cardBox.height,
              inside: !!box && box.left >= cardBox.left && box.right <= cardBox.right + 0.5,
              chart: box ? [box.width, box.height] : null,
              bars: [...card.querySelectorAll(".contrib rect.bar")].map((r) => ({
                name: r.dataset.checkpoint, value: Number(r.dataset.value), drawn: r.getBBox().height,
                title: r.querySelector("title")?.textContent })),
              readout: card.querySelector(".contrib .readout")?.textContent,
              axis: [...card.querySelectorAll(".contrib .axis span")].map((s) => s.textContent),
            };
          })""",
        grid,
    )


def test_fmt_writes_readable_numbers(many_page):
    """The page's number format: 4 significant digits, no float noise, scientific notation for tiny and huge."""
    cases = [0.031927770900082954, 160.84201, -0.002072222909, 1.23456e-7, -123456.7, 5e-4, 0.0, 1.0, 12.5, 1e-12]
    shown = many_page.evaluate("(xs) => xs.map(fmt)", cases)
    assert shown == ["0.03193", "160.8", "-0.002072", "1.235e-7", "-1.235e+5", "5e-4", "0", "1", "12.5", "1e-12"]
    assert shown == [_fmt(x) for x in cases]


def test_many_checkpoints_one_compact_chart_per_card(many_page, many_live, screenshots):
    """32 checkpoints: every card has ONE chart with a bar per checkpoint (the API's contributions, in order,
    heights in proportion) and stays under CARD_MAX_PX; hovering a bar names the checkpoint, its contribution
    and its lr; scores and weights are written with 4 significant digits."""
    page, url = many_page, many_live.url
    run = httpx.get(f"{url}/v1/run", timeout=30).json()
    lrs = {c["name"]: c["lr"] for c in run["checkpoints"]}
    assert len(lrs) == MANY
    sync_api.expect(page.locator("#run-info")).to_contain_text(f"{MANY} checkpoints")
    sync_api.expect(page.locator("#run-info")).to_contain_text("rows checked exact")  # the header's checks stay
    page.fill("#query-text", TEXT_QUERY)
    page.fill("#top-k", "6")
    page.select_option("#weighting", "schedule")
    with page.expect_request("**/v1/influence") as sent:
        page.click("#run-query")
    sync_api.expect(page.locator("#opponents .card")).to_have_count(6)
    answer = _api(url, "/v1/influence", sent.value.post_data_json)
    result = answer["results"][0]

    for grid in ("proponents", "opponents"):
        _check_text_cards(page, grid, result[grid])  # scores as _fmt writes them
        for chart, item in zip(_charts(page, grid), result[grid], strict=True):
            where = f"{grid} card #{item['id']}"
            assert chart["charts"] == 1, f"{where}: {chart['charts']} charts"
            assert chart["height"] < CARD_MAX_PX, f"{where}: {chart['height']:.0f} px tall with {MANY} checkpoints"
            assert chart["inside"] and chart["chart"][1] <= 40, f"{where}: chart {chart['chart']}"
            assert [b["name"] for b in chart["bars"]] == list(item["contributions"]) == list(lrs), where
            assert [b["value"] for b in chart["bars"]] == pytest.approx(list(item["contributions"].values()))
            top = max(abs(v) for v in item["contributions"].values())
            strongest = max(chart["bars"], key=lambda b: abs(b["value"]))
            assert abs(strongest["value"]) == pytest.approx(top)
            scale = strongest["drawn"] / top
            for bar in chart["bars"]:  # heights in proportion to |contribution| (a tiny one is drawn 1.5 units)
                assert bar["drawn"] == pytest.approx(max(abs(bar["value"]) * scale, 1.5), abs=1e-3), where
                assert (
                    bar["title"].startswith(f"{bar['name']} (step ") and f"lr {_fmt(lrs[bar['name']])}" in bar["title"]
                )
            assert chart["readout"] == f"largest: {strongest['name']} {_fmt(strongest['value'])}"
            assert chart["axis"] == ["ckpt-0", f"ckpt-{MANY - 1}"]

    # hover: the tooltip names the checkpoint, its step, contribution (share of the score) and lr
    first, item = page.locator("#proponents .card").first, result["proponents"][0]
    box = first.locator(".contrib svg").bounding_box()
    for i in (4, MANY - 3):
        page.mouse.move(box["x"] + (i + 0.5) / MANY * box["width"], box["y"] + box["height"] / 2)
        name = f"ckpt-{i}"
        value = item["contributions"][name]
        tip = first.locator(".contrib .tip")
        sync_api.expect(tip).to_be_visible()
        step = next(c["step"] for c in run["checkpoints"] if c["name"] == name)
        share = _fmt(100 * value / sum(item["contributions"].values()))
        assert tip.text_content() == (
            f"{name} (step {step}) · contribution {_fmt(value)} ({share}% of the score) · lr {_fmt(lrs[name])}"
        )
        assert first.locator(f".contrib rect.bar.hover[data-checkpoint='{name}']").count() == 1
        cursor_x = first.locator(".contrib rect.cursor").evaluate("(r) => r.getBBox().x")
        bar_x = first.locator(f".contrib rect.bar[data-checkpoint='{name}']").evaluate("(r) => r.getBBox().x")
        assert cursor_x <= bar_x < cursor_x + 10
        tip_box, card_box = tip.bounding_box(), first.bounding_box()
        assert (
            card_box["x"] <= tip_box["x"] and tip_box["x"] + tip_box["width"] <= card_box["x"] + card_box["width"] + 1
        )
    shot = screenshots / "many-checkpoints-card.png"
    page.screenshot(
        path=str(shot),
        clip={
            "x": card_box["x"] - 8,
            "y": card_box["y"] - 8,
            "width": card_box["width"] + 16,
            "height": card_box["height"] + 16,
        },
    )
    print(f"screenshot: {shot}")
    page.mouse.move(0, 0)
    sync_api.expect(first.locator(".contrib .tip")).to_be_hidden()

    # weights: a range and a folded list of 4-significant-digit numbers, not a JSON dump of 16-digit floats
    stats = page.text_content("#query-stats")
    weights = answer["weights"]
    assert f"weights {_fmt(min(weights.values()))}–{_fmt(max(weights.values()))} ({MANY} checkpoints)" in stats
    assert not page.is_visible("#query-stats details.weights ul")
    page.click("#query-stats details.weights summary")
    items = page.locator("#query-stats details.weights li").all_text_contents()
    assert items == [f"{name}: {_fmt(w)}" for name, w in weights.items()]
    texts = page.evaluate(
        """() => { const walk = document.createTreeWalker(document.getElementById("view-query"), NodeFilter.SHOW_TEXT);
          const out = []; while (walk.nextNode()) out.push(walk.currentNode.textContent); return out; }"""
    )  # each text node apart ("#3" and "60.52" are two)
    numbers = [n for text in texts for n in NUMBER.findall(text)]
    long = [n for n in numbers if _significant_digits(n) > 4]
    assert numbers and not long, f"numbers with more than 4 significant digits on the page: {long}"
    assert len(page.text_content("#query-stats")) < 80 + 20 * MANY
    full = screenshots / "many-checkpoints-page.png"
    page.screenshot(path=str(full), full_page=True)
    print(f"screenshot: {full}")
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height < 2500, f"the page is {height} px tall for 6 + 6 results"


def test_many_checkpoints_in_the_grid_layout(many_page, many_live, screenshots):
    """Image cards (the grid of 150-px cards) keep the chart inside the card and stay compact with 32 checkpoints;
    the self-influence tab draws the same chart."""
    page, url = many_page, many_live.url
    answer = _api(url, "/v1/influence", {"queries": [{"text": TEXT_QUERY}], "top_k": 8})
    digit = {"label": 3, "pixels": [(i * 7) % 17 for i in range(64)]}
    for grid in ("proponents", "opponents"):
        answer["results"][0][grid] = [{**p, "example": digit} for p in answer["results"][0][grid]]
    page.route("**/v1/influence", lambda route: _fulfil_json(route, answer))
    page.fill("#query-text", TEXT_QUERY)
    page.click("#run-query")
    sync_api.expect(page.locator("#proponents .card")).to_have_count(8)
    assert not page.evaluate("document.getElementById('proponents').classList.contains('list')")
    for chart in _charts(page, "proponents") + _charts(page, "opponents"):
        assert chart["charts"] == 1 and len(chart["bars"]) == MANY
        assert chart["inside"], f"card #{chart['id']}: the chart overflows the card"
        assert chart["height"] < CARD_MAX_PX / 2, f"card #{chart['id']}: {chart['height']:.0f} px"
    shot = screenshots / "many-checkpoints-grid.png"
    page.locator("#proponents-panel").screenshot(path=str(shot))
    print(f"screenshot: {shot}")

    page.click("#tab-self")
    page.fill("#self-k", "5")
    page.click("#run-self")
    sync_api.expect(page.locator("#self-list .card")).to_have_count(5)
    self_answer = _api(url, "/v1/self-influence", {"top_k": 5})
    for chart, item in zip(_charts(page, "self-list"), self_answer["results"], strict=True):
        assert chart["charts"] == 1 and chart["height"] < CARD_MAX_PX
        assert [b["value"] for b in chart["bars"]] == pytest.approx(list(item["contributions"].values()))


def test_an_error_clears_the_previous_results(many_page, page_problems):
    """After any error (the server's 4xx, a payload refused on the page, a 500 on the self-influence tab) the
    previous answer is gone, not left on screen looking like the answer to the failed query."""
    page = many_page

    def query_ok() -> None:
        page.select_option("#mode", "text")
        page.fill("#query-text", TEXT_QUERY)
        page.fill("#top-k", "3")
        page.click("#run-query")
        sync_api.expect(page.locator("#proponents .card")).to_have_count(3)
        assert page.is_visible("#query-panel") and page.text_content("#query-error") == ""

    def cleared(message: str) -> None:
        sync_api.expect(page.locator("#query-error")).to_contain_text(message)
        for panel in ("#query-panel", "#proponents-panel", "#opponents-panel"):
            assert not page.is_visible(panel), f"{panel} still shows the previous results after: {message}"
        assert page.locator("#proponents .card, #opponents .card, #query-card > *").count() == 0
        assert page.text_content("#query-stats") == ""

    query_ok()
    page.select_option("#mode", "json")
    page.fill("#query-json", '{"nope": 1}')  # the Task refuses it: 422
    page.click("#run-query")
    cleared("422")
    query_ok()
    page.select_option("#mode", "prompt")
    page.fill("#query-prompt", "")
    page.click("#run-query")  # refused on the page, no request
    cleared("type a prompt")
    query_ok()  # and the page works again

    page.click("#tab-self")
    page.fill("#self-k", "3")
    page.click("#run-self")
    sync_api.expect(page.locator("#self-list .card")).to_have_count(3)
    page.route("**/v1/self-influence", lambda route: _fulfil_json(route, {"detail": "index reloading"}, status=503))
    page.click("#run-self")
    sync_api.expect(page.locator("#self-error")).to_contain_text("503: index reloading")
    assert not page.is_visible("#self-panel") and page.locator("#self-list .card").count() == 0
    for status, path in ((422, "/v1/influence"), (503, "/v1/self-influence")):
        expected = [p for p in page_problems if f"status of {status}" in p and path in p]
        assert len(expected) == 1, page_problems
        page_problems.remove(expected[0])


def _query(page) -> dict:
    """Clicks "Find influences" and waits for the answer to be drawn; the request's body."""
    with page.expect_request("**/v1/influence") as sent:
        page.click("#run-query")
    sync_api.expect(page.locator("#proponents-panel")).not_to_have_class(re.compile("stale|hidden"))
    return sent.value.post_data_json


def test_prompt_completion_echo_keeps_the_space(many_page, many_live):
    """The prompt/completion echo is the text as the model reads it: prompt then completion, as concatenated. The
    page puts one space between them (unless one is there, or the box is unticked), as a tokenizer must see it."""
    page = many_page
    page.select_option("#mode", "prompt")
    page.fill("#query-prompt", "the capital of spain is")
    page.fill("#query-completion", "madrid")
    assert page.text_content("#prompt-preview") == "sent as: the capital of spain is madrid"
    assert _query(page)["queries"] == [{"prompt": "the capital of spain is", "completion": " madrid"}]
    echo = page.locator("#query-card .field[data-key=prompt-completion] .text")
    sync_api.expect(echo).to_have_text("the capital of spain is madrid")
    assert page.locator("#query-card .field").count() == 1

    page.fill("#query-prompt", "the capital of spain is ")  # a space already there: nothing added
    assert _query(page)["queries"][0]["completion"] == "madrid"
    sync_api.expect(echo).to_have_text("the capital of spain is madrid")

    page.uncheck("#join-space")  # sent as typed, and the echo shows what was sent
    page.fill("#query-prompt", "the capital of spain is")
    assert page.text_content("#prompt-preview") == "sent as: the capital of spain ismadrid"
    assert _query(page)["queries"][0] == {"prompt": "the capital of spain is", "completion": "madrid"}
    sync_api.expect(echo).to_have_text("the capital of spain ismadrid")
    page.check("#join-space")

    # an HF causal-LM Task describes {text, prompt, completion}: one line, the text not repeated; a Task whose
    # text differs from the concatenation shows its text as well
    answer = _api(many_live.url, "/v1/influence", {"queries": [{"text": TEXT_QUERY}], "top_k": 2})
    hf = {"text": "the capital of vunaton is vunaton", "prompt": "the capital of vunaton is", "completion": " vunaton"}
    for query, fields in (
        (hf, ["prompt-completion"]),
        ({**hf, "text": "<s> the capital"}, ["text", "prompt-completion"]),
    ):
        answer["results"][0]["query"] = query
        page.unroute("**/v1/influence")
        page.route("**/v1/influence", lambda route: _fulfil_json(route, answer))
        page.fill("#query-completion", "vunaton")
        _query(page)
        sync_api.expect(echo).to_have_text("the capital of vunaton is vunaton")
        keys = page.eval_on_selector_all("#query-card .field", "(fs) => fs.map((f) => f.dataset.key)")
        assert keys == fields


def test_explain_without_position_labels_numbers_the_positions(many_page, many_live):
    """A Task without ``describe_positions``: the API's tokens have ``text: null``; the page shows "pos 3", never
    "null", with the shares (formatted) in the hover titles."""
    page, url = many_page, many_live.url
    page.fill("#query-text", TEXT_QUERY)
    page.fill("#top-k", "2")
    page.click("#run-query")
    sync_api.expect(page.locator("#proponents .card")).to_have_count(2)
    first = page.locator("#proponents .card").first
    with page.expect_request("**/v1/explain") as sent:
        first.locator(".explain-button").click()
    answer = _api(url, "/v1/explain", sent.value.post_data_json)
    tokens = answer["tokens"]
    assert tokens and all(t["text"] is None for t in tokens)
    sync_api.expect(first.locator(".tok")).to_have_count(len(tokens))
    assert first.locator(".tok").all_text_contents() == [f"pos {t['position']}" for t in tokens]
    titles = first.locator(".tok").evaluate_all("(spans) => spans.map((s) => s.title)")
    assert [t.split(" (")[0] for t in titles] == [
        f"position {t['position']} · share {_fmt(t['share'])}" for t in tokens
    ]
    box = first.locator(".explain-box").text_content()
    assert "null" not in box and "undefined" not in box and "NaN" not in box
    assert "no position labels" in box
    assert first.locator(".explain-rest").text_content() == _fmt(answer["rest"])
