"""`vkr split`: a seeded partition by video into SFT (with trace) and RL (answer only)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus_factory import make_example, make_run, read_jsonl, write_record

from cli import cli
from corpus.exporters import load_accepted
from corpus.split import PAPER_SFT_SHARE, split_examples
from vkr_core.schemas import InputError, Video, VideoRecord

VIDEOKR_SFT = ["problem_id", "question", "problem_type", "solution", "think", "video_path"]
PROVENANCE = ["skill", "subject", "discipline", "knowledge_point", "video_id", "models", "verdicts"]
RL_FIELDS = [
    "problem_id",
    "question",
    "problem_type",
    "solution",
    "video_path",
    "skill",
    "subject",
    "discipline",
    "video_id",
]


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, list]:
    examples = make_run(tmp_path / "run", tmp_path / "videos", n_videos=40)
    return tmp_path / "run", examples


def vkr(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_split_writes_sft_and_rl_by_video_at_the_paper_share(run, tmp_path: Path) -> None:
    run_dir, examples = run
    out = tmp_path / "split"
    result = vkr("split", str(run_dir), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "SFT:" in result.output and "RL:" in result.output

    sft, rl = read_jsonl(out / "sft.jsonl"), read_jsonl(out / "rl.jsonl")
    manifest = json.loads((out / "split.json").read_text())
    assert len(sft) + len(rl) == len(examples)
    assert {r["problem_id"] for r in sft} | {r["problem_id"] for r in rl} == {
        e.problem_id for e in examples
    }
    sft_videos, rl_videos = {r["video_id"] for r in sft}, {r["video_id"] for r in rl}
    assert sft_videos.isdisjoint(rl_videos)
    assert sorted(sft_videos) == manifest["sft"]["video_ids"]
    assert sorted(rl_videos) == manifest["rl"]["video_ids"]

    # Videos are indivisible: the share is as close as whole videos allow.
    largest_video = max(Counter(e.video_id for e in examples).values())
    assert abs(len(sft) - PAPER_SFT_SHARE * len(examples)) <= largest_video / 2
    assert manifest["seed"] == 0
    assert manifest["sft_share_requested"] == pytest.approx(201_156 / 315_537)
    assert manifest["sft_share"] == pytest.approx(len(sft) / len(examples))
    assert manifest["sft"]["examples"] == len(sft) and manifest["rl"]["examples"] == len(rl)
    assert sum(manifest["sft"]["by_skill"].values()) == len(sft)
    assert set(manifest["sft"]["by_skill"]) | set(manifest["rl"]["by_skill"]) == {
        "VidR",
        "KnowVid",
        "KnowVidR",
    }

    by_id = {e.problem_id: e for e in examples}
    for row in sft:
        example = by_id[row["problem_id"]]
        mc = example.problem_type == "multiple choice"
        expected = VIDEOKR_SFT[:2] + (["options"] if mc else []) + VIDEOKR_SFT[2:] + PROVENANCE
        assert list(row) == expected
        assert row["think"] == example.think and row["think"].startswith("<think>")
        assert row["solution"] == example.solution
        assert row["video_path"] == example.video_path
        assert row["models"] == example.models
        assert [v["step"] for v in row["verdicts"]] == [v.step for v in example.verdicts]
        if mc:
            assert row["options"] == example.options
    for row in rl:
        example = by_id[row["problem_id"]]
        mc = example.problem_type == "multiple choice"
        assert list(row) == RL_FIELDS[:2] + (["options"] if mc else []) + RL_FIELDS[2:]
        assert "think" not in row
        assert row["solution"] == example.solution
        assert row["video_id"] == example.video_id


def test_same_seed_same_split_and_another_seed_another(run, tmp_path: Path) -> None:
    run_dir, _ = run
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert (
            vkr("split", str(run_dir), "--out", str(tmp_path / name), "--seed", seed).exit_code == 0
        )
    for file in ("sft.jsonl", "rl.jsonl", "split.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    a = json.loads((tmp_path / "a" / "split.json").read_text())
    c = json.loads((tmp_path / "c" / "split.json").read_text())
    assert a["sft"]["video_ids"] != c["sft"]["video_ids"]


def test_the_split_does_not_depend_on_input_order(run) -> None:
    _, examples = run
    shuffled = list(examples)
    random.Random(3).shuffle(shuffled)
    first, second = split_examples(examples, seed=5), split_examples(shuffled, seed=5)
    assert [e.problem_id for e in first.sft] == [e.problem_id for e in second.sft]
    assert first.rl_videos == second.rl_videos


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_requested_share_is_met_within_half_a_video(run, share: float) -> None:
    _, examples = run
    split = split_examples(examples, sft_share=share, seed=1)
    largest_video = max(Counter(e.video_id for e in examples).values())
    assert abs(len(split.sft) - share * len(examples)) <= largest_video / 2
    assert set(split.sft_videos).isdisjoint(split.rl_videos)
    if share == 0.0:
        assert split.sft == []
    if share == 1.0:
        assert split.rl == []


def test_several_run_dirs_are_split_together(tmp_path: Path) -> None:
    first = make_run(tmp_path / "r1", tmp_path / "videos", n_videos=6, prefix="a")
    second = make_run(tmp_path / "r2", tmp_path / "videos", n_videos=6, prefix="b")
    out = tmp_path / "split"
    result = vkr("split", str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(out))
    assert result.exit_code == 0, result.output
    written = read_jsonl(out / "sft.jsonl") + read_jsonl(out / "rl.jsonl")
    assert len(written) == len(first) + len(second)
    manifest = json.loads((out / "split.json").read_text())
    assert manifest["run_dirs"] == [str(tmp_path / "r1"), str(tmp_path / "r2")]


def test_one_video_file_under_two_ids_stays_on_one_side(tmp_path: Path) -> None:
    shared = str(tmp_path / "videos" / "same.mp4")
    examples = [make_example("x1", i, shared, multiple_choice=True) for i in range(3)]
    examples += [make_example("x2", i, shared, multiple_choice=False) for i in range(3)]
    examples += [make_example(f"o{i}", i, f"/v/o{i}.mp4", multiple_choice=True) for i in range(6)]
    for seed in range(10):
        split = split_examples(examples, sft_share=0.5, seed=seed)
        sides = {e.video_id: "sft" for e in split.sft} | {e.video_id: "rl" for e in split.rl}
        assert sides["x1"] == sides["x2"]


def test_empty_answer_is_refused_naming_the_problem_id(run, tmp_path: Path) -> None:
    run_dir, examples = run
    record_path = run_dir / "records" / f"{examples[0].video_id}.json"
    data = json.loads(record_path.read_text())
    data["accepted"][0]["solution"] = "<answer>  </answer>"
    record_path.write_text(json.dumps(data))
    out = tmp_path / "split"
    result = CliRunner().invoke(cli, ["split", str(run_dir), "--out", str(out)])
    assert result.exit_code == 1
    assert data["accepted"][0]["problem_id"] in result.output
    assert str(record_path) in result.output and "empty" in result.output
    assert not (out / "sft.jsonl").exists()


def test_empty_trace_is_refused_naming_the_problem_id(run) -> None:
    _, examples = run
    # A record edited after validation (model_copy skips validators) must still be caught.
    broken = examples[5].model_copy(update={"think": "<think>\n</think>"})
    with pytest.raises(InputError, match=broken.problem_id) as info:
        split_examples([*examples[:5], broken, *examples[6:]])
    assert "empty reasoning trace" in str(info.value)


def test_malformed_options_are_refused_naming_the_problem_id(run) -> None:
    _, examples = run
    mc = next(e for e in examples if e.problem_type == "multiple choice")
    swapped = mc.model_copy(update={"options": [mc.options[1], mc.options[0], *mc.options[2:]]})
    others = [e for e in examples if e.problem_id != mc.problem_id]
    with pytest.raises(InputError, match=rf"{mc.problem_id}.*must start with 'A\.'"):
        split_examples([*others, swapped])


def test_duplicate_problem_id_across_runs_names_both_files(tmp_path: Path) -> None:
    make_run(tmp_path / "r1", tmp_path / "videos", n_videos=3, prefix="a")
    make_run(tmp_path / "r2", tmp_path / "videos", n_videos=3, prefix="b")
    # The same example reached a second run under another video record.
    clash = make_example("b000", 0, "/v/b000.mp4", multiple_choice=True)
    clash = clash.model_copy(update={"problem_id": "a000-VidR-0"})
    path = write_record(
        tmp_path / "r2",
        VideoRecord(
            video_id="b000",
            video=Video(video_id="b000", path="/v/b000.mp4"),
            status="done",
            accepted=[clash],
        ),
    )
    result = CliRunner().invoke(
        cli, ["split", str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "'a000-VidR-0' appears twice" in result.output
    assert str(tmp_path / "r1" / "records" / "a000.json") in result.output
    assert str(path) in result.output


def test_bad_run_dirs_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        cli, ["split", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "has no records/ folder" in result.output

    (tmp_path / "none" / "records").mkdir(parents=True)
    result = CliRunner().invoke(
        cli, ["split", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "no accepted examples" in result.output

    (tmp_path / "bad" / "records").mkdir(parents=True)
    (tmp_path / "bad" / "records" / "v1.json").write_text("{not json")
    result = CliRunner().invoke(cli, ["split", str(tmp_path / "bad"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "v1.json is not readable JSON" in result.output

    result = CliRunner().invoke(
        cli, ["split", str(tmp_path / "empty"), "--out", "o", "--sft-share", "1.5"]
    )
    assert result.exit_code == 2 and "--sft-share" in result.output


def test_load_accepted_is_sorted_and_skips_failed_videos(run) -> None:
    run_dir, examples = run
    assert (run_dir / "records" / "vid-broken.json").exists()
    loaded = load_accepted([run_dir])
    assert loaded == sorted(examples, key=lambda e: (e.video_id, e.problem_id))


def test_open_ended_answers_that_cannot_earn_full_reward_are_reported(tmp_path: Path) -> None:
    one_word = make_example("w1", 0, "/v/w1.mp4", multiple_choice=False)
    one_word = one_word.model_copy(update={"solution": "<answer>osmosis</answer>"})
    normal = make_example("w2", 0, "/v/w2.mp4", multiple_choice=False)
    write_record(
        tmp_path / "run",
        VideoRecord(
            video_id="w1",
            video=Video(video_id="w1", path="/v/w1.mp4"),
            status="done",
            accepted=[one_word],
        ),
    )
    write_record(
        tmp_path / "run",
        VideoRecord(
            video_id="w2",
            video=Video(video_id="w2", path="/v/w2.mp4"),
            status="done",
            accepted=[normal],
        ),
    )
    out = tmp_path / "split"
    result = CliRunner().invoke(
        cli, ["split", str(tmp_path / "run"), "--out", str(out), "--sft-share", "0"]
    )
    assert result.exit_code == 0
    assert "1 open-ended RL answers have fewer than two words" in result.output
    assert "w1-VidR-0" in result.output
    manifest = json.loads((out / "split.json").read_text())
    assert manifest["open_ended_below_full_reward"] == [one_word.problem_id]
