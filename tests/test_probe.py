"""`vkr probe`: single-frame probing of an eval set through real frames and real HTTP calls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from cli import cli
from corpus.probe import ProbeOptions, run_probe
from graphs.generation import GenerationPipeline
from plugins.providers.fake_server import make_tag, truth_for_tag
from vkr_core.schemas import InputError
from vkr_core.steps import Gate, Generator, Step

MC_OPTIONS = [
    "A. The pan is tilted",
    "B. The batter is poured",
    "C. The pancake is flipped",
    "D. The stove is turned off",
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    (folder / "cooking").mkdir()
    shutil.copy(testdata / "flipping_a_pancake.mkv", folder / "pancake.mkv")
    shutil.copy(testdata / "flipping_a_pancake.mkv", folder / "cooking" / "pancake2.mkv")
    shutil.copy(testdata / "corrupted.mp4", folder / "corrupted.mp4")
    return folder


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by the tests of this module so each video is decoded once, not once per test.
    return tmp_path_factory.mktemp("frames")


def question(
    number: int,
    kind: str = "mc",
    dataset: str = "bench-a",
    video: str = "pancake.mkv",
    **extra: Any,
) -> dict[str, Any]:
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
        **extra,
    )
    return row


def write_eval(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def mixed_eval(path: Path) -> Path:
    rows = [question(n, dataset="bench-a") for n in range(4)]
    rows += [question(n, dataset="bench-b", video="cooking/pancake2.mkv") for n in range(4, 7)]
    return write_eval(path, rows)


def probe(tmp_path, videos, frames_dir, pool, pm, eval_file=None, out="out", **options):
    eval_file = eval_file or mixed_eval(tmp_path / "eval.jsonl")
    return run_probe(
        eval_file,
        videos,
        pool,
        tmp_path / out,
        ProbeOptions(frames_dir=frames_dir, **options),
        pm=pm,
    )


# ---------------------------------------------------------------- outcomes


def test_one_always_right_model_filters_every_question(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy(
        {
            "models": {
                "fake-a": {"accuracy": 1.0},
                "fake-b": {"accuracy": 0.0},
                "fake-c": {"accuracy": 0.0},
            }
        }
    )
    result = probe(tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager)
    out = tmp_path / "out"

    # The default probe set is the first three eligible models of the pool.
    assert result.report["models"] == ["fake-a", "fake-b", "fake-c"]
    assert vkr_fake_server.stats()["by_model_step"] == {
        "fake-a|single_frame_probe": 21,
        "fake-b|single_frame_probe": 21,
        "fake-c|single_frame_probe": 21,
    }
    assert read_jsonl(out / "kept.jsonl") == []
    filtered = read_jsonl(out / "filtered.jsonl")
    assert [row["id"] for row in filtered] == [f"q{n}" for n in range(7)]
    assert all(row["solved_by"] == ["fake-a"] for row in filtered)
    assert all(len(row["solving_frames"]["fake-a"]) == 3 for row in filtered)

    by_model = result.report["by_model"]
    assert (by_model["fake-a"]["rate"], by_model["fake-b"]["rate"], by_model["fake-c"]["rate"]) == (
        1.0,
        0.0,
        0.0,
    )
    bench_b = result.report["by_dataset"]["bench-b"]
    assert bench_b["questions"] == 3 and bench_b["models"]["fake-a"]["solvable"] == 3
    assert bench_b["models"]["fake-b"]["solvable"] == 0 and bench_b["any_model"]["rate"] == 1.0
    counts = result.report["counts"]
    assert (counts["kept"], counts["filtered"], counts["unprobed"]) == (0, 7, 0)

    table = (out / "report.md").read_text()
    assert "| bench-a | 4 | 4 | 100.0 (4/4) | 0.0 (0/4) | 0.0 (0/4) | 100.0 (4/4) | 0 |" in table
    assert "| **All** | 7 | 7 | 100.0 (7/7) | 0.0 (0/7) | 0.0 (0/7) | 100.0 (7/7) | 0 |" in table


def test_no_model_right_keeps_every_question_unchanged(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy({"accuracy": 0.0})
    eval_file = mixed_eval(tmp_path / "eval.jsonl")
    result = probe(tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file)
    out = tmp_path / "out"
    # kept.jsonl is a drop-in eval file: the very same rows.
    assert read_jsonl(out / "kept.jsonl") == read_jsonl(eval_file)
    assert read_jsonl(out / "filtered.jsonl") == []
    assert all(entry["rate"] == 0.0 for entry in result.report["by_model"].values())
    rows = read_jsonl(out / "trials.jsonl")
    assert len(rows) == 7 * 3
    assert all(row["status"] == "not solvable" and row["right"] == 0 for row in rows)


def test_solvable_means_all_trials_right_and_rates_follow(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    # Half-right models give a mix of solvable and unsolvable questions.
    vkr_fake_server.set_policy({"accuracy": 0.6})
    eval_file = write_eval(
        tmp_path / "eval.jsonl", [question(n, dataset=f"bench-{'ab'[n % 2]}") for n in range(16)]
    )
    result = probe(tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file)
    rows = read_jsonl(tmp_path / "out" / "trials.jsonl")
    for row in rows:
        assert [t["trial"] for t in row["trials"]] == [0, 1, 2]
        truth = row["solution"]
        assert all(t["correct"] == (t["answer"] == truth) for t in row["trials"])
        assert row["solvable"] == all(t["correct"] for t in row["trials"])
    solved = {row["id"] for row in rows if row["solvable"]}
    assert 0 < len(solved) < 16
    assert {r["id"] for r in read_jsonl(tmp_path / "out" / "filtered.jsonl")} == solved
    assert {r["id"] for r in read_jsonl(tmp_path / "out" / "kept.jsonl")} == {
        f"q{n}" for n in range(16)
    } - solved
    for dataset, entry in result.report["by_dataset"].items():
        for model, cell in entry["models"].items():
            mine = [r for r in rows if r["dataset"] == dataset and r["model"] == model]
            assert (cell["solvable"], cell["scored"]) == (
                sum(r["solvable"] for r in mine),
                len(mine),
            )


def test_each_trial_shows_one_different_frame_reproducibly(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy({"accuracy": 0.5})
    eval_file = mixed_eval(tmp_path / "eval.jsonl")
    probe(tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file)
    rows = read_jsonl(tmp_path / "out" / "trials.jsonl")
    for row in rows:
        times = [t["frame_timestamp"] for t in row["trials"]]
        assert len(set(times)) == 3, row
        assert all(0 <= t < 10.5 for t in times)  # the 10.4 s clip sampled at 1 fps

    # Every request carried exactly one image, labelled with its timestamp.
    inputs = read_jsonl(tmp_path / "out" / "inputs" / "single_frame_probe.jsonl")
    assert len(inputs) == 7 * 3 * 3
    for record in inputs:
        parts = record["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "image", "text"]
        assert parts[0]["text"].startswith("[Frame at 00:")

    def chosen(out: str) -> list[list[float]]:
        return [
            [t["frame_timestamp"] for t in r["trials"]]
            for r in read_jsonl(tmp_path / out / "trials.jsonl")
        ]

    # A fresh output folder with the same seed picks the same frames; another seed does not.
    probe(tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file, out="again")
    probe(
        tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file, out="seed1", seed=1
    )
    assert chosen("again") == chosen("out")
    assert chosen("seed1") != chosen("out")


def test_rerun_pays_for_nothing(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy({"accuracy": 0.5})
    eval_file = mixed_eval(tmp_path / "eval.jsonl")
    eval_file.write_text(eval_file.read_text() + json.dumps(question(9, "oe")) + "\n")
    first = probe(
        tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file, judge="fake-d"
    )
    assert first.report["calls"]["paid"] > 0
    trials = (tmp_path / "out" / "trials.jsonl").read_bytes()
    vkr_fake_server.reset_stats()

    second = probe(
        tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file, judge="fake-d"
    )
    assert vkr_fake_server.stats()["requests"] == 0
    assert second.report["calls"]["paid"] == 0
    assert second.report["calls"]["cached"] == first.report["calls"]["paid"]
    assert (tmp_path / "out" / "trials.jsonl").read_bytes() == trials


# ---------------------------------------------------------------- open-ended questions


def open_ended_eval(path: Path) -> Path:
    return write_eval(path, [question(0), question(1), question(3, "oe"), question(6, "oe")])


def test_open_ended_without_a_judge_is_skipped_kept_and_reported(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy({"accuracy": 1.0})
    eval_file = open_ended_eval(tmp_path / "eval.jsonl")
    result = CliRunner().invoke(
        cli,
        [
            "probe",
            "--eval",
            str(eval_file),
            "--videos-root",
            str(videos),
            "--pool",
            str(vkr_pool),
            "--out",
            str(tmp_path / "out"),
            "--frames-dir",
            str(frames_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 open-ended questions skipped: no judge configured" in result.output
    # Open-ended questions cost nothing without a judge: only the two MC questions were asked.
    assert vkr_fake_server.stats()["by_step"] == {"single_frame_probe": 2 * 3 * 3}
    out = tmp_path / "out"
    assert [r["id"] for r in read_jsonl(out / "kept.jsonl")] == ["q3", "q6"]
    assert [r["id"] for r in read_jsonl(out / "filtered.jsonl")] == ["q0", "q1"]
    assert {r["id"] for r in read_jsonl(out / "trials.jsonl")} == {"q0", "q1"}
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["skipped_open_ended"] == 2 and report["judge"] is None
    assert "2 open-ended questions skipped: no judge configured" in (out / "report.md").read_text()


@pytest.mark.parametrize(("judge_accuracy", "outcome"), [(1.0, "kept"), (0.0, "filtered")])
def test_judge_decides_open_ended_answers(
    judge_accuracy,
    outcome,
    tmp_path,
    videos,
    frames_dir,
    vkr_pool,
    vkr_fake_server,
    vkr_plugin_manager,
):
    # Probe models always answer wrong; the judge is truthful (1.0) or always says "same" (0.0).
    vkr_fake_server.set_policy(
        {"accuracy": 0.0, "models": {"fake-d": {"accuracy": judge_accuracy}}}
    )
    eval_file = open_ended_eval(tmp_path / "eval.jsonl")
    result = probe(
        tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file, judge="fake-d"
    )
    oe_rows = [
        r
        for r in read_jsonl(tmp_path / "out" / "trials.jsonl")
        if r["problem_type"] == "open-ended"
    ]
    assert len(oe_rows) == 6 and all(t["judged"] for r in oe_rows for t in r["trials"])
    # One judgement per distinct (question, answer): models repeat the same wrong answers.
    distinct = {(r["id"], t["answer"]) for r in oe_rows for t in r["trials"]}
    assert len(distinct) < 18
    assert vkr_fake_server.stats()["by_model_step"]["fake-d|judge_equivalence"] == len(distinct)
    kept = {r["id"] for r in read_jsonl(tmp_path / "out" / "kept.jsonl")}
    filtered = {r["id"] for r in read_jsonl(tmp_path / "out" / "filtered.jsonl")}
    # The MC questions are kept either way: every answer was wrong.
    assert {"q0", "q1"} <= kept
    assert {"q3", "q6"} <= (kept if outcome == "kept" else filtered)
    assert result.report["counts"]["skipped_open_ended"] == 0
    assert result.report["judge"] == "fake-d"


def test_open_ended_answer_equal_to_the_solution_needs_no_judge_call(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy({"accuracy": 1.0})
    eval_file = open_ended_eval(tmp_path / "eval.jsonl")
    result = probe(
        tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file, judge="fake-d"
    )
    assert "judge_equivalence" not in vkr_fake_server.stats()["by_step"]
    assert result.report["counts"]["filtered"] == 4


# ---------------------------------------------------------------- bad input


def test_bad_eval_lines_are_all_named_before_any_call(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    good = question(0)
    no_options = {k: v for k, v in question(1).items() if k != "options"}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps(no_options),
        json.dumps({**question(2), "solution": "<answer>F</answer>"}),
        json.dumps({**question(3), "problem_type": "yes/no"}),
        json.dumps({**question(4), "id": "q0"}),
        "",
        json.dumps({k: v for k, v in question(5).items() if k != "dataset"}),
    ]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as caught:
        probe(tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file)
    message = str(caught.value)
    assert f"eval file {eval_file} has 7 bad line(s)" in message
    assert "line 2: not JSON" in message
    assert "line 3: not a JSON object" in message
    assert "line 4 (id 'q1'): a multiple-choice question needs at least two options" in message
    assert (
        "line 5 (id 'q2'): solution '<answer>F</answer>' is not one of the option letters ABCD"
        in message
    )
    assert (
        "line 6 (id 'q3'): problem_type: Input should be 'multiple-choice' or 'open-ended'"
        in message
    )
    assert "line 7 (id 'q0'): duplicate id (first on line 1)" in message
    assert "line 9 (id 'q5'): dataset: Field required" in message
    assert vkr_fake_server.stats()["requests"] == 0
    assert not (tmp_path / "out").exists()


def test_missing_and_undecodable_videos_leave_their_questions_unprobed(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy({"accuracy": 0.0})
    eval_file = write_eval(
        tmp_path / "eval.jsonl",
        [
            question(0),
            question(1, video="corrupted.mp4"),
            question(2, video="gone/missing.mkv"),
            question(3, dataset="bench-b"),
        ],
    )
    result = probe(tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, eval_file)
    out = tmp_path / "out"
    unprobed = {r["id"]: r["unprobed_reason"] for r in read_jsonl(out / "unprobed.jsonl")}
    assert set(unprobed) == {"q1", "q2"}
    assert "corrupted.mp4" in unprobed["q1"] and "cannot decode" in unprobed["q1"]
    assert (
        unprobed["q2"] == f"video not probed: video file not found: {videos / 'gone/missing.mkv'}"
    )
    # The run went on: the other questions were probed and kept.
    assert [r["id"] for r in read_jsonl(out / "kept.jsonl")] == ["q0", "q3"]
    assert vkr_fake_server.stats()["by_step"] == {"single_frame_probe": 2 * 3 * 3}
    assert result.report["counts"]["unprobed"] == 2
    assert "2 video(s) could not be decoded or found" in (out / "report.md").read_text()


def test_a_wrong_videos_root_is_one_clear_error(
    tmp_path, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    with pytest.raises(InputError, match=r"none of the 2 video\(s\) .* is --videos-root right\?"):
        probe(tmp_path, empty, frames_dir, vkr_pool, vkr_plugin_manager)
    assert vkr_fake_server.stats()["requests"] == 0


def add_text_only_model(pool: Path) -> None:
    data = yaml.safe_load(pool.read_text())
    text_only = dict(
        data["models"][0], name="fake-text", model="openai/fake-text", modality=["text"]
    )
    data["models"].append(text_only)
    pool.write_text(yaml.safe_dump(data, sort_keys=False))


def test_text_only_probe_model_is_refused(tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server):
    add_text_only_model(vkr_pool)
    result = CliRunner().invoke(
        cli,
        [
            "probe",
            "--eval",
            str(mixed_eval(tmp_path / "eval.jsonl")),
            "--videos-root",
            str(videos),
            "--pool",
            str(vkr_pool),
            "--out",
            str(tmp_path / "out"),
            "--models",
            "fake-a,fake-text",
        ],
    )
    assert result.exit_code == 1
    assert "model 'fake-text' is text-only (modality ['text'])" in result.output
    assert "every probe model must see images" in result.output
    assert vkr_fake_server.stats()["requests"] == 0


def test_unknown_model_and_judge_are_named(
    tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager
):
    with pytest.raises(InputError, match=r"model 'fake-z' is not in the pool \(fake-a, fake-b"):
        probe(
            tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, models=["fake-a", "fake-z"]
        )
    with pytest.raises(InputError, match=r"model 'gpt-judge' is not in the pool"):
        probe(tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager, judge="gpt-judge")


def test_any_number_of_named_models_but_three_by_default(
    tmp_path, videos, frames_dir, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    vkr_fake_server.set_policy({"accuracy": 0.0})
    result = probe(
        tmp_path,
        videos,
        frames_dir,
        vkr_pool,
        vkr_plugin_manager,
        models=["fake-d", "fake-b"],
        trials=2,
    )
    assert result.report["models"] == ["fake-d", "fake-b"]
    assert vkr_fake_server.stats()["by_model_step"] == {
        "fake-b|single_frame_probe": 7 * 2,
        "fake-d|single_frame_probe": 7 * 2,
    }
    assert "| fake-d | fake-b |" in (tmp_path / "out" / "report.md").read_text()

    # Only two models eligible: the default (three, as in the paper) cannot be met.
    registry_file = vkr_pool.parent / "eligibility.yaml"
    registry = yaml.safe_load(registry_file.read_text())
    for name in ("fake-c", "fake-d"):
        registry["single_frame_probe"][name]["eligible"] = False
    registry_file.write_text(yaml.safe_dump(registry))
    with pytest.raises(
        InputError, match=r"only 2 vision model\(s\) .* \(fake-a, fake-b\).*--models"
    ):
        probe(tmp_path, videos, frames_dir, vkr_pool, vkr_plugin_manager)


# ---------------------------------------------------------------- the step plugin


def test_probe_step_is_a_plain_step_the_generation_graph_ignores(vkr_plugin_manager):
    registry = vkr_plugin_manager.registry
    step = registry.get("step", "single_frame_probe")
    assert isinstance(step, Step) and not isinstance(step, (Gate, Generator))
    assert step.modality == "vision" and step.uses_model
    assert step.output_schema.__name__ == "SolvedAnswer"
    assert registry.owners[("step", "single_frame_probe")] == "plugins.steps.single_frame_probe"
    assert "single_frame_probe" not in GenerationPipeline().model_steps(registry)
    assert "single_frame_probe" not in [gate.name for gate in registry.gates()]
