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
from experts.audit import load_audit, open_labels, stratified_rates, wilson
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

    with open_labels(tmp_path / "a") as store:
        for item in items:
            label = "trace_error" if is_wrong(item.example) else "ok"
            store.set(item.item_id, "oracle", label, source="test")
    result = vkr("audit", "score", str(tmp_path / "a"))
    score = json.loads((tmp_path / "a" / "score.json").read_text())
    # The population estimate (weighted by stratum) holds the run's share and the policy's.
    rate = score["overall"]["trace_error"]
    assert rate["low"] <= known <= rate["high"], (known, rate)
    assert rate["low"] <= MISTAKE <= rate["high"], rate
    assert score["overall"]["population"] == len(population)
    assert score["overall"]["population_covered"] == 1.0
    assert score["unweighted"]["trace_error"]["count"] == sum(is_wrong(i.example) for i in items)
    assert set(score["by_skill"]) == {e.skill for e in population}
    assert set(score["by_trace_model"]) == {i.trace_model for i in items}
    assert "trace error that changes the answer" in result.stdout
    assert "**population** (weighted by stratum)" in result.stdout
    assert (tmp_path / "a" / "score.md").read_text().count("| skill: ") == len(score["by_skill"])


def test_wilson_interval_matches_the_textbook_values() -> None:
    # Newcombe (1998), Table I: 5 of 10 -> 0.2366-0.7634; 0 of 10 -> 0-0.2775.
    assert [round(x, 4) for x in wilson(5, 10)] == [0.2366, 0.7634]
    assert [round(x, 4) for x in wilson(0, 10)] == [0.0, 0.2775]
    # The paper's 17 trace errors in 800.
    assert [round(x, 4) for x in wilson(17, 800)] == [0.0133, 0.0338]
    # One stratum: the weighted estimate is the plain rate with the plain Wilson interval.
    one = stratified_rates({"s": ["trace_error"] * 5 + ["ok"] * 5}, {"s": 40})
    assert one["n_effective"] == 10
    assert [round(one["trace_error"][k], 4) for k in ("rate", "low", "high")] == [
        0.5,
        0.2366,
        0.7634,
    ]


# ---------------------------------------------------------------- weights and agreement


def skewed_run(root: Path) -> tuple[Path, set[str]]:
    """A run whose strata differ in size and error rate: 1000 examples of one generation
    model, 10 % wrong, and eight rare models of 10 examples each, 9 of them wrong."""
    from corpus_factory import link_video, make_example, write_record

    from vkr_core.schemas import Video, VideoRecord

    run = root / "run"
    wrong: set[str] = set()
    sizes = {"gen-big": (1000, 10), **{f"gen-rare-{k}": (10, 0) for k in range(8)}}
    for m, (model, (size, every)) in enumerate(sizes.items()):
        for v in range(0, size, 20):
            video_id = f"{model}-{v:03d}"
            path = link_video(root, video_id, m)
            accepted = []
            for i in range(v, min(v + 20, size)):
                # Every third index keeps the factory's skill: one skill, strata by model.
                example = make_example(video_id, 3 * i, str(path), multiple_choice=True)
                example = example.model_copy(
                    update={
                        "problem_id": f"{model}-{i:03d}",
                        "models": {"example_generation": [model]},
                    }
                )
                if (every and i % every == 0) or (not every and i < 9):
                    wrong.add(example.problem_id)
                accepted.append(example)
            record = VideoRecord(
                video_id=video_id,
                video=Video(video_id=video_id, path=str(path), discipline="physics"),
                status="done",
                frames=12,
                generated=len(accepted),
                accepted=accepted,
            )
            write_record(run, record)
    return run, wrong


def test_the_overall_rate_weights_strata_by_their_share_of_the_population(
    tmp_path: Path,
) -> None:
    from experts.audit import create_audit, score_audit

    run, wrong = skewed_run(tmp_path)
    population_rate = len(wrong) / 1080  # 172 of 1080, 15.9 %
    vkr("audit", str(run), "--n", "100", "--out", str(tmp_path / "a"))
    manifest, items = load_audit(tmp_path / "a")
    rare = [i for i in items if i.generation_model != "gen-big"]
    assert len(rare) >= 24 and manifest.strata["VidR | gen-big"]["population"] == 1000
    with open_labels(tmp_path / "a") as store:
        for item in items:
            store.set(item.item_id, "oracle", "not_grounded" if item.item_id in wrong else "ok")
    vkr("audit", "score", str(tmp_path / "a"))
    score = json.loads((tmp_path / "a" / "score.json").read_text())

    weighted, plain = score["overall"]["flagged"], score["unweighted"]["flagged"]
    # The rare strata are over a quarter of the sample and 7 % of the population: the plain
    # mean over the sample is pulled towards their 90 % and its interval misses the truth.
    assert not plain["low"] <= population_rate <= plain["high"], plain
    assert plain["rate"] - population_rate > 0.1, plain
    assert weighted["low"] <= population_rate <= weighted["high"], weighted
    assert abs(weighted["rate"] - population_rate) < 0.05, weighted
    assert score["overall"]["not_grounded"]["rate"] == pytest.approx(weighted["rate"])
    # The interval is on the effective sample size: under the 100 labelled.
    assert 40 < score["overall"]["n_effective"] < 100
    big = score["by_stratum"]["VidR | gen-big"]
    assert (big["population"], big["n"]) == (1000, len(items) - len(rare))

    # Over other samples the weighted estimate centres on the population's rate, and the
    # plain one stays above it every time.
    estimates = []
    for seed in range(1, 9):
        audit = tmp_path / f"seed{seed}"
        _, items = load_audit(create_audit(run, audit, n=100, seed=seed) and audit)
        with open_labels(audit) as store:
            for item in items:
                store.set(item.item_id, "oracle", "trace_error" if item.item_id in wrong else "ok")
        seeded = score_audit(audit)
        estimates.append(seeded["overall"]["flagged"]["rate"])
        assert seeded["unweighted"]["flagged"]["rate"] - population_rate > 0.08, seed
    assert abs(sum(estimates) / len(estimates) - population_rate) < 0.02, estimates


def test_a_partly_labelled_audit_says_which_strata_the_estimate_leaves_out(
    tmp_path: Path,
) -> None:
    run, _ = skewed_run(tmp_path)
    vkr("audit", str(run), "--n", "30", "--out", str(tmp_path / "a"))
    _, items = load_audit(tmp_path / "a")
    with open_labels(tmp_path / "a") as store:
        for item in items:
            if item.generation_model != "gen-rare-2":
                store.set(item.item_id, "alice", "ok")
    result = vkr("audit", "score", str(tmp_path / "a"))
    score = json.loads((tmp_path / "a" / "score.json").read_text())
    assert score["overall"]["strata_unlabelled"] == ["VidR | gen-rare-2"]
    assert score["overall"]["population_covered"] == pytest.approx(1070 / 1080)
    assert "no label yet in VidR | gen-rare-2" in result.stdout


def test_agreement_per_pair_and_the_verdict_when_annotators_disagree(tmp_path: Path) -> None:
    run, _ = skewed_run(tmp_path)
    vkr("audit", str(run), "--n", "12", "--out", str(tmp_path / "a"))
    _, items = load_audit(tmp_path / "a")
    ids = [i.item_id for i in items[:10]]
    ok, ng, te, us = "ok", "not_grounded", "trace_error", "unsupported_step"
    alice = [ok, ok, ok, ok, ok, ok, ng, ng, te, te]
    bob = [ok, ok, ok, ok, ok, us, ng, ok, te, te]
    with open_labels(tmp_path / "a") as store:
        for item_id, a, b in zip(ids, alice, bob, strict=True):
            store.set(item_id, "alice", a)
            store.set(item_id, "bob", b)
        store.set(items[10].item_id, "alice", ok)  # labelled by one annotator only

    result = vkr("audit", "score", str(tmp_path / "a"))
    score = json.loads((tmp_path / "a" / "score.json").read_text())
    (pair,) = score["agreement"]["pairs"]
    assert pair["annotators"] == ["alice", "bob"] and pair["items"] == 10
    assert pair["agreement"] == pytest.approx(0.8)
    # By hand: expected agreement (6*6 + 2*1 + 2*2) / 100 = 0.42 over four labels, and
    # (6*6 + 4*4) / 100 = 0.52 over ok vs flagged.
    assert pair["kappa"] == pytest.approx((0.8 - 0.42) / 0.58, abs=1e-4)
    assert pair["kappa_ok_vs_flagged"] == pytest.approx((0.8 - 0.52) / 0.48, abs=1e-4)
    disagreements = [
        {"item_id": ids[5], "labels": {"alice": ok, "bob": us}},
        {"item_id": ids[7], "labels": {"alice": ng, "bob": ok}},
    ]
    assert pair["disagreements"] == sorted(disagreements, key=lambda d: d["item_id"])
    assert score["agreement"]["disputed"] == sorted([ids[5], ids[7]])
    # Any flag makes the verdict a flag, whoever gave it and whenever.
    assert score["unweighted"]["flagged"]["count"] == 4 + 1
    assert score["unweighted"]["unsupported_step"]["count"] == 1
    assert "| alice & bob | 10 | 80.0 % | 0.66 | 0.58 |" in result.stdout
    assert ", ".join(sorted([ids[5], ids[7]])) in result.stdout

    # An adjudicator settles a dispute: their ok stands; they are no party to the kappas.
    with open_labels(tmp_path / "a") as store:
        store.set(ids[5], "carol", ok)
        store.set(ids[7], "carol", ng)
    result = vkr("audit", "score", str(tmp_path / "a"), "--adjudicator", "carol")
    score = json.loads((tmp_path / "a" / "score.json").read_text())
    assert score["unweighted"]["flagged"]["count"] == 4
    assert score["unweighted"]["unsupported_step"]["count"] == 0
    assert [p["annotators"] for p in score["agreement"]["pairs"]] == [["alice", "bob"]]
    assert "Adjudicator: carol." in result.stdout
    refused = vkr("audit", "score", str(tmp_path / "a"), "--adjudicator", "karol", check=False)
    assert "adjudicator 'karol' labelled no example of this audit" in refused.stderr
    # Without --adjudicator, carol is one more annotator: her ok does not clear bob's flag.
    score = json.loads(
        vkr("audit", "score", str(tmp_path / "a")) and (tmp_path / "a" / "score.json").read_text()
    )
    assert score["unweighted"]["flagged"]["count"] == 5
    assert len(score["agreement"]["pairs"]) == 3


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
    with open_labels(tmp_path / "a") as store:
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
    with open_labels(audit) as store:
        current = {(r.item_id, r.annotator): (r.label, r.note) for r in store.current()}
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
    with open_labels(audit) as store:
        history = [r.label for r in store.history(items[0].item_id, "labelstudio-user-7")]
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


def test_argilla_round_trip_stores_each_users_responses_as_labels_with_history(
    run_dir: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "a"
    vkr("audit", str(run_dir), "--n", "4", "--out", str(audit))
    _, items = load_audit(audit)
    out = tmp_path / "argilla"
    result = vkr(
        "audit", "export", str(audit), "--format", "argilla", "--out", str(out),
        "--frame-url-prefix", "http://files.example/",
    )  # fmt: skip
    assert "records.json" in result.stdout
    settings = json.loads((out / ".argilla" / "settings.json").read_text())
    label = next(q for q in settings["questions"] if q["name"] == "label")
    assert [(o["value"], o["text"]) for o in label["settings"]["options"]] == [
        ("ok", "ok"),
        ("not_grounded", "not visually grounded"),
        ("trace_error", "trace error that changes the answer"),
        ("unsupported_step", "unsupported step"),
    ]
    records = json.loads((out / "records.json").read_text())
    assert [r["metadata"]["item_id"] for r in records] == [i.item_id for i in items]
    first, example = records[0], items[0].example
    assert first["fields"]["question"].startswith(example.question)
    assert first["fields"]["answer"] in example.solution
    assert "Therefore the answer is" in first["fields"]["trace"]
    frame = items[0].frames[0]
    assert f"![{frame.clock}](http://files.example/{frame.path})" in first["fields"]["frames"]

    def respond(choice: str) -> None:
        # What Argilla's rg.Dataset.to_disk gives back: each user's responses per question,
        # a label question's value being the option's value.
        records[0]["responses"] = {
            "label": [
                {"value": choice, "user_id": "u-ann", "status": "submitted"},
                {"value": "ok", "user_id": "u-bo", "status": "submitted"},
            ],
            "note": [{"value": "the pan is never shown", "user_id": "u-ann"}],
        }
        records[1]["responses"] = {"label": [{"value": "unsupported_step", "user_id": "u-bo"}]}
        (out / "records.json").write_text(json.dumps(records))

    respond("not_grounded")
    result = vkr("audit", "import", str(audit), str(out), "--format", "argilla")
    assert "imported labels of u-ann, u-bo: 3 new, 0 changed" in result.stdout
    with open_labels(audit) as store:
        current = {(r.item_id, r.annotator): (r.label, r.note) for r in store.current()}
    assert current == {
        (items[0].item_id, "u-ann"): ("not_grounded", "the pan is never shown"),
        (items[0].item_id, "u-bo"): ("ok", ""),
        (items[1].item_id, "u-bo"): ("unsupported_step", ""),
    }
    # Importing the same file again changes nothing.
    result = vkr("audit", "import", str(audit), str(out / "records.json"), "--format", "argilla")
    assert "0 new, 0 changed, 3 unchanged" in result.stdout

    respond("trace_error")
    refused = vkr("audit", "import", str(audit), str(out), "--format", "argilla", check=False)
    assert refused.returncode != 0 and "nothing was imported" in refused.stderr
    assert f"example {items[0].item_id} by u-ann: stored not_grounded" in refused.stderr
    assert "Traceback" not in refused.stderr
    result = vkr("audit", "import", str(audit), str(out), "--format", "argilla", "--overwrite")
    assert "0 new, 1 changed, 2 unchanged" in result.stdout
    with open_labels(audit) as store:
        history = [(r.label, r.source) for r in store.history(items[0].item_id, "u-ann")]
    assert history == [("not_grounded", "argilla"), ("trace_error", "argilla")]

    # A response that is not one of the four labels names its record and user.
    records[1]["responses"]["label"][0]["value"] = "meh"
    (out / "records.json").write_text(json.dumps(records))
    refused = vkr("audit", "import", str(audit), str(out), "--format", "argilla", check=False)
    assert "record 1" in refused.stderr and "u-bo" in refused.stderr
    assert "'meh' is not one of ok, not visually grounded" in refused.stderr


# ---------------------------------------------------------------- for test_labelling_formats


def _hand_made_audit(root: Path) -> Path:
    """An audit of two examples, as create_audit writes one: a multiple-choice example with
    two frames and an open-ended one whose video kept no frames."""
    from corpus_factory import make_example

    from experts.audit import AuditFrame, AuditItem, AuditLayout, AuditManifest

    examples = [
        make_example("v1", 0, "/videos/v1.mp4", multiple_choice=True),
        make_example("v2", 0, "/videos/v2.mp4", multiple_choice=False),
    ]
    frames = [
        AuditFrame(sha256=c * 64, clock=clock, path=f"/runs/r1/frames/v1/frame_{n}.jpg")
        for n, (c, clock) in enumerate([("a", "00:00"), ("b", "00:05")])
    ]
    items = [
        AuditItem(
            item_id=e.problem_id,
            stratum=f"{e.skill} | gen-a",
            generation_model="gen-a",
            trace_model="m1",
            example=e,
            frames=frames if e.video_id == "v1" else [],
        )
        for e in examples
    ]
    manifest = AuditManifest(
        source="/runs/r1",
        kind="run",
        run_dirs=["/runs/r1"],
        seed=0,
        requested=2,
        population=2,
        sampled=2,
        strata={f"{examples[0].skill} | gen-a": {"population": 2, "sampled": 2}},
    )
    layout = AuditLayout(root)
    root.mkdir(parents=True)
    layout.sample.write_text("".join(i.model_dump_json() + "\n" for i in items))
    layout.manifest.write_text(manifest.model_dump_json())
    return root


def audit_labelstudio(tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The audit's Label Studio config and tasks (frames by URL prefix; one with none)."""
    from experts.audit_interchange import export_labels

    out = tmp_path / "ls" / "tasks.json"
    export_labels(_hand_made_audit(tmp_path / "audit"), "labelstudio", out, "/data/?d=")
    tasks = json.loads(out.read_text())
    assert tasks[0]["data"]["frames"][1] == "/data/?d=/runs/r1/frames/v1/frame_1.jpg"
    return out.with_suffix(".config.xml").read_text(), tasks


def audit_argilla(tmp_path: Path) -> Path:
    """The audit's Argilla folder (two records, one without frames)."""
    from experts.audit_interchange import export_labels

    out = tmp_path / "argilla"
    export_labels(_hand_made_audit(tmp_path / "audit"), "argilla", out, "http://frames.test")
    return out


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

    with open_labels(audit) as store:
        current = {row.item_id: row.label for row in store.current("alice")}
        history = [row.label for row in store.history(items[1].item_id, "alice")]
        note = store.history(items[1].item_id, "alice")[-1].note
    assert current == {
        items[0].item_id: "ok",
        items[1].item_id: "unsupported_step",
        items[2].item_id: "trace_error",
    }
    assert history == ["not_grounded", "not_grounded", "unsupported_step"]
    assert note == "step 1 names an action no frame shows"

    # A new server on the same audit: alice's labels are back. Bob, the second annotator,
    # reviews the same examples blind (the page shows no one else's label, so agreement is
    # honest) and disagrees with alice on the first.
    with AuditServer(audit) as server, chromium() as browser:
        page = browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "?annotator=alice")
        page.wait_for_selector("body[data-ready]")
        page.wait_for_function(
            "id => document.getElementById('item-title').textContent.includes(id)",
            arg=items[3].item_id,
        )
        assert page.inner_text("#progress") == f"3 / {len(items)} labelled"
        page.fill("#annotator", "bob")
        page.press("#annotator", "Enter")
        page.wait_for_function(
            "n => document.getElementById('progress').textContent === `0 / ${n} labelled`",
            arg=len(items),
        )
        assert page.locator("#labels button.selected").count() == 0
        page.keyboard.press("3")
        saved(page, "saved: trace error that changes the answer")
        page.keyboard.press("j")
        page.keyboard.press("4")
        saved(page, "saved: unsupported step")
        assert errors == []

    vkr("audit", "score", str(audit))
    score = json.loads((audit / "score.json").read_text())
    (pair,) = score["agreement"]["pairs"]
    assert (pair["annotators"], pair["items"]) == (["alice", "bob"], 2)
    assert pair["disagreements"] == [
        {"item_id": items[0].item_id, "labels": {"alice": "ok", "bob": "trace_error"}}
    ]
    # Bob's flag stands against alice's ok: 3 flagged of 3 labelled examples.
    assert (score["labelled"], score["unweighted"]["flagged"]["count"]) == (3, 3)


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
        # A label comes only as a JSON post (a cross-site form cannot send one), and small.
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("POST", "/api/labels", body, {"Content-Type": "text/plain"})
        response = conn.getresponse()
        assert response.status == 415 and "a label is posted as JSON" in response.read().decode()
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("POST", "/api/labels", "x" * 70_000, {"Content-Type": "application/json"})
        assert conn.getresponse().status == 413
    with open_labels(tmp_path / "a") as store:
        assert store.current() == []
