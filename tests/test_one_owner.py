"""One owner per concept: one atomic write, one jsonl reader, one validation-error line,
one plugin manager per run, one place that names the run directory's files."""

from __future__ import annotations

import ast
import asyncio
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import VideoInfo

ROOT = Path(__file__).resolve().parents[1]
VKR = str(Path(sys.executable).parent / "vkr")


def vkr(*args: object) -> subprocess.CompletedProcess[str]:
    """``vkr ARGS`` as a user runs it."""
    return subprocess.run(
        [VKR, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )


# ---------------------------------------------------------------- atomic writes


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem (tmpfs; CI runs as root, as mounting needs)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    assert mounted.returncode == 0, f"this test needs root to mount a tmpfs: {mounted.stderr}"
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _registry_text(text: str) -> Any:
    from vkr_core.config import Eligibility, EligibilityRegistry

    return EligibilityRegistry(steps={"example_generation": {text: Eligibility(eligible=True)}})


def _write_with_atomic_path(path: Path, text: str) -> None:
    from vkr_core.files import atomic_path

    with atomic_path(path) as temporary, temporary.open("w") as handle:
        handle.write(text)


def _writers() -> dict[str, Callable[[Path, str], Any]]:
    from corpus.exporters import write_json, write_jsonl
    from vkr_core.config import save_registry
    from vkr_core.files import atomic_write

    return {
        "atomic_write text": atomic_write,
        "atomic_write bytes": lambda path, text: atomic_write(path, text.encode()),
        "atomic_path": _write_with_atomic_path,
        "split/export jsonl": lambda path, text: write_jsonl(path, [{"text": text}]),
        "split/export json": lambda path, text: write_json(path, {"text": text}),
        "eligibility registry": lambda path, text: save_registry(_registry_text(text), path),
    }


WRITERS = sorted(_writers())


@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_the_disk_cannot_hold_leaves_the_old_file_and_no_temporary(
    small_disk: Path, writer: str
) -> None:
    target = small_disk / "out.json"
    target.write_text("the old file\n")
    with pytest.raises(OSError):
        _writers()[writer](target, "x" * 200_000)  # three times the disk
    assert target.read_text() == "the old file\n"
    assert [p.name for p in small_disk.iterdir()] == ["out.json"]


@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_into_a_read_only_folder_leaves_the_old_file_and_no_temporary(
    small_disk: Path, writer: str
) -> None:
    target = small_disk / "out.json"
    target.write_text("the old file\n")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(OSError):
        _writers()[writer](target, "new")
    assert target.read_text() == "the old file\n"
    assert [p.name for p in small_disk.iterdir()] == ["out.json"]


def test_rows_that_fail_half_way_leave_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    from corpus.exporters import write_jsonl

    target = tmp_path / "sft.jsonl"
    target.write_text('{"old": true}\n')

    def rows() -> Iterator[dict[str, int]]:
        yield {"row": 1}
        raise RuntimeError("a refused example, found while writing")

    with pytest.raises(RuntimeError):
        write_jsonl(target, rows())
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["sft.jsonl"]


def test_a_writer_that_raises_inside_atomic_path_leaves_the_old_file(tmp_path: Path) -> None:
    from vkr_core.files import atomic_path

    target = tmp_path / "train.parquet"
    target.write_bytes(b"old")
    with pytest.raises(ValueError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half of a parquet file")
        raise ValueError("pyarrow gave up")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]


def test_no_module_replaces_files_its_own_way() -> None:
    """The one atomic writer is vkr_core/files.py: `os.replace` anywhere else is a second."""
    pattern = re.compile(r"os\.replace|\.replace\(tmp|tmp\.replace|mkstemp")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _sources()
        if path != ROOT / "vkr_core" / "files.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert found == []


# ---------------------------------------------------------------- one jsonl reader


def _call(cost: float, cache_hit: bool = False) -> str:
    from vkr_core.schemas import CallRecord

    record = CallRecord(
        step="self_consistency",
        model="fake-a",
        video_id="v1",
        cache_key=f"k{cost}",
        latency_s=0.1,
        cost_usd=cost,
        cache_hit=cache_hit,
        outcome="ok",
    )
    return record.model_dump_json()


def _damaged(lines: list[str]) -> str:
    """Good lines, a bad line in the middle (line 3) and a last line cut short by a kill."""
    return "\n".join([*lines[:2], "{not json", *lines[2:]]) + '\n{"step": "self_cons'


def test_a_cut_last_line_and_a_bad_middle_line_read_the_same_in_report_spend_and_export(
    tmp_path: Path,
) -> None:
    from vkr_core.store import spent_in

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    calls = run_dir / "calls.jsonl"
    calls.write_text(_damaged([_call(0.25), _call(0.0, cache_hit=True), _call(0.5)]))
    expected = [f"{calls}:3: not JSON (", f"{calls}:5: cut short ("]

    # The spend count (what --max-spend starts from)
    problems: list[str] = []
    assert spent_in(run_dir, on_problem=lambda p: problems.append(str(p))) == 0.75
    assert [p[: len(e)] for p, e in zip(problems, expected, strict=True)] == expected

    # vkr report: the same two lines skipped, each named FILE:LINE, and the same spend
    report = vkr("report", run_dir)
    assert report.returncode == 0, report.stderr
    warnings = [x for x in report.stderr.splitlines() if x.startswith("warning:")]
    assert warnings == [f"warning: skipped {p}" for p in problems]
    totals = json.loads((run_dir / "report.json").read_text())["totals"]
    assert totals["spend_usd"] == 0.75 and totals["paid_calls"] == 2

    # vkr export of a split: the same line, the same words; a training file loses nothing
    split = tmp_path / "split"
    split.mkdir()
    row = {
        "problem_id": "v1-0",
        "question": "What happens?",
        "problem_type": "open-ended",
        "solution": "<answer>it flips</answer>",
        "video_path": "v1.mp4",
        "skill": "VidR",
        "subject": "cooking",
        "discipline": "cooking",
        "video_id": "v1",
    }
    rows = [json.dumps({**row, "problem_id": f"v1-{i}"}) for i in range(3)]
    (split / "sft.jsonl").write_text("")
    (split / "rl.jsonl").write_text(_damaged(rows))
    export = vkr("export", "--format", "videokr", "--input", split, "--out", tmp_path / "x")
    assert export.returncode == 1
    [error] = [x for x in export.stderr.splitlines() if x.startswith("Error")]
    assert error.startswith(f"Error: {split / 'rl.jsonl'}:3: not JSON (")


def test_a_call_made_after_a_kill_is_not_glued_to_the_cut_line(tmp_path: Path) -> None:
    from vkr_core.schemas import CallRecord
    from vkr_core.store import RunStore, spent_in

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "calls.jsonl").write_text(_call(0.25) + "\n" + _call(0.5)[:40])  # killed here
    store = RunStore(run_dir)  # the rerun
    store.append_call(CallRecord.model_validate_json(_call(1.0)))
    problems: list[str] = []
    assert spent_in(run_dir, on_problem=lambda p: problems.append(str(p))) == 1.25
    assert len(problems) == 1 and problems[0].startswith(f"{run_dir / 'calls.jsonl'}:2: not JSON")


# ---------------------------------------------------------------- one validation-error line


def test_a_bad_record_reads_the_same_one_line_in_report_and_split(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from vkr_core.errors import describe_validation_error
    from vkr_core.schemas import VideoRecord

    run_dir = tmp_path / "run"
    (run_dir / "records").mkdir(parents=True)
    bad = {"video_id": "v1", "status": "finished", "frames": "many"}
    (run_dir / "records" / "v1.json").write_text(json.dumps(bad))
    with pytest.raises(ValidationError) as caught:
        VideoRecord.model_validate(bad)
    line = describe_validation_error(caught.value)
    assert "\n" not in line
    for part in ("video: Field required", "status: Input should be", "frames: Input should be"):
        assert part in line

    report = vkr("report", run_dir)
    assert f"warning: skipped unreadable record {run_dir / 'records' / 'v1.json'}: {line}" in (
        report.stderr.splitlines()
    )
    split = vkr("split", run_dir, "--out", tmp_path / "split")
    assert split.returncode == 1
    [error] = [x for x in split.stderr.splitlines() if x.startswith("Error")]
    assert error == f"Error: record {run_dir / 'records' / 'v1.json'}: {line}"


def test_a_damaged_config_snapshot_is_one_line_for_report_probe_and_rerun(
    tmp_path: Path,
) -> None:
    """config.json has one reader: report (gate order), probe report (its models) and a
    rerun's config check all name the file in one line instead of a JSON traceback."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_dir / "config.json"
    config.write_text('{"gate_order": ["self_con')  # cut by a full disk, say

    report = vkr("report", run_dir)
    assert report.returncode == 1
    assert "Traceback" not in report.stderr
    [error] = [x for x in report.stderr.splitlines() if x.startswith("Error")]
    assert error.startswith(f"Error: {config} is damaged (not JSON:")

    from corpus.probe import _chosen_models
    from vkr_core.schemas import InputError
    from vkr_core.store import RunStore

    with pytest.raises(InputError, match="is damaged"):
        _chosen_models(RunStore(run_dir))
    config.write_text(json.dumps({"config": {}}))
    with pytest.raises(InputError, match="does not record the probe's models"):
        _chosen_models(RunStore(run_dir))

    config.write_text("[1, 2]")
    with pytest.raises(InputError, match=r"not a JSON object\): use another --out, or --force"):
        RunStore(run_dir).check_config({"a": 1})
    RunStore(run_dir).check_config({"a": 1}, force=True)
    assert json.loads(config.read_text()) == {"a": 1}


def test_a_broken_pilot_manifest_is_one_line(tmp_path: Path) -> None:
    pilot = tmp_path / "pilot"
    pilot.mkdir()
    (pilot / "pilot.json").write_text(json.dumps({"pilot_id": 7, "step": ["x"]}))
    result = vkr("qualify", "score", pilot)
    assert result.returncode == 1
    errors = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {pilot / 'pilot.json'} is not a")
    assert "pilot_id: Input should be a valid string" in errors[0]


def test_the_one_formatter_names_unknown_keys_and_caps_the_list() -> None:
    from pydantic import BaseModel, ConfigDict, ValidationError

    from vkr_core.errors import describe_validation_error

    class Item(BaseModel):
        model_config = ConfigDict(extra="forbid")
        n: int

    class Items(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: list[Item]

    with pytest.raises(ValidationError) as caught:
        Items.model_validate({"items": [{"n": "x", "typo": 1}] + [{"n": "y"}] * 12})
    line = describe_validation_error(caught.value)
    assert line.startswith("items.0.n: Input should be a valid integer, unable to parse string")
    assert "; unknown key 'typo' in items.0; items.1.n: " in line
    assert line.endswith("; and 4 more") and "\n" not in line


# ---------------------------------------------------------------- the plugin manager is passed


class SolidReader:
    """A reader the built-ins lack: every frame a 32x24 magenta picture."""

    name = "solid"

    def __init__(self, path: str):
        self.path = path

    def probe(self) -> VideoInfo:
        return VideoInfo(
            path=self.path, duration=10.0, fps=1.0, frame_count=10, width=32, height=24,
            reader=self.name,
        )  # fmt: skip

    def read_at(self, timestamps: list[float]) -> list[tuple[float, np.ndarray]]:
        return [(float(int(t)), np.full((24, 32, 3), (255, 0, 255), np.uint8)) for t in timestamps]


class SolidReaderPlugin:
    @hookimpl(tryfirst=True)
    def vkr_frame_reader(self, path: str, exclude: tuple[str, ...]) -> SolidReader | None:
        return None if "solid" in exclude else SolidReader(path)


def test_a_run_decodes_with_the_readers_of_its_own_plugin_manager(
    tmp_path: Path, testdata: Path, vkr_pool: Path, vkr_fake_server: Any
) -> None:
    from vkr_core.config import RunConfig
    from vkr_core.plugins import get_plugin_manager
    from vkr_core.run import Run
    from vkr_core.schemas import Video
    from vkr_core.store import RunLayout

    video_file = tmp_path / "pancake.mkv"
    shutil.copy(testdata / "flipping_a_pancake.mkv", video_file)
    video = Video(video_id="pancake", path=str(video_file), discipline="cooking")
    pm = get_plugin_manager(extra_plugins=[SolidReaderPlugin()])

    async def go() -> Any:
        async with Run(tmp_path / "run", vkr_pool, RunConfig(), pm) as run:
            return await run.process(video)

    record = asyncio.run(go())
    assert record.status == "done", record.failure
    frames = sorted(RunLayout(tmp_path / "run").frames("pancake").glob("*.jpg"))
    assert len(frames) == 2  # 10 s at 0.2 fps, as the solid reader declares
    for frame in frames:
        with Image.open(frame) as image:
            assert image.size == (32, 24)  # the pancake itself is 426x240


# ---------------------------------------------------------------- the run directory's layout

# What a run directory holds, by name. Only vkr_core/store.py (RunLayout) spells these.
RUN_FILES = (
    "calls.jsonl",
    "failures.jsonl",
    "preflight.jsonl",
    "config.json",
    "checkpoints.sqlite",
    "run.lock",
    "split.json",
    "report.json",
    "report.md",
    "report.html",
    "report.png",
)
RUN_FOLDERS = ("records", "inputs", "frames", "cache")

# (module, name) -> why that module may spell it. Each entry must still be needed.
ALLOWED = {
    ("corpus/decontam.py", "report.json"): "decontam's own report folder, not a run directory",
    ("bench/bench_report.py", "report.json"): "the benchmark's results file",
    ("bench/bench_calls.py", "frames"): "a scratch folder of the benchmark",
    ("bench/bench_probe.py", "frames"): "a scratch folder of the benchmark",
    ("qualification/review.py", "frames"): "the review page's URL of a frame image",
    ("experts/audit_review.py", "frames"): "the audit page's URL of a frame image",
    ("experts/seeds.py", "frames"): "the seeds folder's own frames, and the page's frame URL",
    ("cli_options.py", "failures.jsonl"): "the exit codes' help text (documentation)",
    ("cli_collect.py", "failures.jsonl"): "vkr collect's exit codes' help text (documentation)",
}
# Spelled by the modules the lead is rewriting; to go once they use RunLayout.
PENDING: set[tuple[str, str]] = set()
_SKIPPED_DIRS = {".venv", ".git", "tests", "vkr.egg-info", "build", "dist", "node_modules"}
_FILE_NAME = re.compile(r"(?<![\w.-])(" + "|".join(re.escape(n) for n in RUN_FILES) + r")(?![\w])")
# A folder name as a path component: after a separator, an f-string's field or at the start.
_FOLDER_PATH = re.compile(r"(?:^|(?<=[/}]))(" + "|".join(RUN_FOLDERS) + r")/")


def _sources() -> list[Path]:
    return sorted(
        path
        for path in ROOT.rglob("*.py")
        if not _SKIPPED_DIRS & set(path.relative_to(ROOT).parts[:-1])
        and not path.relative_to(ROOT).parts[0].startswith(".")
    )


def _documentation(tree: ast.AST) -> set[int]:
    """ids of the string nodes that document rather than name a path: docstrings and the
    help or description of an option or field."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant):
                skipped.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description"):
            skipped.update(id(n) for n in ast.walk(node.value))
    return skipped


def _spelled(source: str) -> list[tuple[int, str]]:
    """(line, name) of each run-directory file or folder name the module spells as a path."""
    tree = ast.parse(source)
    docs = _documentation(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            found += [(node.lineno, m.group(1)) for m in _FILE_NAME.finditer(node.value)]
            found += [(node.lineno, m.group(1)) for m in _FOLDER_PATH.finditer(node.value)]
        operands: list[ast.expr] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            operands = [node.left, node.right]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("joinpath", "join", "Path"):
                operands = list(node.args)
        for operand in operands:
            if isinstance(operand, ast.Constant) and operand.value in RUN_FOLDERS:
                found.append((operand.lineno, operand.value))
    return found


def test_the_checker_sees_a_run_file_named_in_a_module() -> None:
    assert _spelled('LOG = "calls.jsonl"\n') == [(1, "calls.jsonl")]
    assert _spelled('p = root / "records" / name\n') == [(1, "records")]
    assert _spelled('print(f"see {run}/failures.jsonl")\n') == [(1, "failures.jsonl")]
    assert _spelled('"""Reads calls.jsonl."""\nx = data["frames"]\n') == []
    assert _spelled('option("--out", help="Folder for report.json")\n') == []


def test_only_the_run_store_names_the_run_directorys_files() -> None:
    spelled: dict[tuple[str, str], list[int]] = {}
    for path in _sources():
        if path == ROOT / "vkr_core" / "store.py":
            continue
        module = path.relative_to(ROOT).as_posix()
        for line, name in _spelled(path.read_text()):
            spelled.setdefault((module, name), []).append(line)
    unexpected = {
        f"{module}:{lines[0]} spells {name!r}: use vkr_core.store.RunLayout"
        for (module, name), lines in spelled.items()
        if (module, name) not in ALLOWED and (module, name) not in PENDING
    }
    assert sorted(unexpected) == []
    stale = sorted(f"{m}: {n}" for m, n in ALLOWED if (m, n) not in spelled)
    assert stale == [], "no longer needed: remove from ALLOWED"
