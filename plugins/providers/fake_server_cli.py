"""``vkr dev fake-server``: the command that serves :mod:`plugins.providers.fake_server`.

The built-in plugin ``plugins.providers.fake_server`` is this module, not the server's own:
every `vkr` command loads every plugin, and the server (aiohttp.web, its protocols and
policy) cost ~0.17 s of each start-up that only this command and the tests use.
"""

from __future__ import annotations

import sys
from typing import Any

from vkr_core.hookspecs import hookimpl


@hookimpl
def vkr_register_commands(cli: Any) -> None:
    import click

    dev = cli.commands.get("dev")
    if dev is None:

        @cli.group("dev")
        def dev_group() -> None:
            """Developer tools: local fakes for testing plugins and pipelines."""

        dev = dev_group

    @dev.command("fake-server")
    @click.option("--host", default="127.0.0.1", show_default=True, help="loopback address only")
    @click.option(
        "--port",
        type=click.IntRange(0, 65535),
        default=0,
        show_default=True,
        help="0 picks a free port",
    )
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option(
        "--policy", "policy_file", type=click.Path(dir_okay=False), help="policy YAML/JSON file"
    )
    @click.option(
        "--write-pool",
        "pool_file",
        type=click.Path(dir_okay=False),
        help="write a pool YAML (and its registry) pointing at this server",
    )
    @click.option(
        "--protocol",
        "protocol_choices",
        multiple=True,
        metavar="MODEL=PROTOCOL",
        help="in the written pool, reach MODEL over openai (default), anthropic or gemini; "
        "repeatable, e.g. --protocol fake-b=anthropic",
    )
    def fake_server(
        host: str,
        port: int,
        seed: int,
        policy_file: str | None,
        pool_file: str | None,
        protocol_choices: tuple[str, ...],
    ) -> None:
        """Serve scripted models on loopback until Ctrl-C.

        One port speaks three protocols: OpenAI chat completions (POST /v1/chat/completions),
        Anthropic Messages (POST /v1/messages; litellm's api_base is the server root) and
        Gemini generateContent (POST /v1/models/MODEL:generateContent).
        """
        from plugins.providers.fake_server import PROTOCOLS, _is_loopback, serve_forever
        from vkr_core.schemas import VkrError

        if not _is_loopback(host):
            raise click.BadParameter(
                f"{host!r} is not a loopback address; the fake server listens on "
                "127.0.0.1, ::1 or localhost only",
                param_hint="--host",
            )
        protocols: dict[str, str] = {}
        for choice in protocol_choices:
            name, sep, protocol = choice.partition("=")
            if not sep or not name or protocol not in PROTOCOLS:
                raise click.BadParameter(
                    f"{choice!r} is not MODEL=PROTOCOL with PROTOCOL one of {', '.join(PROTOCOLS)}",
                    param_hint="--protocol",
                )
            protocols[name] = protocol
        if protocols and not pool_file:
            raise click.BadParameter("needs --write-pool", param_hint="--protocol")
        try:
            serve_forever(
                host,
                port,
                seed,
                policy_file,
                pool_file,
                echo=_echo_flush,
                protocols=protocols,
            )
        except VkrError as exc:
            raise click.ClickException(str(exc)) from None


def _echo_flush(message: str) -> None:
    import click

    click.echo(message)
    # stdout may be a pipe (tests, scripts waiting for the URL): do not let it sit in a buffer.
    sys.stdout.flush()
