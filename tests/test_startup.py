"""Start-up of `vkr` commands: a command imports what it uses, not what every plugin could use.

Every command loads every plugin, so a plugin that imports its heavy dependencies at load
makes each `vkr` call pay for them (the fake model server's aiohttp.web, a model client, the
log renderer). Each check runs the real CLI in its own interpreter and reads which modules
it imported: a fact about the process, not a timing, so a loaded machine cannot flake it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# The CLI as the `vkr` script runs it, then the imported module names on the last line.
# atexit: click ends every command with SystemExit, whatever its outcome.
_PROBE = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: print('MODULES ' + json.dumps(sorted(sys.modules)), flush=True))\n"
    "sys.argv = ['vkr', *json.loads(sys.argv[1])]\n"
    "import cli\n"
    "cli.main()\n"
)

# The fake model server and what only it needs: tests and `vkr dev fake-server` use it.
FAKE_SERVER = {
    "plugins.providers.fake_server",
    "plugins.providers.fake_protocols",
    "plugins.providers.fake_policy",
    "aiohttp",
    "aiohttp.web",
}
# Model clients: imported by the first model call, never by a command that makes none.
MODEL_CLIENTS = {"litellm", "openai"}
# The log renderer: only a command that configures logging needs it.
LOGGING = {"structlog", "structlog.dev"}
# The graph engine: only a command that runs a graph needs it.
GRAPHS = {"langgraph", "langgraph.graph", "langchain_core"}
# Frame decoding: the decoder processes (and read_frames) sample, resize and encode frames;
# a command's own process needs only the JPEG files they wrote.
DECODING = {"numpy", "PIL", "PIL.Image", "plugins.readers_impl"}
# A report draws its chart (report.png) with Pillow: that is the command's own output.
DECODING_BUT_THE_CHART = DECODING - {"PIL", "PIL.Image"}


def imported_by(*args: object, env: dict[str, str] | None = None) -> tuple[set[str], str]:
    """The modules `vkr ARGS` imported, and what it printed before them."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([str(a) for a in args])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    printed, _, modules = result.stdout.rpartition("MODULES ")
    assert result.returncode == 0, printed + result.stderr
    return set(json.loads(modules)), printed


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> dict[str, Any]:
    """A run directory whose one video is done, made by `vkr run` against the fake server;
    the server is stopped before any test, so a rerun that reached for it would fail."""
    from plugins.providers.fake_server import FakeModelServer, write_pool
    from vkr_core.plugins import get_plugin_manager

    root = tmp_path_factory.mktemp("startup")
    shutil.copy(testdata / "flipping_a_pancake.mkv", root / "pancake.mkv")
    manifest = root / "manifest.jsonl"
    entry = {
        "video_id": "pancake",
        "path": "pancake.mkv",
        "discipline": "cooking",
        "subject": "batter cookery",
        "knowledge_point": "Maillard reaction",
        "title": "Flipping a pancake",
    }
    manifest.write_text(json.dumps(entry) + "\n")
    server = FakeModelServer(seed=0)
    base_url = server.start()
    env = {**os.environ, "VKR_FAKE_API_KEY": "fake-key-for-startup"}
    try:
        server.set_policy(
            {
                "steps": {
                    "self_consistency": {"accuracy": 1.0},
                    "video_dependency": {"accuracy": 0.0},
                    "cot_verification": {"cot_pass": 1.0},
                }
            }
        )
        pool = write_pool(root / "pool.yaml", base_url, pm=get_plugin_manager())
        args = ["run", "--videos", manifest, "--pool", pool, "--out", root / "run"]
        args += ["--no-progress"]
        imported_by(*args, env=env)  # the first run, which does the work
    finally:
        server.stop()
    # As the throughput bench times it: preflight asks each model, so it needs the server.
    return {"args": [*args, "--skip-preflight"], "run_dir": root / "run", "env": env}


@pytest.mark.parametrize("args", [["--help"], ["plugins"]], ids=["help", "plugins"])
def test_commands_that_call_no_model_import_no_server_client_or_logging(args: list[str]) -> None:
    modules, printed = imported_by(*args)
    assert "report" in printed and "run" in printed  # the commands are all there
    assert not modules & FAKE_SERVER, sorted(modules & FAKE_SERVER)
    assert not modules & MODEL_CLIENTS, sorted(modules & MODEL_CLIENTS)
    assert not modules & LOGGING, sorted(modules & LOGGING)
    assert not modules & DECODING, sorted(modules & DECODING)


def test_report_imports_no_server_client_or_logging(finished_run: dict[str, Any]) -> None:
    modules, printed = imported_by("report", finished_run["run_dir"])
    assert "accepted" in printed
    assert not modules & FAKE_SERVER, sorted(modules & FAKE_SERVER)
    assert not modules & MODEL_CLIENTS, sorted(modules & MODEL_CLIENTS)
    assert not modules & LOGGING, sorted(modules & LOGGING)
    assert not modules & DECODING_BUT_THE_CHART, sorted(modules & DECODING_BUT_THE_CHART)


def test_rerun_of_a_finished_directory_imports_no_server_or_client(
    finished_run: dict[str, Any],
) -> None:
    modules, printed = imported_by(*finished_run["args"], env=finished_run["env"])
    assert "videos: 1 done, 0 failed" in printed
    assert not modules & FAKE_SERVER, sorted(modules & FAKE_SERVER)
    assert not modules & MODEL_CLIENTS, sorted(modules & MODEL_CLIENTS)
    # It decodes nothing (its frames are on disk) but rewrites the report, chart included.
    assert not modules & DECODING_BUT_THE_CHART, sorted(modules & DECODING_BUT_THE_CHART)


def test_commands_that_run_no_graph_import_no_graph_engine(finished_run: dict[str, Any]) -> None:
    for args in (["--help"], ["report", finished_run["run_dir"]]):
        modules, _ = imported_by(*args)
        assert not modules & GRAPHS, (args, sorted(modules & GRAPHS))


def test_the_fake_server_command_still_serves_its_help() -> None:
    modules, printed = imported_by("dev", "fake-server", "--help")
    for words in ("OpenAI chat completions", "Anthropic Messages", "Gemini generateContent"):
        assert words in printed
    # Its help is the command's own: asking for it starts no server.
    assert "aiohttp.web" not in modules
