"""What `vkr run` needs to keep up with the models: litellm imported off the event loop,
calls priced by vkr (not by litellm's per-call machinery), small checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from plugins.providers.litellm_provider import LitellmProvider, _import_litellm
from vkr_core.calls import ModelCaller, RetrySettings
from vkr_core.config import ModelSpec

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter (litellm not imported yet) opens a run and makes its first call while
# a ticker measures how long the event loop was ever kept from running it once the run is
# open (the run's other calls, decodes and checkpoints all wait while it is held).
FIRST_CALL = r"""
import asyncio, json, sys, time
from vkr_core.run import Run

async def main(run_dir, pool):
    gaps = []

    async def tick():
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    assert "litellm" not in sys.modules
    async with Run(run_dir, pool) as run:
        gaps.clear()  # opening a run imports its graph; from here on videos are processed
        spec = run.pool.models[0]
        result = await run.caller.call(
            spec=spec,
            step="self_consistency",
            prompt_version="t",
            messages=[{"role": "user", "content": "Question: [q:0000000a:mc] Which?"}],
            params={"temperature": 0},
        )
    ticker.cancel()
    print(json.dumps({"max_gap": max(gaps), "text": bool(result.text), "litellm": "litellm" in sys.modules}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def first_call(run_dir: Path, pool: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", FIRST_CALL, str(run_dir), str(pool)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_first_call_of_a_run_never_stops_the_event_loop_for_litellms_import(tmp_path, vkr_pool):
    # Without the pool's own prices the run needs litellm's price map, so litellm's import.
    pool = yaml.safe_load(vkr_pool.read_text())
    for model in pool["models"]:
        model.pop("input_cost_per_token", None)
        model.pop("output_cost_per_token", None)
    vkr_pool.write_text(yaml.safe_dump(pool))
    seen = first_call(tmp_path / "run", vkr_pool)
    assert seen["text"] and seen["litellm"]
    # Importing litellm takes seconds; on the loop it held up every call and decode.
    assert seen["max_gap"] < 0.5, seen


def test_a_pool_of_priced_openai_compatible_servers_never_imports_litellm(tmp_path, vkr_pool):
    seen = first_call(tmp_path / "run", vkr_pool)
    assert seen["text"] and not seen["litellm"]
    assert seen["max_gap"] < 0.5, seen


def spec_for(model: str, url: str | None = None, **prices: float) -> ModelSpec:
    return ModelSpec(name=model.replace("/", "-"), model=model, api_base=url, **prices)


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o-mini",
        "openai/gpt-4o",
        "anthropic/claude-3-5-sonnet-20240620",
        "gemini/gemini-1.5-pro",  # priced in tiers above 128k tokens
        "openai/fake-a",  # not in litellm's map: free, as litellm says
    ],
)
@pytest.mark.parametrize("tokens", [(1, 0), (1234, 567), (200_000, 9_000)])
def test_prices_are_litellms_for_every_model_and_size(model, tokens):
    litellm = _import_litellm()
    provider = LitellmProvider()
    try:
        prompt_cost, completion_cost = litellm.cost_per_token(
            model=model, prompt_tokens=tokens[0], completion_tokens=tokens[1]
        )
        expected = prompt_cost + completion_cost
    except Exception:
        expected = 0.0
    for _ in range(2):  # the first looks the model up, the second uses what it found
        cost = provider._cost(litellm, spec_for(model), *tokens)
        assert cost == pytest.approx(expected, rel=1e-9, abs=1e-15)
    # A pool's own prices win: the caller applies them.
    assert provider._cost(litellm, spec_for(model, input_cost_per_token=1e-6), *tokens) is None


def test_a_call_to_an_openai_compatible_server_costs_no_litellm_cost_or_logging_work(
    tmp_path, vkr_fake_server, monkeypatch
):
    """litellm's per-call cost calculation and logging payloads were ~40 % of its CPU per
    call; the record's tokens and cost come out the same without them."""
    litellm = _import_litellm()
    from litellm.litellm_core_utils.litellm_logging import Logging

    used: list[str] = []
    for name in ("response_cost_calculator", "async_success_handler"):
        real = getattr(Logging, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            used.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(Logging, name, spy)

    import asyncio

    async def one() -> tuple:
        caller = ModelCaller(
            cache_dir=tmp_path / "cache",
            providers={"litellm": LitellmProvider()},
            retry=RetrySettings(attempts=1),
        )
        # gpt-4o-mini is in litellm's price map: the fake server answers for any name.
        spec = spec_for("openai/gpt-4o-mini", vkr_fake_server.base_url)
        result = await caller.call(
            spec=spec,
            step="self_consistency",
            prompt_version="t",
            messages=[{"role": "user", "content": "Question: [q:0000000a:mc] Which?"}],
            params={"temperature": 0},
        )
        await caller.aclose()
        return result.record

    record = asyncio.run(one())
    assert record.outcome == "ok" and record.prompt_tokens > 0 and record.completion_tokens > 0
    prompt_cost, completion_cost = litellm.cost_per_token(
        model="openai/gpt-4o-mini",
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
    )
    assert record.cost_usd == pytest.approx(prompt_cost + completion_cost, rel=1e-9)
    assert used == []


def test_a_64_frame_video_leaves_under_a_tenth_of_the_old_checkpoint_bytes(
    tmp_path, testdata, vkr_pool
):
    """669 KB of checkpoints per 64-frame video before frames travelled by reference and a
    thread kept only its latest checkpoint; a tenth of that is the bound."""
    folder = tmp_path / "videos"
    folder.mkdir()
    lines = []
    for i in range(3):
        shutil.copy(testdata / "flipping_a_pancake.mkv", folder / f"v{i}.mkv")
        lines.append(
            json.dumps(
                {"video_id": f"v{i}", "path": f"v{i}.mkv", "discipline": "cooking"}
                | {"subject": "batter cookery", "knowledge_point": "Maillard reaction"}
            )
        )
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    vkr = str(Path(sys.executable).parent / "vkr")
    command = [vkr, "run", "--videos", str(folder / "manifest.jsonl"), "--pool", str(vkr_pool)]
    command += ["--out", str(out), "--no-progress", "--fps", "8", "--max-frames", "64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    for i in range(3):
        record = json.loads((out / "records" / f"v{i}.json").read_text())
        assert record["status"] == "done" and record["frames"] == 64
    on_disk = sum(p.stat().st_size for p in out.glob("checkpoints.sqlite*"))
    assert on_disk / 3 <= 669 * 1024 / 10, on_disk
    # A finished video can still be replayed from its checkpoint, without a call.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "calls paid 0" in again.stdout + again.stderr, again.stdout


def test_a_request_body_with_spliced_frames_is_the_json_the_encoder_gives():
    """Frames' data URLs skip the JSON encoder; the body must not change by a byte, whatever
    the rest of the messages hold (quotes, backslashes, non-ASCII, the splice marker)."""
    import base64
    import json
    import os

    from plugins.providers.litellm_provider import _IMAGE_SLOT, json_body
    from vkr_core.video import DataURL

    frame = DataURL("data:image/jpeg;base64," + base64.b64encode(os.urandom(30_000)).decode())
    other = DataURL(frame[:-8] + "AAAAAAA=")
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": f'say "hi" \\ é 😀 {_IMAGE_SLOT}0" {_IMAGE_SLOT}'},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "[Frame at 0:01]"},
                    {"type": "image_url", "image_url": {"url": frame, "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": other}},
                    {"type": "image_url", "image_url": {"url": frame}},
                ],
            },
        ],
        "temperature": 0.0,
        "seed": 7,
    }
    assert json_body(body) == json.dumps(body).encode()
    assert json.loads(json_body(body)) == body


def test_the_batch_prepares_the_next_videos_while_the_first_wait_on_models():
    """With C in flight, decoding (prepare) of the next C items starts before the first
    finish: the model slots never wait for a wave's decoding, and no more than C ahead."""
    import asyncio
    import time

    from vkr_core.batch import BatchCounters, run_batch

    events: list[tuple[str, int, float]] = []
    started = time.monotonic()

    async def prepare(item: int) -> None:
        events.append(("prepare", item, time.monotonic() - started))
        await asyncio.sleep(0.01)

    class Record:
        status = "done"
        accepted: list[int] = []

    async def process(item: int) -> Record:
        events.append(("process", item, time.monotonic() - started))
        await asyncio.sleep(0.3)
        events.append(("done", item, time.monotonic() - started))
        return Record()

    counters = BatchCounters(total=8)
    asyncio.run(run_batch(process, range(8), counters, concurrency=2, prepare=prepare))
    assert counters.done == 8
    first_done = min(t for kind, _, t in events if kind == "done")
    prepared_early = sorted(i for kind, i, t in events if kind == "prepare" and t < first_done)
    assert prepared_early == [0, 1, 2, 3]  # the two in flight and the next two, no more
    # Every item is prepared before it is processed.
    for item in range(8):
        order = [kind for kind, i, _ in events if i == item]
        assert order == ["prepare", "process", "done"]


def test_direct_posts_use_the_proxy_the_environment_names(monkeypatch):
    """Proxies are looked up once per session (not per request in a thread), honouring
    HTTP(S)_PROXY and NO_PROXY as litellm's own transport does."""
    from plugins.providers.litellm_provider import _env_proxy

    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert _env_proxy("http://models.example:8000/v1/chat/completions") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert _env_proxy("http://models.example:8000/v1/x") == "http://proxy.internal:3128"
    assert _env_proxy("http://127.0.0.1:8000/v1/x") is None
    assert _env_proxy("https://api.example/v1/x") is None  # no HTTPS_PROXY given
