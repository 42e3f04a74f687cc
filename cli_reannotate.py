"""`vkr reannotate`: experts write new grounded questions on probe-filtered eval videos.

Imported by cli.py at every start: library imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vkr_core.hookspecs import hookimpl

_DIR = click.Path(file_okay=False, path_type=Path)


@click.group()
def reannotate() -> None:
    """Re-annotate the evaluation questions `vkr probe` filtered (single-frame-solvable)."""


@reannotate.command()
@click.argument("probe_out", type=_DIR)
@click.option("--out", "out_dir", required=True, type=_DIR, help="Folder of reannotations.sqlite.")
@click.option("--port", default=8761, show_default=True, help="Port on 127.0.0.1 (0: any free).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Loopback only.")
@click.option("--annotator", help="Your name, recorded with every item you write.")
@click.option(
    "--frames-dir",
    type=_DIR,
    help="Where the probe's frames are [default: the probe's --frames-dir as PROBE_OUT "
    "recorded it, else PROBE_OUT/frames].",
)
def serve(
    probe_out: Path,
    out_dir: Path,
    port: int,
    host: str,
    annotator: str | None,
    frames_dir: Path | None,
) -> None:
    """Serve the re-annotation page for PROBE_OUT's filtered questions until Ctrl-C."""
    from experts.reannotate import ReannotateServer

    server = ReannotateServer(
        probe_out, out_dir, host=host, port=port, annotator=annotator, frames_dir=frames_dir
    )
    click.echo(f"reannotate {probe_out}: open {server.url}")
    click.echo(f"items are saved to {out_dir} as you write them; press Ctrl-C to stop")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@reannotate.command("export")
@click.argument("reannotations", type=_DIR)
@click.option(
    "--probe", "probe_out", required=True, type=_DIR, help="The `vkr probe` output folder."
)
@click.option("--out", "out_dir", required=True, type=_DIR, help="Folder for VideoKR_eval.jsonl.")
@click.option(
    "--include-pending",
    is_flag=True,
    help="Export the new questions no second annotator has approved yet too "
    '(their provenance says status "pending").',
)
def export_command(
    reannotations: Path, probe_out: Path, out_dir: Path, include_pending: bool
) -> None:
    """Merge the probe's kept questions and the approved new ones into an eval file `vkr probe`
    reads."""
    from experts.reannotate import export

    done = export(reannotations, probe_out, out_dir, include_pending=include_pending)
    pending = f", {done.pending} of them pending review" if include_pending and done.pending else ""
    click.echo(f"wrote {done.path}: {done.kept} kept + {done.new} re-annotated questions{pending}")
    if done.pending and not include_pending:
        click.echo(
            f"note: {done.pending} new question(s) pending review are not in it (a second "
            "annotator approves them in `vkr reannotate serve`; --include-pending exports "
            "them too)",
            err=True,
        )
    if done.unprobed:
        click.echo(
            f"note: {done.unprobed} question(s) the probe could not read are not in it "
            f"(see {probe_out}/unprobed.jsonl; probe them again once their videos are fixed)",
            err=True,
        )


_FORMAT = click.Choice(["labelstudio", "argilla"])


@reannotate.command()
@click.argument("probe_out", type=_DIR)
@click.option("--format", "fmt", required=True, type=_FORMAT, help="Labelling tool.")
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Label Studio: tasks JSON file (config .xml beside it). Argilla: an empty folder.",
)
@click.option(
    "--frame-url-prefix",
    default="",
    help="Put before each frame's path under the probe's frames folder, e.g. Label Studio's "
    "'/data/local-files/?d=frames/'.",
)
@click.option("--frames-dir", type=_DIR, help="Where the probe's frames are (as for serve).")
@click.option(
    "--reannotations",
    type=_DIR,
    help="The re-annotation folder (serve's --out): each written question's current item goes "
    "into its task for review (Label Studio: a prediction; Argilla: suggestions).",
)
def tasks(
    probe_out: Path,
    fmt: str,
    out: Path,
    frame_url_prefix: str,
    frames_dir: Path | None,
    reannotations: Path | None,
) -> None:
    """Write PROBE_OUT's filtered questions for Label Studio or Argilla to re-annotate (or
    review) there."""
    from experts.reannotate_interchange import write_argilla, write_tasks

    if fmt == "labelstudio":
        paths = list(write_tasks(probe_out, out, frame_url_prefix, frames_dir, reannotations))
    else:
        paths = write_argilla(probe_out, out, frame_url_prefix, frames_dir, reannotations)
    click.echo("wrote " + ", ".join(str(p) for p in paths))


@reannotate.command("import")
@click.argument("reannotations", type=_DIR)
@click.option(
    "--probe", "probe_out", required=True, type=_DIR, help="The `vkr probe` output folder."
)
@click.option("--format", "fmt", required=True, type=_FORMAT, help="Labelling tool.")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(path_type=Path),
    help="Label Studio's JSON export, or Argilla's to_disk folder (or its records.json).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Save items over questions changed since the tasks were written (history is kept).",
)
def import_command(
    reannotations: Path, probe_out: Path, fmt: str, source: Path, overwrite: bool
) -> None:
    """Read items written in Label Studio or Argilla into REANNOTATIONS, checked as the page
    checks them."""
    from experts.reannotate_interchange import import_labels

    done = import_labels(reannotations, probe_out, fmt, source, overwrite)
    click.echo(
        f"imported: {done.written} written, {done.changed} edited or revised, "
        f"{done.approved} approved, {done.unchanged} unchanged"
    )


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    cli.add_command(reannotate)
