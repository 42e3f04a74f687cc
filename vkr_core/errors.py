"""One line for a pydantic ValidationError, the same in every message vkr shows.

pydantic's own text spans a line per problem plus a documentation URL each; a vkr error is
one line (the CLI prints it without a traceback), so every caller formats through here.
"""

from __future__ import annotations

from pydantic import ValidationError

# pydantic prefixes what a validator raised with its kind: noise to a user.
_PREFIXES = ("Value error, ", "Assertion failed, ")


def _message(text: object) -> str:
    message = " ".join(str(text).split())
    for prefix in _PREFIXES:
        message = message.removeprefix(prefix)
    return message


def describe_validation_error(exc: ValidationError, strip: int = 0, limit: int = 10) -> str:
    """``field.sub: message; other: message`` for every problem in ``exc``, on one line.

    A location is its keys and list indexes joined by dots (``models.0.name``); a problem
    with the whole object is its message alone; a key the schema does not have reads
    ``unknown key 'x' in field``. ``strip`` drops leading location
    parts that the user never wrote (a wrapper the data was validated under). Past ``limit``
    problems the line ends with ``and N more``.
    """
    parts: list[str] = []
    for error in exc.errors():
        location = [str(part) for part in error["loc"]][strip:]
        if error["type"] == "extra_forbidden" and location:
            where = ".".join(location[:-1]) or "the top level"
            part = f"unknown key {location[-1]!r} in {where}"
        elif location:
            part = f"{'.'.join(location)}: {_message(error['msg'])}"
        else:  # a check of the whole object: its message says what is wrong
            part = _message(error["msg"])
        if part not in parts:  # a union repeats one problem per member
            parts.append(part)
    if not parts:
        return _message(exc) or exc.title
    shown = "; ".join(parts[:limit])
    more = len(parts) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


__all__ = ["describe_validation_error"]
