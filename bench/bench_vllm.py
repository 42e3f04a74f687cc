"""The real `vllm serve` under vkr's supervision, where a CUDA GPU and weights exist.

Starts the server through ``provider: vllm`` (as a run does), reports how long it took to
become ready, sends ``--calls`` video_dependency calls (the step's own prompt and schema,
4 real frames of a video each) through vkr's ModelCaller at ``--concurrency``, and reports
throughput. Then it SIGKILLs the server once and reports how long until a call succeeds
again (the supervisor's restart plus vLLM's reload). Every call is a cache miss (a distinct
sample index) and the cache is a fresh temporary folder.

    .venv/bin/python bench/bench_vllm.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        [--calls 64] [--concurrency 8] [--tensor-parallel-size 1] [--video clip.mp4]

``--stand-in`` runs the same steps against vkr's fake model server (no GPU needed): it
checks the script, not vLLM.

Exits 2 with one line naming what is missing (vllm, a CUDA GPU) where it cannot run.
vllm is never imported: the supervisor runs its command line.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vkr_core.config import ModelSpec  # noqa: E402
from vkr_core.schemas import Frame  # noqa: E402

# Small enough for one GPU; the paper's gate models need two (docs/VLLM.md).
DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
QUESTION = "What is the person doing with the pan, and why does the food leave it?"
STAND_IN = (
    "import sys\nfrom plugins.providers.fake_server import serve_forever\n"
    "serve_forever('127.0.0.1', int(sys.argv[1]), 0, None, None)\n"
)
OPTIONS = ["A. Flipping a pancake", "B. Washing the pan", "C. Boiling water", "D. Nothing"]


def missing() -> list[str]:
    """What this machine lacks to run the real thing, each with how to get it."""
    lacks = []
    if shutil.which("vllm") is None and importlib.util.find_spec("vllm") is None:
        lacks.append("vllm (pip install 'vkr[vllm]')")
    gpus = ""
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        gpus = listed.stdout if listed.returncode == 0 else ""
    if "GPU" not in gpus:
        lacks.append("a CUDA GPU (nvidia-smi lists none)")
    return lacks


def default_video() -> Path:
    """The pancake clip the tests make (a fresh clone has no other video)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from videos import PANCAKE, video_dir

    return Path(video_dir()) / PANCAKE


def frames_of(video: Path, count: int, folder: Path) -> list[Frame]:
    """``count`` frames spread over the video, as the JPEGs vkr sends (768 px long side)."""
    import av

    with av.open(str(video)) as container:
        decoded = [(f.time or 0.0, f.to_image()) for f in container.decode(video=0)]
    stride = max(1, len(decoded) // count)
    frames = []
    for index in range(count):
        timestamp, image = decoded[(index * stride) % len(decoded)]
        scale = 768 / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
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


async def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from plugins.providers.vllm import VllmProvider
    from plugins.steps.video_dependency import PROMPT, VideoDependency
    from vkr_core.answers import question_block
    from vkr_core.calls import ModelCaller, image_part
    from vkr_core.steps import ReplyError
    from vkr_core.store import RunLayout

    options: dict[str, Any] = {
        "model": args.model,
        "tensor_parallel_size": args.tensor_parallel_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "max_model_len": args.max_model_len,
        "ready_timeout": args.ready_timeout,
        "max_restarts": 1,
        "args": ["--limit-mm-per-prompt", '{"image": 4}'],
    }
    if args.stand_in:
        # vkr's fake model server in vllm's place: checks this script, measures nothing.
        options = {
            "command": ["{python}", "-c", STAND_IN, "{port}"],
            "ready_timeout": args.ready_timeout,
            "max_restarts": 1,
        }
        args.served_name = "fake-a"  # a name the fake server lists
    spec = ModelSpec(
        name="bench",
        model=args.served_name,
        provider="vllm",
        options={k: v for k, v in options.items() if v is not None},
        max_concurrency=args.concurrency,
        timeout=600,
    )
    provider = VllmProvider()
    provider.check_entry(spec)
    layout = RunLayout(work)  # the scratch folder laid out as a run directory
    provider.use_folder(layout.provider_files("vllm"))
    caller = ModelCaller(cache_dir=layout.cache, providers={"vllm": provider})
    step = VideoDependency()
    frames = frames_of(args.video, 4, work)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": PROMPT.render()},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": question_block(QUESTION, OPTIONS)},
                {"type": "text", "text": "A few frames from the video:"},
                *(image_part(frame) for frame in frames),
            ],
        },
    ]

    async def one(sample: int) -> tuple[float, str]:
        started = time.perf_counter()
        result = await caller.call(
            spec=spec,
            step=step.name,
            prompt_version=step.version(),
            messages=messages,
            params={"temperature": 0.7, "max_tokens": 256},
            sample=sample,
            validate=step.format_output,
        )
        return time.perf_counter() - started, result.outcome

    try:
        started = time.perf_counter()
        provider.warm_up([spec])
        await provider.wait_ready(spec)
        startup = time.perf_counter() - started
        print(f"ready after {startup:.1f}s (log: {provider.server(spec).log_path})", flush=True)

        queue = list(range(args.calls))
        results: list[tuple[float, str]] = []

        async def worker() -> None:
            while queue:
                results.append(await one(queue.pop()))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - started
        latencies = sorted(r[0] for r in results)
        outcomes = {o: sum(1 for r in results if r[1] == o) for o in {r[1] for r in results}}
        print(
            f"{args.calls} calls at concurrency {args.concurrency}: {args.calls / elapsed:.2f} "
            f"calls/s, p50 {statistics.median(latencies):.2f}s, outcomes {outcomes}",
            flush=True,
        )

        server = provider.server(spec)
        assert server.pid is not None
        killed = time.perf_counter()
        os.kill(server.pid, signal.SIGKILL)
        try:
            await one(args.calls + 1)
        except ReplyError:
            pass  # a malformed reply is still an answer: the server is back
        recovery = time.perf_counter() - killed
        print(f"killed once: a call succeeded again after {recovery:.1f}s", flush=True)
    finally:
        await caller.aclose()
    return {
        "model": "stand-in (vkr's fake model server)" if args.stand_in else args.model,
        "calls": args.calls,
        "concurrency": args.concurrency,
        "startup_s": round(startup, 2),
        "calls_per_s": round(args.calls / elapsed, 3),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "outcomes": outcomes,
        "restart_recovery_s": round(recovery, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="HF id or local path")
    parser.add_argument("--served-name", default="bench-model")
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tensor-parallel-size", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--ready-timeout", type=float, default=1800.0)
    parser.add_argument("--video", type=Path, help="default: the tests' pancake clip")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="serve with vkr's fake model server instead of vllm: checks this script on a "
        "machine without a GPU (the numbers mean nothing)",
    )
    args = parser.parse_args()
    lacks = [] if args.stand_in else missing()
    if lacks:
        print(f"bench_vllm: cannot run here, missing: {'; '.join(lacks)}", file=sys.stderr)
        return 2
    args.video = args.video or default_video()
    with tempfile.TemporaryDirectory(prefix="vkr-bench-vllm-") as work:
        results = asyncio.run(bench(args, Path(work)))
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
