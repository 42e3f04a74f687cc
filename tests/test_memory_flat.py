"""Memory flat in the number of videos: a run keeps counters, a report reads one record at a time.

A real run (real videos decoded, real litellm over HTTP to the loopback fake server) is made
once; its run directory is then copied into bigger ones (each record and call line repeated
under new video ids) to see that `vkr report` costs the same memory over 10 or 100 times
the videos, and still counts every one of them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli import cli
from corpus.report import build_report
from graphs.generation import format_funnel, funnel
from plugins.providers.fake_server import FakeModelServer, write_pool
from vkr_core.batch import BatchCounters
from vkr_core.config import RunConfig
from vkr_core.manifest import load_manifest
from vkr_core.plugins import get_plugin_manager
from vkr_core.run import run_items
from vkr_core.store import RunStore

GATES = ["self_consistency", "video_dependency", "cot_verification"]
FILES = {"memclipa": "flipping_a_pancake.mkv", "memclipb": "unordered.mov"}
# Half the traces fail the CoT check and some answers are re-solved wrong: the funnel has
# rejections at more than one gate, and the report has reasons to group.
POLICY = {
    "steps": {
        "self_consistency": {"accuracy": 0.7},
        "video_dependency": {"accuracy": 0.0},
        "cot_verification": {"cot_pass": 0.5},
    }
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Any:
    tmp = tmp_path_factory.mktemp("memory")
    folder = tmp / "videos"
    folder.mkdir()
    lines = []
    for video_id, name in FILES.items():
        shutil.copy(testdata / name, folder / f"{video_id}{Path(name).suffix}")
        path = f"{video_id}{Path(name).suffix}"
        lines.append({"video_id": video_id, "path": path, "discipline": "cooking"})
    (folder / "memclipc.mp4").write_text("this is a text file, not a video\n")
    lines.append({"video_id": "memclipc", "path": "memclipc.mp4", "discipline": "cooking"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    pm = get_plugin_manager()
    with FakeModelServer(seed=0) as server:
        server.set_policy(POLICY)
        pool = write_pool(tmp / "pool.yaml", server.base_url, registry_path=tmp / "e.yaml", pm=pm)
        yield {"tmp": tmp, "manifest": manifest, "pool": pool, "pm": pm, "server": server}


def test_a_run_returns_counters_that_print_the_funnel_of_its_records(made: Any) -> None:
    loaded = load_manifest(made["manifest"])
    run_dir = made["tmp"] / "library-run"
    config = RunConfig(video_root=loaded.video_root)
    counters = asyncio.run(
        run_items(loaded.videos, run_dir, made["pool"], config, made["pm"], progress=False)
    )
    # Counters, not a list of every record: the records are in the run directory.
    assert isinstance(counters, BatchCounters)
    from corpus.report import funnels

    records = RunStore(run_dir).records()
    assert (counters.done, counters.failed, counters.unfinished) == (2, 1, 0)
    assert counters.accepted == sum(len(r.accepted) for r in records)
    assert funnels(counters.funnel, GATES) == funnels(records, GATES)
    assert funnel(counters.funnel, GATES) == funnel(records, GATES)
    calls = RunStore(run_dir).calls()
    assert counters.paid_calls == sum(1 for c in calls if not c.cache_hit and c.outcome != "error")
    assert counters.spend_usd == pytest.approx(
        sum(c.cost_usd for c in calls if not c.cache_hit and c.outcome != "error")
    )
    stages = dict(funnel(records, GATES))
    assert 0 < stages["accepted"] < stages["rounds"] == 12


def test_vkr_run_prints_the_same_end_lines_from_counters_and_on_a_finished_rerun(
    made: Any,
) -> None:
    run_dir = made["tmp"] / "cli-run"
    args = ["run", "--videos", str(made["manifest"]), "--pool", str(made["pool"])]
    args += ["--out", str(run_dir), "--no-progress", "--concurrency", "3"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 3, first.output  # the text file is a failed video
    expected = format_funnel(funnel(RunStore(run_dir).records(), GATES))
    assert expected in first.output
    assert "videos 3/3 (failed 1)" in first.output
    # A rerun of the finished directory pays for nothing and prints the same funnel.
    rerun = CliRunner().invoke(cli, args)
    assert rerun.exit_code == 3, rerun.output
    assert expected in rerun.output
    assert "calls paid 0" in rerun.output
    summary = [line for line in first.output.splitlines() if line.startswith("funnel: ")]
    assert summary and summary == [
        line for line in rerun.output.splitlines() if line.startswith("funnel: ")
    ]


def _multiply(source: Path, target: Path, copies: int) -> None:
    """A run directory holding ``copies`` of every video of ``source`` under new ids."""
    ids = sorted(p.stem for p in (source / "records").glob("*.json"))
    (target / "records").mkdir(parents=True)

    def renamed(text: str, copy: int) -> str:
        for video_id in ids:
            text = text.replace(video_id, f"{video_id}x{copy:04d}")
        return text

    calls = (source / "calls.jsonl").read_text()
    failures = (source / "failures.jsonl").read_text()
    with (target / "calls.jsonl").open("w") as call_log:
        with (target / "failures.jsonl").open("w") as failure_log:
            for copy in range(copies):
                for video_id in ids:
                    text = (source / "records" / f"{video_id}.json").read_text()
                    name = f"{video_id}x{copy:04d}.json"
                    (target / "records" / name).write_text(renamed(text, copy))
                call_log.write(renamed(calls, copy))
                failure_log.write(renamed(failures, copy))


def _peak_bytes(run_dir: Path) -> tuple[dict[str, Any], int]:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        report = build_report(run_dir, GATES)
        return report, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_vkr_report_memory_does_not_grow_with_the_videos_and_every_video_counts(
    made: Any, tmp_path: Path
) -> None:
    source = made["tmp"] / "cli-run"
    if not (source / "records").is_dir():  # run alone: make the run directory here
        args = ["run", "--videos", str(made["manifest"]), "--pool", str(made["pool"])]
        CliRunner().invoke(cli, [*args, "--out", str(source), "--no-progress"])
    one = build_report(source, GATES)
    _multiply(source, tmp_path / "small", 10)
    _multiply(source, tmp_path / "big", 100)
    _peak_bytes(tmp_path / "small")  # first use: compiled patterns, imports
    small, small_peak = _peak_bytes(tmp_path / "small")
    big, big_peak = _peak_bytes(tmp_path / "big")
    # Held at once, a record costs ~50 KB as objects and its calls ~20 KB more (15 MB for
    # these 300 videos); read one at a time, what is left per video is its latencies and,
    # for the failed one, its row in the report.
    per_video = (big_peak - small_peak) / (big["totals"]["videos"] - small["totals"]["videos"])
    assert per_video < 3_000, (small_peak, big_peak)
    # ... and every video, round and call is still counted.
    for key in ("videos", "videos_done", "videos_failed", "rounds", "accepted", "calls"):
        assert big["totals"][key] == 100 * one["totals"][key] == 10 * small["totals"][key]
    assert big["totals"]["spend_usd"] == pytest.approx(100 * one["totals"]["spend_usd"])
    assert [r["count"] for r in big["funnel"]["overall"]] == [
        100 * r["count"] for r in one["funnel"]["overall"]
    ]
    for skill, rows in one["funnel"]["by_skill"].items():
        assert [r["count"] for r in big["funnel"]["by_skill"][skill]] == [
            100 * r["count"] for r in rows
        ]
    assert {s: i["total"] for s, i in big["rejections"].items()} == {
        s: 100 * i["total"] for s, i in one["rejections"].items()
    }
    assert len(big["failures"]) == 100
