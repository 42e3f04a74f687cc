"""What the fake model server costs per request, against a bare aiohttp server (the raw baseline).

Both servers answer the same OpenAI chat-completions request carrying real JPEG frames of
the pancake test clip. "raw" returns a fixed completion without reading the body beyond
JSON parsing; the fake server validates the request, hashes every image, resolves the
policy and builds the step's reply. Each is driven by two clients: plain aiohttp (server
cost) and the real litellm client (what tests and ``vkr demo`` see).

    .venv/bin/python bench/bench_fake_server.py [--requests 200] [--frames 16]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import av  # noqa: E402
from aiohttp import web  # noqa: E402
from bench_calls import VIDEO  # noqa: E402  # the pancake clip, made if absent

from plugins.providers.fake_server import FakeModelServer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

CANNED = {
    "id": "chatcmpl-raw",
    "object": "chat.completion",
    "created": 0,
    "model": "fake-a",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": '{"reasoning": "1. x\\n2. y", "answer": "A"}',
            },
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
}


def frame_parts(count: int, max_side: int = 768) -> list[dict[str, Any]]:
    """JPEG data-URL parts of ``count`` real frames, sized as the pipeline sends them."""
    parts: list[dict[str, Any]] = []
    with av.open(str(VIDEO)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if len(parts) >= 2 * count:
                break
            if number % 10:  # 3 frames a second of the 30 fps clip
                continue
            image = frame.to_image()
            image.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=85)
            clock = f"00:{int(frame.time or 0):02d}"
            parts.append({"type": "text", "text": f"Frame at {clock}:"})
            url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
            parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


class RawServer:
    """The baseline: parse JSON, return a canned completion."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url = ""
        self.runner: web.AppRunner
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def handle(request: web.Request) -> web.Response:
            await request.json()
            return web.json_response(CANNED)

        async def open_site() -> None:
            app = web.Application(client_max_size=256 * 1024**2)
            app.router.add_post("/v1/chat/completions", handle)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}/v1"

        self.loop.run_until_complete(open_site())
        self.ready.set()
        self.loop.run_forever()

    def start(self) -> str:
        self.thread.start()
        self.ready.wait()
        return self.url

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


async def time_aiohttp(url: str, body: dict[str, Any], n: int) -> list[float]:
    headers = {"X-Vkr-Step": "self_consistency", "Authorization": "Bearer x"}
    payload = json.dumps(body)
    samples = []
    async with aiohttp.ClientSession() as session:
        for i in range(n + 5):
            started = time.perf_counter()
            async with session.post(
                url + "/chat/completions",
                data=payload,
                headers={**headers, "Content-Type": "application/json"},
            ) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            if i >= 5:  # warm-up: connection set-up and first-import costs
                samples.append(time.perf_counter() - started)
    return samples


async def time_litellm(url: str, body: dict[str, Any], n: int) -> list[float]:
    import litellm

    litellm.suppress_debug_info = True
    samples = []
    for i in range(n + 5):
        started = time.perf_counter()
        await litellm.acompletion(
            model="openai/fake-a",
            api_base=url,
            api_key="x",
            messages=body["messages"],
            seed=body["seed"],
            temperature=0,
            max_retries=0,
            extra_headers={"X-Vkr-Step": "self_consistency"},
        )
        if i >= 5:
            samples.append(time.perf_counter() - started)
    return samples


async def time_concurrent(url: str, body: dict[str, Any], n: int, workers: int) -> float:
    """Requests per second with ``workers`` clients in flight."""
    payload = json.dumps(body)
    headers = {"X-Vkr-Step": "self_consistency", "Content-Type": "application/json"}
    remaining = list(range(n))

    async def worker(session: aiohttp.ClientSession) -> None:
        while remaining:
            remaining.pop()
            async with session.post(url + "/chat/completions", data=payload, headers=headers) as r:
                await r.read()

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(workers)))
        return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args()

    parts = frame_parts(args.frames)
    text = "Question: [q:0000beef:mc] What happens at 00:04?\nA. x\nB. y\nC. z\nD. w"
    body = {
        "model": "fake-a",
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}],
        "seed": 0,
        "temperature": 0,
    }
    body_mb = len(json.dumps(body)) / 1e6

    raw = RawServer()
    raw_url = raw.start()
    fake = FakeModelServer(seed=0)
    fake_url = fake.start()
    n = args.requests
    try:
        results: dict[str, Any] = {}
        for client, timer in (("aiohttp", time_aiohttp), ("litellm", time_litellm)):
            # Interleave so machine noise hits both sides alike.
            raw_s = asyncio.run(timer(raw_url, body, n))
            fake_s = asyncio.run(timer(fake_url, body, n))
            results[client] = {
                "raw_median_ms": statistics.median(raw_s) * 1000,
                "fake_median_ms": statistics.median(fake_s) * 1000,
            }
        raw_rps = asyncio.run(time_concurrent(raw_url, body, n, 8))
        fake_rps = asyncio.run(time_concurrent(fake_url, body, n, 8))
    finally:
        fake.stop()
        raw.stop()

    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, {n} requests per cell,")
    print(f"{args.frames} frames (768 px JPEG) per request, body {body_mb:.2f} MB")
    print()
    print("| client | raw median ms | fake median ms | fake / raw |")
    print("|---|---:|---:|---:|")
    for client, row in results.items():
        ratio = row["fake_median_ms"] / row["raw_median_ms"]
        row["ratio"] = ratio
        print(
            f"| {client} | {row['raw_median_ms']:.2f} | {row['fake_median_ms']:.2f} | {ratio:.2f} |"
        )
    print(
        f"| aiohttp x8 concurrent (req/s) | {raw_rps:.0f} | {fake_rps:.0f} | "
        f"{fake_rps / raw_rps:.2f} |"
    )
    results["concurrent_rps"] = {"raw": raw_rps, "fake": fake_rps}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fake_server.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
