"""Structured output: a pool entry with ``structured_output: true`` sends each step's JSON
schema with every call, so a model that keeps to the format only under a schema loses no
replies to format failures, in runs and in qualification pilots alike; a reply that breaks
the schema is still a recorded hard failure with its raw text.

All through the real CLI and real litellm/HTTP against the fake model server, whose
``needs_schema`` knob answers well-formed only when the request carries a schema.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, Field
from test_run import vkr_run_here

from cli import cli
from plugins.providers.fake_server import FakeModelServer, write_pool
from qualification.pilot import open_pilot
from vkr_core.config import ModelSpec, Pool
from vkr_core.context import call_params
from vkr_core.plugins import get_plugin_manager
from vkr_core.schemas import VkrError
from vkr_core.steps import Gate, Step, portable_schema, response_format

PILOT_STEP = "example_generation"


def structured(pool: Path, on: bool = True, models: tuple[str, ...] = ()) -> Path:
    """The pool with ``structured_output`` set on its models (all, or the ones named)."""
    data = yaml.safe_load(pool.read_text())
    for entry in data["models"]:
        if not models or entry["name"] in models:
            entry["structured_output"] = on
    pool.write_text(yaml.safe_dump(data, sort_keys=False))
    return pool


def write_videos(folder: Path, testdata: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        shutil.copy(testdata / "flipping_a_pancake.mkv", folder / f"clip{i}.mkv")
        lines.append(
            {
                "video_id": f"clip{i}",
                "path": f"clip{i}.mkv",
                "discipline": "cooking" if i % 2 == 0 else "physics",
                "subject": "batter cookery",
                "knowledge_point": "Maillard reaction",
                "title": f"Pancake flip number {i}",
            }
        )
    manifest = folder / "videos.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def vkr_run(videos: Path, pool: Path, out: Path) -> subprocess.CompletedProcess[str]:
    # In this process: what a run sends and records is the point here, not its process.
    return vkr_run_here(videos, pool, out, check=False)


def calls(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "calls.jsonl").read_text().splitlines()]


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, testdata: Path) -> Any:
    """The same videos run twice against a model that needs the schema: once without
    structured output, once with it."""
    root = tmp_path_factory.mktemp("structured")
    pm = get_plugin_manager()
    server = FakeModelServer(seed=0)
    url = server.start()
    try:
        server.set_policy({"defaults": {"needs_schema": True}})
        videos = write_videos(root / "videos", testdata)
        plain_pool = write_pool(root / "plain" / "pool.yaml", url, pm=pm)
        schema_pool = structured(write_pool(root / "schema" / "pool.yaml", url, pm=pm))

        plain = vkr_run(videos, plain_pool, root / "plain" / "run")
        plain_requests = server.received()
        server.clear_received()
        with_schema = vkr_run(videos, schema_pool, root / "schema" / "run")
        schema_requests = server.received()
        yield {
            "root": root,
            "server": server,
            "pm": pm,
            "plain": (plain, plain_pool, root / "plain" / "run", plain_requests),
            "schema": (with_schema, schema_pool, root / "schema" / "run", schema_requests),
        }
    finally:
        server.stop()


# ---------------------------------------------------------------- runs


def test_a_run_with_structured_output_has_no_format_failures_where_one_without_has_many(runs):
    result, _, run_dir, _ = runs["plain"]
    assert result.returncode in (0, 3), result.stderr
    without = calls(run_dir)
    assert sum(c["outcome"] == "malformed" for c in without) == len(without) > 0
    assert not any(c["structured_output"] for c in without)

    result, _, run_dir, _ = runs["schema"]
    assert result.returncode == 0, result.stdout + result.stderr
    made = calls(run_dir)
    # Every step of generation ran, and none lost a reply to its format.
    assert {c["step"] for c in made} >= {"example_generation", "self_consistency"}
    assert [c for c in made if c["outcome"] == "malformed"] == []
    assert all(c["structured_output"] for c in made)
    records = [json.loads(p.read_text()) for p in (run_dir / "records").glob("*.json")]
    assert records and all(r["status"] == "done" for r in records)
    assert not [x for r in records for x in r["rejected"] if x["kind"] == "malformed"]


def test_each_request_carries_its_steps_schema_and_a_model_without_it_sends_none(runs):
    registry = runs["pm"].registry.steps
    *_, requests = runs["schema"]
    assert requests
    for request in requests:
        expected, _ = portable_schema(registry[request.step].output_schema)
        assert request.response_schema == expected, request.step
    # Inlined: the fake server saw cot_verification's nested step object, not a $ref.
    cot = [r for r in requests if r.step == "cot_verification"]
    for request in cot:
        items = request.response_schema["properties"]["steps"]["items"]
        assert items["type"] == "object" and "$ref" not in json.dumps(request.response_schema)

    *_, plain_requests = runs["plain"]
    assert plain_requests and all(r.response_schema is None for r in plain_requests)


def test_the_report_shows_which_calls_carried_the_schema(runs):
    _, _, run_dir, _ = runs["schema"]
    result = invoke("report", run_dir)
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "report.json").read_text())
    for stats in report["models"].values():
        assert stats["structured_calls"] == stats["paid_calls"] > 0
    assert "| with schema |" in (run_dir / "report.md").read_text()
    assert "<th>with schema</th>" in (run_dir / "report.html").read_text()
    paid = report["totals"]["paid_calls"]
    assert f"with response schema       {paid} of {paid} paid calls" in result.output

    _, _, plain_dir, _ = runs["plain"]
    assert invoke("report", plain_dir).exit_code == 0
    plain = json.loads((plain_dir / "report.json").read_text())
    for stats in plain["models"].values():
        assert stats["structured_calls"] == 0 and stats["outcomes"]["malformed"] > 0


def test_a_reply_that_breaks_the_schema_is_a_recorded_malformed_rejection(runs, testdata, tmp_path):
    server = runs["server"]
    server.set_policy({"defaults": {"needs_schema": True, "violate_schema": 1.0}})
    try:
        pool = structured(write_pool(tmp_path / "pool.yaml", server.base_url, pm=runs["pm"]))
        videos = write_videos(tmp_path / "videos", testdata, count=1)
        result = vkr_run(videos, pool, tmp_path / "run")
    finally:
        server.set_policy({"defaults": {"needs_schema": True}})
    assert result.returncode in (0, 3), result.stderr
    made = calls(tmp_path / "run")
    assert made and all(c["outcome"] == "malformed" and c["structured_output"] for c in made)
    record = json.loads((tmp_path / "run" / "records" / "clip0.json").read_text())
    assert record["accepted"] == []
    rejected = record["rejected"]
    assert rejected and all(r["kind"] == "malformed" for r in rejected)
    for rejection in rejected:
        # The raw reply is kept: valid JSON that leaves out a field the schema requires.
        raw = json.loads(rejection["raw_reply"])
        assert isinstance(raw, dict)
        assert "Field required" in rejection["reason"] or "valid" in rejection["reason"]


# ---------------------------------------------------------------- pilots


def pilot(runs: Any, source: str, out: Path, model: str = "fake-a") -> Any:
    _, pool, run_dir, _ = runs[source]
    return invoke(
        "qualify",
        "pilot",
        "--step",
        PILOT_STEP,
        "--model",
        model,
        "--pool",
        pool,
        "--n",
        6,
        "--from",
        runs["plain"][2],
        "--out",
        out,
    )


def test_a_pilot_with_structured_output_records_no_format_failures(runs, tmp_path):
    server = runs["server"]
    server.clear_received()
    result = pilot(runs, "schema", tmp_path / "with")
    assert result.exit_code == 0, result.output
    assert "pre-labelled hard failures (format): 0" in result.output
    assert "carried the step's JSON schema" in result.output
    opened = open_pilot(tmp_path / "with")
    assert opened.manifest.structured_output
    assert [i.outcome for i in opened.items] == ["ok"] * 6
    with opened.labels() as store:
        assert store.current("auto") == []
    requests = server.received(PILOT_STEP)
    assert len(requests) == 6 and all(r.response_schema for r in requests)
    # An expert finds the content fine: the verdict says it was earned with the schema.
    with opened.labels() as store:
        for item in opened.items:
            store.set(item.item_id, "alice", "ok")
    registry = tmp_path / "eligibility.yaml"
    scored = invoke("qualify", "score", tmp_path / "with", "--registry", registry)
    assert scored.exit_code == 0, scored.output
    entry = yaml.safe_load(registry.read_text())[PILOT_STEP]["fake-a"]
    assert entry["eligible"] and entry["hard"] == 0 and entry["structured_output"] is True

    # The same inputs without the schema: the model's format failures count against it.
    without = pilot(runs, "plain", tmp_path / "without")
    assert without.exit_code == 0, without.output
    opened = open_pilot(tmp_path / "without")
    assert not opened.manifest.structured_output
    assert [i.outcome for i in opened.items] == ["malformed"] * 6
    assert opened.manifest.pilot_id != open_pilot(tmp_path / "with").manifest.pilot_id
    with opened.labels() as store:
        assert len(store.current("auto")) == 6

    # Under the schema, a reply that still breaks it is a hard format failure all the same.
    server.set_policy({"defaults": {"needs_schema": True, "violate_schema": 1.0}})
    try:
        violating = pilot(runs, "schema", tmp_path / "violating")
    finally:
        server.set_policy({"defaults": {"needs_schema": True}})
    assert violating.exit_code == 0, violating.output
    assert "pre-labelled hard failures (format): 6" in violating.output
    opened = open_pilot(tmp_path / "violating")
    assert opened.manifest.structured_output
    for item in opened.items:
        assert item.outcome == "malformed" and isinstance(json.loads(item.output), dict)
        assert (item.auto_label.label, item.auto_label.category) == ("hard", "format")


def test_the_eligibility_table_names_the_models_asked_with_a_schema(runs, tmp_path):
    _, pool, _, _ = runs["schema"]
    one = structured(
        write_pool(tmp_path / "pool.yaml", runs["server"].base_url, pm=runs["pm"]),
        models=("fake-b",),
    )
    data = yaml.safe_load(one.read_text())
    registry = one.parent / data["registry"]
    # fake-b earned its example_generation verdict with the schema, the others without.
    entries = yaml.safe_load(registry.read_text())
    entries[PILOT_STEP]["fake-b"]["structured_output"] = True
    registry.write_text(yaml.safe_dump(entries))
    result = invoke("qualify", "table", "--registry", registry, "--pool", one, "--markdown")
    assert result.exit_code == 0, result.output
    header = result.output.splitlines()[0]
    assert "| fake-a |" in header and "| fake-b (schema) |" in header
    assert "(schema): the pool sends this model each step's JSON schema" in result.output
    # A verdict measured without the schema, for a model now asked with it, is marked.
    assert f"| `{PILOT_STEP}` | ✓ | ✓ | ✓ | ✓ |" in result.output
    assert "| `self_consistency` | ✓ | ✓* | ✓ | ✓ |" in result.output
    assert "* piloted with the response schema and the pool now sends none, or the reverse" in (
        result.output
    )


# ---------------------------------------------------------------- routes that cannot


def test_a_model_whose_route_takes_no_schema_is_refused_before_anything_runs(
    runs, testdata, tmp_path
):
    pool = write_pool(tmp_path / "pool.yaml", runs["server"].base_url, pm=runs["pm"])
    data = yaml.safe_load(pool.read_text())
    # litellm's Cohere route has no response_format: with drop_params it would drop it.
    data["models"][0].update(model="cohere/command-r", api_base=None, structured_output=True)
    pool.write_text(yaml.safe_dump(data, sort_keys=False))
    videos = write_videos(tmp_path / "videos", testdata, count=1)
    result = vkr_run(videos, pool, tmp_path / "run")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "'fake-a' has structured_output: true" in lines[0]
    assert "cohere route" in lines[0] and "takes no response schema" in lines[0]
    assert not (tmp_path / "run" / "calls.jsonl").exists()

    # litellm's Gemini route puts the schema into the prompt for a model its map does not
    # list as taking one: refused too.
    data["models"][0].update(model="gemini/fake-a", api_base=runs["server"].api_base("gemini"))
    pool.write_text(yaml.safe_dump(data, sort_keys=False))
    result = vkr_run(videos, pool, tmp_path / "run")
    assert result.returncode != 0
    assert "puts the schema into the prompt instead of sending it" in result.stderr

    pilot = invoke(
        "qualify",
        "pilot",
        "--step",
        PILOT_STEP,
        "--model",
        "fake-a",
        "--pool",
        pool,
        "--n",
        2,
        "--from",
        runs["plain"][2],
        "--out",
        tmp_path / "pilot",
    )
    assert pilot.exit_code != 0
    assert "puts the schema into the prompt" in pilot.output and "Traceback" not in pilot.output


# ---------------------------------------------------------------- the schema itself


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(description="the part's own title field")
    note: str = ""


class _Whole(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parts: list[_Part] = Field(min_length=1)
    kind: str = Field(default="x", json_schema_extra={"const": "x"})


class _Nested(BaseModel):
    model_config = ConfigDict(extra="forbid")
    children: list[_Nested] = []


class _Tidy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    answer: str = Field(min_length=1)


class _TidyStep(Step[str, _Tidy]):
    name = "tidy step/v2"
    output_schema = _Tidy


class _ProseStep(_TidyStep):
    structured_output = False


def test_the_schema_is_inlined_without_annotations_and_strict_only_when_openai_allows():
    schema, strict = portable_schema(_Whole)
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text and "default" not in text
    part = schema["properties"]["parts"]["items"]
    # Pydantic's titles go; a field that is *called* title stays.
    assert set(part["properties"]) == {"title", "note"} and "title" not in part
    assert part["properties"]["title"]["description"] == "the part's own title field"
    assert schema["properties"]["kind"]["enum"] == ["x"]
    # An optional field breaks OpenAI's strict rule that every property is required.
    assert strict is False
    assert portable_schema(_Tidy) == (
        {
            "additionalProperties": False,
            "properties": {"answer": {"minLength": 1, "type": "string"}},
            "required": ["answer"],
            "type": "object",
        },
        True,
    )
    with pytest.raises(VkrError, match=r"_Nested refers to itself .*structured_output = False"):
        portable_schema(_Nested)


def test_the_schema_goes_only_where_the_pool_and_the_step_both_allow_it():
    pool = Pool(models=[ModelSpec(name="m", model="openai/m", api_base="http://127.0.0.1:9")])
    on = ModelSpec(name="m", model="openai/m", structured_output=True)
    off = ModelSpec(name="m", model="openai/m")
    sent = call_params(_TidyStep(), on, pool)["response_format"]
    assert sent == response_format(_TidyStep())
    assert sent["json_schema"]["name"] == "tidy_step_v2" and sent["json_schema"]["strict"]
    # Without it the parameters are what they always were.
    assert call_params(_TidyStep(), off, pool) == {"temperature": 0.0, "max_tokens": 2048}
    assert "response_format" not in call_params(_ProseStep(), on, pool)


# ---------------------------------------------------------------- every protocol

# One model per way litellm 1.110.2 sends a schema: OpenAI's response_format (vkr's plain
# route), Anthropic's output_format (Claude models it marks for native structured output)
# and forced json_tool_call (any other Claude), Gemini's responseJsonSchema (2.0 and later)
# and responseSchema (any other Gemini).
MIXED = {
    "fake-a": "openai/fake-a",
    "fake-b": "anthropic/claude-sonnet-4-5",
    "fake-c": "gemini/gemini-2.5-flash",
    "fake-d": "anthropic/fake-d",
    "fake-e": "gemini/gemini-flash-latest",
}


def mixed_pool(path: Path, server: FakeModelServer, pm: Any, on: bool) -> Path:
    protocols = {name: model.split("/")[0] for name, model in MIXED.items()}
    pool = write_pool(path, server.base_url, models=tuple(MIXED), pm=pm, protocols=protocols)
    data = yaml.safe_load(pool.read_text())
    for entry in data["models"]:
        entry["model"] = MIXED[entry["name"]]
        entry["structured_output"] = on
    pool.write_text(yaml.safe_dump(data, sort_keys=False))
    return pool


def test_every_protocol_carries_the_schema_in_its_own_form(runs, testdata, tmp_path):
    server, pm = runs["server"], runs["pm"]
    videos = write_videos(tmp_path / "videos", testdata)

    server.clear_received()
    plain = vkr_run(
        videos, mixed_pool(tmp_path / "a" / "pool.yaml", server, pm, False), tmp_path / "a" / "run"
    )
    assert plain.returncode in (0, 3), plain.stderr
    without = server.received()
    assert {r.protocol for r in without} == {"openai", "anthropic", "gemini"}
    assert all(r.response_schema is None for r in without)
    assert {c["outcome"] for c in calls(tmp_path / "a" / "run")} == {"malformed"}

    server.clear_received()
    run_dir = tmp_path / "b" / "run"
    result = vkr_run(videos, mixed_pool(tmp_path / "b" / "pool.yaml", server, pm, True), run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    made = calls(run_dir)
    assert {c["model"] for c in made} == set(MIXED)
    assert [c for c in made if c["outcome"] == "malformed"] == []
    assert all(c["structured_output"] for c in made)

    # The reach check before the run is a one-token request of no step: it needs no schema.
    requests = [r for r in server.received() if r.step != "preflight"]
    by_model: dict[str, list[Any]] = {}
    for request in requests:
        by_model.setdefault(request.model, []).append(request)
    assert set(by_model) == {
        "fake-a",
        "claude-sonnet-4-5",
        "gemini-2.5-flash",
        "fake-d",
        "gemini-flash-latest",
    }
    steps = pm.registry.steps
    for model, received in by_model.items():
        for request in received:
            expected, _ = portable_schema(steps[request.step].output_schema)
            sent = request.response_schema
            assert sent is not None, (model, request.step)
            # Whatever the form, the fields and what is required are the step's.
            assert sent["required"] == expected["required"], (model, request.step)
            assert set(sent["properties"]) == set(expected["properties"])
    openai_sent = by_model["fake-a"][0]
    assert (
        openai_sent.protocol == "openai"
        and openai_sent.response_schema == portable_schema(steps[openai_sent.step].output_schema)[0]
    )
    # Anthropic's output_format: length bounds become notes in the description.
    native = [r for r in by_model["claude-sonnet-4-5"] if r.step == "self_consistency"]
    assert native and all(r.schema_tool is None for r in native)
    answer = native[0].response_schema["properties"]["answer"]
    assert "minLength" not in answer and "minimum length: 1" in answer["description"]
    # Other Claude models: a forced tool whose input schema is the step's schema.
    assert {r.schema_tool for r in by_model["fake-d"]} == {"json_tool_call"}
    # Gemini 2.x keeps the JSON Schema; older names get the OpenAPI subset without
    # additionalProperties.
    assert all(
        r.response_schema["additionalProperties"] is False for r in by_model["gemini-2.5-flash"]
    )
    assert all(
        "additionalProperties" not in r.response_schema for r in by_model["gemini-flash-latest"]
    )


class _Recursive(Gate[_Nested]):
    name = "self_consistency"
    output_schema = _Nested
    order = 10


def test_a_step_schema_that_cannot_be_sent_stops_the_run_before_it_starts(runs, tmp_path):
    from vkr_core.run import Run

    pm = get_plugin_manager()
    # A third party's self_consistency whose reply nests itself: no provider takes that.
    pm.registry.steps["self_consistency"] = _Recursive()
    pool = structured(write_pool(tmp_path / "pool.yaml", runs["server"].base_url, pm=pm))
    with pytest.raises(VkrError, match=r"_Nested refers to itself .*structured_output = False"):
        Run(tmp_path / "run", pool, pm=pm)
    assert not (tmp_path / "run").exists()
    # Without structured output the schema is never sent, so nothing stops the run.
    Run(tmp_path / "run", structured(pool, on=False), pm=pm).store.run_lock.release()
