"""The `vkr` root command. Every other command comes from a plugin's
``vkr_register_commands`` (the built-ins' included), loaded when click first asks for one."""

from __future__ import annotations

import os

# litellm fetches its cost map over the network at import unless told not to.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import json  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402


class VkrGroup(click.Group):
    """The root group: vkr's own errors, from any command or plugin, become a one-line
    message (secrets redacted) and exit code 1 instead of a traceback. Its commands are the
    plugins' (``vkr_register_commands``), added the first time click looks one up."""

    _loaded = False
    # The manager that registered the commands, handed to the first invocation: loading
    # the plugins is most of a command's start-up, so a process pays it once. Later
    # invocations in the same process (tests) load afresh, as installed plugins may differ.
    _unused_pm: Any = None

    def load_plugin_commands(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        from vkr_core.plugins import get_plugin_manager

        pm = get_plugin_manager()
        pm.hook.vkr_register_commands(cli=self)
        self._unused_pm = pm

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self.load_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        from cli_options import PLUGIN_MANAGER_KEY
        from vkr_core.log import redact
        from vkr_core.schemas import VkrError

        try:
            self.load_plugin_commands()
            pm, self._unused_pm = self._unused_pm, None
            if pm is not None:
                ctx.meta[PLUGIN_MANAGER_KEY] = pm
            return super().invoke(ctx)
        except VkrError as exc:
            raise click.ClickException(redact(str(exc))) from None


@click.group(cls=VkrGroup)
@click.version_option(package_name="vkr")
def cli() -> None:
    """vkr: verified video question-answer training data with chain-of-thought."""


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_command(as_json: bool) -> None:
    """List loaded plugins and what each registers."""
    from cli_options import plugin_manager
    from vkr_core.plugins import describe

    rows = describe(plugin_manager())
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        kind = "built-in" if row["builtin"] else "third-party"
        registers = "; ".join(f"{k}: {', '.join(v)}" for k, v in row["registers"].items())
        click.echo(f"{row['name']} ({kind})" + (f"  {registers}" if registers else ""))
        click.echo(f"    hooks: {', '.join(row['hooks'])}")


def main() -> None:
    from vkr_core.log import redact
    from vkr_core.schemas import VkrError

    try:
        # Here, not inside click: a plugin that fails to load gets the one-line message
        # even for `vkr --help`.
        cli.load_plugin_commands()  # type: ignore[attr-defined]
    except VkrError as exc:
        click.ClickException(redact(str(exc))).show()
        sys.exit(1)
    cli()


if __name__ == "__main__":
    main()
