"""`vkr run` over many videos: bad videos isolated, resume after SIGKILL without paying twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

VKR = str(Path(sys.executable).parent / "vkr")
CANARY = "sk-canary-" + "7f3e9a1c5b2d4e6f8a0b1c2d3e4f5a6b"


def write_manifest(folder: Path, testdata: Path, good: int = 4, bad: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(good):
        shutil.copy(testdata / "flipping_a_pancake.mkv", folder / f"good{i}.mkv")
        lines.append(
            {
                "video_id": f"good{i}",
                "path": f"good{i}.mkv",
                "discipline": "cooking",
                "subject": "batter cookery",
                "knowledge_point": "Maillard reaction",
                "title": f"Pancake flip number {i}",
            }
        )
    if bad:
        shutil.copy(testdata / "corrupted.mp4", folder / "corrupted.mp4")
        data = (testdata / "flipping_a_pancake.mkv").read_bytes()
        (folder / "truncated.mkv").write_bytes(data[: len(data) // 2])
        (folder / "notes.mp4").write_text("minutes of the meeting, not a video\n")
        lines += [
            {"video_id": "corrupted", "path": "corrupted.mp4"},
            {"video_id": "truncated", "path": "truncated.mkv"},
            {"video_id": "notes", "path": "notes.mp4"},
        ]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def vkr_run(manifest: Path, pool: Path, out: Path, *extra: str, env=None, check=True):
    result = subprocess.run(
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
        capture_output=True,
        text=True,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"vkr run failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def vkr_here(*args: object) -> subprocess.CompletedProcess[str]:
    """A `vkr` command in this process, through click's runner: for a command whose point is
    what it prints and leaves on disk, not how its process starts or stops (a signal, a pid).
    The test process has vkr and litellm imported already; a new `vkr` process spends seconds
    of CPU importing them again. An exception that escapes the command shows as a traceback
    on stderr with exit status 1, as it would from a process."""
    import traceback

    from click.testing import CliRunner

    from cli import cli

    argv = [str(a) for a in args]
    result = CliRunner().invoke(cli, argv)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, stderr)


def vkr_run_here(manifest: Path, pool: Path, out: Path, *extra: str, check=True):
    """``vkr_run`` in this process (``vkr_here``)."""
    args = ("--videos", manifest, "--pool", pool, "--out", out, "--no-progress", *extra)
    result = vkr_here("run", *args)
    if check and result.returncode != 0:
        raise AssertionError(
            f"vkr run failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def accepted(run_dir: Path) -> dict[str, tuple[str, str, str]]:
    out = {}
    for path in sorted((run_dir / "records").glob("*.json")):
        for ex in json.loads(path.read_text())["accepted"]:
            out[ex["problem_id"]] = (ex["question"], ex["solution"], ex["think"])
    return out


def test_bad_videos_are_failures_and_every_other_video_is_processed(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    manifest = write_manifest(tmp_path / "videos", testdata)
    with manifest.open("a") as handle:
        handle.write("{not json\n")
        handle.write(json.dumps({"video_id": "good0", "path": "good0.mkv"}) + "\n")
        handle.write(json.dumps({"video_id": "../escape", "path": "good0.mkv"}) + "\n")
    result = vkr_run_here(manifest, vkr_pool, tmp_path / "run", check=False)
    assert result.returncode == 3, result.stdout + result.stderr  # some videos failed
    assert "line 8 is not JSON" in result.stderr
    assert "duplicate video id 'good0' (first on line 1)" in result.stderr
    assert "unsafe video id '../escape'" in result.stderr
    failures = [
        json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()
    ]
    failed = {f["video_id"]: f["reason"] for f in failures}
    assert {"corrupted", "truncated", "notes"} <= set(failed)
    assert "corrupted.mp4" in failed["corrupted"] and "truncated.mkv" in failed["truncated"]
    assert "notes.mp4" in failed["notes"]
    for i in range(4):
        record = json.loads((tmp_path / "run" / "records" / f"good{i}.json").read_text())
        assert record["status"] == "done" and record["generated"] == 6
    assert "6 video(s) failed" in result.stdout


def test_target_accepted_stops_launching_new_videos(tmp_path, testdata, vkr_pool, vkr_fake_server):
    vkr_fake_server.set_policy(
        {
            "steps": {
                "self_consistency": {"accuracy": 1.0},
                "video_dependency": {"accuracy": 0.0},
                "cot_verification": {"cot_pass": 1.0},
            }
        }
    )
    manifest = write_manifest(tmp_path / "videos", testdata, good=6, bad=False)
    vkr_run_here(
        manifest, vkr_pool, tmp_path / "run", "--concurrency", "1", "--target-accepted", "7"
    )
    # Each video yields 6 accepted examples: the second video crosses 7, the third never starts.
    assert len(list((tmp_path / "run" / "records").glob("*.json"))) == 2
    assert vkr_fake_server.stats()["by_step"]["example_generation"] == 12


def test_rerun_refuses_a_different_config_unless_forced(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    vkr_run_here(manifest, vkr_pool, tmp_path / "run")
    refused = vkr_run_here(manifest, vkr_pool, tmp_path / "run", "--fps", "0.5", check=False)
    assert refused.returncode != 0
    assert "different config" in refused.stderr and "config.fps: 0.2 -> 0.5" in refused.stderr
    assert (tmp_path / "run" / "records" / "good0.json").exists()
    forced = vkr_run_here(manifest, vkr_pool, tmp_path / "run", "--fps", "0.5", "--force")
    assert forced.returncode == 0


def keys_vkr_holds(run_dir: Path) -> set[str]:
    """Call keys whose reply reached vkr: cached, or journalled on arrival."""
    import diskcache

    if not (run_dir / "cache").exists():
        return set()
    with diskcache.Cache(str(run_dir / "cache")) as cache:
        return {str(k).removeprefix("raw:") for k in cache.iterkeys()}


def records_done(run_dir: Path) -> int:
    done = 0
    for path in (run_dir / "records").glob("*.json"):
        try:
            done += json.loads(path.read_text())["status"] == "done"
        except (OSError, ValueError):  # being replaced as we read: not done yet
            pass
    return done


def replies_recorded(run_dir: Path) -> set[str]:
    """Call keys whose reply vkr has read and cached (calls.jsonl), read while it appends."""
    path = run_dir / "calls.jsonl"
    keys = set()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:  # the line being written
            continue
        if record["outcome"] != "error":
            keys.add(record["cache_key"])
    return keys


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sigkill_when(condition, proc: subprocess.Popen, what: str) -> None:
    """kill -9 once ``condition`` holds while the run is still going, and reap it."""
    try:
        wait_until(condition, proc, what)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_at_each_phase_of_a_run_pays_no_call_twice(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    """kill -9 in each phase of a run: no reply that reached vkr is ever paid for again.

    The moments are chosen, not drawn: the first replies of a fresh run, a resumed run once
    it has asked anew, and a resumed run with a video done and the others in flight; each
    kill is checked to have met a live run in its phase. A reply still on the wire when the
    process dies (the provider has answered, vkr has not read it) is billed and lost whatever
    the client does; those are counted, and bounded by what can be in flight at a kill. (The
    narrowest moment, a reply read and not yet cached, is killed deterministically per
    protocol in test_protocols.)
    """
    manifest = write_manifest(tmp_path / "videos", testdata, good=4, bad=False)
    # Two videos at a time, so the second pair is still to come when the first is done.
    two = ("--concurrency", "2")
    # The reference: one uninterrupted run (the fake server's replies do not depend on when
    # they are asked, so it needs no latency).
    vkr_run_here(manifest, vkr_pool, tmp_path / "reference", *two)
    reference = accepted(tmp_path / "reference")
    assert reference and vkr_fake_server.stats()["repeats"] == 0
    # Slow replies: calls are in flight at every kill.
    vkr_fake_server.set_policy({"latency_ms": 300})
    vkr_fake_server.reset_stats()
    max_in_flight = 4 * 8  # four models at max_concurrency 8
    run_dir = tmp_path / "killed"

    held: set[str] = set()
    repaid: set[str] = set()
    seen_repeats = 0
    phases = ["first replies of a fresh run", "a resumed run asking anew", "a video done"]
    for phase in phases:
        held_before = len(held)
        proc = subprocess.Popen(
            [VKR, "run", "--videos", str(manifest), "--pool", str(vkr_pool)]
            + ["--out", str(run_dir), "--no-progress", *two],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if phase == "a video done":
            sigkill_when(lambda: records_done(run_dir) >= 1, proc, phase)
        else:  # replies new to this directory read and kept, with more in flight
            sigkill_when(
                lambda held=frozenset(held): len(replies_recorded(run_dir) - held) >= 2,
                proc,
                phase,
            )
        assert proc.returncode == -signal.SIGKILL, phase  # killed mid-run, not ended
        # Repeats made during a segment must not be replies vkr held before it began.
        keys = vkr_fake_server.stats()["repeated_call_keys"]
        repaid |= set(keys[seen_repeats:]) & held
        seen_repeats = len(keys)
        held |= keys_vkr_holds(run_dir)
        # The phase was met: replies read and kept in it, and for the last, a video done
        # while another was not.
        assert len(held) > held_before, f"{phase}: no reply was held at the kill"
        if phase == "a video done":
            assert 1 <= records_done(run_dir) < 4, phase
    vkr_fake_server.set_policy({})
    vkr_run_here(manifest, vkr_pool, run_dir, *two)
    stats = vkr_fake_server.stats()
    repaid |= set(stats["repeated_call_keys"][seen_repeats:]) & held
    assert not repaid, f"{len(repaid)} reply(ies) vkr had received were paid again"
    assert stats["repeats"] <= len(phases) * max_in_flight
    assert accepted(run_dir) == reference
    assert records_done(run_dir) == 4


def test_canary_key_never_reaches_a_file_or_a_log(tmp_path, testdata, vkr_pool, vkr_fake_server):
    vkr_fake_server.set_policy({"script": ["429", "500"], "retry_after_s": 0.05})
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=True)
    env = dict(os.environ, VKR_FAKE_API_KEY=CANARY)
    result = vkr_run(
        manifest, vkr_pool, tmp_path / "run", "--log-level", "DEBUG", env=env, check=False
    )
    assert result.returncode == 3, result.stdout + result.stderr  # the bad videos failed
    # The key was really used: the server saw it.
    assert vkr_fake_server.stats()["authorization"]["present"] > 0
    hits = [
        str(p)
        for p in (tmp_path / "run").rglob("*")
        if p.is_file() and CANARY.encode() in p.read_bytes()
    ]
    assert hits == []
    assert CANARY not in result.stdout and CANARY not in result.stderr


def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    vkr_fake_server.set_policy({"latency_ms": 40})
    manifest = write_manifest(tmp_path / "videos", testdata, good=3, bad=False)
    proc = subprocess.Popen(
        [
            VKR,
            "run",
            "--videos",
            str(manifest),
            "--pool",
            str(vkr_pool),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while vkr_fake_server.stats()["completions"] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    # As a terminal's Ctrl-C: to the whole process group, decoder processes included.
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command to resume" in err
    assert "Traceback" not in err
    vkr_fake_server.set_policy({})  # the latency only had to outlast the interruption
    vkr_run_here(manifest, vkr_pool, tmp_path / "run")
    assert vkr_fake_server.stats()["repeats"] == 0
    assert len(list((tmp_path / "run" / "records").glob("*.json"))) == 3


def test_full_disk_stops_the_run_with_a_clear_message_and_resumes_after(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    manifest = write_manifest(tmp_path / "videos", testdata, good=3, bad=False)
    run_dir = tmp_path / "small-disk"
    run_dir.mkdir()
    # A real filesystem that fills up: a 1 MiB tmpfs (CI runs as root, as this needs).
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert mounted.returncode == 0, f"this test needs root to mount a tmpfs: {mounted.stderr}"
    try:
        full = vkr_run(manifest, vkr_pool, run_dir, check=False)
        assert full.returncode == 1, full.stdout + full.stderr
        assert "is full" in full.stderr and "run the same command again to resume" in full.stderr
        assert "Traceback" not in full.stderr
        # No video was recorded as failed because of the disk.
        failures = run_dir / "failures.jsonl"
        assert not failures.exists() or "is full" not in failures.read_text()
        subprocess.run(["mount", "-o", "remount,size=200m", str(run_dir)], check=True)
        resumed = vkr_run_here(manifest, vkr_pool, run_dir)
        failures_text = failures.read_text() if failures.exists() else ""
        for i in range(3):
            record = run_dir / "records" / f"good{i}.json"
            assert record.exists(), (
                f"good{i} has no record:\n{resumed.stdout}\n{resumed.stderr}\n{failures_text}"
            )
            assert json.loads(record.read_text())["status"] == "done"
        # Replies that arrived while nothing could be written are paid again: no disk, no
        # memory of them. Everything written before the disk filled is reused.
        stats = vkr_fake_server.stats()
        assert stats["repeats"] < stats["completions"] / 2
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], check=False)
