"""`internvl serve` through the official `openai` client on loopback: every answer equals the Python API's."""

from __future__ import annotations

import json

import httpx
import pytest
from PIL import Image
from refmodels import tiny_checkpoint
from test_serve_common import data_url

from internvl.api import load, sampling_params
from internvl.serve.app import ServeSettings, create_app
from internvl.serve.server import serve_in_thread

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gradient(w: int, h: int, seed: int) -> Image.Image:
    im = Image.new("RGB", (w, h))
    im.putdata([((x * 7 + seed * 50) % 256, (y * 5 + seed * 90) % 256, (x * y + seed) % 256)
                for y in range(h) for x in range(w)])  # fmt: skip
    return im


A, B = gradient(120, 70, 1), gradient(60, 90, 2)


def image_part(im: Image.Image, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(im), **extra}}


class Live:
    """A server on a free loopback port and a separately loaded copy of the model to compute expectations."""

    def __init__(self, folder, url: str):
        self.url = url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)
        self.ref = load(folder)

    def expected(self, question, images=None, history=None, system=None, max_num=None, **gen):
        ids, pv, _ = self.ref.prepare(
            question, images, history=history, system_message=system, max_num=max_num
        )
        done = self.ref.detok.generate([(ids, sampling_params(self.ref.defaults, **gen), pv)])[0]
        return done.text.lstrip(), done.seq.finish_reason, len(ids), len(done.seq.output_ids)

    def ask(self, messages, **kw):
        r = self.client.chat.completions.create(model="tiny", messages=messages, **kw)
        c = r.choices[0]
        return c.message.content, c.finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens


def _live(tmp_path_factory, name: str, counting: bool):
    folder = tiny_checkpoint(tmp_path_factory.mktemp(name), counting=counting)
    app = create_app(load(folder), ServeSettings(model_name="tiny"))
    return folder, app


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder, app = _live(tmp_path_factory, "serve-random", counting=False)
    with serve_in_thread(app) as url:
        yield Live(folder, url)


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    folder, app = _live(tmp_path_factory, "serve-counting", counting=True)
    with serve_in_thread(app) as url:
        yield Live(folder, url)


def test_models_list_names_the_served_model(live):
    assert live.client.models.list().data[0].id == "tiny"
    assert live.client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_non_streaming_answer_equals_the_python_api(live):
    got = live.ask([{"role": "user", "content": [{"type": "text", "text": "What color is the circle?"},
                                                 image_part(A)]}], max_tokens=12)  # fmt: skip
    assert got == live.expected("What color is the circle?", [A], max_new_tokens=12)


def test_streaming_sends_role_deltas_finish_and_usage(live):
    messages = [{"role": "user", "content": [image_part(A), {"type": "text", "text": "Describe the image."}]}]
    chunks = list(live.client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, stream=True,
                                                      stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    expected = live.expected("Describe the image.", [A], max_new_tokens=10)
    assert (text, finish, chunks[-1].usage.prompt_tokens) == (expected[0], [expected[1]], expected[2])
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_lines_end_with_done(live):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] == "length"


def test_several_images_go_first_numbered_as_the_model_card(live):
    content = [{"type": "text", "text": "Which image has more red?"}, image_part(A), image_part(B)]
    got = live.ask([{"role": "user", "content": content}], max_tokens=8)
    assert got == live.expected("Which image has more red?", [A, B], max_new_tokens=8)


@pytest.mark.parametrize("placeholder", ["<image>", "<IMAGE_TOKEN>"])
def test_placeholders_in_text_position_the_images(live, placeholder):
    text = f"First {placeholder} then {placeholder}: which is brighter?"
    got = live.ask([{"role": "user", "content": [image_part(A), image_part(B), {"type": "text", "text": text}]}],
                   max_tokens=8)  # fmt: skip
    assert got == live.expected("First <image> then <image>: which is brighter?", [A, B], max_new_tokens=8)


def test_multi_turn_keeps_the_images_of_the_first_turn(live):
    messages = [
        {"role": "user", "content": [image_part(A), {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A gradient."},
        {"role": "user", "content": "And its colors?"},
    ]
    got = live.ask(messages, max_tokens=8)
    history = [("<image>\nWhat is this?", "A gradient.")]
    assert got == live.expected("And its colors?", [A], history=history, max_new_tokens=8)


def test_system_message_replaces_the_default(live):
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Shape?"}]
    got = live.ask(messages, max_tokens=8)
    assert got == live.expected("Shape?", system="Answer in one word.", max_new_tokens=8)
    default = live.ask(messages[1:], max_tokens=8)
    assert default == live.expected("Shape?", max_new_tokens=8) and default[2] != got[2]


def test_max_dynamic_patch_and_detail_cap_the_tiles(live):
    wide = gradient(300, 60, 3)
    for extra, tiles in [({"max_dynamic_patch": 2}, 2), ({"detail": "low"}, 6)]:
        got = live.ask([{"role": "user", "content": [image_part(wide, **extra), {"type": "text", "text": "Wide?"}]}],
                       max_tokens=6)  # fmt: skip
        assert got == live.expected("Wide?", [wide], max_num=tiles, max_new_tokens=6)


def test_seed_and_extra_body_sampling_options(live):
    kw = {
        "max_tokens": 10,
        "temperature": 0.9,
        "top_p": 0.9,
        "seed": 5,
        "extra_body": {"top_k": 20, "repetition_penalty": 1.2},
    }
    messages = [{"role": "user", "content": "Tell a story."}]
    first, second = live.ask(messages, **kw), live.ask(messages, **kw)
    assert first == second
    expected = live.expected("Tell a story.", max_new_tokens=10, temperature=0.9, top_p=0.9, seed=5, top_k=20,
                             repetition_penalty=1.2)  # fmt: skip
    assert first == expected


def test_max_tokens_gives_exactly_that_many_tokens(counting):
    for kw in ({"max_tokens": 7}, {"max_completion_tokens": 4}):
        n = next(iter(kw.values()))
        content, finish, _, used = counting.ask([{"role": "user", "content": "count"}], **kw)
        assert (finish, used) == ("length", n)
        assert content == counting.expected("count", max_new_tokens=n)[0]


def test_stop_strings_cut_the_answer_streaming_or_not(counting):
    full = counting.expected("count", max_new_tokens=30)[0]
    stop = full[5:7]
    messages = [{"role": "user", "content": "count"}]
    content, finish, _, _ = counting.ask(messages, max_tokens=30, stop=stop)
    assert (content, finish) == (full[: full.index(stop)], "stop")
    chunks = counting.client.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                                     stop=["\x7f", stop], stream=True)  # fmt: skip
    chunks = list(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
