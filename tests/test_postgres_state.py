"""`vkr run --state postgresql://...`: checkpoints, call cache and item claims in a real
PostgreSQL server, shared by every driver of a run.

Two drivers on one manifest split it and never process a video twice; a driver killed with
SIGKILL leaves claims that expire and are taken over; a rerun pays nothing; the password
never reaches the run directory, a log or an error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from test_run import VKR, accepted, vkr_run, wait_until, write_manifest

from cli import cli
from plugins.backends.postgres import run_schema
from plugins.providers.fake_server import FakeModelServer, write_pool
from vkr_core.files import read_jsonl
from vkr_core.plugins import get_plugin_manager
from vkr_core.schemas import CallRecord


def start_driver(manifest: Path, pool: Path, out: Path, *extra: str, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [VKR, "run", "--videos", str(manifest), "--pool", str(pool), "--out", str(out)]
        + ["--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def status_rows(url: str, run_dir: Path) -> dict[str, tuple[str, str, int]]:
    """item id -> (state, owner, claims) from the run's status table."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f'SELECT item_id, state, owner, claims FROM "{run_schema(run_dir)}".items'
        ).fetchall()
    return {item: (state, owner, claims) for item, state, owner, claims in rows}


def keys_vkr_holds(url: str, run_dir: Path) -> set[str]:
    """Call keys whose reply reached vkr: cached, or journalled on arrival."""
    if not (run_dir / "config.json").exists():
        return set()
    try:
        with psycopg.connect(url) as conn:
            rows = conn.execute(f'SELECT key FROM "{run_schema(run_dir)}".call_cache').fetchall()
    except psycopg.errors.UndefinedTable:
        return set()
    return {key.removeprefix("raw:") for (key,) in rows}


def paid_calls_per_video(run_dir: Path) -> Counter[str]:
    problems: list[object] = []
    calls = read_jsonl(run_dir / "calls.jsonl", CallRecord, on_problem=problems.append)
    counts = Counter(c.video_id for _, c in calls if not c.cache_hit and c.outcome != "error")
    assert problems == [], f"damaged lines in calls.jsonl: {problems}"
    return counts


def done_records(run_dir: Path) -> dict[str, str]:
    return {
        p.stem: json.loads(p.read_text())["status"]
        for p in sorted((run_dir / "records").glob("*.json"))
    }


@pytest.fixture(scope="module")
def four_accepted(tmp_path_factory, testdata) -> dict[str, tuple[str, str, str]]:
    """What one driver without shared state accepts of four good videos (on a scripted server
    of its own, seed 0 as every test's): the tests that interrupt a driver end with it."""
    folder = tmp_path_factory.mktemp("four")
    with FakeModelServer(seed=0) as server:
        pool = write_pool(
            folder / "pool.yaml",
            server.base_url,
            registry_path=folder / "eligibility.yaml",
            pm=get_plugin_manager(),
        )
        manifest = write_manifest(folder / "videos", testdata, good=4, bad=False)
        vkr_run(manifest, pool, folder / "single")
    return accepted(folder / "single")


@pytest.mark.slow
def test_state_run_matches_the_default_backends_and_a_rerun_pays_nothing(
    tmp_path, testdata, vkr_pool, vkr_fake_server, vkr_postgres_url
):
    manifest = write_manifest(tmp_path / "videos", testdata, good=3, bad=True)
    local = vkr_run(manifest, vkr_pool, tmp_path / "local", check=False)
    assert local.returncode == 3, local.stderr  # the three bad videos
    vkr_fake_server.reset_stats()

    run_dir = tmp_path / "shared"
    first = vkr_run(manifest, vkr_pool, run_dir, "--state", vkr_postgres_url, check=False)
    assert first.returncode == 3, first.stdout + first.stderr
    assert accepted(run_dir) == accepted(tmp_path / "local") != {}
    assert done_records(run_dir) == done_records(tmp_path / "local")
    paid = vkr_fake_server.stats()["completions"]
    assert paid > 0 and vkr_fake_server.stats()["repeats"] == 0
    # Checkpoints and cache are in PostgreSQL, not in the run directory.
    assert not (run_dir / "checkpoints.sqlite").exists() and not (run_dir / "cache").exists()
    states = {item: state for item, (state, _, _) in status_rows(vkr_postgres_url, run_dir).items()}
    assert states == {
        "good0": "done",
        "good1": "done",
        "good2": "done",
        "corrupted": "failed",
        "truncated": "failed",
        "notes": "failed",
    }

    again = vkr_run(manifest, vkr_pool, run_dir, "--state", vkr_postgres_url, check=False)
    assert again.returncode == 3, again.stdout + again.stderr
    assert vkr_fake_server.stats()["completions"] == paid  # not one request
    assert "done before 3" in again.stdout
    assert accepted(run_dir) == accepted(tmp_path / "local")

    # The run directory reads as any other: report, split, export (in this process: what they
    # write is the point, not how a process starts).
    for command in (
        ["report", str(run_dir), "--out", str(tmp_path / "report")],
        ["split", str(run_dir), "--out", str(tmp_path / "split")],
    ):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "report.json").exists()
    sft = (tmp_path / "split" / "sft.jsonl").read_text().splitlines()
    rl = (tmp_path / "split" / "rl.jsonl").read_text().splitlines()
    assert len(sft) + len(rl) == len(accepted(run_dir))


@pytest.mark.slow
def test_two_drivers_on_one_manifest_process_every_video_exactly_once(
    tmp_path, testdata, vkr_pool, vkr_fake_server, vkr_postgres_url
):
    manifest = write_manifest(tmp_path / "videos", testdata, good=7, bad=True)
    single = vkr_run(manifest, vkr_pool, tmp_path / "single", "--concurrency", "2", check=False)
    assert single.returncode == 3, single.stderr  # the three bad videos
    reference = accepted(tmp_path / "single")
    per_video = paid_calls_per_video(tmp_path / "single")
    vkr_fake_server.reset_stats()
    # Slow replies from here on: the second driver starts while the first is still busy.
    vkr_fake_server.set_policy({"latency_ms": 150})

    run_dir = tmp_path / "shared"
    drivers = [
        start_driver(manifest, vkr_pool, run_dir, "--concurrency", "2", "--state", vkr_postgres_url)
        for _ in range(2)
    ]
    outputs = [driver.communicate(timeout=600) for driver in drivers]
    for driver, (out, err) in zip(drivers, outputs, strict=True):
        # 3: this driver met a bad video (each is failed by one driver only).
        assert driver.returncode in (0, 3), out + err
        assert "Traceback" not in err
    assert 3 in {driver.returncode for driver in drivers}

    # Every video once: each request reached the server once, and each video's paid calls
    # are the single run's, whichever driver made them.
    stats = vkr_fake_server.stats()
    assert stats["repeats"] == 0
    assert paid_calls_per_video(run_dir) == per_video
    assert sum(per_video.values()) == stats["completions"]
    rows = status_rows(vkr_postgres_url, run_dir)
    assert {item: (state, claims) for item, (state, _, claims) in rows.items()} == {
        **{f"good{i}": ("done", 1) for i in range(7)},
        **{bad: ("failed", 1) for bad in ("corrupted", "truncated", "notes")},
    }
    # Both drivers did part of the work.
    assert len({owner for _, owner, _ in rows.values()}) == 2
    assert accepted(run_dir) == reference
    assert done_records(run_dir) == done_records(tmp_path / "single")
    failures = [line["video_id"] for _, line in read_jsonl(run_dir / "failures.jsonl")]
    assert sorted(failures) == ["corrupted", "notes", "truncated"]


@pytest.mark.slow
def test_a_driver_killed_with_sigkill_is_taken_over_after_its_lease_paying_nothing_twice(
    tmp_path, testdata, vkr_pool, vkr_fake_server, vkr_postgres_url, four_accepted
):
    vkr_fake_server.set_policy({"latency_ms": 400})
    manifest = write_manifest(tmp_path / "videos", testdata, good=4, bad=False)

    lease = 5
    env = dict(os.environ, VKR_STATE_LEASE=str(lease))
    run_dir = tmp_path / "shared"
    killed = start_driver(manifest, vkr_pool, run_dir, "--state", vkr_postgres_url, env=env)
    # Killed once it holds replies (a completion may still be on the wire), claims still open.
    wait_until(lambda: len(keys_vkr_holds(vkr_postgres_url, run_dir)) >= 8, killed, "replies kept")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    with psycopg.connect(vkr_postgres_url) as conn:
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        killed_at = row[0]
    held = keys_vkr_holds(vkr_postgres_url, run_dir)
    claimed = {
        i for i, (s, _, _) in status_rows(vkr_postgres_url, run_dir).items() if s == "claimed"
    }
    assert held and claimed, "the kill fell outside the run"
    seen = len(vkr_fake_server.stats()["repeated_call_keys"])
    vkr_fake_server.set_policy({})  # the rerun's replies need not be slow

    # At once, while the dead driver's claims still look alive: the new driver does the rest
    # and takes those over once their lease has run out.
    rerun = vkr_run(manifest, vkr_pool, run_dir, "--state", vkr_postgres_url, env=env)
    assert "Traceback" not in rerun.stderr
    stats = vkr_fake_server.stats()
    repaid = set(stats["repeated_call_keys"][seen:]) & held
    assert not repaid, f"{len(repaid)} reply(ies) vkr had received were paid again"
    assert stats["repeats"] <= 4 * 8  # at most the requests in flight at the kill
    rows = status_rows(vkr_postgres_url, run_dir)
    assert {item: state for item, (state, _, _) in rows.items()} == {
        f"good{i}": "done" for i in range(4)
    }
    # Taken over exactly once each: the items the dead driver held, and no other, and only
    # once their lease had run out.
    assert {item for item, (_, _, claims) in rows.items() if claims == 2} == claimed
    assert all(claims <= 2 for _, _, claims in rows.values())
    with psycopg.connect(vkr_postgres_url) as conn:
        taken = conn.execute(
            f'SELECT min(claimed) FROM "{run_schema(run_dir)}".items WHERE claims = 2'
        ).fetchone()
    # The last heartbeat before the kill was at most a third of the lease earlier.
    assert taken is not None and (taken[0] - killed_at).total_seconds() >= lease * 2 / 3 - 0.1
    assert accepted(run_dir) == four_accepted != {}


def test_the_password_never_reaches_the_run_directory_a_log_or_an_error(
    tmp_path, testdata, vkr_pool, vkr_fake_server, vkr_postgres_url
):
    password = psycopg.conninfo.conninfo_to_dict(vkr_postgres_url)["password"]
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    run_dir = tmp_path / "run"
    result = vkr_run(
        manifest, vkr_pool, run_dir, "--state", vkr_postgres_url, "--log-level", "DEBUG"
    )
    assert password not in result.stdout + result.stderr
    hits = [
        str(p) for p in run_dir.rglob("*") if p.is_file() and password.encode() in p.read_bytes()
    ]
    assert hits == []
    state = json.loads((run_dir / "config.json").read_text())["config"]["state"]
    assert state == vkr_postgres_url.replace(f":{password}@", "@")

    # The URL without its password, and the password in PGPASSWORD: the same run, resumed.
    env = dict(os.environ, PGPASSWORD=password)
    again = vkr_run(manifest, vkr_pool, run_dir, "--state", state, env=env)
    assert "done before 1" in again.stdout

    # A wrong password: one line, naming the database, not the password; nothing written.
    wrong = vkr_postgres_url.replace(password, "not-the-password")
    bad = vkr_run(manifest, vkr_pool, tmp_path / "bad", "--state", wrong, check=False)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "cannot use the state database" in bad.stderr and "password" in bad.stderr
    assert "not-the-password" not in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_an_unreachable_server_a_bad_url_or_a_missing_extra_stop_before_anything_is_written(
    tmp_path, testdata, vkr_pool, vkr_postgres_url
):
    manifest = write_manifest(tmp_path / "videos", testdata, good=1, bad=False)
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql://vkr:hunter2@127.0.0.1:{port}/vkr"
    down = vkr_run(manifest, vkr_pool, tmp_path / "down", "--state", url, check=False)
    assert down.returncode == 1, down.stdout + down.stderr
    lines = [line for line in down.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot use the state database" in lines[0], down.stderr
    assert f"postgresql://vkr@127.0.0.1:{port}/vkr" in lines[0] and "hunter2" not in lines[0]
    assert not (tmp_path / "down").exists()

    bad = vkr_run(manifest, vkr_pool, tmp_path / "bad", "--state", "localhost", check=False)
    assert bad.returncode == 2 and "postgresql://" in bad.stderr, bad.stderr
    other = vkr_run(manifest, vkr_pool, tmp_path / "bad", "--state", "mysql://h/db", check=False)
    assert other.returncode == 1 and "no loaded checkpointer backend serves mysql" in other.stderr
    assert not (tmp_path / "bad").exists()

    # A user that may not create the run's schema: told so before anything is written.
    role = f"vkr_reader_{os.getpid()}_{int(time.time())}"  # roles are server-wide
    with psycopg.connect(vkr_postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'reader-password'")
    try:
        params = psycopg.conninfo.conninfo_to_dict(vkr_postgres_url)
        reader = (
            f"postgresql://{role}:reader-password@{params['host']}:{params['port']}/"
            f"{params['dbname']}"
        )
        denied = vkr_run(manifest, vkr_pool, tmp_path / "denied", "--state", reader, check=False)
        assert denied.returncode == 1, denied.stdout + denied.stderr
        assert f"user {role} may not create schemas" in denied.stderr, denied.stderr
        assert "reader-password" not in denied.stderr and "Traceback" not in denied.stderr
        assert not (tmp_path / "denied").exists()
    finally:
        with psycopg.connect(vkr_postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP ROLE {role}")

    # Without psycopg installed (made unimportable): the pip line, nothing written.
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.argv = ['vkr', *sys.argv[1:]]; "
        "import cli; cli.main()"
    )
    missing = subprocess.run(
        [sys.executable, "-c", code, "run", "--videos", str(manifest), "--pool", str(vkr_pool)]
        + ["--out", str(tmp_path / "missing"), "--no-progress", "--state", url],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert missing.returncode == 1, missing.stdout + missing.stderr
    assert "pip install 'vkr[postgres]'" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "missing").exists()


def test_two_processes_appending_to_one_log_never_interleave_lines(tmp_path):
    """Drivers sharing a run directory append to the same calls.jsonl and failures.jsonl."""
    script = (
        "import sys; from vkr_core.store import RunStore; store = RunStore(sys.argv[1]); "
        "[store.add_failure(f'{sys.argv[2]}{i}', sys.argv[2] * 20000) for i in range(300)]"
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run"), name])
        for name in ("a", "b")
    ]
    for writer in writers:
        assert writer.wait(timeout=120) == 0
    problems: list[object] = []
    lines = [
        line
        for _, line in read_jsonl(tmp_path / "run" / "failures.jsonl", on_problem=problems.append)
    ]
    assert problems == []
    assert Counter(line["video_id"][0] for line in lines) == {"a": 300, "b": 300}
    assert all(line["reason"] == line["video_id"][0] * 20000 for line in lines)


def test_call_cache_transaction_is_all_or_nothing_across_connections(vkr_postgres_url):
    """The reply's entry and its journal drop land together: another driver never sees the
    journal gone without the reply."""
    from plugins.backends.postgres import PostgresCallCache, PostgresCalls

    first = PostgresCalls.open_url(vkr_postgres_url, "vkr_cache_test")
    second = PostgresCalls.open_url(vkr_postgres_url, "vkr_cache_test")
    try:
        first.set("raw:k", b"{raw reply}")
        assert second.get("raw:k") == b"{raw reply}"
        with first.transact():
            first.set("k", {"text": "reply", "outcome": "ok", "cost_usd": 0.5})
            first.delete("raw:k")
            # Not committed yet: the other driver still sees the journal, not the reply.
            assert second.get("k") is None and second.get("raw:k") == b"{raw reply}"
        assert second.get("k") == {"text": "reply", "outcome": "ok", "cost_usd": 0.5}
        assert second.get("raw:k") is None
        try:
            with first.transact():
                first.set("k2", "lost")
                raise RuntimeError("killed mid-transaction")
        except RuntimeError:
            pass
        assert second.get("k2", "absent") == "absent"
        assert isinstance(first, PostgresCallCache)
    finally:
        first.close()
        second.close()


def test_a_run_is_the_same_run_from_any_directory_and_another_config_is_another(tmp_path):
    """A run's rows are found by its config, not its path: a second machine mounting the
    run directory elsewhere finds them; a run with other settings never sees them."""
    config = {"config": {"seed": 0, "state": "postgresql://vkr@db-a/vkr"}, "steps": {"x": "1"}}
    for name, data in {
        "here": config,
        "mounted-elsewhere": {
            **config,
            "config": {"seed": 0, "state": "postgresql://vkr@db-b/vkr"},
        },
        "other-seed": {**config, "config": {"seed": 1, "state": "postgresql://vkr@db-a/vkr"}},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(data))
    assert run_schema(tmp_path / "here") == run_schema(tmp_path / "mounted-elsewhere")
    assert run_schema(tmp_path / "here") != run_schema(tmp_path / "other-seed")


@pytest.mark.slow
def test_losing_the_state_database_stops_the_run_and_the_rerun_resumes_it(
    tmp_path, testdata, vkr_pool, vkr_fake_server, four_accepted
):
    from plugins.backends.postgres_server import ThrowawayPostgres, create_database

    server = ThrowawayPostgres()  # its own: this test stops it
    try:
        url = create_database(server.start())
        vkr_fake_server.set_policy({"latency_ms": 300})
        manifest = write_manifest(tmp_path / "videos", testdata, good=4, bad=False)
        # The stopped driver could not give its claims back: the rerun takes them over once
        # their lease runs out (60 s by default, which is all this test would wait for).
        env = dict(os.environ, VKR_STATE_LEASE="5")

        run_dir = tmp_path / "shared"
        driver = start_driver(manifest, vkr_pool, run_dir, "--state", url, env=env)
        deadline = time.monotonic() + 120
        while vkr_fake_server.stats()["completions"] < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop_server()
        out, err = driver.communicate(timeout=300)
        assert driver.returncode == 1, out + err
        assert "lost the state database" in err and "run the same command again" in err
        assert "Traceback" not in err
        # Not the videos' fault: none is recorded as failed because of it.
        assert not (run_dir / "failures.jsonl").exists()
        assert set(done_records(run_dir).values()) <= {"unfinished", "done"}

        assert len([line for line in err.splitlines() if line.strip()]) == 1, err

        server.start_server()
        held = keys_vkr_holds(url, run_dir)
        seen = len(vkr_fake_server.stats()["repeated_call_keys"])
        vkr_fake_server.set_policy({})  # the rerun's replies need not be slow
        vkr_run(manifest, vkr_pool, run_dir, "--state", url, env=env)
        assert accepted(run_dir) == four_accepted != {}
        # Replies that reached vkr before the outage are never paid again; those on the wire
        # when it went away (they could not be kept) are, at most what can be in flight.
        stats = vkr_fake_server.stats()
        assert not set(stats["repeated_call_keys"][seen:]) & held
        assert stats["repeats"] <= 4 * 8
    finally:
        server.stop()
