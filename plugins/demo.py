"""`vkr demo`: the whole graph on a small made-up video against the scripted local server.

No network and no download: the video is drawn here, the model server is the fake
OpenAI-compatible server on 127.0.0.1, and the real litellm client talks HTTP to it.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import click

from vkr_core.files import atomic_path
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import InputError

DEMO_VIDEO_ID = "demo_pendulum"


def make_demo_video(
    path: Path, seconds: int = 30, fps: int = 10, size: tuple[int, int] = (320, 180)
) -> Path:
    """Draw a swinging pendulum next to a filling beaker, deterministically, as H.264 MP4."""
    import av
    import numpy as np

    if path.exists() and path.stat().st_size > 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    # The temporary file has no .mp4 extension to guess the format from: name it.
    with (
        atomic_path(path) as temporary,
        av.open(str(temporary), mode="w", format="mp4") as container,
    ):
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "28"}
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(seconds * fps):
            t = i / fps
            frame = np.full((height, width, 3), 235, dtype=np.uint8)
            frame[:, :, 2] = (200 + 30 * np.sin(xx / 17.0)).astype(np.uint8)
            pivot_x, pivot_y, length = 90, 20, 110
            angle = 0.6 * math.cos(2 * math.pi * t / 4.0) * math.exp(-t / 40)
            bob_x = int(pivot_x + length * math.sin(angle))
            bob_y = int(pivot_y + length * math.cos(angle))
            for s in np.linspace(0, 1, 60):
                x = int(pivot_x + s * (bob_x - pivot_x))
                y = int(pivot_y + s * (bob_y - pivot_y))
                frame[max(y - 1, 0) : y + 1, max(x - 1, 0) : x + 1] = 40
            frame[(xx - bob_x) ** 2 + (yy - bob_y) ** 2 < 12**2] = (200, 40, 40)
            level = int(40 + 90 * t / seconds)
            frame[height - 20 - level : height - 20, 220:280] = (60, 120, 220)
            frame[height - 150 : height - 18, 216:220] = 30
            frame[height - 150 : height - 18, 280:284] = 30
            frame[height - 20 : height - 16, 216:284] = 30
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def run_demo(out: Path, port: int) -> dict[str, Any]:
    """Run the demo and return what it printed about: funnel rows, stats, record path."""
    from graphs.generation import funnel
    from plugins.providers.fake_server import FakeModelServer, write_pool
    from vkr_core.config import RunConfig
    from vkr_core.log import configure_logging
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.run import process_items
    from vkr_core.schemas import KnowledgePoint, Video

    configure_logging("ERROR")
    pm = get_plugin_manager()
    video_path = make_demo_video(out / "videos" / f"{DEMO_VIDEO_ID}.mp4")
    video = Video(
        video_id=DEMO_VIDEO_ID,
        path=str(video_path.resolve()),
        discipline="physics",
        subject="mechanics",
        knowledge_point=KnowledgePoint(
            term="simple pendulum",
            definition="A mass on a string swinging under gravity with period 2*pi*sqrt(L/g) for small angles.",
        ),
        title="Pendulum and beaker (demo)",
    )
    # Blind models do worse than ones that see the whole video, as real ones do.
    with FakeModelServer(
        policy={"steps": {"video_dependency": {"accuracy": 0.4}}}, seed=0
    ) as server:
        try:
            base_url = server.start(port=port)
        except InputError:
            # Another program holds the port: run anyway. The pool's api_base changes with
            # the port, so this run cannot reuse the cache of runs on the usual port.
            base_url = server.start(port=0)
        pool_path = write_pool(
            out / "pool.yaml", base_url, registry_path=out / "eligibility.yaml", pm=pm
        )
        [record] = asyncio.run(process_items([video], out / "run", pool_path, RunConfig(), pm))
        stats = server.stats()
    gates = [g.name for g in pm.registry.gates()]
    return {
        "record": record,
        "funnel": funnel([record], gates),
        "stats": stats,
        "base_url": base_url,
        "pool": pool_path,
    }


# The fake YouTube's videos for `vkr demo --collect`: found by the example bank's lecture
# titles, each dropped at a different stage of the funnel but two.
DEMO_YOUTUBE: tuple[tuple[str, str, tuple[str, ...], dict[str, str]], ...] = (
    ("lathe0001", "Turning a steel shaft on a lathe", ("turning on a lathe",), {}),
    ("gears00001", "A lathe's gear train, close up", ("gear trains", "turning on a lathe"), {}),
    ("newton0001", "Newton's laws of motion in a crash test", ("newton's laws",), {}),
    ("torque0001", "Torque wrench review", ("rotational dynamics",), {"license": "youtube"}),
    ("heat000001", "Heat transfer, full lecture", ("heat transfer",), {"duration": "PT52M"}),
    ("newton0002", "Off-topic: my weekend vlog", ("newton's laws",), {}),
    ("newton0003", "Newton's laws: a crash, uncut", ("newton's laws",), {}),
)
# The demo's moderation flags this one's frames as violent.
DEMO_UNSAFE = "newton0003"


def run_collect_demo(out: Path, port: int) -> dict[str, Any]:
    """`vkr demo --collect`: the example bank to a manifest against loopback YouTube, model
    and moderation servers, then `vkr run` on that manifest."""
    import os

    from graphs.collection import collect, format_report
    from knowledge.loader import example_bank_path
    from plugins.providers.fake_moderation import FakeAzureContentSafety
    from plugins.providers.fake_server import FakeModelServer, write_pool
    from plugins.providers.fake_youtube import FakeVideo, FakeYouTubeServer
    from vkr_core.config import RunConfig
    from vkr_core.log import configure_logging
    from vkr_core.manifest import load_manifest
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.run import run_items

    configure_logging("ERROR")
    pm = get_plugin_manager()
    videos = [
        FakeVideo(vid, title, keywords, shade=n, **extra)  # type: ignore[arg-type]
        for n, (vid, title, keywords, extra) in enumerate(DEMO_YOUTUBE)
    ]
    key = "vkr-demo-moderation-key"
    policy = {
        "steps": {"metadata_relevance": {"relevant": 1.0}, "visual_relevance": {"relevant": 1.0}}
    }
    with (
        FakeModelServer(policy=policy, seed=0) as server,
        FakeYouTubeServer(videos, match="contains") as youtube,
        FakeAzureContentSafety(api_key=key) as azure,
    ):
        try:
            base_url = server.start(port=port)
        except InputError:
            base_url = server.start(port=0)
        _mark_unsafe(azure, videos, out / "marked-frames", pm)
        pool = write_pool(
            out / "pool.yaml", base_url, registry_path=out / "eligibility.yaml", pm=pm
        )
        saved = {name: os.environ.get(name) for name in _DEMO_ENV}
        os.environ.update(
            {
                "YOUTUBE_API_KEY": youtube.api_key,
                "AZURE_CONTENT_SAFETY_ENDPOINT": str(azure.url),
                "AZURE_CONTENT_SAFETY_KEY": key,
            }
        )
        try:
            result = collect(
                example_bank_path(),
                pool,
                out / "collection",
                youtube_api_base=youtube.base_url,
                download_url_template=youtube.file_url_template,
                moderation={"provider": "azure-content-safety"},
                download_interval=0,
                pm=pm,
            )
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        manifest = load_manifest(out / "collection" / "manifest.jsonl")
        config = RunConfig(video_root=manifest.video_root)
        counters = asyncio.run(
            run_items(manifest.videos, out / "run", pool, config, pm, progress=False)
        )
        summary = pm.registry.get("pipeline", "generation").summary(out / "run", counters)
    return {
        "report": format_report(result.report),
        "kept": result.report["kept"],
        "manifest": result.report["manifest"],
        "run": summary or counters.line(),
        "base_url": base_url,
    }


def _mark_unsafe(azure: Any, videos: list[Any], folder: Path, pm: Any) -> None:
    """Script the moderation server to flag every frame the collection samples from the
    demo's unsafe video (it samples the same file the same way)."""
    from graphs.collection import CollectConfig
    from plugins.providers.fake_youtube import clip_file
    from vkr_core.video import sample_frames

    config = CollectConfig()
    shade = next(v.shade for v in videos if v.video_id == DEMO_UNSAFE)
    for frame in sample_frames(
        clip_file(shade), folder, fps=config.frame_fps, max_frames=config.frame_max, pm=pm
    ):
        azure.mark(frame.sha256, {"Violence": 6})


_DEMO_ENV = ("YOUTUBE_API_KEY", "AZURE_CONTENT_SAFETY_ENDPOINT", "AZURE_CONTENT_SAFETY_KEY")


@click.command()
@click.option(
    "--out",
    default="vkr-runs/demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the demo writes its video, pool and run directory.",
)
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Loopback port of the scripted model server (kept fixed so reruns hit the cache; "
    "0: any free port).",
)
@click.option(
    "--collect",
    "collect_first",
    is_flag=True,
    help="Collect first: the example bank -> a manifest (loopback YouTube, moderation and "
    "model servers), then `vkr run` on it.",
)
def demo(out: str, port: int, collect_first: bool) -> None:
    """Run the whole pipeline on a made-up video against a scripted local model server."""
    from graphs.generation import format_funnel
    from vkr_core.store import RunLayout

    if collect_first:
        collected = run_collect_demo(Path(out) / "collect", port)
        click.echo(collected["report"])
        click.echo(f"manifest: {collected['manifest']} ({collected['kept']} video(s))")
        click.echo(f"vkr run on the manifest: {collected['run']}")
        click.echo(
            "\nEverything above came from SCRIPTED local servers (YouTube, models, "
            "moderation). With real ones: vkr collect --bank BANK --pool POOL --out DIR"
        )
        return

    result = run_demo(Path(out), port)
    record = result["record"]
    if record.status == "failed":
        raise click.ClickException(f"demo video failed: {record.failure}")
    stats = result["stats"]
    click.echo(f"vkr demo: video {record.video_id}, {record.frames} frames sampled at 0.2 fps")
    click.echo(format_funnel(result["funnel"]))
    click.echo(f"model calls made this run: {stats['completions']} (server /stats)")
    click.echo(f"record: {RunLayout(Path(out) / 'run').record(record.video_id)}")
    click.echo(
        "\nThese answers came from a SCRIPTED local endpoint ("
        + result["base_url"]
        + "), not a real model.\nTo use real models, write a pool file like "
        + str(result["pool"])
        + " with litellm model names (e.g. openai/gpt-4o, anthropic/claude-sonnet-4-5) and "
        "api_key_env, give it an eligibility registry, and run:\n"
        "  vkr generate --video-id ID --videos-dir DIR --pool POOL.yaml --out RUN_DIR"
    )


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(demo)
