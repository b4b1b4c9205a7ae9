"""`GET /status` in a real browser: headless Chromium driven by Selenium (one browser for the module).

An incident as the person on call lives it — a provider killed, another rate-limited, a bad reload — must
show on the open page within 5 s, without reloading it; the page must load nothing from anywhere but
manaproxy and log no console error; with client keys on, it shows nothing until a key is entered, and the
key never appears in a URL. Skipped, saying why, where Chromium or chromedriver cannot start.

`MANAPROXY_SCREENSHOTS=1 pytest tests/test_status_page.py` also writes the screenshots the README shows,
docs/status-page.png (the whole page, desktop) and docs/status-page-phone.png (a phone's first screen);
otherwise they go to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from manaproxy.views.status import CONTENT_SECURITY_POLICY

from .fakes import FakeUpstream, chat_answer, status_reply
from .helpers import CHAT, Proxy, build_config, chat
from .processes import ROOT

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

SCREENSHOTS = {False: ROOT / "docs" / "status-page.png", True: ROOT / "docs" / "status-page-phone.png"}
KEY = "status-page-key-7f3a9c"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("no Chromium and chromedriver here (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1280,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as exc:
        pytest.skip(f"Chromium cannot start here: {exc.msg}")
    yield driver
    driver.quit()


class Page:
    """The browser, driven from a thread: its calls block, and the servers under test run in this loop."""

    def __init__(self, driver: Any, proxy: Proxy) -> None:
        self.driver = driver
        self.proxy = proxy
        self.urls: list[str] = []  # requested since the page was opened (reading the log empties it)

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(call, *args)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, script, *args)

    async def open(self, *, width: int, height: int, mobile: bool = False) -> None:
        await self.run(self.logs, "performance")  # forget what earlier tests requested
        await self.run(self.logs, "browser")
        metrics = {"width": width, "height": height, "deviceScaleFactor": 2 if mobile else 1, "mobile": mobile}
        await self.run(self.driver.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride", metrics)
        await self.run(self.driver.get, self.proxy.root_url + "/status")

    def logs(self, kind: str) -> list[dict[str, Any]]:
        return list(self.driver.get_log(kind))

    async def until(self, script: str, timeout: float = 5.0, what: str = "") -> Any:
        """Poll `script` (a JS expression) until it is truthy; its value."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            value = await self.js("return " + script)
            if value:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not within {timeout}s: {what or script}")
            await asyncio.sleep(0.1)

    async def status_of(self, selector: str) -> str | None:
        return await self.js(
            f"const e = document.querySelector({orjson.dumps(selector).decode()}); return e && e.dataset.status"
        )

    async def requested_urls(self) -> list[str]:
        """Every URL the page asked for (DevTools Network events), since it was opened."""
        for entry in await self.run(self.logs, "performance"):
            message = orjson.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.urls.append(message["params"]["request"]["url"])
        return list(self.urls)

    async def console_errors(self) -> list[str]:
        return [entry["message"] for entry in await self.run(self.logs, "browser") if entry["level"] == "SEVERE"]

    async def screenshot(self, path: Path, *, whole: bool) -> None:
        """The viewport, or the `whole` page."""
        shot = await self.run(
            self.driver.execute_cdp_cmd, "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": whole}
        )
        await self.run(path.write_bytes, base64.b64decode(shot["data"]))


async def incident_proxy(
    make_upstream: Any, make_proxy: Any, **kwargs: Any
) -> tuple[FakeUpstream, FakeUpstream, Proxy]:
    """Providers local (fine), gpu (killed by the test), groq (rate-limited by the test) and openrouter (no
    key); four aliases over them, one with a pool and hedging. Probes run twice a second. Returns (gpu, groq,
    proxy)."""
    local = await make_upstream("local")
    gpu = await make_upstream("gpu")
    groq = await make_upstream("groq")
    for upstream, model in ((local, "qwen2.5:7b"), (gpu, "llama-3.1-70b"), (groq, "llama-3.3-70b")):
        upstream.default = chat_answer(model)
    providers = {
        "local": local,
        "gpu": gpu,
        "groq": {"base_url": groq, "api_key": "gsk-test-1234567890"},
        "openrouter": {"base_url": local, "api_key": "${OPENROUTER_API_KEY}"},
    }
    aliases = {
        "mana/fast-text": {"chain": ["gpu/llama-3.1-70b", "local/qwen2.5:7b"], "description": "Short answers"},
        "mana/long-form": ["groq/llama-3.3-70b", "openrouter/anthropic/claude-3-haiku", "local/qwen2.5:7b"],
        "mana/pooled": {"chain": [["gpu/llama-3.1-70b", "local/qwen2.5:7b"], "groq/llama-3.3-70b"], "hedge_after": 0.8},
        "mana/code": ["local/qwen2.5:7b"],
    }
    health = {"failure_threshold": 1, "probe_interval_seconds": 0.5, "probe_timeout_seconds": 1.0}
    config = build_config(providers, aliases, default="mana/fast-text", health=health)
    return gpu, groq, await make_proxy(config, probes=True, **kwargs)


async def check_clean(page: Page) -> None:
    """Nothing fetched from anywhere but manaproxy; no console error."""
    urls = await page.requested_urls()
    assert any(url.endswith("/v1/health") for url in urls), urls
    outside = [url for url in urls if not url.startswith(page.proxy.root_url + "/") and not url.startswith("data:")]
    assert outside == []
    assert await page.console_errors() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("width", "height", "mobile"),
    [pytest.param(1280, 1000, False, id="desktop"), pytest.param(390, 844, True, id="phone")],
)
async def test_an_incident_shows_on_the_open_page_within_5s(
    browser: Any, make_upstream: Any, make_proxy: Any, tmp_path: Path, width: int, height: int, mobile: bool
) -> None:
    gpu, groq, proxy = await incident_proxy(make_upstream, make_proxy)
    resp = await proxy.client.get("/status")
    assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    page = Page(browser, proxy)
    await page.open(width=width, height=height, mobile=mobile)

    # Every alias and provider is there, and all is well.
    names = await page.until("[...document.querySelectorAll('[data-alias]')].map(e => e.dataset.alias)")
    assert sorted(names) == sorted(proxy.config.aliases)
    for provider in ("local", "gpu", "groq", "openrouter"):
        assert await page.status_of(f"[data-provider='{provider}']") == (
            "unconfigured" if provider == "openrouter" else "healthy"
        )
    assert await page.status_of("#overall") == "healthy"

    # One provider killed: the probes see it, and its row turns red without a reload of the page.
    started = asyncio.get_running_loop().time()
    await gpu.close()
    await page.until("document.querySelector(\"[data-provider='gpu']\").dataset.status === 'unhealthy'", what="gpu red")
    assert asyncio.get_running_loop().time() - started < 5
    red = await page.js(
        "return getComputedStyle(document.querySelector(\"[data-provider='gpu'] .pill\")).backgroundColor"
    )
    assert red == "rgb(197, 48, 48)"
    assert await page.status_of("[data-alias='mana/fast-text']") == "degraded"
    chip = await page.until(
        "document.querySelector(\"[data-alias='mana/fast-text'] [data-status='unhealthy']\")?.textContent",
        what="the kept-out entry",
    )
    assert re.search(r"until \S+, next try \S+", chip), chip

    # Another rate-limited: a request meets its 429 and falls back; the model and the failure both show.
    groq.queue(status_reply(429, "Rate limit reached", headers={"Retry-After": "30"}))
    answered = await proxy.client.post(CHAT, json=chat("mana/long-form"), headers={"X-Request-ID": "req-429-fallback"})
    assert answered.status == 200
    await page.until(
        "document.querySelector(\"[data-model='groq/llama-3.3-70b']\")?.dataset.status === 'rate_limited'",
        what="groq model rate-limited",
    )
    await page.until("document.querySelector(\"[data-request-id='req-429-fallback']\")", what="the fallback listed")
    failure = await page.js("return document.querySelector(\"[data-request-id='req-429-fallback']\").textContent")
    assert "mana/long-form" in failure
    assert "groq/llama-3.3-70b" in failure
    assert "http 429" in failure

    # A bad reload: rejected, with its reason; the old config keeps serving.
    assert not proxy.reload_to(tmp_path, "providers: [oops\n")
    await page.until("document.querySelector('#reloads [data-status=failure]')", what="the rejected reload")
    reload_text = await page.js("return document.querySelector('#reloads').textContent")
    assert "rejected" in reload_text
    assert "aliases.yaml" in reload_text

    # Readable at this size: nothing wider than the window.
    assert await page.js("return document.documentElement.scrollWidth <= window.innerWidth")
    target = SCREENSHOTS[mobile] if os.environ.get("MANAPROXY_SCREENSHOTS") else tmp_path / "status.png"
    await page.screenshot(target, whole=not mobile)
    await check_clean(page)


@pytest.mark.timeout(60)
async def test_with_auth_on_no_data_until_a_key_and_the_key_never_in_a_url(
    browser: Any, make_upstream: Any, make_proxy: Any
) -> None:
    _, _, proxy = await incident_proxy(make_upstream, make_proxy, api_keys=[KEY.encode()])
    page = Page(browser, proxy)
    await page.open(width=1280, height=1000)
    await page.until("!document.querySelector('#keyform').hidden", what="the key form")
    await asyncio.sleep(2.5)  # more than one poll interval: the page must not have asked for anything
    assert await page.js("return document.querySelector('#data').hidden")
    assert await page.js("return document.querySelectorAll('[data-alias], [data-provider]').length") == 0
    assert [url for url in await page.requested_urls() if "/v1/" in url] == []

    field = await page.run(browser.find_element, By.ID, "key")
    await page.run(field.send_keys, KEY + "\n")
    names = await page.until("[...document.querySelectorAll('[data-alias]')].map(e => e.dataset.alias)")
    assert sorted(names) == sorted(proxy.config.aliases)
    assert await page.js("return sessionStorage.getItem('manaproxy.key')") == KEY
    urls = await page.requested_urls()
    assert any(url.endswith("/v1/aliases") for url in urls)
    assert [url for url in urls if KEY in url] == []
    assert KEY not in await page.js("return location.href")
    await check_clean(page)


@pytest.mark.timeout(60)
async def test_the_page_says_when_it_lost_contact(browser: Any, make_upstream: Any, make_proxy: Any) -> None:
    _, _, proxy = await incident_proxy(make_upstream, make_proxy)
    page = Page(browser, proxy)
    await page.open(width=1280, height=1000)
    await page.until("document.querySelector('[data-alias]')", what="the page's data")
    assert await page.js("return document.querySelector('#lost').hidden")
    await proxy.client.server.close()  # manaproxy gone
    banner = await page.until(
        "!document.querySelector('#lost').hidden && document.querySelector('#lost').textContent", what="the banner"
    )
    assert banner.startswith("Lost contact with manaproxy since ")
    assert await page.status_of("#overall") == "unknown"
    assert await page.js("return document.querySelectorAll('[data-alias]').length") == 4  # the last picture stays
