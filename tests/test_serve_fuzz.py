"""Fuzzing `internvl serve` over its request schema: a bounded, seeded run in the normal suite (a few seconds)
and schemathesis on /openapi.json (`slow`). Neither may get a 5xx (nor a stream's server_error event), and a
bystander request running alongside the fuzzing keeps getting its right answer."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from refmodels import tiny_checkpoint
from test_serve_common import data_url, png, wait_idle

from internvl.api import load
from internvl.serve.app import ServeSettings, create_app
from internvl.serve.media import MediaPolicy
from internvl.serve.schemas import ChatCompletionRequest
from internvl.serve.server import serve_in_thread

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEED, CASES = 21, 240
BASE = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BYSTANDER = {"model": "tiny", "messages": [{"role": "user", "content": "count with me"}], "max_tokens": 12}
SCALARS = [None, True, False, 0, 1, -1, 2, 7, 2**31, 2**63, -(2**63) - 1, 2**64, 10**30, 10**400, 0.5, -0.0,
           1e-300, 5e-324, 1e-6, 1e308, -1e308, "", "x", "0", "1e30", "\x00", "é😀", "\ud800", "a" * 3000]  # fmt: skip
CONTAINERS = [[], [None], [1, "a"], {}, {"a": 1}, [[[[[]]]]], {"type": "text"}]
URLS = ["", "data:", "data:image/png;base64,", "data:image/png;base64,@@", "data:image/png;base64,AAAA",
        data_url(png()), data_url(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), "file:///etc/passwd", "../x.png",
        "http://127.0.0.1:9/a.png", "/" * 5000, "\ud800.png"]  # fmt: skip


def hostile(rng: random.Random):
    value = rng.choice(SCALARS + CONTAINERS)
    return [value, value] if rng.random() < 0.1 else value


def fuzz_part(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        return {"type": "text", "text": rng.choice(["what?", "<image>", "<IMAGE_TOKEN>", hostile(rng)])}
    image = {"url": rng.choice(URLS)}
    for key in ("detail", "max_dynamic_patch"):
        if rng.random() < 0.3:
            image[key] = rng.choice(["low", "high", "auto", hostile(rng)])
    return {"type": rng.choice(["image_url", "image_url", "text", "video_url", hostile(rng)]), "image_url": image}


def fuzz_message(rng: random.Random) -> dict:
    role = rng.choice(["user", "user", "assistant", "system", "developer", "tool", hostile(rng)])
    roll = rng.random()
    if roll < 0.3:
        return {"role": role, "content": "hi"}
    parts = [fuzz_part(rng) for _ in range(rng.randint(0, 3))]
    return {"role": role, "content": parts if roll < 0.8 else hostile(rng)}


def fuzz_body(rng: random.Random, fields: list[str]) -> dict:
    """The base request with one to three schema fields (or unknown ones) set to hostile values."""
    body = json.loads(json.dumps(BASE))
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(fields + ["messages", "messages", "unknown_field"])
        if name == "messages":
            body["messages"] = [fuzz_message(rng) for _ in range(rng.randint(0, 4))]
            if rng.random() < 0.5:
                body["messages"].append({"role": "user", "content": "hi"})
        else:
            body[name] = hostile(rng)
    return body


def to_bytes(rng: random.Random, body: dict) -> bytes:
    """JSON of the body (surrogates as \\u escapes, as a client would send them), sometimes broken further."""
    raw = json.dumps(body).encode()
    roll = rng.random()
    if roll < 0.05:
        return raw[: rng.randrange(len(raw))]
    if roll < 0.10:
        return raw[:-1] + b', "deep": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    if roll < 0.15:
        return raw.replace(b'"max_tokens": 2', b'"max_tokens": ' + b"9" * rng.choice([20, 4400, 6000]), 1)
    if roll < 0.18:
        return raw.replace(b'"hi"', b'"hi \xff\xfe"', 1)
    if roll < 0.21:
        return raw.replace(b'"max_tokens": 2', b'"max_tokens": NaN', 1)
    return raw


def send(base: str, client: httpx.Client, body: bytes) -> tuple[int, str]:
    """The status, and for a stream any server_error event or a missing [DONE]."""
    headers = {"content-type": "application/json"}
    with client.stream("POST", base + "/v1/chat/completions", content=body, headers=headers) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            lines = [line for line in r.iter_lines() if line]
            errors = [line for line in lines if '"server_error"' in line]
            return r.status_code, "; ".join(errors) or ("" if lines[-1] == "data: [DONE]" else "no [DONE]")
        r.read()
        return r.status_code, r.text if r.status_code >= 500 else ""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("serve-fuzz"), counting=True)
    media = tmp_path_factory.mktemp("fuzz-media")
    (media / "x.png").write_bytes(png())
    settings = ServeSettings(model_name="tiny", max_tokens_cap=16, max_images=3, max_body_bytes=2**20,
                             media=MediaPolicy(allowed_local_dir=media, max_bytes=2**20, max_pixels=10**6))  # fmt: skip
    with serve_in_thread(create_app(load(folder), settings)) as base:
        yield base


def test_seeded_fuzzing_gets_no_5xx_and_a_bystander_is_served(served):
    rng = random.Random(SEED)
    fields = sorted(ChatCompletionRequest.model_json_schema()["properties"])
    bodies = []
    for _ in range(CASES):
        body = fuzz_body(rng, fields)
        if rng.random() < 0.3:
            body["stream"] = True
        bodies.append(to_bytes(rng, body))
    client = httpx.Client(timeout=60)
    want = client.post(served + "/v1/chat/completions", json=BYSTANDER).json()["choices"][0]["message"]
    done, bystander = threading.Event(), []

    def bystand():
        while not done.is_set():
            r = client.post(served + "/v1/chat/completions", json=BYSTANDER)
            bystander.append((r.status_code, r.json()["choices"][0]["message"] if r.status_code == 200 else r.text))

    watcher = threading.Thread(target=bystand)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda b: send(served, client, b), bodies))
    finally:
        done.set()
        watcher.join(60)
    failures = [(b[:300], status, why) for b, (status, why) in zip(bodies, results) if status >= 500 or why]
    assert not failures, failures[:5]
    statuses = {s for s, _ in results}
    assert 200 in statuses and 400 in statuses  # the run reached the engine and the checks alike
    assert bystander and bystander == [(200, want)] * len(bystander)
    wait_idle(served)


def test_the_openapi_document_describes_the_chat_request(served):
    spec = httpx.get(served + "/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    request = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert request["required"] == ["messages"] and request["properties"]["seed"]["anyOf"][0]["maximum"] == 2**64 - 1


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(served, tmp_path):
    pytest.importorskip("schemathesis")
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", served + "/openapi.json", "--checks", "not_a_server_error",
           "--max-examples", "150", "--seed", str(SEED), "--workers", "2", "--request-timeout", "60",
           "--generation-database", "none", "--no-color"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False, cwd=tmp_path)  # its cache
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    wait_idle(served)
