"""Malformed and refused requests get 4xx JSON in the OpenAI error shape that says what is wrong, and the
server keeps answering; time-outs cancel the generation; the API key is enforced."""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest
from refmodels import tiny_checkpoint
from test_serve_common import data_url, png, wait_idle

from internvl.api import load
from internvl.serve.app import ServeSettings, create_app
from internvl.serve.media import MediaPolicy
from internvl.serve.server import serve_in_thread

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
HTTP = httpx.Client(timeout=30)  # one client: creating one per request costs ~0.2 s (its SSL context)
OK = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def with_images(*urls: str, text: str = "What is it?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {**OK, "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve-errors"), counting=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "ok.png").write_bytes(png())
    (d.parent / "outside.png").write_bytes(png())
    return d


@pytest.fixture(scope="module")
def url(folder, media):
    policy = MediaPolicy(allowed_local_dir=media, max_bytes=300_000, max_pixels=100_000)
    settings = ServeSettings(
        model_name="tiny", max_images=2, max_body_bytes=300_000, max_tokens_cap=64, media=policy
    )
    with serve_in_thread(create_app(load(folder), settings)) as base:
        yield base


def post(base: str, body=None, content: bytes | None = None, **kw) -> httpx.Response:
    return HTTP.post(base + "/v1/chat/completions", json=body, content=content, **kw)


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]
    return err


BAD = [
    ("bad json", None, b'{"model": "tiny", "messages": [', 400, ["not valid JSON"]),
    ("messages not a list", {"model": "tiny", "messages": "hi"}, None, 400, ["messages", "valid array"]),
    ("no messages", {"model": "tiny", "messages": []}, None, 400, ["messages", "at least 1"]),
    ("content a number", {**OK, "messages": [{"role": "user", "content": 5}]}, None, 400, ["messages[0].content"]),
    ("max_tokens a word", {**OK, "max_tokens": "many"}, None, 400, ["max_tokens", "integer"]),
    ("temperature out of range", {**OK, "temperature": 7}, None, 400, ["temperature", "less than or equal to 2"]),
    ("unknown role", {**OK, "messages": [{"role": "robot", "content": "x"}]}, None, 400, ["role"]),
    ("unknown part", {**OK, "messages": [{"role": "user", "content": [{"type": "video_url"}]}]}, None, 400,
     ["video_url", "text", "image_url"]),
    ("ends with assistant", {**OK, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     None, 400, ["last message must be a user message"]),
    ("n=2", {**OK, "n": 2}, None, 400, ["n must be 1"]),
    ("min above max", {**OK, "min_tokens": 5}, None, 400, ["min_new_tokens"]),
    ("above the cap", {**OK, "max_tokens": 65}, None, 400, ["cap of 64", "--max-tokens-cap"]),
    ("context", {**OK, "messages": [{"role": "user", "content": "count " * 5000}]}, None, 400, ["context is 4096"]),
    ("stray placeholder", {**OK, "messages": [{"role": "user", "content": "<image> what?"}]}, None, 400, ["<image>"]),
    ("too many images", with_images(*[data_url(png())] * 3), None, 400, ["3 images", "limit of 2", "--max-images"]),
    ("placeholders vs images", with_images(data_url(png()), text="<image> and <image>"), None, 400,
     ["2 <image> placeholder(s)", "1 image(s)"]),
    ("corrupt image", with_images(data_url(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)), None, 400,
     ["messages[0].content[0]", "data URL"]),
    ("invalid base64", with_images("data:image/png;base64,@@@@"), None, 400, ["invalid base64"]),
    ("not base64 data url", with_images("data:image/png,rawbytes"), None, 400, [";base64"]),
    ("too many pixels", with_images(data_url(png(500, 400))), None, 400, ["200000 pixels", "limit of 100000"]),
    ("remote refused", with_images("http://127.0.0.1:9/cat.png"), None, 400, ["remote image URLs are disabled",
                                                                              "--allow-remote-images"]),
    ("outside the media folder", with_images("../outside.png"), None, 400, ["not under the allowed media folder"]),
    ("absolute path outside", with_images("/etc/hostname.png"), None, 400, ["not under the allowed media folder"]),
    ("missing local file", with_images("missing.png"), None, 400, ["no such file"]),
    ("unknown model", {**OK, "model": "gpt-4o"}, None, 404, ["'gpt-4o' does not exist", "'tiny'"]),
    ("body too large", None, b"{" + b" " * 400_000 + b"}", 413, ["above this server's limit of 300000 bytes"]),
]  # fmt: skip


@pytest.mark.parametrize("body,content,status,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_json_that_names_the_problem(url, body, content, status, words):
    headers = {"content-type": "application/json"} if content is not None else None
    assert_error(post(url, body, content, headers=headers), status, *words)
    assert post(url, OK).status_code == 200  # and the server keeps answering


def test_openai_client_surfaces_the_messages(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3)


def test_local_file_under_the_allowed_folder_is_read(url, media):
    for ref in (str(media / "ok.png"), "file://" + str(media / "ok.png"), "ok.png"):
        r = post(url, with_images(ref))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 100  # the image's tokens are in the prompt


def test_unknown_routes_and_methods_answer_in_the_error_shape(url):
    assert_error(HTTP.get(url + "/v1/nothing"), 404, "Not Found")
    assert_error(HTTP.get(url + "/v1/chat/completions"), 405)


# ---- a strict server: API key, a short time-out, remote images allowed ---------------------------


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/ok.png": png(), "/big.png": png(300, 300) + b"\0" * 400_000}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def strict(folder):
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    policy = MediaPolicy(allow_remote=True, max_bytes=300_000, fetch_timeout=5)
    settings = ServeSettings(
        model_name="tiny", api_key="sekret", timeout=0.5, max_tokens_cap=4000, media=policy
    )
    with serve_in_thread(create_app(load(folder), settings)) as base:
        yield base, f"http://127.0.0.1:{images.server_address[1]}"
    images.shutdown()


KEY = {"Authorization": "Bearer sekret"}


def test_api_key_is_required_when_set(strict):
    base, _ = strict
    assert_error(post(base, OK), 401, "API key", "Bearer")
    assert_error(post(base, OK, headers={"Authorization": "Bearer nope"}), 401, "API key")
    assert_error(HTTP.get(base + "/v1/models"), 401)
    assert post(base, OK, headers=KEY).status_code == 200
    assert HTTP.get(base + "/health").status_code == 200 and HTTP.get(base + "/").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=base + "/v1", api_key="sekret").models.list().data[0].id == "tiny"


def test_remote_images_when_enabled_are_fetched_within_limits(strict):
    base, images = strict
    r = post(base, with_images(images + "/ok.png"), headers=KEY)
    assert r.status_code == 200, r.text
    assert_error(
        post(base, with_images(images + "/big.png"), headers=KEY), 400, "above the limit of 300000 bytes"
    )
    assert_error(post(base, with_images(images + "/gone.png"), headers=KEY), 400, "HTTP 404")
    assert_error(post(base, with_images("http://127.0.0.1:9/x.png"), headers=KEY), 400, "download failed")


def test_time_out_answers_408_and_cancels_the_generation(strict):
    base, _ = strict
    long = {**OK, "max_tokens": 3800, "min_tokens": 3800}
    assert_error(post(base, long, headers=KEY), 408, "did not finish within 0.5 s", "cancelled")
    wait_idle(base)
    with HTTP.stream("POST", base + "/v1/chat/completions", json={**long, "stream": True}, headers=KEY) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line]
    assert "did not finish within 0.5 s" in events[-2] and events[-1] == "data: [DONE]"
    wait_idle(base)
    assert post(base, OK, headers=KEY).status_code == 200
