"""labelling.interchange: reading what Label Studio and Argilla hand back, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from labelling.interchange import (
    argilla_record,
    completed_by,
    frame_urls,
    frames_markdown,
    ls_choice,
    ls_text,
    read_argilla,
    read_argilla_records,
    read_json,
    read_labelstudio,
    read_labelstudio_tasks,
    write_argilla,
)
from vkr_core.schemas import InputError


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def _task(task_id: int, item: str, *annotations: dict[str, Any]) -> dict[str, Any]:
    return {"id": task_id, "data": {"seed_id": item, "video": "v1"}, "annotations": annotations}


def test_label_studio_annotations_come_back_per_annotator_with_their_values(
    tmp_path: Path,
) -> None:
    export = _write(
        tmp_path / "export.json",
        [
            _task(
                1,
                "s1",
                {
                    "completed_by": {"id": 3, "email": "ana@lab.org"},
                    "result": [
                        ls_choice("verdict", "question", "revise"),
                        ls_choice("problems", "question", ["no frame cited", "wrong answer"]),
                        ls_text("answer", "question", ["B", "because 0:12"]),
                    ],
                },
                {"completed_by": 4, "was_cancelled": True, "result": []},
                {"completed_by": 5, "result": [ls_choice("verdict", "question", "approve")]},
            ),
            _task(2, "s2"),
        ],
    )
    tasks, imported = read_labelstudio_tasks(export, "seed_id", multi=("problems",))
    assert [t["seed_id"] for t in tasks] == ["s1", "s2"]
    assert [(i.item_id, i.annotator) for i in imported] == [
        ("s1", "ana@lab.org"),
        ("s1", "labelstudio-user-5"),
    ]
    assert imported[0].values == {
        "verdict": "revise",
        "problems": ["no frame cited", "wrong answer"],
        "answer": "B\nbecause 0:12",
    }
    assert imported[0].task_data == {"seed_id": "s1", "video": "v1"}
    assert imported[0].where == f"{export} task 1 (item s1) annotation 0"
    assert read_labelstudio(export, "seed_id")[0].values["problems"] == "no frame cited"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"^label file not found: .*missing\.json$"),
        ("{not json", r"export\.json is not JSON: "),
        ({"tasks": []}, r"is not a Label Studio JSON export \(a list of tasks\)$"),
        ([{"data": {"item_id": "x"}}], r"task 0: no data\.seed_id \(was it exported by vkr\?\)$"),
        (
            [_task(7, "s1", {"completed_by": None, "result": []})],
            r"task 7 \(item s1\) annotation 0: annotation has no usable completed_by \(None\)$",
        ),
        (
            [_task(7, "s1", {"completed_by": 2, "result": [{"value": {}}]})],
            r"annotation 0 by labelstudio-user-2: a result has no from_name$",
        ),
        ([{"id": 7, "data": {"seed_id": "s1"}, "annotations": {}}], r"annotations are not a list"),
    ],
)
def test_a_bad_label_studio_export_is_refused_in_one_line_naming_the_place(
    tmp_path: Path, content: Any, message: str
) -> None:
    path = tmp_path / ("missing.json" if content is None else "export.json")
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        _write(path, content)
    with pytest.raises(InputError, match=message):
        read_labelstudio(path, "seed_id")


def test_argilla_responses_come_back_grouped_per_user(tmp_path: Path) -> None:
    record = argilla_record(
        {"question": "Which tool?"}, {"doc_id": "q1", "video_id": "v1"}, record_id="q1"
    )
    write_argilla(tmp_path / "ds", "reannotation", {"guidelines": "g"}, [record])
    records = json.loads((tmp_path / "ds" / "records.json").read_text())
    records[0]["responses"] = {
        "verdict": [{"value": "ok", "user_id": "u-1"}, {"value": "revise", "user_id": "u-2"}],
        "tags": [{"value": ["a", "b"], "user_id": "u-2"}],
    }
    _write(tmp_path / "ds" / "records.json", records)
    metadatas, imported = read_argilla_records(tmp_path / "ds", "doc_id")
    assert metadatas == [{"doc_id": "q1", "video_id": "v1"}]
    assert [(i.annotator, i.values) for i in imported] == [
        ("u-1", {"verdict": "ok"}),
        ("u-2", {"verdict": "revise", "tags": ["a", "b"]}),
    ]
    assert imported[0].task_data["question"] == "Which tool?"
    # A response that is still a draft, or was discarded, is not a label; only submitted
    # ones come back (a response without a status, as to_disk writes it, counts).
    records[0]["responses"]["verdict"] += [
        {"value": "ok", "user_id": "u-3", "status": "draft"},
        {"value": "ok", "user_id": "u-4", "status": "discarded"},
        {"value": "ok", "user_id": "u-5", "status": "submitted"},
    ]
    _write(tmp_path / "ds" / "records.json", records)
    assert [i.annotator for i in read_argilla(tmp_path / "ds", "doc_id")] == ["u-1", "u-2", "u-5"]
    assert imported[1].where == f"{tmp_path / 'ds' / 'records.json'} record 0 (item q1) by u-2"
    # The records file itself reads the same; a folder that is not empty is not written over.
    assert len(read_argilla(tmp_path / "ds" / "records.json", "doc_id")) == 3
    with pytest.raises(InputError, match=r"exists and is not an empty folder"):
        write_argilla(tmp_path / "ds", "reannotation", {}, [record])


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"records": []}, r"is not a list of Argilla records$"),
        ([{"metadata": {}}], r"record 0: no metadata\.doc_id \(exported by vkr\?\)$"),
        (
            [{"metadata": {"doc_id": "q1"}, "responses": {"verdict": [{"value": "ok"}]}}],
            r"record 0 \(item q1\): a 'verdict' response has no user_id$",
        ),
        (
            [{"metadata": {"doc_id": "q1"}, "responses": {"verdict": "ok"}}],
            r"record 0 \(item q1\): 'verdict' responses are not a list$",
        ),
    ],
)
def test_bad_argilla_records_are_refused_in_one_line(
    tmp_path: Path, records: Any, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        read_argilla(_write(tmp_path / "records.json", records), "doc_id")


def test_small_helpers(tmp_path: Path) -> None:
    assert completed_by("  bo ") == "bo"
    assert completed_by({"username": "cy", "id": 9}) == "cy"
    with pytest.raises(InputError, match="no usable completed_by"):
        completed_by(True)
    assert frame_urls(["v1/frame_0001.jpg", Path("v1") / "f2.jpg"], "/data/local-files/?d=") == [
        "/data/local-files/?d=v1/frame_0001.jpg",
        "/data/local-files/?d=v1/f2.jpg",
    ]
    assert frames_markdown(["a/f1.jpg", "a/f2.jpg"], ["0:01", None]) == (
        "![0:01](a/f1.jpg)\n![f2.jpg](a/f2.jpg)"
    )
    _write(tmp_path / "x.json", [1])
    assert read_json(tmp_path / "x.json", "seed file") == [1]
    with pytest.raises(InputError, match=r"^seed file not found: "):
        read_json(tmp_path / "y.json", "seed file")
