"""Each labelling page's Label Studio and Argilla exports, checked by the tools' own SDKs.

Label Studio: ``label_studio_sdk.label_interface.LabelInterface`` parses the page's config
(``validate``: its XML schema, unique names, every toName found), checks each task carries
the data its object tags read (``validate_task``) and each pre-label against the config
(``validate_prediction``: from_name, to_name, type and the value among the config's
choices). An annotation the SDK generates for the config is read back by
``labelling.interchange.read_labelstudio``.

Argilla 2.x: what ``rg.Dataset.from_disk`` does before it uploads, without the server:
the dataset model (``.argilla/dataset.json``), ``rg.Settings.from_json`` + ``validate``,
``rg.Record.from_dict`` for every record, and ``Record.api_model`` against the dataset's
settings (a field or question the settings lack is refused). The SDK leaves value checks to
the server, so this test checks suggestions against the settings the SDK parsed. Responses
added with ``rg.Response`` and written by ``Record.to_dict`` (as ``to_disk`` writes them)
are read back by ``labelling.interchange.read_argilla``. ``rg.Argilla`` asks the server who
is logged in when it is made: a loopback server answers that one request, and only that.

To check a page's export: add one entry to ``LABEL_STUDIO_EXPORTS`` / ``ARGILLA_EXPORTS``.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_audit import audit_argilla, audit_labelstudio
from test_reannotate import reannotate_argilla, reannotate_labelstudio
from test_seeds_page import seeds_argilla, seeds_labelstudio

from labelling.interchange import read_argilla, read_labelstudio
from qualification.interchange import export_labels, labelstudio_config, labelstudio_tasks
from qualification.models import AutoLabel, PilotFrame, PilotItem, PilotManifest
from qualification.pilot import Pilot

# ---------------------------------------------------------------- the pages' exports


def _pilot(root: Path, frames: bool = True) -> Pilot:
    """A pilot of two items (one pre-labelled a hard failure), built as open_pilot builds it."""
    manifest = PilotManifest(
        pilot_id="example_generation-fake-a-0123456789",
        step="example_generation",
        model="fake-a",
        prompt_version="v1",
        n=2,
        seed=0,
        source_runs=["runs/r1"],
        pool="pool.yaml",
        input_hashes=["a" * 64, "b" * 64],
        inputs_sha256="c" * 64,
        available=2,
        strata={"physics / Perception": 2},
        created="2026-12-03T06:00:00+00:00",
    )

    def frame(sha: str, clock: str | None) -> list[PilotFrame]:
        return [PilotFrame(sha256=sha * 64, path=f"frames/{sha * 64}.jpg", clock=clock)]

    common: dict[str, Any] = {
        "input_key": "k",
        "source_item_id": "v1",
        "video_id": "v1" if frames else None,
        "discipline": "physics",
        "skill": "Perception",
        "messages": [],
        "prompt": "Question: which tool is used at 0:12?",
    }
    items = [
        PilotItem(
            item_id="i1",
            index=0,
            input_sha256="a" * 64,
            frames=frame("a", "0:12") if frames else [],
            outcome="ok",
            output='{"question": "Which tool?"}',
            parsed={"question": "Which tool?", "options": ["A. saw", "B. drill"]},
            **common,
        ),
        PilotItem(
            item_id="i2",
            index=1,
            input_sha256="b" * 64,
            frames=frame("b", None) if frames else [],
            outcome="malformed",
            output='{"question": ',
            error="cut short",
            auto_label=AutoLabel(note="the reply is not JSON"),
            **common,
        ),
    ]
    return Pilot(root, manifest, items)


def pilot_labelstudio(tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    pilot = _pilot(tmp_path / "pilot")
    export_labels(pilot, "labelstudio", tmp_path / "ls" / "tasks.json", "/data/local-files/?d=")
    return (
        (tmp_path / "ls" / "tasks.config.xml").read_text(),
        json.loads((tmp_path / "ls" / "tasks.json").read_text()),
    )


def pilot_text_labelstudio(tmp_path: Path) -> tuple[str, list[dict[str, Any]]]:
    pilot = _pilot(tmp_path / "pilot", frames=False)
    return labelstudio_config(frames=False), labelstudio_tasks(pilot)


def pilot_argilla(tmp_path: Path) -> Path:
    export_labels(_pilot(tmp_path / "pilot"), "argilla", tmp_path / "argilla", "http://x/")
    return tmp_path / "argilla"


def pilot_text_argilla(tmp_path: Path) -> Path:
    export_labels(_pilot(tmp_path / "pilot", frames=False), "argilla", tmp_path / "argilla")
    return tmp_path / "argilla"


# One entry per page: name -> (function writing the page's export under tmp_path and returning
# (config XML, tasks), the task data field that names the item).
LABEL_STUDIO_EXPORTS: dict[str, tuple[Callable[[Path], tuple[str, list[dict[str, Any]]]], str]] = {
    "pilot": (pilot_labelstudio, "item_id"),
    "pilot-text-step": (pilot_text_labelstudio, "item_id"),
    "audit": (audit_labelstudio, "item_id"),
    "reannotate": (reannotate_labelstudio, "source_id"),
    "seeds": (seeds_labelstudio, "seed_id"),
}
# name -> (function writing the page's Argilla export folder under tmp_path and returning it,
# the metadata field that names the item).
ARGILLA_EXPORTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "pilot": (pilot_argilla, "item_id"),
    "pilot-text-step": (pilot_text_argilla, "item_id"),
    "audit": (audit_argilla, "item_id"),
    "reannotate": (reannotate_argilla, "source_id"),
    "seeds": (seeds_argilla, "seed_id"),
}


# ---------------------------------------------------------------- Label Studio


@pytest.mark.parametrize("page", sorted(LABEL_STUDIO_EXPORTS))
def test_label_studio_accepts_the_pages_config_tasks_and_prelabels(
    page: str, tmp_path: Path
) -> None:
    from label_studio_sdk.label_interface import LabelInterface

    make, key = LABEL_STUDIO_EXPORTS[page]
    config, tasks = make(tmp_path)
    interface = LabelInterface(config)
    interface.validate()  # raises LabelStudioValidationErrorSentryIgnored with the reason
    assert tasks, f"{page} exported no tasks"
    for task in tasks:
        assert set(task) <= {"id", "data", "predictions", "annotations"}
        assert isinstance(task["id"], int) and key in task["data"]
        # Every object tag's $variable is in the task's data (validate_task's data check).
        assert interface.validate_task({"data": task["data"]}), (page, task["id"])
        for prediction in task.get("predictions", []):
            assert interface.validate_prediction(prediction, return_errors=True) == []

    # An annotation as Label Studio makes it for this config comes back per annotator.
    export = []
    expected = []
    for n, task in enumerate(tasks):
        annotation = interface.generate_sample_annotation()
        assert annotation and interface.validate_prediction(annotation, return_errors=True) == []
        annotation["completed_by"] = {"id": 7, "email": f"expert{n}@lab.org"}
        export.append({**task, "annotations": [annotation]})
        values = {}
        for result in annotation["result"]:
            value = result["value"]
            values[result["from_name"]] = (
                value["choices"][0] if "choices" in value else "\n".join(value["text"])
            )
        expected.append((str(task["data"][key]), f"expert{n}@lab.org", values))
    (tmp_path / "export.json").write_text(json.dumps(export))
    imported = read_labelstudio(tmp_path / "export.json", key)
    assert [(i.item_id, i.annotator, i.values) for i in imported] == expected


def test_label_studio_refuses_a_prelabel_outside_the_config() -> None:
    # The check above has teeth: a choice the config lacks is an error.
    from label_studio_sdk.label_interface import LabelInterface

    from labelling.interchange import ls_choice, ls_prediction

    interface = LabelInterface(labelstudio_config())
    wrong = ls_prediction([ls_choice("label", "output", "great")], "vkr")
    [error] = interface.validate_prediction(wrong, return_errors=True)
    assert "Invalid value for control 'label'" in error


# ---------------------------------------------------------------- Argilla


class _WhoAmI(BaseHTTPRequestHandler):
    """Argilla's ``GET /api/v1/me``, the one request ``rg.Argilla(...)`` makes; anything
    else is recorded and refused, so the test shows no other call was needed."""

    requests: list[str] = []

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.requests.append(f"GET {self.path}")
        if self.path == "/api/v1/me":
            self._reply(
                200,
                {
                    "id": str(uuid.uuid4()),
                    "username": "vkr-test",
                    "role": "owner",
                    "inserted_at": "2026-12-03T00:00:00",
                    "updated_at": "2026-12-03T00:00:00",
                },
            )
        else:
            self._reply(501, {"detail": "not used by the offline checks"})

    def do_POST(self) -> None:
        self.requests.append(f"POST {self.path}")
        self._reply(501, {"detail": "not used by the offline checks"})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def argilla_client() -> Iterator[Any]:
    import argilla as rg

    _WhoAmI.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _WhoAmI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # A placeholder key for a server on loopback that checks none.
        yield rg.Argilla(api_url=f"http://127.0.0.1:{server.server_address[1]}", api_key="unused")
        assert _WhoAmI.requests == ["GET /api/v1/me"]
    finally:
        server.shutdown()
        server.server_close()


def _an_answer(question: Any) -> Any:
    import argilla as rg

    if isinstance(question, rg.MultiLabelQuestion):
        return question.labels[:2]
    if isinstance(question, rg.LabelQuestion):
        return question.labels[-1]
    if isinstance(question, rg.TextQuestion):
        return "an expert's note"
    if isinstance(question, rg.RatingQuestion):
        return question.values[0]
    raise AssertionError(f"no answer for {type(question).__name__} {question.name}")


@pytest.mark.parametrize("page", sorted(ARGILLA_EXPORTS))
def test_argilla_loads_the_pages_settings_and_records_offline(
    page: str, tmp_path: Path, argilla_client: Any
) -> None:
    import argilla as rg
    from argilla._models import DatasetModel

    make, key = ARGILLA_EXPORTS[page]
    folder = make(tmp_path)
    model = DatasetModel(**json.loads((folder / ".argilla" / "dataset.json").read_text()))
    settings = rg.Settings.from_json(folder / ".argilla" / "settings.json")
    settings.validate()
    dataset = rg.Dataset(name=model.name, settings=settings, client=argilla_client)
    records = [rg.Record.from_dict(r) for r in json.loads((folder / "records.json").read_text())]
    assert records, f"{page} exported no records"

    fields = {f.name: f for f in settings.fields}
    questions = {q.name: q for q in settings.questions}
    metadata = {m.name for m in settings.metadata}
    for record in records:
        record.dataset = dataset
        record.api_model()  # what from_disk uploads: refuses fields/questions not in settings
        assert set(record.fields) <= set(fields)
        for name, field in fields.items():
            # The server refuses a record without a required field, or with an empty one.
            if field.required:
                assert record.fields.get(name), (page, record.id, name)
        assert settings.allow_extra_metadata or set(record.metadata) <= metadata
        assert key in record.metadata
        for suggestion in record.suggestions:
            question = questions[suggestion.question_name]
            if isinstance(question, rg.MultiLabelQuestion):
                assert set(suggestion.value) <= set(question.labels)
            elif isinstance(question, rg.LabelQuestion) and suggestion.value is not None:
                assert suggestion.value in question.labels, (page, record.id, suggestion.value)

    # Two annotators answer every question; what to_disk writes comes back per user.
    users = sorted([uuid.uuid4(), uuid.uuid4()], key=str)
    for record in records:
        for user in users:
            for question in questions.values():
                record.responses.add(rg.Response(question.name, _an_answer(question), user_id=user))
    answered = tmp_path / "answered"
    shutil.copytree(folder, answered)
    (answered / "records.json").write_text(json.dumps([r.to_dict() for r in records]))
    imported = read_argilla(answered, key)
    expected_values = {name: _an_answer(q) for name, q in questions.items()}
    assert [(i.item_id, i.annotator, i.values) for i in imported] == [
        (str(r.metadata[key]), str(user), expected_values) for r in records for user in users
    ]


def test_argilla_refuses_a_record_with_a_field_its_settings_lack(
    tmp_path: Path, argilla_client: Any
) -> None:
    # The record check above has teeth: api_model looks every field up in the settings.
    import argilla as rg

    folder = pilot_argilla(tmp_path)
    settings = rg.Settings.from_json(folder / ".argilla" / "settings.json")
    dataset = rg.Dataset(name="pilot", settings=settings, client=argilla_client)
    [first, *_] = json.loads((folder / "records.json").read_text())
    first["fields"]["transcript"] = "not a field of the pilot's dataset"
    record = rg.Record.from_dict(first)
    record.dataset = dataset
    with pytest.raises(KeyError, match="transcript"):
        record.api_model()
