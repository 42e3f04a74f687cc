"""`vkr qualify ...`: pilots per (step, model), expert labels, scores and the eligibility registry.

Imported by cli.py at every start: library imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vkr_core.hookspecs import hookimpl

_FORMAT = click.Choice(["labelstudio", "argilla"])
_PILOT_DIR = click.Path(file_okay=False, path_type=Path)


@click.group()
def qualify() -> None:
    """Qualify models per step: pilot on real inputs, label, score, write the registry.

    A model is eligible for a step when experts find at most 3 % errors (hard compliance
    failures plus soft content failures) in its outputs on a pilot of real inputs.
    """


@qualify.command()
@click.option(
    "--out",
    default="pool.yaml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Pool file to write (never over an existing one).",
)
@click.option(
    "--registry",
    default="eligibility.yaml",
    show_default=True,
    help="Registry the pool names (written later by `vkr qualify score`).",
)
def init(out: Path, registry: str) -> None:
    """Write a commented starter pool file: the candidate models of every step."""
    from qualification.bootstrap import write_starter_pool

    write_starter_pool(out, registry)
    click.echo(f"wrote {out}: put your models in it, then make pilot inputs:")
    click.echo(f"  vkr qualify inputs --videos manifest.jsonl --pool {out} --out pilot-inputs")


@qualify.command()
@click.option(
    "--videos",
    "manifest",
    type=click.Path(dir_okay=False),
    help="Manifest, as for `vkr run` (jsonl: video_id, path, discipline, ...).",
)
@click.option(
    "--videos-dir",
    type=click.Path(file_okay=False),
    help="Or a folder of videos with optional <video-id>.json metadata.",
)
@click.option(
    "--video-root",
    type=click.Path(file_okay=False),
    help="With --videos: the folder holding every video, as for `vkr run` [default: the "
    "manifest's folder].",
)
@click.option("--pool", required=True, type=click.Path(dir_okay=False), help="Model pool YAML.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Pilot-inputs directory to write (its own, not a run's).",
)
@click.option(
    "--steps",
    help="Comma-separated model steps [default: every model step of the pipeline].",
)
@click.option(
    "--n",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Distinct inputs to collect per step (a pilot samples this many).",
)
@click.option(
    "--concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Videos in flight at once (per-model limits come from the pool).",
)
@click.option(
    "--max-spend",
    type=click.FloatRange(min=0),
    help="Dollars: start no new video once this directory's calls have cost this much.",
)
@click.option("--seed-bank", type=click.Path(dir_okay=False), help="Seed-example bank (jsonl).")
@click.option("--seed", default=0, show_default=True, help="Model choice, seeds, frames, order.")
@click.option(
    "--fps",
    default=0.2,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Frame sampling rate: the one you will give `vkr run`.",
)
@click.option(
    "--max-frames",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="At most this many frames: as you will give `vkr run`.",
)
@click.option(
    "--rounds-per-skill",
    type=click.IntRange(min=1),
    help="Generation rounds per skill and video [default: each skill's own, 2].",
)
@click.option("--force", is_flag=True, help="Reuse a directory made with other settings.")
@click.option("--log-level", default="WARNING", show_default=True)
def inputs(
    manifest: str | None,
    videos_dir: str | None,
    video_root: str | None,
    pool: str,
    out: Path,
    steps: str | None,
    n: int,
    concurrency: int,
    max_spend: float | None,
    force: bool,
    log_level: str,
    **settings: Any,
) -> None:
    """The first run: record every model step's inputs for pilots, before any registry.

    Every pool model that can serve a step is a candidate for it. The generator's candidates
    write examples for the videos and the gates' candidates check every one, until each step
    has N distinct inputs. Writes no corpus records and no registry; a rerun pays nothing
    twice (the call cache is in OUT/cache).
    """
    from qualification.bootstrap import collect_pilot_inputs
    from vkr_core.config import RunConfig
    from vkr_core.log import configure_logging
    from vkr_core.store import RunLayout

    configure_logging(log_level)
    # Pass the settings you will give `vkr run`: they change what each step is sent.
    config = RunConfig(**{k: v for k, v in settings.items() if v is not None})
    step_names = [s.strip() for s in steps.split(",") if s.strip()] if steps else None
    result = collect_pilot_inputs(
        pool,
        out,
        manifest=manifest,
        videos_dir=videos_dir,
        video_root=video_root,
        steps=step_names,
        n=n,
        config=config,
        concurrency=concurrency,
        max_spend=max_spend,
        force=force,
        progress=click.echo,
    )
    manifest_obj = result.manifest
    spend = result.spend
    click.echo(
        f"pilot inputs in {out}: {len(result.videos_now)} video(s) this time, "
        f"{len(manifest_obj.videos_used)} in all, of {result.videos_total}"
    )
    for name, info in manifest_obj.steps.items():
        strata = ", ".join(f"{k}: {v}" for k, v in info.strata.items()) or "none"
        click.echo(f"  {name}: {info.inputs} inputs ({strata})")
    click.echo(
        f"model calls: {spend.calls} made (${spend.cost_usd:.4f}), {spend.cache_hits} from the "
        f"cache; this directory has cost ${manifest_obj.cost_usd:.4f} in "
        f"{manifest_obj.calls_paid} calls"
    )
    for model, used in sorted(spend.by_model.items()):
        click.echo(f"  {model}: {used.calls} made, {used.cache_hits} cached, ${used.cost_usd:.4f}")
    if result.failures:
        click.echo(
            f"{len(result.failures)} failure(s), see {RunLayout(out).failures}; rerun to retry "
            f"(answered calls are cached): {result.failures[0]}",
            err=True,
        )
    if result.stopped == "budget":
        click.echo(f"stopped at --max-spend ${max_spend}: raise it and rerun to go on", err=True)
    for name, have in result.short().items():
        click.echo(
            f"short: {name} has {have} of {n} inputs: add videos and rerun (pilots of "
            f"{have} are below the paper's 100)",
            err=True,
        )
    registry = result.pool.registry_path()
    if registry is None:
        click.echo(f"note: {pool} names no registry: add `registry: eligibility.yaml` to it")
    click.echo("next:")
    # `vkr run` reads a manifest, not a folder.
    for line in result.next_commands(manifest or "MANIFEST.jsonl", video_root):
        click.echo(f"  {line}")


@qualify.command()
@click.option("--step", required=True, help="The step to qualify a model for.")
@click.option("--model", required=True, help="The model's name in the pool.")
@click.option("--pool", required=True, type=click.Path(dir_okay=False), help="Model pool YAML.")
@click.option("--n", default=100, show_default=True, help="Inputs to sample (the paper: 100).")
@click.option(
    "--from",
    "run_dirs",
    multiple=True,
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory whose recorded inputs to sample (repeat for several).",
)
@click.option("--seed", default=0, show_default=True, help="Same seed, same sample.")
@click.option("--out", required=True, type=_PILOT_DIR, help="Pilot directory to write.")
@click.option(
    "--cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Call cache to use (default: PILOT_DIR/cache); a run's cache replays its calls.",
)
def pilot(
    step: str,
    model: str,
    pool: str,
    n: int,
    run_dirs: tuple[Path, ...],
    seed: int,
    out: Path,
    cache: Path | None,
) -> None:
    """Run MODEL on n sampled real inputs of STEP; hard failures are pre-labelled."""
    from qualification.pilot import run_pilot

    result = run_pilot(step, model, pool, list(run_dirs), out, n=n, seed=seed, cache_dir=cache)
    manifest = result.manifest
    auto = sum(1 for item in result.items if item.auto_label)
    click.echo(
        f"pilot {manifest.pilot_id}: {manifest.n} of {manifest.available} inputs of {step} "
        f"(prompt {manifest.prompt_version}) answered by {model}"
    )
    click.echo(f"  model calls: {result.calls} made, {result.cache_hits} from the cache")
    click.echo("  strata: " + ", ".join(f"{k}: {v}" for k, v in manifest.strata.items()))
    click.echo(f"  pre-labelled hard failures (format): {auto}")
    if manifest.structured_output:
        click.echo("  each call carried the step's JSON schema (structured_output: true)")
    click.echo(f"next: vkr qualify review {out}")


@qualify.command()
@click.argument("pilot_dir", type=_PILOT_DIR)
@click.option("--port", default=8760, show_default=True, help="Port on 127.0.0.1 (0: any free).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback only.")
@click.option("--annotator", help="Your name, recorded with every label you give.")
def review(pilot_dir: Path, port: int, host: str, annotator: str | None) -> None:
    """Serve the labelling page for PILOT_DIR on 127.0.0.1 until Ctrl-C."""
    from qualification.review import ReviewServer

    server = ReviewServer(pilot_dir, host=host, port=port, annotator=annotator)
    click.echo(f"review {pilot_dir}: open {server.url}")
    click.echo("labels are saved as you give them; press Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@qualify.command("export")
@click.argument("pilot_dir", type=_PILOT_DIR)
@click.option("--format", "fmt", required=True, type=_FORMAT, help="Labelling tool.")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Label Studio: tasks JSON file (config XML beside it). Argilla: an empty folder.",
)
@click.option(
    "--frame-url-prefix",
    default="",
    help="Put before each frame's pilot-relative path, e.g. Label Studio's "
    "'/data/local-files/?d=pilots/p1/'.",
)
def export_command(pilot_dir: Path, fmt: str, out: Path, frame_url_prefix: str) -> None:
    """Write PILOT_DIR's items for Label Studio or Argilla, with automatic pre-labels."""
    from qualification.interchange import export_labels
    from qualification.pilot import open_pilot

    pilot_obj = open_pilot(pilot_dir)
    written = export_labels(pilot_obj, fmt, out, frame_url_prefix)
    click.echo(f"{len(pilot_obj.items)} items of pilot {pilot_obj.manifest.pilot_id}:")
    for path in written:
        click.echo(f"  {path}")


@qualify.command("import")
@click.argument("pilot_dir", type=_PILOT_DIR)
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", required=True, type=_FORMAT, help="Labelling tool.")
@click.option(
    "--overwrite", is_flag=True, help="Replace differing labels (the old ones stay in history)."
)
def import_command(pilot_dir: Path, file: Path, fmt: str, overwrite: bool) -> None:
    """Store the labels of a Label Studio or Argilla export in PILOT_DIR."""
    from qualification.interchange import import_labels
    from qualification.pilot import open_pilot

    report = import_labels(open_pilot(pilot_dir), fmt, file, overwrite=overwrite)
    click.echo(
        f"imported labels by {', '.join(report.annotators) or 'nobody'}: {report.created} new, "
        f"{report.changed} replaced, {report.unchanged} already stored"
    )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@qualify.command()
@click.argument("pilot_dirs", nargs=-1, required=True, type=_PILOT_DIR)
@click.option(
    "--registry",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Eligibility registry YAML to write or merge into.",
)
@click.option("--strict", is_flag=True, help="Also require the Wilson upper bound <= 3 %.")
@click.option(
    "--annotator-policy",
    type=click.Choice(["all", "majority"]),
    default="all",
    show_default=True,
    help="all: a failure if any annotator says so; majority: if at least half do.",
)
@click.option(
    "--allow-partial", is_flag=True, help="Score the labelled items of unfinished pilots."
)
def score(
    pilot_dirs: tuple[Path, ...],
    registry: Path | None,
    strict: bool,
    annotator_policy: str,
    allow_partial: bool,
) -> None:
    """Error rates, Wilson 95 % intervals, eligibility and agreement for PILOT_DIRS."""
    from rich.console import Console
    from rich.table import Table

    from qualification.models import PAPER_PILOT_SIZE
    from qualification.score import AnnotatorPolicy, score_pilots

    policy: AnnotatorPolicy = "majority" if annotator_policy == "majority" else "all"
    scores = score_pilots(list(pilot_dirs), registry, policy, strict, allow_partial)
    table = Table(title="qualification pilots")
    for column in ("step", "model", "n", "hard", "soft", "error rate", "Wilson 95 %", "eligible"):
        table.add_column(column, justify="left" if column in ("step", "model") else "right")
    for s in scores:
        table.add_row(
            s.step,
            s.model,
            str(s.labelled),
            str(s.hard),
            str(s.soft),
            _pct(s.error_rate),
            f"{_pct(s.wilson_low)}–{_pct(s.wilson_high)}",
            "yes" if s.eligible else "no",
        )
    console = Console(width=120)
    console.print(table)
    for s in scores:
        rule = "upper bound" if strict else "error rate"
        click.echo(
            f"{s.step} / {s.model}: rule {rule} <= 3 % ({s.rule}); annotators: "
            f"{', '.join(s.annotators) or 'none (automatic labels only)'}"
        )
        if s.unlabelled:
            click.echo(f"  partial: {len(s.unlabelled)} unlabelled item(s) left out")
        if s.labelled < PAPER_PILOT_SIZE:
            click.echo(f"  note: n={s.labelled} is below the paper's {PAPER_PILOT_SIZE} inputs")
        for a in s.agreement:
            kappa2 = "n/a" if a.ok_vs_failure is None else f"{a.ok_vs_failure:.3f}"
            kappa3 = "n/a" if a.three_way is None else f"{a.three_way:.3f}"
            click.echo(
                f"  Cohen's kappa {a.annotators[0]} vs {a.annotators[1]} on {a.items} items: "
                f"ok/failure {kappa2}, ok/hard/soft {kappa3}"
            )
    if registry is not None:
        click.echo(f"registry: {registry}")


@qualify.command()
@click.option(
    "--registry", required=True, type=click.Path(dir_okay=False), help="Eligibility registry."
)
@click.option("--pool", required=True, type=click.Path(dir_okay=False), help="Model pool YAML.")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
def table(registry: str, pool: str, markdown: bool) -> None:
    """The eligibility matrix: steps x models of the pool."""
    from qualification.table import load_matrix

    matrix = load_matrix(registry, pool)
    if markdown:
        click.echo(matrix.markdown(), nl=False)
        return
    from rich.console import Console
    from rich.table import Table

    grid = Table(title="eligibility")
    grid.add_column("step")
    for model in matrix.models:
        grid.add_column(matrix.model_label(model), justify="center")
    for step, row in zip(matrix.steps, matrix.rows(), strict=True):
        name = step + (f" ({matrix.notes[step]})" if step in matrix.notes else "")
        grid.add_row(name, *row[1:])
    Console(width=max(80, 24 + 12 * len(matrix.models))).print(grid)
    click.echo(matrix.legend())


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(qualify)
