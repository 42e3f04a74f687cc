"""`vkr decontam`: drop training videos that are in, or copy, a benchmark; and its calibration.

Heavy imports (numpy, faiss, PyAV) happen inside the commands: every `vkr` command
imports this module at start-up.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from vkr_core.hookspecs import hookimpl


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


class _Progress:
    """A one-line progress report on stderr, at most every few seconds."""

    def __init__(self, label: str, every: float = 2.0):
        self.label = label
        self.every = every
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= self.every:
            self.last = now
            click.echo(f"{self.label}: {done}/{total} videos", err=True)


def _default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@click.group(invoke_without_command=True)
@click.option(
    "--train",
    type=click.Path(exists=True, path_type=Path),
    help="Training videos: a directory (id = file stem) or a jsonl manifest (video_id, path).",
)
@click.option(
    "--bench",
    type=click.Path(exists=True, path_type=Path),
    help="Benchmark videos: a directory or a jsonl manifest.",
)
@click.option(
    "--bench-ids",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    multiple=True,
    help="Benchmark YouTube id list (one id or URL per line, '#' comments). Repeatable.",
)
@click.option(
    "--train-ids-from",
    type=click.Choice(["auto", "youtube_id", "video_id"]),
    default="auto",
    show_default=True,
    help="Manifest field with a training video's YouTube id (auto: youtube_id, else video_id).",
)
@click.option(
    "--preset",
    type=click.Choice(["default", "paper"]),
    default="default",
    show_default=True,
    help="default: calibrated thresholds; paper: the paper's (flags unrelated videos).",
)
@click.option("--hash-bits", type=click.Choice(["64", "256"]), help="pHash size.")
@click.option(
    "--distance",
    type=click.IntRange(0, 256),
    help="Largest Hamming distance of a matching frame pair (at most the hash size).",
)
@click.option(
    "--share",
    type=click.FloatRange(0, 1, min_open=True),
    help="Share of a window's frames that must match (0-1].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Report directory: removed.jsonl, kept.txt, failed.jsonl, report.json.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where video hashes are cached [default: $VKR_CACHE_DIR or ~/.cache/vkr].",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=0),
    default=None,
    help="Decoder processes (0: decode in this process) [default: CPUs, at most 4].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds one video may take to decode before it is reported as failed.",
)
@click.pass_context
def decontam(
    ctx: click.Context,
    train: Path | None,
    bench: Path | None,
    bench_ids: tuple[Path, ...],
    train_ids_from: str,
    preset: str,
    hash_bits: str | None,
    distance: int | None,
    share: float | None,
    out: Path | None,
    cache_dir: Path | None,
    jobs: int | None,
    timeout: float,
) -> None:
    """Remove training videos that are in a benchmark or near-copies of a benchmark video.

    Writes removed.jsonl (id, reason "benchmark-id" or "near-duplicate", evidence),
    kept.txt and failed.jsonl into --out, and prints a summary.
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [name for name, value in (("--train", train), ("--out", out)) if value is None]
    if missing:
        raise click.UsageError(f"missing option(s): {', '.join(missing)}")
    if bench is None and not bench_ids:
        raise click.UsageError("give --bench (benchmark videos) and/or --bench-ids (id lists)")
    assert train is not None and out is not None

    from corpus import decontam as dc
    from vkr_core.schemas import VkrError

    try:
        params = dc.resolve_params(preset, int(hash_bits) if hash_bits else None, distance, share)
        train_videos = dc.read_video_list(train, ids_from=train_ids_from)  # type: ignore[arg-type]
        bench_videos = dc.read_video_list(bench, check_ids=False) if bench else []
        ids = dc.read_benchmark_ids(bench_ids)
        for problem in ids.problems:
            click.echo(
                f"warning: {problem.file}:{problem.line}: skipped {problem.text.strip()!r}: "
                f"{problem.reason}",
                err=True,
            )
        report = dc.run_decontam(
            train_videos,
            bench_videos,
            ids,
            params,
            preset=preset,
            cache_dir=cache_dir or dc.default_cache_dir(),
            jobs=_default_jobs() if jobs is None else jobs,
            timeout=timeout,
            progress=_Progress("hashing"),
        )
        files = dc.write_report(report, out)
    except VkrError as exc:
        raise _fail(exc) from None
    counts = report.counts()
    click.echo(
        f"rule: {params.hash_bits}-bit pHash, distance <= {params.distance}, "
        f"share >= {params.share:g} of a {params.window_s} s window (preset {preset})"
    )
    click.echo(f"index: {report.index}")
    click.echo(
        f"training videos: {counts['training']}  kept: {counts['kept']}  "
        f"removed: {counts['removed_benchmark_id']} benchmark-id, "
        f"{counts['removed_near_duplicate']} near-duplicate  "
        f"failed: {counts['failed_training']}"
    )
    click.echo(
        f"benchmark: {report.benchmark_videos} videos ({counts['failed_benchmark']} failed), "
        f"{report.benchmark_ids} ids"
        + (f" ({len(report.id_list_problems)} lines skipped)" if report.id_list_problems else "")
    )
    if report.unchecked:
        click.echo(
            f"unchecked (under {params.min_frames} informative seconds, kept): "
            f"{len(report.unchecked)}"
        )
    for failure in report.failed:
        click.echo(f"failed ({failure.role}) {failure.video_id}: {failure.error}", err=True)
    click.echo(
        f"hashed {report.hashed} videos, {report.from_cache} from cache, {report.seconds:.1f} s"
    )
    if report.cache_write_failures:
        click.echo(
            f"warning: {report.cache_write_failures} hashes could not be written to the cache "
            f"({cache_dir or dc.default_cache_dir()}): the next run decodes them again",
            err=True,
        )
    click.echo(f"report: {files['removed'].parent}")


def _format_table(result: Any) -> list[str]:
    shares = sorted({p.share for p in result.points})
    lines = [
        "false-positive rate / recall per (hash bits, distance) and share threshold:",
        "bits  dist  " + "  ".join(f"{'share ' + format(s, 'g'):>13}" for s in shares),
    ]
    rows: dict[tuple[int, int], dict[float, Any]] = {}
    for p in result.points:
        rows.setdefault((p.hash_bits, p.distance), {})[p.share] = p
    for (bits, distance), by_share in sorted(rows.items()):
        cells = [
            f"{by_share[s].false_positive_rate:>6.3f}/{by_share[s].recall:<6.3f}" for s in shares
        ]
        lines.append(
            (f"{bits:>4}  {distance:>4}  " + "  ".join(f"{c:>13}" for c in cells)).rstrip()
        )
    return lines


def _describe_point(name: str, p: Any) -> str:
    by_transform = ", ".join(f"{t} {r:.2f}" for t, r in p.recall_by_transform.items())
    return (
        f"{name}: {p.hash_bits} bits, distance {p.distance}, share {p.share:g}: "
        f"false positives {p.false_positives}/{p.unrelated_pairs} "
        f"({p.false_positive_rate:.3f}), recall {p.caught}/{p.copies} ({p.recall:.3f}; "
        f"{by_transform})"
    )


@decontam.command()
@click.option(
    "--videos",
    type=click.Path(exists=True, path_type=Path),
    multiple=True,
    required=True,
    help="Unrelated videos (directory or manifest; repeatable): every pair must differ.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the full measurement (every grid point) as JSON.",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the transformed copies here [default: a temporary directory].",
)
@click.option(
    "--max-fpr",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Highest false-positive rate a recommended rule may have.",
)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--jobs", type=click.IntRange(min=0), default=None)
def calibrate(
    videos: tuple[Path, ...],
    out: Path | None,
    work_dir: Path | None,
    max_fpr: float,
    cache_dir: Path | None,
    jobs: int | None,
) -> None:
    """Measure false positives on unrelated pairs and recall on transformed copies.

    Copies: re-encoded at a low bitrate, resized to half, 5 % cropped on every side,
    brightness +40. Prints a table and the recommended --hash-bits/--distance/--share.
    """
    from corpus import decontam as dc
    from vkr_core.schemas import VkrError

    try:
        entries = []
        seen: set[str] = set()
        for source in videos:
            for entry in dc.read_video_list(source, check_ids=False):
                if entry.video_id in seen:
                    raise VkrError(f"{entry.path}: video id {entry.video_id!r} given twice")
                seen.add(entry.video_id)
                entries.append(entry)
        with tempfile.TemporaryDirectory(prefix="vkr-calibrate-") as scratch:
            result = dc.calibrate(
                entries,
                work_dir or Path(scratch),
                cache_dir=cache_dir or dc.default_cache_dir(),
                jobs=_default_jobs() if jobs is None else jobs,
                max_false_positive_rate=max_fpr,
                progress=lambda message: click.echo(message, err=True),
            )
    except VkrError as exc:
        raise _fail(exc) from None
    for video_id, reason in result.skipped.items():
        click.echo(f"skipped {video_id}: {reason}", err=True)
    pairs = len(result.videos) * (len(result.videos) - 1)
    click.echo(
        f"{len(result.videos)} videos: {pairs} unrelated (ordered) pairs, "
        f"{len(result.videos) * len(result.transforms)} copies ({', '.join(result.transforms)})"
    )
    for line in _format_table(result):
        click.echo(line)
    for name, point in result.presets.items():
        click.echo(_describe_point(f"preset {name}", point))
    for label, probability in result.chance_match_probability.items():
        click.echo(f"chance that two random hashes match, {label}: {probability:.3g}")
    if result.recommended is None:
        click.echo(f"no rule keeps the false-positive rate at or below {max_fpr:g}")
    else:
        p = result.recommended
        click.echo(_describe_point("recommended", p))
        click.echo(f"use: --hash-bits {p.hash_bits} --distance {p.distance} --share {p.share:g}")
    if out is not None:
        from vkr_core.files import atomic_write

        atomic_write(out, result.model_dump_json(indent=2) + "\n")
        click.echo(f"written: {out}")
    sys.stdout.flush()


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(decontam)
