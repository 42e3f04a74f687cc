"""The plugin system: built-ins load like third-party plugins, duplicates fail, hooks documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vkr_core import hookspecs
from vkr_core.hookspecs import hookimpl
from vkr_core.plugins import PluginError, builtin_plugins, get_plugin_manager
from vkr_core.schemas import SkillSpec

REPO = Path(__file__).resolve().parents[1]
VKR = str(Path(sys.executable).parent / "vkr")


def test_every_hook_is_documented_in_the_readme():
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^#### `(vkr_\w+)\(", readme, re.MULTILINE))
    specs = {name for name in dir(hookspecs) if name.startswith("vkr_")}
    assert specs, "no hookspecs found"
    assert specs - documented == set(), f"hooks missing from the README: {specs - documented}"
    assert documented - specs == set(), (
        f"README documents hooks that do not exist: {documented - specs}"
    )


def test_builtins_register_the_papers_skills_and_steps(vkr_plugin_manager):
    registry = vkr_plugin_manager.registry
    assert set(registry.skills) >= {"VidR", "KnowVid", "KnowVidR"}
    assert [g.name for g in registry.gates()][:3] == [
        "self_consistency",
        "video_dependency",
        "cot_verification",
    ]
    assert "example_generation" in registry.steps
    assert "litellm" in registry.providers and "local" in registry.sources
    # Every built-in registers through a hook, attributed to its module.
    assert registry.owners[("step", "self_consistency")] == "plugins.steps.self_consistency"


class DuplicateSkill:
    @staticmethod
    @hookimpl
    def vkr_register_skills(register):
        register(SkillSpec(name="VidR", description="a second VidR"))


def test_duplicate_names_fail_at_start_up_naming_both_plugins():
    with pytest.raises(PluginError) as err:
        get_plugin_manager(extra_plugins=[DuplicateSkill()])
    message = str(err.value)
    assert "skill 'VidR' is registered twice" in message
    assert "plugins.skills.builtin" in message and "DuplicateSkill" in message


def test_misspelt_hook_names_are_caught():
    class Typo:
        @staticmethod
        @hookimpl
        def vkr_register_skill(register):
            pass

    with pytest.raises(Exception, match="vkr_register_skill"):
        get_plugin_manager(extra_plugins=[Typo()])


@pytest.fixture(scope="module")
def third_party_site(tmp_path_factory) -> Path:
    """The example third-party plugin, really installed (pip) into a separate site directory."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO / "tests" / "third_party" / "vkr_answer_leak"),
        ],
        check=True,
    )
    return target


def vkr_env(site: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(site), **extra)
    return env


def test_vkr_plugins_lists_builtins_and_an_installed_third_party_plugin(third_party_site):
    out = subprocess.run(
        [VKR, "plugins"], env=vkr_env(third_party_site), capture_output=True, text=True, check=True
    ).stdout
    assert "answer_leak (third-party)  steps: answer_leak" in out
    for module in builtin_plugins():
        assert module in out
    assert "plugins.steps.cot_verification (built-in)  steps: cot_verification" in out


def test_vkr_load_plugins_limits_third_party_plugins(third_party_site):
    out = subprocess.run(
        [VKR, "plugins"],
        env=vkr_env(third_party_site, VKR_LOAD_PLUGINS=""),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "answer_leak" not in out
    assert "plugins.steps.self_consistency" in out


def test_third_party_gate_runs_in_the_graph_in_its_declared_order(
    third_party_site, tmp_path, testdata, vkr_pool, vkr_fake_server
):
    import json
    import shutil

    vkr_fake_server.set_policy(
        {
            "steps": {
                "self_consistency": {"accuracy": 1.0},
                "video_dependency": {"accuracy": 0.0},
                "cot_verification": {"cot_pass": 1.0},
            }
        }
    )
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(testdata / "flipping_a_pancake.mkv", videos / "pancake.mkv")
    subprocess.run(
        [
            VKR,
            "generate",
            "--video-id",
            "pancake",
            "--videos-dir",
            str(videos),
            "--pool",
            str(vkr_pool),
            "--out",
            str(tmp_path / "run"),
            "--discipline",
            "cooking",
        ],
        env=vkr_env(third_party_site),
        check=True,
        capture_output=True,
        text=True,
    )
    record = json.loads((tmp_path / "run" / "records" / "pancake.json").read_text())
    assert record["accepted"]
    for example in record["accepted"]:
        assert [v["step"] for v in example["verdicts"]] == [
            "self_consistency",
            "answer_leak",
            "video_dependency",
            "cot_verification",
        ]
