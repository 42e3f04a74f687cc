"""The first run: inputs for qualification pilots, before any model is qualified.

`vkr run` sends a step's calls only to models a pilot qualified, and a pilot samples the
inputs a run recorded, so a new user has neither. This mode breaks the circle: every pool
model that can serve a step is a candidate for it, the generator's candidates write examples
for the videos, and every example that parses goes through every model gate in order, so
each model step records its inputs exactly as a run does (``OUT/inputs/<step>.jsonl``), for
``vkr qualify pilot --from OUT`` to sample unchanged.

An example goes on to the later gates even after an earlier gate rejected it: a gate judges
each example on its own, and a chain that stops at the first rejection would need several
times the generator calls (and videos) to give the later gates 100 inputs each.

Nothing here writes corpus records or an eligibility registry::

    OUT/inputs/<step>.jsonl   the step inputs, as a run records them
    OUT/frames/<video_id>/    the frames those inputs show
    OUT/cache/                the call cache: a rerun pays for nothing twice
    OUT/calls.jsonl           one CallRecord per call, with its cost
    OUT/failures.jsonl        videos that did not decode, calls that got no reply
    OUT/config.json           the pipeline settings (a rerun with others is refused)
    OUT/pilot-inputs.json     PilotInputsManifest: inputs and strata per step, spend
"""

from __future__ import annotations

import asyncio
import random
import shlex
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from graphs.generation import planned_rounds, run_skills
from qualification.models import PILOT_INPUTS_MANIFEST, PilotInputsManifest, StepInputs
from qualification.pilot import RecordedInput, _run_coroutine, input_sha256, read_inputs
from vkr_core.calls import CallFailed, ModelCaller, key_messages
from vkr_core.config import Eligibility, EligibilityRegistry, Pool, RunConfig, load_pool
from vkr_core.context import RunContext, StepContext
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write
from vkr_core.log import get_logger, register_secrets
from vkr_core.plugins import VkrPluginManager, get_plugin_manager
from vkr_core.router import Router, RoutingError
from vkr_core.schemas import CallRecord, Candidate, InputError, Video, VkrError
from vkr_core.seeds import SeedBank
from vkr_core.sources import VIDEO_EXTENSIONS
from vkr_core.steps import Gate, Generator, ReplyError, Step
from vkr_core.store import RunLayout, RunStore, spent_in

log = get_logger("vkr.qualify.inputs")

GENERATOR = "example_generation"
Progress = Callable[[str], None]


def _model_steps(registry: Any) -> dict[str, Step]:
    """The model-backed steps of the generation graph, by name."""
    return {
        name: step
        for name, step in registry.steps.items()
        if isinstance(step, (Gate, Generator)) and step.uses_model
    }


def choose_steps(registry: Any, names: list[str] | None) -> list[str]:
    """The steps to collect inputs for (default: every model step of the generation graph)."""
    graph_steps = _model_steps(registry)
    if GENERATOR not in graph_steps:
        raise VkrError(f"no generator step {GENERATOR!r} is registered")
    if not names:
        return sorted(graph_steps)
    for name in names:
        if name in graph_steps:
            continue
        known = ", ".join(sorted(graph_steps))
        step = registry.steps.get(name)
        if step is None:
            raise InputError(f"unknown step {name!r}; model steps of the pipeline: {known}")
        if not step.uses_model:
            raise InputError(f"step {name!r} calls no model, so it needs no pilot inputs")
        raise InputError(
            f"step {name!r} is not part of the generation pipeline, so this mode cannot make "
            f"its inputs (`vkr probe --models A,B,C` records the single-frame probe's); "
            f"model steps of the pipeline: {known}"
        )
    return sorted(set(names))


def candidate_registry(pool: Pool, steps: dict[str, Step]) -> EligibilityRegistry:
    """Every pool model that can serve a step, as if qualified for its current prompt."""
    registry = EligibilityRegistry()
    for name, step in steps.items():
        registry.steps[name] = {
            spec.name: Eligibility(eligible=True, prompt_version=step.version())
            for spec in pool.models
            if step.modality != "vision" or spec.sees_images()
        }
    return registry


def candidates(router: Router, step: Step) -> list[str]:
    """The models a pilot may qualify for a step: its fixed set, or every candidate."""
    if step.selection == "all":
        return [spec.name for spec in router.fixed(step.name)]
    return [spec.name for spec in router.eligible(step.name)]


def load_videos(
    manifest: str | Path | None,
    videos_dir: str | Path | None,
    pm: VkrPluginManager,
    video_root: str | Path | None = None,
) -> tuple[list[Video], list[str]]:
    """The videos of a manifest (as `vkr run` reads it) or a folder; and the ones skipped, why."""
    if (manifest is None) == (videos_dir is None):
        raise InputError("name the videos once: a manifest (--videos) or a folder (--videos-dir)")
    if video_root is not None and manifest is None:
        raise InputError("--video-root goes with a manifest (--videos): a folder is its own root")
    if manifest is not None:
        from vkr_core.manifest import load_manifest

        loaded = load_manifest(manifest, video_root)
        return loaded.videos, [f"manifest {manifest}: {p.reason}" for p in loaded.problems]
    root = Path(str(videos_dir))
    if not root.is_dir():
        raise InputError(f"videos directory not found: {root}")
    source = pm.registry.get("source", "local")
    videos: list[Video] = []
    problems: list[str] = []
    for path in sorted(root.iterdir()):
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        try:
            videos.append(source.resolve(path.stem, videos_dir=root))
        except InputError as exc:
            problems.append(f"{path}: {exc}")
    return videos, problems


def interleave_disciplines(videos: list[Video], seed: int) -> list[Video]:
    """One video of each discipline in turn, shuffled within a discipline (seeded).

    Collection stops once every step has enough inputs, so this order is what puts every
    discipline into the pilots' strata, however the manifest is sorted.
    """
    rng = random.Random(seed)
    groups: dict[str, list[Video]] = defaultdict(list)
    for video in videos:
        groups[video.discipline].append(video)
    for name in sorted(groups):
        rng.shuffle(groups[name])
    ordered: list[Video] = []
    while any(groups.values()):
        for name in sorted(groups):
            if groups[name]:
                ordered.append(groups[name].pop(0))
    return ordered


class InputsStore(RunStore):
    """A run store that also counts each step's distinct inputs, whoever answered them."""

    def __init__(self, root: str | Path, found: dict[str, dict[str, str]]):
        super().__init__(root)
        # step -> input sha256 -> "discipline / skill", the pilot's stratum of the input
        self.found = found

    def record_input(
        self,
        step: str,
        key: str,
        video: Video,
        messages: list[dict[str, Any]],
        meta: dict[str, Any],
        prompt_version: str | None = None,
    ) -> None:
        super().record_input(step, key, video, messages, meta, prompt_version)
        digest = input_sha256(step, key_messages(messages))
        stratum = RecordedInput(self.root, {"discipline": video.discipline, "meta": meta}, digest)
        self.found.setdefault(step, {}).setdefault(digest, stratum.stratum)


@dataclass
class ModelSpend:
    calls: int = 0
    cache_hits: int = 0
    cost_usd: float = 0.0

    def add(self, record: CallRecord) -> None:
        if record.cache_hit:
            self.cache_hits += 1
        else:
            self.calls += 1
            self.cost_usd += record.cost_usd or 0.0


@dataclass
class Spend(ModelSpend):
    """What the calls of this invocation cost, in all and per model."""

    by_model: dict[str, ModelSpend] = field(default_factory=dict)

    def add(self, record: CallRecord) -> None:
        super().add(record)
        self.by_model.setdefault(record.model, ModelSpend()).add(record)


@dataclass
class PilotInputsResult:
    out: Path
    manifest: PilotInputsManifest
    pool: Pool
    pool_path: str
    spend: Spend
    videos_total: int
    videos_now: list[Video]
    failures: list[str]
    stopped: str  # "enough", "budget" or "videos"
    skipped: list[str]

    def short(self) -> dict[str, int]:
        """Steps with fewer inputs than asked for, and how many they have."""
        n = self.manifest.n
        return {s: i.inputs for s, i in self.manifest.steps.items() if i.inputs < n}

    def pilot_dir(self, step: str, model: str) -> Path:
        return self.out.parent / "pilots" / f"{step}-{model}"

    def next_commands(self, videos_arg: str, video_root: str | None = None) -> list[str]:
        """What to run next, in order: one pilot per (step, candidate), label, score, run."""
        q = shlex.quote
        pool, out = q(self.pool_path), q(str(self.out))
        lines = []
        for step, info in self.manifest.steps.items():
            n = min(self.manifest.n, info.inputs)
            if n == 0:
                continue
            for model in info.candidates:
                lines.append(
                    f"vkr qualify pilot --step {step} --model {q(model)} --pool {pool} "
                    f"--from {out} --cache {q(str(RunLayout(self.out).cache))} --n {n} "
                    f"--out {q(str(self.pilot_dir(step, model)))}"
                )
        pilots = self.out.parent / "pilots"
        lines.append(f"vkr qualify review {q(str(pilots))}/STEP-MODEL --annotator YOUR_NAME")
        registry = self.pool.registry_path()
        lines.append(
            f"vkr qualify score {q(str(pilots))}/* --registry "
            + q(str(registry) if registry else "eligibility.yaml")
        )
        root = f" --video-root {q(video_root)}" if video_root else ""
        lines.append(f"vkr run --videos {q(videos_arg)}{root} --pool {pool} --out runs/r1")
        return lines


def _previous(out: Path) -> PilotInputsManifest | None:
    path = out / PILOT_INPUTS_MANIFEST
    if not path.is_file():
        return None
    try:
        return PilotInputsManifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise InputError(
            f"{path} is not a pilot-inputs manifest: {describe_validation_error(exc)}"
        ) from None


@dataclass
class _Plan:
    """Everything checked before the first call: what to run, on which videos, with whom."""

    pool: Pool
    pool_path: str
    videos_arg: str
    # The plugins that decode the videos and route the steps: the caller's, never a default.
    pm: VkrPluginManager
    registry: Any
    router: Router
    used: dict[str, Step]
    wanted: list[str]
    skills: list[str]
    rounds: dict[str, int]
    seed_bank: SeedBank
    config: RunConfig
    videos: list[Video]
    skipped: list[str]
    n: int
    concurrency: int
    max_spend: float | None
    say: Progress


def collect_pilot_inputs(
    pool_path: str | Path,
    out: str | Path,
    *,
    manifest: str | Path | None = None,
    videos_dir: str | Path | None = None,
    video_root: str | Path | None = None,
    steps: list[str] | None = None,
    n: int = 100,
    config: RunConfig | None = None,
    concurrency: int = 4,
    max_spend: float | None = None,
    force: bool = False,
    pm: VkrPluginManager | None = None,
    progress: Progress | None = None,
) -> PilotInputsResult:
    """Run the pipeline's model steps with candidate models until each step has n inputs."""
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    if concurrency < 1:
        raise InputError(f"--concurrency must be at least 1, got {concurrency}")
    if max_spend is not None and max_spend < 0:
        raise InputError(f"--max-spend must be 0 or more dollars, got {max_spend}")
    pm = pm or get_plugin_manager()
    config = config or RunConfig()
    say = progress or (lambda _text: None)
    pool = load_pool(pool_path)
    register_secrets(spec.api_key() for spec in pool.models)
    registry = pm.registry
    wanted = choose_steps(registry, steps)
    graph_steps = _model_steps(registry)
    # The generator makes the examples every gate checks, asked for or not.
    used = {name: graph_steps[name] for name in sorted(set(wanted) | {GENERATOR})}
    try:
        router = Router(pool, candidate_registry(pool, used), registry.steps, config.seed)
        router.check(sorted(used))
    except RoutingError as exc:
        raise InputError(
            f"pool {pool_path} cannot serve the pipeline even with every model that fits a "
            f"step as a candidate: {exc}"
        ) from None
    skills = run_skills(config, registry)
    for skill in skills:
        registry.get("skill", skill)
    # The same seeds a run would show: the skills' own, or the --seed-bank's.
    seed_bank = SeedBank.for_run(registry, skills, config.seed_bank)
    videos, skipped = load_videos(manifest, videos_dir, pm, video_root)
    for problem in skipped:
        say(f"skipped: {problem}")
    if not videos:
        raise InputError("no usable videos: nothing to make pilot inputs from")
    root = Path(out)
    layout = RunLayout(root)
    if layout.record_files():
        raise InputError(
            f"{root} is a run directory (it holds {layout.records.name}/): pilot inputs go in "
            "a directory of their own, and `vkr qualify pilot --from` reads both"
        )
    plan = _Plan(
        pool=pool,
        pool_path=str(pool_path),
        videos_arg=str(manifest if manifest is not None else videos_dir),
        pm=pm,
        registry=registry,
        router=router,
        used=used,
        wanted=wanted,
        skills=skills,
        rounds=planned_rounds(config, registry),
        seed_bank=seed_bank,
        config=config,
        videos=interleave_disciplines(videos, config.seed),
        skipped=skipped,
        n=n,
        concurrency=concurrency,
        max_spend=max_spend,
        say=say,
    )
    had_records_dir = layout.records.is_dir()
    store = InputsStore(root, {})
    # Two processes on one directory would pay for the same calls twice.
    store.run_lock.acquire("vkr qualify inputs")
    try:
        store.check_config({"pilot_inputs": {"config": config.model_dump()}}, force=force)
        return _collect(plan, store)
    finally:
        store.run_lock.release()
        if not had_records_dir:
            # RunStore makes records/ for a run; this directory never holds any.
            try:
                layout.records.rmdir()
            except OSError:
                pass


def _collect(plan: _Plan, store: InputsStore) -> PilotInputsResult:
    root, config, n, say = store.root, plan.config, plan.n, plan.say
    registry, used, wanted = plan.registry, plan.used, plan.wanted
    found = store.found
    if store.layout.inputs_root.is_dir():
        # A rerun counts what earlier invocations recorded (at the current prompt versions).
        for name, step in used.items():
            for recorded in read_inputs(name, [root]):
                if recorded.record.get("prompt_version") in (None, step.version()):
                    found.setdefault(name, {})[recorded.input_sha256] = recorded.stratum
    previous = _previous(root)
    per_video = sum(plan.rounds.values())
    ordered = plan.videos
    say(
        f"collecting at least {n} distinct inputs for each of {', '.join(wanted)} from up to "
        f"{len(ordered)} videos ({per_video} generation rounds each), candidates:"
    )
    for name in wanted:
        say(f"  {name}: {', '.join(candidates(plan.router, used[name]))}")
    # Videos an earlier invocation used replay their inputs: they add nothing new.
    fresh = [v for v in ordered if not previous or v.video_id not in previous.videos_used]
    reachable = len(found.get(GENERATOR, {})) + per_video * len(fresh)
    if reachable < n:
        say(
            f"note: these videos give at most {reachable} {GENERATOR} inputs, fewer than "
            f"{n}: add videos or raise --rounds-per-skill"
        )

    spend = Spend()
    spent_before = spent_in(root)

    def on_record(record: CallRecord) -> None:
        store.append_call(record)
        spend.add(record)

    generator = used[GENERATOR]
    assert isinstance(generator, Generator)
    gates = sorted(
        (step for name, step in used.items() if isinstance(step, Gate) and name in wanted),
        key=lambda g: (g.order, g.name),
    )
    failures: list[str] = []
    videos_now: list[Video] = []
    state = {"stopped": "videos"}

    def enough() -> bool:
        return all(len(found.get(name, {})) >= n for name in wanted)

    def counts() -> str:
        return ", ".join(f"{name} {len(found.get(name, {}))}/{n}" for name in wanted)

    def call_failed(video: Video, exc: CallFailed) -> None:
        failures.append(f"{video.video_id}: {exc}")
        store.add_failure(video.video_id, f"model calls failed: {exc}", video.path)

    async def generate(ctx: StepContext, skill: str, round_: int) -> Candidate | None:
        try:
            return await generator.generate(ctx, registry.get("skill", skill), round_)
        except ReplyError:
            return None  # a malformed reply or a refusal: its input is recorded, no example
        except CallFailed as exc:
            call_failed(ctx.video, exc)
            return None

    async def check(ctx: StepContext, candidate: Candidate) -> None:
        for gate in gates:
            try:
                verdict = await gate.check(ctx, candidate)
            except ReplyError:
                continue
            except CallFailed as exc:
                call_failed(ctx.video, exc)
                continue
            # As in a run: later gates see the verdicts so far and the re-derived trace.
            candidate.verdicts.append(verdict)
            for model in verdict.models:
                candidate.models.setdefault(gate.name, []).append(model)
            if verdict.passed and verdict.revised_reasoning:
                candidate.reasoning = verdict.revised_reasoning

    async def one_video(video: Video, context: RunContext) -> None:
        from vkr_core.video import sample_frames

        try:
            frames = await asyncio.to_thread(
                sample_frames,
                video.path,
                store.frames_dir(video.video_id),
                fps=config.fps,
                max_frames=config.max_frames,
                max_side=config.max_side,
                jpeg_quality=config.jpeg_quality,
                timeout=config.decode_timeout,
                pm=plan.pm,
            )
        except VkrError as exc:
            failures.append(f"{video.video_id}: {exc}")
            store.add_failure(video.video_id, str(exc), video.path)
            say(f"{video.video_id}: skipped ({exc})")
            return
        ctx = StepContext(context, video, frames)
        made = await asyncio.gather(
            *(generate(ctx, s, r) for s in plan.skills for r in range(plan.rounds[s]))
        )
        examples = [c for c in made if c is not None]
        if gates:
            await asyncio.gather(*(check(ctx, c) for c in examples))
        videos_now.append(video)
        say(
            f"{video.video_id}: {len(examples)} of {len(made)} examples parsed; inputs: "
            f"{counts()}; spent ${spend.cost_usd:.4f}"
        )

    async def collect() -> None:
        caller = ModelCaller(
            cache_dir=store.cache_dir, providers=registry.providers, on_record=on_record
        )
        context = RunContext(
            registry=registry,
            router=plan.router,
            caller=caller,
            config=config,
            store=store,
            seed_bank=plan.seed_bank,
        )
        queue = iter(ordered)

        async def worker() -> None:
            while True:
                if enough():
                    state["stopped"] = "enough"
                    return
                if plan.max_spend is not None and spent_before + spend.cost_usd >= plan.max_spend:
                    state["stopped"] = "budget"
                    return
                video = next(queue, None)
                if video is None:
                    return
                await one_video(video, context)

        try:
            await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
        finally:
            await caller.aclose()

    _run_coroutine(collect)
    if enough():
        state["stopped"] = "enough"

    calls = store.calls()
    used_ids = dict(previous.videos_used) if previous else {}
    used_ids.update({video.video_id: video.path for video in videos_now})
    result_manifest = PilotInputsManifest(
        pool=plan.pool_path,
        videos=plan.videos_arg,
        n=n,
        config=config.model_dump(),
        steps={
            name: StepInputs(
                prompt_version=used[name].version(),
                inputs=len(found.get(name, {})),
                strata=dict(sorted(Counter(found.get(name, {}).values()).items())),
                candidates=candidates(plan.router, used[name]),
            )
            for name in wanted
        },
        videos_used=used_ids,
        calls_paid=sum(1 for c in calls if not c.cache_hit),
        cost_usd=round(sum(c.cost_usd or 0.0 for c in calls if not c.cache_hit), 6),
        updated=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    atomic_write(root / PILOT_INPUTS_MANIFEST, result_manifest.model_dump_json(indent=2) + "\n")
    return PilotInputsResult(
        out=root,
        manifest=result_manifest,
        pool=plan.pool,
        pool_path=plan.pool_path,
        spend=spend,
        videos_total=len(ordered),
        videos_now=videos_now,
        failures=failures,
        stopped=state["stopped"],
        skipped=plan.skipped,
    )


STARTER_POOL = """\
# vkr model pool: the candidate models of every step. Edit it, then make pilot inputs:
#   vkr qualify inputs --videos manifest.jsonl --pool {pool_name} --out pilot-inputs
# A model serves a step in `vkr run` only after a pilot qualified it there (the registry).
models:
  - name: gpt4o                     # vkr's name, used in the registry and records
    model: openai/gpt-4o            # any litellm model name
    api_key_env: OPENAI_API_KEY     # the variable holding the key; keys are never stored
    modality: [text, vision]
    max_concurrency: 8
  - name: local-qwen
    model: openai/Qwen2.5-VL-72B-Instruct
    api_base: http://127.0.0.1:8000/v1   # a vLLM or other OpenAI-compatible server
    modality: [text, vision]
    input_cost_per_token: 0.0            # optional prices; otherwise litellm's price map
    output_cost_per_token: 0.0
steps:
  video_dependency:
    models: [gpt4o, local-qwen]     # the two fixed models (the paper uses two open models)
# Written by `vkr qualify score --registry {registry}`; `vkr run` reads it.
registry: {registry}
"""


def write_starter_pool(path: str | Path, registry: str = "eligibility.yaml") -> Path:
    """Write a commented pool file to start from; never over an existing file."""
    target = Path(path)
    if target.exists():
        raise InputError(f"{target} already exists: edit it, or name another file")
    text = STARTER_POOL.format(pool_name=shlex.quote(target.name), registry=registry)
    atomic_write(target, text)
    load_pool(target)  # the template must stay a valid pool
    return target
