"""Qualification pilots: sample real inputs of a step, run one model on them, pre-label.

A pilot directory holds::

    PILOT_DIR/pilot.json      PilotManifest: step, model, prompt version, seed, input hashes
    PILOT_DIR/items.jsonl     one PilotItem per sampled input, with the model's output
    PILOT_DIR/frames/         the frames the model saw, named by their sha256
    PILOT_DIR/cache/          the model-call cache (unless --cache names a shared one)
    PILOT_DIR/labels.sqlite   expert labels (and automatic hard-failure labels)

Inputs come from the ``inputs/<step>.jsonl`` files that runs record for every step call.
Hard compliance failures (a reply that does not parse into the step's schema, a refusal)
are labelled automatically, so experts judge only content.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import random
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qualification.labels import LabelStore
from qualification.models import (
    AUTO_ANNOTATOR,
    PILOT_INPUTS_MANIFEST,
    AutoLabel,
    PilotFrame,
    PilotInputsManifest,
    PilotItem,
    PilotManifest,
)
from vkr_core.calls import CallFailed, ModelCaller
from vkr_core.config import Pool, fingerprint, load_pool
from vkr_core.context import call_params
from vkr_core.errors import describe_validation_error
from vkr_core.files import JsonlProblem, atomic_write, read_jsonl
from vkr_core.log import register_secrets
from vkr_core.plugins import VkrPluginManager, get_plugin_manager
from vkr_core.schemas import InputError, VideoRecord, VkrError
from vkr_core.steps import ReplyError
from vkr_core.store import RunLayout, log_problem

_FRAME_LABEL = re.compile(r"\[Frame at (\d{2,}:\d{2})\]\s*$")


@dataclass
class RecordedInput:
    """One distinct input of a step, found in a run directory."""

    run_dir: Path
    record: dict[str, Any]
    input_sha256: str

    @property
    def discipline(self) -> str:
        return str(self.record.get("discipline") or "unknown")

    @property
    def video_id(self) -> str | None:
        """The video the input shows, for a video step's input; None for a text item's."""
        value = self.record.get("video_id")
        return str(value) if value else None

    @property
    def source_item_id(self) -> str:
        """The run's item the input came from: a video, or a text step's item (a lecture)."""
        return str(self.record.get("video_id") or self.record.get("item_id") or "unknown")

    @property
    def skill(self) -> str | None:
        meta = self.record.get("meta") or {}
        return meta.get("skill")

    @property
    def stratum(self) -> str:
        return f"{self.discipline} / {self.skill or 'any skill'}"


def input_sha256(step: str, messages: list[dict[str, Any]]) -> str:
    """The hash of an input as a model sees it (frames by content), whoever answered it.

    Run records key inputs by cache key, which includes the model: the same input sent to
    two models (video_dependency asks two) must count once in a sample.
    """
    return fingerprint({"step": step, "messages": messages})


def pilot_dir_paths(pilot_dir: Path) -> dict[str, Path]:
    # The call cache and the frames sit where a run directory keeps its own.
    run = RunLayout(pilot_dir)
    return {
        "manifest": pilot_dir / "pilot.json",
        "items": pilot_dir / "items.jsonl",
        "frames": run.frames_root,
        "cache": run.cache,
        "labels": pilot_dir / "labels.sqlite",
    }


def read_inputs(step: str, run_dirs: list[Path]) -> list[RecordedInput]:
    """Every distinct recorded input of ``step`` in the run directories, sorted by hash.

    A damaged line (a run killed mid-write cuts the last one short) is skipped with a
    warning: the other inputs are still good candidates.
    """
    found: dict[str, RecordedInput] = {}
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise InputError(f"run directory not found: {run_dir}")
        path = RunLayout(run_dir).inputs(step)
        for number, record in read_jsonl(path, on_problem=log_problem, missing_ok=True):
            messages = record.get("messages")
            if not isinstance(messages, list):
                log_problem(JsonlProblem(path, number, "not a recorded input (no messages)"))
                continue
            digest = input_sha256(step, messages)
            found.setdefault(digest, RecordedInput(run_dir, record, digest))
    return [found[k] for k in sorted(found)]


def stratified_sample(inputs: list[RecordedInput], n: int, seed: int) -> list[RecordedInput]:
    """n inputs, each (discipline, skill) stratum in proportion to its size, then shuffled.

    A text step's inputs have no skill: they are stratified by discipline alone (their
    subject is recorded but too fine a stratum: 82 subjects share a pilot of 100).
    Quotas use the largest-remainder method; ties in the remainders are broken by the seed,
    so the same seed always gives the same sample.
    """
    rng = random.Random(seed)
    strata: dict[str, list[RecordedInput]] = defaultdict(list)
    for item in inputs:
        strata[item.stratum].append(item)
    names = sorted(strata)
    total = len(inputs)
    exact = {name: n * len(strata[name]) / total for name in names}
    quotas = {name: int(exact[name]) for name in names}
    tie_break = {name: rng.random() for name in names}
    leftover = n - sum(quotas.values())
    by_remainder = sorted(names, key=lambda s: (-(exact[s] - quotas[s]), tie_break[s]))
    for name in by_remainder[:leftover]:
        quotas[name] += 1
    chosen: list[RecordedInput] = []
    for name in names:
        chosen += rng.sample(strata[name], quotas[name])
    rng.shuffle(chosen)
    return chosen


def _frame_source(recorded: RecordedInput, sha256: str, path: str) -> Path:
    """The frame file of a recorded input; its bytes must hash to the recorded sha256."""
    video_id = str(recorded.record.get("video_id", ""))
    candidates = [Path(path)]
    # Runs store frames under RUN_DIR/frames/<video_id>/; a run directory given as a
    # relative path records relative frame paths, so look there too.
    candidates.append(RunLayout(recorded.run_dir).frames_root / video_id / Path(path).name)
    for candidate in candidates:
        if candidate.is_file():
            data = candidate.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise InputError(
                    f"frame {candidate} of video {video_id} has changed since the run "
                    f"recorded it (sha256 {sha256[:12]}...): re-run the pipeline"
                )
            return candidate
    raise InputError(
        f"frame {sha256[:12]}... of video {video_id} (step input {recorded.record.get('key')}) "
        f"is missing: looked at {', '.join(str(c) for c in candidates)}"
    )


def render_prompt(messages: list[dict[str, Any]], clocks: dict[str, str | None]) -> str:
    """The messages as one readable text, each frame as a ``<frame mm:ss>`` placeholder."""
    blocks = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            text = content
        else:
            parts = []
            for part in content:
                if part.get("type") == "image":
                    clock = clocks.get(part["sha256"])
                    parts.append(f"<frame {clock or part['sha256'][:12]}>")
                else:
                    parts.append(str(part.get("text", "")))
            text = "\n".join(parts)
        blocks.append(f"### {message['role']}\n{text}")
    return "\n\n".join(blocks)


def frame_clocks(messages: list[dict[str, Any]]) -> dict[str, str | None]:
    """sha256 -> the mm:ss label the step put just before the frame, if it did."""
    clocks: dict[str, str | None] = {}
    for message in messages:
        content = message["content"]
        if not isinstance(content, list):
            continue
        previous = ""
        for part in content:
            if part.get("type") == "image":
                match = _FRAME_LABEL.search(previous)
                clocks.setdefault(part["sha256"], match.group(1) if match else None)
            previous = str(part.get("text", "")) if part.get("type") == "text" else ""
    return clocks


def _video_paths(run_dirs: list[Path]) -> dict[str, str]:
    paths: dict[str, str] = {}
    for run_dir in run_dirs:
        # A pilot-inputs directory (`vkr qualify inputs`) has no records: it lists its videos.
        listing = run_dir / PILOT_INPUTS_MANIFEST
        if listing.is_file():
            try:
                used = PilotInputsManifest.model_validate_json(listing.read_text()).videos_used
            except ValueError:
                used = {}
            for video_id, video_file in used.items():
                paths.setdefault(video_id, video_file)
        for path in RunLayout(run_dir).record_files():
            try:
                record = VideoRecord.model_validate_json(path.read_text())
            except ValueError:
                continue  # a record from another vkr version: the video path is only a nicety
            paths.setdefault(record.video_id, record.video.path)
    return paths


def _run_coroutine(factory: Any) -> Any:
    """Run a coroutine to completion, also from a thread that already runs an event loop.

    Notebooks (and Playwright's sync API) keep a loop running in the main thread, where
    ``asyncio.run`` refuses to start: run there in a worker thread instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


@dataclass
class PilotResult:
    manifest: PilotManifest
    items: list[PilotItem]
    calls: int
    cache_hits: int


def _check_step_and_model(pm: VkrPluginManager, pool: Pool, step_name: str, model: str) -> Any:
    steps = pm.registry.steps
    model_steps = sorted(n for n, s in steps.items() if getattr(s, "uses_model", True))
    if step_name not in steps:
        raise InputError(
            f"unknown step {step_name!r}; steps that call models: {', '.join(model_steps)}"
        )
    step = steps[step_name]
    if not step.uses_model:
        raise InputError(
            f"step {step_name!r} calls no model, so there is nothing to qualify; "
            f"steps that call models: {', '.join(model_steps)}"
        )
    spec = pool.get(model)
    if step.modality == "vision" and not spec.sees_images():
        raise InputError(
            f"model {model!r} is text-only (modality {spec.modality}) but step {step_name!r} "
            "shows frames: it cannot be qualified for it"
        )
    return step


def select_inputs(
    step_name: str, current_version: str, run_dirs: list[Path], n: int, seed: int
) -> tuple[list[RecordedInput], int]:
    """The sample, and how many current inputs it was drawn from. Errors name the shortfall."""
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    recorded = read_inputs(step_name, run_dirs)
    where = ", ".join(str(d) for d in run_dirs)
    if not recorded:
        raise InputError(
            f"no inputs of step {step_name!r} are recorded in {where}: a run records them in "
            f"{RunLayout('RUN_DIR').inputs(step_name)} when it calls the step; before any model "
            "is qualified, `vkr qualify inputs` records them for every model step"
        )
    # An input recorded under another prompt version is not what the step sends today.
    current = [r for r in recorded if r.record.get("prompt_version") in (None, current_version)]
    if not current:
        versions = sorted({str(r.record.get("prompt_version")) for r in recorded})
        raise InputError(
            f"all {len(recorded)} recorded inputs of step {step_name!r} in {where} were made "
            f"with prompt version(s) {', '.join(versions)}, but the step is now at "
            f"{current_version}: run the pipeline again to record current inputs"
        )
    if n > len(current):
        stale = len(recorded) - len(current)
        raise InputError(
            f"asked for {n} inputs of step {step_name!r} but only {len(current)} distinct "
            f"inputs are recorded in {where}"
            + (f" ({stale} more are of an older prompt version)" if stale else "")
            + f": use --n {len(current)} or less, or add run directories"
        )
    return stratified_sample(current, n, seed), len(current)


async def _ask(
    caller: ModelCaller,
    spec: Any,
    step: Any,
    pool: Pool,
    messages: list[dict[str, Any]],
    sample: int,
    video_id: str,
) -> tuple[str, str | None, str | None, dict[str, Any] | None, str | None]:
    """(outcome, raw text, parse error or refusal reason, parsed output, cache key)."""
    # The parameters a run sends (sampling, the response schema), so the pilot sees the step
    # as it runs.
    params = call_params(step, spec, pool)
    try:
        result = await caller.call(
            spec=spec,
            step=step.name,
            prompt_version=step.version(),
            messages=messages,
            params=params,
            sample=sample,
            video_id=video_id,
            validate=step.parse,
        )
    except ReplyError as exc:
        return "refusal", exc.raw, exc.reason, None, None
    try:
        parsed = step.parse(result.text)
    except ReplyError as exc:
        return "malformed", result.text, exc.reason, None, result.record.cache_key
    return "ok", result.text, None, parsed.model_dump(mode="json"), result.record.cache_key


def run_pilot(
    step_name: str,
    model: str,
    pool_path: str | Path,
    run_dirs: list[str | Path],
    out: str | Path,
    n: int = 100,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    pm: VkrPluginManager | None = None,
) -> PilotResult:
    """Sample n recorded inputs of a step, run the model on them, write the pilot directory."""
    pm = pm or get_plugin_manager()
    pool = load_pool(pool_path)
    register_secrets(spec.api_key() for spec in pool.models)
    step = _check_step_and_model(pm, pool, step_name, model)
    spec = pool.get(model)
    provider = pm.registry.providers.get(spec.provider)
    if provider is not None:  # the pool entry as the provider sees it, as a run checks it
        provider.check_entry(spec)
    structured = "response_format" in call_params(step, spec, pool)
    sources = [Path(d) for d in run_dirs]
    if not sources:
        raise InputError("name at least one run directory to sample inputs from (--from)")
    version = step.version()
    chosen, available = select_inputs(step_name, version, sources, n, seed)

    hashes = [c.input_sha256 for c in chosen]
    inputs_sha256 = fingerprint(sorted(hashes))
    pilot_id = "{}-{}-{}".format(
        step_name,
        re.sub(r"[^A-Za-z0-9_.-]", "_", model),
        # A pilot with the response schema is another experiment than one without it.
        fingerprint(
            [step_name, model, version, seed, inputs_sha256]
            + (["structured_output"] if structured else [])
        )[:10],
    )
    pilot_dir = Path(out)
    paths = pilot_dir_paths(pilot_dir)
    if paths["manifest"].exists():
        existing = PilotManifest.model_validate_json(paths["manifest"].read_text())
        if existing.pilot_id != pilot_id:
            raise InputError(
                f"{pilot_dir} already holds pilot {existing.pilot_id} ({existing.step}, "
                f"{existing.model}, n={existing.n}, seed={existing.seed}): use another --out"
            )
    paths["frames"].mkdir(parents=True, exist_ok=True)
    if provider is not None:  # a supervised server's log sits with the pilot, as with a run
        provider.use_folder(RunLayout(pilot_dir).provider_files(spec.provider))

    video_paths = _video_paths(sources)
    prepared = []
    for recorded in chosen:
        frame_paths: dict[str, Path] = {}
        for frame in recorded.record.get("frames", []):
            sha = frame["sha256"]
            if sha in frame_paths:
                continue
            target = paths["frames"] / f"{sha}.jpg"
            if not target.exists():
                shutil.copyfile(_frame_source(recorded, sha, frame["path"]), target)
            frame_paths[sha] = target
        key_form = recorded.record["messages"]
        missing = [
            p["sha256"]
            for m in key_form
            if isinstance(m["content"], list)
            for p in m["content"]
            if p.get("type") == "image" and p["sha256"] not in frame_paths
        ]
        if missing:
            raise InputError(
                f"input {recorded.record.get('key')} of step {step_name!r} refers to frame "
                f"{missing[0][:12]}... that its record does not list"
            )
        # Back from cache-key form to the frame parts ModelCaller sends.
        messages = [
            {
                "role": m["role"],
                "content": [
                    {"type": "frame", "sha256": p["sha256"], "path": str(frame_paths[p["sha256"]])}
                    if p.get("type") == "image"
                    else p
                    for p in m["content"]
                ]
                if isinstance(m["content"], list)
                else m["content"],
            }
            for m in key_form
        ]
        prepared.append((recorded, messages, frame_paths))

    caller = ModelCaller(
        cache_dir=Path(cache_dir) if cache_dir else paths["cache"],
        providers=pm.registry.providers,
    )

    async def ask_all() -> list[Any]:
        try:
            return await _gather_replies()
        finally:
            for provider in caller.providers.values():
                await provider.aclose()

    async def _gather_replies() -> list[Any]:
        return await asyncio.gather(
            *(
                _ask(
                    caller,
                    spec,
                    step,
                    pool,
                    messages,
                    int((recorded.record.get("meta") or {}).get("sample", 0)),
                    recorded.source_item_id,
                )
                for recorded, messages, _ in prepared
            ),
            return_exceptions=True,
        )

    try:
        replies = _run_coroutine(ask_all)
    finally:
        caller.close()
    failures = [r for r in replies if isinstance(r, BaseException)]
    if failures:
        for failure in failures:
            if not isinstance(failure, CallFailed):
                raise failure
        raise VkrError(
            f"{len(failures)} of {len(prepared)} calls to {model} failed: {failures[0]}. "
            "Run the same command again: answered calls are cached and not paid twice"
        )

    items: list[PilotItem] = []
    for index, ((recorded, _, frame_paths), reply) in enumerate(
        zip(prepared, replies, strict=True)
    ):
        outcome, text, error, parsed, _ = reply
        record = recorded.record
        meta = record.get("meta") or {}
        clocks = frame_clocks(record["messages"])
        auto = None
        if outcome == "malformed":
            auto = AutoLabel(
                note=f"reply does not parse into {step.output_schema.__name__}: {error}"
            )
        elif outcome == "refusal":
            auto = AutoLabel(note=f"refusal: {error}")
        items.append(
            PilotItem(
                item_id=recorded.input_sha256[:12],
                index=index,
                input_key=str(record.get("key")),
                input_sha256=recorded.input_sha256,
                source_item_id=recorded.source_item_id,
                video_id=recorded.video_id,
                video_path=video_paths.get(recorded.video_id) if recorded.video_id else None,
                discipline=recorded.discipline,
                subject=str(record.get("subject") or ""),
                skill=recorded.skill,
                round=meta.get("round"),
                frames=[
                    PilotFrame(
                        sha256=sha,
                        path=str(path.relative_to(pilot_dir)),
                        clock=clocks.get(sha),
                    )
                    for sha, path in frame_paths.items()
                ],
                messages=record["messages"],
                prompt=render_prompt(record["messages"], clocks),
                outcome=outcome,
                output=text,
                parsed=parsed,
                error=error,
                auto_label=auto,
            )
        )

    strata: dict[str, int] = defaultdict(int)
    for recorded in chosen:
        strata[recorded.stratum] += 1
    manifest = PilotManifest(
        pilot_id=pilot_id,
        step=step_name,
        model=model,
        prompt_version=version,
        n=n,
        seed=seed,
        source_runs=[str(d) for d in sources],
        pool=str(pool_path),
        input_hashes=hashes,
        inputs_sha256=inputs_sha256,
        available=available,
        strata=dict(sorted(strata.items())),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        structured_output=structured,
    )
    if paths["manifest"].exists():
        # A rerun of the same pilot keeps the time it was first made.
        manifest.created = PilotManifest.model_validate_json(paths["manifest"].read_text()).created
        _check_outputs_unchanged(pilot_dir, items)
    atomic_write(paths["items"], "".join(item.model_dump_json() + "\n" for item in items))
    atomic_write(paths["manifest"], manifest.model_dump_json(indent=2) + "\n")
    with LabelStore(paths["labels"], pilot_id) as store:
        for item in items:
            if item.auto_label:
                store.set(
                    item.item_id,
                    AUTO_ANNOTATOR,
                    item.auto_label.label,
                    item.auto_label.category,
                    item.auto_label.note,
                    source="auto",
                )
            else:
                stale = store.get(item.item_id, AUTO_ANNOTATOR)
                if stale is not None and stale.label != "ok":
                    # The reply parses now: retire the automatic failure, keeping its history.
                    store.set(
                        item.item_id,
                        AUTO_ANNOTATOR,
                        "ok",
                        note="the reply parses on a later run of the pilot",
                        source="auto",
                    )
    calls = sum(1 for r in caller.records if not r.cache_hit)
    hits = sum(1 for r in caller.records if r.cache_hit)
    return PilotResult(manifest, items, calls, hits)


def _check_outputs_unchanged(pilot_dir: Path, items: list[PilotItem]) -> None:
    """Refuse to replace outputs that people have already labelled.

    A rerun answered from the same cache gives the same outputs; with another cache a
    model may answer differently, and the labels would then judge text nobody sees.
    """
    paths = pilot_dir_paths(pilot_dir)
    if not paths["items"].is_file() or not paths["labels"].is_file():
        return
    before = {old.item_id: old.output for _, old in read_jsonl(paths["items"], PilotItem)}
    changed = [i.item_id for i in items if i.item_id in before and before[i.item_id] != i.output]
    if not changed:
        return
    manifest = PilotManifest.model_validate_json(paths["manifest"].read_text())
    with LabelStore(paths["labels"], manifest.pilot_id) as store:
        labelled = {lab.item_id for lab in store.current() if lab.annotator != AUTO_ANNOTATOR}
    affected = [item_id for item_id in changed if item_id in labelled]
    if affected:
        raise InputError(
            f"the model answered {len(changed)} input(s) of pilot {manifest.pilot_id} "
            f"differently this time (e.g. item {affected[0]}), and {len(affected)} of them are "
            "already labelled: keep the pilot's call cache, or start a new pilot with another --out"
        )


@dataclass
class Pilot:
    """A pilot directory, opened for review, labelling, export or scoring."""

    root: Path
    manifest: PilotManifest
    items: list[PilotItem]

    @property
    def labels_path(self) -> Path:
        return self.root / "labels.sqlite"

    def labels(self) -> LabelStore:
        return LabelStore(self.labels_path, self.manifest.pilot_id)

    def item(self, item_id: str) -> PilotItem:
        for item in self.items:
            if item.item_id == item_id:
                return item
        raise InputError(f"pilot {self.manifest.pilot_id} has no item {item_id!r}")

    def frame_files(self) -> dict[str, Path]:
        """sha256 -> file, for the frames of this pilot and nothing else."""
        return {
            frame.sha256: self.root / frame.path for item in self.items for frame in item.frames
        }


def open_pilot(pilot_dir: str | Path) -> Pilot:
    """Read a pilot directory or raise InputError naming what is missing or broken."""
    root = Path(pilot_dir)
    paths = pilot_dir_paths(root)
    if not paths["manifest"].is_file():
        raise InputError(
            f"{root} is not a pilot directory (no pilot.json): make one with `vkr qualify pilot`"
        )
    try:
        manifest = PilotManifest.model_validate_json(paths["manifest"].read_text())
    except ValidationError as exc:
        raise InputError(
            f"{paths['manifest']} is not a valid pilot manifest: {describe_validation_error(exc)}"
        ) from None
    # Written whole (atomically) by `vkr qualify pilot`: any damaged line is an error.
    items = [item for _, item in read_jsonl(paths["items"], PilotItem, missing_ok=True)]
    if len(items) != manifest.n:
        raise InputError(
            f"{paths['items']} has {len(items)} items but pilot.json says n={manifest.n}"
        )
    return Pilot(root, manifest, items)
