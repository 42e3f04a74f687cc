"""`vkr audit`: sample a run's or split's accepted examples, label them, score, drop flagged.

Imported by cli.py at every start: library imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vkr_core.hookspecs import hookimpl

_DIR = click.Path(file_okay=False, path_type=Path)


class _AuditGroup(click.Group):
    """`vkr audit SOURCE ...` is `vkr audit sample SOURCE ...`: the common case stays short."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["sample", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_AuditGroup)
def audit() -> None:
    """Audit accepted examples: `vkr audit RUN_DIR|SPLIT_DIR --out AUDIT_DIR`, then
    `review`, `score` and `drop`."""


@audit.command()
@click.argument("source", type=_DIR)
@click.option("--out", required=True, type=_DIR, help="Folder for the audit (must be new).")
@click.option("--n", "n", default=800, show_default=True, help="Examples to sample.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same sample.")
def sample(source: Path, out: Path, n: int, seed: int) -> None:
    """Sample N accepted examples of SOURCE (a run directory or a split), stratified by
    skill and generation model."""
    from experts.audit import create_audit

    manifest = create_audit(source, out, n=n, seed=seed)
    click.echo(
        f"sampled {manifest.sampled} of {manifest.population} accepted examples from "
        f"{len(manifest.strata)} strata (skill | generation model) into {out}"
    )
    if manifest.excluded_unfinished:
        click.echo(f"left out {len(manifest.excluded_unfinished)} unfinished video(s)", err=True)
    click.echo(f"next: vkr audit review {out}")


@audit.command()
@click.argument("audit_dir", type=_DIR)
@click.option("--port", default=8761, show_default=True, help="Port on 127.0.0.1 (0: any free).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback only.")
@click.option("--annotator", help="Your name, recorded with every label you give.")
def review(audit_dir: Path, port: int, host: str, annotator: str | None) -> None:
    """Serve the audit page for AUDIT_DIR on 127.0.0.1 until Ctrl-C."""
    from experts.audit_review import AuditServer

    server = AuditServer(audit_dir, host=host, port=port, annotator=annotator)
    click.echo(f"audit {audit_dir}: open {server.url}")
    click.echo("labels are saved as you give them; press Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


_ADJUDICATOR = click.option(
    "--adjudicator",
    help="An annotator whose label, where given, is the example's verdict (settles disputes).",
)


@audit.command()
@click.argument("audit_dir", type=_DIR)
@_ADJUDICATOR
def score(audit_dir: Path, adjudicator: str | None) -> None:
    """Rate of each label with Wilson 95 % intervals: the population estimate (weighted by
    stratum), per skill and per model; the annotators' agreement."""
    from experts.audit import score_markdown, write_score

    data, paths = write_score(audit_dir, adjudicator)
    click.echo(score_markdown(data), nl=False)
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@audit.command()
@click.argument("audit_dir", type=_DIR)
@click.option("--split", "split_dir", required=True, type=_DIR, help="The split to clean.")
@_ADJUDICATOR
def drop(audit_dir: Path, split_dir: Path, adjudicator: str | None) -> None:
    """Remove the flagged examples (any annotator's flag, unless the adjudicator said ok)
    from SPLIT's sft.jsonl and rl.jsonl."""
    from experts.audit import drop_flagged

    removed, manifest = drop_flagged(audit_dir, split_dir, adjudicator)
    click.echo(
        f"removed {len(removed)} flagged example(s) from {split_dir}; "
        f"SFT: {manifest.sft.examples}, RL: {manifest.rl.examples} left"
    )


_FORMAT = click.Choice(["labelstudio", "argilla"])


@audit.command("export")
@click.argument("audit_dir", type=_DIR)
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
    help="Put before each frame's path, e.g. /data/local-files/?d= for Label Studio.",
)
def export_command(audit_dir: Path, fmt: str, out: Path, frame_url_prefix: str) -> None:
    """Write AUDIT_DIR's sampled examples for Label Studio or Argilla."""
    from experts.audit_interchange import export_labels

    for path in export_labels(audit_dir, fmt, out, frame_url_prefix):
        click.echo(f"wrote {path}")


@audit.command("import")
@click.argument("audit_dir", type=_DIR)
@click.argument("labels", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, type=_FORMAT, help="Labelling tool.")
@click.option("--overwrite", is_flag=True, help="Replace differing stored labels (history kept).")
def import_command(audit_dir: Path, labels: Path, fmt: str, overwrite: bool) -> None:
    """Store the labels of a Label Studio JSON export or an Argilla export (folder or
    records.json) in AUDIT_DIR; all or nothing."""
    from experts.audit_interchange import import_labels

    report = import_labels(audit_dir, fmt, labels, overwrite=overwrite)
    click.echo(
        f"imported labels of {', '.join(report.annotators) or 'nobody'}: {report.created} new, "
        f"{report.changed} changed, {report.unchanged} unchanged"
    )


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(audit)
