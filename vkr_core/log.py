"""structlog configuration and secret redaction.

API keys must never reach a log line, cache file, record or exception message. Every value
of an environment variable that looks like a credential (or that a pool names as its key
variable) is registered as a secret; ``redact`` replaces them wherever text leaves vkr.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL)", re.IGNORECASE)
_MIN_SECRET_LEN = 8
_secrets: set[str] = set()
# Longest first, so a secret that contains another is replaced whole; sorted when one is
# added, not on every redact (it runs on every line a run appends: ~30 a video).
_longest_first: tuple[str, ...] = ()
# Shapes of provider keys, for text that carries a key we were never told about.
_KEY_SHAPES = re.compile(
    r"(sk-[A-Za-z0-9_\-]{16,}|sk-ant-[A-Za-z0-9_\-]{16,}|AIza[0-9A-Za-z_\-]{30,}"
    r"|Bearer\s+[A-Za-z0-9_\-\.]{16,})"
)
# A literal part of every match of _KEY_SHAPES ("sk-ant-" contains "sk-").
_KEY_MARKERS = ("sk-", "AIza", "Bearer")
REDACTED = "***"
# A password inside a URL (postgresql://user:password@host): kept out whatever its length.
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*):[^@/\s]+@")


def register_secrets(values: Iterable[str | None]) -> None:
    """Treat these strings as secrets from now on."""
    global _longest_first
    for value in values:
        if value and len(value) >= _MIN_SECRET_LEN and value not in _secrets:
            _secrets.add(value)
            _longest_first = tuple(sorted(_secrets, key=len, reverse=True))


def register_env_secrets(extra_names: Iterable[str] = ()) -> None:
    """Register credential-looking environment variables and the named ones."""
    names = {n for n in os.environ if _SECRET_NAME.search(n)} | set(extra_names)
    register_secrets(os.environ.get(n) for n in names)


def redact(text: str) -> str:
    """Text with every known secret and key-shaped token replaced."""
    if not text:
        return text
    for secret in _longest_first:
        if secret in text:
            text = text.replace(secret, REDACTED)
    # The patterns only where their fixed part occurs: a substring test is a fast scan, the
    # regular expressions try every position (60 us for a 6 KB step input, one per call).
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    if any(marker in text for marker in _KEY_MARKERS):
        text = _KEY_SHAPES.sub(REDACTED, text)
    return text


def redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v) for v in value)
    return value


def _scrub(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if key in ("api_key", "authorization") and value:
            event_dict[key] = REDACTED
        else:
            event_dict[key] = redact_value(value)
    return event_dict


def configure_logging(level: str = "WARNING", json_logs: bool = False, file: Any = None) -> None:
    """Configure structlog (no frame locals in tracebacks: they would carry keys) and litellm."""
    import structlog

    register_env_secrets()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING), stream=sys.stderr)
    for noisy in ("LiteLLM", "litellm", "httpx", "aiohttp.access", "LiteLLM Router"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    renderer: Any
    if json_logs:
        renderer = structlog.processors.JSONRenderer()
        tracebacks: Any = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        tracebacks = structlog.processors.format_exc_info
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            tracebacks,
            _scrub,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.WARNING)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=file or sys.stderr),
        cache_logger_on_first_use=False,
    )


class _Logger:
    """structlog's logger for ``name``, imported at its first use: modules make their logger
    at import, and structlog (~0.11 s, most of it structlog.dev) is then paid by every `vkr`
    command, though `vkr --help` or `vkr report` never log."""

    __slots__ = ("_name", "_logger")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._logger is None:
            import structlog

            # structlog's own lazy proxy: it reads the configuration at each call, so
            # configure_logging after this still applies.
            self._logger = structlog.get_logger(self._name)
        return getattr(self._logger, attr)

    def __repr__(self) -> str:
        return f"<vkr logger {self._name!r}>"


def get_logger(name: str = "vkr") -> Any:
    return _Logger(name)
