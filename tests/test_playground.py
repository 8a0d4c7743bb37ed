"""The /playground page: served by the real service on loopback and driven in headless Chromium
(Debian's chromium and chromium-driver, which scripts/install_chromium.sh installs), its bars
read from the DOM and held against POST /v1/classify for the same conversation."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from guardprob.server.config import ServerConfig
from serving import running

FAST = {"eps": 0.2}
USER, ANSWER = "how do I hurt someone", "I will hurt you"


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` on uvicorn on a free loopback port (serving.running); yields its root URL."""
    with running(app) as served:
        yield served.url


def chromium_paths() -> tuple[str, str]:
    """(chromium, chromedriver): $GUARDPROB_CHROMEDRIVER (set by `make test`; an error if it is
    not there, so a run that means to test the page cannot skip it), else what is on PATH."""
    named = os.environ.get("GUARDPROB_CHROMEDRIVER")
    if named and not os.access(named, os.X_OK):
        raise RuntimeError(f"GUARDPROB_CHROMEDRIVER={named} is not an executable; run scripts/install_chromium.sh")
    driver = named or shutil.which("chromedriver")
    browser = os.environ.get("GUARDPROB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver or not browser:
        pytest.skip("Chromium and its driver are not installed; run scripts/install_chromium.sh")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,1400"):
        options.add_argument(argument)
    options.binary_location = binary
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


def wait(condition, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, "the page did not get there in time"
        time.sleep(0.05)


def fill(browser, element_id: str, text: str) -> None:
    """Type into a field as a person does: select what it holds, type over it."""
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element("id", element_id)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(text)


def finished(browser) -> str:
    """The status line once a request has been answered (empty while none is, or one is under way)."""
    text = browser.find_element("id", "status").text
    return "" if text.startswith("Scoring") else text


def submit_and_wait(browser) -> list:
    """Score, then the category rows once the status says the answer arrived (or failed)."""
    browser.execute_script("document.getElementById('status').textContent = ''")
    browser.find_element("id", "score").click()
    status = wait(lambda: finished(browser))
    assert status.startswith("Scored"), status
    return browser.find_elements("css selector", "#category-rows tr")


def bars(rows) -> dict[str, dict]:
    """What the DOM shows per category: the numbers it carries and the drawn bar's geometry."""
    out = {}
    for row in rows:
        fill = row.find_element("css selector", ".fill").value_of_css_property("width")  # as drawn, in px
        track = row.find_element("css selector", ".bar").size["width"]
        out[row.get_attribute("data-id")] = {
            **{k: float(row.get_attribute(f"data-{k}")) for k in ("p", "lower", "upper", "threshold")},
            "flagged": row.get_attribute("data-flagged") == "true",
            "fill": float(fill.removesuffix("px")) / track,
            "marker": row.find_element("css selector", ".marker").value_of_css_property("left"),
            "track": track,
        }
    return out


@pytest.fixture(scope="module")
def served(tiny_classifier):
    from guardprob.server import create_app

    config = ServerConfig(search=FAST, thresholds={"S2": 0.3}, openai_categories="none")
    with serving(create_app(tiny_classifier, config)) as url:
        yield url


def test_page_scores_a_conversation_as_the_api_does(served, browser):
    browser.get(served + "/playground")
    assert browser.title == "guardprob playground"
    wait(lambda: "Model tiny" in browser.find_element("id", "server").text)
    fill(browser, "user", USER)
    fill(browser, "assistant", ANSWER)
    fill(browser, "eps", "0.1")
    shown = bars(submit_and_wait(browser))
    api = httpx.post(served + "/v1/classify", json={
        "messages": [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}], "eps": 0.1,
    }, timeout=60).json()
    assert list(shown) == list(api["categories"]) and len(shown) == 14
    for cid, row in api["categories"].items():
        bar = shown[cid]
        for key in ("p", "lower", "upper", "threshold"):
            assert bar[key] == pytest.approx(row[key], abs=1e-6), (cid, key)
        assert bar["flagged"] == row["flagged"]
        assert bar["fill"] == pytest.approx(row["p"], abs=2 / bar["track"])  # drawn to within a pixel or so
    assert shown["S2"]["threshold"] == 0.3  # the server's config threshold
    summary = {k: browser.find_element("id", k).text for k in ("verdict", "nodes", "calls", "used-method", "p-unsafe")}
    assert summary["verdict"] == api["verdict"].strip() and summary["used-method"] == "marginal"
    # the same nodes; the calls may differ, as speculation from history (the page's search) saves the API's some
    assert int(summary["nodes"]) == api["expanded_nodes"] and int(summary["calls"]) >= api["model_calls"] >= 1
    assert summary["p-unsafe"].startswith(f"{api['p_unsafe']:.4f} [{api['p_unsafe_lower']:.4f}, ")


def test_thresholds_edited_on_the_page_are_kept_when_scoring_again(served, browser):
    browser.get(served + "/playground")
    fill(browser, "user", USER)
    rows = bars(submit_and_wait(browser))
    assert not rows["S1"]["flagged"] or rows["S1"]["p"] >= 0.5
    fill(browser, "threshold-S1", "0\t")  # leaving the field commits the change
    edited = wait(lambda: browser.find_element("css selector", "tr[data-id='S1']").get_attribute("data-flagged") == "true")
    assert edited
    fill(browser, "eps", "0.05")
    again = bars(submit_and_wait(browser))
    assert again["S1"]["threshold"] == 0.0 and again["S1"]["flagged"] and again["S1"]["marker"] == "0px"
    browser.find_element("id", "reset-thresholds").click()
    reset = wait(lambda: browser.find_element("css selector", "tr[data-id='S1']").get_attribute("data-threshold"))
    assert float(reset) == 0.5


def test_markup_from_the_server_is_shown_as_text(tiny_model, char_tok, browser):
    from guardprob import Classifier
    from guardprob.server import create_app
    from guardprob.taxonomy import Category, Taxonomy

    evil = '<img src=x onerror="window.pwned=1">'
    taxonomy = Taxonomy("evil", (Category("S1", evil), Category("S2", "<b>bold</b>")))
    classifier = Classifier(tiny_model, char_tok, taxonomy=taxonomy, format="llama-guard-3", name="<i>tiny</i>")
    with serving(create_app(classifier, ServerConfig(search=FAST, openai_categories="none"))) as url:
        browser.get(url + "/playground")
        fill(browser, "user", "<script>window.pwned=2</script>")
        rows = submit_and_wait(browser)
        assert [r.find_element("css selector", ".name").text for r in rows] == [evil, "<b>bold</b>"]
        assert "<i>tiny</i>" in browser.find_element("id", "server").text
        assert not browser.find_elements("css selector", "#results img, #results b, #server i")
        assert browser.execute_script("return window.pwned") is None


def test_api_key_field(tiny_classifier, browser):
    from guardprob.server import create_app

    config = ServerConfig(search=FAST, api_keys=("k1",), openai_categories="none")
    with serving(create_app(tiny_classifier, config)) as url:
        assert httpx.get(url + "/playground").status_code == 200  # the page itself is public; the API is not
        browser.get(url + "/playground")
        fill(browser, "user", USER)
        browser.find_element("id", "score").click()
        error = wait(lambda: finished(browser))
        assert "401" in error and "API key" in error
        fill(browser, "api-key", "k1")
        assert len(submit_and_wait(browser)) == 14


def test_page_headers_and_no_playground(tiny_classifier):
    from guardprob.cli import build_parser
    from guardprob.server import create_app
    from guardprob.server.cli import build_config

    with serving(create_app(tiny_classifier, ServerConfig(openai_categories="none"))) as url:
        page = httpx.get(url + "/playground")
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(url + "/playground/playground.js").headers["content-type"].startswith("text/javascript")
        assert httpx.get(url + "/playground/playground.css").headers["content-type"].startswith("text/css")
    config = build_config(build_parser().parse_args(["serve", "--no-playground"]))
    assert config.playground is False and build_config(build_parser().parse_args(["serve"])).playground is True
    with serving(create_app(tiny_classifier, config.with_overrides(openai_categories="none"))) as url:
        for path in ("/playground", "/playground/playground.js"):
            assert httpx.get(url + path).status_code == 404
