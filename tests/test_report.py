"""`vkr report`: numbers checked against the records, calls.jsonl and the fake server's /stats.

One real run (real videos decoded, real litellm over HTTP to the loopback fake server) is
made once per module and shared: each video is processed under a policy whose outcome is
known, so the funnel has known shares at known gates.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from corpus.report import (
    build_report,
    normalise_reason,
    report_png,
    summary_text,
    write_report,
)
from plugins.providers.fake_server import (
    INPUT_COST_PER_TOKEN,
    OUTPUT_COST_PER_TOKEN,
    FakeModelServer,
    write_pool,
)
from vkr_core.config import RunConfig
from vkr_core.plugins import get_plugin_manager
from vkr_core.run import process_items
from vkr_core.schemas import InputError, Video, VideoRecord
from vkr_core.store import RunStore

GATES = ["self_consistency", "video_dependency", "cot_verification"]
SKILLS = ["VidR", "KnowVid", "KnowVidR"]
ALL_PASS = {
    "self_consistency": {"accuracy": 1.0},
    "video_dependency": {"accuracy": 0.0},
    "cot_verification": {"cot_pass": 1.0},
}
# Each video is run under its own policy, so what happens to its six rounds is known.
POLICIES: dict[str, dict[str, Any]] = {
    # Everything passes; each blind model's first call is rate-limited once (a retry).
    "pancake": {
        "steps": {**ALL_PASS, "video_dependency": {"accuracy": 0.0, "script": ["429"]}},
        "defaults": {"retry_after_s": 0.0},
    },
    # Each generator model's first reply is broken and its second refused; the rest are
    # re-solved wrong, so nothing from this video passes self_consistency.
    "rotated": {
        "steps": {
            "example_generation": {"script": ["malformed", "refusal"]},
            "self_consistency": {"accuracy": 0.0},
        }
    },
    # Everything passes until the CoT verifier, which fails every trace: half of all
    # examples that reach cot_verification are dropped there.
    "unordered": {"steps": {**ALL_PASS, "cot_verification": {"cot_pass": 0.0}}},
}
FILES = {
    "pancake": "flipping_a_pancake.mkv",
    "rotated": "video_90.mov",
    "unordered": "unordered.mov",
}


@dataclass
class MadeRun:
    run_dir: Path
    videos: list[Video]
    pool: Path
    stats: dict[str, Any]
    server: FakeModelServer
    pm: Any

    def records(self) -> dict[str, VideoRecord]:
        return {r.video_id: r for r in RunStore(self.run_dir).records()}

    def call_lines(self) -> list[dict[str, Any]]:
        text = (self.run_dir / "calls.jsonl").read_text()
        return [json.loads(line) for line in text.splitlines() if line]


@pytest.fixture(scope="module")
def made_run(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Any:
    # Module scope: the pipeline runs once for every test here (the function-scoped
    # vkr_fake_server / vkr_pool fixtures are the same server and pool writer).
    tmp = tmp_path_factory.mktemp("report")
    folder = tmp / "videos"
    folder.mkdir()
    videos = []
    for video_id, name in FILES.items():
        target = folder / f"{video_id}{Path(name).suffix}"
        shutil.copy(testdata / name, target)
        videos.append(Video(video_id=video_id, path=str(target), discipline="cooking"))
    (folder / "broken.mp4").write_text("this is a text file, not a video\n")
    videos.append(Video(video_id="broken", path=str(folder / "broken.mp4")))
    pm = get_plugin_manager()
    with FakeModelServer(seed=0) as server:
        pool = write_pool(
            tmp / "pool.yaml", server.base_url, registry_path=tmp / "elig.yaml", pm=pm
        )
        run_dir = tmp / "run"
        # The undecodable file makes no calls, so it rides along with the last policy.
        for batch in (videos[:1], videos[1:2], videos[2:]):
            server.set_policy(POLICIES[batch[0].video_id])
            asyncio.run(process_items(batch, run_dir, pool, RunConfig(), pm))
        yield MadeRun(run_dir, videos, pool, server.stats(), server, pm)


@pytest.fixture(scope="module")
def report(made_run: MadeRun) -> dict[str, Any]:
    return build_report(made_run.run_dir, GATES)


def stage(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [row] = [r for r in rows if r["stage"] == name]
    return row


def test_funnel_has_the_known_shares_and_matches_the_records(made_run, report):
    records = made_run.records()
    assert records["pancake"].status == "done" and len(records["pancake"].accepted) == 6
    generation_rejects = [r for r in records["rotated"].rejected if r.step == "example_generation"]
    assert generation_rejects, "the script should break the first generations of rotated"

    overall = report["funnel"]["overall"]
    assert report["gates"] == GATES
    assert [r["stage"] for r in overall] == [
        "rounds",
        "generated",
        "after self_consistency",
        "after video_dependency",
        "after cot_verification",
        "accepted",
    ]
    assert stage(overall, "rounds")["count"] == 18
    assert stage(overall, "generated")["count"] == 18 - len(generation_rejects)
    # Only pancake and unordered get past self_consistency; the verifier drops unordered's 6.
    assert stage(overall, "after video_dependency")["count"] == 12
    cot = stage(overall, "after cot_verification")
    assert (cot["count"], cot["rejected"], cot["kept_share"]) == (6, 6, 0.5)
    assert stage(overall, "accepted")["count"] == 6
    assert stage(overall, "accepted")["share_of_rounds"] == pytest.approx(6 / 18)
    # The last gate's survivors are exactly the accepted examples of the records.
    assert sum(len(r.accepted) for r in records.values()) == 6

    by_skill = report["funnel"]["by_skill"]
    assert list(by_skill) == SKILLS
    for skill, rows in by_skill.items():
        assert stage(rows, "rounds")["count"] == 6  # 2 rounds x 3 decodable videos
        assert stage(rows, "accepted")["count"] == 2  # pancake's two
        assert stage(rows, "after cot_verification")["rejected"] == 2  # unordered's two
        rejected_here = Counter(
            r.step for rec in records.values() for r in rec.rejected if r.skill == skill
        )
        for row in rows[1:-1]:
            assert row["rejected"] == rejected_here[row["step"]], (skill, row)

    totals = report["totals"]
    assert (totals["videos_done"], totals["videos_failed"], totals["accepted"]) == (3, 1, 6)


def test_paid_calls_tokens_and_spend_match_the_fake_server(made_run, report):
    stats = made_run.stats
    totals = report["totals"]
    assert totals["paid_calls"] == stats["completions"]
    assert totals["cache_hits"] == 0 and totals["cache_hit_rate"] == 0.0
    # Every HTTP request the server saw is an attempt: the two 429s were retried.
    assert stats["faults"]["429"] == 2
    assert totals["requests"] == stats["requests"]
    assert totals["retries"] == 2
    assert report["steps"]["video_dependency"]["retries"] == 2
    assert {m: s["paid_calls"] for m, s in report["models"].items()} == stats["by_model"]
    assert {s: v["paid_calls"] for s, v in report["steps"].items()} == stats["by_step"]
    # The fake server bills fixed prices per token, so spend follows from the token counts.
    expected = (
        totals["prompt_tokens"] * INPUT_COST_PER_TOKEN
        + totals["completion_tokens"] * OUTPUT_COST_PER_TOKEN
    )
    assert totals["spend_usd"] == pytest.approx(expected, rel=1e-9)
    assert totals["spend_usd"] > 0
    lines = made_run.call_lines()
    assert totals["spend_usd"] == pytest.approx(sum(c["cost_usd"] for c in lines))
    assert sum(m["spend_usd"] for m in report["models"].values()) == pytest.approx(
        totals["spend_usd"]
    )
    assert totals["cost_per_accepted_usd"] == pytest.approx(totals["spend_usd"] / 6)
    # Refusals and broken replies are billed and counted where they happened.
    outcomes = report["steps"]["example_generation"]["outcomes"]
    rejected_kinds = Counter(r.kind for r in made_run.records()["rotated"].rejected)
    assert outcomes["malformed"] == rejected_kinds["malformed"] > 0
    assert outcomes["refusal"] == rejected_kinds["refusal"] > 0
    for name, model in report["models"].items():
        latencies = [c["latency_s"] for c in lines if c["model"] == name]
        assert model["latency_p50_s"] == pytest.approx(statistics.median(latencies))
        assert min(latencies) <= model["latency_p50_s"] <= model["latency_p95_s"]
        assert model["latency_p95_s"] <= max(latencies)


def test_rejection_reasons_group_particulars_and_keep_raw_examples(made_run, report):
    records = made_run.records()
    rejections = report["rejections"]
    assert list(rejections) == ["example_generation", "self_consistency", "cot_verification"]
    sc_raw = [r.reason for r in records["rotated"].rejected if r.step == "self_consistency"]
    [group] = rejections["self_consistency"]["reasons"]
    assert group["reason"] == "re-solved answer '…' differs from '…'"
    assert group["count"] == len(sc_raw) and group["kinds"] == {"gate": len(sc_raw)}
    assert 1 <= len(group["examples"]) <= 3 and set(group["examples"]) <= set(sc_raw)
    cot = rejections["cot_verification"]
    assert cot["total"] == 6 and sum(g["count"] for g in cot["reasons"]) == 6
    assert all(g["reason"].startswith("critical unsupported step") for g in cot["reasons"])
    generation = rejections["example_generation"]
    assert set(generation["kinds"]) == {"malformed", "refusal"}
    refused = [g for g in generation["reasons"] if g["kinds"] == {"refusal": g["count"]}]
    # "fake-a refused (content_filter)" and "fake-b refused ..." are one reason.
    assert [g["reason"] for g in refused] == ["{model} refused (content_filter)"]


def test_reason_normalisation_blanks_answers_ids_models_and_numbers():
    models = ["fake-a", "gpt-4o"]
    assert normalise_reason("re-solved answer 'B' differs from 'C'") == normalise_reason(
        "re-solved answer \"it's heat\" differs from 'friction'"
    )
    assert normalise_reason("gpt-4o refused (content_filter)", models) == (
        "{model} refused (content_filter)"
    )
    assert normalise_reason("step 3 of [q:0a1b2c3d:mc] is unsupported") == (
        "step N of {id} is unsupported"
    )
    # An apostrophe inside a word is not a quote.
    assert normalise_reason("can't parse 'X'") == "can't parse '…'"


def test_failures_show_the_latest_reason_and_drop_videos_that_later_succeeded(made_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(made_run.run_dir, run_dir, ignore=shutil.ignore_patterns("cache"))
    report = build_report(run_dir)
    [failure] = report["failures"]
    assert failure["video_id"] == "broken" and "broken.mp4" in failure["reason"]
    assert failure["attempts"] == 1
    # Later attempts, as a rerun appends them: pancake's earlier failure is superseded by
    # its done record; broken's newest reason is the one to show.
    store = RunStore(run_dir)
    store.add_failure("pancake", "model calls failed: fake-a timed out", "pancake.mkv")
    store.add_failure("broken", "still not a video (second attempt)", failure["path"])
    report = build_report(run_dir)
    assert [(f["video_id"], f["reason"], f["attempts"]) for f in report["failures"]] == [
        ("broken", "still not a video (second attempt)", 2)
    ]
    assert report["totals"]["videos_failed"] == 1 and report["totals"]["videos_done"] == 3


def test_a_fresh_run_sharing_the_cache_reports_hits_and_pays_only_for_refusals(
    made_run, report, tmp_path
):
    run_dir = tmp_path / "rerun"
    shutil.copytree(made_run.run_dir / "cache", run_dir / "cache")
    server = made_run.server
    # Refuse again, so the only paid calls are the replays of the refused ones.
    server.set_policy({"steps": {"example_generation": {"refusal": 1.0}}})
    server.reset_stats()
    asyncio.run(process_items(made_run.videos, run_dir, made_run.pool, RunConfig(), made_run.pm))
    replay = build_report(run_dir)
    first = report["totals"]
    # Refusals are never cached (they say nothing about the next request), so exactly those
    # calls are paid again; everything else replays from the shared cache for free.
    refusals = first["outcomes"]["refusal"]
    assert replay["totals"]["paid_calls"] == server.stats()["completions"] == refusals
    assert replay["totals"]["cache_hits"] == first["paid_calls"] - refusals
    assert replay["totals"]["cache_hit_rate"] == pytest.approx(
        (first["paid_calls"] - refusals) / first["paid_calls"]
    )
    assert replay["totals"]["saved_usd"] > 0
    assert replay["totals"]["spend_usd"] < first["spend_usd"] / 4


def test_gate_order_is_read_from_the_records_alone(made_run, report):
    assert build_report(made_run.run_dir)["gates"] == GATES
    # A stale or different known order only breaks ties; what the records show wins.
    reordered = build_report(made_run.run_dir, list(reversed(GATES)))
    assert reordered["gates"] == GATES
    assert reordered["funnel"] == report["funnel"]


def test_cli_prints_a_summary_and_writes_the_four_files(made_run, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["report", str(made_run.run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "after cot_verification" in result.output and "fake-a" in result.output
    assert "broken" in result.output  # the failures table

    data = json.loads((out / "report.json").read_text())
    assert data["totals"]["accepted"] == 6 and data["gates"] == GATES

    markdown = (out / "report.md").read_text()
    assert "| stage | examples | rejected here | kept of previous | of rounds |" in markdown
    assert "| after cot_verification | 6 | 6 | 50.0% | 33.3% |" in markdown
    assert "| model | calls | paid |" in markdown and "| broken |" in markdown

    page = (out / "report.html").read_text()
    assert page.count("<svg") == 2 and "<script" not in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
    # One bar per funnel stage and per model.
    assert page.count("<rect") == len(data["funnel"]["overall"]) + len(data["models"])

    with Image.open(out / "report.png") as image:
        image.load()
        assert image.format == "PNG" and image.width == 1000 and 300 < image.height < 2000
        colours = Counter(image.convert("RGB").getdata())
    # Both charts have bars: the funnel's blue and the cost chart's amber.
    assert colours[(0x2F, 0x81, 0xF7)] > 1000 and colours[(0xD4, 0xA7, 0x2C)] > 1000
    assert not (made_run.run_dir / "report.json").exists()  # --out was honoured


def test_cli_defaults_to_writing_into_the_run_directory(made_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(made_run.run_dir, run_dir, ignore=shutil.ignore_patterns("cache", "frames"))
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in run_dir.glob("report.*")} == {
        "report.json",
        "report.md",
        "report.html",
        "report.png",
    }


def test_summary_text_says_what_the_run_did(report):
    text = summary_text(report)
    assert "videos: 3 done, 1 failed" in text
    assert "accepted 6 (33.3% accepted)" in text
    assert "re-solved answer '…' differs from '…'" in text or "critical unsupported" in text
    assert "failed: broken" in text
    assert len(text.splitlines()) <= 6


def test_a_cut_call_line_and_a_bad_record_are_skipped_with_warnings(made_run, report, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(made_run.run_dir, run_dir, ignore=shutil.ignore_patterns("cache", "frames"))
    with (run_dir / "calls.jsonl").open("a") as handle:
        handle.write('{"step": "self_consistency", "model": "fake-a", "lat')
    (run_dir / "records" / "stray.json").write_text('{"video_id": "stray", "status": "done"}')
    damaged = build_report(run_dir)
    assert damaged["totals"]["paid_calls"] == report["totals"]["paid_calls"]
    assert damaged["funnel"] == report["funnel"]
    assert len(damaged["warnings"]) == 2
    [call_warning] = [w for w in damaged["warnings"] if "calls.jsonl" in w]
    [record_warning] = [w for w in damaged["warnings"] if "stray.json" in w]
    cut = f"{run_dir / 'calls.jsonl'}:{len(made_run.call_lines()) + 1}: cut short"
    assert call_warning.startswith(f"skipped {cut}")
    assert "stray.json: video: Field required" in record_warning
    result = CliRunner().invoke(cli, ["report", str(run_dir)])
    assert result.exit_code == 0 and f"warning: skipped {cut}" in result.output


def test_not_a_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        build_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 1
    assert f"{tmp_path / 'empty'} is not a vkr run directory" in result.output
    assert not list((tmp_path / "empty").iterdir())  # nothing written into a wrong folder


def test_an_empty_run_still_renders(tmp_path):
    (tmp_path / "run" / "records").mkdir(parents=True)
    report = build_report(tmp_path / "run", GATES)
    assert report["gates"] == GATES and report["totals"]["cost_per_accepted_usd"] is None
    paths = write_report(report, tmp_path / "run")
    assert "No rejections." in paths["md"].read_text()
    with Image.open(report_png(report, tmp_path / "empty.png")) as image:
        assert image.width == 1000
