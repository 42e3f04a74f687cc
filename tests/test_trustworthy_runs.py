"""Runs a user can trust: a record says done only when every round has an outcome, a stopped
run is visible as unfinished to split and report, and one run directory has one run at a time.

The runs that are interrupted are real `vkr run` processes, stopped with a real SIGINT; the
runs that only have to finish run in the test's own process, through click.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_run import VKR, accepted, vkr_here, vkr_run_here, write_manifest

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


def count(run_dir: Path, status: str) -> int:
    return sum(r["status"] == status for r in records(run_dir).values())


def statuses_now(run_dir: Path) -> list[str]:
    """The records' statuses at this instant, read while the run may be replacing them."""
    found = []
    for path in (run_dir / "records").glob("*.json"):
        try:
            found.append(json.loads(path.read_text())["status"])
        except (OSError, ValueError):
            pass
    return found


@pytest.mark.slow
def test_ctrl_c_in_each_phase_of_a_run_loses_nothing(tmp_path, testdata, vkr_pool, vkr_fake_server):
    """Ctrl-C at moments chosen to fall in each phase of a run, not drawn at random: the
    first replies of a fresh run, a resumed run once it asks anew, and a resumed run with a
    video done and others in flight. Each moment is checked to have met its phase; after
    each, no record says done without all its rounds, and the same command then finishes
    with what an uninterrupted run accepts, no reply paid twice."""
    manifest = write_manifest(tmp_path / "videos", testdata, good=5, bad=False)
    two = ("--concurrency", "2")
    # The reference needs no latency: the fake server's replies do not depend on timing.
    vkr_fake_server.set_policy({"steps": {"self_consistency": {"accuracy": 0.7}}})
    vkr_run_here(manifest, vkr_pool, tmp_path / "reference", *two)
    reference = accepted(tmp_path / "reference")
    videos = sorted(records(tmp_path / "reference"))
    assert reference and len(videos) == 5

    vkr_fake_server.set_policy({"latency_ms": 60, "steps": {"self_consistency": {"accuracy": 0.7}}})
    vkr_fake_server.reset_stats()
    run_dir = tmp_path / "interrupted"

    def completions() -> int:
        return vkr_fake_server.stats()["completions"]

    phases = ["first replies of a fresh run", "a resumed run asking anew", "a video done"]
    for phase in phases:
        before = completions()
        proc = start_run(manifest, vkr_pool, run_dir, *two)
        if phase == "a video done":
            # ... and another in flight (a resumed run decodes the next videos first).
            until = lambda: {"done", "unfinished"} <= set(statuses_now(run_dir))  # noqa: E731
        else:
            until = lambda n=before + 2: completions() >= n  # noqa: E731
        deadline = time.monotonic() + 120
        while not until() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        code, err = interrupt(proc)
        assert "Traceback" not in err, err
        assert code == 130, f"{phase}: the run was not interrupted ({code}): {err}"
        assert "run the same command to resume" in err
        assert_no_partial_record_is_done(run_dir, f"after Ctrl-C in {phase}")
        # The phase was met (a video in flight at the Ctrl-C may land its last replies while
        # the run drains, so the third phase asks only that some, not all, are done).
        if phase == "a video done":
            assert 1 <= count(run_dir, "done") < len(videos), phase
        else:
            assert count(run_dir, "done") == 0 and count(run_dir, "unfinished") >= 1, phase
            assert completions() > before, phase

    vkr_fake_server.set_policy({"steps": {"self_consistency": {"accuracy": 0.7}}})
    vkr_run_here(manifest, vkr_pool, run_dir, *two)
    final = records(run_dir)
    assert sorted(final) == videos
    for video_id, record in final.items():
        assert record["status"] == "done" and outcomes(record) == ROUNDS, video_id
    assert accepted(run_dir) == reference
    assert vkr_fake_server.stats()["repeats"] == 0


def test_split_and_report_see_a_stopped_run_as_unfinished(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    manifest = write_manifest(tmp_path / "videos", testdata, good=2, bad=False)
    run_dir = tmp_path / "run"
    vkr_run_here(manifest, vkr_pool, run_dir)
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
    # Slow replies from here: the run is still going when it is interrupted.
    vkr_fake_server.set_policy({"latency_ms": 100})
    before = vkr_fake_server.stats()["completions"]
    proc = start_run(more, vkr_pool, run_dir)
    wait_for_completions(vkr_fake_server, before + 3, proc)
    code, err = interrupt(proc)
    assert code == 130, err
    vkr_fake_server.set_policy({})
    status = {k: (r["status"], outcomes(r)) for k, r in records(run_dir).items()}
    assert status["good0"] == ("done", ROUNDS) and status["good1"] == ("done", ROUNDS)
    assert {status["late0"][0], status["late1"][0]} == {"unfinished"}, status

    # split refuses, naming the unfinished videos and what to do.
    refused = vkr_here("split", run_dir, "--out", tmp_path / "split")
    assert refused.returncode != 0
    assert "2 video(s) are unfinished" in refused.stderr and "late0.json" in refused.stderr
    assert "--exclude-unfinished" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "split" / "sft.jsonl").exists()

    # With the flag it splits what is finished and lists what it left out.
    split = vkr_here("split", run_dir, "--out", tmp_path / "split", "--exclude-unfinished")
    assert split.returncode == 0, split.stderr
    assert split.stderr.count("excluded unfinished video:") == 2
    manifest_json = json.loads((tmp_path / "split" / "split.json").read_text())
    assert len(manifest_json["excluded_unfinished"]) == 2
    videos = set(manifest_json["sft"]["video_ids"]) | set(manifest_json["rl"]["video_ids"])
    assert videos <= {"good0", "good1"} and videos

    # The report's funnel shows the rounds that have no outcome, and the unfinished videos.
    report = vkr_here("report", run_dir)
    assert report.returncode == 0, report.stderr
    data = json.loads((run_dir / "report.json").read_text())
    stages = {row["stage"]: row for row in data["funnel"]["overall"]}
    assert stages["rounds"]["count"] == 4 * ROUNDS
    missing = stages["with an outcome"]["rejected"]
    assert missing == 4 * ROUNDS - sum(outcomes(r) for r in records(run_dir).values()) > 0
    assert data["totals"]["videos_unfinished"] == 2 and data["unfinished"] == ["late0", "late1"]
    assert "2 unfinished" in report.stdout

    # The same command finishes them; then split needs no flag.
    vkr_run_here(more, vkr_pool, run_dir)
    assert all(r["status"] == "done" and outcomes(r) == ROUNDS for r in records(run_dir).values())
    done = vkr_here("split", run_dir, "--out", tmp_path / "split2")
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
    second = vkr_run_here(manifest, vkr_pool, run_dir, check=False)
    assert second.returncode != 0
    assert f"in use by PID {first.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    # generate on the same directory is refused too.
    gen = vkr_here(
        "generate",
        "--video-id",
        "good0",
        "--videos-dir",
        tmp_path / "videos",
        "--pool",
        vkr_pool,
        "--out",
        run_dir,
    )
    assert first.poll() is None, "the first run ended before the refusals were checked"
    assert gen.returncode != 0 and f"PID {first.pid}" in gen.stderr
    code, err = interrupt(first)
    assert code == 130, err
    # Every call was paid once: the refused runs made none.
    stats = vkr_fake_server.stats()
    assert stats["repeats"] == 0
    vkr_fake_server.set_policy({"latency_ms": 50})

    # A holder killed with SIGKILL leaves no stale lock: the next run goes ahead (one video
    # is enough to hold the lock).
    one = write_manifest(tmp_path / "one", testdata, good=1, bad=False)
    killed = start_run(one, vkr_pool, tmp_path / "run2")
    wait_for_completions(vkr_fake_server, stats["completions"] + 1, killed)
    assert killed.poll() is None, "the run ended before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    vkr_fake_server.set_policy({})
    vkr_run_here(one, vkr_pool, tmp_path / "run2")
    assert [r["status"] for r in records(tmp_path / "run2").values()] == ["done"]
