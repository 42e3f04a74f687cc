"""Pipelines are plugins: the engine runs any registered pipeline, a third party's included.

The glossary pipeline (tests/third_party/vkr_glossary) is installed with pip into a site
directory of its own, found through the `vkr` entry point group, and run from the command
line against the fake model server: a text step with no video, through the same caller,
cache, router and run directory as generation.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
from pathlib import Path

import pytest
from plugin_packages import REPO, THIRD_PARTY, VKR, install, run_vkr

from vkr_core.plugins import get_plugin_manager


@pytest.fixture(scope="module")
def glossary_site(tmp_path_factory) -> Path:
    return install(tmp_path_factory.mktemp("glossary-site"), THIRD_PARTY / "vkr_glossary")


@pytest.fixture
def glossary_pm(glossary_site, monkeypatch):
    monkeypatch.syspath_prepend(str(glossary_site))
    module = importlib.import_module("vkr_glossary")
    return get_plugin_manager(extra_plugins=[module], load_entry_points=False)


def test_a_third_party_pipeline_with_a_text_step_runs_from_the_cli(
    glossary_site, glossary_pm, vkr_fake_server, tmp_path
):
    from plugins.providers.fake_server import write_pool

    pool = write_pool(
        tmp_path / "pool.yaml",
        vkr_fake_server.base_url,
        registry_path=tmp_path / "eligibility.yaml",
        pm=glossary_pm,
    )
    terms = tmp_path / "terms.jsonl"
    rows = [
        {"item_id": "t1", "term": "entropy", "definition": "a measure of disorder"},
        {"item_id": "t2", "term": "mitosis", "definition": "cell division"},
        {"item_id": "t3", "term": "torque"},
    ]
    terms.write_text(
        "\n".join(json.dumps(r) for r in rows) + '\n{"item_id": "t4"}\n', encoding="utf-8"
    )
    listed = run_vkr([glossary_site], "plugins")
    assert "glossary (third-party)  pipelines: glossary; steps: classify_term" in listed.stdout

    out = tmp_path / "run"
    args = ("run", "--pipeline", "glossary", "--inputs", str(terms), "--pool", str(pool))
    first = run_vkr([glossary_site], *args, "--out", str(out), "--no-progress")
    # The bad line is reported and recorded; the three good terms are classified.
    assert first.returncode == 3, first.stderr
    assert "term: Field required" in first.stderr
    assert "glossary: 3 term(s) classified, 0 failed" in first.stdout
    assert "1 term(s) failed" in first.stdout
    for row in rows:
        record = json.loads((out / "records" / f"{row['item_id']}.json").read_text())
        assert record["status"] == "done" and record["output"]["answer"]
    calls = [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]
    assert {c["step"] for c in calls} == {"classify_term"} and len(calls) == 3
    # The term reached the model fenced as data, never as instructions.
    texts = [t for r in vkr_fake_server.received("classify_term") for t in r.texts]
    assert any('<untrusted-data name="term">\nentropy\n</untrusted-data>' in t for t in texts)
    assert vkr_fake_server.stats()["by_step"] == {"classify_term": 3}

    # The engine's cache serves a second run: nothing is paid twice.
    again = run_vkr([glossary_site], *args, "--out", str(out), "--no-progress")
    assert again.returncode == 3, again.stderr
    assert vkr_fake_server.stats()["by_step"] == {"classify_term": 3}


def test_an_unknown_pipeline_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [
            VKR,
            "run",
            "--pipeline",
            "nope",
            "--inputs",
            str(tmp_path / "x.jsonl"),
            "--pool",
            str(tmp_path / "pool.yaml"),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "no pipeline named 'nope' is loaded (loaded: " in result.stderr
    assert "generation" in result.stderr.split("loaded: ")[1]
    assert "Traceback" not in result.stderr


ENGINE = REPO / "vkr_core"


def _engine_sources() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(ENGINE.glob("*.py"))}


def test_the_engine_imports_no_graph_plugin_or_application():
    offenders = []
    for path, text in _engine_sources().items():
        for node in ast.walk(ast.parse(text)):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in {"graphs", "plugins", "corpus", "qualification", "cli"}:
                    offenders.append(f"{path.name}:{node.lineno} imports {name}")
    assert offenders == []


def test_the_engine_names_no_concrete_step_or_skill():
    """Every step and skill the built-ins register, searched for in vkr_core's source."""
    registry = get_plugin_manager(load_entry_points=False).registry
    names = (
        set(registry.steps)
        | set(registry.skills)
        | {module for module in ("plugins.readers", "plugins.skills", "plugins.steps")}
    )
    found = []
    for path, text in _engine_sources().items():
        for name in sorted(names):
            for match in re.finditer(rf"(?<![\w.]){re.escape(name)}(?![\w])", text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.name}:{line} names {name}")
    assert found == []


def _plugin_imports(text: str) -> list[tuple[int, str]]:
    """Every ``import plugins...`` / ``from plugins... import``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(text)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found += [(node.lineno, name) for name in names if name.split(".")[0] == "plugins"]
    return found


def test_graphs_reach_plugins_through_the_registry_never_by_import():
    """A graph gets its steps, sources and providers from the registry (DESIGN.md), so a
    third party's plugin can stand in for a built-in one; a lazy import inside a function
    counts as much as one at the top of the module."""
    graphs = sorted((REPO / "graphs").glob("*.py"))
    assert graphs, "no graphs found"
    offenders = [
        f"graphs/{path.name}:{line} imports {name}"
        for path in graphs
        for line, name in _plugin_imports(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_a_collection_from_a_source_that_cannot_search_is_a_one_line_error(tmp_path):
    """The collection takes its source from the registry by name: one that only reads a
    folder (``local``) stops it before the bank is even read, and so does an unknown name."""
    from graphs.collection import collect
    from vkr_core.schemas import VkrError

    with pytest.raises(VkrError, match=r"^source 'local' cannot search and download videos$"):
        collect(tmp_path / "bank.yaml", tmp_path / "pool.yaml", tmp_path / "out", source="local")
    with pytest.raises(VkrError, match=r"no source named 'vimeo' is loaded"):
        collect(tmp_path / "bank.yaml", tmp_path / "pool.yaml", tmp_path / "out", source="vimeo")
    assert not (tmp_path / "out").exists()
