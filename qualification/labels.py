"""labels.sqlite of a pilot: ``labelling.store.LabelHistory`` bound to one pilot.

Every label ever given is kept, one current label per (item, annotator); the file is bound
to its pilot (a table ``pilot`` holds its id) and its ``label`` column CHECKs ok/hard/soft.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from labelling.store import (
    MAX_ANNOTATOR_LENGTH,
    MAX_NOTE_LENGTH,
    LabelChange,
    LabelHistory,
    check_annotator,
    now,
)
from labelling.store import check_label as check_any_label
from qualification.models import CATEGORIES, LABELS, Label

# Pilot code and third parties import these from here, as before the move to labelling/.
__all__ = [
    "MAX_ANNOTATOR_LENGTH",
    "MAX_NOTE_LENGTH",
    "LabelChange",
    "LabelStore",
    "check_annotator",
    "check_label",
    "now",
]


def check_label(label: str, category: str | None, note: str) -> tuple[str, str | None, str]:
    """A pilot label's (label, category, note), or InputError naming what is wrong."""
    return check_any_label(label, category, note, LABELS, CATEGORIES, without_category=("ok",))


class LabelStore:
    """The labels of one pilot. Safe to share between the threads of one process."""

    def __init__(self, path: str | Path, pilot_id: str):
        self._history = LabelHistory(
            path,
            LABELS,
            CATEGORIES,
            owner=("pilot", pilot_id),
            without_category=("ok",),
            label_model=Label,
        )
        self.path = self._history.path
        self.pilot_id = pilot_id

    def close(self) -> None:
        self._history.close()

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The store makes pilot Labels (ok/hard/soft): the casts give callers that narrower type.
    def get(self, item_id: str, annotator: str) -> Label | None:
        """The current label of an item by an annotator, if any."""
        return cast(Label | None, self._history.get(item_id, annotator))

    def current(self, annotator: str | None = None) -> list[Label]:
        """Current labels, of one annotator or of all, in item then annotator order."""
        return cast(list[Label], self._history.current(annotator))

    def history(self, item_id: str, annotator: str | None = None) -> list[Label]:
        """Every label ever given to an item (by one annotator), oldest first."""
        return cast(list[Label], self._history.history(item_id, annotator))

    def set(
        self,
        item_id: str,
        annotator: str,
        label: str,
        category: str | None = None,
        note: str = "",
        source: str = "web",
    ) -> LabelChange:
        """Make this the current label; a different current one is kept in the history."""
        return self._history.set(item_id, annotator, label, category, note, source)
