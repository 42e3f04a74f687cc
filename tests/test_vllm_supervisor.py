"""`provider: vllm`: vkr starts, supervises and stops the model server of a pool entry.

The stand-in for `vllm serve` is vkr's fake model server started by the entry's command
template (a real process on a real port, speaking vLLM's /health and /v1/models); vllm
itself is never needed. Every run is `vkr run` as a user starts it: a process of its own where
the test stops or kills it, or kills a server under it; otherwise in the test's process,
through click (a new process would only add seconds of imports).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_run import VKR, vkr_here, vkr_run_here, write_manifest

# The stand-in: the fake model server on the port vkr gives it, serving until SIGTERM, when
# it writes what it served to a file named by its pid (a SIGKILLed one writes nothing).
# No braces: the command is a template ({port}).
STAND_IN = """
import json, os, signal, sys, threading
from plugins.providers.fake_server import FakeModelServer
port, stats_dir, policy = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
print("stand-in: loading weights", flush=True)
server = FakeModelServer(policy=policy, seed=0)
server.start(port=port)
print("stand-in: serving on port %d" % port, flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
while not done.wait(0.2):
    pass
with open(os.path.join(stats_dir, "stats-%d.json" % os.getpid()), "w") as out:
    json.dump(server.stats(), out)
server.stop()
"""
NEVER_READY = "import time\nprint('loading 38B weights ...', flush=True)\ntime.sleep(600)\n"
GATE_MODELS = ("fake-c", "fake-d")  # write_pool's video-dependency pair


def stand_in(stats_dir: Path, policy: dict[str, Any] | None = None) -> list[str]:
    policy_json = json.dumps(policy or {}).replace("{", "{{").replace("}", "}}")
    return ["{python}", "-c", STAND_IN, "{port}", str(stats_dir), policy_json]


def vllm_pool(pool: Path, options: dict[str, dict[str, Any]]) -> Path:
    """The fixture's pool with the named entries served by `provider: vllm`."""
    data = yaml.safe_load(pool.read_text())
    for entry in data["models"]:
        if entry["name"] in options:
            entry["provider"] = "vllm"
            del entry["api_base"]
            del entry["api_key_env"]
            entry["options"] = options[entry["name"]]
    pool.write_text(yaml.safe_dump(data, sort_keys=False))
    return pool


def run(manifest: Path, pool: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VKR, "run", "--videos", manifest, "--pool", pool, "--out", out, "--no-progress", *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )


def start(manifest: Path, pool: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [VKR, "run", "--videos", manifest, "--pool", pool, "--out", out, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def statuses(out: Path) -> dict[str, dict[str, Any]]:
    """The provider's status file of each server, by served name."""
    found = {}
    for path in sorted((out / "providers" / "vllm").glob("*.json")):
        status = json.loads(path.read_text())
        found[status["served_name"]] = status
    return found


def ready(out: Path, name: str) -> dict[str, Any] | None:
    """The status of the server of ``name`` once it is ready."""
    status = statuses(out).get(name)
    return status if status and status["state"] == "ready" else None


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited: only its parent has not read its status yet
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def port_free(url: str) -> bool:
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


def served_stats(stats_dir: Path) -> dict[int, dict[str, Any]]:
    return {
        int(path.stem.split("-")[1]): json.loads(path.read_text())
        for path in stats_dir.glob("stats-*.json")
    }


def failures(out: Path) -> list[str]:
    path = out / "failures.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def test_a_run_starts_its_vllm_servers_uses_them_and_stops_them(
    tmp_path: Path, testdata: Path, vkr_pool: Path
) -> None:
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    pool = vllm_pool(vkr_pool, {m: {"command": stand_in(stats_dir)} for m in GATE_MODELS})
    manifest = write_manifest(tmp_path / "videos", testdata, good=2, bad=False)
    out = tmp_path / "run"
    result = run(manifest, pool, out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert failures(out) == []
    servers = statuses(out)
    assert set(servers) == set(GATE_MODELS)
    stats = served_stats(stats_dir)
    for name, status in servers.items():
        # Stopped at the end: the process is gone and its port is free again.
        assert status["state"] == "stopped" and status["restarts"] == 0
        assert not alive(status["pid"]) and port_free(status["url"])
        assert "stand-in: serving on port" in Path(status["log"]).read_text()
        # It served the video-dependency gate (SIGTERM let it write what it served).
        assert stats[status["pid"]]["by_model_step"][f"{name}|video_dependency"] > 0
    calls = [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]
    gate = [c for c in calls if c["step"] == "video_dependency"]
    assert {c["model"] for c in gate} == set(GATE_MODELS)
    assert all(c["outcome"] == "ok" for c in gate)

    # A pilot of the gate on one of them starts its own server, and keeps its log with the
    # pilot as a run does (not in a temporary folder).
    pilot = tmp_path / "pilot"
    piloted = vkr_here(
        *("qualify", "pilot", "--step", "video_dependency", "--model", GATE_MODELS[0]),
        *("--pool", pool, "--n", "2", "--from", out, "--out", pilot),
    )
    assert piloted.returncode == 0, piloted.stdout + piloted.stderr
    [status] = statuses(pilot).values()
    assert status["served_name"] == GATE_MODELS[0] and status["state"] == "stopped"
    assert Path(status["log"]).parent == pilot / "providers" / "vllm"
    assert "stand-in: serving on port" in Path(status["log"]).read_text()


def test_an_entry_no_step_of_the_run_uses_is_never_started(
    tmp_path: Path, testdata: Path, vkr_pool: Path
) -> None:
    data = yaml.safe_load(vkr_pool.read_text())
    # In the pool, but eligible for no step (the registry does not name it).
    data["models"].append({"name": "spare", "model": "openai/spare", "provider": "vllm"})
    data["models"][-1]["options"] = {"command": ["{python}", "-c", NEVER_READY]}
    vkr_pool.write_text(yaml.safe_dump(data, sort_keys=False))
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    out = tmp_path / "run"
    result = vkr_run_here(manifest, vkr_pool, out, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert statuses(out) == {}  # no server was started for it


def test_a_server_killed_mid_run_is_restarted_and_no_video_fails(
    tmp_path: Path, testdata: Path, vkr_pool: Path
) -> None:
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    slow = {"latency_ms": 150}  # so the run is still going when the server is killed
    pool = vllm_pool(vkr_pool, {m: {"command": stand_in(stats_dir, slow)} for m in GATE_MODELS})
    manifest = write_manifest(tmp_path / "videos", testdata, good=3, bad=False)
    out = tmp_path / "run"
    proc = start(manifest, pool, out)
    try:
        first = wait_for(lambda: ready(out, "fake-d"), 120, "the fake-d server to be ready")
        # Mid-run: once vkr has started calling the server.
        wait_for(
            lambda: (
                (out / "calls.jsonl").exists()
                and '"model":"fake-d"' in (out / "calls.jsonl").read_text().replace(" ", "")
            ),
            120,
            "a call to fake-d",
        )
        assert proc.poll() is None, "the run ended before the kill: make the stand-in slower"
        os.kill(first["pid"], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stdout + stderr
    assert failures(out) == []
    assert "restart 1 of 3" in stderr
    status = statuses(out)["fake-d"]
    assert status["restarts"] == 1 and status["pid"] != first["pid"]
    assert status["state"] == "stopped" and not alive(status["pid"])
    # The killed server wrote nothing; the restarted one served the gate.
    stats = served_stats(stats_dir)
    assert first["pid"] not in stats
    assert stats[status["pid"]]["by_model_step"].get("fake-d|video_dependency", 0) > 0
    records = [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]
    assert len(records) == 3 and all(r["status"] == "done" for r in records)


def test_a_server_that_never_becomes_ready_stops_the_run_with_its_log(
    tmp_path: Path, testdata: Path, vkr_pool: Path
) -> None:
    never = {"command": ["{python}", "-c", NEVER_READY], "ready_timeout": 4.0}
    pool = vllm_pool(vkr_pool, {"fake-d": never})
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    out = tmp_path / "run"
    started = time.monotonic()
    result = vkr_run_here(manifest, pool, out, check=False)
    elapsed = time.monotonic() - started
    assert result.returncode == 5, result.stdout + result.stderr  # preflight: nothing started
    assert "did not become ready within 4s" in result.stderr
    assert "loading 38B weights ..." in result.stderr  # the tail of the server's log
    assert "Traceback" not in result.stderr
    assert elapsed < 60
    status = statuses(out)["fake-d"]
    assert status["state"] == "failed" and not alive(status["pid"])
    assert not (out / "records").exists() or not list((out / "records").glob("*.json"))


def test_a_server_that_keeps_crashing_is_given_up_with_its_log(
    tmp_path: Path, testdata: Path, vkr_pool: Path
) -> None:
    crashing = (
        "import sys\nprint('torch.OutOfMemoryError: CUDA out of memory', flush=True)\nsys.exit(1)\n"
    )
    options = {"command": ["{python}", "-c", crashing], "max_restarts": 1, "ready_timeout": 60}
    pool = vllm_pool(vkr_pool, {"fake-d": options})
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    out = tmp_path / "run"
    result = vkr_run_here(manifest, pool, out, check=False)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "exited (code 1) and was restarted 1 time(s): gave up" in result.stderr
    assert "CUDA out of memory" in result.stderr
    status = statuses(out)["fake-d"]
    assert status["state"] == "failed" and status["restarts"] == 1


def test_without_vllm_installed_the_default_command_says_how_to_install_it(
    tmp_path: Path, testdata: Path, vkr_pool: Path
) -> None:
    pool = vllm_pool(vkr_pool, {"fake-d": {"model": "Qwen/Qwen3-VL-32B-Instruct"}})
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    empty_bin = tmp_path / "bin"  # a PATH where no vllm is, whatever this machine has
    empty_bin.mkdir()
    result = subprocess.run(
        [VKR, "run", "--videos", manifest, "--pool", pool, "--out", tmp_path / "run"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PATH": str(empty_bin)},
    )
    assert result.returncode == 5, result.stdout + result.stderr
    assert "command 'vllm' not found (vllm is not installed here: pip install 'vkr[vllm]')" in (
        result.stderr
    )


def test_an_attached_server_is_used_and_never_stopped(
    tmp_path: Path, testdata: Path, vkr_pool: Path, vkr_fake_server: Any
) -> None:
    # The fixture's own server plays a vLLM server someone else runs.
    attach = {"attach": vkr_fake_server.base_url.removesuffix("/v1")}
    pool = vllm_pool(vkr_pool, {m: dict(attach) for m in GATE_MODELS})
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    out = tmp_path / "run"
    result = vkr_run_here(manifest, pool, out, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    served = vkr_fake_server.stats()["by_model_step"]
    assert served["fake-c|video_dependency"] > 0 and served["fake-d|video_dependency"] > 0
    status = statuses(out)["fake-c"]
    assert status["attached"] and status["pid"] is None and status["state"] == "ready"
    assert not port_free(vkr_fake_server.base_url)  # still serving after the run


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"port": "8000"}, "options.port: Input should be a valid integer"),
        ({"tensor_parallel_sise": 2}, "unknown key 'tensor_parallel_sise' in options"),
        (
            {"attach": "http://127.0.0.1:8000", "tensor_parallel_size": 2},
            "attach (a server someone else runs) excludes what to start: tensor_parallel_size",
        ),
        ({"command": ["vllm", "serve", "{modle}"]}, "unknown placeholder {modle}"),
        ({"gpu_memory_utilization": 1.5}, "options.gpu_memory_utilization"),
    ],
)
def test_bad_options_are_one_line_naming_the_entry_and_write_nothing(
    tmp_path: Path, testdata: Path, vkr_pool: Path, options: dict[str, Any], expected: str
) -> None:
    pool = vllm_pool(vkr_pool, {"fake-d": options})
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    out = tmp_path / "run"
    # In this process: the pool is refused before any server or call, so a new process
    # would only add its imports.
    result = vkr_run_here(manifest, pool, out, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pool entry 'fake-d' (provider: vllm)" in lines[0], lines
    assert expected in lines[0]
    assert not (out / "config.json").exists()  # fixing the pool resumes without --force


def test_a_second_vkr_cannot_start_a_server_on_the_same_port_and_kill_9_leaves_none(
    tmp_path: Path, testdata: Path, vkr_pool: Path
) -> None:
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    slow = {"latency_ms": 2000}
    pool = vllm_pool(vkr_pool, {"fake-d": {"command": stand_in(stats_dir, slow), "port": port}})
    manifest = write_manifest(tmp_path / "videos", testdata, good=2, bad=False)
    first_out = tmp_path / "first"
    first = start(manifest, pool, first_out)
    try:
        server = wait_for(lambda: ready(first_out, "fake-d"), 120, "the first run's server")
        second = vkr_run_here(manifest, pool, tmp_path / "second", check=False)
        assert second.returncode == 5, second.stdout + second.stderr
        assert f"port {port} on 127.0.0.1 is held by the vLLM server of another vkr process" in (
            second.stderr
        )
        assert f"pid {first.pid}" in second.stderr
        assert alive(server["pid"])  # the second run did not touch the first one's server
        # kill -9 of vkr: the server gets its death signal and goes too.
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        wait_for(lambda: not alive(server["pid"]), 30, "the orphaned server to exit")
        wait_for(lambda: port_free(server["url"]), 30, "the port to be free")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_entries_with_the_same_model_and_options_share_one_server(tmp_path: Path) -> None:
    import asyncio

    from plugins.providers.vllm import VllmProvider
    from vkr_core.config import ModelSpec

    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    options = {"command": stand_in(stats_dir), "ready_timeout": 60.0}
    specs = [
        ModelSpec(name=name, model="openai/fake-d", provider="vllm", options=options)
        for name in ("gate-cold", "gate-warm")
    ]

    async def both() -> list[str]:
        provider = VllmProvider()
        provider.use_folder(tmp_path / "servers")
        provider.warm_up(specs)
        try:
            replies = [
                await provider.complete(spec, [{"role": "user", "content": "hi"}], {}, {})
                for spec in specs
            ]
            assert provider.server(specs[0]) is provider.server(specs[1])
        finally:
            await provider.aclose()
        return [reply.text for reply in replies]

    assert all(asyncio.run(both()))
    (stats,) = served_stats(stats_dir).values()  # one process served both entries
    assert stats["by_model"] == {"fake-d": 2}


def test_vkr_core_never_imports_vllm() -> None:
    probe = "import sys, plugins.providers.vllm, vkr_core.run; print('vllm' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
