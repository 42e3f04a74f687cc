"""Qualification pilots end to end: real recorded inputs, real calls over HTTP, real SQLite,
real Label Studio / Argilla files, a real headless browser, and a following run that routes
only to the models the pilots qualified."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from cli import cli
from plugins.providers.fake_server import FakeModelServer, write_pool
from qualification.interchange import export_labels, import_labels
from qualification.pilot import open_pilot, run_pilot
from qualification.review import ReviewServer
from qualification.score import score_pilots
from qualification.table import load_matrix
from vkr_core.config import RunConfig, load_registry
from vkr_core.plugins import get_plugin_manager
from vkr_core.run import process_items
from vkr_core.schemas import InputError, KnowledgePoint, Video

STEP = "example_generation"
# Debian's chromium package; VKR_CHROMIUM names another build of Chromium.
CHROMIUM_HELP = (
    "the review page is tested in a real browser and none was found: install Debian's "
    "chromium (apt-get install -y chromium, as .ci/run does) or set VKR_CHROMIUM to a "
    "Chromium executable; never `playwright install`"
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def make_video(root: Path, testdata: Path, video_id: str, discipline: str) -> Video:
    path = root / f"{video_id}.mkv"
    shutil.copy(testdata / "flipping_a_pancake.mkv", path)
    # Distinct titles make distinct prompts: the same clip gives each video its own inputs.
    return Video(
        video_id=video_id,
        path=str(path),
        discipline=discipline,
        subject="everyday physics",
        knowledge_point=KnowledgePoint(term="friction"),
        title=f"clip {video_id}",
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Any:
    """A fake model server, a pool for it, and a run directory with recorded step inputs."""
    root = tmp_path_factory.mktemp("qualify")
    pm = get_plugin_manager()
    server = FakeModelServer(seed=0)
    url = server.start()
    pool = write_pool(root / "pool.yaml", url, registry_path=root / "eligibility.yaml", pm=pm)
    # Every self-consistency check fails: the run records generation inputs and stops early.
    server.set_policy({"steps": {"self_consistency": {"accuracy": 0.0}}})
    videos = [
        make_video(root, testdata, "cooking1", "cooking"),
        make_video(root, testdata, "physics1", "physics"),
    ]
    records = asyncio.run(process_items(videos, root / "run", pool, RunConfig(), pm))
    assert [r.status for r in records] == ["done", "done"]
    try:
        yield SimpleNamespace(root=root, server=server, pool=pool, run=root / "run", pm=pm)
    finally:
        server.stop()


def pilot(recorded: Any, out: Path, model: str = "fake-a", **kwargs: Any):
    kwargs.setdefault("n", 8)
    return run_pilot(STEP, model, recorded.pool, [recorded.run], out, pm=recorded.pm, **kwargs)


def invoke(*args: Any) -> Any:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


# ---------------------------------------------------------------- pilot


def test_pilot_samples_recorded_inputs_runs_the_model_and_prelabels_broken_replies(
    recorded, tmp_path
):
    recorded.server.set_policy({"model_steps": {f"fake-b|{STEP}": {"malformed": 0.5}}})
    recorded.server.reset_stats()
    result = invoke(
        "qualify",
        "pilot",
        "--step",
        STEP,
        "--model",
        "fake-b",
        "--pool",
        recorded.pool,
        "--n",
        8,
        "--from",
        recorded.run,
        "--out",
        tmp_path / "p",
    )
    assert result.exit_code == 0, result.output
    assert recorded.server.stats()["by_model_step"] == {f"fake-b|{STEP}": 8}
    opened = open_pilot(tmp_path / "p")
    manifest = opened.manifest
    assert (manifest.step, manifest.model, manifest.n, manifest.seed) == (STEP, "fake-b", 8, 0)
    assert manifest.prompt_version == recorded.pm.registry.steps[STEP].version()
    assert manifest.source_runs == [str(recorded.run)]
    assert len(manifest.input_hashes) == len(set(manifest.input_hashes)) == 8
    assert manifest.available >= 8 and manifest.created
    # Stratified: both disciplines and all three skills are in the sample.
    assert {s.split(" / ")[0] for s in manifest.strata} == {"cooking", "physics"}
    assert {s.split(" / ")[1] for s in manifest.strata} == {"VidR", "KnowVid", "KnowVidR"}
    broken = [i for i in opened.items if i.outcome == "malformed"]
    assert broken and len(broken) < 8
    assert f"pre-labelled hard failures (format): {len(broken)}" in result.output
    for item in opened.items:
        assert [f.clock for f in item.frames] == ["00:00", "00:05", "00:10"]
        assert all((tmp_path / "p" / f.path).is_file() for f in item.frames)
        assert "<frame 00:05>" in item.prompt and item.output
        if item.outcome == "ok":
            assert item.parsed["question"] and item.auto_label is None
        else:
            assert item.parsed is None and item.error
            assert (item.auto_label.label, item.auto_label.category) == ("hard", "format")
    with opened.labels() as store:
        auto = store.current("auto")
    assert sorted(lab.item_id for lab in auto) == sorted(i.item_id for i in broken)

    # The same command again is answered from the cache and keeps the pilot id.
    again = invoke(
        "qualify",
        "pilot",
        "--step",
        STEP,
        "--model",
        "fake-b",
        "--pool",
        recorded.pool,
        "--n",
        8,
        "--from",
        recorded.run,
        "--out",
        tmp_path / "p",
    )
    assert again.exit_code == 0, again.output
    assert "0 made, 8 from the cache" in again.output
    assert recorded.server.stats()["completions"] == 8
    assert open_pilot(tmp_path / "p").manifest.pilot_id == manifest.pilot_id


def test_same_seed_same_sample_other_seed_other_sample(recorded, tmp_path):
    recorded.server.set_policy({})
    first = pilot(recorded, tmp_path / "a", n=4, seed=1).manifest
    second = pilot(recorded, tmp_path / "b", n=4, seed=1).manifest
    third = pilot(recorded, tmp_path / "c", n=4, seed=2).manifest
    assert first.input_hashes == second.input_hashes
    assert first.inputs_sha256 == second.inputs_sha256 and first.pilot_id == second.pilot_id
    assert first.input_hashes != third.input_hashes


def test_pilot_input_errors_name_the_problem(recorded, tmp_path):
    with pytest.raises(
        InputError,
        match=r"unknown step 'nope'; steps that call models: cot_verification, example_generation",
    ):
        run_pilot("nope", "fake-a", recorded.pool, [recorded.run], tmp_path / "p", pm=recorded.pm)
    with pytest.raises(InputError, match=r"model 'ghost' is not in the pool \(fake-a, fake-b"):
        pilot(recorded, tmp_path / "p", model="ghost")
    with pytest.raises(
        InputError, match=r"asked for 500 inputs of step 'example_generation' but only \d+ distinct"
    ):
        pilot(recorded, tmp_path / "p", n=500)
    # The gates stopped at self_consistency, so video_dependency never saw an input.
    with pytest.raises(InputError, match=r"no inputs of step 'video_dependency' are recorded"):
        run_pilot(
            "video_dependency",
            "fake-a",
            recorded.pool,
            [recorded.run],
            tmp_path / "p",
            pm=recorded.pm,
        )
    with pytest.raises(InputError, match=r"run directory not found: .*missing"):
        run_pilot(
            STEP, "fake-a", recorded.pool, [tmp_path / "missing"], tmp_path / "p", pm=recorded.pm
        )

    pool = yaml.safe_load(recorded.pool.read_text())
    pool["models"].append({"name": "blind", "model": "openai/blind", "modality": ["text"]})
    pool["registry"] = str(recorded.root / "eligibility.yaml")
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool))
    with pytest.raises(
        InputError,
        match=r"model 'blind' is text-only .* but step 'example_generation' shows frames",
    ):
        run_pilot(
            STEP, "blind", tmp_path / "pool.yaml", [recorded.run], tmp_path / "p", pm=recorded.pm
        )
    assert not (tmp_path / "p").exists()

    # Inputs of an older prompt are not what the step sends today.
    old = tmp_path / "old-run"
    (old / "inputs").mkdir(parents=True)
    lines = (recorded.run / "inputs" / f"{STEP}.jsonl").read_text().splitlines()
    (old / "inputs" / f"{STEP}.jsonl").write_text(
        "".join(
            json.dumps({**json.loads(line), "prompt_version": "v0-old"}) + "\n" for line in lines
        )
    )
    with pytest.raises(InputError, match=r"prompt version\(s\) v0-old, but the step is now at v1-"):
        run_pilot(STEP, "fake-a", recorded.pool, [old], tmp_path / "p", pm=recorded.pm)

    result = invoke(
        "qualify",
        "pilot",
        "--step",
        "nope",
        "--model",
        "fake-a",
        "--pool",
        recorded.pool,
        "--from",
        recorded.run,
        "--out",
        tmp_path / "p",
    )
    assert result.exit_code == 1 and "Error: unknown step 'nope'" in result.output


def test_a_pilot_directory_is_never_reused_for_another_pilot(recorded, tmp_path):
    recorded.server.set_policy({})
    pilot(recorded, tmp_path / "p", n=4)
    with pytest.raises(
        InputError, match=r"already holds pilot example_generation-fake-a-\w+ .*use another --out"
    ):
        pilot(recorded, tmp_path / "p", model="fake-c", n=4)


def test_rerunning_a_pilot_never_swaps_outputs_under_existing_labels(recorded, tmp_path):
    recorded.server.set_policy({"model_steps": {f"fake-b|{STEP}": {"malformed": 0.5}}})
    pilot(recorded, tmp_path / "p", model="fake-b", cache_dir=tmp_path / "cache1")
    broken = [i.item_id for i in open_pilot(tmp_path / "p").items if i.auto_label]
    assert broken
    # With a fresh cache the model now answers properly. Nobody labelled those outputs, so the
    # rerun goes ahead and retires the automatic failures, keeping them in the history.
    recorded.server.set_policy({})
    pilot(recorded, tmp_path / "p", model="fake-b", cache_dir=tmp_path / "cache2")
    opened = open_pilot(tmp_path / "p")
    assert not any(i.auto_label for i in opened.items)
    with opened.labels() as store:
        assert [h.label for h in store.history(broken[0], "auto")] == ["hard", "ok"]
    label_all(tmp_path / "p", "alice")
    [score] = score_pilots([tmp_path / "p"])
    assert score.failures == 0
    # Now people judged these outputs: a rerun that would change them is refused.
    recorded.server.set_policy({"model_steps": {f"fake-b|{STEP}": {"malformed": 0.5}}})
    with pytest.raises(
        InputError,
        match=rf"answered {len(broken)} input\(s\) of pilot .* differently this time .* already labelled",
    ):
        pilot(recorded, tmp_path / "p", model="fake-b", cache_dir=tmp_path / "cache3")
    assert open_pilot(tmp_path / "p").items == opened.items


# ---------------------------------------------------------------- labels: Label Studio, Argilla


def labelstudio_export(
    tasks_file: Path, labels: dict[str, tuple[str, str | None, str]], who: Any
) -> list:
    """What Label Studio's JSON export returns after annotators labelled the tasks."""
    tasks = json.loads(tasks_file.read_text())
    for task in tasks:
        item_id = task["data"]["item_id"]
        if item_id not in labels:
            continue
        label, category, note = labels[item_id]
        result = [
            {
                "from_name": "label",
                "to_name": "output",
                "type": "choices",
                "value": {"choices": [label]},
            }
        ]
        if category:
            result.append(
                {
                    "from_name": "category",
                    "to_name": "output",
                    "type": "choices",
                    "value": {"choices": [category]},
                }
            )
        if note:
            result.append(
                {
                    "from_name": "note",
                    "to_name": "output",
                    "type": "textarea",
                    "value": {"text": [note]},
                }
            )
        task["annotations"] = [
            {"id": 1, "completed_by": who, "result": result, "was_cancelled": False}
        ]
    return tasks


def test_label_studio_round_trip_with_prelabels_conflicts_and_history(recorded, tmp_path):
    recorded.server.set_policy({"model_steps": {f"fake-b|{STEP}": {"malformed": 0.5}}})
    pilot(recorded, tmp_path / "p", model="fake-b")
    opened = open_pilot(tmp_path / "p")
    tasks_file = tmp_path / "ls" / "tasks.json"
    result = invoke(
        "qualify", "export", tmp_path / "p", "--format", "labelstudio", "--out", tasks_file
    )
    assert result.exit_code == 0, result.output
    tasks = json.loads(tasks_file.read_text())
    config = (tmp_path / "ls" / "tasks.config.xml").read_text()
    for name in (
        'name="label"',
        'name="category"',
        "<TextArea",
        'value="soft failure"',
        'valueList="$frames"',
    ):
        assert name in config
    assert len(tasks) == 8
    for task, item in zip(tasks, opened.items, strict=True):
        data = task["data"]
        assert data["item_id"] == item.item_id and data["pilot_id"] == opened.manifest.pilot_id
        assert data["frames"] == [f.path for f in item.frames] and data["prompt"] == item.prompt
        assert set(data) >= {"video", "frames", "prompt", "output", "item_id", "pilot_id"}
        if item.auto_label:
            [prediction] = task["predictions"]
            assert prediction["result"][0]["value"] == {"choices": ["hard failure"]}
        else:
            assert task["predictions"] == []
            # The output is laid out by field for a reader, not dumped as JSON.
            assert data["output"].startswith("problem_type: ")

    human = [i for i in opened.items if not i.auto_label]
    answers = {i.item_id: ("ok", None, "") for i in human}
    answers[human[0].item_id] = ("soft failure", "hallucination", "no pan in the frames")
    export = tmp_path / "ls" / "export.json"
    export.write_text(
        json.dumps(labelstudio_export(tasks_file, answers, {"id": 7, "email": "bob@lab.org"}))
    )
    result = invoke("qualify", "import", tmp_path / "p", export, "--format", "labelstudio")
    assert result.exit_code == 0, result.output
    assert f"imported labels by bob@lab.org: {len(human)} new" in result.output
    with opened.labels() as store:
        first = store.get(human[0].item_id, "bob@lab.org")
    assert (first.label, first.category, first.note) == (
        "soft",
        "hallucination",
        "no pan in the frames",
    )

    # The same file again changes nothing; a different label for the same item is a conflict.
    assert (
        invoke("qualify", "import", tmp_path / "p", export, "--format", "labelstudio").exit_code
        == 0
    )
    answers[human[0].item_id] = ("ok", None, "")
    export.write_text(
        json.dumps(labelstudio_export(tasks_file, answers, {"id": 7, "email": "bob@lab.org"}))
    )
    result = invoke("qualify", "import", tmp_path / "p", export, "--format", "labelstudio")
    assert result.exit_code == 1
    assert (
        f"1 label(s) in {export} differ from labels already stored (item {human[0].item_id} by bob@lab.org: stored soft failure/hallucination, file ok)"
        in result.output
    )
    assert "nothing was imported" in result.output
    result = invoke(
        "qualify", "import", tmp_path / "p", export, "--format", "labelstudio", "--overwrite"
    )
    assert result.exit_code == 0, result.output
    assert "1 replaced" in result.output
    with opened.labels() as store:
        history = store.history(human[0].item_id, "bob@lab.org")
    assert [h.label for h in history] == ["soft", "ok"]
    assert history[0].superseded_by == history[1].id and history[1].superseded_by is None

    # Labels for items the pilot does not have, and exports of another pilot, are refused.
    tampered = json.loads(export.read_text())
    [labelled] = [t for t in tampered if t["data"]["item_id"] == human[0].item_id]
    labelled["data"]["item_id"] = "feedfacecafe"
    export.write_text(json.dumps(tampered))
    with pytest.raises(
        InputError,
        match=r"labels for 1 item\(s\) that pilot example_generation-fake-b-\w+ does not have: feedfacecafe",
    ):
        import_labels(opened, "labelstudio", export)
    labelled["data"]["item_id"] = human[0].item_id
    for task in tampered:
        task["data"]["pilot_id"] = "example_generation-fake-z-0000000000"
    export.write_text(json.dumps(tampered))
    with pytest.raises(
        InputError,
        match=r"is an export of pilot example_generation-fake-z-0000000000, not of pilot example_generation-fake-b-",
    ):
        import_labels(opened, "labelstudio", export)


def test_argilla_round_trip(recorded, tmp_path):
    recorded.server.set_policy({"model_steps": {f"fake-b|{STEP}": {"malformed": 0.5}}})
    pilot(recorded, tmp_path / "p", model="fake-b")
    opened = open_pilot(tmp_path / "p")
    out = tmp_path / "argilla"
    result = invoke("qualify", "export", tmp_path / "p", "--format", "argilla", "--out", out)
    assert result.exit_code == 0, result.output
    settings = json.loads((out / ".argilla" / "settings.json").read_text())
    assert [f["name"] for f in settings["fields"]] == ["frames", "prompt", "output"]
    questions = {q["name"]: q for q in settings["questions"]}
    assert [o["value"] for o in questions["label"]["settings"]["options"]] == [
        "ok",
        "hard failure",
        "soft failure",
    ]
    assert questions["note"]["settings"]["type"] == "text"
    assert (
        json.loads((out / ".argilla" / "dataset.json").read_text())["name"]
        == opened.manifest.pilot_id
    )
    records = json.loads((out / "records.json").read_text())
    for record, item in zip(records, opened.items, strict=True):
        assert record["metadata"]["item_id"] == item.item_id
        assert record["metadata"]["step"] == STEP and record["metadata"]["model"] == "fake-b"
        assert bool(record["suggestions"]) == bool(item.auto_label)
        if item.auto_label:
            assert record["suggestions"]["label"]["value"] == "hard failure"
        # What annotators submit in Argilla comes back as responses per user.
        record["responses"] = {
            "label": [
                {"value": "ok", "user_id": "u-carol"},
                {"value": "soft failure", "user_id": "u-dan"},
            ],
            "category": [{"value": "wrong answer", "user_id": "u-dan"}],
        }
    (out / "records.json").write_text(json.dumps(records))
    result = invoke("qualify", "import", tmp_path / "p", out, "--format", "argilla")
    assert result.exit_code == 0, result.output
    assert "imported labels by u-carol, u-dan: 16 new" in result.output
    with opened.labels() as store:
        dan = store.current("u-dan")
    assert {(lab.label, lab.category) for lab in dan} == {("soft", "wrong answer")}


# ---------------------------------------------------------------- score, registry, table


def label_all(pilot_dir: Path, annotator: str, label: str = "ok", skip: int = 0) -> None:
    opened = open_pilot(pilot_dir)
    with opened.labels() as store:
        for item in opened.items[skip:]:
            store.set(
                item.item_id, annotator, label, None if label == "ok" else "other", source="web"
            )


def test_score_refuses_unlabelled_items_unless_partial_and_merges_the_registry(recorded, tmp_path):
    recorded.server.set_policy({})
    pilot(recorded, tmp_path / "a", model="fake-a")
    label_all(tmp_path / "a", "alice", skip=2)
    with pytest.raises(
        InputError,
        match=r"has 2 of 8 items without a label \(first: \w+, \w+\): label them, or score the labelled ones with --allow-partial",
    ):
        score_pilots([tmp_path / "a"])
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        yaml.safe_dump({"self_consistency": {"fake-d": {"eligible": True, "n": 100}}})
    )
    [partial] = score_pilots([tmp_path / "a"], registry, allow_partial=True)
    assert (partial.labelled, partial.failures, partial.eligible) == (6, 0, True)
    label_all(tmp_path / "a", "alice")
    label_all(tmp_path / "a", "bob")
    opened = open_pilot(tmp_path / "a")
    with opened.labels() as store:  # bob finds one hallucination
        store.set(opened.items[0].item_id, "bob", "soft", "hallucination", source="web")

    result = invoke("qualify", "score", tmp_path / "a", "--registry", registry)
    assert result.exit_code == 0, result.output
    # alice: 8 ok; bob: 7 ok, 1 soft. p_o = 7/8, p_e = (8*7 + 0*1)/64 = 7/8: kappa 0.
    assert (
        "Cohen's kappa alice vs bob on 8 items: ok/failure 0.000, ok/hard/soft 0.000"
        in result.output
    )
    entry = load_registry(registry).entry(STEP, "fake-a")
    assert entry.eligible is False and entry.n == 8 and entry.error_rate == 0.125
    extra = entry.model_dump()  # the provenance is declared: unknown keys are refused
    assert (extra["hard"], extra["soft"], extra["annotators"]) == (0, 1, ["alice", "bob"])
    assert extra["pilot_id"] == opened.manifest.pilot_id
    assert extra["inputs_sha256"] == opened.manifest.inputs_sha256
    assert entry.prompt_version == opened.manifest.prompt_version
    assert extra["rule"] == "error_rate <= 0.03" and extra["date"]
    assert 0 < extra["wilson_low"] < 0.125 < extra["wilson_high"] < 1
    # The registry's other entries survive the merge.
    assert load_registry(registry).entry("self_consistency", "fake-d").eligible

    # Under the majority policy one of two annotators is a tie: still a failure.
    [majority] = score_pilots([tmp_path / "a"], policy="majority")
    assert majority.soft == 1
    with opened.labels() as store:
        store.set(opened.items[0].item_id, "carol", "ok", source="web")
    [majority] = score_pilots([tmp_path / "a"], policy="majority")
    [strict_all] = score_pilots([tmp_path / "a"], policy="all", strict=True)
    assert majority.failures == 0 and majority.eligible
    assert strict_all.failures == 1 and not strict_all.eligible
    # 0 of 8 is within the 3 % rule, but not its Wilson upper bound: --strict says no.
    label_all(tmp_path / "a", "bob")
    [strict] = score_pilots([tmp_path / "a"], strict=True)
    assert strict.failures == 0 and not strict.eligible and strict.wilson_high > 0.03


def test_table_shows_eligible_failed_unsupported_unpiloted_and_stale(recorded, tmp_path):
    pool = yaml.safe_load(recorded.pool.read_text())
    pool["models"].append({"name": "blind", "model": "openai/blind", "modality": ["text"]})
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool))
    version = recorded.pm.registry.steps[STEP].version()
    (tmp_path / "registry.yaml").write_text(
        yaml.safe_dump(
            {
                STEP: {
                    "fake-a": {"eligible": True, "prompt_version": version},
                    "fake-b": {"eligible": False, "prompt_version": version},
                    "fake-c": {"eligible": True, "prompt_version": "v0-older"},
                },
            }
        )
    )
    matrix = load_matrix(tmp_path / "registry.yaml", tmp_path / "pool.yaml", recorded.pm)
    row = dict(zip(matrix.models, matrix.rows()[matrix.steps.index(STEP)][1:], strict=True))
    assert row == {"fake-a": "✓", "fake-b": "✗", "fake-c": "stale", "fake-d": "?", "blind": "—"}
    result = invoke(
        "qualify",
        "table",
        "--registry",
        tmp_path / "registry.yaml",
        "--pool",
        tmp_path / "pool.yaml",
        "--markdown",
    )
    assert result.exit_code == 0, result.output
    assert "| `example_generation` | ✓ | ✗ | stale | ? | — |" in result.output
    terminal = invoke(
        "qualify",
        "table",
        "--registry",
        tmp_path / "registry.yaml",
        "--pool",
        tmp_path / "pool.yaml",
    )
    assert (
        terminal.exit_code == 0 and "stale" in terminal.output and "✓ eligible" in terminal.output
    )


# ---------------------------------------------------------------- the review page


def find_chromium() -> str:
    """VKR_CHROMIUM if set, else `chromium` on PATH. Without a browser the test fails, it
    never skips: a skipped review-page test would hide that nobody tested it."""
    named = os.environ.get("VKR_CHROMIUM")
    if named:
        found = shutil.which(named)
        if found is None:
            pytest.fail(f"VKR_CHROMIUM={named!r} is not an executable: {CHROMIUM_HELP}")
        return found
    found = shutil.which("chromium")
    if found is None:
        pytest.fail(f"no `chromium` on PATH: {CHROMIUM_HELP}")
    return found


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's chromium under Playwright; a missing browser fails the test, it never skips."""
    executable = find_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def open_page(browser: Any, url: str) -> Any:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    page.errors = errors
    return page


def wait_for_label(pilot_dir: Path, item_id: str, field: str, value: str) -> None:
    """Wait until the page's save of an item reached labels.sqlite."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open_pilot(pilot_dir).labels() as store:
            current = [lab for lab in store.current() if lab.item_id == item_id]
        if any(getattr(lab, field) == value for lab in current):
            return
        time.sleep(0.05)
    raise AssertionError(f"no label of {item_id} with {field}={value!r} was saved")


def saved(page: Any, text: str) -> None:
    page.wait_for_function(
        "t => document.getElementById('status').textContent.includes(t)", arg=text
    )


def test_review_page_labels_by_click_and_keyboard_and_keeps_them_across_reloads(recorded, tmp_path):
    recorded.server.set_policy({"model_steps": {f"fake-c|{STEP}": {"malformed": 0.5}}})
    pilot(recorded, tmp_path / "p", model="fake-c")
    opened = open_pilot(tmp_path / "p")
    human = [i for i in opened.items if not i.auto_label]
    auto = [i for i in opened.items if i.auto_label]
    assert auto and len(human) >= 3

    with ReviewServer(tmp_path / "p") as server, chromium() as browser:
        page = open_page(browser, server.url)
        page.fill("#annotator", "alice")
        page.press("#annotator", "Enter")
        # Opens at the first item that still needs a person (pre-labelled ones are done).
        page.wait_for_function(
            "id => document.getElementById('item-title').textContent.includes(id)",
            arg=human[0].item_id,
        )
        assert page.locator("figcaption").all_inner_texts() == ["00:00", "00:05", "00:10"]
        assert page.locator("#output dt").all_inner_texts()[:2] == ["problem type", "question"]
        page.click("#label-ok")
        saved(page, "saved: ok")

        # Keyboard: next item, soft failure, category, note.
        page.goto(f"{server.url}?annotator=alice")
        page.wait_for_selector("body[data-ready]")
        page.wait_for_function(
            "id => document.getElementById('item-title').textContent.includes(id)",
            arg=human[1].item_id,
        )
        page.keyboard.press("3")
        saved(page, "now choose a category")
        page.keyboard.press("u")
        saved(page, "saved: soft failure / unsupported step")
        page.keyboard.press("n")
        page.keyboard.type("step 2 claims heat that no frame shows")
        page.keyboard.press("Escape")  # leaving the box saves the note
        wait_for_label(
            tmp_path / "p", human[1].item_id, "note", "step 2 claims heat that no frame shows"
        )
        for _ in range(len(opened.items)):
            title = page.inner_text("#item-title")
            if human[2].item_id in title:
                break
            page.keyboard.press("j")
            # Wait for the next item to render before looking again, or a fast loop overshoots.
            page.wait_for_function(
                "t => document.getElementById('item-title').textContent !== t", arg=title
            )
        page.keyboard.press("f")  # category first, then the label
        saved(page, "press 2 (hard) or 3 (soft)")
        page.keyboard.press("2")
        saved(page, "saved: hard failure / format")
        # An auto-labelled item says so.
        page.click(f"nav button[data-item='{auto[0].item_id}']")
        assert "Pre-labelled: hard failure" in page.inner_text("#auto-banner")

        page.reload()
        page.wait_for_selector("body[data-ready]")
        assert page.input_value("#annotator") == "alice"
        if len(human) > 3:  # resumes at the first item alice has not labelled
            page.wait_for_function(
                "id => document.getElementById('item-title').textContent.includes(id)",
                arg=human[3].item_id,
            )
        classes = {
            i.item_id: page.get_attribute(f"nav button[data-item='{i.item_id}']", "class")
            for i in human[:3]
        }
        assert [c.split()[0] for c in classes.values()] == ["ok", "soft", "hard"]
        page.click(f"nav button[data-item='{human[1].item_id}']")
        assert page.input_value("#note") == "step 2 claims heat that no frame shows"
        # Changing a label keeps the old one in the history.
        page.keyboard.press("1")
        saved(page, "saved: ok (changed")
        assert page.inner_text("#progress") == f"{len(auto) + 3} / 8 labelled"
        assert not page.errors

    db = sqlite3.connect(tmp_path / "p" / "labels.sqlite")
    rows = db.execute(
        "SELECT item_id, label, category, note, superseded_by IS NULL, created_at "
        "FROM labels WHERE annotator = 'alice' ORDER BY id"
    ).fetchall()
    current = {r[0]: r[1:4] for r in rows if r[4]}
    assert current == {
        human[0].item_id: ("ok", None, ""),
        human[1].item_id: ("ok", None, "step 2 claims heat that no frame shows"),
        human[2].item_id: ("hard", "format", ""),
    }
    history = [r[1:4] for r in rows if r[0] == human[1].item_id]
    assert history[0] == ("soft", None, "") and history[-1][0] == "ok"
    assert ("soft", "unsupported step", "step 2 claims heat that no frame shows") in history
    assert all(r[5] for r in rows)


def test_review_server_refuses_other_hosts_and_serves_only_pilot_frames(recorded, tmp_path):
    recorded.server.set_policy({})
    pilot(recorded, tmp_path / "p", n=2)
    with pytest.raises(InputError, match=r"serves on 127.0.0.1 only, not on '0.0.0.0'"):
        ReviewServer(tmp_path / "p", host="0.0.0.0")
    result = invoke("qualify", "review", tmp_path / "p", "--host", "192.168.1.10")
    assert result.exit_code == 1 and "127.0.0.1 only" in result.output
    (tmp_path / "secret.txt").write_text("not for the browser")
    frame = open_pilot(tmp_path / "p").items[0].frames[0]

    def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    with ReviewServer(tmp_path / "p") as server:
        status, body = get(f"{server.url}frames/{frame.sha256}.jpg")
        assert status == 200 and body[:2] == b"\xff\xd8"
        for path in (
            "frames/../secret.txt",
            "frames/%2e%2e/secret.txt",
            "../secret.txt",
            f"frames/{'0' * 64}.jpg",
        ):
            status, body = get(server.url + path)
            assert status == 404 and b"not for the browser" not in body
        # A page on another origin that rebinds its name to 127.0.0.1 is turned away.
        status, body = get(server.url + "api/pilot", {"Host": "attacker.example:80"})
        assert status == 403
        post = urllib.request.Request(
            server.url + "api/labels",
            method="POST",
            data=json.dumps({"item_id": "nope", "annotator": "a", "label": "ok"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(post, timeout=10)
        assert error.value.code == 400 and b"has no item 'nope'" in error.value.read()
        form = urllib.request.Request(
            server.url + "api/labels",
            method="POST",
            data=b"label=ok",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(form, timeout=10)
        assert error.value.code == 415


# ---------------------------------------------------------------- end to end


def test_pilots_labels_and_scores_decide_where_the_next_run_sends_calls(
    recorded, tmp_path, testdata
):
    """fake-b breaks half its replies: after pilots, labels and scoring, only fake-a generates."""
    recorded.server.set_policy({"model_steps": {f"fake-b|{STEP}": {"malformed": 0.5}}})
    for model in ("fake-a", "fake-b"):
        result = invoke(
            "qualify",
            "pilot",
            "--step",
            STEP,
            "--model",
            model,
            "--pool",
            recorded.pool,
            "--n",
            8,
            "--from",
            recorded.run,
            "--out",
            tmp_path / model,
        )
        assert result.exit_code == 0, result.output
    pilot_a, pilot_b = open_pilot(tmp_path / "fake-a"), open_pilot(tmp_path / "fake-b")
    assert not any(i.auto_label for i in pilot_a.items)
    assert any(i.auto_label for i in pilot_b.items)

    # An expert labels three of fake-a's items in the browser ...
    with ReviewServer(tmp_path / "fake-a", annotator="alice") as server, chromium() as browser:
        page = open_page(browser, server.url)
        for item in pilot_a.items[:3]:
            page.wait_for_function(
                "id => document.getElementById('item-title').textContent.includes(id)",
                arg=item.item_id,
            )
            page.keyboard.press("1")
            saved(page, "saved: ok")
            page.keyboard.press("j")
    # ... and another labels the rest, and fake-b's content, in Label Studio.
    for model, opened in (("fake-a", pilot_a), ("fake-b", pilot_b)):
        tasks = tmp_path / f"{model}.json"
        export_labels(opened, "labelstudio", tasks)
        todo = {
            i.item_id: ("ok", None, "")
            for i in opened.items[3 if model == "fake-a" else 0 :]
            if not i.auto_label
        }
        export = tmp_path / f"{model}-export.json"
        export.write_text(json.dumps(labelstudio_export(tasks, todo, 3)))
        result = invoke("qualify", "import", tmp_path / model, export, "--format", "labelstudio")
        assert result.exit_code == 0, result.output

    registry = tmp_path / "registry.yaml"
    others = yaml.safe_load((recorded.root / "eligibility.yaml").read_text())
    del others[STEP]  # generation is decided by the pilots alone
    registry.write_text(yaml.safe_dump(others))
    result = invoke(
        "qualify", "score", tmp_path / "fake-a", tmp_path / "fake-b", "--registry", registry
    )
    assert result.exit_code == 0, result.output
    loaded = load_registry(registry)
    a, b = loaded.entry(STEP, "fake-a"), loaded.entry(STEP, "fake-b")
    broken = sum(1 for i in pilot_b.items if i.auto_label)
    assert (a.eligible, a.n, a.error_rate, a.annotators) == (
        True,
        8,
        0.0,
        ["alice", "labelstudio-user-3"],
    )
    assert (b.eligible, b.hard, b.error_rate) == (False, broken, broken / 8)

    table = invoke(
        "qualify", "table", "--registry", registry, "--pool", recorded.pool, "--markdown"
    )
    assert "| `example_generation` | ✓ | ✗ | ? | ? |" in table.output

    pool = yaml.safe_load(recorded.pool.read_text())
    pool["registry"] = str(registry)
    (tmp_path / "pool.yaml").write_text(yaml.safe_dump(pool))
    recorded.server.reset_stats()
    video = make_video(tmp_path, testdata, "fresh1", "biology")
    [record] = asyncio.run(
        process_items([video], tmp_path / "run", tmp_path / "pool.yaml", RunConfig(), recorded.pm)
    )
    assert record.status == "done"
    by_model_step = recorded.server.stats()["by_model_step"]
    generation = {k: v for k, v in by_model_step.items() if k.endswith(f"|{STEP}")}
    assert generation == {f"fake-a|{STEP}": 6}
