"""Every protocol through the real litellm: OpenAI, Anthropic Messages, Gemini generateContent.

The fake server speaks all three on 127.0.0.1; a pool names a model by protocol
(``openai/``, ``anthropic/``, ``gemini/``) and litellm's own code for that provider builds the
request and parses the reply. What a user relies on is checked per protocol: a run over a
mixed pool, exactly-once after kill -9, refusals never cached, 429 waits as asked, 5xx
retried.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_run import (
    VKR,
    accepted,
    keys_vkr_holds,
    replies_recorded,
    sigkill_when,
    vkr_here,
    vkr_run_here,
    write_manifest,
)

from plugins.providers.fake_protocols import REFUSAL_TEXT
from plugins.providers.fake_server import write_pool
from plugins.providers.litellm_provider import LitellmProvider
from plugins.steps.schemas import SolvedAnswer
from vkr_core.calls import (
    CallFailed,
    ModelCaller,
    RetrySettings,
    cache_key,
)
from vkr_core.config import ModelSpec
from vkr_core.steps import ReplyError, Step

PROTOCOLS = ("openai", "anthropic", "gemini")
MODELS = ("fake-a", "fake-b", "fake-c", "fake-d")
QUESTION = "Question: [q:0000000a:mc] Which?"


def pool_for(tmp_path: Path, server: Any, pm: Any, protocols: dict[str, str]) -> Path:
    """A pool of the four fake models, each speaking the protocol given for it."""
    return write_pool(
        tmp_path / "pool.yaml",
        server.base_url,
        models=MODELS,
        registry_path=tmp_path / "eligibility.yaml",
        pm=pm,
        protocols=protocols,
    )


def specs(pool: Path) -> dict[str, ModelSpec]:
    entries = yaml.safe_load(pool.read_text())["models"]
    return {entry["name"]: ModelSpec(**entry) for entry in entries}


class Solve(Step):
    name = "self_consistency"
    output_schema = SolvedAnswer


def make_caller(tmp_path: Path) -> ModelCaller:
    return ModelCaller(
        cache_dir=tmp_path / "cache",
        providers={"litellm": LitellmProvider()},
        retry=RetrySettings(attempts=4, initial=0.01, maximum=0.05),
    )


def messages(text: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


async def closing(caller: ModelCaller, coroutine: Any) -> Any:
    try:
        return await coroutine
    finally:
        for provider in caller.providers.values():
            await provider.aclose()


def call(
    caller: ModelCaller, spec: ModelSpec, text: str = QUESTION, params: dict | None = None
) -> Any:
    step = Solve()
    return asyncio.run(
        closing(
            caller,
            caller.call(
                spec=spec,
                step=step.name,
                prompt_version="v1",
                messages=messages(text),
                params=params or {"temperature": 0},
                validate=step.parse,
            ),
        )
    )


def one_protocol(tmp_path: Path, server: Any, pm: Any, protocol: str) -> ModelSpec:
    """fake-a, speaking ``protocol``."""
    pool = pool_for(tmp_path, server, pm, dict.fromkeys(MODELS, protocol))
    spec = specs(pool)["fake-a"]
    assert spec.model.startswith(f"{protocol}/"), spec.model
    return spec


# ------------------------------------------------------------------ a run over a mixed pool


def test_a_run_over_a_pool_of_three_protocols_accounts_each(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager
):
    mixed = {"fake-a": "openai", "fake-b": "anthropic", "fake-c": "gemini", "fake-d": "gemini"}
    pool = pool_for(tmp_path, vkr_fake_server, vkr_plugin_manager, mixed)
    # Anthropic's fake-b declines to write examples (stop_reason refusal), and Gemini's fake-c
    # has every such prompt blocked (promptFeedback.blockReason).
    vkr_fake_server.set_policy(
        {
            "model_steps": {
                "fake-b|example_generation": {"refusal": 1.0},
                "fake-c|example_generation": {"blocked": 1.0},
            }
        }
    )
    manifest = write_manifest(tmp_path / "videos", testdata, good=2, bad=False)
    vkr_run_here(manifest, pool, tmp_path / "run")
    assert accepted(tmp_path / "run")
    refused = [
        rejection["raw_reply"] or ""
        for record in (tmp_path / "run" / "records").glob("*.json")
        for rejection in json.loads(record.read_text())["rejected"]
        if rejection["kind"] == "refusal"
    ]
    assert any(REFUSAL_TEXT in raw for raw in refused), refused
    assert any("blockReason" in raw for raw in refused), refused
    calls = [
        json.loads(line) for line in (tmp_path / "run" / "calls.jsonl").read_text().splitlines()
    ]
    for model, protocol in mixed.items():
        paid = [c for c in calls if c["model"] == model and c["outcome"] == "ok"]
        assert paid, f"{model} ({protocol}) made no successful call"
        assert all(c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 for c in paid), model
        assert sum(c["cost_usd"] for c in paid) > 0, model
    by_model = vkr_fake_server.stats()["by_model"]
    assert set(by_model) >= set(mixed), by_model
    report = vkr_here("report", tmp_path / "run")
    assert report.returncode == 0, report.stderr
    models = json.loads((tmp_path / "run" / "report.json").read_text())["models"]
    for model in mixed:
        assert model in report.stdout
        stats = models[model]
        assert stats["spend_usd"] > 0 and stats["prompt_tokens"] > 0, (model, stats)
        assert stats["completion_tokens"] > 0, (model, stats)

    # Qualification pilots go through the same protocols: the run's recorded inputs of a
    # gate, answered by the Anthropic and the Gemini model.
    for model, protocol in (("fake-b", "anthropic"), ("fake-c", "gemini")):
        before = vkr_fake_server.stats()["by_protocol"].get(protocol, 0)
        out = tmp_path / f"pilot-{model}"
        piloted = vkr_here(
            *("qualify", "pilot", "--step", "self_consistency", "--model", model),
            *("--pool", pool, "--n", "3", "--from", tmp_path / "run", "--out", out),
        )
        assert piloted.returncode == 0, piloted.stdout + piloted.stderr
        items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
        assert items and all(item["outcome"] == "ok" for item in items), items
        # Each item a new request in that protocol, unless the run already asked it.
        assert vkr_fake_server.stats()["by_protocol"][protocol] > before


@pytest.mark.parametrize(
    "model", ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5", "gemini/gemini-2.5-flash"]
)
def test_an_unpriced_pool_entry_is_priced_from_litellms_cost_map(
    tmp_path, vkr_fake_server, vkr_plugin_manager, model
):
    import litellm

    protocol = model.split("/")[0]
    served = one_protocol(tmp_path, vkr_fake_server, vkr_plugin_manager, protocol)
    spec = ModelSpec(name="real-name", model=model, api_base=served.api_base)
    result = call(make_caller(tmp_path), spec)
    record = result.record
    assert result.outcome == "ok" and record.prompt_tokens > 0 and record.completion_tokens > 0
    expected = sum(
        litellm.cost_per_token(
            model=model,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
        )
    )
    assert record.cost_usd == pytest.approx(expected) and expected > 0


# ------------------------------------------------------------------ exactly once


# A parameter outside PLAIN_PARAMS sends an OpenAI-protocol call through litellm and the
# OpenAI SDK (as for OpenAI itself) instead of vkr's own POST.
SDK_PARAMS = {"temperature": 0, "user": "vkr-test"}


@pytest.mark.parametrize(
    "protocol, params, route",
    [
        pytest.param("openai", None, None, id="openai"),
        pytest.param("openai", SDK_PARAMS, None, id="openai-through-litellm"),
        pytest.param("anthropic", None, None, id="anthropic"),
        pytest.param("gemini", None, None, id="gemini"),
        # OpenAI-protocol servers that litellm reaches through its generic HTTP handler.
        pytest.param("openai", None, "deepseek", id="deepseek"),
        pytest.param("openai", None, "hosted_vllm", id="hosted_vllm"),
    ],
)
def test_a_reply_read_before_a_kill_9_is_replayed_by_litellm_not_paid_again(
    tmp_path, vkr_fake_server, vkr_plugin_manager, die_before_caching, protocol, params, route
):
    """The worst moment to die: the reply is read, the cache write not yet made. A process
    killed -9 right there leaves the body in the journal, and the next attempt of the call
    gets it from the journal through litellm's own parser for the protocol, without a
    request."""
    spec = one_protocol(tmp_path, vkr_fake_server, vkr_plugin_manager, protocol)
    if route is not None:
        spec = spec.model_copy(update={"model": f"{route}/{spec.name}"})
    step = Solve()
    params = params or {"temperature": 0}
    key = cache_key(spec, step.name, "v1", messages(), params, 0)
    code, stderr = die_before_caching(tmp_path / "cache", spec, params)
    assert code == -signal.SIGKILL, stderr
    billed = vkr_fake_server.stats()["completions"]
    assert billed == 1

    caller = make_caller(tmp_path)
    lost = caller.journal.load(key)
    assert lost is not None and caller.cache.get(key) is None
    result = call(caller, spec, params=params)
    assert vkr_fake_server.stats()["completions"] == billed  # not asked again
    assert result.outcome == "ok"
    SolvedAnswer.model_validate(json.loads(result.text))
    assert json.loads(result.text)["answer"] in lost.decode()  # the reply the killed run read
    record = result.record
    assert record.attempts == 0 and not record.cache_hit  # recovered, accounted once
    assert record.prompt_tokens > 0 and record.cost_usd > 0
    assert caller.journal.load(key) is None  # now in the cache proper
    assert call(caller, spec, params=params).record.cache_hit


# A process that makes one call and is killed -9 as it is about to cache the reply it read.
# Each is forked from one process that imported vkr and litellm once for the module (and
# starts no thread, so a fork is safe): a process of its own that dies by SIGKILL, without
# paying a new Python's imports, seconds of CPU, for each of the six.
FORK_PER_CALL = """
import asyncio, json, os, signal, sys, threading, traceback
from pathlib import Path
from test_protocols import Solve, make_caller, messages, closing
from vkr_core.config import ModelSpec
# What litellm loads on its first call (thousands of modules), loaded once here.
import litellm.main, litellm.utils
assert threading.active_count() == 1, threading.enumerate()  # else forking is unsafe

def die_before_caching(cache_dir, spec, params):
    caller = make_caller(Path(cache_dir).parent)
    caller.cache.transact = lambda: os.kill(os.getpid(), signal.SIGKILL)
    step = Solve()
    asyncio.run(closing(caller, caller.call(
        spec=spec, step=step.name, prompt_version="v1", messages=messages(),
        params=params, validate=step.parse,
    )))

for line in sys.stdin:
    asked = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(asked["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        signal.alarm(120)  # a call that never ends dies of SIGALRM, not SIGKILL
        try:
            spec = ModelSpec.model_validate_json(asked["spec"])
            die_before_caching(asked["cache_dir"], spec, asked["params"])
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@pytest.fixture(scope="module")
def forker() -> Any:
    """The process that forks the killed callers (``FORK_PER_CALL``)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_PER_CALL],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent,
    )
    yield proc
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture
def die_before_caching(forker: Any, tmp_path: Path) -> Any:
    """Make one call in a process of its own, killed -9 as it is about to cache the reply it
    read; returns its exit status (as subprocess gives it) and its stderr."""

    def killed(cache_dir: Path, spec: ModelSpec, params: dict[str, Any]) -> tuple[int, str]:
        stderr = tmp_path / "killed.stderr"
        asked = {"cache_dir": str(cache_dir), "spec": spec.model_dump_json(), "params": params}
        forker.stdin.write(json.dumps({**asked, "stderr": str(stderr)}) + "\n")
        forker.stdin.flush()
        line = forker.stdout.readline()
        assert line, "the forking process is gone"
        return json.loads(line), stderr.read_text() if stderr.exists() else ""

    return killed


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kill_9_mid_run_and_resume_pays_no_reply_twice(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager, protocol
):
    """A reply on the wire at the kill is billed and lost whatever vkr does; a reply vkr had
    read (journalled or cached) is never paid again."""
    pool = pool_for(tmp_path, vkr_fake_server, vkr_plugin_manager, dict.fromkeys(MODELS, protocol))
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    vkr_fake_server.set_policy({"latency_ms": 300})
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [VKR, "run", "--videos", str(manifest), "--pool", str(pool), "--out", str(run_dir)]
        + ["--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Killed once it has read and kept replies (server completions may still be on the wire).
    sigkill_when(lambda: len(replies_recorded(run_dir)) >= 2, proc, "replies kept")
    held = keys_vkr_holds(run_dir)
    assert held
    seen = len(vkr_fake_server.stats()["repeated_call_keys"])

    vkr_fake_server.set_policy({})
    vkr_run_here(manifest, pool, run_dir)
    repeated = vkr_fake_server.stats()["repeated_call_keys"][seen:]
    assert not set(repeated) & held, "a reply vkr had read was paid again"
    record = json.loads((run_dir / "records" / "good0.json").read_text())
    assert record["status"] == "done", record


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize(
    "protocol, form, words",
    [
        # OpenAI: finish_reason content_filter with the model's words.
        ("openai", "refusal", REFUSAL_TEXT),
        # Anthropic: stop_reason "refusal".
        ("anthropic", "refusal", REFUSAL_TEXT),
        # Gemini: a candidate stopped with finishReason SAFETY (no text: the raw reply is kept).
        ("gemini", "refusal", "SAFETY"),
        # Gemini: the prompt blocked as a whole, promptFeedback.blockReason and no candidate.
        ("gemini", "blocked", "blockReason"),
    ],
)
def test_a_refusal_is_recorded_with_its_text_and_never_cached(
    tmp_path, vkr_fake_server, vkr_plugin_manager, protocol, form, words
):
    spec = one_protocol(tmp_path, vkr_fake_server, vkr_plugin_manager, protocol)
    vkr_fake_server.set_policy({form: 1.0})
    caller = make_caller(tmp_path)
    with pytest.raises(ReplyError) as refused:
        call(caller, spec)
    assert refused.value.kind == "refusal"
    assert refused.value.raw, "the refusal's own words (or raw reply) are kept"
    if words:
        assert words in refused.value.raw
    assert caller.records[-1].outcome == "refusal"
    assert len(caller.cache) == 0  # neither the reply nor its journal entry stays
    # A rerun asks again, and gets an answer once the model gives one.
    vkr_fake_server.set_policy({})
    again = call(caller, spec)
    assert again.outcome == "ok" and not again.record.cache_hit
    assert vkr_fake_server.stats()["completions"] == 2


# ------------------------------------------------------------------ rate limits and 5xx


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_429_waits_as_long_as_the_provider_asks_and_then_succeeds(
    tmp_path, vkr_fake_server, vkr_plugin_manager, protocol
):
    spec = one_protocol(tmp_path, vkr_fake_server, vkr_plugin_manager, protocol)
    # A whole second: Anthropic's retry-after counts in whole seconds.
    vkr_fake_server.set_policy({"script": ["429", "ok"], "retry_after_s": 1})
    caller = make_caller(tmp_path)
    started = time.monotonic()
    result = call(caller, spec)
    waited = time.monotonic() - started
    assert result.outcome == "ok" and result.record.attempts == 2
    # The backoff alone would wait at most 0.05 s: only the provider's delay explains this
    # (OpenAI's retry-after-ms, Anthropic's retry-after, Gemini's RetryInfo.retryDelay).
    assert 1 <= waited < 1 * 1.25 + 2, waited


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_errors_are_retried(tmp_path, vkr_fake_server, vkr_plugin_manager, protocol):
    spec = one_protocol(tmp_path, vkr_fake_server, vkr_plugin_manager, protocol)
    vkr_fake_server.set_policy({"script": ["500", "503", "ok"]})
    result = call(make_caller(tmp_path), spec)
    assert result.outcome == "ok" and result.record.attempts == 3
    stats = vkr_fake_server.stats()
    assert stats["requests"] == 3 and stats["completions"] == 1


CANARY = "sk-canary-" + "0b9d8c7a6f5e4d3c2b1a09f8e7d6c5b4"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_client_error_is_not_retried_and_never_shows_the_key(
    tmp_path, vkr_fake_server, vkr_plugin_manager, protocol, monkeypatch
):
    served = one_protocol(tmp_path, vkr_fake_server, vkr_plugin_manager, protocol)
    monkeypatch.setenv("VKR_PROTOCOLS_TEST_KEY", CANARY)
    wrong = served.model_copy(
        update={
            "api_base": str(served.api_base).rstrip("/") + "/nowhere",
            "api_key_env": "VKR_PROTOCOLS_TEST_KEY",
        }
    )
    caller = make_caller(tmp_path)
    with pytest.raises(CallFailed, match="after 1 attempt") as failed:
        call(caller, wrong)
    record = caller.records[-1]
    assert record.outcome == "error" and record.attempts == 1
    assert CANARY not in str(failed.value) and CANARY not in (record.error or "")


def test_a_model_whose_route_cannot_be_journalled_is_named_in_the_log():
    # capture_logs, not capsys: an earlier test may have pointed vkr's logger at its own
    # stream or level (configure_logging); the warning must be seen whatever the order, at
    # the default level a user runs with.
    import structlog
    from structlog.testing import capture_logs

    from vkr_core.log import configure_logging

    provider = LitellmProvider()
    saved = structlog.get_config()
    try:
        configure_logging("WARNING")
        with capture_logs() as logs:
            assert provider.journals(ModelSpec(name="claude", model="anthropic/claude-sonnet-4-5"))
            vertex = ModelSpec(name="vertex-flash", model="vertex_ai/gemini-2.5-flash")
            assert not provider.journals(vertex)
            assert not provider.journals(vertex)  # said once, not per call
    finally:
        structlog.configure(**saved)
    said = [e for e in logs if e["event"] == "replies not journalled"]
    assert [e["model"] for e in said] == ["vertex-flash"]
    assert said[0]["log_level"] == "warning"
