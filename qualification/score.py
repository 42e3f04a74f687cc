"""Score pilots: error rates with Wilson intervals, agreement, and the eligibility registry.

How an item's labels become one outcome:

- an automatic hard label (a reply that did not parse, a refusal) decides the item: the
  pipeline cannot use such a reply whatever a reviewer thinks of its content;
- otherwise the current labels of the human annotators decide, by ``all`` (the item is a
  failure if any annotator marked it so) or ``majority`` (a failure if at least half did: a
  tie counts as a failure, the cautious reading of the 3 % rule). A failure is hard when
  hard votes are at least as many as soft ones;
- an item with no label is unlabelled, and a pilot with unlabelled items is not scored
  unless partial scoring is asked for.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any, Literal

from qualification.models import AUTO_ANNOTATOR, MAX_ERROR_RATE, Label
from qualification.pilot import Pilot, open_pilot
from qualification.stats import cohen_kappa, wilson_interval
from vkr_core.config import (
    Eligibility,
    EligibilityRegistry,
    load_registry,
    save_registry,
)
from vkr_core.schemas import InputError

AnnotatorPolicy = Literal["all", "majority"]


def item_outcome(labels: list[Label], policy: AnnotatorPolicy) -> str | None:
    """ok, hard or soft for one item from its current labels; None when unlabelled."""
    if any(lab.annotator == AUTO_ANNOTATOR and lab.label != "ok" for lab in labels):
        return "hard"
    votes = Counter(lab.label for lab in labels if lab.annotator != AUTO_ANNOTATOR)
    total = sum(votes.values())
    if total == 0:
        return None
    failures = votes["hard"] + votes["soft"]
    failed = failures > 0 if policy == "all" else 2 * failures >= total
    if not failed:
        return "ok"
    return "hard" if votes["hard"] >= votes["soft"] else "soft"


@dataclass
class Agreement:
    annotators: tuple[str, str]
    items: int
    ok_vs_failure: float | None
    three_way: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "annotators": list(self.annotators),
            "items": self.items,
            "ok_vs_failure": _round(self.ok_vs_failure),
            "three_way": _round(self.three_way),
        }


def agreement(labels: list[Label]) -> list[Agreement]:
    """Cohen's kappa for each pair of human annotators over the items both labelled."""
    by_annotator: dict[str, dict[str, str]] = {}
    for lab in labels:
        if lab.annotator != AUTO_ANNOTATOR:
            by_annotator.setdefault(lab.annotator, {})[lab.item_id] = lab.label
    out = []
    for a, b in combinations(sorted(by_annotator), 2):
        shared = sorted(set(by_annotator[a]) & set(by_annotator[b]))
        if not shared:
            continue
        three = [(by_annotator[a][i], by_annotator[b][i]) for i in shared]
        binary = [
            ("ok" if x == "ok" else "failure", "ok" if y == "ok" else "failure") for x, y in three
        ]
        out.append(Agreement((a, b), len(shared), cohen_kappa(binary), cohen_kappa(three)))
    return out


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class PilotScore:
    pilot: Pilot
    labelled: int
    unlabelled: list[str]
    hard: int
    soft: int
    wilson_low: float
    wilson_high: float
    annotators: list[str]
    agreement: list[Agreement] = field(default_factory=list)
    strict: bool = False
    policy: AnnotatorPolicy = "all"

    @property
    def step(self) -> str:
        return self.pilot.manifest.step

    @property
    def model(self) -> str:
        return self.pilot.manifest.model

    @property
    def failures(self) -> int:
        return self.hard + self.soft

    @property
    def error_rate(self) -> float:
        return self.failures / self.labelled

    @property
    def rule(self) -> str:
        return (
            f"wilson_high <= {MAX_ERROR_RATE}" if self.strict else f"error_rate <= {MAX_ERROR_RATE}"
        )

    @property
    def eligible(self) -> bool:
        # Integer comparison: 3 failures in 100 is exactly 3 %, and eligible.
        within = self.failures * 100 <= round(MAX_ERROR_RATE * 100) * self.labelled
        if self.strict:
            return within and self.wilson_high <= MAX_ERROR_RATE
        return within

    def entry(self) -> Eligibility:
        """The registry entry, with the provenance that lets anyone check it."""
        manifest = self.pilot.manifest
        # Eligibility allows extra fields: the provenance travels with the verdict.
        return Eligibility.model_validate(
            dict(
                eligible=self.eligible,
                error_rate=round(self.error_rate, 6),
                n=self.labelled,
                prompt_version=manifest.prompt_version,
                pilot_id=manifest.pilot_id,
                inputs_sha256=manifest.inputs_sha256,
                annotators=self.annotators,
                annotator_policy=self.policy,
                date=datetime.now(UTC).date().isoformat(),
                hard=self.hard,
                soft=self.soft,
                wilson_low=round(self.wilson_low, 6),
                wilson_high=round(self.wilson_high, 6),
                rule=self.rule,
                kappa=[a.as_dict() for a in self.agreement],
                # Earned with the schema: say so (absent, as before, when earned without).
                structured_output=True if manifest.structured_output else None,
            )
        )


def score_pilot(
    pilot: Pilot,
    policy: AnnotatorPolicy = "all",
    strict: bool = False,
    allow_partial: bool = False,
) -> PilotScore:
    """Count hard and soft failures over the labelled items of one pilot."""
    if policy not in ("all", "majority"):
        raise InputError(f"annotator policy {policy!r} is not one of all, majority")
    with pilot.labels() as store:
        labels = store.current()
    known = {item.item_id for item in pilot.items}
    by_item: dict[str, list[Label]] = {}
    for lab in labels:
        if lab.item_id in known:
            by_item.setdefault(lab.item_id, []).append(lab)
    outcomes = {i.item_id: item_outcome(by_item.get(i.item_id, []), policy) for i in pilot.items}
    unlabelled = [item_id for item_id, outcome in outcomes.items() if outcome is None]
    pilot_id = pilot.manifest.pilot_id
    if len(unlabelled) == len(outcomes):
        raise InputError(f"pilot {pilot_id} ({pilot.root}) has no labels yet: nothing to score")
    if unlabelled and not allow_partial:
        raise InputError(
            f"pilot {pilot_id} ({pilot.root}) has {len(unlabelled)} of {len(outcomes)} items "
            f"without a label (first: {', '.join(unlabelled[:3])}): label them, or score the "
            "labelled ones with --allow-partial"
        )
    counts = Counter(o for o in outcomes.values() if o is not None)
    labelled = sum(counts.values())
    low, high = wilson_interval(counts["hard"] + counts["soft"], labelled)
    annotators = sorted({lab.annotator for lab in labels if lab.annotator != AUTO_ANNOTATOR})
    return PilotScore(
        pilot=pilot,
        labelled=labelled,
        unlabelled=unlabelled,
        hard=counts["hard"],
        soft=counts["soft"],
        wilson_low=low,
        wilson_high=high,
        annotators=annotators,
        agreement=agreement([lab for lab in labels if lab.item_id in known]),
        strict=strict,
        policy=policy,
    )


def score_pilots(
    pilot_dirs: list[str | Path],
    registry_path: str | Path | None = None,
    policy: AnnotatorPolicy = "all",
    strict: bool = False,
    allow_partial: bool = False,
) -> list[PilotScore]:
    """Score each pilot and, given a registry file, write or merge its entries there."""
    if not pilot_dirs:
        raise InputError("name at least one pilot directory to score")
    pilots = [open_pilot(d) for d in pilot_dirs]
    seen: dict[tuple[str, str], Pilot] = {}
    for pilot in pilots:
        key = (pilot.manifest.step, pilot.manifest.model)
        if key in seen:
            raise InputError(
                f"pilots {seen[key].root} and {pilot.root} both qualify {key[1]!r} for step "
                f"{key[0]!r}: score one pilot per (step, model)"
            )
        seen[key] = pilot
    scores = [score_pilot(p, policy, strict, allow_partial) for p in pilots]
    if registry_path is not None:
        path = Path(registry_path)
        registry = load_registry(path) if path.exists() else EligibilityRegistry()
        for score in scores:
            registry.steps.setdefault(score.step, {})[score.model] = score.entry()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_registry(registry, path)
    return scores
