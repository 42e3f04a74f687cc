"""Third-party vkr plugins really installed with pip (offline), and `vkr` run against them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THIRD_PARTY = REPO / "tests" / "third_party"
VKR = str(Path(sys.executable).parent / "vkr")


def write_package(root: Path, module: str, entry_point: str, source: str) -> Path:
    """A one-module distribution ``module`` (dashes for underscores) with a ``vkr`` entry point."""
    package = root / module
    package.mkdir(parents=True)
    (package / f"{module}.py").write_text(textwrap.dedent(source))
    (package / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{module.replace("_", "-")}"
            version = "0.1.0"

            [project.entry-points.vkr]
            {entry_point} = "{module}"

            [tool.setuptools]
            py-modules = ["{module}"]
            """
        )
    )
    return package


def install(target: Path, *packages: Path) -> Path:
    """pip-install ``packages`` into the site directory ``target`` (no network, no deps)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            *map(str, packages),
        ],
        check=True,
    )
    return target


def run_vkr(
    sites: list[Path], *args: str, load_plugins: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``vkr ARGS`` in a fresh process that sees the plugins installed in ``sites``."""
    # Sites first; a PYTHONPATH already set (e.g. to test another checkout) still applies.
    paths = [*map(str, sites), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    env.pop("VKR_LOAD_PLUGINS", None)
    if load_plugins is not None:
        env["VKR_LOAD_PLUGINS"] = load_plugins
    return subprocess.run(
        [VKR, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
