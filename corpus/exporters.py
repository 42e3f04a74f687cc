"""Accepted examples in and out: loading run records and splits, the VideoKR rows, exporters.

An exporter is a plugin (hook ``vkr_register_exporters``) that subclasses :class:`Exporter`
and implements one method, ``write(data, out_dir, options)``. The base class loads the
input, checks every example (no empty answer or trace, options in letter order), makes video
paths relative to the video root and validates the options, so ``write`` only formats::

    class CsvExporter(Exporter):
        name = "csv"
        description = "RL questions and answers as CSV"

        def write(self, data, out_dir, options):
            path = out_dir / "rl.csv"
            with path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                for example in data.rl:
                    writer.writerow([example.problem_id, example.question, example.solution])
            return [path]
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ValidationError

from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_path, atomic_write, read_jsonl
from vkr_core.schemas import OPTION_LETTERS, AcceptedExample, InputError, RLExample
from vkr_core.sources import path_under_root
from vkr_core.store import RunLayout, SplitLayout

MULTIPLE_CHOICE = "multiple choice"
OPEN_ENDED = "open-ended"
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# A placeholder in the text would make LLaMA-Factory/verl count one more video than given;
# the official RL prep also strips a leading <video> in any case.
_PLACEHOLDER = re.compile(r"<(?:video|image)>", re.IGNORECASE)

Example = AcceptedExample | RLExample
Part = Literal["sft", "rl", "all"]


# ---------------------------------------------------------------- checking examples


def _inner(value: str, tag: str, problem_id: str, what: str) -> str:
    """The text inside ``<tag>...</tag>`` (or the bare text), stripped; refuse empty or stray tags."""
    text = value.strip()
    opening, closing = f"<{tag}>", f"</{tag}>"
    if text.startswith(opening) and text.endswith(closing) and len(text) >= len(opening + closing):
        text = text[len(opening) : -len(closing)]
    if any(t in text for t in _TAGS):
        raise InputError(
            f"example {problem_id!r}: the {what} {value[:80]!r} must be one "
            f"{opening}...{closing} with no other think/answer tags inside"
        )
    text = text.strip()
    if not text:
        raise InputError(
            f"example {problem_id!r} has an empty {what}: refusing to write it "
            "(training loaders drop examples without an answer or trace)"
        )
    return text


def checked_answer(example: Example) -> str:
    """The example's answer text (inside ``<answer>``), after checking it fits the problem type."""
    pid = example.problem_id
    answer = _inner(example.solution, "answer", pid, "answer")
    if not example.question.strip():
        raise InputError(f"example {pid!r} has an empty question")
    if not example.video_path.strip():
        raise InputError(f"example {pid!r} has an empty video_path")
    if example.problem_type == MULTIPLE_CHOICE:
        options = example.options or []
        if len(options) < 2 or len(options) > len(OPTION_LETTERS):
            raise InputError(
                f"example {pid!r} is multiple choice with {len(options)} options "
                f"(needs 2 to {len(OPTION_LETTERS)})"
            )
        letters = OPTION_LETTERS[: len(options)]
        for letter, option in zip(letters, options, strict=True):
            if not option.startswith(f"{letter}."):
                raise InputError(
                    f"example {pid!r}: option {option[:40]!r} must start with '{letter}.' "
                    "(options are listed in letter order)"
                )
        if answer not in letters:
            raise InputError(
                f"example {pid!r}: multiple-choice answer {answer!r} is not one of the "
                f"option letters {', '.join(letters)}"
            )
    elif example.options:
        raise InputError(f"example {pid!r} is open-ended but has options")
    return answer


def checked_trace(example: AcceptedExample) -> str:
    """The example's reasoning trace (inside ``<think>``), refusing an empty one."""
    return _inner(example.think, "think", example.problem_id, "reasoning trace (think)")


def check_example(example: Example) -> None:
    """Raise InputError naming the example if it must not be written to a training file."""
    checked_answer(example)
    if isinstance(example, AcceptedExample):
        checked_trace(example)


def training_target(example: AcceptedExample) -> str:
    """The assistant turn: ``<think>T</think>\\n<answer>A</answer>`` with nothing around it."""
    return f"<think>{checked_trace(example)}</think>\n<answer>{checked_answer(example)}</answer>"


def to_rl(example: AcceptedExample) -> RLExample:
    """The example as the RL file carries it (no trace)."""
    # The fields come from a validated AcceptedExample; check_example guards what is written.
    return RLExample.model_construct(
        problem_id=example.problem_id,
        question=example.question,
        options=example.options,
        problem_type=example.problem_type,
        solution=example.solution,
        video_path=example.video_path,
        skill=example.skill,
        subject=example.subject,
        discipline=example.discipline,
        video_id=example.video_id,
    )


# ---------------------------------------------------------------- VideoKR rows


def rl_row(example: Example) -> dict[str, Any]:
    """A row of the VideoKR RL file: question and verifiable answer, plus provenance."""
    answer = checked_answer(example)
    row: dict[str, Any] = {"problem_id": example.problem_id, "question": example.question}
    if example.problem_type == MULTIPLE_CHOICE:
        row["options"] = list(example.options or [])
    row.update(
        problem_type=example.problem_type,
        solution=f"<answer>{answer}</answer>",
        video_path=example.video_path,
        skill=example.skill,
        subject=example.subject,
        discipline=example.discipline,
        video_id=example.video_id,
    )
    return row


def sft_row(example: AcceptedExample) -> dict[str, Any]:
    """A row of the VideoKR SFT file: the RL fields, the trace, and the full provenance."""
    answer = checked_answer(example)
    row: dict[str, Any] = {"problem_id": example.problem_id, "question": example.question}
    if example.problem_type == MULTIPLE_CHOICE:
        row["options"] = list(example.options or [])
    row.update(
        problem_type=example.problem_type,
        solution=f"<answer>{answer}</answer>",
        think=f"<think>{checked_trace(example)}</think>",
        video_path=example.video_path,
        skill=example.skill,
        subject=example.subject,
        discipline=example.discipline,
        knowledge_point=example.knowledge_point,
        video_id=example.video_id,
        models=example.models,
        verdicts=[v.model_dump(mode="json") for v in example.verdicts],
    )
    return row


# The official answer-format instruction, one per problem type: the text of the VideoKR SFT and
# RL prep scripts and the lmms-eval task's post_prompt_mc/post_prompt_oe, so training prompts
# end exactly as the evaluation prompt does.
_INSTRUCTION_HEAD = (
    "Please answer this question based on the visual content.\n"
    "Provide your thinking process between the <think> and </think> tags, and then give your "
    "final answer between the <answer> and </answer> tags.\n"
)
INSTRUCTION_MULTIPLE_CHOICE = (
    _INSTRUCTION_HEAD + "Please provide only the single option letter (e.g., A, B, C, D, etc.) "
    "within the <answer>...</answer> tags."
)
INSTRUCTION_OPEN_ENDED = (
    _INSTRUCTION_HEAD
    + "Please provide only your final answer within the <answer>...</answer> tags."
)
# The official RL prep takes a question holding any of these as already listing its options.
_EMBEDDED_OPTIONS = ("Options:", "\nA.", "\nA:")

PromptLayout = Literal["sft", "rl"]


def answer_instruction(problem_type: str) -> str:
    """The official answer-format instruction for a problem type (no leading or trailing newline)."""
    return (
        INSTRUCTION_MULTIPLE_CHOICE if problem_type == MULTIPLE_CHOICE else INSTRUCTION_OPEN_ENDED
    )


def _prompt_parts(example: Example) -> tuple[str, list[str]]:
    """The stripped question and options, refusing media placeholders in either."""
    question = example.question.strip()
    options = [o.strip() for o in example.options or [] if o.strip()]
    if example.problem_type != MULTIPLE_CHOICE:
        options = []
    for piece in [question, *options]:
        found = _PLACEHOLDER.search(piece)
        if found:
            raise InputError(
                f"example {example.problem_id!r}: its question or options contain the "
                f"placeholder {found.group(0)}, which trainers read as a media slot"
            )
    return question, options


def user_prompt(example: Example, layout: PromptLayout = "sft") -> str:
    """The user turn exactly as the official VideoKR prep scripts write it.

    ``sft`` (LLaMA-Factory, ``prepare_videokr_sft_data.py``): ``<video>``, the question, a blank
    line and the ``Options:`` block (MC), the instruction; the open-ended instruction ends with
    a newline. ``rl`` (verl, ``prepare_videokr_rl_data.py``): ``<video>`` and a newline, the
    question, the ``Options:`` block (MC) after a single newline, the instruction.
    """
    question, options = _prompt_parts(example)
    is_mc = example.problem_type == MULTIPLE_CHOICE
    if layout == "sft":
        text = question
        if options:
            text += "\n\nOptions:\n" + "\n".join(options)
        text += "\n" + answer_instruction(example.problem_type) + ("" if is_mc else "\n")
        return "<video>" + text
    if layout == "rl":
        text = question
        # Kept from the official RL prep for byte parity: a question that already lists its
        # options does not get the Options: block a second time.
        if options and not any(marker in question for marker in _EMBEDDED_OPTIONS):
            text += "\nOptions:\n" + "\n".join(options)
        return "<video>\n" + text + "\n" + answer_instruction(example.problem_type)
    raise InputError(f"unknown prompt layout {layout!r}: use sft or rl")


def eval_prompt(example: Example) -> str:
    """The text lmms-eval's ``videokr_eval`` task shows for this example (the video goes apart).

    Its ``doc_to_text``: the question as written, the options one per line with no
    ``Options:`` header (MC), the same instruction as the training prompts.
    """
    question = example.question
    options = [o.strip() for o in example.options or []]
    if options:
        return (
            f"{question}\n" + "\n".join(options) + "\n" + answer_instruction(example.problem_type)
        )
    return f"{question}\n" + answer_instruction(example.problem_type)


# ---------------------------------------------------------------- files


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSON lines, atomically: a failed write leaves no half file behind."""
    with atomic_path(path) as temporary, temporary.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_json(path: Path, value: Any) -> Path:
    """Write one JSON document atomically."""
    return atomic_write(path, json.dumps(value, ensure_ascii=False, indent=2) + "\n")


def _unfinished_note(record: Any) -> str:
    if record.status == "unfinished" or not record.planned:
        return "stopped before its last round"
    planned = sum(record.planned.values())
    return f"{planned - sum(record.missing_rounds().values())} of {planned} rounds have an outcome"


def load_accepted(
    run_dirs: Sequence[str | Path],
    exclude_unfinished: bool = False,
    excluded: list[str] | None = None,
) -> list[AcceptedExample]:
    """Every accepted example in the runs' ``records/*.json``, sorted by (video_id, problem_id).

    A problem_id found twice (in one run or across runs) is an error naming both files. A
    video that is not finished (a run stopped before every planned round had an outcome) is
    refused, listing such videos, unless ``exclude_unfinished``: then its examples are left
    out and ``"RUN_DIR/records/ID.json: why"`` is appended to ``excluded``.
    """
    from vkr_core.schemas import VideoRecord

    seen: dict[str, Path] = {}
    examples: list[AcceptedExample] = []
    unfinished: list[str] = []
    for run_dir in run_dirs:
        layout = RunLayout(run_dir)
        if not Path(run_dir).is_dir():
            raise InputError(f"run directory {str(run_dir)!r} does not exist")
        if not layout.records.is_dir():
            raise InputError(f"run directory {str(run_dir)!r} has no {layout.records.name}/ folder")
        for path in layout.record_files():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"record {path} is not readable JSON: {exc}") from None
            try:
                record = VideoRecord.model_validate(data)
            except ValidationError as exc:
                first = exc.errors()[0]
                loc = first["loc"]
                who = ""
                if len(loc) >= 2 and loc[0] == "accepted" and isinstance(loc[1], int):
                    pid = data["accepted"][loc[1]].get("problem_id", "?")
                    who = f" accepted example {pid!r}:"
                raise InputError(f"record {path}:{who} {describe_validation_error(exc)}") from None
            if record.video_id != path.stem:
                raise InputError(
                    f"record {path} holds video {record.video_id!r}: the file name must be "
                    "the video id"
                )
            if not record.finished:
                unfinished.append(f"{path}: {_unfinished_note(record)}")
                continue
            for example in record.accepted:
                if example.video_id != record.video_id:
                    raise InputError(
                        f"record {path}: example {example.problem_id!r} names video "
                        f"{example.video_id!r}, not the record's {record.video_id!r}"
                    )
                if example.problem_id in seen:
                    raise InputError(
                        f"problem_id {example.problem_id!r} appears twice: in "
                        f"{seen[example.problem_id]} and in {path}"
                    )
                seen[example.problem_id] = path
                examples.append(example)
    if unfinished and not exclude_unfinished:
        shown = "; ".join(unfinished[:5]) + (
            f"; and {len(unfinished) - 5} more" if len(unfinished) > 5 else ""
        )
        raise InputError(
            f"{len(unfinished)} video(s) are unfinished ({shown}): run the same `vkr run` "
            "command again to finish them, or pass --exclude-unfinished to leave them out"
        )
    if excluded is not None:
        excluded.extend(unfinished)
    examples.sort(key=lambda e: (e.video_id, e.problem_id))
    return examples


# ---------------------------------------------------------------- splits


def _sort_key(example: Example) -> tuple[str, str]:
    return (example.video_id, example.problem_id)


@dataclass(frozen=True)
class SplitData:
    """What an exporter writes from: the SFT examples (with trace) and the RL examples."""

    sft: list[AcceptedExample]
    rl: list[RLExample]
    source: str = ""
    # Unsplit examples sit on both sides on purpose; a real split never shares a video.
    unsplit: bool = False

    @classmethod
    def from_examples(cls, examples: Iterable[AcceptedExample]) -> SplitData:
        """Unsplit examples: every example on both sides (the SFT and the RL view of it)."""
        items = sorted(examples, key=_sort_key)
        for item in items:
            if not isinstance(item, AcceptedExample):
                raise TypeError(f"expected AcceptedExample, got {type(item).__name__}")
        return cls(sft=items, rl=[to_rl(e) for e in items], source="examples", unsplit=True)

    def part(self, name: Part) -> list[RLExample]:
        """The examples of one side (or both) in their RL view, sorted, one per problem_id."""
        if name == "rl":
            return list(self.rl)
        if name == "sft":
            return [to_rl(e) for e in self.sft]
        if name == "all":
            merged = {e.problem_id: e for e in self.part("sft")}
            merged.update({e.problem_id: e for e in self.rl})
            return sorted(merged.values(), key=_sort_key)
        raise InputError(f"unknown part {name!r}: use sft, rl or all")

    def check(self) -> None:
        """Refuse examples that must not be written, and splits that mix a video across sides."""
        examples: list[Example] = [*self.sft, *self.rl]
        for example in examples:
            check_example(example)
        if not self.unsplit:
            both = sorted({e.video_id for e in self.sft} & {e.video_id for e in self.rl})
            if both:
                raise InputError(
                    f"video {both[0]!r} has examples in both the SFT and the RL set of "
                    f"{self.source or 'the split'}: a split must be by video"
                )
        # Unsplit examples are on both sides by design: count each side on its own then.
        sides: list[Sequence[Example]] = [self.sft, self.rl] if self.unsplit else [examples]
        for items in sides:
            counts = Counter(e.problem_id for e in items)
            twice = sorted(pid for pid, n in counts.items() if n > 1)
            if twice:
                raise InputError(
                    f"problem_id {twice[0]!r} appears {counts[twice[0]]} times in "
                    f"{self.source or 'the examples'}"
                )

    def with_video_root(self, video_root: str | Path | None) -> SplitData:
        """A copy whose video paths are relative to the video root, each a file under it.

        Without ``video_root``, a split written by ``vkr split`` takes the root its runs
        recorded. Paths are never rewritten when the root moves: only the root changes.
        """
        recorded = {} if self.unsplit else recorded_video_roots(self.source)
        if video_root is None:
            video_root = _single_root(recorded, self.source)
        # Several examples share each video: resolve each distinct path once.
        done: dict[str, str] = {}

        def moved(example: Any) -> Any:
            if example.video_path not in done:
                done[example.video_path] = relative_video_path(example, video_root)
            return example.model_copy(update={"video_path": done[example.video_path]})

        data = SplitData(
            sft=[moved(e) for e in self.sft],
            rl=[moved(e) for e in self.rl],
            source=self.source,
            unsplit=self.unsplit,
        )
        check_videos_exist(data, video_root, recorded)
        return data


def _read_examples(path: Path, model: type[Example]) -> list[Any]:
    """Every example of a split file; any damaged line is an error naming ``FILE:LINE``
    (a training set must not silently lose an example, even a cut-short last one)."""
    items = []
    for number, data in read_jsonl(path):
        try:
            items.append(model.model_validate(data))
        except ValidationError as exc:
            pid = data.get("problem_id", "?")
            raise InputError(
                f"{path}:{number}: example {pid!r}: {describe_validation_error(exc)}"
            ) from None
    return items


def load_split(split_dir: str | Path) -> SplitData:
    """Read ``sft.jsonl`` and ``rl.jsonl`` as ``vkr split`` wrote them."""
    folder = Path(split_dir)
    if not folder.is_dir():
        raise InputError(f"split directory {str(split_dir)!r} does not exist")
    layout = SplitLayout(folder)
    for path in (layout.sft, layout.rl):
        if not path.is_file():
            raise InputError(
                f"split directory {str(split_dir)!r} has no {path.name}: make it with `vkr split`"
            )
    return SplitData(
        sft=sorted(_read_examples(layout.sft, AcceptedExample), key=_sort_key),
        rl=sorted(_read_examples(layout.rl, RLExample), key=_sort_key),
        source=str(folder),
    )


def recorded_video_roots(split_dir: str | Path) -> dict[str, str]:
    """Run directory -> the video root it recorded, for the runs a split was made from.

    Read from the split's manifest and each run's config snapshot; runs not found here
    (a split moved to another machine) or made before runs recorded their root are left out.
    """
    try:
        manifest = json.loads(SplitLayout(split_dir).manifest.read_text(encoding="utf-8"))
        run_dirs = [str(d) for d in manifest["run_dirs"]]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    roots: dict[str, str] = {}
    for run_dir in run_dirs:
        try:
            config = RunLayout(run_dir).read_config()
            root = config["config"]["video_root"] if config else None
        except (InputError, KeyError, TypeError):
            continue
        if isinstance(root, str) and root:
            roots[run_dir] = root
    return roots


def _single_root(recorded: Mapping[str, str], source: str) -> str | None:
    roots = sorted(set(recorded.values()))
    if len(roots) > 1:
        runs = "; ".join(f"{run}: {root}" for run, root in sorted(recorded.items()))
        raise InputError(
            f"the runs of {source} recorded different video roots ({runs}): pass --video-root, "
            "the one folder their video paths are relative to"
        )
    return roots[0] if roots else None


def check_videos_exist(
    data: SplitData, video_root: str | Path | None, recorded: Mapping[str, str] | None = None
) -> None:
    """Refuse data whose (relative) video paths are not all files under ``video_root``.

    The error counts the missing videos, names the first few and, when known, the root the
    runs recorded (``recorded``: run directory -> root), so a user whose videos moved knows
    which folder to pass.
    """
    examples: list[Example] = [*data.sft, *data.rl]
    paths = sorted({e.video_path for e in examples})
    if not paths:
        return
    recorded = recorded or {}
    if video_root is None:
        raise InputError(
            f"no video root for the {len(paths)} video(s) of {data.source or 'the examples'}: "
            "pass --video-root (video_root), the folder their paths are relative to, so the "
            "export can check that every video exists"
        )
    root = Path(video_root)
    missing = [p for p in paths if not (root / p).is_file()]
    if not missing:
        return
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    elsewhere = sorted(
        {r for r in recorded.values() if os.path.abspath(r) != os.path.abspath(root)}
    )
    if elsewhere:
        hint = (
            f"the runs used the video root {elsewhere[0]!r}: pass it, or the folder that "
            "holds that tree now"
        )
    elif recorded:
        hint = "this is the root the runs used: were the videos moved or deleted?"
    else:
        hint = "the paths are relative to the video root of the runs that made them"
    raise InputError(
        f"{len(missing)} of {len(paths)} videos are not files under the video root "
        f"{str(video_root)!r}: {shown} ({hint})"
    )


def _climbs_out(relative: str) -> bool:
    return relative in (".", "..") or relative.startswith(".." + os.sep)


def relative_video_path(example: Example, video_root: str | Path | None) -> str:
    """The example's video path relative to the video root, or InputError naming the path.

    Records hold paths already relative to their run's root: those are kept as they are
    (never re-prefixed) and must not climb out. An absolute path (hand-made examples, older
    tools) must lie under the root; without a root it is refused.
    """
    raw = example.video_path
    pid = example.problem_id
    if not raw.strip():
        raise InputError(f"example {pid!r} has an empty video_path")
    if os.path.isabs(raw):
        if video_root is None:
            raise InputError(
                f"video path {raw!r} of example {pid!r} is absolute: pass --video-root "
                "(video_root) so exports can refer to it by a relative path"
            )
        relative = path_under_root(raw, video_root)
        if relative is not None:
            return relative
        raise InputError(
            f"video path {raw!r} of example {pid!r} is outside the video root {str(video_root)!r}"
        )
    relative = os.path.normpath(raw)
    if _climbs_out(relative):
        where = f"the video root {str(video_root)!r}" if video_root is not None else "the root"
        raise InputError(f"video path {raw!r} of example {pid!r} is outside {where}")
    return Path(relative).as_posix()


# ---------------------------------------------------------------- exporters


@dataclass(frozen=True)
class ExportOption:
    """An exporter option: its default (which also sets its type) and a one-line help."""

    default: str | int | float | bool
    help: str


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(exporter: str, name: str, value: Any, default: Any) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        if isinstance(default, bool):
            lowered = value.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        kind = type(default).__name__
        raise InputError(
            f"exporter {exporter!r}: option {name}={value!r} is not a valid {kind}"
        ) from None
    return value


class Exporter:
    """Base class of exporters: set ``name``, ``description``, ``options``; implement ``write``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    options: ClassVar[dict[str, ExportOption]] = {}

    def resolve_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The declared options with defaults filled in and CLI strings converted."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise InputError(
                f"exporter {self.name!r} has no option {unknown[0]!r} (its options: {known})"
            )
        values = {key: option.default for key, option in self.options.items()}
        for key, value in given.items():
            values[key] = _coerce(self.name, key, value, self.options[key].default)
        return values

    def export(
        self,
        source: str | Path | SplitData | Sequence[AcceptedExample],
        out_dir: str | Path,
        video_root: str | Path | None = None,
        **options: Any,
    ) -> list[Path]:
        """Write the export of ``source`` (a split directory, a SplitData or examples) to ``out_dir``.

        Every example is checked and every video path made relative to ``video_root``
        before anything is written; returns the files written.
        """
        values = self.resolve_options(options)
        if isinstance(source, SplitData):
            data = source
        elif isinstance(source, str | Path):
            data = load_split(source)
        else:
            data = SplitData.from_examples(source)
        data.check()
        data = data.with_video_root(video_root)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return self.write(data, out, values)

    def write(self, data: SplitData, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        """Write the files of this format into ``out_dir`` and return their paths."""
        raise NotImplementedError
