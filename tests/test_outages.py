"""Outages, credentials, budget and exit codes: `vkr run` against the fake server over HTTP.

A run whose point is what it records runs in the test's own process, through click; one that
is interrupted, or whose exit status a shell sees, is a `vkr` process of its own.

A dead model is a pool entry whose api_base is a closed loopback port, or a fake-server
model whose policy answers 500 to everything.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from test_run import vkr_run_here

from plugins.providers.fake_server import DEFAULT_MODELS, write_pool
from vkr_core.config import EligibilityRegistry, Pool
from vkr_core.router import Router

VKR = str(Path(sys.executable).parent / "vkr")
RANDOM_STEPS = ("example_generation", "self_consistency", "cot_verification")
ROUNDS = 6  # 3 skills x 2 rounds


def closed_port() -> int:
    """A loopback port nobody listens on: connections to it are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_pool(
    tmp_path: Path, server, pm, extra: list[dict] | None = None, steps: dict | None = None
) -> Path:
    """The fake server's four models plus ``extra`` entries, all eligible for every step.

    By default the random-choice steps use fake-a, fake-b and fake-c, and video_dependency
    the fixed pair fake-c, fake-d.
    """
    pool_path = write_pool(
        tmp_path / "pool.yaml", server.base_url, registry_path=tmp_path / "eligibility.yaml", pm=pm
    )
    pool = yaml.safe_load(pool_path.read_text())
    registry = yaml.safe_load((tmp_path / "eligibility.yaml").read_text())
    for entry in extra or []:
        pool["models"].append(
            {
                "modality": ["text", "vision"],
                "input_cost_per_token": 5e-7,
                "output_cost_per_token": 1.5e-6,
                **entry,
            }
        )
        for step in registry:
            registry[step][entry["name"]] = dict(next(iter(registry[step].values())))
    pool["steps"] = steps or {
        **{step: {"models": ["fake-a", "fake-b", "fake-c"]} for step in RANDOM_STEPS},
        "video_dependency": {"models": ["fake-c", "fake-d"]},
    }
    pool_path.write_text(yaml.safe_dump(pool, sort_keys=False))
    (tmp_path / "eligibility.yaml").write_text(yaml.safe_dump(registry))
    return pool_path


def make_manifest(folder: Path, testdata: Path, good: int = 3, corrupt: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(good):
        shutil.copy(testdata / "flipping_a_pancake.mkv", folder / f"clip{i}.mkv")
        lines.append(
            {
                "video_id": f"clip{i}",
                "path": f"clip{i}.mkv",
                "discipline": "cooking",
                "subject": "batter cookery",
                "knowledge_point": "Maillard reaction",
            }
        )
    if corrupt:
        shutil.copy(testdata / "corrupted.mp4", folder / "corrupted.mp4")
        lines.append({"video_id": "corrupted", "path": "corrupted.mp4", "discipline": "cooking"})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def vkr_run(manifest: Path, pool: Path, out: Path, *extra: str, env: dict | None = None):
    return subprocess.run(
        [
            VKR,
            "run",
            "--videos",
            str(manifest),
            "--pool",
            str(pool),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "records").glob("*.json"))}


def calls(run_dir: Path) -> list[dict]:
    path = run_dir / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def failures(run_dir: Path) -> list[dict]:
    path = run_dir / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def models_used(record: dict) -> set[str]:
    used = set()
    for example in record["accepted"]:
        used |= {m for ms in example["models"].values() for m in ms}
    for rejection in record["rejected"]:
        if rejection.get("candidate"):
            used |= {m for ms in rejection["candidate"]["models"].values() for m in ms}
    return used


def assert_every_video_done(run_dir: Path, names: list[str], result) -> None:
    got = records(run_dir)
    assert sorted(got) == sorted(names), result.stderr
    for name in names:
        record = got[name]
        assert record["status"] == "done", (name, record.get("failure"), result.stderr)
        assert len(record["accepted"]) + len(record["rejected"]) == ROUNDS, name
    assert failures(run_dir) == [], result.stderr


# ---------------------------------------------------------------- (a) one dead model of three


@pytest.mark.parametrize("death", ["answers-500", "closed-port"])
def test_a_dead_model_is_cooled_down_and_every_video_completes_on_the_others(
    death, tmp_path, testdata, vkr_fake_server, vkr_plugin_manager
):
    pool = make_pool(tmp_path, vkr_fake_server, vkr_plugin_manager)
    extra: list[str] = []
    if death == "answers-500":
        vkr_fake_server.set_policy({"models": {"fake-a": {"server_error": 1.0}}})
    else:
        data = yaml.safe_load(pool.read_text())
        data["models"][0]["api_base"] = f"http://127.0.0.1:{closed_port()}/v1"
        pool.write_text(yaml.safe_dump(data, sort_keys=False))
        extra = ["--skip-preflight"]  # so the breaker, not preflight, finds it dead
    manifest = make_manifest(tmp_path / "videos", testdata, good=2)
    result = vkr_run_here(manifest, pool, tmp_path / "run", *extra, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_every_video_done(tmp_path / "run", ["clip0", "clip1"], result)
    assert "model fake-a cooled down" in result.stderr
    made = calls(tmp_path / "run")
    dead = [c for c in made if c["model"] == "fake-a"]
    assert dead and all(c["outcome"] == "error" for c in dead)
    # The records show the models really used, and calls say which instances were rerouted.
    for record in records(tmp_path / "run").values():
        assert "fake-a" not in models_used(record)
    rerouted = [c for c in made if c["rerouted_from"] == "fake-a"]
    assert rerouted and all(
        c["model"] in {"fake-b", "fake-c"} and c["outcome"] != "error" for c in rerouted
    )
    if death == "answers-500":
        stats = vkr_fake_server.stats()
        assert stats["repeats"] == 0 and "fake-a" not in stats["by_model"]


def test_rerouting_moves_only_the_instances_of_the_cooled_model(vkr_plugin_manager):
    from vkr_core.health import ModelHealth

    steps = vkr_plugin_manager.registry.steps
    pool = Pool.model_validate(
        {
            "models": [{"name": n, "model": f"openai/{n}"} for n in ("a", "b", "c")],
            "steps": {"video_dependency": {"models": ["b", "c"]}},
        }
    )
    registry = EligibilityRegistry.model_validate(
        {
            "steps": {
                "example_generation": {
                    n: {"eligible": True, "prompt_version": steps["example_generation"].version()}
                    for n in ("a", "b", "c")
                }
            }
        }
    )
    health = ModelHealth()
    router = Router(pool, registry, steps, seed=3, health=health)
    keys = [(f"v{i}", "VidR", 0) for i in range(300)]
    before = [router.choose("example_generation", *k).name for k in keys]
    health.cool("a", "HTTP 500")
    after = [router.route("example_generation", *k) for k in keys]
    for was, (spec, route) in zip(before, after, strict=True):
        assert route.first_choice == was
        if was == "a":
            assert spec.name in {"b", "c"} and route.rerouted_from == "a"
        else:
            assert spec.name == was and route.rerouted_from is None
    # Reproducible: the same seed and the same health give the same choices.
    again = Router(pool, registry, steps, seed=3, health=health)
    assert [again.choose("example_generation", *k).name for k in keys] == [s.name for s, _ in after]
    assert {s.name for s, _ in after} == {"b", "c"}


# ---------------------------------------------------------------- (b) preflight


def test_preflight_reports_a_missing_key_and_an_unreachable_host_before_any_video(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager, monkeypatch
):
    port = closed_port()
    pool = make_pool(
        tmp_path,
        vkr_fake_server,
        vkr_plugin_manager,
        extra=[
            {
                "name": "hosted",
                "model": "openai/gpt-4o-mini",
                "api_key_env": "VKR_TEST_NO_SUCH_KEY",
            },
            {"name": "gone", "model": "openai/fake-d", "api_base": f"http://127.0.0.1:{port}/v1"},
        ],
        steps={
            **{step: {"models": ["fake-a", "fake-b"]} for step in RANDOM_STEPS},
            "video_dependency": {"models": ["hosted", "gone"]},
        },
    )
    manifest = make_manifest(tmp_path / "videos", testdata, good=2)
    monkeypatch.delenv("VKR_TEST_NO_SUCH_KEY", raising=False)
    started = time.monotonic()
    result = vkr_run_here(manifest, pool, tmp_path / "run", check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 5, result.stdout + result.stderr
    assert elapsed < 15, elapsed
    message = result.stderr
    assert "model 'hosted': its key variable VKR_TEST_NO_SUCH_KEY is not set" in message
    assert f"model 'gone': cannot reach http://127.0.0.1:{port}/v1" in message
    assert "video_dependency" in message and "Nothing was started" in message
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1
    assert not any((tmp_path / "run" / "records").glob("*.json"))
    assert vkr_fake_server.stats()["completions"] == 0
    # The reach check of each model is recorded; the model without a key was never called.
    checked = [
        json.loads(line) for line in (tmp_path / "run" / "preflight.jsonl").read_text().splitlines()
    ]
    assert {c["model"]: c["outcome"] for c in checked} == {
        "fake-a": "ok",
        "fake-b": "ok",
        "gone": "error",
    }
    # --skip-preflight skips the reach check, not the key check: a missing key is certain.
    skipped = vkr_run_here(manifest, pool, tmp_path / "run", "--skip-preflight", check=False)
    assert skipped.returncode == 5
    assert (
        "VKR_TEST_NO_SUCH_KEY is not set" in skipped.stderr and "cannot reach" not in skipped.stderr
    )


def test_models_that_fail_preflight_but_are_not_needed_are_left_out_with_a_warning(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager, monkeypatch
):
    pool = make_pool(
        tmp_path,
        vkr_fake_server,
        vkr_plugin_manager,
        extra=[
            {
                "name": "hosted",
                "model": "openai/gpt-4o-mini",
                "api_key_env": "VKR_TEST_NO_SUCH_KEY",
            },
            {
                "name": "gone",
                "model": "openai/fake-d",
                "api_base": f"http://127.0.0.1:{closed_port()}/v1",
            },
        ],
        steps={
            **{step: {"models": ["fake-a", "fake-b", "hosted", "gone"]} for step in RANDOM_STEPS},
            "video_dependency": {"models": ["fake-c", "fake-d"]},
        },
    )
    manifest = make_manifest(tmp_path / "videos", testdata, good=2)
    monkeypatch.delenv("VKR_TEST_NO_SUCH_KEY", raising=False)
    result = vkr_run_here(manifest, pool, tmp_path / "run", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "preflight: model 'hosted' is left out of this run: its key variable" in result.stderr
    assert "preflight: model 'gone' starts cooled down" in result.stderr
    assert_every_video_done(tmp_path / "run", ["clip0", "clip1"], result)
    for record in records(tmp_path / "run").values():
        assert not models_used(record) & {"hosted", "gone"}
    assert "hosted" not in {c["model"] for c in calls(tmp_path / "run")}


# ---------------------------------------------------------------- (c) everything down, then back


class Stderr:
    """The stderr of a running `vkr run`, read line by line in a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, f"no {text!r} in:\n{''.join(self.lines)}"
            time.sleep(0.1)

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def start_run(
    manifest: Path, pool: Path, out: Path, *extra: str
) -> tuple[subprocess.Popen, Stderr]:
    proc = subprocess.Popen(
        [
            VKR,
            "run",
            "--videos",
            str(manifest),
            "--pool",
            str(pool),
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, Stderr(proc)


def test_when_every_model_is_down_the_run_pauses_and_finishes_when_they_are_back(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager
):
    pool = make_pool(tmp_path, vkr_fake_server, vkr_plugin_manager)
    manifest = make_manifest(tmp_path / "videos", testdata, good=2)
    vkr_fake_server.set_policy({"server_error": 1.0})
    proc, err = start_run(manifest, pool, tmp_path / "run", "--cooldown", "1")
    try:
        err.wait_for("no other model can take them")
        time.sleep(2)  # a while down: probes keep failing, nothing fails for good
        assert proc.poll() is None, err.text()
        vkr_fake_server.set_policy({})
        proc.wait(timeout=300)  # stdout is a few lines: the pipe cannot fill
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.text()
    assert proc.returncode == 0, out + text
    assert "answers again: resuming" in text
    assert_every_video_done(tmp_path / "run", ["clip0", "clip1"], proc)
    assert vkr_fake_server.stats()["repeats"] == 0


def test_ctrl_c_during_a_pause_stops_cleanly_and_a_rerun_finishes(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager
):
    pool = make_pool(tmp_path, vkr_fake_server, vkr_plugin_manager)
    manifest = make_manifest(tmp_path / "videos", testdata, good=2)
    vkr_fake_server.set_policy({"server_error": 1.0})
    proc, err = start_run(manifest, pool, tmp_path / "run", "--cooldown", "30")
    try:
        err.wait_for("no other model can take them")
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.text()
    assert proc.returncode == 130, text
    assert "run the same command to resume" in text and "Traceback" not in text
    vkr_fake_server.set_policy({})
    again = vkr_run_here(manifest, pool, tmp_path / "run", check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_every_video_done(tmp_path / "run", ["clip0", "clip1"], again)


# ---------------------------------------------------------------- (d) budget


def test_max_spend_stops_early_and_a_rerun_without_it_finishes(
    tmp_path, testdata, vkr_fake_server, vkr_plugin_manager, vkr_pool
):
    manifest = make_manifest(tmp_path / "videos", testdata, good=2)
    # One video costs about $0.011 at the fake server's prices.
    limit = 0.005
    stopped = vkr_run_here(
        manifest,
        vkr_pool,
        tmp_path / "run",
        "--concurrency",
        "1",
        "--max-spend",
        str(limit),
        check=False,
    )
    assert stopped.returncode == 4, stopped.stdout + stopped.stderr
    assert "--max-spend reached" in stopped.stderr and "Traceback" not in stopped.stderr
    spent = sum(c["cost_usd"] for c in calls(tmp_path / "run") if not c["cache_hit"])
    assert limit <= spent < 2 * limit
    done = [n for n, r in records(tmp_path / "run").items() if r["status"] == "done"]
    assert len(done) < 2
    assert failures(tmp_path / "run") == []
    # The limit is the run directory's: the same command again starts no new call.
    billed = vkr_fake_server.stats()["completions"]
    again = vkr_run_here(
        manifest,
        vkr_pool,
        tmp_path / "run",
        "--concurrency",
        "1",
        "--max-spend",
        str(limit),
        check=False,
    )
    assert again.returncode == 4 and vkr_fake_server.stats()["completions"] == billed
    finished = vkr_run_here(manifest, vkr_pool, tmp_path / "run", check=False)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert_every_video_done(tmp_path / "run", ["clip0", "clip1"], finished)
    assert vkr_fake_server.stats()["repeats"] == 0  # nothing paid twice across the three runs


# ---------------------------------------------------------------- (e) exit codes


def test_exit_codes_for_a_failed_video_bad_input_and_a_bad_option(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    manifest = make_manifest(tmp_path / "videos", testdata, good=1, corrupt=True)
    failed = vkr_run(manifest, vkr_pool, tmp_path / "run")
    assert failed.returncode == 3, failed.stdout + failed.stderr
    assert "1 video(s) failed" in failed.stdout
    assert records(tmp_path / "run")["clip0"]["status"] == "done"
    missing_pool = vkr_run(manifest, tmp_path / "no-such-pool.yaml", tmp_path / "run2")
    assert missing_pool.returncode == 1 and "pool file not found" in missing_pool.stderr
    bad_option = vkr_run(manifest, vkr_pool, tmp_path / "run3", "--max-spend", "-1")
    assert bad_option.returncode == 2
    helped = subprocess.run([VKR, "run", "--help"], capture_output=True, text=True)
    listed = {line.split()[0] for line in helped.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert {"0", "1", "2", "3", "4", "5", "130"} <= listed, helped.stdout


def test_generate_exits_3_when_its_video_fails(tmp_path, testdata, vkr_pool, vkr_fake_server):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(testdata / "corrupted.mp4", videos / "broken.mp4")
    result = subprocess.run(
        [
            VKR,
            "generate",
            "--video-id",
            "broken",
            "--videos-dir",
            str(videos),
            "--pool",
            str(vkr_pool),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "video broken failed" in result.stderr


def test_all_default_fake_models_pass_preflight_for_free(
    tmp_path, testdata, vkr_pool, vkr_fake_server
):
    """The reach check of an OpenAI-compatible server is its model list: no completion paid."""
    manifest = make_manifest(tmp_path / "videos", testdata, good=1)
    first = vkr_run_here(manifest, vkr_pool, tmp_path / "run", check=False)
    assert first.returncode == 0, first.stderr
    billed = vkr_fake_server.stats()["completions"]
    again = vkr_run_here(manifest, vkr_pool, tmp_path / "run", check=False)
    assert again.returncode == 0 and vkr_fake_server.stats()["completions"] == billed
    checked = [
        json.loads(line) for line in (tmp_path / "run" / "preflight.jsonl").read_text().splitlines()
    ]
    assert {c["model"] for c in checked} == set(DEFAULT_MODELS)
    assert all(c["outcome"] == "ok" and c["cost_usd"] == 0 for c in checked)
