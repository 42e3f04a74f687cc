"""Exports equal what the official VideoKR tools produce and read, byte for byte.

The expected prompts below are written by hand from the official files (VideoKR repo:
``llamafactory/local_script/prepare_videokr_sft_data.py``,
``verl/local_script/prepare_videokr_rl_data.py``, the lmms-eval task ``videokr_eval``), so the
suite holds on a fresh clone. Where a checkout of the official repo is present, the oracle
tests also run the official scripts themselves on vkr's VideoKR jsonl and compare.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from cli import cli
from corpus.exporters import SplitData, to_rl
from corpus.reward import compute_score
from plugins.exporters import builtin
from vkr_core.schemas import AcceptedExample, InputError, Verdict

# A checkout (or bare git dir) of github.com/Fu-Fu-Fu-Fu/VideoKR named by VKR_VIDEOKR_REPO;
# the oracle tests skip only without it (no machine path is assumed).
OFFICIAL_REPO = Path(os.environ["VKR_VIDEOKR_REPO"]) if os.environ.get("VKR_VIDEOKR_REPO") else None

HEAD = (
    "Please answer this question based on the visual content.\n"
    "Provide your thinking process between the <think> and </think> tags, and then give your "
    "final answer between the <answer> and </answer> tags.\n"
)
MC_TAIL = (
    "Please provide only the single option letter (e.g., A, B, C, D, etc.) within the "
    "<answer>...</answer> tags."
)
OE_TAIL = "Please provide only your final answer within the <answer>...</answer> tags."

MC_QUESTION = "What does the cook do right before the flip?"
MC_OPTIONS = ["A. Tilts the pan back", "B. Adds butter", "C. Turns off the heat"]
OE_QUESTION = "Why does the pancake rise when the pan snaps forward?"


def example(
    problem_id: str,
    video: str,
    question: str,
    *,
    options: list[str] | None = None,
    answer: str = "B",
    think: str = "At 00:04 the wrist tilts the pan back.",
) -> AcceptedExample:
    return AcceptedExample(
        problem_id=problem_id,
        question=question,
        options=options,
        problem_type="multiple choice" if options else "open-ended",
        solution=f"<answer>{answer}</answer>",
        think=f"<think>{think}</think>",
        video_path=video,
        skill="KnowVidR",
        subject="pan cooking",
        discipline="culinary arts",
        knowledge_point="momentum",
        video_id=problem_id.split("-")[0],
        models={"example_generation": ["gen-a"]},
        verdicts=[Verdict(step="cot_verification", passed=True, reason="supported")],
    )


def video_root(tmp_path: Path, testdata: Path, names: list[str]) -> Path:
    """A video root holding a real, decodable video file at each relative path."""
    root = tmp_path / "videos"
    for name in names:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(testdata / "flipping_a_pancake.mkv", target)
    return root


@pytest.fixture
def pair(tmp_path: Path, testdata: Path) -> dict[str, Any]:
    """One MC and one open-ended example on two real videos."""
    root = video_root(tmp_path, testdata, ["cooking/pan01.mkv", "cooking/pan02.mkv"])
    mc = example("pan01-KnowVidR-0", "cooking/pan01.mkv", MC_QUESTION, options=MC_OPTIONS)
    oe = example("pan02-VidR-1", "cooking/pan02.mkv", OE_QUESTION, answer="momentum lifts it")
    return {"mc": mc, "oe": oe, "root": root}


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------- prompts, by hand


def test_llamafactory_user_turn_is_the_official_sft_prompt(pair, tmp_path: Path) -> None:
    out = tmp_path / "lf"
    builtin.LlamaFactoryExporter().export(
        [pair["mc"], pair["oe"]], out, video_root=pair["root"], dataset="videokr_train"
    )
    rows = json.loads((out / "videokr_train.json").read_text(encoding="utf-8"))
    by_video = {row["videos"][0]: row for row in rows}
    mc_user = by_video["cooking/pan01.mkv"]["messages"][0]["content"]
    oe_user = by_video["cooking/pan02.mkv"]["messages"][0]["content"]
    assert mc_user == (
        "<video>What does the cook do right before the flip?\n"
        "\n"
        "Options:\n"
        "A. Tilts the pan back\n"
        "B. Adds butter\n"
        "C. Turns off the heat\n" + HEAD + MC_TAIL
    )
    # The official open-ended instruction ends with a newline; the MC one does not.
    assert oe_user == (
        "<video>Why does the pancake rise when the pan snaps forward?\n" + HEAD + OE_TAIL + "\n"
    )
    assert by_video["cooking/pan02.mkv"]["messages"][1]["content"] == (
        "<think>At 00:04 the wrist tilts the pan back.</think>\n<answer>momentum lifts it</answer>"
    )


def test_verl_prompt_is_the_official_rl_prompt(pair, tmp_path: Path) -> None:
    out = tmp_path / "verl"
    builtin.VerlExporter().export([pair["mc"], pair["oe"]], out, video_root=pair["root"])
    rows = pq.read_table(out / "train.parquet").to_pylist()
    by_id = {row["extra_info"]["problem_id"]: row for row in rows}
    mc_prompt = by_id["pan01-KnowVidR-0"]["prompt"]
    oe_prompt = by_id["pan02-VidR-1"]["prompt"]
    assert mc_prompt == [
        {
            "role": "user",
            "content": "<video>\n"
            "What does the cook do right before the flip?\n"
            "Options:\n"
            "A. Tilts the pan back\n"
            "B. Adds butter\n"
            "C. Turns off the heat\n" + HEAD + MC_TAIL,
        }
    ]
    assert oe_prompt == [
        {
            "role": "user",
            "content": "<video>\nWhy does the pancake rise when the pan snaps forward?\n"
            + HEAD
            + OE_TAIL,
        }
    ]


def test_training_prompts_end_with_the_instruction_the_model_is_evaluated_with(pair) -> None:
    from corpus.exporters import eval_prompt, user_prompt

    # lmms-eval videokr_eval doc_to_text: question, options one per line (no header), post_prompt.
    assert eval_prompt(pair["mc"]) == (
        "What does the cook do right before the flip?\n"
        "A. Tilts the pan back\nB. Adds butter\nC. Turns off the heat\n" + HEAD + MC_TAIL
    )
    assert eval_prompt(pair["oe"]) == OE_QUESTION + "\n" + HEAD + OE_TAIL
    for item, tail in ((pair["mc"], MC_TAIL), (pair["oe"], OE_TAIL)):
        assert user_prompt(item, "rl").endswith("\n" + HEAD + tail)
        assert user_prompt(item, "sft").rstrip("\n").endswith("\n" + HEAD + tail)
        assert eval_prompt(item).endswith("\n" + HEAD + tail)


def test_a_media_placeholder_in_any_case_is_refused(pair, tmp_path: Path) -> None:
    # The official RL prep strips a leading <VIDEO> as if it were the video slot.
    odd = example("pan03-VidR-0", "cooking/pan01.mkv", "<Video> What happens next?")
    with pytest.raises(InputError, match=r"'pan03-VidR-0'.*placeholder <Video>"):
        builtin.VerlExporter().export([odd], tmp_path / "o", video_root=pair["root"])
    assert not (tmp_path / "o" / "train.parquet").exists()


def test_the_instruction_option_is_gone_with_a_clear_error(pair, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="has no option 'instruction'"):
        builtin.LlamaFactoryExporter().export(
            [pair["mc"]], tmp_path / "o", video_root=pair["root"], instruction="false"
        )


# ---------------------------------------------------------------- verl rows and schema


def expected_verl_schema() -> pa.Schema:
    """The arrow schema of the official prep's train.parquet, written out by hand."""
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            (
                "videos",
                pa.list_(
                    pa.struct(
                        [
                            ("video", pa.string()),
                            ("fps", pa.float64()),
                            ("max_frames", pa.int64()),
                            ("min_frames", pa.int64()),
                            ("max_pixels", pa.int64()),
                            ("min_pixels", pa.int64()),
                        ]
                    )
                ),
            ),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("problem_id", pa.string()),
                        ("problem_type", pa.string()),
                        ("answer", pa.string()),
                        ("solution", pa.string()),
                        ("source_path", pa.string()),
                        ("split", pa.string()),
                        ("index", pa.int64()),
                    ]
                ),
            ),
        ]
    )


def official_style_row() -> dict[str, Any]:
    """A row as the official RL prep writes it (its make_record + split_records), by hand."""
    return {
        "data_source": "videokr",
        "prompt": [
            {
                "role": "user",
                "content": "<video>\nWhat is heated first?\nOptions:\nA. The pan\nB. The oil\n"
                + HEAD
                + MC_TAIL,
            }
        ],
        "videos": [
            {
                "video": "Videos/official01.mp4",
                "fps": 2.0,
                "max_frames": 128,
                "min_frames": 4,
                "max_pixels": 128 * 28 * 28,
                "min_pixels": 128 * 28 * 28,
            }
        ],
        "ability": "video_qa",
        "reward_model": {"style": "rule", "ground_truth": "<answer>A</answer>"},
        "extra_info": {
            "problem_id": "official-0001",
            "problem_type": "multiple choice",
            "answer": "A",
            "solution": "<answer>A</answer>",
            "source_path": "Videos/official01.mp4",
            "split": "train",
            "index": 0,
        },
    }


def test_verl_rows_carry_pixels_and_every_official_extra_info_key(pair, tmp_path: Path) -> None:
    out = tmp_path / "verl"
    builtin.VerlExporter().export([pair["mc"], pair["oe"]], out, video_root=pair["root"])
    table = pq.read_table(out / "train.parquet")
    assert table.schema.equals(expected_verl_schema())
    rows = table.to_pylist()
    assert [r["videos"] for r in rows] == [
        [
            {
                "video": f"cooking/pan0{n}.mkv",
                "fps": 2.0,
                "max_frames": 128,
                "min_frames": 4,
                "max_pixels": 100352,
                "min_pixels": 100352,
            }
        ]
        for n in (1, 2)
    ]
    assert [r["extra_info"] for r in rows] == [
        {
            "problem_id": "pan01-KnowVidR-0",
            "problem_type": "multiple choice",
            "answer": "B",
            "solution": "<answer>B</answer>",
            "source_path": "cooking/pan01.mkv",
            "split": "train",
            "index": 0,
        },
        {
            "problem_id": "pan02-VidR-1",
            "problem_type": "open-ended",
            "answer": "momentum lifts it",
            "solution": "<answer>momentum lifts it</answer>",
            "source_path": "cooking/pan02.mkv",
            "split": "train",
            "index": 1,
        },
    ]
    for row in rows:
        truth = row["reward_model"]["ground_truth"]
        perfect = f"<think>seen</think>\n{truth}"
        assert compute_score(row["data_source"], perfect, truth, row["extra_info"]) == 1.0


def test_verl_sampling_options_reach_every_video_entry(pair, tmp_path: Path) -> None:
    out = tmp_path / "verl"
    builtin.VerlExporter().export(
        [pair["mc"]],
        out,
        video_root=pair["root"],
        fps="1",
        max_frames="64",
        min_frames="8",
        max_pixels="200704",
        min_pixels="50176",
        video_prefix="/data/videos/",
    )
    (row,) = pq.read_table(out / "train.parquet").to_pylist()
    assert row["videos"] == [
        {
            "video": "/data/videos/cooking/pan01.mkv",
            "fps": 1.0,
            "max_frames": 64,
            "min_frames": 8,
            "max_pixels": 200704,
            "min_pixels": 50176,
        }
    ]
    # source_path is the dataset's own path, as the official prep keeps it.
    assert row["extra_info"]["source_path"] == "cooking/pan01.mkv"
    with pytest.raises(InputError, match="need 1 <= min_pixels <= max_pixels"):
        builtin.VerlExporter().export(
            [pair["mc"]], out, video_root=pair["root"], max_pixels="1000", min_pixels="5000"
        )


def test_vkr_and_official_verl_parquets_concatenate_and_load(
    pair, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import datasets

    out = tmp_path / "verl"
    builtin.VerlExporter().export([pair["mc"], pair["oe"]], out, video_root=pair["root"])
    ours = out / "train.parquet"
    # The official prep writes its rows with datasets.Dataset.from_list(...).to_parquet(...).
    theirs = tmp_path / "official" / "train.parquet"
    theirs.parent.mkdir()
    datasets.Dataset.from_list([official_style_row()]).to_parquet(str(theirs))

    both = pa.concat_tables([pq.read_table(theirs), pq.read_table(ours)])
    assert both.num_rows == 3
    merged = datasets.concatenate_datasets(
        [datasets.Dataset.from_parquet(str(theirs)), datasets.Dataset.from_parquet(str(ours))]
    )
    assert merged["extra_info"][2]["problem_id"] == "pan02-VidR-1"
    # What verl does with data.train_files=[official, vkr]: one parquet dataset, both orders.
    for files in ([str(theirs), str(ours)], [str(ours), str(theirs)]):
        loaded = datasets.load_dataset("parquet", data_files=files, split="train")
        assert len(loaded) == 3
        assert {v[0]["max_pixels"] for v in loaded["videos"]} == {100352}
    alone = datasets.load_dataset("parquet", data_files=str(ours), split="train")
    assert alone["extra_info"][0]["answer"] == "B"


# ---------------------------------------------------------------- names the official tools read


def split_dir(
    tmp_path: Path, sft: list[AcceptedExample], rl: list[AcceptedExample], root: Path
) -> Path:
    """A split folder as `vkr split` leaves it (the VideoKR sft.jsonl and rl.jsonl)."""
    folder = tmp_path / "split"
    data = SplitData(sft=sft, rl=[to_rl(e) for e in rl], source="test")
    builtin.VideoKRExporter().export(data, folder, video_root=root)
    return folder


def test_default_names_are_the_official_ones(pair, tmp_path: Path) -> None:
    folder = split_dir(tmp_path, [pair["mc"]], [pair["oe"]], pair["root"])
    base = ["export", "--input", str(folder), "--video-root", str(pair["root"])]
    result = CliRunner().invoke(cli, [*base, "--format", "llamafactory", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    # llamafactory/examples/train_full/videokr_qwen3vl_sft.yaml: `dataset: videokr_train`.
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert list(info) == ["videokr_train"]
    assert info["videokr_train"]["file_name"] == "videokr_train.json"
    assert (tmp_path / "videokr_train.json").is_file()

    # lmms-eval videokr_eval.yaml: data_files test: VideoKR_eval.jsonl.
    result = CliRunner().invoke(cli, [*base, "--format", "eval", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    rows = rows_of(tmp_path / "ev" / "VideoKR_eval.jsonl")
    assert [r["id"] for r in rows] == ["pan01-KnowVidR-0", "pan02-VidR-1"]
    mc, oe = rows
    # The fields doc_to_text, doc_to_target and doc_to_visual read.
    assert mc["question"] == MC_QUESTION and mc["options"] == MC_OPTIONS
    assert mc["problem_type"] == "multiple-choice" and oe["problem_type"] == "open-ended"
    assert mc["solution"] == "<answer>B</answer>" and "options" not in oe
    assert (pair["root"] / mc["video_path"]).is_file()


# ---------------------------------------------------------------- hf


def test_every_hf_config_loads_with_datasets(pair, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    import datasets

    folder = split_dir(tmp_path, [pair["mc"]], [pair["oe"]], pair["root"])
    out = tmp_path / "hf"
    result = CliRunner().invoke(
        cli,
        ["export", "--format", "hf", "--input", str(folder), "--out", str(out)]
        + ["--video-root", str(pair["root"])],
    )
    assert result.exit_code == 0, result.output
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    configs = [c["config_name"] for c in front["configs"]]
    assert set(configs) == {"sft", "rl", "videos"}
    loaded = {name: datasets.load_dataset(str(out), name, split="train") for name in configs}
    assert loaded["sft"]["problem_id"] == ["pan01-KnowVidR-0"]
    assert loaded["rl"]["problem_id"] == ["pan02-VidR-1"]
    assert loaded["videos"].to_list() == [
        {"video_id": "pan01", "video_path": "cooking/pan01.mkv", "split": "sft", "examples": 1},
        {"video_id": "pan02", "video_path": "cooking/pan02.mkv", "split": "rl", "examples": 1},
    ]


# ---------------------------------------------------------------- official scripts as oracles


def official_file(path: str, dest: Path) -> Path:
    """Extract one file of the official repo; skip when the repo is not on this machine."""
    if OFFICIAL_REPO is None or not OFFICIAL_REPO.exists():
        pytest.skip(f"official VideoKR repo not found: set VKR_VIDEOKR_REPO (now {OFFICIAL_REPO})")
    text = subprocess.run(
        ["git", "-C", str(OFFICIAL_REPO), "show", f"HEAD:{path}"],
        check=True,
        capture_output=True,
    ).stdout
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(text)
    return dest


UNICODE_QUESTIONS = [
    "Qu'est-ce que la cuisinière fait à 00:05 ? 🍳",
    "视频中厨师在翻转煎饼之前做了什么？",
    "ما الذي يفعله الطاهي بعد الدقيقة الأولى؟",
    "Was passiert mit dem Teig (Maillard‑Reaktion)?\u00a0",
    "Ｗｈｙ does the batter bubble?\u3000",
]
MULTILINE_QUESTIONS = [
    "Watch the first ten seconds.\nWhat does the cook do with the spatula?",
    "Two steps are shown.\n\nWhich one comes first, and why?",
    "  Look at the pan at 00:03.\n\tIs the oil hot?  \n",
    "Steps seen:\nA. whisking\nB. pouring\nWhich step uses the most force?",
    "Consider the Options: given below. Which is right?",
]


def generated_corpus(tmp_path: Path, testdata: Path, n: int = 48) -> dict[str, Any]:
    """Examples covering MC (2 to 10 options) and open-ended, unicode and multi-line text."""
    rng = random.Random(8)
    questions = UNICODE_QUESTIONS + MULTILINE_QUESTIONS + ["What happens at 00:%02d?"]
    items: list[AcceptedExample] = []
    for i in range(n):
        question = questions[i % len(questions)]
        if "%" in question:
            question = question % i
        video = f"clips/v{i % 12:02d}.mkv"
        think = rng.choice(["Seen at 00:02.", "Étape 1 : chauffer.\nÉtape 2 : verser.", "火候"])
        if i % 3:
            count = 2 + i % 9
            options = [f"{'ABCDEFGHIJ'[k]}. choice {k} ✓ {rng.random():.3f}" for k in range(count)]
            if i % 7 == 0:
                options[-1] += "  "  # trailing spaces: both sides strip them
            answer = "ABCDEFGHIJ"[rng.randrange(count)]
            items.append(
                example(
                    f"v{i % 12:02d}-KnowVid-{i}",
                    video,
                    question,
                    options=options,
                    answer=answer,
                    think=think,
                )
            )
        else:
            answer = rng.choice(["the pan", "ça chauffe", "油温升高", "F = m·a"])
            items.append(
                example(f"v{i % 12:02d}-VidR-{i}", video, question, answer=answer, think=think)
            )
    root = video_root(tmp_path, testdata, sorted({e.video_path for e in items}))
    # By video and sorted, as `vkr split` does: even-numbered videos to SFT, the rest to RL.
    items.sort(key=lambda e: (e.video_id, e.problem_id))
    sft = [e for e in items if int(e.video_id[1:]) % 2 == 0]
    rl = [e for e in items if int(e.video_id[1:]) % 2 == 1]
    return {"split": split_dir(tmp_path, sft, rl, root), "root": root, "sft": sft, "rl": rl}


def run_script(script: Path, *args: str, cwd: Path) -> None:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env["HF_HOME"] = str(cwd / "hf-home")
    done = subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_llamafactory_export_equals_the_official_sft_prep(tmp_path: Path, testdata: Path) -> None:
    script = official_file(
        "llamafactory/local_script/prepare_videokr_sft_data.py", tmp_path / "official" / "sft.py"
    )
    corpus = generated_corpus(tmp_path, testdata)
    official_out = tmp_path / "official" / "videokr_train.json"
    run_script(
        script,
        "--input",
        str(corpus["split"] / "sft.jsonl"),
        "--output",
        str(official_out),
        cwd=tmp_path,
    )
    ours = tmp_path / "ours"
    builtin.LlamaFactoryExporter().export(
        corpus["split"], ours, video_root=corpus["root"], dataset="videokr_train"
    )
    theirs = json.loads(official_out.read_text(encoding="utf-8"))
    mine = json.loads((ours / "videokr_train.json").read_text(encoding="utf-8"))
    assert len(mine) == len(corpus["sft"]) == len(theirs)
    for vkr_row, official_row in zip(mine, theirs, strict=True):
        assert vkr_row == official_row
    # Registered as the official dataset_info.json registers it.
    official_info = json.loads(
        official_file(
            "llamafactory/data/dataset_info.json", tmp_path / "o" / "info.json"
        ).read_text()
    )
    assert json.loads((ours / "dataset_info.json").read_text()) == official_info


def test_verl_export_equals_the_official_rl_prep(tmp_path: Path, testdata: Path) -> None:
    script = official_file(
        "verl/local_script/prepare_videokr_rl_data.py", tmp_path / "official" / "rl.py"
    )
    corpus = generated_corpus(tmp_path, testdata)
    official_dir = tmp_path / "official" / "out"
    run_script(
        script,
        "--input_json",
        str(corpus["split"] / "rl.jsonl"),
        "--output_dir",
        str(official_dir),
        "--val_size",
        "0",
        cwd=tmp_path,
    )
    ours = tmp_path / "ours"
    builtin.VerlExporter().export(corpus["split"], ours, video_root=corpus["root"])
    theirs = pq.read_table(official_dir / "train.parquet")
    mine = pq.read_table(ours / "train.parquet")
    assert mine.schema.equals(theirs.schema)
    assert mine.schema.equals(expected_verl_schema())
    assert mine.num_rows == len(corpus["rl"]) == theirs.num_rows
    for vkr_row, official_row in zip(mine.to_pylist(), theirs.to_pylist(), strict=True):
        assert vkr_row == official_row
    assert pa.concat_tables([theirs, mine]).num_rows == 2 * mine.num_rows


class _Logger:
    """Stands in for loguru (absent here), which the lmms-eval utils use only to log."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def test_eval_export_reads_as_the_official_lmms_eval_task(
    tmp_path: Path, testdata: Path, monkeypatch
) -> None:
    task = "lmms_eval/lmms_eval/tasks"
    package = tmp_path / "lmms" / "lmms_eval"
    official_file(f"{task}/videokr_eval/utils.py", package / "tasks/videokr_eval/utils.py")
    official_file(
        f"{task}/_task_utils/judge_utils.py", package / "tasks/_task_utils/judge_utils.py"
    )
    config_path = official_file(
        f"{task}/videokr_eval/videokr_eval.yaml", tmp_path / "videokr_eval.yaml"
    )
    for folder in (package, package / "tasks", package / "tasks/videokr_eval"):
        (folder / "__init__.py").write_text("")
    (package / "tasks/_task_utils/__init__.py").write_text("")

    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load(config_path.read_text(), Loader=TaskLoader)  # noqa: S506 - SafeLoader

    corpus = generated_corpus(tmp_path, testdata)
    out = tmp_path / "eval"
    builtin.EvalExporter().export(corpus["split"], out, video_root=corpus["root"])

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VIDEOKR_USE_VLM_JUDGE", "0")  # rule scoring, no judge server
    monkeypatch.setenv("VIDEOKR_EVAL_ROOT", str(corpus["root"]))
    monkeypatch.syspath_prepend(str(tmp_path / "lmms"))
    if "loguru" not in sys.modules:
        try:
            import loguru  # noqa: F401
        except ImportError:
            stand_in = type(sys)("loguru")
            stand_in.logger = _Logger()  # type: ignore[attr-defined]
            monkeypatch.setitem(sys.modules, "loguru", stand_in)
    for name in [m for m in sys.modules if m.split(".")[0] == "lmms_eval"]:
        monkeypatch.delitem(sys.modules, name)
    import importlib

    utils = importlib.import_module("lmms_eval.tasks.videokr_eval.utils")
    import datasets

    from corpus.exporters import eval_prompt

    # As lmms-eval loads the task: dataset_path (our export folder) with its data_files.
    docs = datasets.load_dataset(
        str(out), data_files=config["dataset_kwargs"]["data_files"], split=config["test_split"]
    )
    examples = {e.problem_id: e for e in corpus["sft"] + corpus["rl"]}
    assert sorted(docs["id"]) == sorted(examples)
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    for doc in docs:
        item = examples[doc["id"]]
        assert utils.videokr_eval_doc_to_text(doc, kwargs) == eval_prompt(item)
        assert utils.videokr_eval_doc_to_target(doc) == item.solution
        (video,) = utils.videokr_eval_doc_to_visual(doc)
        assert Path(video) == corpus["root"] / item.video_path
        if item.problem_type == "multiple choice":
            right = f"<think>x</think>\n{item.solution}"
            result = utils.videokr_eval_process_results(doc, [right])["videokr_eval_acc"]
            assert result["correct"] is True and result["question_type"] == "multiple-choice"
    for name in [m for m in sys.modules if m.split(".")[0] == "lmms_eval"]:
        del sys.modules[name]
