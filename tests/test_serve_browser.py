"""The chat page in headless Chromium (Debian's `chromium`, driven by Playwright): attach an image, ask,
watch the answer stream in, ask a follow-up, and see a server error displayed."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
from PIL import Image
from refmodels import tiny_checkpoint

from internvl.api import load, sampling_params
from internvl.serve.app import ServeSettings, create_app
from internvl.serve.server import serve_in_thread

playwright = pytest.importorskip(
    "playwright.sync_api", reason="pip install playwright (the browser is Debian's)"
)
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory, request):
    request.getfixturevalue("one_torch_thread")
    folder = tiny_checkpoint(tmp_path_factory.mktemp("serve-page"))
    llm = load(folder)
    step = llm.engine.step

    def slow_step():  # a real model's pace (~20 ms a token), so that tokens arrive in separate network reads
        time.sleep(0.02)
        return step()

    llm.engine.step = slow_step
    app = create_app(llm, ServeSettings(model_name="tiny", max_tokens_cap=64))
    with serve_in_thread(app) as url:
        yield url, load(folder)


@pytest.fixture(scope="module")
def page(site):
    with playwright.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(tempfile.mkdtemp(prefix="chromium-"), executable_path=CHROMIUM,
                                                       headless=True, args=FLAGS)  # fmt: skip
        page = context.new_page()
        page.set_default_timeout(20_000)
        yield page
        context.close()


def expected(ref, question, images=None, history=None, max_new_tokens=12) -> str:
    ids, pv, _ = ref.prepare(question, images, history=history)
    done = ref.detok.generate([(ids, sampling_params(ref.defaults, max_new_tokens=max_new_tokens), pv)])[0]
    return done.text.lstrip()


def ask(page, question: str) -> str:
    """Send a question; return the final answer text once its entry is no longer busy."""
    before = page.locator("#log li.assistant").count()
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_function(f"document.querySelectorAll('#log li.assistant').length > {before} && "
                           "!document.querySelector('#log li.assistant:last-child[aria-busy]') && "
                           "!document.getElementById('send').disabled")  # fmt: skip
    return page.eval_on_selector("#log li.assistant:last-child .text", "e => e.textContent")


def test_page_streams_answers_about_an_attached_image(site, page, tmp_path):
    url, ref = site
    image = Image.new("RGB", (96, 64))
    image.putdata([((x * 9) % 256, (y * 13) % 256, 128) for y in range(64) for x in range(96)])
    image.save(tmp_path / "shapes.png")

    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'model: tiny'")
    page.click("summary")  # open the settings
    page.fill("#max-tokens", "12")
    page.set_input_files("#images", str(tmp_path / "shapes.png"))
    page.wait_for_selector("#previews img")
    # record the answer's length at every DOM update: a streamed answer grows piece by piece
    page.evaluate("""window.seen = []; new MutationObserver(() => {
        const a = document.querySelector('#log li.assistant:last-child .text');
        if (a) window.seen.push(a.textContent.length);
    }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})""")
    first = ask(page, "What is in the image?")
    assert first == expected(ref, "What is in the image?", [image]) and first
    growth = sorted(set(page.evaluate("window.seen")))
    assert len(growth) >= 4 and growth[-1] == len(first), growth
    assert page.locator("#log li.user img").count() == 1 and page.locator("#previews img").count() == 0
    assert page.is_hidden("#error")

    second = ask(page, "And the colors?")  # the page sends the history, image included
    assert second == expected(
        ref, "And the colors?", [image], history=[("<image>\nWhat is in the image?", first)]
    )

    page.fill("#max-tokens", "500")  # above the server's cap: the error is shown, the question given back
    page.set_input_files("#images", str(tmp_path / "shapes.png"))
    page.fill("#question", "Once more?")
    page.press("#question", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    assert "max_tokens is 500, above this server's cap of 64" in page.inner_text("#error")
    assert page.input_value("#question") == "Once more?" and page.locator("#previews img").count() == 1
    assert page.locator("#log li").count() == 4 and not page.is_disabled("#send")
