"""Built-in frame readers: decord first (fast batch reads), PyAV where decord fails.

Both pick frames by presentation timestamp (the frame shown at a time), report times from
the start of the video stream, and return frames upright as a player shows them (rotation
metadata applied), so either can stand in for the other.

The readers live in `plugins.readers_impl`, imported by these hooks when a reader is made:
every `vkr` command loads this plugin, and only those that decode need numpy for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vkr_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from plugins.readers_impl import DecordReader, PyAVReader

__all__ = ["DecordReader", "PyAVReader", "decord_frame_reader", "pyav_frame_reader"]


@hookimpl(specname="vkr_frame_reader", tryfirst=True)
def decord_frame_reader(path: str, exclude: tuple[str, ...]) -> DecordReader | None:
    """decord, unless it already failed on this file."""
    from plugins.readers_impl import DecordReader

    return None if DecordReader.name in exclude else DecordReader(path)


@hookimpl(specname="vkr_frame_reader")
def pyav_frame_reader(path: str, exclude: tuple[str, ...]) -> PyAVReader | None:
    """PyAV, unless it already failed on this file."""
    from plugins.readers_impl import PyAVReader

    return None if PyAVReader.name in exclude else PyAVReader(path)


def __getattr__(name: str) -> Any:
    # `from plugins.readers import PyAVReader` keeps working, importing numpy only then.
    if name in ("DecordReader", "PyAVReader"):
        from plugins import readers_impl

        return getattr(readers_impl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
