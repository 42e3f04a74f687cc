"""Benchmark the corpus tail: loading records, splitting, each exporter and the reward.

Each vkr operation is timed beside a "raw" baseline that does the same file work with no
validation (json/pyarrow/rouge-score called directly), so the ratio is what vkr's checks,
pydantic models and atomic writes cost. Medians of --repeats runs, all measured in one run.

    .venv/bin/python bench/bench_corpus.py --videos 3000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from corpus.exporters import load_accepted  # noqa: E402
from corpus.report import PAPER_SKILLS as SKILLS  # noqa: E402
from corpus.reward import compute_score  # noqa: E402
from corpus.split import PAPER_SFT_SHARE, split_run_dirs  # noqa: E402
from plugins.exporters.builtin import (  # noqa: E402
    EvalExporter,
    HuggingFaceExporter,
    LlamaFactoryExporter,
    VerlExporter,
    VideoKRExporter,
)
from vkr_core.schemas import AcceptedExample, Verdict, Video, VideoRecord  # noqa: E402
from vkr_core.store import RunLayout  # noqa: E402

WORDS = "the pan heat batter flips force cart cell water moves browns reaction acid base".split()


def make_corpus(run_dir: Path, video_root: Path, n_videos: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    layout = RunLayout(run_dir)
    layout.records.mkdir(parents=True)
    total = 0
    for v in range(n_videos):
        video_id = f"v{v:06d}"
        path = str(video_root / "clips" / f"{video_id}.mp4")
        # Exports check that every video is a file under the root: an empty one will do.
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).touch()
        accepted = []
        for i in range(rng.randint(1, 6)):
            mc = rng.random() < 0.6
            answer = rng.choice("ABCD") if mc else " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))
            accepted.append(
                AcceptedExample(
                    problem_id=f"{video_id}-{i}",
                    question=" ".join(rng.choices(WORDS, k=20)) + "?",
                    options=[f"{c}. " + " ".join(rng.choices(WORDS, k=4)) for c in "ABCD"]
                    if mc
                    else None,
                    problem_type="multiple choice" if mc else "open-ended",
                    solution=f"<answer>{answer}</answer>",
                    think="<think>" + " ".join(rng.choices(WORDS, k=120)) + "</think>",
                    video_path=path,
                    skill=SKILLS[i % 3],
                    subject="mechanics",
                    discipline="physics",
                    knowledge_point="Newton's second law",
                    video_id=video_id,
                    models={"example_generation": ["gen-a"], "cot_verification": ["ver-b"]},
                    verdicts=[
                        Verdict(step=s, passed=True, reason="ok", models=["m"])
                        for s in ("self_consistency", "video_dependency", "cot_verification")
                    ],
                )
            )
        total += len(accepted)
        record = VideoRecord(
            video_id=video_id,
            video=Video(video_id=video_id, path=path),
            status="done",
            accepted=accepted,
        )
        layout.record(video_id).write_text(record.model_dump_json())
    return total


# ---------------------------------------------------------------- raw baselines


def raw_load(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in RunLayout(run_dir).record_files():
        rows += json.loads(path.read_text())["accepted"]
    return rows


def raw_split(run_dir: Path, out: Path) -> None:
    rows = raw_load(run_dir)
    videos = sorted({r["video_id"] for r in rows})
    random.Random(0).shuffle(videos)
    sft_videos = set(videos[: round(len(videos) * PAPER_SFT_SHARE)])
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sft.jsonl").open("w") as sft, (out / "rl.jsonl").open("w") as rl:
        for r in rows:
            if r["video_id"] in sft_videos:
                sft.write(json.dumps(r) + "\n")
            else:
                r = {k: v for k, v in r.items() if k not in ("think", "models", "verdicts")}
                rl.write(json.dumps(r) + "\n")


def read(split: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (split / f"{name}.jsonl").open()]


def raw_videokr(split: Path, out: Path, root: Path) -> None:
    for name in ("sft", "rl"):
        with (out / f"{name}.jsonl").open("w") as handle:
            for r in read(split, name):
                r["video_path"] = str(Path(r["video_path"]).relative_to(root))
                handle.write(json.dumps(r) + "\n")


def raw_llamafactory(split: Path, out: Path, root: Path) -> None:
    rows = []
    for r in read(split, "sft"):
        question = "<video>" + r["question"] + "\n" + "\n".join(r.get("options") or [])
        target = r["think"] + "\n" + r["solution"]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": target},
                ],
                "videos": [str(Path(r["video_path"]).relative_to(root))],
            }
        )
    (out / "videokr_sft.json").write_text(json.dumps(rows))


def raw_verl(split: Path, out: Path, root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, r in enumerate(read(split, "rl")):
        question = "<video>" + r["question"] + "\n" + "\n".join(r.get("options") or [])
        rows.append(
            {
                "data_source": "videokr",
                "prompt": [{"role": "user", "content": question}],
                "videos": [
                    {
                        "video": str(Path(r["video_path"]).relative_to(root)),
                        "fps": 2.0,
                        "max_frames": 128,
                        "min_frames": 4,
                    }
                ],
                "ability": "video_qa",
                "reward_model": {"style": "rule", "ground_truth": r["solution"]},
                "extra_info": {
                    "problem_id": r["problem_id"],
                    "problem_type": r["problem_type"],
                    "split": "train",
                    "index": i,
                },
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), out / "train.parquet")


def raw_hf(split: Path, out: Path, root: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name in ("sft", "rl"):
        rows = read(split, name)
        for r in rows:
            r["video_path"] = str(Path(r["video_path"]).relative_to(root))
            r.pop("verdicts", None)
            r.pop("models", None)
            r.setdefault("options", None)
        (out / "data" / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), out / "data" / name / "train.parquet")


def raw_eval(split: Path, out: Path, root: Path) -> None:
    with (out / "eval.jsonl").open("w") as handle:
        for name in ("sft", "rl"):
            for r in read(split, name):
                row = {
                    "id": r["problem_id"],
                    "video_path": str(Path(r["video_path"]).relative_to(root)),
                    "question": r["question"],
                    "problem_type": r["problem_type"].replace(" ", "-"),
                    "solution": r["solution"],
                    "dataset": "videokr",
                    "subject": r["subject"],
                }
                if r.get("options"):
                    row["options"] = r["options"]
                handle.write(json.dumps(row) + "\n")


_FMT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_ANS = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def raw_score(response: str, truth: str, problem_type: str, scorer: Any) -> float:
    fmt = 1.0 if _FMT.fullmatch(response) else 0.0
    pred = _ANS.search(response).group(1).strip()  # type: ignore[union-attr]
    gt = _ANS.search(truth).group(1).strip()  # type: ignore[union-attr]
    if problem_type == "multiple choice":
        acc = float(pred == gt)
    else:
        s = scorer.score(gt, pred)
        acc = (s["rouge1"].fmeasure + s["rouge2"].fmeasure + s["rougeL"].fmeasure) / 3
    return 0.9 * acc + 0.1 * fmt


# ---------------------------------------------------------------- timing


def medians(
    vkr: Callable[[], Any],
    raw: Callable[[], Any],
    repeats: int,
    setup: Callable[[], Any] | None = None,
) -> tuple[float, float]:
    """Median seconds of ``vkr`` and of ``raw``, run alternately so load on a shared machine
    hits both alike; one untimed run of each first (lazy imports, cold caches)."""
    times: dict[str, list[float]] = {"vkr": [], "raw": []}
    for round_ in range(repeats + 1):
        for name, fn in (("vkr", vkr), ("raw", raw)):
            if setup:
                setup()
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["vkr"]), statistics.median(times["raw"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reward-calls", type=int, default=2000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vkr-bench-corpus-"))
    try:
        root = work / "videos"
        run = work / "run"
        n = make_corpus(run, root, args.videos)
        split_dir = work / "split"
        split_run_dirs([run], split_dir, seed=0)
        out = work / "out"

        def fresh() -> None:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()

        rows: list[tuple[str, float, float]] = []
        r = args.repeats
        rows.append(
            ("load records", *medians(lambda: load_accepted([run]), lambda: raw_load(run), r))
        )
        rows.append(
            (
                "split (load + split + write)",
                *medians(
                    lambda: split_run_dirs([run], out / "s", seed=0),
                    lambda: raw_split(run, out / "s"),
                    r,
                    fresh,
                ),
            )
        )
        exporters = [
            ("export videokr", VideoKRExporter(), raw_videokr),
            ("export llamafactory", LlamaFactoryExporter(), raw_llamafactory),
            ("export verl", VerlExporter(), raw_verl),
            ("export hf", HuggingFaceExporter(), raw_hf),
            ("export eval", EvalExporter(), raw_eval),
        ]
        for label, exporter, raw in exporters:

            def run_vkr(exporter: Any = exporter) -> None:
                exporter.export(split_dir, out, video_root=root)

            def run_raw(raw: Any = raw) -> None:
                raw(split_dir, out, root)

            rows.append((label, *medians(run_vkr, run_raw, r, fresh)))

        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        rl = read(split_dir, "rl")
        for kind in ("multiple choice", "open-ended"):
            cases = [x for x in rl if x["problem_type"] == kind][:200]
            calls = [
                (f"<think>because</think>\n{x['solution']}", x["solution"], {"problem_type": kind})
                for x in cases
            ] * max(1, args.reward_calls // max(1, len(cases)))

            def vkr_scores(calls: list[Any] = calls) -> None:
                for response, truth, info in calls:
                    compute_score("videokr", response, truth, info)

            def raw_scores(calls: list[Any] = calls, kind: str = kind) -> None:
                for response, truth, _ in calls:
                    raw_score(response, truth, kind, scorer)

            compute_score("videokr", *calls[0][:2], calls[0][2])  # load rouge once, untimed
            rows.append((f"reward {kind} x{len(calls)}", *medians(vkr_scores, raw_scores, r)))

        print(f"corpus: {n} examples in {args.videos} videos; medians of {r} runs\n")
        print("| operation | vkr (s) | raw (s) | vkr / raw |")
        print("|---|---:|---:|---:|")
        for label, vkr_s, raw_s in rows:
            print(f"| {label} | {vkr_s:.3f} | {raw_s:.3f} | {vkr_s / raw_s:.2f} |")
        results = REPO / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / "corpus.json").write_text(
            json.dumps(
                {
                    "examples": n,
                    "videos": args.videos,
                    "repeats": r,
                    "rows": [
                        {"operation": a, "vkr_s": b, "raw_s": c, "ratio": b / c} for a, b, c in rows
                    ],
                },
                indent=2,
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
