"""The first run: from a pool and some videos, with no registry and no run, to a registry and a
run that uses it. Real CLI, real litellm over HTTP to the fake server, real decoding, real
SQLite, Label Studio exports written as an annotator's would be."""

from __future__ import annotations

import glob
import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from cli import cli
from plugins.providers.fake_server import write_pool
from qualification.interchange import export_labels
from qualification.pilot import open_pilot, read_inputs
from vkr_core.config import load_pool, load_registry

STEPS = ["cot_verification", "example_generation", "self_consistency", "video_dependency"]


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(result: Any) -> str:
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def pool_without_registry(root: Path, server: Any, pm: Any) -> Path:
    """The pool vkr writes for the fake server, minus the registry it writes beside it."""
    pool = write_pool(
        root / "pool.yaml", server.base_url, registry_path=root / "eligibility.yaml", pm=pm
    )
    (root / "eligibility.yaml").unlink()
    return pool


def write_manifest(root: Path, testdata: Path, disciplines: list[str]) -> Path:
    """A manifest as a user writes it (jsonl); distinct titles give each video its own prompts."""
    (root / "videos").mkdir()
    lines = []
    for number, discipline in enumerate(disciplines):
        video_id = f"{discipline}{number}"
        shutil.copy(testdata / "flipping_a_pancake.mkv", root / "videos" / f"{video_id}.mkv")
        entry = {
            "video_id": video_id,
            "path": f"videos/{video_id}.mkv",
            "discipline": discipline,
            "subject": "everyday physics",
            "knowledge_point": "friction",
            "title": f"clip {video_id}",
        }
        lines.append(json.dumps(entry))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def labelstudio_export(tasks_file: Path, who: str) -> list[dict[str, Any]]:
    """What Label Studio exports once an annotator marked every unlabelled task 'ok'."""
    tasks = json.loads(tasks_file.read_text())
    for task in tasks:
        if task["predictions"]:
            continue  # vkr pre-labelled it a hard failure: nothing for a person to judge
        choice = {"choices": ["ok"]}
        result = [{"from_name": "label", "to_name": "output", "type": "choices", "value": choice}]
        task["annotations"] = [
            {"id": 1, "completed_by": {"email": who}, "result": result, "was_cancelled": False}
        ]
    return tasks


def next_commands(output: str) -> list[str]:
    lines = output.split("\nnext:\n", 1)[1].splitlines()
    return [line.strip() for line in lines if line.startswith("  vkr ")]


def test_first_run_from_zero_files_to_a_registry_and_a_run(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager
):
    pool = pool_without_registry(tmp_path, vkr_fake_server, vkr_plugin_manager)
    registry = tmp_path / "eligibility.yaml"
    # Three physics videos first, then three cooking ones: a sorted manifest.
    manifest = write_manifest(tmp_path, testdata, ["physics"] * 3 + ["cooking"] * 3)
    # fake-b breaks half of its generated examples: its generation pilot must fail it.
    vkr_fake_server.set_policy({"model_steps": {"fake-b|example_generation": {"malformed": 0.5}}})

    # Where a new user starts: no registry, so no run, and no run, so no pilot inputs.
    refused = invoke("run", "--videos", manifest, "--pool", pool, "--out", tmp_path / "r0")
    assert refused.exit_code == 1 and "eligibility registry file not found" in refused.output
    assert refused.exception is None or isinstance(refused.exception, SystemExit)

    inputs_dir = tmp_path / "pilot-inputs"
    args = ["qualify", "inputs", "--videos", manifest, "--pool", pool, "--out", inputs_dir]
    output = ok(invoke(*args, "--n", 8, "--concurrency", 2))

    # Every model step has at least 8 distinct inputs, recorded as a run records them.
    pm = vkr_plugin_manager
    for step in STEPS:
        recorded = read_inputs(step, [inputs_dir])
        assert len(recorded) >= 8, step
        assert {r.record["prompt_version"] for r in recorded} == {pm.registry.steps[step].version()}
    # It stopped once it had enough, yet reached both disciplines of the sorted manifest.
    summary = json.loads((inputs_dir / "pilot-inputs.json").read_text())
    assert 2 <= len(summary["videos_used"]) < 6
    assert {s.split(" / ")[0] for s in summary["steps"]["example_generation"]["strata"]} == {
        "physics",
        "cooking",
    }
    assert summary["steps"]["video_dependency"]["candidates"] == ["fake-c", "fake-d"]
    # No corpus, no registry: only inputs, frames, the cache and the bill.
    assert not (inputs_dir / "records").exists()
    assert not registry.exists()
    paid = vkr_fake_server.stats()["completions"]
    assert paid > 0 and summary["calls_paid"] == paid and summary["cost_usd"] > 0
    assert f"model calls: {paid} made ($" in output
    for model in ("fake-a", "fake-b", "fake-c", "fake-d"):
        assert f"  {model}: " in output

    # The same command again pays for nothing.
    again = ok(invoke(*args, "--n", 8, "--concurrency", 2))
    assert "model calls: 0 made ($0.0000)" in again
    assert vkr_fake_server.stats()["completions"] == paid

    # The commands it printed, in order: a pilot per (step, candidate model) ...
    commands = next_commands(output)
    pilots = [c for c in commands if c.startswith("vkr qualify pilot ")]
    expected = {(s, m) for s in STEPS for m in ("fake-a", "fake-b", "fake-c", "fake-d")}
    expected -= {("video_dependency", "fake-a"), ("video_dependency", "fake-b")}
    assert {
        (c.split("--step ")[1].split()[0], c.split("--model ")[1].split()[0]) for c in pilots
    } == expected
    pilot_dirs = []
    for command in pilots:
        argv = shlex.split(command)[1:]
        made = ok(invoke(*argv))
        pilot_dirs.append(Path(argv[argv.index("--out") + 1]))
        if "--step video_dependency" in command:
            # Both fixed models answered every input already: their pilots replay the cache.
            assert "model calls: 0 made, 8 from the cache" in made
    # ... whose items know their video, as pilots of a run's inputs do.
    first = open_pilot(pilot_dirs[0])
    assert first.items[0].video_path == str(
        (tmp_path / "videos" / f"{first.items[0].video_id}.mkv").resolve()
    )

    # An annotator labels every pilot in Label Studio; vkr imports the exports.
    for pilot_dir in pilot_dirs:
        tasks = tmp_path / "ls" / f"{pilot_dir.name}.json"
        export_labels(open_pilot(pilot_dir), "labelstudio", tasks)
        export = tasks.with_name(f"{pilot_dir.name}-export.json")
        export.write_text(json.dumps(labelstudio_export(tasks, "ann@lab.org")))
        ok(invoke("qualify", "import", pilot_dir, export, "--format", "labelstudio"))

    # ... score, as printed (the shell expands the glob) ...
    [score] = [c for c in commands if c.startswith("vkr qualify score ")]
    argv = []
    for arg in shlex.split(score)[1:]:
        argv += sorted(glob.glob(arg)) if "*" in arg else [arg]
    assert argv[argv.index("--registry") + 1] == str(registry)
    ok(invoke(*argv))
    loaded = load_registry(registry)
    for step, model in expected:
        entry = loaded.entry(step, model)
        assert entry is not None and entry.n == 8
        assert entry.eligible == ((step, model) != ("example_generation", "fake-b")), (step, model)

    # ... and the run the pool could not start before now starts, routed by the registry.
    [run] = [c for c in commands if c.startswith("vkr run ")]
    argv = shlex.split(run)[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "runs" / "r1")
    vkr_fake_server.reset_stats()
    ok(invoke(*argv, "--no-progress"))
    records = sorted((tmp_path / "runs" / "r1" / "records").glob("*.json"))
    assert len(records) == 6
    assert {json.loads(p.read_text())["status"] for p in records} == {"done"}
    generation = {
        key.split("|")[0]
        for key in vkr_fake_server.stats()["by_model_step"]
        if key.endswith("|example_generation")
    }
    assert generation and "fake-b" not in generation


def test_inputs_from_a_folder_for_one_step_skip_a_broken_video(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager
):
    pool = pool_without_registry(tmp_path, vkr_fake_server, vkr_plugin_manager)
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(testdata / "flipping_a_pancake.mkv", videos / "pancake.mkv")
    shutil.copy(testdata / "corrupted.mp4", videos / "broken.mp4")
    (videos / "pancake.json").write_text(json.dumps({"discipline": "cooking"}))
    out = tmp_path / "inputs"
    result = invoke(
        "qualify", "inputs", "--videos-dir", videos, "--pool", pool, "--out", out,
        "--steps", "example_generation", "--n", 50, "--concurrency", 1,
    )  # fmt: skip
    output = ok(result)
    # Only the generator was called: no gate, no example checked.
    assert set(vkr_fake_server.stats()["by_step"]) == {"example_generation"}
    assert len(read_inputs("example_generation", [out])) == 6
    # The broken file is recorded and named; the good one still gave its inputs.
    [failure] = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["video_id"] == "broken" and failure["reason"]
    assert "broken:" in output
    # Too few videos for 50 inputs: said before any call and after, with the pilot size to use.
    assert "these videos give at most 12 example_generation inputs, fewer than 50" in output
    assert "short: example_generation has 6 of 50 inputs" in output
    assert "--n 6 " in output
    # `vkr run` reads a manifest, not a folder: the printed command says so.
    assert "vkr run --videos MANIFEST.jsonl" in output


def test_a_manifest_of_videos_elsewhere_needs_the_video_root_a_run_needs(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager
):
    pool = pool_without_registry(tmp_path, vkr_fake_server, vkr_plugin_manager)
    write_manifest(tmp_path, testdata, ["physics"])
    # The manifest lives apart from the videos and names them by absolute path.
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "manifest.jsonl"
    entry = json.loads((tmp_path / "manifest.jsonl").read_text())
    entry["path"] = str(tmp_path / "videos" / "physics0.mkv")
    manifest.write_text(json.dumps(entry) + "\n")
    args = ["qualify", "inputs", "--videos", manifest, "--pool", pool, "--out", tmp_path / "in"]
    args += ["--steps", "example_generation", "--n", 1]
    refused = invoke(*args)
    assert refused.exit_code == 1 and "is outside the video root" in refused.output
    assert "no usable videos" in refused.output
    output = ok(invoke(*args, "--video-root", tmp_path / "videos"))
    assert len(read_inputs("example_generation", [tmp_path / "in"])) >= 1
    assert f"vkr run --videos {manifest} --video-root {tmp_path / 'videos'} --pool" in output


def test_inputs_stop_at_the_spending_limit(tmp_path, testdata, vkr_fake_server, vkr_plugin_manager):
    pool = pool_without_registry(tmp_path, vkr_fake_server, vkr_plugin_manager)
    manifest = write_manifest(tmp_path, testdata, ["physics", "cooking", "biology"])
    out = tmp_path / "inputs"
    args = ["qualify", "inputs", "--videos", manifest, "--pool", pool, "--out", out]
    output = ok(invoke(*args, "--concurrency", 1, "--max-spend", 0.000001))
    summary = json.loads((out / "pilot-inputs.json").read_text())
    # One video was launched under the limit; then the bill had passed it.
    assert len(summary["videos_used"]) == 1
    assert "stopped at --max-spend" in output
    # The limit counts what the directory has already cost, across invocations.
    ok(invoke(*args, "--concurrency", 1, "--max-spend", 0.000001))
    assert len(json.loads((out / "pilot-inputs.json").read_text())["videos_used"]) == 1
    # Inputs made with other frames than the first ones are not mixed in silently.
    other = invoke(*args, "--fps", 0.5)
    assert other.exit_code == 1 and "was made with a different config" in other.output
    assert "pilot_inputs.config.fps: 0.2 -> 0.5" in other.output


def test_inputs_refuse_what_cannot_work_before_paying(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager
):
    pool = pool_without_registry(tmp_path, vkr_fake_server, vkr_plugin_manager)
    manifest = write_manifest(tmp_path, testdata, ["physics"])
    base = ["qualify", "inputs", "--videos", manifest, "--out", tmp_path / "inputs"]

    def refused(*args: Any) -> str:
        result = invoke(*args)
        assert result.exit_code != 0, result.output
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        return result.output

    assert "unknown step 'nope'; model steps of the pipeline: cot_verification" in refused(
        *base, "--pool", pool, "--steps", "nope"
    )
    assert "`vkr probe --models A,B,C` records the single-frame probe's" in refused(
        *base, "--pool", pool, "--steps", "single_frame_probe"
    )
    assert "name the videos once" in refused(
        *base, "--pool", pool, "--videos-dir", tmp_path / "videos"
    )
    # One vision model cannot check another's reasoning: said before any call.
    data = yaml.safe_load(pool.read_text())
    data["models"] = data["models"][:1]
    data["steps"] = {}
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(data))
    assert (
        "cannot serve the pipeline even with every model that fits a step as a candidate: "
        "step 'cot_verification' must use a model other than the generator"
    ) in refused(*base, "--pool", single)
    # A run directory is not a place for pilot inputs.
    (tmp_path / "run" / "records").mkdir(parents=True)
    (tmp_path / "run" / "records" / "physics0.json").write_text("{}")
    assert "is a run directory" in refused(
        "qualify", "inputs", "--videos", manifest, "--pool", pool, "--out", tmp_path / "run"
    )
    assert vkr_fake_server.stats()["completions"] == 0
    assert not (tmp_path / "inputs").exists() or not any((tmp_path / "inputs").iterdir())


def test_init_writes_a_starter_pool_that_names_a_registry_still_to_come(tmp_path):
    target = tmp_path / "pool.yaml"
    output = ok(invoke("qualify", "init", "--out", target))
    assert "vkr qualify inputs --videos manifest.jsonl --pool" in output
    pool = load_pool(target)
    assert pool.names() == ["gpt4o", "local-qwen"]
    assert pool.steps["video_dependency"].models == ["gpt4o", "local-qwen"]
    assert pool.registry_path() == tmp_path / "eligibility.yaml"
    assert not (tmp_path / "eligibility.yaml").exists()
    again = invoke("qualify", "init", "--out", target)
    assert again.exit_code == 1 and "already exists" in again.output
