"""`vkr export`: every format loads back with the fields its tool reads, and scores 1.0 when right."""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Any

import pluggy
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner
from corpus_factory import make_example, make_run, read_jsonl

from cli import cli
from corpus.exporters import Exporter, SplitData, load_split
from corpus.reward import compute_score
from corpus.split import split_run_dirs
from plugins.exporters import builtin
from vkr_core import hookspecs
from vkr_core.hookspecs import hookimpl
from vkr_core.plugins import collect
from vkr_core.schemas import InputError

FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run, split once: the examples, the split folder and the video root."""
    base = tmp_path_factory.mktemp("corpus")
    examples = make_run(base / "run", base / "videos", n_videos=24)
    split_run_dirs([base / "run"], base / "split", seed=0)
    return {
        "examples": {e.problem_id: e for e in examples},
        "split": base / "split",
        "root": base / "videos",
        "sft": read_jsonl(base / "split" / "sft.jsonl"),
        "rl": read_jsonl(base / "split" / "rl.jsonl"),
    }


def export(fmt: str, corpus: dict[str, Any], out: Path, *options: str) -> Any:
    args = ["export", "--format", fmt, "--input", str(corpus["split"]), "--out", str(out)]
    args += ["--video-root", str(corpus["root"])]
    for option in options:
        args += ["-o", option]
    return CliRunner().invoke(cli, args)


def relative(example: Any, root: Path) -> str:
    return Path(example.video_path).relative_to(root).as_posix()


def inner(tagged: str, tag: str) -> str:
    return tagged.removeprefix(f"<{tag}>").removesuffix(f"</{tag}>")


# ---------------------------------------------------------------- videokr


def test_videokr_export_has_the_release_fields_and_relative_paths(corpus, tmp_path: Path) -> None:
    result = export("videokr", corpus, tmp_path)
    assert result.exit_code == 0, result.output
    sft, rl = read_jsonl(tmp_path / "sft.jsonl"), read_jsonl(tmp_path / "rl.jsonl")
    assert [r["problem_id"] for r in sft] == [r["problem_id"] for r in corpus["sft"]]
    assert [r["problem_id"] for r in rl] == [r["problem_id"] for r in corpus["rl"]]
    for row in sft + rl:
        example = corpus["examples"][row["problem_id"]]
        assert row["question"] == example.question
        assert row["problem_type"] in ("multiple choice", "open-ended")
        assert row["solution"] == example.solution
        assert row["video_path"] == relative(example, corpus["root"])
        assert (corpus["root"] / row["video_path"]).is_file()  # a real video under the root
        if example.problem_type == "multiple choice":
            letters = [o.split(".")[0] for o in row["options"]]
            assert letters == list("ABCD")[: len(letters)]
        else:
            assert "options" not in row
        gt = row["solution"]
        perfect = f"<think>x</think>\n{gt}"
        assert compute_score("videokr", perfect, gt, {"problem_type": row["problem_type"]}) == 1.0
    for row in sft:
        assert row["think"] == corpus["examples"][row["problem_id"]].think
        assert inner(row["think"], "think").strip() and inner(row["solution"], "answer").strip()
        assert {"skill", "subject", "discipline", "knowledge_point", "models", "verdicts"} <= set(
            row
        )
    for row in rl:
        assert "think" not in row and "verdicts" not in row


# ---------------------------------------------------------------- llamafactory


def test_llamafactory_export_loads_as_sharegpt_with_one_video_per_tag(
    corpus, tmp_path: Path
) -> None:
    result = export("llamafactory", corpus, tmp_path)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info == {
        "videokr_train": {
            "file_name": "videokr_train.json",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "videos": "videos"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        }
    }
    rows = json.loads((tmp_path / "videokr_train.json").read_text())
    assert len(rows) == len(corpus["sft"])
    for row, sft in zip(rows, corpus["sft"], strict=True):
        example = corpus["examples"][sft["problem_id"]]
        assert set(row) == {"messages", "videos"}
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        tags = sum(m["content"].count("<video>") for m in row["messages"])
        assert tags == len(row["videos"]) == 1
        assert user["content"].startswith("<video>")
        assert example.question in user["content"]
        for option in example.options or []:
            assert option in user["content"]
        think, answer = inner(example.think, "think"), inner(example.solution, "answer")
        assert assistant["content"] == f"<think>{think}</think>\n<answer>{answer}</answer>"
        assert FORMAT.fullmatch(assistant["content"])
        score = compute_score(
            "videokr",
            assistant["content"],
            example.solution,
            {"problem_type": example.problem_type},
        )
        assert score == 1.0
        # LLaMA-Factory joins media_dir with each relative path: point media_dir at the root.
        assert os.path.isfile(os.path.join(corpus["root"], row["videos"][0]))


def test_llamafactory_adds_its_entry_to_an_existing_dataset_info(corpus, tmp_path: Path) -> None:
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"alpaca_en_demo": {"file_name": "a.json"}})
    )
    result = export("llamafactory", corpus, tmp_path, "dataset=my_videos")
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert set(info) == {"alpaca_en_demo", "my_videos"}
    assert info["my_videos"]["file_name"] == "my_videos.json"
    rows = json.loads((tmp_path / "my_videos.json").read_text())
    assert len(rows) == len(corpus["sft"])


# ---------------------------------------------------------------- verl


def test_verl_export_is_the_rl_set_as_grpo_rows(corpus, tmp_path: Path) -> None:
    result = export("verl", corpus, tmp_path)
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "train.parquet")
    assert table.column_names == [
        "data_source",
        "prompt",
        "videos",
        "ability",
        "reward_model",
        "extra_info",
    ]
    rows = table.to_pylist()
    assert [r["extra_info"]["problem_id"] for r in rows] == [r["problem_id"] for r in corpus["rl"]]
    for index, row in enumerate(rows):
        example = corpus["examples"][row["extra_info"]["problem_id"]]
        assert row["data_source"] == "videokr"
        assert row["ability"] == "video_qa"
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
        content = row["prompt"][0]["content"]
        assert content.count("<video>") == len(row["videos"]) == 1
        assert example.question in content
        assert row["videos"] == [
            {
                "video": relative(example, corpus["root"]),
                "fps": 2.0,
                "max_frames": 128,
                "min_frames": 4,
                "max_pixels": 128 * 28 * 28,
                "min_pixels": 128 * 28 * 28,
            }
        ]
        assert row["reward_model"] == {"style": "rule", "ground_truth": example.solution}
        assert row["extra_info"] == {
            "problem_id": example.problem_id,
            "problem_type": example.problem_type,
            "answer": inner(example.solution, "answer"),
            "solution": example.solution,
            "source_path": relative(example, corpus["root"]),
            "split": "train",
            "index": index,
        }
        perfect = f"<think>I watched it.</think>\n{row['reward_model']['ground_truth']}"
        score = compute_score(
            row["data_source"], perfect, row["reward_model"]["ground_truth"], row["extra_info"]
        )
        assert score == 1.0


def test_verl_options_choose_part_split_and_sampling(corpus, tmp_path: Path) -> None:
    result = export(
        "verl",
        corpus,
        tmp_path,
        "part=sft",
        "split=val",
        "fps=1",
        "max_frames=32",
        "video_prefix=/data/videokr/",
    )
    assert result.exit_code == 0, result.output
    rows = pq.read_table(tmp_path / "val.parquet").to_pylist()
    assert [r["extra_info"]["problem_id"] for r in rows] == [r["problem_id"] for r in corpus["sft"]]
    assert {r["extra_info"]["split"] for r in rows} == {"val"}
    video = rows[0]["videos"][0]
    assert video["fps"] == 1.0 and video["max_frames"] == 32 and video["min_frames"] == 4
    assert video["video"].startswith("/data/videokr/clips/")

    bad = export("verl", corpus, tmp_path, "max_frames=lots")
    assert bad.exit_code == 1 and "max_frames='lots' is not a valid int" in bad.output
    bad = export("verl", corpus, tmp_path, "frames=8")
    assert bad.exit_code == 1 and "has no option 'frames'" in bad.output


# ---------------------------------------------------------------- hf


def test_hf_export_is_a_datasets_layout_with_a_card_and_manifest(corpus, tmp_path: Path) -> None:
    result = export("hf", corpus, tmp_path, "shard_size=7", "license=cc-by-4.0")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "cc-by-4.0"
    configs = {c["config_name"]: c for c in front["configs"]}
    assert set(configs) == {"sft", "rl", "videos"}
    for name in ("sft", "rl"):
        pattern = configs[name]["data_files"][0]["path"]
        shards = sorted(glob.glob(str(tmp_path / pattern)))
        n = len(corpus[name])
        assert len(shards) == -(-n // 7)  # ceil: shards of at most 7 rows
        assert shards[0].endswith(f"train-00000-of-{len(shards):05d}.parquet")
        rows = [r for s in shards for r in pq.read_table(s).to_pylist()]
        assert [r["problem_id"] for r in rows] == [r["problem_id"] for r in corpus[name]]
        for row in rows:
            example = corpus["examples"][row["problem_id"]]
            assert row["video_path"] == relative(example, corpus["root"])
            assert row["solution"] == example.solution
            if example.problem_type == "multiple choice":
                assert row["options"] == example.options
            else:
                assert row["options"] is None
            if name == "sft":
                assert row["think"] == example.think
                assert json.loads(row["models"]) == example.models
                assert [v["step"] for v in json.loads(row["verdicts"])] == [
                    v.step for v in example.verdicts
                ]
            else:
                assert "think" not in row
    pattern = configs["videos"]["data_files"][0]["path"]
    manifest = [
        r for s in sorted(glob.glob(str(tmp_path / pattern))) for r in pq.read_table(s).to_pylist()
    ]
    assert len({m["video_id"] for m in manifest}) == len(manifest)
    for entry in manifest:
        assert (corpus["root"] / entry["video_path"]).is_file()
        assert not Path(entry["video_path"]).is_absolute()
    assert sum(m["examples"] for m in manifest) == len(corpus["sft"]) + len(corpus["rl"])
    # No video file is copied into the dataset.
    assert not [p for p in tmp_path.rglob("*") if p.suffix in {".mp4", ".mov", ".mkv"}]


def test_hf_export_loads_with_the_datasets_library(corpus, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert export("hf", corpus, tmp_path / "ds").exit_code == 0
    import datasets

    sft = datasets.load_dataset(str(tmp_path / "ds"), "sft", split="train")
    rl = datasets.load_dataset(str(tmp_path / "ds"), "rl", split="train")
    assert sft["problem_id"] == [r["problem_id"] for r in corpus["sft"]]
    assert rl["problem_id"] == [r["problem_id"] for r in corpus["rl"]]
    assert "think" in sft.column_names and "think" not in rl.column_names


# ---------------------------------------------------------------- eval


def test_eval_export_uses_hyphenated_types(corpus, tmp_path: Path) -> None:
    result = export("eval", corpus, tmp_path, "dataset=vkr-pilot")
    assert result.exit_code == 0, result.output
    rows = read_jsonl(tmp_path / "VideoKR_eval.jsonl")
    assert len(rows) == len(corpus["sft"]) + len(corpus["rl"])
    for row in rows:
        example = corpus["examples"][row["id"]]
        mc = example.problem_type == "multiple choice"
        assert row["problem_type"] == ("multiple-choice" if mc else "open-ended")
        assert ("options" in row) == mc
        assert row["video_path"] == relative(example, corpus["root"])
        assert row["solution"] == example.solution
        assert row["dataset"] == "vkr-pilot"
        assert row["subject"] == example.subject
        assert row["question"] == example.question


# ---------------------------------------------------------------- bad input


def test_a_video_outside_the_root_is_an_error_naming_it(corpus, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["export", "--format", "videokr", "--input", str(corpus["split"])]
    result = CliRunner().invoke(
        cli, [*args, "--out", str(tmp_path / "o"), "--video-root", str(elsewhere)]
    )
    assert result.exit_code == 1
    first = corpus["examples"][corpus["sft"][0]["problem_id"]]
    assert first.video_path in result.output and "outside the video root" in result.output
    assert not (tmp_path / "o" / "sft.jsonl").exists()

    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "is absolute: pass --video-root" in result.output


def test_a_relative_path_climbing_out_of_the_root_is_refused(tmp_path: Path) -> None:
    example = make_example("v1", 0, "../secrets/v1.mp4", multiple_choice=True)
    with pytest.raises(
        InputError, match=r"'\.\./secrets/v1\.mp4' of example 'v1-VidR-0' is outside"
    ):
        builtin.VideoKRExporter().export([example], tmp_path / "out", video_root=tmp_path)
    assert not (tmp_path / "out").exists()


def test_an_edited_split_with_an_empty_trace_is_refused(corpus, tmp_path: Path) -> None:
    split = tmp_path / "split"
    split.mkdir()
    rows = [dict(r) for r in corpus["sft"]]
    rows[2]["think"] = "<think></think>"
    (split / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (split / "rl.jsonl").write_text((corpus["split"] / "rl.jsonl").read_text())
    args = [
        "export",
        "--format",
        "llamafactory",
        "--input",
        str(split),
        "--out",
        str(tmp_path / "o"),
    ]
    result = CliRunner().invoke(cli, [*args, "--video-root", str(corpus["root"])])
    assert result.exit_code == 1
    assert rows[2]["problem_id"] in result.output and "sft.jsonl:3" in result.output
    assert not (tmp_path / "o").exists()


def test_a_split_sharing_a_video_between_sides_is_refused(corpus, tmp_path: Path) -> None:
    split = tmp_path / "split"
    split.mkdir()
    moved = dict(corpus["sft"][0])
    del moved["think"], moved["knowledge_point"], moved["models"], moved["verdicts"]
    moved["problem_id"] = "moved-copy"
    (split / "sft.jsonl").write_text((corpus["split"] / "sft.jsonl").read_text())
    rl = (corpus["split"] / "rl.jsonl").read_text() + json.dumps(moved) + "\n"
    (split / "rl.jsonl").write_text(rl)
    with pytest.raises(InputError, match=f"video '{moved['video_id']}' has examples in both"):
        builtin.EvalExporter().export(split, tmp_path / "o", video_root=corpus["root"])


def test_a_problem_id_twice_in_a_split_is_refused(corpus, tmp_path: Path) -> None:
    split = tmp_path / "split"
    split.mkdir()
    (split / "sft.jsonl").write_text((corpus["split"] / "sft.jsonl").read_text())
    rl = (corpus["split"] / "rl.jsonl").read_text()
    (split / "rl.jsonl").write_text(rl + rl.splitlines()[0] + "\n")
    pid = corpus["rl"][0]["problem_id"]
    with pytest.raises(InputError, match=f"problem_id '{pid}' appears 2 times in {split}"):
        builtin.VideoKRExporter().export(split, tmp_path / "o", video_root=corpus["root"])


def test_unknown_format_and_missing_split_files(corpus, tmp_path: Path) -> None:
    result = export("csv", corpus, tmp_path)
    assert result.exit_code == 1
    assert "no exporter named 'csv'" in result.output and "llamafactory" in result.output
    args = ["export", "--format", "verl", "--input", str(tmp_path), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "has no sft.jsonl: make it with `vkr split`" in result.output


# ---------------------------------------------------------------- extension


class CsvExporter(Exporter):
    """A third party's exporter: a dozen lines."""

    name = "csv"
    description = "RL questions and answers as CSV"

    def write(self, data: SplitData, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        import csv

        path = out_dir / "rl.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            for example in data.rl:
                writer.writerow([example.problem_id, example.video_path, example.solution])
        return [path]


class CsvPlugin:
    @hookimpl
    def vkr_register_exporters(self, register: Any) -> None:
        register(CsvExporter())


def test_a_third_party_exporter_registers_and_gets_checked_input(corpus, tmp_path: Path) -> None:
    pm = pluggy.PluginManager("vkr")
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="plugins.exporters.builtin")
    pm.register(CsvPlugin(), name="vkr-csv")
    registry = collect(pm)
    assert {"videokr", "llamafactory", "verl", "hf", "eval", "csv"} <= set(registry.exporters)
    assert registry.owners[("exporter", "csv")] == "vkr-csv"
    paths = registry.get("exporter", "csv").export(
        corpus["split"], tmp_path, video_root=corpus["root"]
    )
    lines = paths[0].read_text().splitlines()
    assert len(lines) == len(corpus["rl"])
    first_video = Path(corpus["rl"][0]["video_path"]).relative_to(corpus["root"]).as_posix()
    assert lines[0].split(",")[1] == first_video


def test_examples_can_be_exported_without_a_split(corpus, tmp_path: Path) -> None:
    examples = list(corpus["examples"].values())[:5]
    paths = builtin.VerlExporter().export(examples, tmp_path, video_root=corpus["root"])
    rows = pq.read_table(paths[0]).to_pylist()
    assert [r["extra_info"]["problem_id"] for r in rows] == sorted(e.problem_id for e in examples)
    assert load_split(corpus["split"]).sft[0].problem_id == corpus["sft"][0]["problem_id"]
