"""`vkr probe` runs on the engine: the single-frame probe is a built-in pipeline.

The same eval set gives the same kept and filtered questions and the same report figures as
the probe's own loop gave before (the figures below were captured from it, commit 83831a6);
a probe killed with SIGKILL and run again pays for no reply twice and writes the same files;
one probe directory has one probe at a time; a probe model that cannot be reached stops the
probe before anything is paid for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from cli import cli
from plugins.providers.fake_server import make_tag, truth_for_tag

VKR = str(Path(sys.executable).parent / "vkr")

MC_OPTIONS = [
    "A. The pan is tilted",
    "B. The batter is poured",
    "C. The pancake is flipped",
    "D. The stove is turned off",
]

# Probe models answer right 60 % of the time; the judge (fake-d) is truthful.
POLICY = {"accuracy": 0.6, "models": {"fake-d": {"accuracy": 1.0}}}


def question(number: int, kind: str = "mc", dataset: str = "bench-a", video: str = "pancake.mkv"):
    tag = make_tag(f"{number:08x}", kind)
    row: dict[str, Any] = {
        "id": f"q{number}",
        "video_path": video,
        "question": f"{tag} What does the cook do at this point?",
    }
    if kind == "mc":
        row["options"] = MC_OPTIONS
    row.update(
        problem_type="multiple-choice" if kind == "mc" else "open-ended",
        solution=f"<answer>{truth_for_tag(tag)}</answer>",
        dataset=dataset,
        subject="cooking",
    )
    return row


def eval_rows() -> list[dict[str, Any]]:
    rows = [question(n) for n in range(6)]
    rows += [question(n, dataset="bench-b", video="cooking/pancake2.mkv") for n in range(6, 9)]
    rows += [question(9, "oe"), question(10, "oe", dataset="bench-b")]
    rows += [question(11, dataset="bench-b", video="corrupted.mp4")]
    rows += [question(12, video="gone/missing.mkv")]
    return rows


@pytest.fixture
def videos(tmp_path: Path, testdata: Path) -> Path:
    folder = tmp_path / "videos"
    (folder / "cooking").mkdir(parents=True)
    shutil.copy(testdata / "flipping_a_pancake.mkv", folder / "pancake.mkv")
    shutil.copy(testdata / "flipping_a_pancake.mkv", folder / "cooking" / "pancake2.mkv")
    shutil.copy(testdata / "corrupted.mp4", folder / "corrupted.mp4")
    return folder


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in eval_rows()))
    return path


def probe_args(eval_file: Path, videos: Path, pool: Path, out: Path, *extra: str) -> list[str]:
    return [
        "probe",
        "--eval",
        str(eval_file),
        "--videos-root",
        str(videos),
        "--pool",
        str(pool),
        "--out",
        str(out),
        "--judge",
        "fake-d",
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def figures(out: Path, videos: Path) -> dict[str, Any]:
    """What a user reads in a probe's folder: the kept, filtered and unprobed questions and the
    report's figures (paths of this machine replaced by <videos>)."""
    report = json.loads((out / "report.json").read_text())

    def local(text: str) -> str:
        # The decoders' own words after "cannot decode ..." are theirs, not the probe's.
        return re.sub(r" \(decord: .*", "", text.replace(str(videos), "<videos>"))

    return {
        "kept": [row["id"] for row in read_jsonl(out / "kept.jsonl")],
        "filtered": [
            {key: row[key] for key in ("id", "solved_by", "solving_frames")}
            for row in read_jsonl(out / "filtered.jsonl")
        ],
        "unprobed": [
            [row["id"], local(row["unprobed_reason"])] for row in read_jsonl(out / "unprobed.jsonl")
        ],
        "report": {
            key: report[key]
            for key in (
                "models",
                "model_selection",
                "judge",
                "trials",
                "seed",
                "fps",
                "counts",
                "any_model",
                "by_model",
                "by_dataset",
                "notes",
                "calls",
            )
        },
        "report_unprobed": [[u["id"], local(u["reason"])] for u in report["unprobed"]],
        "trials": digest(read_jsonl(out / "trials.jsonl")),
    }


# Captured from `vkr probe` at commit 83831a6 (the probe's own loop), same eval set and policy.
BEFORE: dict[str, Any] = {
    "filtered": [
        {
            "id": "q1",
            "solved_by": ["fake-a", "fake-c"],
            "solving_frames": {"fake-a": [1.0, 0.0, 9.0], "fake-c": [8.0, 9.0, 7.0]},
        },
        {"id": "q2", "solved_by": ["fake-c"], "solving_frames": {"fake-c": [9.0, 2.0, 0.0]}},
        {"id": "q3", "solved_by": ["fake-a"], "solving_frames": {"fake-a": [1.0, 3.0, 6.0]}},
        {"id": "q4", "solved_by": ["fake-a"], "solving_frames": {"fake-a": [4.0, 0.0, 2.0]}},
        {"id": "q5", "solved_by": ["fake-b"], "solving_frames": {"fake-b": [1.0, 8.0, 0.0]}},
        {
            "id": "q6",
            "solved_by": ["fake-a", "fake-c"],
            "solving_frames": {"fake-a": [3.0, 8.0, 2.0], "fake-c": [5.0, 3.0, 7.0]},
        },
        {"id": "q8", "solved_by": ["fake-c"], "solving_frames": {"fake-c": [2.0, 9.0, 7.0]}},
        {"id": "q9", "solved_by": ["fake-c"], "solving_frames": {"fake-c": [7.0, 5.0, 8.0]}},
        {
            "id": "q10",
            "solved_by": ["fake-a", "fake-c"],
            "solving_frames": {"fake-a": [4.0, 7.0, 3.0], "fake-c": [9.0, 10.0, 0.0]},
        },
    ],
    "kept": ["q0", "q7"],
    "report": {
        "any_model": {"rate": 0.818182, "scored": 11, "solvable": 9},
        "by_dataset": {
            "bench-a": {
                "any_model": {"rate": 0.857143, "scored": 7, "solvable": 6},
                "filtered": 6,
                "kept": 1,
                "kept_scored": 1,
                "models": {
                    "fake-a": {
                        "rate": 0.428571,
                        "right_trials": 12,
                        "scored": 7,
                        "solvable": 3,
                        "trial_accuracy": 0.571429,
                        "trials": 21,
                    },
                    "fake-b": {
                        "rate": 0.142857,
                        "right_trials": 12,
                        "scored": 7,
                        "solvable": 1,
                        "trial_accuracy": 0.571429,
                        "trials": 21,
                    },
                    "fake-c": {
                        "rate": 0.428571,
                        "right_trials": 16,
                        "scored": 7,
                        "solvable": 3,
                        "trial_accuracy": 0.761905,
                        "trials": 21,
                    },
                },
                "questions": 8,
                "scored": 7,
                "skipped_open_ended": 0,
                "unprobed": 1,
            },
            "bench-b": {
                "any_model": {"rate": 0.75, "scored": 4, "solvable": 3},
                "filtered": 3,
                "kept": 1,
                "kept_scored": 1,
                "models": {
                    "fake-a": {
                        "rate": 0.5,
                        "right_trials": 9,
                        "scored": 4,
                        "solvable": 2,
                        "trial_accuracy": 0.75,
                        "trials": 12,
                    },
                    "fake-b": {
                        "rate": 0.0,
                        "right_trials": 7,
                        "scored": 4,
                        "solvable": 0,
                        "trial_accuracy": 0.583333,
                        "trials": 12,
                    },
                    "fake-c": {
                        "rate": 0.75,
                        "right_trials": 11,
                        "scored": 4,
                        "solvable": 3,
                        "trial_accuracy": 0.916667,
                        "trials": 12,
                    },
                },
                "questions": 5,
                "scored": 4,
                "skipped_open_ended": 0,
                "unprobed": 1,
            },
        },
        "by_model": {
            "fake-a": {
                "rate": 0.454545,
                "right_trials": 21,
                "scored": 11,
                "solvable": 5,
                "trial_accuracy": 0.636364,
                "trials": 33,
            },
            "fake-b": {
                "rate": 0.090909,
                "right_trials": 19,
                "scored": 11,
                "solvable": 1,
                "trial_accuracy": 0.575758,
                "trials": 33,
            },
            "fake-c": {
                "rate": 0.545455,
                "right_trials": 27,
                "scored": 11,
                "solvable": 6,
                "trial_accuracy": 0.818182,
                "trials": 33,
            },
        },
        "calls": {
            "by_step": {
                "judge_equivalence": {"cached": 0, "failed": 0, "paid": 5},
                "single_frame_probe": {"cached": 0, "failed": 0, "paid": 99},
            },
            "cached": 0,
            "cost_usd": 0.020447,
            "failed": 0,
            "paid": 104,
        },
        "counts": {
            "filtered": 9,
            "kept": 2,
            "kept_scored": 2,
            "questions": 13,
            "scored": 11,
            "skipped_open_ended": 0,
            "unprobed": 2,
        },
        "fps": 1.0,
        "judge": "fake-d",
        "model_selection": "eligible models, pool order",
        "models": ["fake-a", "fake-b", "fake-c"],
        "notes": [
            "2 video(s) could not be decoded or found: their questions are unprobed "
            "(see unprobed.jsonl)"
        ],
        "seed": 0,
        "trials": 3,
    },
    "report_unprobed": [
        ["q11", "video not probed: <videos>/corrupted.mp4: cannot decode frame at 4.9 s of 5.0 s"],
        ["q12", "video not probed: video file not found: <videos>/gone/missing.mkv"],
    ],
    "trials": "4aa854f57c9ca0e8",
    "unprobed": [
        ["q11", "video not probed: <videos>/corrupted.mp4: cannot decode frame at 4.9 s of 5.0 s"],
        ["q12", "video not probed: video file not found: <videos>/gone/missing.mkv"],
    ],
}


def test_vkr_plugins_lists_the_probe_pipeline_as_built_in(tmp_path):
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "graphs.probe (built-in)  pipelines: probe" in result.output
    # It needs an eval set and writes the probe's files: `vkr run` says which command runs it.
    run = CliRunner().invoke(
        cli,
        ["run", "--pipeline", "probe", "--inputs", str(tmp_path / "eval.jsonl")]
        + ["--pool", str(tmp_path / "pool.yaml"), "--out", str(tmp_path / "run")],
    )
    assert run.exit_code == 1
    assert "the probe pipeline runs through `vkr probe --eval FILE" in run.output
    assert not (tmp_path / "run").exists()


def test_the_probe_keeps_and_filters_the_same_questions_with_the_same_figures(
    tmp_path, videos, eval_file, vkr_pool, vkr_fake_server
):
    vkr_fake_server.set_policy(POLICY)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, probe_args(eval_file, videos, vkr_pool, out))
    assert result.exit_code == 0, result.output
    after, before = figures(out, videos), json.loads(json.dumps(BEFORE))
    # A sum of floats in the order the calls landed: the last digit may differ.
    cost = after["report"]["calls"].pop("cost_usd")
    assert cost == pytest.approx(before["report"]["calls"].pop("cost_usd"), abs=1e-5)
    assert after == before
    # It ran on the engine: the run directory's snapshot names the pipeline, and each video
    # has its record.
    snapshot = json.loads((out / "config.json").read_text())
    assert snapshot["config"]["pipeline"] == "probe"
    assert snapshot["pipeline"]["models"] == ["fake-a", "fake-b", "fake-c"]
    records = {p.name for p in (out / "records").glob("*.json")}
    assert len(records) == 4  # pancake, pancake2, corrupted, missing


def start_probe(eval_file: Path, videos: Path, pool: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [VKR, *probe_args(eval_file, videos, pool, out, "--concurrency", "2")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_completions(server: Any, n: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 120
    while server.stats()["completions"] < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def replies_in(out: Path) -> set[str]:
    """The call keys of every reply a probe kept: in its cache, or journalled on arrival."""
    import diskcache

    with diskcache.Cache(str(out / "cache")) as cache:
        return {str(key).removeprefix("raw:") for key in cache.iterkeys()}


def outputs(out: Path) -> dict[str, bytes]:
    names = ("trials.jsonl", "kept.jsonl", "filtered.jsonl", "unprobed.jsonl")
    return {name: (out / name).read_bytes() for name in names}


@pytest.mark.slow
def test_a_probe_stopped_then_killed_then_run_again_pays_for_no_reply_twice(
    tmp_path, videos, eval_file, vkr_pool, vkr_fake_server
):
    vkr_fake_server.set_policy(POLICY)
    reference = tmp_path / "reference"
    # In this process: the reference's point is what it writes, not how its process ends.
    done = CliRunner().invoke(cli, probe_args(eval_file, videos, vkr_pool, reference))
    assert done.exit_code == 0, done.output
    replies = vkr_fake_server.stats()["completions"]
    assert replies == 104  # 11 questions x 3 models x 3 trials, and 5 judgements

    # The same probe again, slowed down, into a new folder (the server forgets what it billed
    # for the reference, so any repeat from here on is a reply paid twice).
    vkr_fake_server.reset_stats()
    vkr_fake_server.set_policy({**POLICY, "latency_ms": 150})
    out = tmp_path / "out"
    first = start_probe(eval_file, videos, vkr_pool, out)
    wait_for_completions(vkr_fake_server, 5, first)
    # A second probe on the folder meanwhile is refused: both would pay for the same calls.
    second = subprocess.run(
        [VKR, *probe_args(eval_file, videos, vkr_pool, out)], capture_output=True, text=True
    )
    assert second.returncode == 1
    assert f"is in use by PID {first.pid}" in second.stderr, second.stderr
    # Ctrl-C: the calls in flight land, then the probe stops and says how to go on.
    assert first.poll() is None, "the probe ended before it could be interrupted"
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "interrupted: answered calls are cached; run the same command to resume" in err
    assert "Traceback" not in err

    # SIGKILL at a random moment of the next attempt: nothing can land or be cleaned up.
    killed = start_probe(eval_file, videos, vkr_pool, out)
    wait_for_completions(vkr_fake_server, vkr_fake_server.stats()["completions"] + 10, killed)
    assert killed.poll() is None, "the probe ended before it could be killed"
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert vkr_fake_server.stats()["completions"] < replies
    received = replies_in(out)

    vkr_fake_server.set_policy(POLICY)  # slow replies were for the signals to land mid-probe
    rerun = subprocess.run(
        [VKR, *probe_args(eval_file, videos, vkr_pool, out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    stats = vkr_fake_server.stats()
    # No reply that reached the killed probe was paid for again. The only requests sent twice
    # are those it had in flight (at most --concurrency): the server billed them, but their
    # replies never reached it.
    assert stats["repeats"] <= 2
    assert not set(stats["repeated_call_keys"]) & received
    assert stats["completions"] == replies + stats["repeats"]
    assert outputs(out) == outputs(reference)
    after, before = figures(out, videos), figures(reference, videos)
    assert after["report"].pop("calls")["paid"] < replies
    before["report"].pop("calls")
    assert after == before


def test_an_unreachable_probe_model_stops_the_probe_before_anything_is_paid(
    tmp_path, videos, eval_file, vkr_pool, vkr_fake_server
):
    pool = yaml.safe_load(vkr_pool.read_text())
    for model in pool["models"]:
        if model["name"] == "fake-c":
            model["api_base"] = "http://127.0.0.1:9/v1"  # nothing listens on port 9
    vkr_pool.write_text(yaml.safe_dump(pool, sort_keys=False))
    result = CliRunner().invoke(cli, probe_args(eval_file, videos, vkr_pool, tmp_path / "out"))
    assert result.exit_code == 5, result.output
    assert "preflight: model 'fake-c': cannot reach http://127.0.0.1:9/v1" in result.output
    assert "Nothing was started" in result.output
    assert vkr_fake_server.stats()["requests"] == 0
