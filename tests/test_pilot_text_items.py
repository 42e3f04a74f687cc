"""Qualification pilots of text steps: items named by their own id, stratified by discipline.

The inputs are recorded by real runs (``vkr bank build``; metadata_relevance through the
engine) against the fake model server over HTTP; the pilots run through ``vkr qualify``; the
review page is checked in a real headless Chromium.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_qualify import chromium, open_page, saved, wait_for_label

from knowledge.loader import example_bank_path, load_bank
from plugins.providers.fake_server import FakeModelServer, write_pool
from plugins.steps.relevance import CandidateVideo, KnowledgeContext, judge_metadata
from qualification.interchange import export_labels, import_labels
from qualification.models import PilotItem
from qualification.pilot import open_pilot
from qualification.review import ReviewServer
from vkr_core.config import RunConfig
from vkr_core.context import StepContext
from vkr_core.plugins import get_plugin_manager
from vkr_core.run import Run
from vkr_core.store import RunLayout

VKR = str(Path(sys.executable).parent / "vkr")

NEWTON = KnowledgeContext(
    term="Newton's second law",
    definition="The net force on a body equals its mass times its acceleration.",
    scenario="A rocket lifting off, accelerating faster as its fuel burns away.",
    discipline="Science",
    subject="Physics",
)
GEARS = KnowledgeContext(
    term="Gear ratio",
    definition="The ratio of the teeth of two meshing gears, which sets their speeds.",
    scenario="A cyclist shifting to a larger rear sprocket to climb a hill.",
    discipline="Engineering",
    subject="Mechanical Engineering",
)


def vkr(*args: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([VKR, *map(str, args)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(
            f"vkr {args[:2]} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def candidates(prefix: str, n: int) -> list[CandidateVideo]:
    # YouTube ids may start with '-': a candidate's id is its pilot item's id as it is.
    return [
        CandidateVideo(
            video_id=f"-{prefix}{i:07d}",
            title=f"{prefix} clip {i}",
            description="Filmed outdoors.",
            duration_s=60 + i,
        )
        for i in range(n)
    ]


async def judge(run_dir: Path, pool: Path, pm: Any) -> None:
    """metadata_relevance on 6 Science and 3 Engineering candidates, as a collection run would."""
    pairs = [(c, NEWTON) for c in candidates("sci", 6)] + [(c, GEARS) for c in candidates("eng", 3)]
    async with Run(run_dir, pool, RunConfig(pipeline="bank"), pm) as run:
        await asyncio.gather(
            *(judge_metadata(StepContext(run.context, item_id=c.video_id), c, k) for c, k in pairs)
        )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A built example bank (5 lectures: 3 Science, 2 Engineering) and a run of the judge."""
    root = tmp_path_factory.mktemp("text-pilots")
    pm = get_plugin_manager()
    server = FakeModelServer(seed=0)
    url = server.start()
    try:
        pool = write_pool(root / "pool.yaml", url, registry_path=root / "eligibility.yaml", pm=pm)
        bank = root / "bank"
        vkr(
            "bank",
            "build",
            "--bank",
            example_bank_path(),
            "--pool",
            pool,
            "--out",
            bank,
            "--no-progress",
        )
        asyncio.run(judge(root / "judged", pool, pm))
        yield SimpleNamespace(root=root, pool=pool, bank=bank, judged=root / "judged", pm=pm)
    finally:
        server.stop()


def pilot(recorded: Any, step: str, source: Path, n: int, out: Path) -> tuple[str, Any]:
    result = vkr(
        "qualify", "pilot", "--step", step, "--model", "fake-b", "--pool", recorded.pool,
        "--n", n, "--from", source, "--out", out,
    )  # fmt: skip
    return result.stdout, open_pilot(out)


def test_text_step_inputs_record_their_item_and_its_discipline(recorded):
    lectures = {lec.lecture_id: lec for lec in load_bank(example_bank_path()).lectures}
    inputs = [
        json.loads(line)
        for line in RunLayout(recorded.bank).inputs("knowledge_points").read_text().splitlines()
    ]
    assert {i["item_id"] for i in inputs} == set(lectures)
    for line in inputs:
        lecture = lectures[line["item_id"]]
        assert (line["discipline"], line["subject"]) == (lecture.discipline, lecture.subject)
        assert "video_id" not in line and line["frames"] == []


def test_a_knowledge_points_pilot_names_lectures_and_balances_disciplines(recorded, tmp_path):
    stdout, opened = pilot(recorded, "knowledge_points", recorded.bank, 4, tmp_path / "p")
    # 3 Science and 2 Engineering lectures: 4 of them are 2.4 and 1.6, rounded to 2 and 2.
    assert opened.manifest.strata == {"Engineering / any skill": 2, "Science / any skill": 2}
    assert "strata: Engineering / any skill: 2, Science / any skill: 2" in stdout
    lectures = {lec.lecture_id: lec for lec in load_bank(example_bank_path()).lectures}
    for item in opened.items:
        lecture = lectures[item.source_item_id]
        assert (item.discipline, item.subject) == (lecture.discipline, lecture.subject)
        assert item.video_id is None and item.video_path is None and item.frames == []
        assert item.outcome == "ok" and item.parsed and item.parsed["points"]
    assert "None" not in (tmp_path / "p" / "items.jsonl").read_text().replace("null", "")


def test_a_relevance_judge_pilot_names_candidates_and_balances_disciplines(recorded, tmp_path):
    stdout, opened = pilot(recorded, "metadata_relevance", recorded.judged, 6, tmp_path / "p")
    assert "6 of 9 inputs of metadata_relevance" in stdout
    # 6 Science and 3 Engineering inputs: a pilot of 6 takes 4 and 2.
    assert opened.manifest.strata == {"Engineering / any skill": 2, "Science / any skill": 4}
    by_discipline = {
        "Science": ("-sci", "Physics"),
        "Engineering": ("-eng", "Mechanical Engineering"),
    }
    for item in opened.items:
        prefix, subject = by_discipline[item.discipline]
        assert item.source_item_id.startswith(prefix) and item.subject == subject
        assert item.video_id is None and item.frames == []


def test_the_review_page_shows_a_text_item_by_its_id_without_frames(recorded, tmp_path):
    _, opened = pilot(recorded, "knowledge_points", recorded.bank, 3, tmp_path / "p")
    first = opened.items[0]
    with ReviewServer(tmp_path / "p") as server, chromium() as browser:
        page = open_page(browser, server.url)
        page.fill("#annotator", "alice")
        page.press("#annotator", "Enter")
        page.wait_for_function(
            "id => document.getElementById('item-title').textContent.includes(id)",
            arg=first.item_id,
        )
        title = page.inner_text("#item-title")
        assert f"item {first.source_item_id}" in title
        assert f"{first.discipline} / {first.subject}" in title
        assert "None" not in title and "undefined" not in title and "null" not in title
        # No frames: no frames section at all, neither heading nor empty box.
        assert not page.is_visible("#frames-head") and not page.is_visible("#frames")
        assert page.locator("#frames img").count() == 0
        assert page.is_visible("text=What the model was asked")
        assert page.locator("#output dt").all_inner_texts()[0] == "points"
        page.keyboard.press("3")
        saved(page, "now choose a category")
        page.keyboard.press("h")
        saved(page, "saved: soft failure / hallucination")
        assert not page.errors
    wait_for_label(tmp_path / "p", first.item_id, "category", "hallucination")


def test_text_item_labels_round_trip_through_label_studio_and_argilla(recorded, tmp_path):
    _, opened = pilot(recorded, "metadata_relevance", recorded.judged, 4, tmp_path / "p")
    tasks_file = tmp_path / "ls" / "tasks.json"
    export_labels(opened, "labelstudio", tasks_file)
    config = (tmp_path / "ls" / "tasks.config.xml").read_text()
    assert "<Image" not in config and 'name="prompt"' in config
    tasks = json.loads(tasks_file.read_text())
    for task, item in zip(tasks, opened.items, strict=True):
        data = task["data"]
        assert "video" not in data and "frames" not in data
        assert data["source_item_id"] == item.source_item_id
        assert data["discipline"] == item.discipline and data["item_id"] == item.item_id
        # What Label Studio's JSON export gives back: the task with an annotation.
        task["annotations"] = [
            {
                "completed_by": {"id": 3, "email": "erin@lab.org"},
                "result": [
                    {
                        "from_name": "label",
                        "to_name": "output",
                        "type": "choices",
                        "value": {"choices": ["ok"]},
                    }
                ],
            }
        ]
    export = tmp_path / "ls" / "export.json"
    export.write_text(json.dumps(tasks))
    report = import_labels(opened, "labelstudio", export)
    assert report.created == 4
    with opened.labels() as store:
        assert {lab.item_id for lab in store.current("erin@lab.org")} == {
            i.item_id for i in opened.items
        }

    out = tmp_path / "argilla"
    export_labels(opened, "argilla", out)
    settings = json.loads((out / ".argilla" / "settings.json").read_text())
    assert [f["name"] for f in settings["fields"]] == ["prompt", "output"]
    records = json.loads((out / "records.json").read_text())
    for record, item in zip(records, opened.items, strict=True):
        assert set(record["fields"]) == {"prompt", "output"}
        assert record["metadata"]["source_item_id"] == item.source_item_id
        assert record["metadata"]["discipline"] == item.discipline
        record["responses"] = {"label": [{"value": "soft failure", "user_id": "u-fay"}]}
        record["responses"]["category"] = [{"value": "other", "user_id": "u-fay"}]
    (out / "records.json").write_text(json.dumps(records))
    import_labels(opened, "argilla", out)
    with opened.labels() as store:
        fay = store.current("u-fay")
    assert {(lab.item_id, lab.label) for lab in fay} == {(i.item_id, "soft") for i in opened.items}


def test_a_pilot_item_written_before_text_items_still_loads():
    old = {
        "item_id": "abc123def456",
        "index": 0,
        "input_key": "k",
        "input_sha256": "0" * 64,
        "video_id": "cooking1",
        "discipline": "cooking",
        "frames": [],
        "messages": [],
        "prompt": "",
        "outcome": "ok",
        "output": "{}",
    }
    item = PilotItem.model_validate(old)
    assert (item.source_item_id, item.video_id) == ("cooking1", "cooking1")
