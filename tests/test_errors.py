"""Bad values, files and plugin set-ups end `vkr` with one clear line, never a traceback."""

from __future__ import annotations

import shutil

import pytest
import yaml
from click.testing import CliRunner
from plugin_packages import install, run_vkr, write_package
from pydantic import ValidationError

from cli import cli
from vkr_core.config import RunConfig


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def pancake(tmp_path, testdata) -> list[str]:
    """`vkr generate` arguments naming a real video, so only the file under test is wrong."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(testdata / "flipping_a_pancake.mkv", videos / "pancake.mkv")
    return ["generate", "--video-id", "pancake", "--videos-dir", str(videos)]


def assert_one_line_error(output: str, expected: str) -> None:
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("Error")]
    assert lines == [expected], output


# ---------------------------------------------------------------- pipeline options


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--fps", "-1", "Error: Invalid value for '--fps': -1.0 is not in the range x>0."),
        ("--fps", "0", "Error: Invalid value for '--fps': 0.0 is not in the range x>0."),
        (
            "--max-frames",
            "0",
            "Error: Invalid value for '--max-frames': 0 is not in the range x>=1.",
        ),
    ],
)
@pytest.mark.parametrize("command", ["generate", "run"])
def test_out_of_range_pipeline_options_are_refused(tmp_path, command, option, value, message):
    target = ["--video-id", "v"] if command == "generate" else ["--videos", tmp_path / "m.jsonl"]
    result = invoke(
        command, *target, "--pool", tmp_path / "pool.yaml", "--out", tmp_path / "run", option, value
    )
    assert result.exit_code == 2
    assert_one_line_error(result.output, message)
    assert not (tmp_path / "run").exists()


def test_library_callers_get_the_same_range_checks():
    for bad in ({"fps": 0}, {"fps": -1}, {"max_frames": 0}, {"skills": []}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            RunConfig(**bad)


# ---------------------------------------------------------------- decontam


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--distance", "-1"],
            "Error: Invalid value for '--distance': -1 is not in the range 0<=x<=256.",
        ),
        (
            ["--distance", "300"],
            "Error: Invalid value for '--distance': 300 is not in the range 0<=x<=256.",
        ),
        (["--share", "0"], "Error: Invalid value for '--share': 0.0 is not in the range 0<x<=1."),
        (
            ["--share", "1.5"],
            "Error: Invalid value for '--share': 1.5 is not in the range 0<x<=1.",
        ),
        (["--timeout", "0"], "Error: Invalid value for '--timeout': 0.0 is not in the range x>=1."),
        (["--jobs", "-1"], "Error: Invalid value for '--jobs': -1 is not in the range x>=0."),
    ],
)
def test_out_of_range_decontam_options_are_refused(tmp_path, args, message):
    result = invoke(
        "decontam", "--train", tmp_path, "--bench", tmp_path, "--out", tmp_path / "out", *args
    )
    assert result.exit_code == 2
    assert_one_line_error(result.output, message)


def test_a_distance_larger_than_the_hash_is_one_line(tmp_path):
    result = invoke(
        "decontam", "--train", tmp_path, "--bench", tmp_path, "--out", tmp_path / "out",
        "--distance", "100",
    )  # fmt: skip
    assert result.exit_code == 1
    assert_one_line_error(
        result.output,
        "Error: bad decontamination parameters: distance 100 is larger than the hash (64 bits)",
    )


def test_calibrate_refuses_a_false_positive_rate_above_one(tmp_path):
    result = invoke("decontam", "calibrate", "--videos", tmp_path, "--max-fpr", "2")
    assert result.exit_code == 2
    assert_one_line_error(
        result.output, "Error: Invalid value for '--max-fpr': 2.0 is not in the range 0<=x<=1."
    )


# ---------------------------------------------------------------- ports (plugin commands)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["demo", "--port", "99999"],
            "Error: Invalid value for '--port': 99999 is not in the range 0<=x<=65535.",
        ),
        (
            ["demo", "--port", "-1"],
            "Error: Invalid value for '--port': -1 is not in the range 0<=x<=65535.",
        ),
        (
            ["dev", "fake-server", "--port", "99999"],
            "Error: Invalid value for '--port': 99999 is not in the range 0<=x<=65535.",
        ),
    ],
)
def test_a_port_out_of_range_is_refused(tmp_path, args, message):
    result = run_vkr([], *args, *(["--out", str(tmp_path / "demo")] if args[0] == "demo" else []))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, message)
    assert not (tmp_path / "demo").exists()


# ---------------------------------------------------------------- configuration files


def test_an_eligibility_registry_with_an_unknown_key_is_refused(
    tmp_path, pancake, vkr_pool, vkr_fake_server
):
    registry = tmp_path / "eligibility.yaml"
    entries = yaml.safe_load(registry.read_text())
    entries["example_generation"]["fake-a"]["error_rte"] = 0.01  # a typo of error_rate
    registry.write_text(yaml.safe_dump(entries))
    result = invoke(*pancake, "--pool", vkr_pool, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert_one_line_error(
        result.output,
        f"Error: eligibility registry {registry} is invalid: unknown key 'error_rte' in "
        "example_generation.fake-a",
    )
    assert vkr_fake_server.stats()["requests"] == 0


def test_qualification_provenance_is_not_an_unknown_key(tmp_path, vkr_pool):
    registry = tmp_path / "eligibility.yaml"
    entries = yaml.safe_load(registry.read_text())
    # What `vkr qualify score` writes beside the verdict; a hand-written date is unquoted.
    entries["example_generation"]["fake-a"].update(
        pilot_id="example_generation-fake-a-0123456789",
        inputs_sha256="ab" * 32,
        annotators=["alice", "bob"],
        annotator_policy="all",
        hard=0,
        soft=1,
        wilson_low=0.002,
        wilson_high=0.05,
        rule="error_rate <= 0.03",
        kappa=[{"annotators": ["alice", "bob"], "items": 100, "ok_vs_failure": 0.9}],
    )
    registry.write_text(yaml.safe_dump(entries).replace("soft: 1", "soft: 1\n    date: 2026-01-31"))
    result = invoke("qualify", "table", "--registry", registry, "--pool", vkr_pool)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("broken", ["pool", "registry"])
def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, pancake, vkr_pool, broken):
    path = vkr_pool if broken == "pool" else tmp_path / "eligibility.yaml"
    lines = path.read_text().splitlines()
    lines.insert(2, "  broken: a: b")  # line 3: a value cannot hold a mapping inline
    path.write_text("\n".join(lines) + "\n")
    result = invoke(*pancake, "--pool", vkr_pool, "--out", tmp_path / "run")
    assert result.exit_code == 1
    what = "pool file" if broken == "pool" else "eligibility registry file"
    [line] = [x for x in result.output.splitlines() if x.startswith("Error")]
    assert line.startswith(f"Error: {what} {path} is not valid YAML at line 3, column ")
    assert line.endswith(": mapping values are not allowed here")
    assert "<unicode string>" not in result.output and "Traceback" not in result.output


def test_a_fake_server_policy_with_a_yaml_error_names_the_file_and_line(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults:\n  accuracy: 0.9\n refusal: 0.1\n")
    result = run_vkr([], "dev", "fake-server", "--policy", str(policy))
    assert result.returncode == 1
    [line] = [x for x in result.stderr.splitlines() if x.startswith("Error")]
    assert line.startswith(f"Error: policy file {policy} is not valid YAML at line 3, column 2: ")
    assert "<unicode string>" not in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- plugin set-ups


SKILL_PLUGIN = """
from vkr_core.hookspecs import hookimpl
from vkr_core.schemas import SkillSpec

@hookimpl
def vkr_register_skills(register):
    register(SkillSpec(name="ChartR", description="reads charts shown in a lecture"))
"""


@pytest.fixture(scope="module")
def chart_site(tmp_path_factory):
    """An installed plugin ``charts`` (distribution vkr-charts) registering skill ChartR."""
    source = write_package(tmp_path_factory.mktemp("src"), "vkr_charts", "charts", SKILL_PLUGIN)
    return install(tmp_path_factory.mktemp("site"), source)


def test_vkr_load_plugins_naming_a_plugin_that_is_not_installed_is_refused(chart_site):
    result = run_vkr([chart_site], "plugins", load_plugins="charts,answer_lek")
    assert result.returncode == 1
    assert result.stderr == (
        "Error: VKR_LOAD_PLUGINS names 'answer_lek', which is not installed "
        "(installed plugins: charts)\n"
    )
    assert result.stdout == ""
    # Naming only installed ones still limits what loads.
    assert run_vkr([chart_site], "plugins", load_plugins="charts").returncode == 0


def test_two_plugins_registering_one_skill_name_are_named_in_one_line(chart_site, tmp_path_factory):
    copycat = write_package(tmp_path_factory.mktemp("src"), "vkr_copycat", "copycat", SKILL_PLUGIN)
    site = install(tmp_path_factory.mktemp("site"), copycat)
    for command in (["plugins"], ["generate", "--video-id", "v", "--pool", "p", "--out", "o"]):
        result = run_vkr([chart_site, site], *command)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith("Error: skill 'ChartR' is registered twice: by plugin ")
        assert "'charts'" in line and "'copycat'" in line


def test_two_installed_plugins_of_one_name_are_named_in_one_line(chart_site, tmp_path_factory):
    impostor = write_package(tmp_path_factory.mktemp("src"), "vkr_impostor", "charts", SKILL_PLUGIN)
    site = install(tmp_path_factory.mktemp("site"), impostor)
    result = run_vkr([chart_site, site], "plugins")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: two installed plugins are named 'charts': ")
    assert "vkr_charts from vkr-charts" in line and "vkr_impostor from vkr-impostor" in line
