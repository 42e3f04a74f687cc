"""`vkr reannotate`: new grounded questions on probe-filtered videos, written in a real
browser, saved with history, merged with the kept questions into a file `vkr probe` reads."""

from __future__ import annotations

import json
import shutil
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_qualify import chromium, open_page, saved

from cli import cli
from corpus.probe import ProbeOptions, load_eval_set, run_probe, video_key
from experts.reannotate import (
    DB_FILE,
    PROVENANCE_KIND,
    ReannotateServer,
    new_item_id,
    open_store,
    save_item,
)
from plugins.providers.fake_server import make_tag, truth_for_tag

OPTIONS = [
    "A. The pan is tilted",
    "B. The batter is poured",
    "C. The pancake is flipped",
    "D. The stove is turned off",
]


def _question(number: int, kind: str = "mc") -> dict[str, Any]:
    tag = make_tag(f"{number:08x}", kind)
    row: dict[str, Any] = {
        "id": f"q{number}",
        "video_path": "pancake.mkv",
        # Untrusted text: the page must show it, not run it.
        "question": f"{tag} <img src=x onerror=window.pwned=1> What does the cook do?",
    }
    if kind == "mc":
        row["options"] = OPTIONS
    row.update(
        problem_type="multiple-choice" if kind == "mc" else "open-ended",
        solution=f"<answer>{truth_for_tag(tag)}</answer>",
        dataset="bench-a",
        subject="cooking",
        skill="temporal",
    )
    return row


@pytest.fixture
def probed(tmp_path, testdata, vkr_pool, vkr_fake_server, vkr_plugin_manager) -> Path:
    """A real `vkr probe` output: some questions kept, some filtered; its frames in a
    --frames-dir of their own, which the page finds through the probe's config."""
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(testdata / "flipping_a_pancake.mkv", videos / "pancake.mkv")
    rows = [_question(n) for n in range(10)] + [_question(99, "oe")]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    vkr_fake_server.set_policy({"accuracy": 0.6})
    run_probe(
        eval_file,
        videos,
        vkr_pool,
        tmp_path / "probe",
        ProbeOptions(frames_dir=tmp_path / "shared-frames"),
        pm=vkr_plugin_manager,
    )
    out = tmp_path / "probe"
    kept = (out / "kept.jsonl").read_text().splitlines()
    filtered = (out / "filtered.jsonl").read_text().splitlines()
    assert kept and len(filtered) >= 2, "the fake's 0.6 accuracy should keep some, filter some"
    return out


def _filtered(probe_out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (probe_out / "filtered.jsonl").read_text().splitlines()]


def _history(out: Path, source_id: str) -> list[dict[str, Any]]:
    """Every version of a question's new item, read from the SQLite file: the item with who
    saved it and how."""
    if not (out / DB_FILE).exists():
        return []
    with sqlite3.connect(out / DB_FILE) as db:
        rows = db.execute(
            "SELECT annotator, action, body, source FROM versions WHERE doc_id = ? ORDER BY id",
            (source_id,),
        ).fetchall()
    return [
        {**json.loads(body), "by": who, "action": action, "via": via}
        for who, action, body, via in rows
    ]


def _title_has(page: Any, source_id: str) -> None:
    page.wait_for_function(
        "id => document.getElementById('item-title').textContent.includes(id)", arg=source_id
    )


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url + "api/items",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_page_writes_reviews_revises_and_resumes(probed, tmp_path):
    """One new question per filtered question: alice writes two, bob (a second annotator)
    approves one as it is and corrects the other; a restarted server shows it all."""
    out = tmp_path / "re"
    first, second = _filtered(probed)[:2]
    with ReannotateServer(probed, out) as server, chromium() as browser:
        page = open_page(browser, server.url)
        page.fill("#annotator", "alice")
        page.press("#annotator", "Enter")
        _title_has(page, first["id"])
        # The filtered question is shown as text, with why it was filtered.
        assert "<img src=x" in page.inner_text("#orig-question")
        assert page.evaluate("window.pwned") is None
        assert "answered from a single frame by" in page.inner_text("#why")
        assert page.inner_text("#review-status") == "not written yet"
        clocks = page.locator("#frames figcaption").all_inner_texts()
        assert clocks[:3] == ["00:00", "00:01", "00:02"]

        page.fill("#question", "What happens after the pancake leaves the pan?")
        page.fill(
            "#options", "It lands back in the pan\nIt falls on the floor\nIt sticks to the ceiling"
        )
        page.fill("#answer", "A")
        page.locator("#frames figure").nth(2).click()
        page.locator("#frames figure").nth(1).focus()  # the keyboard picks a frame too
        page.keyboard.press("Space")
        assert page.inner_text("#grounding") == "00:01, 00:02"
        page.click("#save")
        saved(page, "saved: written")
        assert page.inner_text("#review-status") == "pending review · written by alice"
        assert page.is_hidden("#approve")  # the author does not approve her own question
        [written] = _history(out, first["id"])
        assert (written["by"], written["action"], written["grounding"]) == (
            "alice",
            "written",
            [1.0, 2.0],
        )

        # Resume: a reload opens at the first question not written yet.
        page.reload()
        page.wait_for_selector("body[data-ready]")
        assert page.input_value("#annotator") == "alice"
        _title_has(page, second["id"])
        assert "pending" in page.get_attribute(f"nav button[data-item='{first['id']}']", "class")
        page.fill("#question", "Which happens first?")
        page.select_option("#problem-type", "open-ended")
        page.fill("#answer", "the pour")
        page.locator("#frames figure").nth(0).click()
        page.keyboard.press("Control+Enter")
        saved(page, "saved: written")

        # Her own edit, by keyboard: the old version stays in the history.
        page.click(f"nav button[data-item='{first['id']}']")
        assert page.input_value("#question") == "What happens after the pancake leaves the pan?"
        page.fill("#answer", "It falls on the floor")  # an option's text is stored as its letter
        page.keyboard.press("Control+Enter")
        saved(page, "saved: edited, history kept")
        assert [(v["action"], v["answer"]) for v in _history(out, first["id"])] == [
            ("written", "A"),
            ("edited", "B"),
        ]
        assert page.locator("#history li").count() == 2

        # A refused item says why in one line and changes nothing.
        page.fill("#answer", "E")
        page.click("#save")
        saved(page, "not saved: new item for")
        assert "is not among its options" in page.inner_text("#status")
        assert len(_history(out, first["id"])) == 2
        # Nor may she approve it through the API.
        code, error = _post(
            server.url, {"source_id": first["id"], "annotator": "alice", "approve": True}
        )
        assert code == 400
        assert error["error"] == "alice wrote this new question: a second annotator approves it"

        # Bob, the second annotator, picks what needs his review.
        page.fill("#annotator", "bob")
        page.press("#annotator", "Enter")
        page.select_option("#filter", "review")
        page.wait_for_function("() => document.querySelectorAll('#item-list button').length === 2")
        listed = page.locator("#item-list button").evaluate_all("bs => bs.map(b => b.dataset.item)")
        assert listed == [first["id"], second["id"]]  # not the third, nobody wrote it
        _title_has(page, first["id"])
        assert page.input_value("#answer") == "B"  # alice's current item, to review
        assert "written by alice" in page.inner_text("#status")
        assert page.locator("#history li").all_inner_texts()[0].startswith("written by alice · ")
        # He approves it as it is, by keyboard.
        page.locator("body").focus()
        page.keyboard.press("a")
        saved(page, "approved")
        assert page.inner_text("#review-status") == "approved by bob · written by alice"
        assert page.is_hidden("#approve")
        page.wait_for_function("() => document.querySelectorAll('#item-list button').length === 1")

        # The other he corrects: a revision, which still waits for an approval; then he
        # approves his corrected version.
        page.click(f"nav button[data-item='{second['id']}']")
        assert page.input_value("#answer") == "the pour"
        page.fill("#question", "Which happens first, the pour or the flip?")
        page.click("#save")
        saved(page, "saved: revised, history kept")
        assert page.inner_text("#review-status") == "pending review · written by alice · revised"
        page.click("#approve")
        saved(page, "approved")
        assert [(v["by"], v["action"]) for v in _history(out, second["id"])] == [
            ("alice", "written"),
            ("bob", "revised"),
            ("bob", "approved"),
        ]
        assert page.errors == []

    # Restart the server: everything saved is back, for anyone.
    with ReannotateServer(probed, out) as server, chromium() as browser:
        page = open_page(browser, server.url + "?annotator=carol&show=approved")
        page.wait_for_function("() => document.querySelectorAll('#item-list button').length === 2")
        assert page.input_value("#filter") == "approved"
        _title_has(page, first["id"])
        page.click(f"nav button[data-item='{second['id']}']")
        assert page.input_value("#question") == "Which happens first, the pour or the flip?"
        assert page.inner_text("#review-status") == (
            "approved by bob · written by alice · revised by a second annotator"
        )
        assert [h.split(" · ")[0] for h in page.locator("#history li").all_inner_texts()] == [
            "written by alice",
            "revised by bob",
            "approved by bob",
        ]
        # The author's original stays readable after the revision.
        page.locator("#history li summary").first.click()
        assert "Which happens first?\nanswer: the pour" in page.inner_text("#history li >> nth=0")
        assert "2 / " in page.inner_text("#progress") and "2 approved" in page.inner_text(
            "#progress"
        )
        assert page.errors == []


def test_no_one_approves_or_overwrites_a_version_they_have_not_seen(probed, tmp_path):
    out = tmp_path / "re"
    first = _filtered(probed)[0]
    with ReannotateServer(probed, out) as server, chromium() as browser:
        alice = open_page(browser, server.url + "?annotator=alice")
        _title_has(alice, first["id"])
        alice.fill("#question", "What makes the batter set?")
        alice.select_option("#problem-type", "open-ended")
        alice.fill("#answer", "heat")
        alice.locator("#frames figure").nth(1).click()
        alice.click("#save")
        saved(alice, "saved: written")

        bob = open_page(browser, server.url + "?annotator=bob&show=review")
        _title_has(bob, first["id"])
        assert bob.input_value("#answer") == "heat"
        # Alice edits it while bob reads it: his approval is of a text he has not seen.
        alice.fill("#answer", "the heat of the pan")
        alice.click("#save")
        saved(alice, "saved: edited")
        bob.click("#approve")
        saved(bob, "not saved: ")
        assert "was saved since you opened it (edited by alice at " in bob.inner_text("#status")
        assert bob.input_value("#answer") == "the heat of the pan"  # now he sees it
        assert [v["action"] for v in _history(out, first["id"])] == ["written", "edited"]
        bob.click("#approve")
        saved(bob, "approved")

        # Alice's page still shows her edit: a change typed there is refused, and kept in
        # the form, until she has seen the approval; then it is saved over it.
        alice.fill("#question", "What makes the batter set on the pan?")
        alice.click("#save")
        saved(alice, "was saved since you opened it (approved by bob at ")
        assert alice.input_value("#question") == "What makes the batter set on the pan?"
        assert alice.locator("#history li").count() == 3
        alice.click("#save")
        saved(alice, "saved: edited")
        assert [(v["by"], v["action"]) for v in _history(out, first["id"])] == [
            ("alice", "written"),
            ("alice", "edited"),
            ("bob", "approved"),
            ("alice", "edited"),
        ]
        assert alice.inner_text("#review-status") == "pending review · written by alice"
        assert alice.errors == [] and bob.errors == []


def test_export_merges_kept_unchanged_and_approved_items_that_probe_reads_again(
    probed, tmp_path, vkr_pool, vkr_fake_server, vkr_plugin_manager
):
    out = tmp_path / "re"
    filtered = _filtered(probed)
    with ReannotateServer(probed, out) as server:
        app = server.app
        app.save(
            {
                "source_id": filtered[0]["id"],
                "annotator": "alice",
                "question": "When does the pancake turn over?",
                "problem_type": "open-ended",
                "answer": "after the pan is jerked up",
                "grounding": [2, 3],
            }
        )
        assert (
            app.save({"source_id": filtered[0]["id"], "annotator": "carol", "approve": True})[
                "change"
            ]
            == "approved"
        )
        body = {
            "source_id": filtered[1]["id"],
            "annotator": "bob",
            "question": "Which happens first?",
            "problem_type": "multiple-choice",
            "options": ["the flip", "the pour"],
            "answer": "A",
            "grounding": [0],
        }
        assert app.save(body)["change"] == "written"
        revised = app.save({**body, "annotator": "dave", "answer": "B"})
        assert (revised["change"], revised["status"], revised["revised"]) == (
            "revised",
            "pending",
            True,
        )

    export = ["reannotate", "export", str(out), "--probe", str(probed)]
    result = CliRunner().invoke(cli, [*export, "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    kept = (probed / "kept.jsonl").read_text().splitlines()
    assert f"{len(kept)} kept + 1 re-annotated questions\n" in result.output
    assert "note: 1 new question(s) pending review are not in it" in result.output
    merged = tmp_path / "ev" / "VideoKR_eval.jsonl"
    lines = merged.read_text().splitlines()
    # Every retained item unchanged, byte for byte as JSON, in the probe's order.
    assert [json.loads(line) for line in lines[: len(kept)]] == [json.loads(k) for k in kept]
    [alice] = load_eval_set(merged)[len(kept) :]
    assert alice.question.id == new_item_id(filtered[0]["id"])
    assert alice.question.problem_type == "open-ended" and alice.question.options is None
    assert {k: alice.raw["provenance"][k] for k in ("author", "reviewer", "revised", "status")} == {
        "author": "alice",
        "reviewer": "carol",
        "revised": False,
        "status": "approved",
    }

    # With --include-pending the pending one is in it too, and says so.
    result = CliRunner().invoke(cli, [*export, "--out", str(tmp_path / "ev"), "--include-pending"])
    assert result.exit_code == 0, result.output
    assert "+ 2 re-annotated questions, 1 of them pending review" in result.output
    items = load_eval_set(merged)  # the reader `vkr probe` uses
    new = {i.question.id: i for i in items[len(kept) :]}
    bob = new[new_item_id(filtered[1]["id"])]
    assert bob.question.answer == "B" and bob.question.options == ["the flip", "the pour"]
    provenance = bob.raw["provenance"]
    assert provenance["kind"] == PROVENANCE_KIND
    assert provenance["replaces"] == filtered[1]["id"]
    assert (provenance["status"], provenance["author"], provenance["reviewer"]) == (
        "pending",
        "bob",
        None,
    )
    assert provenance["revised"] is True and provenance["revised_by"] == ["dave"]
    assert provenance["versions"] == 2
    assert bob.raw["grounding_timestamps"] == [0.0]
    assert bob.raw["video_path"] == "pancake.mkv" and bob.raw["skill"] == "temporal"
    assert "solved_by" not in bob.raw and "solving_frames" not in bob.raw

    # Stable ids: exporting again writes the same file.
    before = merged.read_text()
    CliRunner().invoke(cli, [*export, "--out", str(tmp_path / "ev"), "--include-pending"])
    assert merged.read_text() == before

    # The merged set is probed again as it is, new questions included.
    vkr_fake_server.set_policy({"accuracy": 0.0})
    again = run_probe(
        merged,
        tmp_path / "videos",
        vkr_pool,
        tmp_path / "probe2",
        ProbeOptions(),
        pm=vkr_plugin_manager,
    )
    assert again.report["counts"]["questions"] == len(kept) + 2
    reprobed = {json.loads(line)["id"] for line in (tmp_path / "probe2" / "trials.jsonl").open()}
    assert bob.question.id in reprobed  # an open-ended one waits for a --judge, kept unscored
    rekept = {json.loads(line)["id"] for line in (tmp_path / "probe2" / "kept.jsonl").open()}
    assert set(new) <= rekept

    # A question whose video the probe could not read is named, not dropped silently.
    unprobed = {**_filtered(probed)[0], "id": "q-broken", "unprobed_reason": "cannot decode"}
    (probed / "unprobed.jsonl").write_text(json.dumps(unprobed) + "\n")
    noted = CliRunner().invoke(cli, [*export, "--out", str(tmp_path / "ev")])
    assert "note: 1 question(s) the probe could not read are not in it" in noted.output

    # Not a probe output: one line, nothing written.
    wrong = CliRunner().invoke(
        cli, ["reannotate", "export", str(out), "--probe", str(out), "--out", str(tmp_path / "x")]
    )
    assert wrong.exit_code == 1
    assert wrong.output.strip().splitlines() == [
        f"Error: {out} is not a `vkr probe` output folder (no kept.jsonl)"
    ]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"grounding": []}, "no grounding timestamps (pick the frames that show the answer)"),
        ({"answer": "D"}, "answer 'D' is not among its options (A, B)"),
        ({"answer": "the stove"}, "answer 'the stove' is not among its options (A, B)"),
        ({"grounding": [9999]}, "is past the video's last frame"),
    ],
)
def test_ungrounded_or_off_option_items_are_refused_in_one_line(probed, tmp_path, change, message):
    out = tmp_path / "re"
    source = _filtered(probed)[0]
    body = {
        "source_id": source["id"],
        "annotator": "alice",
        "question": "Which happens first?",
        "problem_type": "multiple-choice",
        "options": ["the flip", "the pour"],
        "answer": "A",
        "grounding": [1],
        **change,
    }
    with ReannotateServer(probed, out) as server:
        request = urllib.request.Request(
            server.url + "api/items",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 400
        error = json.loads(refused.value.read())["error"]
        # A page of another host (DNS rebinding) is not answered.
        rebound = urllib.request.Request(server.url + "api/filtered", headers={"Host": "evil.test"})
        with pytest.raises(urllib.error.HTTPError) as forbidden:
            urllib.request.urlopen(rebound, timeout=10)
        assert forbidden.value.code == 403
    assert message in error and "\n" not in error
    assert error.startswith(f"new item for {source['id']}:")
    assert _history(out, source["id"]) == []


def test_an_eval_id_with_a_slash_and_a_space_is_reannotated_and_exported(probed, tmp_path):
    """Benchmarks name questions as they like ("bench a/q 1"): the document store keeps a
    digest of such an id, the page and the export still speak of the question's own."""
    rows = _filtered(probed)
    odd = "bench a/q 1"
    rows[0]["id"] = odd
    (probed / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "re"
    body = {
        "source_id": odd,
        "annotator": "alice",
        "question": "When does the pancake turn over?",
        "problem_type": "open-ended",
        "answer": "after the pan is jerked up",
        "grounding": [2],
    }
    with ReannotateServer(probed, out) as server:
        assert _post(server.url, body)[1]["change"] == "written"
        code, approved = _post(server.url, {"source_id": odd, "annotator": "bob", "approve": True})
        assert (code, approved["status"], approved["source_id"]) == (200, "approved", odd)
        with urllib.request.urlopen(server.url + "api/items", timeout=10) as response:
            assert list(json.loads(response.read())["items"]) == [odd]
    with sqlite3.connect(out / DB_FILE) as db:
        [(stored,)] = db.execute("SELECT DISTINCT doc_id FROM versions").fetchall()
    assert stored.startswith("sha256-")
    run = CliRunner().invoke(
        cli,
        ["reannotate", "export", str(out), "--probe", str(probed), "--out", str(tmp_path / "ev")],
    )
    assert run.exit_code == 0, run.output
    new = load_eval_set(tmp_path / "ev" / "VideoKR_eval.jsonl")[-1]
    assert new.question.id == f"{odd}-re" and new.raw["provenance"]["replaces"] == odd


def test_the_page_takes_items_only_as_json_objects(probed, tmp_path):
    with ReannotateServer(probed, tmp_path / "re") as server:
        refusals = []
        for data, kind in [(b"question=x", "text/plain"), (b"[1]", "application/json")]:
            request = urllib.request.Request(
                server.url + "api/items", data=data, headers={"Content-Type": kind}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            refusals.append((refused.value.code, json.loads(refused.value.read())["error"]))
    assert refusals == [
        (415, "an item is posted as JSON"),
        (400, "an item is a JSON object, not list"),
    ]
    with sqlite3.connect(tmp_path / "re" / DB_FILE) as db:
        assert db.execute("SELECT COUNT(*) FROM versions").fetchone() == (0,)


def test_serve_refuses_a_non_loopback_host_in_one_line(probed, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["reannotate", "serve", str(probed), "--out", str(tmp_path / "re"), "--host", "0.0.0.0"],
    )
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "serves on 127.0.0.1 only" in result.output


def _ls_annotation(user: Any, **fields: str) -> dict[str, Any]:
    result = []
    for name, text in fields.items():
        if name == "problem_type":
            result.append(
                {
                    "from_name": name,
                    "to_name": "original",
                    "type": "choices",
                    "value": {"choices": [text]},
                }
            )
        else:
            result.append(
                {
                    "from_name": name,
                    "to_name": "original",
                    "type": "textarea",
                    "value": {"text": [text]},
                }
            )
    return {"completed_by": user, "result": result, "was_cancelled": False}


def _import(out: Path, probed: Path, fmt: str, source: Path) -> list[str]:
    """`vkr reannotate import`'s arguments."""
    return ["reannotate", "import", str(out), "--probe", str(probed), "--format", fmt] + [
        "--from",
        str(source),
    ]


def _ls_texts(task: dict[str, Any]) -> dict[str, str]:
    """The fields of a task's prediction (the current item it shows for review)."""
    [prediction] = task["predictions"]
    return {
        r["from_name"]: (r["value"].get("text") or r["value"].get("choices"))[0]
        for r in prediction["result"]
    }


def test_label_studio_round_trip_writes_reviews_and_revises(probed, tmp_path):
    out = tmp_path / "re"
    tasks_file = tmp_path / "ls" / "tasks.json"
    write = ["reannotate", "tasks", str(probed), "--format", "labelstudio"]
    run = CliRunner().invoke(
        cli, [*write, "--out", str(tasks_file), "--frame-url-prefix", "/data/?d="]
    )
    assert run.exit_code == 0, run.output
    tasks = json.loads(tasks_file.read_text())
    filtered = _filtered(probed)
    assert [t["data"]["source_id"] for t in tasks] == [f["id"] for f in filtered]
    first = tasks[0]["data"]
    assert first["frames"][0].startswith("/data/?d=pancake.mkv-") and first["frames"][0].endswith(
        ".jpg"
    )
    assert first["frame_times"].startswith("0s, 1s, 2s")
    assert (first["status"], first["based_on"]) == ("not written", "")
    assert "predictions" not in tasks[0]
    config = tasks_file.with_suffix(".xml").read_text()
    assert '<Image name="frames" valueList="$frames"/>' in config
    assert '<Header value="$review"/>' in config

    # What Label Studio's JSON export gives back: the tasks with the experts' annotations.
    tasks[0]["annotations"] = [
        _ls_annotation(
            {"id": 3, "email": "carol@example.org"},
            question="Which comes first?",
            problem_type="multiple-choice",
            options="the flip\nthe pour",
            answer="B",
            grounding="0, 1.0s",
        )
    ]
    export_file = tmp_path / "ls" / "export.json"
    export_file.write_text(json.dumps(tasks))
    args = _import(out, probed, "labelstudio", export_file)
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    assert "imported: 1 written, 0 edited or revised, 0 approved, 0 unchanged" in run.output
    assert "1 unchanged" in CliRunner().invoke(cli, args).output  # imported again: no change

    # Changed in the tool over a question written since the tasks were made: a conflict
    # unless --overwrite; then the old version stays in the history.
    tasks[0]["annotations"][0]["result"][3]["value"]["text"] = ["A"]
    export_file.write_text(json.dumps(tasks))
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 1
    assert f"{filtered[0]['id']} was changed since these tasks were written" in run.output
    assert "by carol@example.org" in run.output
    assert len(run.output.strip().splitlines()) == 1
    assert [v["answer"] for v in _history(out, filtered[0]["id"])] == ["B"]
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0
    assert [(v["action"], v["answer"], v["via"]) for v in _history(out, filtered[0]["id"])] == [
        ("written", "B", "labelstudio"),
        ("edited", "A", "labelstudio"),
    ]

    # An ungrounded item from the tool is refused like one from the page, and nothing lands.
    tasks[1]["annotations"] = [
        _ls_annotation(7, question="Why?", problem_type="open-ended", answer="heat", grounding="")
    ]
    export_file.write_text(json.dumps(tasks))
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 1 and "no grounding timestamps" in run.output
    assert "labelstudio-user-7" in run.output
    assert _history(out, filtered[1]["id"]) == []
    tasks[1]["annotations"][0]["result"][-1]["value"]["text"] = ["2"]
    export_file.write_text(json.dumps(tasks))
    assert "1 written" in CliRunner().invoke(cli, args).output

    # The review round: tasks written from the re-annotation folder show each current item
    # as a prediction, and the version it is.
    review_file = tmp_path / "ls" / "review.json"
    run = CliRunner().invoke(cli, [*write, "--out", str(review_file), "--reannotations", str(out)])
    assert run.exit_code == 0, run.output
    review = json.loads(review_file.read_text())
    assert review[0]["data"]["status"] == "pending"
    assert review[0]["data"]["author"] == "carol@example.org"
    assert "Pending review (written by carol@example.org; edited by" in review[0]["data"]["review"]
    assert _ls_texts(review[0]) == {
        "question": "Which comes first?",
        "problem_type": "multiple-choice",
        "options": "the flip\nthe pour",
        "answer": "A",
        "grounding": "0, 1",
    }
    # Dave submits the first as it is (an approval); erin corrects the second (a revision).
    review[0]["annotations"] = [
        {"completed_by": "dave", "result": review[0]["predictions"][0]["result"]}
    ]
    review[1]["annotations"] = [
        _ls_annotation("erin", **{**_ls_texts(review[1]), "answer": "the heat of the pan"})
    ]
    review_export = tmp_path / "ls" / "review-export.json"
    review_export.write_text(json.dumps(review))
    reviewed = _import(out, probed, "labelstudio", review_export)
    run = CliRunner().invoke(cli, reviewed)
    assert run.exit_code == 0, run.output
    assert "imported: 0 written, 1 edited or revised, 1 approved, 0 unchanged" in run.output
    assert [(v["by"], v["action"]) for v in _history(out, filtered[1]["id"])] == [
        ("labelstudio-user-7", "written"),
        ("erin", "revised"),
    ]
    # Both exports imported again change nothing: each item is already in the history.
    assert "0 written, 0 edited or revised, 0 approved, 2 unchanged" in (
        CliRunner().invoke(cli, reviewed).output
    )
    assert "0 written, 0 edited or revised, 0 approved, 2 unchanged" in (
        CliRunner().invoke(cli, args).output
    )

    run = CliRunner().invoke(
        cli,
        ["reannotate", "export", str(out), "--probe", str(probed), "--out", str(tmp_path / "ev")],
    )
    assert "+ 1 re-annotated" in run.output and "1 new question(s) pending review" in run.output
    items = load_eval_set(tmp_path / "ev" / "VideoKR_eval.jsonl")
    carol = items[-1].raw
    assert carol["provenance"]["author"] == "carol@example.org"
    assert carol["provenance"]["reviewer"] == "dave"
    assert carol["grounding_timestamps"] == [0.0, 1.0] and carol["solution"] == "<answer>A</answer>"


def test_argilla_round_trip_writes_and_reviews(probed, tmp_path):
    out = tmp_path / "re"
    folder = tmp_path / "argilla"
    write = ["reannotate", "tasks", str(probed), "--format", "argilla"]
    run = CliRunner().invoke(cli, [*write, "--out", str(folder)])
    assert run.exit_code == 0, run.output
    settings = json.loads((folder / ".argilla" / "settings.json").read_text())
    assert [q["name"] for q in settings["questions"]] == [
        "question",
        "problem_type",
        "options",
        "answer",
        "grounding",
    ]
    records = json.loads((folder / "records.json").read_text())
    filtered = _filtered(probed)
    assert [r["metadata"]["source_id"] for r in records] == [f["id"] for f in filtered]
    assert records[0]["fields"]["frames"].startswith("![0s](pancake.mkv-")
    assert records[0]["fields"]["review"] == "Not written yet: write a new question."
    # Exporting over a folder that has files is refused, in one line.
    again = CliRunner().invoke(cli, [*write, "--out", str(folder)])
    assert again.exit_code == 1 and "is not an empty folder" in again.output

    # What rg.Dataset.to_disk writes after annotation: responses per question and user.
    def said(value: Any, user: str = "dave") -> list[dict[str, Any]]:
        return [{"value": value, "user_id": user, "status": "submitted"}]

    records[0]["responses"] = {
        "question": said("What is the cook holding?"),
        "problem_type": said("open-ended"),
        "answer": said("a pan"),
        "grounding": said("3"),
    }
    (folder / "records.json").write_text(json.dumps(records))
    read = ["reannotate", "import", str(out), "--probe", str(probed), "--format", "argilla"]
    run = CliRunner().invoke(cli, [*read, "--from", str(folder)])
    assert run.exit_code == 0, run.output
    assert "imported: 1 written" in run.output
    [written] = _history(out, filtered[0]["id"])
    assert {
        k: written[k] for k in ("question", "problem_type", "options", "answer", "grounding")
    } == {
        "question": "What is the cook holding?",
        "problem_type": "open-ended",
        "options": None,
        "answer": "a pan",
        "grounding": [3.0],
    }
    assert (written["by"], written["via"]) == ("dave", "argilla")

    # The review round: the current item comes as suggestions; erin accepts them unchanged.
    review = tmp_path / "argilla-review"
    run = CliRunner().invoke(cli, [*write, "--out", str(review), "--reannotations", str(out)])
    assert run.exit_code == 0, run.output
    records = json.loads((review / "records.json").read_text())
    suggested = {k: v["value"] for k, v in records[0]["suggestions"].items()}
    assert suggested == {
        "question": "What is the cook holding?",
        "problem_type": "open-ended",
        "answer": "a pan",
        "grounding": "3",
    }
    assert records[0]["metadata"]["status"] == "pending"
    assert records[0]["metadata"]["based_on"] == _updated_at(out, filtered[0]["id"])
    records[0]["responses"] = {k: said(v, "erin") for k, v in suggested.items()}
    (review / "records.json").write_text(json.dumps(records))
    run = CliRunner().invoke(cli, [*read, "--from", str(review)])
    assert run.exit_code == 0, run.output
    assert "0 written, 0 edited or revised, 1 approved, 0 unchanged" in run.output
    assert [(v["by"], v["action"]) for v in _history(out, filtered[0]["id"])] == [
        ("dave", "written"),
        ("erin", "approved"),
    ]


def _updated_at(out: Path, source_id: str) -> str:
    with sqlite3.connect(out / DB_FILE) as db:
        return str(
            db.execute(
                "SELECT created_at FROM versions WHERE doc_id = ? ORDER BY id DESC LIMIT 1",
                (source_id,),
            ).fetchone()[0]
        )


# ---------------------------------------------------------------- for test_labelling_formats


def _hand_made_probe(root: Path) -> Path:
    """A `vkr probe` output folder as the probe writes it, made by hand (no model, no video):
    two filtered questions, frames listed in the manifest the frame sampler writes."""
    out = root / "probe"
    frames = out / "frames" / video_key("pancake.mkv")
    frames.mkdir(parents=True)
    (frames / "manifest.json").write_text(
        json.dumps({"frames": [{"timestamp": t, "path": f"frame_{t}.jpg"} for t in (0, 1, 2)]})
    )
    rows = [
        {**_question(1), "solved_by": ["fake-a"], "solving_frames": {"fake-a": [1.0]}},
        {**_question(2, "oe"), "solved_by": ["fake-b"], "solving_frames": {"fake-b": [0.0]}},
    ]
    (out / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "kept.jsonl").write_text("")
    # The first question is written, so its task carries the item for review.
    with open_store(root / "re") as store:
        save_item(
            store,
            "q1",
            "alice",
            {
                "question": "Which happens first?",
                "problem_type": "multiple-choice",
                "options": ["the flip", "the pour"],
                "answer": "B",
                "grounding": [0.0, 1.0],
            },
        )
    return out


def reannotate_labelstudio(tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The re-annotation page's Label Studio config and tasks (one with a prediction)."""
    from experts.reannotate_interchange import write_tasks

    probe = _hand_made_probe(tmp_path)
    tasks, config = write_tasks(
        probe, tmp_path / "ls" / "tasks.json", "/data/?d=", None, tmp_path / "re"
    )
    loaded = json.loads(tasks.read_text())
    assert "predictions" in loaded[0] and "predictions" not in loaded[1]
    return config.read_text(), loaded


def reannotate_argilla(tmp_path: Path) -> Path:
    """The re-annotation page's Argilla folder (one record with suggestions)."""
    from experts.reannotate_interchange import write_argilla

    probe = _hand_made_probe(tmp_path)
    write_argilla(probe, tmp_path / "argilla", "http://frames.test/", None, tmp_path / "re")
    return tmp_path / "argilla"
