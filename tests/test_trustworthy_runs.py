"""Runs a user can trust: a record says done only when every round has an outcome, a stopped
run is visible as unfinished to split and report, and one run directory has one run at a time.

Real `vkr run` processes against the scripted server, interrupted with a real SIGINT.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_run import VKR, accepted, vkr_run, write_manifest

ROUNDS = 6  # 3 skills x 2 rounds


def records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "records").glob("*.json"))}


def outcomes(record: dict) -> int:
    return len(record["accepted"]) + len(record["rejected"])


def start_run(manifest: Path, pool: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            VKR,
            "run",
            "--videos",
            str(manifest),
            "--pool",
            str(pool),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_completions(server, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.stats()["completions"] < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def interrupt(proc: subprocess.Popen) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def assert_no_partial_record_is_done(run_dir: Path, when: str) -> None:
    for video_id, record in records(run_dir).items():
        assert record["status"] in ("done", "unfinished", "failed"), (
            when,
            video_id,
            record["status"],
        )
        if record["status"] == "done":
            assert outcomes(record) == ROUNDS, (
                f"{when}: {video_id} is recorded done with {outcomes(record)} of {ROUNDS} outcomes"
            )


@pytest.mark.slow
def test_ctrl_c_at_twenty_random_moments_loses_nothing(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    vkr_fake_server.set_policy({"latency_ms": 60, "steps": {"self_consistency": {"accuracy": 0.7}}})
    manifest = write_manifest(tmp_path / "videos", testdata, good=8, bad=False)
    vkr_run(manifest, vkr_pool, tmp_path / "reference", "--concurrency", "2")
    reference = accepted(tmp_path / "reference")
    videos = sorted(records(tmp_path / "reference"))
    assert reference and len(videos) == 8

    run_dir = tmp_path / "interrupted"
    rng = random.Random(8)
    vkr_fake_server.reset_stats()
    interrupted = 0
    for moment in range(20):
        before = vkr_fake_server.stats()["completions"]
        proc = start_run(manifest, vkr_pool, run_dir, "--concurrency", "2")
        # A random moment: once 1 to 4 more replies have come back (a whole run makes ~240).
        wait_for_completions(vkr_fake_server, before + rng.randint(1, 4), proc)
        code, err = interrupt(proc)
        assert "Traceback" not in err, err
        if code == 130:
            interrupted += 1
            assert "run the same command to resume" in err
        else:
            assert code == 0, err
        assert_no_partial_record_is_done(run_dir, f"after interruption {moment}")
    assert interrupted >= 10, f"only {interrupted} of the 20 moments fell inside the run"

    vkr_run(manifest, vkr_pool, run_dir)
    final = records(run_dir)
    assert sorted(final) == videos
    for video_id, record in final.items():
        assert record["status"] == "done" and outcomes(record) == ROUNDS, video_id
    assert accepted(run_dir) == reference
    assert vkr_fake_server.stats()["repeats"] == 0


def test_split_and_report_see_a_stopped_run_as_unfinished(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    vkr_fake_server.set_policy({"latency_ms": 100})
    manifest = write_manifest(tmp_path / "videos", testdata, good=2, bad=False)
    run_dir = tmp_path / "run"
    vkr_run(manifest, vkr_pool, run_dir)
    # Two more videos, stopped after their first few replies.
    more = manifest.with_name("more.jsonl")
    for i in range(2):
        shutil.copy(testdata / "flipping_a_pancake.mkv", manifest.parent / f"late{i}.mkv")
    more.write_text(
        manifest.read_text()
        + "".join(
            json.dumps({"video_id": f"late{i}", "path": f"late{i}.mkv", "discipline": "cooking"})
            + "\n"
            for i in range(2)
        )
    )
    before = vkr_fake_server.stats()["completions"]
    proc = start_run(more, vkr_pool, run_dir)
    wait_for_completions(vkr_fake_server, before + 3, proc)
    code, err = interrupt(proc)
    assert code == 130, err
    status = {k: (r["status"], outcomes(r)) for k, r in records(run_dir).items()}
    assert status["good0"] == ("done", ROUNDS) and status["good1"] == ("done", ROUNDS)
    assert {status["late0"][0], status["late1"][0]} == {"unfinished"}, status

    # split refuses, naming the unfinished videos and what to do.
    refused = subprocess.run(
        [VKR, "split", str(run_dir), "--out", str(tmp_path / "split")],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert "2 video(s) are unfinished" in refused.stderr and "late0.json" in refused.stderr
    assert "--exclude-unfinished" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "split" / "sft.jsonl").exists()

    # With the flag it splits what is finished and lists what it left out.
    split = subprocess.run(
        [VKR, "split", str(run_dir), "--out", str(tmp_path / "split"), "--exclude-unfinished"],
        capture_output=True,
        text=True,
    )
    assert split.returncode == 0, split.stderr
    assert split.stderr.count("excluded unfinished video:") == 2
    manifest_json = json.loads((tmp_path / "split" / "split.json").read_text())
    assert len(manifest_json["excluded_unfinished"]) == 2
    videos = set(manifest_json["sft"]["video_ids"]) | set(manifest_json["rl"]["video_ids"])
    assert videos <= {"good0", "good1"} and videos

    # The report's funnel shows the rounds that have no outcome, and the unfinished videos.
    report = subprocess.run([VKR, "report", str(run_dir)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    data = json.loads((run_dir / "report.json").read_text())
    stages = {row["stage"]: row for row in data["funnel"]["overall"]}
    assert stages["rounds"]["count"] == 4 * ROUNDS
    missing = stages["with an outcome"]["rejected"]
    assert missing == 4 * ROUNDS - sum(outcomes(r) for r in records(run_dir).values()) > 0
    assert data["totals"]["videos_unfinished"] == 2 and data["unfinished"] == ["late0", "late1"]
    assert "2 unfinished" in report.stdout

    # The same command finishes them; then split needs no flag.
    vkr_run(more, vkr_pool, run_dir)
    assert all(r["status"] == "done" and outcomes(r) == ROUNDS for r in records(run_dir).values())
    done = subprocess.run(
        [VKR, "split", str(run_dir), "--out", str(tmp_path / "split2")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def test_a_second_run_on_the_same_directory_is_refused_naming_the_pid(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    vkr_fake_server.set_policy({"latency_ms": 400})
    manifest = write_manifest(tmp_path / "videos", testdata, good=12, bad=False)
    run_dir = tmp_path / "run"
    # One video at a time at 0.4 s a reply: the first run is busy for minutes, so on a loaded
    # machine it is still mid-run (its Ctrl-C handler installed) when the test interrupts it;
    # with 4 videos it once reached its shutdown first and Ctrl-C met click's "Aborted!".
    first = start_run(manifest, vkr_pool, run_dir, "--concurrency", "1")
    wait_for_completions(vkr_fake_server, 1, first)
    assert first.poll() is None
    second = vkr_run(manifest, vkr_pool, run_dir, check=False)
    assert second.returncode != 0
    assert f"in use by PID {first.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    # generate on the same directory is refused too.
    gen = subprocess.run(
        [
            VKR,
            "generate",
            "--video-id",
            "good0",
            "--videos-dir",
            str(tmp_path / "videos"),
            "--pool",
            str(vkr_pool),
            "--out",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
    )
    assert first.poll() is None, "the first run ended before the refusals were checked"
    assert gen.returncode != 0 and f"PID {first.pid}" in gen.stderr
    code, err = interrupt(first)
    assert code == 130, err
    # Every call was paid once: the refused runs made none.
    stats = vkr_fake_server.stats()
    assert stats["repeats"] == 0
    vkr_fake_server.set_policy({"latency_ms": 50})

    # A holder killed with SIGKILL leaves no stale lock: the next run goes ahead.
    killed = start_run(manifest, vkr_pool, tmp_path / "run2")
    wait_for_completions(vkr_fake_server, stats["completions"] + 1, killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    vkr_run(manifest, vkr_pool, tmp_path / "run2")
    assert all(r["status"] == "done" for r in records(tmp_path / "run2").values())
