"""`vkr seeds`: write a seed on a video's frames, a second annotator revises and approves it,
the exported bank is what `vkr run --seed-bank` shows the generator."""

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
from test_qualify import chromium  # the labelling pages' one browser

from cli import cli
from experts.seeds import SeedsServer
from vkr_core.plugins import get_plugin_manager
from vkr_core.seeds import read_seeds

TITLE = "<b>Flip</b> & <script>alert(1)</script>"
QUESTION = "Which way does the pancake turn when it leaves the pan?"
REVISED = "Which way does the pancake rotate in the air after the flick of the pan?"
OPTIONS = ["A. It does not turn", "B. Half a turn, browned side up", "C. Two full turns"]
REASONING = "Step 1: at 00:00 the pancake lies raw side up. Step 2: it lands browned side up."


@pytest.fixture
def manifest(tmp_path: Path, testdata: Path) -> Path:
    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(testdata / "flipping_a_pancake.mkv", folder / "pancake.mkv")
    line = {
        "video_id": "pancake",
        "path": "pancake.mkv",
        "discipline": "cooking",
        "subject": "egg and batter cookery",
        "title": TITLE,
    }
    (folder / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    return folder / "manifest.jsonl"


def open_page(browser: Any, url: str) -> Any:
    """The page at ``url``, ready; ``page.errors`` collects script errors and dialogs (a
    title's markup that ran would open one)."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: errors.append("dialog: " + dialog.message))
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    page.errors = errors
    return page


def status(page: Any, text: str) -> None:
    page.wait_for_function(
        "t => document.getElementById('status').textContent.includes(t)", arg=text, timeout=20000
    )


def versions(seeds_dir: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(seeds_dir / "seeds.sqlite") as db:
        return db.execute(
            "SELECT annotator, action, body ->> '$.question' FROM versions ORDER BY id"
        ).fetchall()


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url + "api/seeds", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def seed_body(**changes: Any) -> dict[str, Any]:
    body = {
        "annotator": "alice",
        "video_id": "pancake",
        "skill": "VidR",
        "question": QUESTION,
        "options": OPTIONS,
        "answer": "B",
        "reasoning": REASONING,
    }
    return {**body, **changes}


def test_write_resume_revise_approve_in_the_browser(manifest, tmp_path):
    seeds_dir = tmp_path / "seeds"
    with (
        SeedsServer(manifest, seeds_dir, get_plugin_manager(), target=150) as server,
        chromium() as browser,
    ):
        page = open_page(browser, server.url)
        page.fill("#annotator", "alice")
        page.press("#annotator", "Tab")
        # The frames a run samples, with their clock; the title is shown as text, not HTML.
        page.wait_for_selector("figure img", timeout=60000)
        clocks = page.locator("figcaption").all_inner_texts()
        assert clocks[:2] == ["00:00", "00:05"]
        assert TITLE in page.inner_text("#video-info")
        page.select_option("#skill", "VidR")
        page.fill("#question", QUESTION)
        page.fill("#options", "\n".join(OPTIONS))
        page.fill("#answer", "B")
        page.fill("#reasoning", "Step 1: at ")
        page.locator("figure").nth(1).click()  # cites the frame's time
        assert page.input_value("#reasoning") == "Step 1: at 00:05"
        page.type("#reasoning", " the pancake is in the air, browned side up.")
        page.click("#save")
        status(page, "saved: seed")
        assert versions(seeds_dir) == [("alice", "written", QUESTION)]

        # Resume: a reload shows the seed, the annotator is remembered.
        page.reload()
        page.wait_for_selector("body[data-ready]")
        assert page.input_value("#annotator") == "alice"
        assert QUESTION in page.inner_text("#seeds")
        assert page.locator("#seeds button.approve").count() == 0  # no self-approval
        # A seed half written when the tab closed is still in the form.
        page.click("#new")
        page.fill("#question", "Half a question")
        page.reload()
        page.wait_for_selector("body[data-ready]")
        assert page.input_value("#question") == "Half a question"

        # A second annotator revises it (keyboard save); the original stays in the history.
        page.goto(server.url + "?annotator=bob")
        page.wait_for_selector("body[data-ready]")
        page.click("#seeds button.edit")
        page.wait_for_function("() => document.getElementById('question').value.length > 0")
        assert page.inner_text("#form-title").startswith("Revise seed")
        page.fill("#question", REVISED)
        page.press("#question", "Control+Enter")
        status(page, "2 versions, pending")
        assert versions(seeds_dir) == [
            ("alice", "written", QUESTION),
            ("bob", "revised", REVISED),
        ]
        page.click("#seeds button.approve")
        status(page, "approved")
        assert "approved by bob" in page.inner_text("#seeds")
        # The history names who wrote, revised and approved it, and keeps alice's text.
        page.click("#seeds details.history summary")
        history = page.inner_text("#seeds details.history ol")
        assert [line.split(" · ")[-1] for line in history.splitlines() if " · " in line] == [
            "written by alice",
            "revised by bob",
            "approved by bob",
        ]
        assert QUESTION in history and REVISED in history
        row = page.locator("#counts tbody tr").first.locator("td").all_inner_texts()
        assert row == ["cooking", "VidR", "1", "1", "1", "149"]
        assert page.errors == []

    # Restarted: everything saved is back, for whoever opens the page.
    with (
        SeedsServer(manifest, seeds_dir, get_plugin_manager(), target=150) as server,
        chromium() as browser,
    ):
        page = open_page(browser, server.url + "?annotator=carol")
        assert "approved · VidR · pancake · written by alice, revised by bob, approved by bob" in (
            page.inner_text("#seeds")
        )
        row = page.locator("#counts tbody tr").first.locator("td").all_inner_texts()
        assert row == ["cooking", "VidR", "1", "1", "1", "149"]
        assert page.errors == []

    out = tmp_path / "bank.jsonl"
    done = CliRunner().invoke(cli, ["seeds", "export", str(seeds_dir), "--out", str(out)])
    assert done.exit_code == 0, done.output
    [seed] = read_seeds(out, {"VidR", "KnowVid", "KnowVidR"})
    assert (seed.question, seed.discipline, seed.answer) == (REVISED, "cooking", "B")
    assert "00:05" in seed.reasoning


def test_bad_seeds_are_refused_with_one_line_in_the_api_and_the_page(manifest, tmp_path):
    seeds_dir = tmp_path / "seeds"
    with SeedsServer(manifest, seeds_dir, get_plugin_manager()) as server:
        code, reply = post(server.url, seed_body(question="  "))
        assert (code, reply) == (400, {"error": "the question is empty: write one"})
        code, reply = post(server.url, seed_body(skill="Cooking"))
        assert code == 400
        assert reply["error"] == (
            "skill 'Cooking' is not a registered skill (registered: KnowVid, KnowVidR, VidR)"
        )
        code, reply = post(server.url, seed_body(reasoning="it turns over"))
        assert code == 400 and "cites no timestamp" in reply["error"]
        code, reply = post(server.url, seed_body(answer="E"))
        assert code == 400 and "option's letter" in reply["error"]
        assert not (seeds_dir / "seeds.sqlite").exists() or versions(seeds_dir) == []

        with chromium() as browser:
            page = open_page(browser, server.url + "?annotator=alice")
            page.fill("#question", "")
            page.fill("#options", "\n".join(OPTIONS))
            page.fill("#answer", "B")
            page.fill("#reasoning", REASONING)
            page.click("#save")
            status(page, "the question is empty: write one")
            assert page.get_attribute("#status", "class") == "error"
            assert "\n" not in page.inner_text("#status")
            assert versions(seeds_dir) == []
            assert page.errors == []

        # A seed cannot be approved by its own author.
        code, written = post(server.url, seed_body())
        assert code == 200 and written["status"] == "pending"
        code, reply = post(
            server.url, {"annotator": "alice", "seed_id": written["doc_id"], "approve": True}
        )
        assert (code, reply) == (
            400,
            {"error": "alice wrote this seed: a second annotator approves it"},
        )

    done = CliRunner().invoke(
        cli, ["seeds", "export", str(seeds_dir), "--out", str(tmp_path / "b")]
    )
    assert done.exit_code == 1
    assert done.output.strip() == (
        f"Error: {seeds_dir} holds no approved seed: a second annotator approves them"
    )


def test_exported_bank_drives_a_run_whose_prompts_show_the_seed(
    manifest, tmp_path, vkr_pool, vkr_fake_server
):
    seeds_dir = tmp_path / "seeds"
    with SeedsServer(manifest, seeds_dir, get_plugin_manager()) as server:
        code, written = post(server.url, seed_body())
        assert code == 200, written
        code, approved = post(
            server.url, {"annotator": "bob", "seed_id": written["doc_id"], "approve": True}
        )
        assert (code, approved["status"]) == (200, "approved")
    bank = tmp_path / "bank.jsonl"
    done = CliRunner().invoke(cli, ["seeds", "export", str(seeds_dir), "--out", str(bank)])
    assert done.output.strip() == f"wrote 1 approved seed to {bank}"

    ran = CliRunner().invoke(
        cli,
        [
            "run",
            "--inputs",
            str(manifest),
            "--pool",
            str(vkr_pool),
            "--out",
            str(tmp_path / "run"),
            "--seed-bank",
            str(bank),
            "--skills",
            "VidR",
        ],
    )
    assert ran.exit_code == 0, ran.output
    prompts = ["\n".join(r.texts) for r in vkr_fake_server.received("example_generation")]
    assert prompts and all(QUESTION in p for p in prompts)
    assert all(REASONING in p for p in prompts)


def test_a_seeds_folder_of_another_layout_is_one_line(tmp_path):
    seeds_dir = tmp_path / "seeds"
    seeds_dir.mkdir()
    with sqlite3.connect(seeds_dir / "seeds.sqlite") as db:
        db.execute("CREATE TABLE versions (id INTEGER PRIMARY KEY, seed_id TEXT)")
    done = CliRunner().invoke(cli, ["seeds", "export", str(seeds_dir), "--out", "b.jsonl"])
    assert done.exit_code == 1
    assert done.output.strip() == (
        f"Error: {seeds_dir / 'seeds.sqlite'} is not a seed store this vkr reads (no such "
        "column: doc_id): move it aside and start anew"
    )


def test_only_loopback_and_only_requests_addressed_to_it(manifest, tmp_path):
    from vkr_core.schemas import InputError

    with pytest.raises(
        InputError, match=r"^the seed page serves on 127.0.0.1 only, not on '0.0.0.0'"
    ):
        SeedsServer(manifest, tmp_path / "seeds", get_plugin_manager(), host="0.0.0.0")
    with SeedsServer(manifest, tmp_path / "seeds", get_plugin_manager()) as server:
        # A DNS-rebinding page reaches the port under its own host name: refused.
        request = urllib.request.Request(server.url + "api/seeds", headers={"Host": "evil.test"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403
        # A cross-site form posts form-encoded, never JSON: refused before it is read.
        form = urllib.request.Request(
            server.url + "api/seeds",
            b"question=x",
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(form, timeout=30)
        assert refused.value.code == 415


def test_label_studio_round_trip_approves_and_revises_with_history(manifest, tmp_path):
    seeds_dir = tmp_path / "seeds"
    with SeedsServer(manifest, seeds_dir, get_plugin_manager()) as server:
        first = post(server.url, seed_body())[1]
        second = post(server.url, seed_body(question="What does the cook hold?", answer="A"))[1]
        with urllib.request.urlopen(server.url + "api/frames?video=pancake", timeout=60) as r:
            clocks = [f["clock"] for f in json.loads(r.read())["frames"]]
    tasks_path = tmp_path / "ls" / "tasks.json"
    tasks_path.parent.mkdir()
    runner = CliRunner()
    prefix = "/data/local-files/?d=seeds/"
    done = runner.invoke(
        cli,
        ["seeds", "tasks", str(seeds_dir), "--out", str(tasks_path), "--frame-url-prefix", prefix],
    )
    assert done.exit_code == 0, done.output
    assert '<Image name="frames" valueList="$frames"/>' in (
        (tmp_path / "ls" / "tasks.config.xml").read_text()
    )
    tasks = json.loads(tasks_path.read_text())
    assert [t["data"]["question"] for t in tasks] == [QUESTION, "What does the cook hold?"]
    frames = tasks[0]["data"]["frames"]
    assert len(frames) == len(clocks) and frames[1].startswith(
        prefix + "frames/fps0.2_max64/pancake/frame_0001_"
    )
    assert (seeds_dir / frames[1].removeprefix(prefix)).is_file()

    # What Label Studio's JSON export returns: the tasks with bob's annotations.
    def annotation(verdict: str, **revised: str) -> dict[str, Any]:
        result = [{"from_name": "verdict", "type": "choices", "value": {"choices": [verdict]}}]
        result += [
            {"from_name": f"revised_{k}", "type": "textarea", "value": {"text": [v]}}
            for k, v in revised.items()
        ]
        return {"completed_by": {"email": "bob@lab.example"}, "result": result}

    tasks[0]["annotations"] = [annotation("approve")]
    tasks[1]["annotations"] = [annotation("revise", question=REVISED)]
    exported = tmp_path / "ls" / "export.json"

    # A bad revision refuses the whole file: nothing is imported.
    bad = json.loads(json.dumps(tasks))
    bad[1]["annotations"] = [annotation("revise", answer="Z")]
    exported.write_text(json.dumps(bad))
    refused = runner.invoke(cli, ["seeds", "import", str(seeds_dir), str(exported)])
    assert refused.exit_code == 1
    assert "the answer of a multiple-choice question is an option's letter" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert len(versions(seeds_dir)) == 2

    exported.write_text(json.dumps(tasks))
    done = runner.invoke(cli, ["seeds", "import", str(seeds_dir), str(exported)])
    assert done.output.strip() == "imported 1 approvals and 1 revisions"
    assert versions(seeds_dir)[2:] == [
        ("bob@lab.example", "approved", QUESTION),
        ("bob@lab.example", "revised", REVISED),
    ]
    # The same export again is a conflict: both seeds were saved since.
    again = runner.invoke(cli, ["seeds", "import", str(seeds_dir), str(exported)])
    assert again.exit_code == 1 and "was saved again since the export" in again.output
    assert {first["doc_id"], second["doc_id"]} == {t["data"]["seed_id"] for t in tasks}


def test_argilla_round_trip_approves_and_revises(manifest, tmp_path):
    seeds_dir = tmp_path / "seeds"
    with SeedsServer(manifest, seeds_dir, get_plugin_manager()) as server:
        post(server.url, seed_body())
        post(server.url, seed_body(question="What does the cook hold?", answer="A"))
    out = tmp_path / "argilla"
    runner = CliRunner()
    done = runner.invoke(
        cli, ["seeds", "tasks", str(seeds_dir), "--format", "argilla", "--out", str(out)]
    )
    assert done.exit_code == 0, done.output
    settings = json.loads((out / ".argilla" / "settings.json").read_text())
    assert [q["name"] for q in settings["questions"]][0] == "verdict"
    records = json.loads((out / "records.json").read_text())
    assert [r["fields"]["question"] for r in records] == [QUESTION, "What does the cook hold?"]
    # What rg.Dataset.to_disk writes back after carol's review in Argilla.
    records[0]["responses"] = {"verdict": [{"value": "approve", "user_id": "carol"}]}
    records[1]["responses"] = {
        "verdict": [{"value": "revise", "user_id": "carol"}],
        "revised_options": [{"value": "A. A spatula\nB. A whisk", "user_id": "carol"}],
        "revised_answer": [{"value": "B", "user_id": "carol"}],
    }
    (out / "records.json").write_text(json.dumps(records))
    done = runner.invoke(cli, ["seeds", "import", str(seeds_dir), str(out), "--format", "argilla"])
    assert done.output.strip() == "imported 1 approvals and 1 revisions"
    assert [v[:2] for v in versions(seeds_dir)[2:]] == [("carol", "approved"), ("carol", "revised")]
    with sqlite3.connect(seeds_dir / "seeds.sqlite") as db:
        body, source = db.execute(
            "SELECT body, source FROM versions ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert (json.loads(body)["options"], json.loads(body)["answer"]) == (
        ["A. A spatula", "B. A whisk"],
        "B",
    )
    assert source == "argilla"


def test_frames_are_sampled_as_the_run_is_told_and_each_seed_keeps_its_sampling(manifest, tmp_path):
    seeds_dir = tmp_path / "seeds"
    runner = CliRunner()
    # The same options and ranges as vkr run: a bad value is a usage error naming the option.
    for option, value in (("--fps", "0"), ("--max-frames", "0")):
        refused = runner.invoke(
            cli,
            ["seeds", "serve", "--videos", str(manifest), "--bank", str(seeds_dir), option, value],
        )
        assert refused.exit_code == 2 and f"Invalid value for '{option}'" in refused.output
    from vkr_core.schemas import InputError

    with pytest.raises(InputError, match=r"^frame sampling: fps: .*greater than 0"):
        SeedsServer(manifest, seeds_dir, get_plugin_manager(), fps=0)

    frames_of = "() => [...document.querySelectorAll('figcaption')].map(c => c.textContent)"
    with chromium() as browser:
        with SeedsServer(
            manifest, seeds_dir, get_plugin_manager(), fps=1.0, max_frames=4
        ) as server:
            page = open_page(browser, server.url + "?annotator=alice")
            assert page.inner_text("#sampling") == "frames: 1 fps, at most 4 frames"
            page.wait_for_selector("figure img", timeout=60000)
            # 11 frames at 1 fps in 10.3 s, at most 4: spread evenly, as a run spreads them.
            assert page.evaluate(frames_of) == ["00:00", "00:02", "00:05", "00:07"]
            code, written = post(server.url, seed_body(reasoning="Step 1: at 00:07 it lands."))
            assert code == 200 and written["body"]["sampling"] == {"fps": 1.0, "max_frames": 4}
            assert page.errors == []
        # Served again as vkr run samples by default: other frames, kept apart from the first.
        with SeedsServer(manifest, seeds_dir, get_plugin_manager()) as server:
            page = open_page(browser, server.url + "?annotator=bob")
            page.wait_for_selector("figure img", timeout=60000)
            assert page.evaluate(frames_of)[:3] == ["00:00", "00:05", "00:10"]
            # Restarted, the page shows the seed saved before and the frames it was written on.
            assert "written by alice" in page.inner_text("#seeds")
            assert "frames at 1 fps, at most 4" in page.inner_text("#seeds")
            code, approved = post(
                server.url, {"annotator": "bob", "seed_id": written["doc_id"], "approve": True}
            )
            assert (code, approved["body"]["sampling"]) == (200, {"fps": 1.0, "max_frames": 4})
            assert page.errors == []
    folders = sorted(p.relative_to(seeds_dir).as_posix() for p in seeds_dir.glob("frames/*/*"))
    assert folders == ["frames/fps0.2_max64/pancake", "frames/fps1.0_max4/pancake"]
    assert len(list((seeds_dir / "frames/fps1.0_max4/pancake").glob("frame_*.jpg"))) == 4

    # The exported seed says which frames its 00:07 is: the bank vkr run reads keeps it.
    bank = tmp_path / "bank.jsonl"
    done = runner.invoke(cli, ["seeds", "export", str(seeds_dir), "--out", str(bank)])
    assert done.exit_code == 0, done.output
    [seed] = read_seeds(bank, {"VidR", "KnowVid", "KnowVidR"})
    assert seed.sampling is not None
    assert (seed.sampling.fps, seed.sampling.max_frames) == (1.0, 4)


def test_a_video_that_cannot_be_decoded_is_refused_in_the_page_and_the_others_still_work(
    manifest, tmp_path
):
    folder = manifest.parent
    # Half the bytes of a real clip, and a text file named like a video: decord fails on both.
    pancake = (folder / "pancake.mkv").read_bytes()
    (folder / "cut.mkv").write_bytes(pancake[: len(pancake) // 2])
    (folder / "notes.mp4").write_text("not a video, just notes\n")
    lines = [json.loads(manifest.read_text())] + [
        {"video_id": name, "path": path, "discipline": "cooking", "title": name}
        for name, path in (("cut", "cut.mkv"), ("notes", "notes.mp4"))
    ]
    lines.append({"video_id": "gone", "path": "gone.mp4", "discipline": "cooking"})
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seeds_dir = tmp_path / "seeds"
    with (
        SeedsServer(manifest, seeds_dir, get_plugin_manager()) as server,
        chromium() as browser,
    ):
        page = open_page(browser, server.url + "?annotator=alice")
        page.wait_for_selector("figure img", timeout=60000)
        # A line whose file is missing is not a video to pick: the page names it.
        assert page.locator("#video option[value=gone]").count() == 0
        assert page.inner_text("#problems li") == (
            f"line 4: video file not found: {manifest.parent / 'gone.mp4'}"
        )
        for video_id, why in (("cut", "truncated"), ("notes", "cannot open as a video")):
            page.select_option("#video", video_id)
            error = page.wait_for_selector("#frames p.error", timeout=60000).inner_text()
            assert error.startswith(f"video {video_id} has no frames to write a seed on: ")
            assert why in error and "\n" not in error
            assert page.locator("#frames figure").count() == 0
            # A seed on it is refused with the same line; nothing is stored.
            code, reply = post(server.url, seed_body(video_id=video_id))
            assert (code, reply) == (400, {"error": error})
        assert not (seeds_dir / "seeds.sqlite").exists() or versions(seeds_dir) == []

        # The good video still works: its frames show and a seed is saved on it.
        page.select_option("#video", "pancake")
        page.wait_for_selector("figure img", timeout=60000)
        assert page.locator("#frames p.error").count() == 0
        page.fill("#question", QUESTION)
        page.fill("#options", "\n".join(OPTIONS))
        page.fill("#answer", "B")
        page.fill("#reasoning", REASONING)
        page.click("#save")
        status(page, "saved: seed")
        assert versions(seeds_dir) == [("alice", "written", QUESTION)]
        assert page.errors == []


# ---------------------------------------------------------------- for test_labelling_formats


def _reviewed_seeds(tmp_path: Path) -> Path:
    """A seeds folder with two pending seeds on real frames: a multiple-choice one revised by a
    second annotator, and an open one."""
    from videos import PANCAKE, video_dir

    from experts.seeds import SeedsApp

    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(video_dir() / PANCAKE, folder / "pancake.mkv")
    line = {"video_id": "pancake", "path": "pancake.mkv", "discipline": "cooking"}
    (folder / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    seeds_dir = tmp_path / "seeds"
    app = SeedsApp(folder / "manifest.jsonl", seeds_dir, get_plugin_manager(), max_frames=3)
    try:
        written = app.save(seed_body())
        app.save(seed_body(annotator="bob", seed_id=written["doc_id"], question=REVISED))
        app.save(seed_body(options=None, answer="half a turn", question="How far does it turn?"))
    finally:
        app.close()
    return seeds_dir


def seeds_labelstudio(tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The seed page's Label Studio config and tasks (frames by URL, one open question)."""
    from experts.seeds_interchange import export_tasks

    out = tmp_path / "ls" / "tasks.json"
    assert export_tasks(_reviewed_seeds(tmp_path), out, "/data/local-files/?d=seeds/") == 2
    tasks = json.loads(out.read_text())
    assert len(tasks[0]["data"]["frames"]) == 3 and tasks[1]["data"]["options"] == ""
    return out.with_suffix(".config.xml").read_text(), tasks


def seeds_argilla(tmp_path: Path) -> Path:
    """The seed page's Argilla folder (two pending seeds)."""
    from experts.seeds_interchange import export_tasks

    out = tmp_path / "argilla"
    assert export_tasks(_reviewed_seeds(tmp_path), out, "http://frames.test/", "argilla") == 2
    return out
