"""A bounded load test of `internvl serve` (a subprocess, so its memory is measured alone): many concurrent
clients mixing streaming, non-streaming, images and mid-stream disconnects; no 5xx, no crash, RSS back down."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from refmodels import tiny_checkpoint
from test_serve_common import data_url, png, wait_idle

psutil = pytest.importorskip("psutil")

RSS_MARGIN_MB = 48  # allowed RSS growth over the warmed-up level, after the load has drained


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tiny_checkpoint(tmp_path_factory.mktemp("serve-load"))
    port = free_port()
    cmd = [sys.executable, "-m", "internvl", "serve", str(folder), "--port", str(port), "--model-name", "tiny",
           "--threads", "1", "--max-batch", "16", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    yield base, proc
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def body(i: int, image: str) -> dict:
    content: list = [{"type": "text", "text": f"Question {i}: how many shapes?"}]
    if i % 5 == 0:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4 + i % 13,
            "temperature": 0.7 if i % 2 else 0.0, "seed": i, "stream": i % 3 != 0}  # fmt: skip


async def one(client: httpx.AsyncClient, base: str, i: int, image: str) -> str:
    """One request; every 4th streaming one hangs up after its second event. Returns an outcome label."""
    b = body(i, image)
    if not b["stream"]:
        r = await client.post(base + "/v1/chat/completions", json=b)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= b["max_tokens"]
        return "complete"
    async with client.stream("POST", base + "/v1/chat/completions", json=b) as r:
        assert r.status_code == 200, await r.aread()
        events = 0
        async for line in r.aiter_lines():
            if not line:
                continue
            events += 1
            if i % 4 == 1 and events == 2:
                return "disconnected"  # leaving the block closes the connection mid-stream
            if line == "data: [DONE]":
                return "streamed"
    raise AssertionError(f"request {i}: the stream ended without [DONE]")


async def load(base: str, clients: int, total: int, start: int = 0) -> dict[str, int]:
    image = data_url(png(90, 60, "green"))
    counter = iter(range(start, start + total))
    outcomes: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker():
            for i in counter:
                label = await one(client, base, i, image)
                outcomes[label] = outcomes.get(label, 0) + 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def run_load(server, clients: int, total: int) -> None:
    base, proc = server
    asyncio.run(load(base, clients, 2 * clients, start=10_000))  # warm-up: allocators, thread pools, caches
    wait_idle(base)
    time.sleep(0.2)
    before = rss_mb(proc.pid)
    t0 = time.monotonic()
    outcomes = asyncio.run(load(base, clients, total))
    elapsed = time.monotonic() - t0
    stats = wait_idle(base)
    time.sleep(0.2)
    after = rss_mb(proc.pid)
    print(f"\n{total} requests, {clients} clients: {elapsed:.1f} s, {outcomes}, engine {stats}, "
          f"RSS {before:.0f} -> {after:.0f} MiB")  # fmt: skip
    assert proc.poll() is None, "the server died"
    assert sum(outcomes.values()) == total and outcomes.get("disconnected", 0) > 0
    assert stats["finished"].get("abort", 0) + stats["dropped"] > 0, "no disconnect cancelled a generation"
    assert after - before < RSS_MARGIN_MB, f"RSS grew from {before:.0f} to {after:.0f} MiB"
    r = httpx.post(
        base + "/v1/chat/completions",
        json=body(1, data_url(png(90, 60, "green"))) | {"stream": False},
        timeout=30,
    )
    assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_a_client_that_hangs_up_cancels_its_generation(server, stream):
    base, _ = server
    aborted = wait_idle(base)["finished"].get("abort", 0)
    long = {"model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 2000,
            "min_tokens": 2000, "stream": stream}  # fmt: skip
    if stream:  # read the first event, then hang up
        with httpx.stream("POST", base + "/v1/chat/completions", json=long, timeout=30) as r:
            next(r.iter_lines())
    else:  # give up waiting for the answer after 0.3 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/chat/completions", json=long, timeout=0.3)
    stats = wait_idle(base)
    assert stats["finished"]["abort"] == aborted + 1


@pytest.mark.slow  # 500 requests from 64 clients: 10 s and more on a 2-core machine
def test_64_clients_500_requests_no_errors_and_memory_returns(server):
    run_load(server, clients=64, total=500)


@pytest.mark.skipif(
    not os.environ.get("INTERNVL_LONG_LOAD"), reason="set INTERNVL_LONG_LOAD=1 for 5000 requests"
)
@pytest.mark.slow
def test_long_load(server):
    run_load(server, clients=64, total=5000)
