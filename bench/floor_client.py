"""The floor under `vkr run`: the raw libraries doing a run's work, and nothing else.

A one-off script as a user would write it without vkr: for each video of a manifest,
decord decodes the frames `vkr run` samples by default (one every 5 s, the longer side
scaled to 768 px by Pillow, JPEG quality 85), then its six rounds each make the four hops
of `bench_throughput.py` (generate, self_consistency, video_dependency on two models at
once, cot_verification) as plain aiohttp POSTs to an OpenAI-compatible server, reading each
reply's JSON; ``--concurrency`` videos in flight, one record line per video at the end.

No cache, journal, checkpoint, routing, retry, verification or record of inputs: what it
costs is what the same requests and decoding cost on this host, the bound any client
meets. The request texts are a real run's (``--templates``: one step input per step, as
`vkr run` recorded it in ``inputs/``), with this video's title and this script's frames
put in, so the bodies are the same size as vkr's.

    python bench/floor_client.py --videos MANIFEST --templates T.json --base-url URL \
        --concurrency C --out RECORDS.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import random
from pathlib import Path
from typing import Any

import aiohttp
import decord
from PIL import Image

ROUNDS = 6
FPS = 0.2
MAX_SIDE = 768
MODELS = ("fake-a", "fake-b", "fake-c", "fake-d")
HOPS = ("example_generation", "self_consistency", "video_dependency", "cot_verification")


def decode(path: Path) -> list[str]:
    """The video's frames as JPEG data URLs."""
    reader = decord.VideoReader(str(path))
    fps = reader.get_avg_fps()
    duration = len(reader) / fps
    count = int(duration * FPS) + 1
    indexes = [min(len(reader) - 1, round(i / FPS * fps)) for i in range(count)]
    urls = []
    for array in reader.get_batch(indexes).asnumpy():
        image = Image.fromarray(array)
        scale = MAX_SIDE / max(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def fill(
    template: list[dict[str, Any]], recorded_title: str, title: str, urls: list[str]
) -> list[dict[str, Any]]:
    """A step's recorded messages (of the video titled ``recorded_title``) with this video's
    title and frames."""
    frames = itertools.cycle(urls)
    messages = []
    for message in template:
        content = message["content"]
        if isinstance(content, str):
            content = content.replace(recorded_title, title)
        else:
            content = [
                {"type": "image_url", "image_url": {"url": next(frames)}}
                if part["type"] == "image"
                else {**part, "text": part["text"].replace(recorded_title, title)}
                for part in content
            ]
        messages.append({"role": message["role"], "content": content})
    return messages


async def ask(session: aiohttp.ClientSession, url: str, step: str, messages: Any) -> Any:
    body = {"model": random.choice(MODELS), "messages": messages, "temperature": 0.7}
    async with session.post(url, json=body, headers={"X-Vkr-Step": step}) as response:
        response.raise_for_status()
        reply = await response.json()
    return reply["choices"][0]["message"]["content"]


async def one_video(
    video: dict[str, Any], folder: Path, saved: dict[str, Any], session: Any, url: str
) -> dict[str, Any]:
    urls = await asyncio.to_thread(decode, folder / video["path"])
    per_step = {
        step: fill(saved["steps"][step], saved["title"], video["title"], urls) for step in HOPS
    }

    async def round_() -> list[Any]:
        replies = [await ask(session, url, "example_generation", per_step["example_generation"])]
        replies.append(await ask(session, url, "self_consistency", per_step["self_consistency"]))
        replies += await asyncio.gather(
            *(ask(session, url, "video_dependency", per_step["video_dependency"]) for _ in "ab")
        )
        replies.append(await ask(session, url, "cot_verification", per_step["cot_verification"]))
        return replies

    rounds = await asyncio.gather(*(round_() for _ in range(ROUNDS)))
    return {"video_id": video["video_id"], "rounds": rounds}


async def main_async(args: argparse.Namespace) -> None:
    saved = json.loads(Path(args.templates).read_text())
    manifest = Path(args.videos)
    videos = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    url = args.base_url.rstrip("/") + "/chat/completions"
    slots = asyncio.Semaphore(args.concurrency)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def bounded(video: dict[str, Any]) -> dict[str, Any]:
            async with slots:
                return await one_video(video, manifest.parent, saved, session, url)

        records = await asyncio.gather(*(bounded(v) for v in videos))
    with open(args.out, "w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", required=True)
    parser.add_argument("--templates", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--out", required=True)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
