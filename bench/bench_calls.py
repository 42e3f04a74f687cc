"""What vkr's ModelCaller adds to a model call, against plain ``litellm.acompletion``.

Both sides make the same chat-completions requests (same model string, api_base, messages
carrying the same JPEG data URLs, ``seed``, ``temperature``, no retries) at the same
concurrency to the fake model server, which runs in a separate process (``vkr dev
fake-server``) so its CPU is not counted. Every vkr call is a cache miss (a distinct sample
index per call and a fresh cache directory per repeat); the cache-hit path is timed by
replaying the same calls on the same cache. Sides run round-robin, repeat by repeat, with
the order rotating, so load from other processes falls on all of them alike.

``--protocol`` (repeatable) picks the wire protocol: ``openai`` (the default), ``anthropic``
(Messages) or ``gemini`` (generateContent), each compared on its own with the model string
``PROTOCOL/fake-a`` and the fake server's ``api_base`` for that protocol. The third side
differs by protocol:

- openai: "raw, httpx client" is litellm given an ``AsyncOpenAI`` client over a plain
  ``httpx.AsyncClient`` (httpx's own transport). vkr does not take that route for this
  model: with only plain sampling parameters its provider posts the request itself on
  aiohttp (``_complete_plain``), and for other parameters the SDK route's client sits on
  ``JournallingTransport``. The side shows what litellm's OpenAI route costs over httpx.
- anthropic, gemini: "raw, vkr's handler" is litellm given the client vkr's provider hands
  these routes, an ``AsyncHTTPHandler`` on ``JournallingTransport`` over litellm's own
  transport, with a distinct ``X-Vkr-Call`` key per call so every body is journalled: it
  splits vkr's extra cost into the transport with its journal and vkr's own code.

Part two (throughput): the server sleeps ``--latency-ms`` per request and
``--throughput-concurrency`` calls are kept in flight; achieved calls/s is reported as a
share of the ideal concurrency / latency, beside a bare aiohttp client as the floor. It runs
on the OpenAI protocol only, when ``--protocol openai`` is among those asked.

    .venv/bin/python bench/bench_calls.py [--calls 300] [--repeats 5] [--concurrency 8]
        [--protocol openai|anthropic|gemini ...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugins.providers.fake_server import protocol_api_base  # noqa: E402
from plugins.providers.litellm_provider import LitellmProvider, _import_litellm  # noqa: E402
from vkr_core.calls import (  # noqa: E402
    CALL_KEY_HEADER,
    Journal,
    ModelCaller,
    RetrySettings,
    image_part,
)
from vkr_core.config import ModelSpec  # noqa: E402
from vkr_core.schemas import Frame  # noqa: E402

VKR = str(Path(sys.executable).parent / "vkr")


def clip() -> Path:
    """The pancake clip: ``VKR_TESTDATA``'s if set, else the one the tests make (a fresh
    clone has nothing beside it)."""
    given = os.environ.get("VKR_TESTDATA")
    if given and (Path(given) / "flipping_a_pancake.mkv").is_file():
        return Path(given) / "flipping_a_pancake.mkv"
    sys.path.insert(0, str(ROOT / "tests"))
    from videos import PANCAKE, video_dir  # tests/videos.py

    return video_dir() / PANCAKE


VIDEO = clip()
RESULTS = ROOT / "bench" / "results"
STEP = "self_consistency"
PROTOCOLS = ("openai", "anthropic", "gemini")
QUESTION = (
    "You are given frames of an expert video with their timestamps, and a question about it.\n"
    "Solve the question step by step from what the frames show and standard domain "
    "knowledge, then give the answer.\n"
    'Reply with JSON only: {"reasoning": "1. ...\\n2. ...", "answer": "..."}.\n\n'
    "Question: [q:0000beef:mc] At 00:04, what is the main action being performed, and why "
    "does it work?\nA. The object is lifted and rotated\nB. The liquid starts to boil\n"
    "C. The tool is pressed against the surface\nD. The sample changes colour\n"
)

OneCall = Callable[[int], Awaitable[Any]]


# ---------------------------------------------------------------- the fake server, out of process


class FakeServerProcess:
    """``vkr dev fake-server`` in its own process, driven over its HTTP control endpoints."""

    def __init__(self, pool_file: Path | None = None, seed: int = 0):
        command = [VKR, "dev", "fake-server", "--port", "0", "--seed", str(seed)]
        if pool_file is not None:
            command += ["--write-pool", str(pool_file)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        first = self.process.stdout.readline()
        if not first.startswith("fake model server: "):
            self.stop()
            raise RuntimeError(f"`vkr dev fake-server` did not start: {first!r}")
        self.base_url = first.split(": ", 1)[1].strip()
        if pool_file is not None:
            self.process.stdout.readline()  # "pool: ...": the pool file is written
        self._root = self.base_url.removesuffix("/v1")

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self._root + path,
            data=json.dumps(body).encode() if body is not None else None,
            method="POST" if body is not None else "GET",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        return self._request("/stats")

    def completions(self) -> int:
        return int(self.stats()["completions"])

    def set_policy(self, policy: dict[str, Any]) -> None:
        self._request("/policy", policy)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def fake_server(pool_file: Path | None = None) -> Iterator[FakeServerProcess]:
    server = FakeServerProcess(pool_file)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- end-to-end run set-up

# Every gate passes, so each round walks the whole path and writes a full record.
ALL_PASS = {
    "steps": {
        "self_consistency": {"accuracy": 1.0},
        "video_dependency": {"accuracy": 0.0},
        "cot_verification": {"cot_pass": 1.0},
    }
}


def write_manifest(folder: Path, count: int, name: str = "manifest.jsonl") -> Path:
    """``count`` videos (hard links to one clip where the file system allows) and a manifest.

    Every video is one clip but each has its own title: its prompts differ, so no call is
    answered from another video's cache entry and every round walks its four hops.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        target = folder / f"v{i:05d}.mkv"
        if not target.exists():
            try:
                os.link(VIDEO, target)
            except OSError:  # another file system
                shutil.copy(VIDEO, target)
        lines.append(
            json.dumps(
                {
                    "video_id": f"v{i:05d}",
                    "path": target.name,
                    "discipline": "cooking",
                    "subject": "batter cookery",
                    "knowledge_point": "Maillard reaction",
                    "title": f"Pancake flip number {i}",
                }
            )
        )
    manifest = folder / name
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def unbounded_pool(pool: Path) -> None:
    """Raise every model's concurrency limit far above what the run can offer."""
    import yaml

    data = yaml.safe_load(pool.read_text())
    for model in data["models"]:
        model["max_concurrency"] = 100_000
    pool.write_text(yaml.safe_dump(data, sort_keys=False))


# ---------------------------------------------------------------- payloads


def make_frames(count: int, folder: Path, max_side: int = 768) -> list[Frame]:
    """``count`` distinct real frames of the pancake clip as JPEG files, 768 px on the long side.

    The clip is 426x240; frames are scaled up to 768x432 so each JPEG weighs what a frame of
    an HD source weighs after vkr's resize to 768 px (the payload size is what costs).
    """
    import av
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    with av.open(str(VIDEO)) as container:
        decoded = [(f.time or 0.0, f.to_image()) for f in container.decode(video=0)]
    stride = max(1, len(decoded) // count)
    frames: list[Frame] = []
    for index in range(count):
        timestamp, image = decoded[(index * stride) % len(decoded)]
        scale = max_side / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        path = folder / f"frame_{index:03d}.jpg"
        path.write_bytes(data)
        frames.append(
            Frame(
                index=index,
                timestamp=float(timestamp),
                sha256=hashlib.sha256(data).hexdigest(),
                path=str(path),
                width=image.width,
                height=image.height,
            )
        )
    return frames


@dataclass
class Payload:
    name: str
    vkr_messages: list[dict[str, Any]]
    raw_messages: list[dict[str, Any]]
    body_bytes: int


def make_payload(name: str, frames: list[Frame]) -> Payload:
    """One user message: each frame after its timestamp line, then the question."""
    vkr_parts: list[dict[str, Any]] = []
    raw_parts: list[dict[str, Any]] = []
    for frame in frames:
        label = {"type": "text", "text": f"Frame at {frame.clock}:"}
        url = "data:image/jpeg;base64," + base64.b64encode(Path(frame.path).read_bytes()).decode()
        vkr_parts += [label, image_part(frame)]
        raw_parts += [label, {"type": "image_url", "image_url": {"url": url}}]
    question = {"type": "text", "text": QUESTION}
    vkr_messages = [{"role": "user", "content": [*vkr_parts, question]}]
    raw_messages = [{"role": "user", "content": [*raw_parts, question]}]
    return Payload(name, vkr_messages, raw_messages, len(json.dumps(raw_messages)))


# ---------------------------------------------------------------- the clients


@dataclass(frozen=True)
class Route:
    """Where one protocol's calls go: litellm's model string and the server's base for it."""

    protocol: str
    model: str
    api_base: str


def route(server: FakeServerProcess, protocol: str) -> Route:
    return Route(protocol, f"{protocol}/fake-a", protocol_api_base(server.base_url, protocol))


def model_spec(target: Route, concurrency: int) -> ModelSpec:
    # Prices set in the pool, as for a local server: vkr then does not ask litellm's price map.
    return ModelSpec(
        name="fake-a",
        model=target.model,
        api_base=target.api_base,
        max_concurrency=concurrency,
        input_cost_per_token=5e-7,
        output_cost_per_token=1.5e-6,
    )


def raw_call(
    target: Route, payload: Payload, client: Any = None, call_keys: str | None = None
) -> OneCall:
    """Plain ``litellm.acompletion``; ``client`` is passed through when given, and with
    ``call_keys`` each call carries its own ``X-Vkr-Call`` key (so a journalling client
    journals its body, as it does for vkr)."""
    litellm = _import_litellm()  # the module settings vkr's provider uses, for both sides
    extra = {"client": client} if client is not None else {}

    async def one(sample: int) -> Any:
        headers = {"X-Vkr-Step": STEP}
        if call_keys is not None:
            headers[CALL_KEY_HEADER] = f"{call_keys}-{sample}"
        response = await litellm.acompletion(
            model=target.model,
            messages=payload.raw_messages,
            api_base=target.api_base,
            api_key="EMPTY",
            timeout=120.0,
            extra_headers=headers,
            max_retries=0,
            temperature=0,
            seed=sample,
            **extra,
        )
        assert response.choices[0].message.content
        return response

    return one


def httpx_openai_client(base_url: str) -> Any:
    """An AsyncOpenAI client over a plain httpx.AsyncClient, as vkr's provider builds one."""
    import httpx
    from openai import AsyncOpenAI

    # openai 3.x types its client as httpx2's; litellm hands it httpx clients too.
    http_client: Any = httpx.AsyncClient(timeout=120.0, follow_redirects=True)
    return AsyncOpenAI(
        api_key="EMPTY",
        base_url=base_url,
        http_client=http_client,
        max_retries=0,
        timeout=120.0,
    )


def journalling_handler(journal: Journal) -> Any:
    """The client vkr's provider hands litellm's Anthropic and Gemini routes: litellm's
    ``AsyncHTTPHandler`` on ``JournallingTransport`` over litellm's own transport."""
    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

    from plugins.providers.journal_transport import JournallingTransport

    return AsyncHTTPHandler(timeout=120.0, transport=JournallingTransport(journal))


def aiohttp_call(base_url: str, payload: Payload, session: Any) -> OneCall:
    """The floor: one POST of the same body with a bare aiohttp session."""
    url = base_url + "/chat/completions"
    headers = {"X-Vkr-Step": STEP, "Authorization": "Bearer EMPTY"}

    async def one(sample: int) -> Any:
        body = {
            "model": "fake-a",
            "messages": payload.raw_messages,
            "temperature": 0,
            "seed": sample,
        }
        async with session.post(url, json=body, headers=headers) as response:
            assert response.status == 200, response.status
            return await response.json()

    return one


@dataclass
class VkrSide:
    """One ModelCaller with a fresh cache directory, and the provider whose clients it opens."""

    folder: Path
    provider: LitellmProvider = field(default_factory=LitellmProvider)
    caller: ModelCaller = field(init=False)

    def __post_init__(self) -> None:
        self.caller = ModelCaller(
            cache_dir=self.folder,
            providers={"litellm": self.provider},
            retry=RetrySettings(attempts=1),
        )

    def call(self, spec: ModelSpec, payload: Payload, offset: int, expect_hit: bool) -> OneCall:
        async def one(number: int) -> Any:
            result = await self.caller.call(
                spec=spec,
                step=STEP,
                prompt_version="bench-v1",
                messages=payload.vkr_messages,
                params={"temperature": 0},
                sample=offset + number,
            )
            assert result.record.cache_hit is expect_hit, result.record
            return result

        return one

    async def close(self) -> None:
        await self.caller.aclose()  # the cache and the provider's connections
        shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------- timing


async def in_flight(calls: int, concurrency: int, one: OneCall) -> None:
    """``calls`` calls, ``concurrency`` at a time: the same scheduling for every side."""
    numbers = iter(range(calls))

    async def worker() -> None:
        for number in numbers:
            await one(number)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


@dataclass
class Timing:
    wall_s: float
    cpu_s: float


async def timed(calls: int, concurrency: int, one: OneCall) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    await in_flight(calls, concurrency, one)
    return Timing(time.perf_counter() - wall, time.process_time() - cpu)


def rotated(names: list[str], repeat: int) -> list[str]:
    """The sides in a different order each repeat, so a load spike does not favour one."""
    shift = repeat % len(names)
    return names[shift:] + names[:shift]


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], digits: int = 2) -> str:
    median, low, high = spread(values)
    return f"{median:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


# ---------------------------------------------------------------- part one: per-call overhead


async def overhead(
    server: FakeServerProcess,
    protocol: str,
    payload: Payload,
    calls: int,
    repeats: int,
    concurrency: int,
    scratch: Path,
) -> dict[str, Any]:
    """vkr (cache miss), raw, raw with a third client (``third_side``), then vkr again on
    the same cache (all hits)."""
    target = route(server, protocol)
    spec = model_spec(target, concurrency)
    folder = scratch / f"{protocol}-{payload.name}"
    # Warm-up: first-use imports, connection pools, vkr's frame-image cache.
    warm = VkrSide(folder / "warm")
    await in_flight(concurrency, concurrency, warm.call(spec, payload, -10_000, False))
    await warm.close()
    await in_flight(concurrency, concurrency, raw_call(target, payload))
    third, close_third = third_side(target, folder / "third")
    await in_flight(concurrency, concurrency, third(payload, "warm"))

    # The openai side keeps the key its results have always had.
    third_key = "raw_httpx" if protocol == "openai" else "raw_handler"
    timings: dict[str, list[Timing]] = {"vkr": [], "raw": [], third_key: [], "vkr_hit": []}
    for repeat in range(repeats):
        side = VkrSide(folder / str(repeat))
        offset = repeat * calls
        calls_of = {
            "vkr": side.call(spec, payload, offset, expect_hit=False),
            "raw": raw_call(target, payload),
            third_key: third(payload, str(repeat)),
        }
        before = server.completions()
        for name in rotated(list(calls_of), repeat):
            timings[name].append(await timed(calls, concurrency, calls_of[name]))
        paid = server.completions()
        assert paid - before == 3 * calls, f"{paid - before} completions, not {3 * calls}"
        hits = side.call(spec, payload, offset, expect_hit=True)
        timings["vkr_hit"].append(await timed(calls, concurrency, hits))
        assert server.completions() == paid, "a cache hit reached the server"
        await side.close()
    await close_third()

    row: dict[str, Any] = {
        "protocol": protocol,
        "third_side": THIRD_SIDE[protocol == "openai"],
        "payload": payload.name,
        "calls": calls,
        "body_bytes": payload.body_bytes,
    }
    for name, values in timings.items():
        row[name] = {
            "wall_s": [t.wall_s for t in values],
            "cpu_ms_per_call": [t.cpu_s / calls * 1000 for t in values],
        }
    pairs = list(zip(timings["vkr"], timings["raw"], strict=True))
    row["wall_ratio"] = [v.wall_s / r.wall_s for v, r in pairs]
    row["extra_cpu_ms_per_call"] = [(v.cpu_s - r.cpu_s) / calls * 1000 for v, r in pairs]
    row["cpu_ratio"] = [v.cpu_s / r.cpu_s for v, r in pairs]
    hit_pairs = list(zip(timings["vkr_hit"], timings["raw"], strict=True))
    row["hit_cpu_ratio"] = [h.cpu_s / r.cpu_s for h, r in hit_pairs]
    transport = list(zip(timings[third_key], timings["raw"], strict=True))
    row["transport_cpu_ms_per_call"] = [(h.cpu_s - r.cpu_s) / calls * 1000 for h, r in transport]
    own = list(zip(timings["vkr"], timings[third_key], strict=True))
    row["own_cpu_ms_per_call"] = [(v.cpu_s - h.cpu_s) / calls * 1000 for v, h in own]
    return row


# The third side's label: vkr's journalling handler (anthropic, gemini), or plain httpx (openai).
THIRD_SIDE = ("raw, vkr's handler", "raw over httpx")

ThirdSide = Callable[[Payload, str], OneCall]


def third_side(target: Route, folder: Path) -> tuple[ThirdSide, Callable[[], Awaitable[None]]]:
    """The third side's calls for a repeat (keys distinct per repeat), and how to close its
    client: litellm over plain httpx for openai, else over vkr's journalling handler with a
    journal of its own in ``folder``."""
    if target.protocol == "openai":
        client = httpx_openai_client(target.api_base)

        def openai_calls(payload: Payload, repeat: str) -> OneCall:
            return raw_call(target, payload, client)

        return openai_calls, client.close

    from vkr_core.backends import DiskCallCache

    cache = DiskCallCache.open_dir(folder)
    handler = journalling_handler(Journal(cache))

    def handler_calls(payload: Payload, repeat: str) -> OneCall:
        return raw_call(target, payload, handler, call_keys=f"{payload.name}-{repeat}")

    async def close() -> None:
        await handler.close()
        cache.close()
        shutil.rmtree(folder, ignore_errors=True)

    return handler_calls, close


def print_overhead(rows: list[dict[str, Any]]) -> None:
    print(
        "| payload | raw wall s | vkr wall s | vkr / raw wall | raw CPU ms/call "
        "| vkr CPU ms/call | vkr − raw CPU ms/call | cache hit ms/call (wall, CPU) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        hit_wall = [w / row["calls"] * 1000 for w in row["vkr_hit"]["wall_s"]]
        print(
            f"| {row['payload']} ({row['body_bytes'] / 1e6:.2f} MB) "
            f"| {fmt(row['raw']['wall_s'])} | {fmt(row['vkr']['wall_s'])} "
            f"| {fmt(row['wall_ratio'])} | {fmt(row['raw']['cpu_ms_per_call'])} "
            f"| {fmt(row['vkr']['cpu_ms_per_call'])} | {fmt(row['extra_cpu_ms_per_call'])} "
            f"| {statistics.median(hit_wall):.3f}, "
            f"{statistics.median(row['vkr_hit']['cpu_ms_per_call']):.3f} |"
        )
    if rows and rows[0].get("protocol", "openai") != "openai":
        # The default table above stays as it was; other protocols get the CPU ratios too.
        print("\nCPU per call against raw litellm, median (min–max):\n")
        print("| payload | vkr miss / raw | vkr hit / raw |")
        print("|---|---:|---:|")
        for row in rows:
            print(
                f"| {row['payload']} | {fmt(row['cpu_ratio'])} | {fmt(row['hit_cpu_ratio'], 3)} |"
            )
    third = rows[0]["third_side"] if rows else THIRD_SIDE[1]
    print("\nwhere vkr's extra CPU goes (ms per call, median (min–max)):\n")
    print(f"| payload | {third} − raw (transport) | vkr − {third} (vkr's code) |")
    print("|---|---:|---:|")
    for row in rows:
        print(
            f"| {row['payload']} | {fmt(row['transport_cpu_ms_per_call'])} "
            f"| {fmt(row['own_cpu_ms_per_call'])} |"
        )


# ---------------------------------------------------------------- part two: throughput


async def throughput(
    server: FakeServerProcess,
    payload: Payload,
    latency_ms: float,
    concurrency: int,
    calls: int,
    repeats: int,
    scratch: Path,
) -> dict[str, Any]:
    import aiohttp

    target = route(server, "openai")
    spec = model_spec(target, concurrency)
    ideal = concurrency / (latency_ms / 1000)
    timings: dict[str, list[Timing]] = {"vkr": [], "raw": [], "aiohttp": []}
    server.set_policy({"latency_ms": latency_ms})
    try:
        async with aiohttp.ClientSession() as session:
            for repeat in range(repeats):
                side = VkrSide(scratch / f"throughput-{payload.name}-{repeat}")
                calls_of = {
                    "vkr": side.call(spec, payload, 1_000_000 + repeat * calls, False),
                    "raw": raw_call(target, payload),
                    "aiohttp": aiohttp_call(server.base_url, payload, session),
                }
                for name in rotated(list(calls_of), repeat):
                    timings[name].append(await timed(calls, concurrency, calls_of[name]))
                await side.close()
    finally:
        server.set_policy({})
    row: dict[str, Any] = {
        "payload": payload.name,
        "latency_ms": latency_ms,
        "concurrency": concurrency,
        "calls": calls,
        "ideal_calls_per_s": ideal,
    }
    for name, values in timings.items():
        row[name] = {
            "calls_per_s": [calls / t.wall_s for t in values],
            "share_of_ideal": [calls / t.wall_s / ideal for t in values],
            "cpu_ms_per_call": [t.cpu_s / calls * 1000 for t in values],
            "cpu_busy": [t.cpu_s / t.wall_s for t in values],
        }
    return row


def print_throughput(rows: list[dict[str, Any]]) -> None:
    print(
        "| client | payload | calls/s | share of ideal C / L | client CPU ms/call "
        "| client CPU busy |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        for name in ("vkr", "raw", "aiohttp"):
            side = row[name]
            print(
                f"| {name} | {row['payload']} | {fmt(side['calls_per_s'], 1)} "
                f"| {fmt([100 * s for s in side['share_of_ideal']], 1)} % "
                f"| {fmt(side['cpu_ms_per_call'])} | {fmt([100 * b for b in side['cpu_busy']], 0)} % |"
            )


# ---------------------------------------------------------------- main


async def run_all(args: argparse.Namespace, server: FakeServerProcess, scratch: Path) -> Any:
    frames = make_frames(69, scratch / "frames")
    payloads = [
        make_payload("text only", []),
        make_payload("4 frames", frames[:: len(frames) // 4][:4]),
        make_payload("69 frames", frames),
    ]
    results: dict[str, Any] = {"overhead": [], "throughput": []}
    protocols = args.protocol or ["openai"]
    if not args.only_throughput:
        for protocol in protocols:
            rows = []
            for payload in payloads:
                calls = args.calls_69 if payload.name == "69 frames" else args.calls
                rows.append(
                    await overhead(
                        server, protocol, payload, calls, args.repeats, args.concurrency, scratch
                    )
                )
                done = f"{protocol}, " if protocols != ["openai"] else ""
                print(
                    f"  {done}{payload.name}: done at load average {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            results["overhead"] += rows
            model = f" on {protocol} ({protocol}/fake-a)" if protocols != ["openai"] else ""
            print(
                f"\nper-call overhead{model}: {args.calls} calls per pass ({args.calls_69} with "
                f"69 frames), {args.concurrency} in flight, {args.repeats} repeats; "
                "median (min–max)\n"
            )
            print_overhead(rows)
    if "openai" not in protocols:
        return results
    for payload in payloads[:2]:
        results["throughput"].append(
            await throughput(
                server,
                payload,
                args.latency_ms,
                args.throughput_concurrency,
                args.throughput_calls,
                args.throughput_repeats,
                scratch,
            )
        )
    print(
        f"\nthroughput: server latency {args.latency_ms:g} ms, {args.throughput_concurrency} "
        f"in flight (ideal {results['throughput'][0]['ideal_calls_per_s']:.0f} calls/s), "
        f"{args.throughput_calls} calls per pass, {args.throughput_repeats} repeats\n"
    )
    print_throughput(results["throughput"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per timed pass")
    parser.add_argument("--calls-69", type=int, default=300, help="the same, 69-frame payload")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--throughput-concurrency", type=int, default=16)
    parser.add_argument("--throughput-calls", type=int, default=320)
    parser.add_argument("--throughput-repeats", type=int, default=3)
    parser.add_argument("--only-throughput", action="store_true")
    parser.add_argument(
        "--protocol",
        action="append",
        choices=PROTOCOLS,
        help="wire protocol of the per-call comparison, repeatable (default: openai); the "
        "throughput part runs only with openai",
    )
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, load {load_start:.1f}")
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="vkr-bench-calls-"))
    try:
        with fake_server() as server:
            results = asyncio.run(run_all(args, server, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # The default run keeps its file; other protocols get their own beside it.
    protocols = args.protocol or ["openai"]
    name = "calls.json" if protocols == ["openai"] else f"calls-{'-'.join(protocols)}.json"
    write_results(results, name, args, started, load_start)


def write_results(
    results: dict[str, Any], name: str, args: Any, started: float, load_start: float
) -> None:
    """Print the closing line and save the figures with the arguments and machine load."""
    elapsed = time.monotonic() - started
    load_end = os.getloadavg()[0]
    print(
        f"\n{elapsed:.0f} s in all; load average {load_start:.1f} at start, {load_end:.1f} at end"
    )
    results.update(args=vars(args), seconds=elapsed, load_average=[load_start, load_end])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
