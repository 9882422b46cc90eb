"""The page at ``GET /`` of ``ponderlm serve`` (docs/SERVING.md, "The page"), in a real browser
(headless Chromium driven by selenium) against a real server process on 127.0.0.1 with an API key,
serving a tiny PonderLM-3 made here.

What is checked: without the key nothing is served (the page and its files answer 401 with a Basic
challenge, the API a 401, and a page that could not load cannot generate); the key is accepted as
the password of HTTP Basic auth everywhere the Bearer key is; with it the page streams a greedy
completion whose token elements carry exactly the depths the API returns for the same request,
shaded by depth, with the mean depth and FLOPs per token that ponderlm.model.flops gives; and the
browser sent no request anywhere but 127.0.0.1. Needs /usr/bin/chromium, /usr/bin/chromedriver
and selenium: without them the browser test fails under CI (environment variable CI set) and is
skipped otherwise.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve import Server, tiny_p3  # noqa: E402

KEY = "page-key-42"
BEARER = {"Authorization": f"Bearer {KEY}"}
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PROMPT = "It was a"
SCREENSHOT = Path("/tmp/notes/page.png")
NETWORK_SCHEMES = ("http", "https", "ws", "wss", "ftp")  # (not the browser's own chrome:// pages of its first tab)


def basic(password: str, user: str = "me") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the server, the model's config): a tiny PonderLM-3 of context 128 behind the key."""
    from ponderlm.loading import load_model

    run = tiny_p3(tmp_path_factory.mktemp("page"), 128)
    cfg = load_model(run)[0].cfg
    s = Server(run, "--api-key", KEY, "--max-batch", "2")
    yield s, cfg
    assert s.stop() == 0


def flops_by_depth(cfg) -> list[float]:
    import torch

    from ponderlm.model.flops import inference_flops

    return [inference_flops(cfg, torch.tensor([[d]])).total for d in range(cfg.max_depth + 1)]


def test_without_the_key_nothing_is_served(served):
    s, _ = served
    for path in ("/", "/page/page.js", "/page/page.css", "/page/icon.svg"):
        for headers in ({}, basic("wrong"), {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Basic !!"}):
            r = httpx.get(s.url + path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.headers["www-authenticate"].startswith('Basic realm="ponderlm"'), path  # the browser asks
            assert s.model not in r.text
    r = httpx.get(f"{s.url}/page/info")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")  # the API: no login prompt
    body = {"model": s.model, "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(f"{s.url}/v1/completions", json=body, headers=basic("wrong")).status_code == 401
    assert httpx.post(f"{s.url}/v1/completions", json=body, headers=basic(KEY[:-1])).status_code == 401


def test_the_key_as_basic_password_is_the_bearer_key(served):
    s, cfg = served
    for headers in (basic(KEY), basic(KEY, user=""), BEARER):
        r = httpx.get(f"{s.url}/", headers=headers)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["cache-control"] == "no-store"
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert "http" not in r.text  # no address anywhere: same origin only
    for path, kind in (("/page/page.js", "text/javascript"), ("/page/page.css", "text/css"),
                       ("/page/icon.svg", "image/svg+xml")):  # fmt: skip
        r = httpx.get(s.url + path, headers=basic(KEY))
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), path
    info = httpx.get(f"{s.url}/page/info", headers=basic(KEY)).json()
    assert info["model"] == s.model and info["method"] == "ponderlm3" and info["max_depth"] == cfg.max_depth
    assert info["flops_per_depth"] == flops_by_depth(cfg)
    body = {"model": s.model, "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(f"{s.url}/v1/completions", json=body, headers=basic(KEY)).json()["usage"]


def reference(s: Server, max_tokens: int) -> tuple[list[str], list[int], dict]:
    """The same request as the page's, from here: (text of each chunk, depths, usage)."""
    body = {"model": s.model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0, "stream_options": {"include_usage": True}}  # fmt: skip
    texts, depths, usage = [], [], None
    with httpx.stream("POST", f"{s.url}/v1/completions", json=body, headers=BEARER, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj["choices"]:
                texts.append(c["text"])
                depths += c["ponder_depths"]
    return texts, depths, usage


def browser(profile: str):
    """Headless Chromium with the system's chromedriver (selenium never fetches one), offline-safe flags."""
    why = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        why.append("the selenium package")
    if why:
        message = f"the page's browser test needs {', '.join(why)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,900", f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=str(CHROMEDRIVER)))


def wait_for(check, timeout: float = 30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_the_page_in_a_browser(served):
    from selenium.webdriver.common.by import By

    s, cfg = served
    with tempfile.TemporaryDirectory() as profile:
        driver = browser(profile)
        try:
            driver.set_script_timeout(30)
            # without the key, or with a wrong one: a 401, which headless Chromium shows as its own
            # error page (a person's browser asks for the key); no page, so nothing to generate with
            host = urlsplit(s.url).netloc
            for url in (f"{s.url}/", f"http://anyone:wrong@{host}/"):
                driver.get(url)
                assert not driver.find_elements(By.ID, "generate")
                assert driver.execute_script("return location.origin") != s.url  # not the server's page
            refused = [m["message"] for m in driver.get_log("browser")]
            assert any("status of 401" in m for m in refused), refused

            # with the key, given as a URL's password (what answering the browser's prompt amounts to)
            driver.get(f"http://anyone:{KEY}@{host}/")
            wait_for(lambda: driver.find_element(By.ID, "generate").is_enabled())
            legend = driver.find_elements(By.CSS_SELECTOR, "#legend li")
            assert [float(li.get_attribute("data-flops")) for li in legend] == flops_by_depth(cfg)
            prompt = driver.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys(PROMPT)
            for field, value in (("max-tokens", "24"), ("temperature", "0")):
                el = driver.find_element(By.ID, field)
                el.clear()
                el.send_keys(value)
            driver.find_element(By.ID, "generate").click()
            wait_for(lambda: driver.find_element(By.ID, "out").get_attribute("data-done"))
            status = driver.find_element(By.ID, "status").text
            assert status.startswith("Done"), status
            toks = driver.execute_script(
                "return [...document.querySelectorAll('#out .tok')].map(e => [Number(e.dataset.depth), "
                "e.textContent, getComputedStyle(e).backgroundColor])"
            )
            stats = {k: driver.find_element(By.ID, k).get_attribute("data-value")
                     for k in ("mean-depth", "flops-depth", "flops-server")}  # fmt: skip
            shown = driver.find_element(By.ID, "mean-depth").text
            if SCREENSHOT.parent.is_dir():  # (a look at the page for a person: /tmp/notes/page.png)
                driver.save_screenshot(str(SCREENSHOT))
            perf = driver.get_log("performance")
            console = driver.get_log("browser")
        finally:
            driver.quit()

    texts, depths, usage = reference(s, 24)
    assert [d for d, _, _ in toks] == depths  # each token element: the API's depth of that token
    assert "".join(t for _, t, _ in toks) == "".join(texts)
    assert len(set(depths)) > 1, depths  # the router did vary the depth (else the colours say nothing)
    colour = {}
    for d, _, bg in toks:
        assert colour.setdefault(d, bg) == bg  # one colour per depth
    assert len(set(colour.values())) == len(colour)  # and a different one for each
    assert float(stats["mean-depth"]) == pytest.approx(sum(depths) / len(depths), rel=1e-12)
    assert shown == f"{sum(depths) / len(depths):.2f}"
    table = flops_by_depth(cfg)
    assert float(stats["flops-depth"]) == pytest.approx(sum(table[d] for d in depths) / len(depths), rel=1e-12)
    assert float(stats["flops-server"]) == pytest.approx(usage["completion_flops"] / usage["completion_tokens"])

    # every request the browser sent went to the server, and nothing was refused by the page's policy
    sent = [json.loads(e["message"])["message"] for e in perf]
    urls = [m["params"]["request"]["url"] for m in sent if m["method"] == "Network.requestWillBeSent"]
    outside = [u for u in urls if urlsplit(u).scheme in NETWORK_SCHEMES and urlsplit(u).hostname != "127.0.0.1"]
    assert urls and not outside, outside
    assert {urlsplit(u).path for u in urls} >= {"/", "/page/page.js", "/page/page.css", "/page/info", "/v1/completions"}
    assert not [m for m in console if "Content Security Policy" in m["message"]], console
