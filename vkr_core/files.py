"""Writing and reading files the one way vkr does: atomic replacement, jsonl line by line.

Every file vkr writes whole (records, configs, manifests, reports, exports, caches) goes
through :func:`atomic_write` or :func:`atomic_path`, so a reader, or a run killed half-way,
sees the old file or the new one, never half of one and never a stray temporary file.
Every jsonl file vkr reads goes through :func:`read_jsonl`, so a line cut short by a kill
and a damaged line read the same way in every command, named ``FILE:LINE``.

This module imports nothing of vkr beyond its errors: any other module may use it.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from pydantic import BaseModel, ValidationError

from vkr_core.errors import describe_validation_error
from vkr_core.schemas import InputError

M = TypeVar("M", bound=BaseModel)

# ---------------------------------------------------------------- atomic writes


def _temporary(target: Path) -> tuple[int, Path]:
    """A new, empty, hidden file beside ``target`` (same directory, so the final rename is
    atomic), opened for writing. Made with O_EXCL and mode 0666 so the umask applies, as it
    does to a file opened normally (mkstemp would make every output 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    # A name of up to 255 bytes must stay one with the prefix and suffix added.
    stem = target.name[:200]
    while True:
        candidate = target.with_name(f".{stem}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(candidate, flags, 0o666), candidate
        except FileExistsError:
            continue


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: str | bytes, encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``data`` (text is encoded with ``encoding``) in one step.

    The bytes go to a temporary file in the same directory, are flushed to disk, then
    renamed over ``path``. If anything fails the old file is left as it was and the
    temporary file is removed. Returns ``path``.
    """
    target = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else data
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = _temporary(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that opens the file itself (pyarrow,
    a streaming loop); when the block ends without error the file is flushed to disk and
    renamed over ``path``, and when it raises the temporary file is removed and ``path``
    is left as it was::

        with atomic_path(out / "train.parquet") as temporary:
            pyarrow.parquet.write_table(table, temporary)

    The temporary name ends in ``.tmp``: give the writer its format explicitly when it
    would guess it from the extension.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = _temporary(target)
    os.close(fd)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- jsonl


@dataclass(frozen=True)
class JsonlProblem:
    """A line of a jsonl file that is not what its reader expects.

    ``cut`` marks the last line of a file that ends without a newline and does not parse:
    what an appending writer leaves when it is killed mid-line.
    """

    path: Path
    line: int
    reason: str
    cut: bool = False

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


CUT_SHORT = "cut short (the file ends inside this line, as when its writer is stopped)"


def _syntax_error(exc: Exception) -> str | None:
    """What is wrong with a line that is not JSON at all, else None."""
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg
    if isinstance(exc, UnicodeDecodeError):
        return "invalid UTF-8"
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            return str(errors[0]["msg"]).removeprefix("Invalid JSON: ")
    return None


def _reason(exc: Exception) -> str:
    syntax = _syntax_error(exc)
    if syntax is not None:
        return f"not JSON ({syntax})"
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        if errors and not errors[0]["loc"] and errors[0]["type"] in ("model_type", "dict_type"):
            return "not a JSON object"
        return describe_validation_error(exc)
    return str(exc)


@overload
def read_jsonl(
    path: str | os.PathLike[str],
    model: None = None,
    *,
    on_problem: Callable[[JsonlProblem], None] | None = None,
    missing_ok: bool = False,
) -> Iterator[tuple[int, dict[str, Any]]]: ...


@overload
def read_jsonl(
    path: str | os.PathLike[str],
    model: type[M],
    *,
    on_problem: Callable[[JsonlProblem], None] | None = None,
    missing_ok: bool = False,
) -> Iterator[tuple[int, M]]: ...


def read_jsonl(
    path: str | os.PathLike[str],
    model: type[BaseModel] | None = None,
    *,
    on_problem: Callable[[JsonlProblem], None] | None = None,
    missing_ok: bool = False,
) -> Iterator[tuple[int, Any]]:
    """``(line number, object)`` for each line of a jsonl file, read one line at a time.

    Each line is a JSON object, validated into ``model`` when one is given (straight from
    the bytes: about twice as fast as parsing then validating). Blank lines are skipped. A
    line that does not parse or validate goes to ``on_problem`` as a :class:`JsonlProblem`
    and reading goes on; without ``on_problem`` it raises an InputError
    ``"FILE:LINE: why"``. A missing file is an InputError unless ``missing_ok`` (then it
    has no lines).
    """
    file = Path(path)
    try:
        handle = file.open("rb")
    except FileNotFoundError:
        if missing_ok:
            return
        raise InputError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{file}: is a directory, not a jsonl file") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                if model is not None:
                    value: Any = model.model_validate_json(raw)
                else:
                    value = json.loads(raw)
                    if not isinstance(value, dict):
                        raise ValueError("not a JSON object")
            except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ValidationError
                # Only the last line can lack its newline; a complete line that merely
                # fails validation is a bad line, not a cut one.
                cut = not raw.endswith(b"\n") and _syntax_error(exc) is not None
                problem = JsonlProblem(file, number, CUT_SHORT if cut else _reason(exc), cut)
                if on_problem is None:
                    raise InputError(str(problem)) from None
                on_problem(problem)
                continue
            yield number, value


__all__ = ["CUT_SHORT", "JsonlProblem", "atomic_path", "atomic_write", "read_jsonl"]
