"""`vkr audit`: a stratified sample of a fake run's accepted examples, labelled in a real
browser and from ground truth; rates with Wilson intervals; flagged examples dropped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from corpus.exporters import load_accepted
from experts.audit import AuditLabels, AuditLayout, load_audit, wilson
from experts.audit_review import AuditServer
from plugins.providers.fake_server import FakeModelServer, find_tag, truth_for_tag, write_pool
from vkr_core.plugins import get_plugin_manager

VKR = str(Path(sys.executable).parent / "vkr")
# The generator writes the question's common mistake for 30 % of questions and the
# self-consistency solver makes that same mistake half the time: of the accepted examples,
# 0.3 * 0.5 / (0.3 * 0.5 + 0.7 * 0.5) = 30 % carry a wrong answer.
MISTAKE = 0.3
POLICY = {
    "steps": {
        "example_generation": {"mistake": MISTAKE},
        "self_consistency": {"accuracy": 0.5, "mistake": 1.0},
        "video_dependency": {"accuracy": 0.0},
        "cot_verification": {"cot_pass": 1.0},
        "judge_equivalence": {"accuracy": 1.0},
    }
}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def vkr(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([VKR, *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"vkr {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished run of 16 videos against the fake server under POLICY."""
    from videos import video_dir

    root = tmp_path_factory.mktemp("audit-run")
    server = FakeModelServer(policy=POLICY, seed=0)
    url = server.start()
    try:
        pool = write_pool(
            root / "pool.yaml", url, registry_path=root / "elig.yaml", pm=get_plugin_manager()
        )
        (root / "videos").mkdir()
        lines = []
        for i in range(16):
            shutil.copy(video_dir() / "flipping_a_pancake.mkv", root / "videos" / f"v{i}.mkv")
            lines.append(
                {
                    "video_id": f"v{i}",
                    "path": f"v{i}.mkv",
                    "discipline": "cooking",
                    "subject": "batter cookery",
                    "knowledge_point": "Maillard reaction",
                    "title": f"Pancake flip number {i} <b>bold</b>",
                }
            )
        manifest = root / "videos" / "manifest.jsonl"
        manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
        run = root / "run"
        vkr(
            "run",
            "--videos",
            str(manifest),
            "--pool",
            str(pool),
            "--out",
            str(run),
            "--no-progress",
        )
        yield run
    finally:
        server.stop()


def is_wrong(example: Any) -> bool:
    truth = truth_for_tag(find_tag([example.question]) or "")
    return example.solution != f"<answer>{truth}</answer>"


def test_labels_from_ground_truth_give_a_rate_whose_interval_holds_the_known_share(
    run_dir: Path, tmp_path: Path
) -> None:
    population = load_accepted([run_dir])
    known = sum(is_wrong(e) for e in population) / len(population)
    assert 0.15 < known < 0.45, known  # the policy's 30 %, give or take the draw

    result = vkr("audit", str(run_dir), "--n", "30", "--seed", "7", "--out", str(tmp_path / "a"))
    assert f"sampled 30 of {len(population)} accepted examples" in result.stdout
    manifest, items = load_audit(tmp_path / "a")
    assert len({i.item_id for i in items}) == 30
    # Every stratum (skill | generation model) is represented, a few each at least.
    for stratum, row in manifest.strata.items():
        assert row["sampled"] >= min(3, row["population"]) - 1, stratum
    assert all(i.frames and i.frames[0].clock == "00:00" for i in items)

    # Same seed, same sample; another seed, another sample.
    vkr("audit", str(run_dir), "--n", "30", "--seed", "7", "--out", str(tmp_path / "b"))
    vkr("audit", str(run_dir), "--n", "30", "--seed", "8", "--out", str(tmp_path / "c"))
    ids = [i.item_id for i in items]
    assert [i.item_id for i in load_audit(tmp_path / "b")[1]] == ids
    assert [i.item_id for i in load_audit(tmp_path / "c")[1]] != ids

    with AuditLabels(AuditLayout(tmp_path / "a").labels) as store:
        for item in items:
            label = "trace_error" if is_wrong(item.example) else "ok"
            store.set(item.item_id, "oracle", label, source="test")
    result = vkr("audit", "score", str(tmp_path / "a"))
    score = json.loads((tmp_path / "a" / "score.json").read_text())
    rate = score["overall"]["trace_error"]
    assert rate["low"] <= known <= rate["high"], (known, rate)
    assert rate["low"] <= MISTAKE <= rate["high"], rate
    assert rate["count"] == sum(is_wrong(i.example) for i in items)
    assert (rate["low"], rate["high"]) == pytest.approx(wilson(rate["count"], 30))
    assert set(score["by_skill"]) == {e.skill for e in population}
    assert set(score["by_trace_model"]) == {i.trace_model for i in items}
    assert "trace error that changes the answer" in result.stdout
    assert (tmp_path / "a" / "score.md").read_text().count("| skill: ") == len(score["by_skill"])


def test_wilson_interval_matches_the_textbook_values() -> None:
    # Newcombe (1998), Table I: 5 of 10 -> 0.2366-0.7634; 0 of 10 -> 0-0.2775.
    assert [round(x, 4) for x in wilson(5, 10)] == [0.2366, 0.7634]
    assert [round(x, 4) for x in wilson(0, 10)] == [0.0, 0.2775]
    # The paper's 17 trace errors in 800.
    assert [round(x, 4) for x in wilson(17, 800)] == [0.0133, 0.0338]


def test_drop_removes_exactly_the_flagged_examples_from_the_split(
    run_dir: Path, tmp_path: Path
) -> None:
    split = tmp_path / "split"
    vkr("split", str(run_dir), "--out", str(split))
    before = {
        side: [json.loads(line)["problem_id"] for line in (split / f"{side}.jsonl").open()]
        for side in ("sft", "rl")
    }
    vkr("audit", str(split), "--n", "12", "--out", str(tmp_path / "a"))
    _, items = load_audit(tmp_path / "a")
    flagged = {items[0].item_id: "not_grounded", items[1].item_id: "unsupported_step"}
    with AuditLabels(AuditLayout(tmp_path / "a").labels) as store:
        for item in items[:6]:
            store.set(item.item_id, "alice", flagged.get(item.item_id, "ok"))
        # Flagged, then judged ok after all: the current label decides.
        store.set(items[2].item_id, "alice", "trace_error")
        store.set(items[2].item_id, "alice", "ok")
        store.set(items[3].item_id, "bob", "trace_error")
    flagged[items[3].item_id] = "trace_error"

    result = vkr("audit", "drop", str(tmp_path / "a"), "--split", str(split))
    assert "removed 3 flagged example(s)" in result.stdout
    after = {
        side: [json.loads(line)["problem_id"] for line in (split / f"{side}.jsonl").open()]
        for side in ("sft", "rl")
    }
    for side in ("sft", "rl"):
        assert after[side] == [pid for pid in before[side] if pid not in flagged]
    manifest = json.loads((split / "split.json").read_text())
    assert (
        manifest["sft"]["examples"] + manifest["rl"]["examples"]
        == sum(len(v) for v in before.values()) - 3
    )
    # The split still exports.
    vkr("export", "--format", "videokr", "--input", str(split), "--out", str(tmp_path / "x"))


def test_a_missing_source_is_one_line(tmp_path: Path) -> None:
    result = vkr("audit", str(tmp_path / "nope"), "--out", str(tmp_path / "a"), check=False)
    assert result.returncode != 0
    assert "is not a folder" in result.stderr and "Traceback" not in result.stderr


def test_label_studio_round_trip_stores_labels_and_refuses_silent_overwrites(
    run_dir: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "a"
    vkr("audit", str(run_dir), "--n", "4", "--out", str(audit))
    _, items = load_audit(audit)
    result = vkr(
        "audit", "export", str(audit), "--format", "labelstudio", "--out", str(tmp_path / "t.json")
    )
    assert "t.config.xml" in result.stdout
    config = (tmp_path / "t.config.xml").read_text()
    assert '<Choice value="trace error that changes the answer"/>' in config
    tasks = json.loads((tmp_path / "t.json").read_text())
    assert [t["data"]["item_id"] for t in tasks] == [i.item_id for i in items]
    assert tasks[0]["data"]["frame_times"] == [f.clock for f in items[0].frames]
    assert tasks[0]["data"]["question"].startswith(items[0].example.question)

    def annotate(choice: str, note: str = "") -> None:
        # What Label Studio's JSON export gives back: the tasks with their annotations.
        annotations = [(7, choice, note), ({"email": "bo@x.org"}, "ok", "")]
        for task, (who, label, text) in zip(tasks[:2], annotations, strict=True):
            result = [
                {
                    "from_name": "label",
                    "to_name": "trace",
                    "type": "choices",
                    "value": {"choices": [label]},
                }
            ]
            if text:
                result.append(
                    {
                        "from_name": "note",
                        "to_name": "trace",
                        "type": "textarea",
                        "value": {"text": [text]},
                    }
                )
            task["annotations"] = [{"completed_by": who, "result": result}]
        (tmp_path / "done.json").write_text(json.dumps(tasks))

    annotate("not visually grounded", "no frame shows the pan")
    result = vkr(
        "audit", "import", str(audit), str(tmp_path / "done.json"), "--format", "labelstudio"
    )
    assert "2 new, 0 changed" in result.stdout
    with AuditLabels(AuditLayout(audit).labels) as store:
        current = {(r["item_id"], r["annotator"]): (r["label"], r["note"]) for r in store.current()}
    assert current == {
        (items[0].item_id, "labelstudio-user-7"): ("not_grounded", "no frame shows the pan"),
        (items[1].item_id, "bo@x.org"): ("ok", ""),
    }

    annotate("unsupported step")
    refused = vkr(
        "audit",
        "import",
        str(audit),
        str(tmp_path / "done.json"),
        "--format",
        "labelstudio",
        check=False,
    )
    assert refused.returncode != 0 and "nothing was imported" in refused.stderr
    assert "Traceback" not in refused.stderr
    result = vkr(
        "audit",
        "import",
        str(audit),
        str(tmp_path / "done.json"),
        "--format",
        "labelstudio",
        "--overwrite",
    )
    assert "0 new, 1 changed, 1 unchanged" in result.stdout
    with AuditLabels(AuditLayout(audit).labels) as store:
        history = [r["label"] for r in store.history(items[0].item_id, "labelstudio-user-7")]
    assert history == ["not_grounded", "unsupported_step"]

    tasks[0]["data"]["item_id"] = "not-sampled"
    (tmp_path / "done.json").write_text(json.dumps(tasks))
    refused = vkr(
        "audit",
        "import",
        str(audit),
        str(tmp_path / "done.json"),
        "--format",
        "labelstudio",
        check=False,
    )
    assert "1 example(s) this audit did not sample: not-sampled" in refused.stderr


# ---------------------------------------------------------------- the page, in Chromium


def find_chromium() -> str:
    named = os.environ.get("VKR_CHROMIUM") or "chromium"
    found = shutil.which(named)
    if found is None:
        pytest.fail(f"no Chromium ({named!r}): apt-get install -y chromium or set VKR_CHROMIUM")
    return found


@contextmanager
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def saved(page: Any, text: str) -> None:
    page.wait_for_function(
        "t => document.getElementById('status').textContent.includes(t)", arg=text
    )


def test_page_labels_by_click_and_key_resumes_after_reload_and_keeps_history(
    run_dir: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "a"
    vkr("audit", str(run_dir), "--n", "8", "--out", str(audit))
    _, items = load_audit(audit)
    # Model output is untrusted: markup in a question or trace is shown as text, never run.
    hostile = '<img src=x onerror="document.body.dataset.pwned=1"><b>bold</b>'
    lines = (audit / "sample.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["example"]["question"] += hostile
    first["example"]["think"] = first["example"]["think"].replace("</think>", hostile + "</think>")
    lines[0] = json.dumps(first)
    (audit / "sample.jsonl").write_text("\n".join(lines) + "\n")
    _, items = load_audit(audit)
    with AuditServer(audit) as server, chromium() as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector("body[data-ready]")
        page.fill("#annotator", "alice")
        page.press("#annotator", "Enter")
        page.wait_for_function(
            "id => document.getElementById('item-title').textContent.includes(id)",
            arg=items[0].item_id,
        )
        clocks = page.locator("figcaption").all_inner_texts()
        assert clocks == [f.clock for f in items[0].frames]
        assert page.inner_text("#question") == items[0].example.question
        assert "Therefore the answer is" in page.inner_text("#trace")
        assert page.inner_text("#trace").endswith(hostile)
        assert page.locator("#item b, #item img[src=x]").count() == 0
        assert page.evaluate("document.body.dataset.pwned") is None

        page.click("#label-ok")  # a click
        saved(page, "saved: ok")
        page.keyboard.press("j")
        page.keyboard.press("2")  # keys: not visually grounded
        saved(page, "saved: not visually grounded")
        page.keyboard.press("n")
        page.keyboard.type("step 1 names an action no frame shows")
        page.keyboard.press("Escape")  # leaving the box saves the note
        page.keyboard.press("j")
        page.keyboard.press("3")
        saved(page, "saved: trace error that changes the answer")

        # Reload: the labels are there and the page resumes at the first unlabelled example.
        page.reload()
        page.wait_for_selector("body[data-ready]")
        page.wait_for_function(
            "id => document.getElementById('item-title').textContent.includes(id)",
            arg=items[3].item_id,
        )
        assert page.inner_text("#progress") == f"3 / {len(items)} labelled"

        # Change a label: the new one is current, the old one kept in the history.
        page.click(f"nav button[data-item='{items[1].item_id}']")
        assert page.input_value("#note") == "step 1 names an action no frame shows"
        page.keyboard.press("4")
        saved(page, "saved: unsupported step (changed 2×, history kept)")
        assert errors == []

    with AuditLabels(AuditLayout(audit).labels) as store:
        current = {row["item_id"]: row["label"] for row in store.current("alice")}
        history = [row["label"] for row in store.history(items[1].item_id, "alice")]
        note = store.history(items[1].item_id, "alice")[-1]["note"]
    assert current == {
        items[0].item_id: "ok",
        items[1].item_id: "unsupported_step",
        items[2].item_id: "trace_error",
    }
    assert history == ["not_grounded", "not_grounded", "unsupported_step"]
    assert note == "step 1 names an action no frame shows"


def test_page_serves_loopback_only_and_refuses_a_foreign_host(
    run_dir: Path, tmp_path: Path
) -> None:
    import http.client

    from vkr_core.schemas import InputError

    vkr("audit", str(run_dir), "--n", "3", "--out", str(tmp_path / "a"))
    with pytest.raises(InputError, match="127.0.0.1 only"):
        AuditServer(tmp_path / "a", host="0.0.0.0")
    with AuditServer(tmp_path / "a") as server:
        port = server.httpd.server_address[1]
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/api/audit", headers={"Host": "evil.example:80"})
        assert conn.getresponse().status == 403
        conn = http.client.HTTPConnection("127.0.0.1", port)
        body = json.dumps({"item_id": "nope", "annotator": "a", "label": "ok"})
        conn.request("POST", "/api/labels", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 400 and "no example 'nope'" in response.read().decode()
