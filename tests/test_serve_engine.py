"""The server's side of the engine: prompts checked before they queue, recovery from a failed engine step
(the batch reset, the server answering again), the prefix cache across requests, per-image tile caps."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from PIL import Image
from refmodels import tiny_checkpoint
from test_serve_common import wait_idle

from internvl.api import load
from internvl.engine.sampling import SamplingParams
from internvl.errors import InternVLError
from internvl.serve.app import ServeSettings, create_app
from internvl.serve.conversation import Conversation, ImageRef, build_inputs
from internvl.serve.scheduler import Scheduler
from internvl.serve.schemas import APIError
from internvl.serve.server import serve_in_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ASK = {"model": "tiny", "max_tokens": 4}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return load(tiny_checkpoint(tmp_path_factory.mktemp("serve-engine")))


def test_bad_prompt_is_refused_before_it_queues(llm):
    scheduler = Scheduler(llm.detok)  # not started: a queued request would stay in `pending`

    async def submit(ids):
        return scheduler.submit("r1", ids, SamplingParams(), None)

    with pytest.raises(APIError, match="the prompt is empty") as e:
        asyncio.run(submit([]))
    assert e.value.status == 400 and not scheduler.pending
    image_id = llm.model.image_token_id
    with pytest.raises(APIError, match="image context tokens but 0 tile"):
        asyncio.run(submit([1, image_id, 2]))
    assert not scheduler.pending
    asyncio.run(submit([1, 2, 3]))
    assert len(scheduler.pending) == 1


def test_a_failing_step_fails_its_requests_and_the_server_recovers(llm, monkeypatch):
    with serve_in_thread(create_app(llm, ServeSettings(model_name="tiny"))) as url:
        body = {**ASK, "messages": [{"role": "user", "content": "What color is the circle?"}]}
        first = httpx.post(url + "/v1/chat/completions", json=body, timeout=30).json()
        real = llm.engine.step
        monkeypatch.setattr(llm.engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 500 and "RuntimeError: boom" in r.json()["error"]["message"]
        assert not llm.engine.has_work() and llm.engine.cache is None
        monkeypatch.setattr(llm.engine, "step", real)
        again = httpx.post(url + "/v1/chat/completions", json=body, timeout=30).json()
        assert again["choices"][0]["message"] == first["choices"][0]["message"]
        # the repeated prompt came from the prefix cache (all of it but the last token)
        hits = llm.engine.prefix_cache.hits
        httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert llm.engine.prefix_cache.hits == hits + 1
        wait_idle(url)


def test_each_image_gets_its_own_tile_cap(llm):
    wide, tall = Image.new("RGB", (400, 80), "red"), Image.new("RGB", (60, 300), "blue")
    conv = Conversation(None, [], "Image-1: <image>\nImage-2: <image>\nSame?",
                        [ImageRef("a", 2, "m[0]"), ImageRef("b", None, "m[1]")])  # fmt: skip
    ids, pv = build_inputs(llm, conv, [wide, tall])
    capped = llm.processor(wide, 2).shape[0]
    free = llm.processor(tall, None).shape[0]
    assert capped == 2 + 1 and pv.shape[0] == capped + free  # two tiles plus the thumbnail
    want, want_pv, _ = llm.prepare(conv.question, [wide, tall], max_num=[2, None])
    assert ids == want and pv.equal(want_pv)
    with pytest.raises(InternVLError, match="max_num has 1 entries but there are 2 images"):
        llm.prepare("?", [wide, tall], max_num=[2])
