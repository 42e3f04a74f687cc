"""A third-party skill is usable: it ships its seeds, a seed bank may hold it, gaps are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from plugin_packages import THIRD_PARTY, install, run_vkr, write_package

from cli import cli
from vkr_core.hookspecs import hookimpl
from vkr_core.plugins import PluginError, get_plugin_manager
from vkr_core.schemas import SkillSpec

PLUGIN_SEEDS = [
    json.loads(line)
    for line in (THIRD_PARTY / "vkr_extra_skill" / "vkr_extra_skill" / "seeds.jsonl")
    .read_text()
    .splitlines()
]
BUILTIN_SEEDS = [
    json.loads(line)
    for line in (Path(__file__).resolve().parents[1] / "plugins" / "skills" / "seed_bank.jsonl")
    .read_text()
    .splitlines()
]
EVERYTHING_PASSES = {
    "steps": {
        "self_consistency": {"accuracy": 1.0},
        "video_dependency": {"accuracy": 0.0},
        "cot_verification": {"cot_pass": 1.0},
    }
}


@pytest.fixture(scope="module")
def extra_skill_site(tmp_path_factory) -> Path:
    """tests/third_party/vkr_extra_skill (skill SafetyR with its own seeds), pip-installed."""
    return install(tmp_path_factory.mktemp("site"), THIRD_PARTY / "vkr_extra_skill")


@pytest.fixture
def videos(tmp_path, testdata) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(testdata / "flipping_a_pancake.mkv", folder / "pancake.mkv")
    return folder


def generate_args(videos: Path, pool: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--video-id",
        "pancake",
        "--videos-dir",
        str(videos),
        "--pool",
        str(pool),
        "--out",
        str(out),
        "--discipline",
        "cooking",
        *extra,
    ]


def generation_prompts(server, skill: str) -> list[str]:
    """The text of every example_generation request for ``skill`` the server received."""
    prompts = ["\n".join(r.texts) for r in server.received("example_generation")]
    return [p for p in prompts if f"Write one {skill} example" in p]


def test_a_plugin_skill_generates_examples_from_the_seeds_it_ships(
    extra_skill_site, videos, tmp_path, vkr_pool, vkr_fake_server
):
    vkr_fake_server.set_policy(EVERYTHING_PASSES)
    listed = run_vkr([extra_skill_site], "plugins")
    assert "extra_skill (third-party)  skills: SafetyR" in listed.stdout, listed.stderr

    done = run_vkr([extra_skill_site], *generate_args(videos, vkr_pool, tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr

    record = json.loads((tmp_path / "run" / "records" / "pancake.json").read_text())
    skills = [e["skill"] for e in record["accepted"]] + [r["skill"] for r in record["rejected"]]
    # The plugin asks for one round; the paper's skills keep their two.
    assert sorted(skills) == sorted(["VidR", "KnowVid", "KnowVidR"] * 2 + ["SafetyR"])
    assert "SafetyR" in [e["skill"] for e in record["accepted"]]

    [prompt] = generation_prompts(vkr_fake_server, "SafetyR")
    shown = [s["question"] for s in PLUGIN_SEEDS if s["question"] in prompt]
    assert len(shown) == 3, "the model saw 3 of the plugin's own seed examples"
    assert not [s for s in BUILTIN_SEEDS if s["question"] in prompt]


def test_a_seed_bank_may_hold_a_plugin_skill_and_its_lines_win(
    extra_skill_site, videos, tmp_path, vkr_pool, vkr_fake_server
):
    mine = [
        dict(PLUGIN_SEEDS[0], question=f"House rule {i}: which pan handle position is safe?")
        for i in range(3)
    ]
    bank = tmp_path / "bank.jsonl"
    bank.write_text("".join(json.dumps(s) + "\n" for s in [*BUILTIN_SEEDS, *mine]))

    done = run_vkr(
        [extra_skill_site],
        *generate_args(videos, vkr_pool, tmp_path / "run", "--seed-bank", str(bank)),
        "--skills",
        "SafetyR",
    )
    assert done.returncode == 0, done.stderr

    [prompt] = generation_prompts(vkr_fake_server, "SafetyR")
    assert all(s["question"] in prompt for s in mine)
    assert not [s for s in PLUGIN_SEEDS if s["question"] in prompt]
    # --skills SafetyR: no round of any other skill was asked for.
    assert len(vkr_fake_server.received("example_generation")) == 1


def test_a_seed_of_an_unregistered_skill_is_refused_naming_file_and_line(
    videos, tmp_path, vkr_pool, vkr_fake_server
):
    bank = tmp_path / "bank.jsonl"
    bank.write_text(json.dumps(BUILTIN_SEEDS[0]) + "\n" + json.dumps(PLUGIN_SEEDS[0]) + "\n")
    result = CliRunner().invoke(
        cli, generate_args(videos, vkr_pool, tmp_path / "run", "--seed-bank", str(bank))
    )
    assert result.exit_code == 1
    assert (
        f"Error: seed bank {bank} line 2: skill 'SafetyR' is not a registered skill "
        "(registered: KnowVid, KnowVidR, VidR)"
    ) in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert result.exc_info is None or result.exc_info[0] is SystemExit
    assert vkr_fake_server.stats()["requests"] == 0


def test_a_plugin_skill_without_seeds_is_refused_before_any_call_saying_how_to_fix_it(
    videos, tmp_path, tmp_path_factory, vkr_pool, vkr_fake_server
):
    package = write_package(
        tmp_path_factory.mktemp("src"),
        "vkr_bare_skill",
        "bare_skill",
        """
        from vkr_core.hookspecs import hookimpl
        from vkr_core.schemas import SkillSpec

        @hookimpl
        def vkr_register_skills(register):
            register(SkillSpec(name="DiagramR", description="reads diagrams drawn on a board"))
        """,
    )
    site = install(tmp_path_factory.mktemp("site"), package)

    refused = run_vkr([site], *generate_args(videos, vkr_pool, tmp_path / "run"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip() == (
        "Error: skill 'DiagramR' (plugin 'bare_skill') has no seed examples: its plugin ships "
        'none; write some to a jsonl seed bank (one example per line with "skill": the '
        "skill's name; see the README's \"Seed examples\") and pass it with --seed-bank FILE, "
        "or leave it out with --skills KnowVid,KnowVidR,VidR"
    )
    assert vkr_fake_server.stats()["requests"] == 0
    assert not (tmp_path / "run" / "records" / "pancake.json").exists()

    # The advice works as given: a seed bank may hold a skill that no built-in knows.
    diagram_seeds = [
        dict(BUILTIN_SEEDS[i], skill="DiagramR", question=f"Which arrow of diagram {i} is wrong?")
        for i in range(3)
    ]
    bank = tmp_path / "bank.jsonl"
    bank.write_text("".join(json.dumps(s) + "\n" for s in diagram_seeds))
    advised = run_vkr(
        [site],
        *generate_args(videos, vkr_pool, tmp_path / "run", "--seed-bank", str(bank)),
        "--skills",
        "DiagramR",
    )
    assert advised.returncode == 0, advised.stderr
    prompts = generation_prompts(vkr_fake_server, "DiagramR")
    assert len(prompts) == 2 and all(
        s["question"] in prompt for s in diagram_seeds for prompt in prompts
    )
    record = json.loads((tmp_path / "run" / "records" / "pancake.json").read_text())
    assert {e["skill"] for e in record["accepted"] + record["rejected"]} == {"DiagramR"}


def test_a_skill_shipping_seeds_of_another_skill_is_refused_naming_the_plugin():
    class Mislabelled:
        @staticmethod
        @hookimpl
        def vkr_register_skills(register):
            seed = dict(BUILTIN_SEEDS[0])  # a VidR example
            register(SkillSpec(name="ChartR", description="reads charts", seeds=[seed]))

    with pytest.raises(PluginError) as err:
        get_plugin_manager(extra_plugins=[Mislabelled()], load_entry_points=False)
    assert str(err.value) == (
        "plugin 'Mislabelled' failed in vkr_register_skills: SkillSpec: "
        "seed 1 is an example of skill 'VidR', not 'ChartR'"
    )
