"""``provider: vllm``: a pool entry served by ``vllm serve``, which vkr starts, supervises and
stops for the run, or by a vLLM server someone else runs (``options.attach``).

vllm itself is never imported: vkr runs its command line as a child process (in its own
process group, output to a log file) and talks to it over its OpenAI-compatible HTTP API
through the litellm provider's plain route. What the pool entry says:

- ``model``: the served model name (``openai/`` prefix optional). vLLM is told to serve the
  weights ``options.model`` (an HF id or a local path; by default the same as ``model``)
  under that name, so the entry's calls and cache keys do not depend on the port.
- ``options``: see :class:`VllmOptions`. ``api_base`` is left out: vkr derives it.

Readiness is vLLM's ``GET /health`` answering 200 and ``GET /v1/models`` listing the served
name. Calls made before then, or while a crashed server restarts, wait (bounded by the
readiness timeout). The server's log, and a status file saying its pid, URL and state, are in
``<run>/providers/vllm/`` (a temporary folder, logged, when the provider is used outside a
run, as by a pilot).
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from plugins.providers.litellm_provider import LitellmProvider
from vkr_core.calls import Journal, PermanentError, Provider, ProviderReply, TransientError
from vkr_core.config import ModelSpec
from vkr_core.errors import describe_validation_error
from vkr_core.files import atomic_write
from vkr_core.hookspecs import hookimpl
from vkr_core.log import get_logger, redact
from vkr_core.schemas import InputError, VkrError

log = get_logger("vkr.vllm")

# The default command; every item is formatted with the placeholders below.
VLLM_COMMAND = (
    "vllm",
    "serve",
    "{model}",
    "--host",
    "{host}",
    "--port",
    "{port}",
    "--served-model-name",
    "{served_name}",
)
PLACEHOLDERS = ("model", "host", "port", "served_name", "python")
# Settings that only shape the default command (a custom command spells its own flags).
GPU_SETTINGS = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "dtype")
START_SETTINGS = ("model", "host", "port", "args", "env", "command", *GPU_SETTINGS)
LOG_TAIL_LINES = 8
# A restart after a crash waits 1, 2, 4 ... s (at most this): a server that dies at once
# (out of GPU memory) is not restarted in a tight loop.
MAX_BACKOFF_S = 30.0
_POLL_S = 0.25


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


class VllmOptions(BaseModel):
    """``options:`` of a ``provider: vllm`` pool entry."""

    model_config = ConfigDict(extra="forbid", strict=True)

    attach: str | None = Field(
        default=None,
        description="URL of a vLLM server someone else runs (http://host:port): vkr checks it "
        "is ready and never starts or stops it",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        description="weights to serve: HF id or local path (default: the entry's model)",
    )
    host: str = Field(default="127.0.0.1", min_length=1, description="address vllm listens on")
    port: int = Field(default=0, ge=0, le=65535, description="0: a free port vkr picks")
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=1)
    dtype: str | None = Field(default=None, min_length=1)
    args: list[str] = Field(default_factory=list, description="more arguments for the command")
    env: dict[str, str] = Field(default_factory=dict, description="environment of the server")
    command: list[str] | None = Field(
        default=None,
        description="the whole argv, with placeholders {model} {host} {port} {served_name} "
        "{python}; default: vllm serve {model} --host {host} --port {port} "
        "--served-model-name {served_name} and the GPU settings",
    )
    ready_timeout: float = Field(
        default=1800.0, gt=0, description="seconds a (re)start may take to become ready"
    )
    max_restarts: int = Field(default=3, ge=0, description="restarts after crashes, per run")
    stop_timeout: float = Field(
        default=30.0, gt=0, description="seconds between SIGTERM and SIGKILL at the end"
    )

    @field_validator("attach")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s)://host:port URL")
        return value

    @field_validator("command")
    @classmethod
    def _template(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value or not value[0]:
            raise ValueError("the command is empty")
        sample = {name: "x" for name in PLACEHOLDERS}
        for item in value:
            try:
                item.format(**sample)
            except KeyError as exc:
                raise ValueError(
                    f"unknown placeholder {{{exc.args[0]}}} in {_short(item)} (a literal "
                    "brace is written {{ or }}; "
                    f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
                ) from None
            except (ValueError, IndexError) as exc:
                raise ValueError(f"{_short(item)} is not a valid template: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_mode(self) -> VllmOptions:
        given = [name for name in START_SETTINGS if name in self.model_fields_set]
        if self.attach is not None and given:
            raise ValueError(
                f"attach (a server someone else runs) excludes what to start: {', '.join(given)}"
            )
        if self.command is not None:
            shaped = [name for name in GPU_SETTINGS if name in self.model_fields_set]
            if shaped:
                raise ValueError(
                    f"GPU settings ({', '.join(shaped)}) only shape the default vllm serve "
                    "command: with command, write those flags into it"
                )
        return self


class _Entry(BaseModel):
    """The part of a pool entry the provider validates, so errors read ``options.port``."""

    model_config = ConfigDict(extra="forbid", strict=True)
    options: VllmOptions


class ServerFailed(VkrError):
    """The server cannot serve: it never became ready, kept crashing, or cannot start."""


def served_name(spec: ModelSpec) -> str:
    """The name vLLM serves the entry's model under (the entry's model, without openai/)."""
    return spec.model.removeprefix("openai/")


def parse_entry(spec: ModelSpec) -> VllmOptions:
    """The entry's options, or an InputError naming the entry."""
    where = f"pool entry {spec.name!r} (provider: vllm)"
    try:
        options = _Entry.model_validate({"options": spec.options}).options
    except ValidationError as exc:
        raise InputError(f"{where}: {describe_validation_error(exc)}") from None
    if spec.api_base:
        raise InputError(
            f"{where}: api_base is derived from the server vkr starts; for a server you run, "
            "set options.attach to its URL instead"
        )
    if not served_name(spec):
        raise InputError(f"{where}: model names no served model")
    return options


def _connect_host(host: str) -> str:
    """Where to reach a server listening on ``host`` (a wildcard address is reached on
    loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the server will bind: a port in TIME_WAIT after the last server is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


_libc: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no libc to load: the atexit stop still applies
        _libc = None
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
    """``preexec_fn``: the child gets SIGTERM when vkr dies, even by kill -9 (Linux).

    SIGTERM, not SIGKILL: vLLM then stops its own engine workers and frees the GPUs, which a
    killed API server would leave behind. The death signal follows the *thread* that forked,
    so the supervising thread lives as long as its server does.
    """

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # vkr died before the signal was armed
            os._exit(1)

    return preexec


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, on one line, for an error message."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return f"(no log at {path})"
    kept = [line.strip()[:200] for line in text.splitlines() if line.strip()][-lines:]
    if not kept:
        return f"({path} is empty)"
    return f"last lines of {path}: " + " | ".join(redact(line) for line in kept)


def _get(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), b""


class Server:
    """One vLLM server for one or more pool entries: started and supervised in a thread of
    its own, or attached to (checked once, never started or stopped)."""

    def __init__(
        self,
        options: VllmOptions,
        served: str,
        entries: list[str],
        folder: Path | None,
        api_key: str | None,
    ):
        self.options = options
        self.served = served
        self.entries = entries
        self.attached = options.attach is not None
        self.api_key = api_key
        key = json.dumps([served, options.model_dump()], sort_keys=True)
        self.slug = (
            re.sub(r"[^A-Za-z0-9._-]+", "_", served)[-60:]
            + "-"
            + hashlib.sha256(key.encode()).hexdigest()[:8]
        )
        if folder is None:
            # Outside a run (a pilot, a script): no run directory to keep the log in.
            folder = Path(tempfile.mkdtemp(prefix="vkr-vllm-"))
            log.warning("vllm server log outside a run directory", folder=str(folder))
        self.folder = folder
        self.log_path = folder / f"{self.slug}.log"
        self.status_path = folder / f"{self.slug}.json"
        self._port_lock: IO[str] | None = None
        if options.attach is not None:
            root = options.attach.rstrip("/").removesuffix("/v1")
            self.host, self.port = "", 0
        else:
            self.host = options.host
            self.port = options.port
            if not self.port:
                self._pick_port()
            root = f"http://{_url_host(_connect_host(options.host))}:{self.port}"
        self.root = root
        self.api_base = root + "/v1"
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self.failure: str | None = None
        self.generation = 0
        self.restarts = 0
        self.state = "starting"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.argv: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._supervise, name=f"vkr-vllm-{self.slug}", daemon=True
        )

    @property
    def what(self) -> str:
        kind = "attached vLLM server" if self.attached else "vLLM server"
        return f"{kind} for {', '.join(repr(e) for e in self.entries)} at {self.root}"

    def start(self) -> None:
        _live.add(self)
        self._thread.start()

    # -- the supervising thread

    def _supervise(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.attached:
                if self._await_ready(None):
                    self._set_state("ready")
                    self.ready.set()
                return
            if self._port_lock is None:
                self._take_port()
            while not self.stopping.is_set():
                process = self._spawn()
                came_up = self._await_ready(process)
                if came_up:
                    self._set_state("ready")
                    self.ready.set()
                    log.info("vllm server ready", server=self.what, pid=process.pid)
                    process.wait()
                    self.ready.clear()
                else:
                    process.wait()
                if self.stopping.is_set():
                    break
                self._crashed(process)
        except ServerFailed as exc:
            self.failure = str(exc)
            self._set_state("failed")
            log.error("vllm server failed", error=self.failure)
        except Exception as exc:  # the thread must report, never die silently
            self.failure = f"{self.what}: {type(exc).__name__}: {redact(str(exc))}"
            self._set_state("failed")
            log.error("vllm supervisor failed", error=self.failure)
        finally:
            if not self.attached:
                self._terminate()
                self._release_port()
                if self.state != "failed":
                    self._set_state("stopped")
            self.finished.set()
            _live.discard(self)

    def _crashed(self, process: subprocess.Popen[bytes]) -> None:
        code = process.returncode
        if self.restarts >= self.options.max_restarts:
            raise ServerFailed(
                f"{self.what} exited (code {code}) and was restarted "
                f"{self.options.max_restarts} time(s): gave up; {log_tail(self.log_path)}"
            )
        self.restarts += 1
        backoff = min(MAX_BACKOFF_S, 2.0 ** (self.restarts - 1))
        self._set_state("restarting")
        message = (
            f"{self.what} exited (code {code}); restart {self.restarts} of "
            f"{self.options.max_restarts} in {backoff:g}s"
        )
        log.info(message)
        # For the person running vkr, whatever the log level (as the run's outage lines).
        print(f"vllm: {message}", file=sys.stderr, flush=True)
        self._note(message)
        self.stopping.wait(backoff)

    def _pick_port(self) -> None:
        """A free port held for this server from the start: the api_base its calls use is
        final before anyone reads it. Another program may bind a port between our probe and
        our lock (a busy host hands out ephemeral ports all the time), so a port found taken
        is passed over for the next one instead of failing the run."""
        host = _connect_host(self.host)
        for _ in range(20):
            self.port = _free_port(host)
            try:
                self._take_port()
                return
            except ServerFailed:
                self._release_port()
        raise ServerFailed(f"no free port on {host} for the vLLM server after 20 tries")

    def _release_port(self) -> None:
        if self._port_lock is not None:
            # Removed while still held, so a lock file is never left per port used.
            Path(self._port_lock.name).unlink(missing_ok=True)
            self._port_lock.close()  # releases the flock
            self._port_lock = None

    def _take_port(self) -> None:
        """The port for this process alone: a lock file per host and port, held while the
        server lives, so a second vkr process cannot start a second server there."""
        import fcntl  # POSIX only: imported here so the plugin still loads elsewhere

        host = _connect_host(self.host)
        path = Path(tempfile.gettempdir()) / f"vkr-vllm-{host}-{self.port}.lock"
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise ServerFailed(
                f"port {self.port} on {host} is held by the vLLM server of another vkr process "
                f"(pid {owner}): to share that server set options.attach: "
                f"http://{_url_host(host)}:{self.port} in this entry, or give it another port"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._port_lock = handle
        if _port_in_use(host, self.port):
            raise ServerFailed(
                f"port {self.port} on {host} is in use by another program: give pool entry "
                f"{self.entries[0]!r} another options.port (0 picks a free one), or set "
                "options.attach if that program is the vLLM server to use"
            )

    def _command(self) -> list[str]:
        options = self.options
        values = {
            "model": options.model or self.served,
            "host": options.host,
            "port": str(self.port),
            "served_name": self.served,
            "python": sys.executable,
        }
        template = list(options.command or VLLM_COMMAND)
        argv = [item.format(**values) for item in template]
        if options.command is None:
            for name in GPU_SETTINGS:
                value = getattr(options, name)
                if value is not None:
                    argv += [f"--{name.replace('_', '-')}", str(value)]
        return argv + list(options.args)

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.argv = self._command()
        self.generation += 1
        self._note(f"start {self.generation}: {' '.join(self.argv)}")
        env = {**os.environ, **self.options.env}
        with self._lock:
            if self.stopping.is_set():
                raise ServerFailed(f"{self.what} stopped before it started")
            with self.log_path.open("ab") as output:
                try:
                    process = subprocess.Popen(
                        self.argv,
                        stdin=subprocess.DEVNULL,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        env=env,
                        # Its own process group, stopped as one, and out of the terminal's:
                        # vkr answers Ctrl-C by finishing the calls in flight, which need
                        # the server.
                        start_new_session=True,
                        preexec_fn=_die_with_parent(os.getpid()),
                    )
                except FileNotFoundError:
                    hint = (
                        " (vllm is not installed here: pip install 'vkr[vllm]')"
                        if self.options.command is None
                        else ""
                    )
                    raise ServerFailed(
                        f"cannot start {self.what}: command {self.argv[0]!r} not found{hint}"
                    ) from None
                except OSError as exc:
                    raise ServerFailed(
                        f"cannot start {self.what}: {self.argv[0]!r}: {exc.strerror or exc}"
                    ) from None
            self.process = process
            self.pid = process.pid
        self._set_state("starting" if self.generation == 1 else "restarting")
        return process

    def _await_ready(self, process: subprocess.Popen[bytes] | None) -> bool:
        """True once ready; False when the process exits first; ServerFailed on timeout."""
        deadline = time.monotonic() + self.options.ready_timeout
        last = "no answer yet"
        while not self.stopping.is_set():
            if process is not None and process.poll() is not None:
                return False
            last = self._probe()
            if not last:
                return True
            if time.monotonic() >= deadline:
                timeout = self.options.ready_timeout
                where = f"; {log_tail(self.log_path)}" if process is not None else ""
                raise ServerFailed(
                    f"{self.what} did not become ready within {timeout:g}s ({last}){where}"
                )
            self.stopping.wait(_POLL_S)
        return False

    def _probe(self) -> str:
        """'' when ready, else what is missing."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            status, _ = _get(self.root + "/health", headers)
            if status != 200:
                return f"GET /health answers {status}"
            status, body = _get(self.api_base + "/models", headers)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"cannot reach it: {redact(str(reason))[:120]}"
        if status != 200:
            return f"GET /v1/models answers {status}"
        try:
            listed = [str(m.get("id")) for m in json.loads(body).get("data") or []]
        except (ValueError, AttributeError):
            return "GET /v1/models is not a model list"
        if self.served not in listed:
            return f"GET /v1/models lists {listed[:5]}, not {self.served!r}"
        return ""

    # -- stopping

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after the grace period; waits."""
        self.stopping.set()
        if not self.attached:
            self._terminate()
        self.finished.wait()

    def _terminate(self) -> None:
        with self._lock:
            process = self.process
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=self.options.stop_timeout)
        except subprocess.TimeoutExpired:
            self._note(f"no exit {self.options.stop_timeout:g}s after SIGTERM: SIGKILL")
        # Whatever of the group is left (workers the server did not take down with it).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()

    # -- status for the person running vkr

    def _note(self, message: str) -> None:
        try:
            with self.log_path.open("a", encoding="utf-8") as handle:
                handle.write(f"--- vkr {time.strftime('%H:%M:%S')}: {redact(message)}\n")
        except OSError:
            pass

    def _set_state(self, state: str) -> None:
        self.state = state
        status = {
            "entries": self.entries,
            "served_name": self.served,
            "url": self.api_base,
            "attached": self.attached,
            "state": state,
            "pid": self.pid,
            "restarts": self.restarts,
            "log": None if self.attached else str(self.log_path),
            "command": [redact(item) for item in self.argv],
            "error": self.failure,
        }
        try:
            atomic_write(self.status_path, json.dumps(status, indent=2))
        except OSError as exc:
            log.warning("cannot write the vllm status file", error=str(exc))

    # -- the calls' side

    async def until_ready(self) -> int:
        """Wait until the server is ready; its generation (which start answers)."""
        if self.ready.is_set():
            return self.generation
        # A restart may first wait its backoff, then take the readiness timeout.
        deadline = time.monotonic() + self.options.ready_timeout + MAX_BACKOFF_S
        while not self.ready.is_set():
            if self.failure is not None:
                raise ServerFailed(self.failure)
            if self.finished.is_set():
                raise ServerFailed(f"{self.what} is stopped")
            if time.monotonic() >= deadline:
                raise TransientError(
                    f"{self.what} not ready after {self.options.ready_timeout:g}s ({self.state})"
                )
            await asyncio.sleep(0.05)
        return self.generation

    async def went_down(self, generation: int, grace: float) -> bool:
        """After a failed request: did the server die (or restart) under it? The supervisor
        sees an exit at once, so a short ``grace`` tells a crash from a network error."""
        deadline = time.monotonic() + grace
        while True:
            if self.generation != generation or not self.ready.is_set():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)


# Servers alive in this process: stopped at exit if no run closed them (an exception, a
# second Ctrl-C), so they never outlive vkr.
_live: set[Server] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_live):
        server.options = server.options.model_copy(update={"stop_timeout": 5.0})
        server.stop()


class VllmProvider(Provider):
    """Starts, supervises and stops ``vllm serve`` per pool entry, or attaches to a server."""

    name = "vllm"
    supports_journal = True

    def __init__(self) -> None:
        # The requests themselves: an OpenAI-compatible server at a derived api_base.
        self.http = LitellmProvider()
        self.folder: Path | None = None
        # (served name, options) -> server; entries with the same model and options share one.
        self.servers: dict[str, Server] = {}
        self.by_entry: dict[str, Server] = {}
        self._lock = threading.Lock()

    def check_entry(self, spec: ModelSpec) -> None:
        parse_entry(spec)

    def use_folder(self, folder: Path) -> None:
        self.folder = folder

    def warm_up(self, specs: Sequence[ModelSpec] = ()) -> None:
        groups: dict[str, list[ModelSpec]] = {}
        for spec in specs:
            groups.setdefault(self._key(spec, parse_entry(spec)), []).append(spec)
        for group in groups.values():
            self.server(group[0], group)
        self.http.warm_up([self.target(spec) for spec in specs])

    @staticmethod
    def _key(spec: ModelSpec, options: VllmOptions) -> str:
        if options.attach is not None:
            url = options.attach.rstrip("/").removesuffix("/v1")
            return json.dumps(["attach", url, served_name(spec)])  # each name is checked
        return json.dumps([served_name(spec), options.model_dump()], sort_keys=True)

    def server(self, spec: ModelSpec, group: Sequence[ModelSpec] = ()) -> Server:
        """The entry's server, started (or attached to) on first use."""
        found = self.by_entry.get(spec.name)
        if found is not None:
            return found
        with self._lock:
            options = parse_entry(spec)
            key = self._key(spec, options)
            server = self.servers.get(key)
            if server is None:
                entries = [s.name for s in group] or [spec.name]
                server = Server(options, served_name(spec), entries, self.folder, spec.api_key())
                self.servers[key] = server
                server.start()
            elif spec.name not in server.entries:
                server.entries.append(spec.name)
            self.by_entry[spec.name] = server
            return server

    def target(self, spec: ModelSpec) -> ModelSpec:
        """The entry as the OpenAI-compatible route reaches its server."""
        server = self.server(spec)
        update: dict[str, Any] = {
            "provider": "litellm",
            "model": f"openai/{served_name(spec)}",
            "api_base": server.api_base,
            "options": {},
        }
        if spec.input_cost_per_token is None and spec.output_cost_per_token is None:
            # Your own GPUs bill no tokens; priced here, litellm's cost map (an import of
            # seconds) is never needed for it.
            update.update(input_cost_per_token=0.0, output_cost_per_token=0.0)
        return spec.model_copy(update=update)

    async def wait_ready(self, spec: ModelSpec) -> None:
        await self.server(spec).until_ready()

    async def complete(
        self,
        spec: ModelSpec,
        messages: list[dict[str, Any]],
        params: dict[str, Any],
        headers: dict[str, str],
        journal: Journal | None = None,
    ) -> ProviderReply:
        server = self.server(spec)
        target = self.target(spec)
        for _ in range(server.options.max_restarts + 2):
            try:
                generation = await server.until_ready()
            except ServerFailed as exc:
                raise PermanentError(str(exc)) from None
            try:
                return await self.http.complete(target, messages, params, headers, journal)
            except TransientError as exc:
                # A server vkr runs died under the request: no reply was read, so none was
                # paid for; it is sent again once the restarted server is ready.
                if server.attached:
                    raise
                # A dropped connection waits a moment for the supervisor to see an exit; an
                # HTTP status came from a live server (or its proxy): only a seen exit counts.
                grace = 1.0 if exc.status is None or exc.status >= 500 else 0.0
                if not await server.went_down(generation, grace):
                    raise
                log.info("resending a request the crashed vllm server dropped", model=spec.name)
        raise TransientError(f"{server.what} kept going down under the request")

    async def check(self, spec: ModelSpec) -> ProviderReply | None:
        server = self.server(spec)
        try:
            await server.until_ready()
        except ServerFailed as exc:
            raise PermanentError(str(exc)) from None
        return await self.http.check(self.target(spec))

    async def aclose(self) -> None:
        """Stop the servers this provider started (the end of a run); attached ones stay."""
        servers = list(self.servers.values())
        self.servers, self.by_entry, self.folder = {}, {}, None
        if servers:
            await asyncio.gather(*(asyncio.to_thread(server.stop) for server in servers))
        await self.http.aclose()


@hookimpl
def vkr_register_providers(register: Any) -> None:
    register(VllmProvider())
