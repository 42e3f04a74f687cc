"""The corpus audit: a stratified sample of accepted examples, experts' labels, rates, drops.

An audit folder holds ``audit.json`` (what was sampled from where), ``sample.jsonl`` (one
example per line with its frames), ``labels.sqlite`` (every label ever given, history kept)
and, after scoring, ``score.json`` and ``score.md``. Examples are read with the same reader
`vkr split` and `vkr export` use (``corpus.exporters.load_accepted`` / ``load_split``).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from corpus.exporters import load_accepted, load_split
from labelling.store import LabelHistory
from qualification.stats import cohen_kappa, wilson_interval
from vkr_core.files import atomic_write, read_jsonl
from vkr_core.schemas import AcceptedExample, Frame, InputError, SplitManifest
from vkr_core.store import RunLayout, SplitLayout

LABELS: tuple[str, ...] = ("ok", "not_grounded", "trace_error", "unsupported_step")
LABEL_NAMES = {
    "ok": "ok",
    "not_grounded": "not visually grounded",
    "trace_error": "trace error that changes the answer",
    "unsupported_step": "unsupported step",
}
# Any label but ok: what `vkr audit drop` removes; scored beside the four labels.
FLAGGED = "flagged"
SCORED: tuple[str, ...] = (*LABELS, FLAGGED)
SCORED_NAMES = {**LABEL_NAMES, FLAGGED: "flagged (any but ok)"}
# A handful per stratum so a rare skill or model still gets an estimate, as the paper's
# audit reports every skill.
MIN_PER_STRATUM = 3


class AuditFrame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    clock: str
    path: str


class AuditItem(BaseModel):
    """One sampled example, with the frames its run sampled from the video."""

    model_config = ConfigDict(extra="forbid")

    item_id: str
    stratum: str
    generation_model: str
    trace_model: str
    example: AcceptedExample
    frames: list[AuditFrame]


class AuditManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str
    kind: str
    run_dirs: list[str]
    seed: int
    requested: int
    population: int
    sampled: int
    strata: dict[str, dict[str, int]]
    excluded_unfinished: list[str] = []


class AuditLayout:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = self.root / "audit.json"
        self.sample = self.root / "sample.jsonl"
        self.labels = self.root / "labels.sqlite"
        self.score_json = self.root / "score.json"
        self.score_md = self.root / "score.md"
        self.dropped = self.root / "dropped.json"


def _first(models: dict[str, list[str]], *steps: str) -> str:
    for step in steps:
        if models.get(step):
            return models[step][0]
    return "unknown"


def generation_model(example: AcceptedExample) -> str:
    return _first(example.models, "example_generation")


def trace_model(example: AcceptedExample) -> str:
    """The model whose reasoning is the example's trace: self_consistency re-derives it."""
    return _first(example.models, "self_consistency", "example_generation")


def stratum_of(example: AcceptedExample) -> str:
    return f"{example.skill} | {generation_model(example)}"


def allocate(sizes: dict[str, int], n: int, minimum: int = MIN_PER_STRATUM) -> dict[str, int]:
    """How many to take from each stratum: ``minimum`` each (or all of a smaller one), the
    rest proportional to size by largest remainder; all of everything when n covers it."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    if n < 1:
        raise InputError(f"--n must be at least 1, not {n}")
    keys = sorted(sizes)
    floor = min(minimum, n // max(len(keys), 1))
    take = {k: min(floor, sizes[k]) for k in keys}
    left = n - sum(take.values())
    rest = {k: sizes[k] - take[k] for k in keys}
    pool = sum(rest.values())
    if left > 0 and pool > 0:
        quotas = {k: left * rest[k] / pool for k in keys}
        extra = {k: min(rest[k], math.floor(quotas[k])) for k in keys}
        short = left - sum(extra.values())
        by_remainder = sorted(keys, key=lambda k: (-(quotas[k] - math.floor(quotas[k])), k))
        for k in by_remainder * 2:
            if short <= 0:
                break
            if extra[k] < rest[k]:
                extra[k] += 1
                short -= 1
        for k in keys:
            take[k] += extra[k]
    return take


def stratified_sample(
    examples: Sequence[AcceptedExample], n: int, seed: int
) -> tuple[list[AcceptedExample], dict[str, dict[str, int]]]:
    """A seeded stratified sample by (skill, generation model), in a seeded order."""
    strata: dict[str, list[AcceptedExample]] = defaultdict(list)
    for example in sorted(examples, key=lambda e: e.problem_id):
        strata[stratum_of(example)].append(example)
    take = allocate({k: len(v) for k, v in strata.items()}, n)
    rng = random.Random(seed)
    chosen: list[AcceptedExample] = []
    for key in sorted(strata):
        members = list(strata[key])
        rng.shuffle(members)
        chosen += members[: take[key]]
    rng.shuffle(chosen)
    table = {k: {"population": len(strata[k]), "sampled": take[k]} for k in sorted(strata)}
    return chosen, table


def _frames_of(run_dirs: Sequence[Path], video_id: str) -> list[AuditFrame]:
    for run_dir in run_dirs:
        folder = RunLayout(run_dir).frames(video_id)
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            continue
        try:
            frames = [Frame.model_validate(f) for f in json.loads(manifest.read_text())["frames"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise InputError(f"{manifest} is not a frame manifest vkr wrote") from None
        return [
            AuditFrame(sha256=f.sha256, clock=f.clock, path=str((folder / f.path).resolve()))
            for f in frames
        ]
    return []


def _load_source(source: Path) -> tuple[str, list[Path], list[AcceptedExample], list[str]]:
    """(kind, run dirs, accepted examples, excluded unfinished) of a run or a split folder."""
    if not source.is_dir():
        raise InputError(f"{source} is not a folder: give a run directory or a split folder")
    excluded: list[str] = []
    if SplitLayout(source).manifest.is_file():
        data = load_split(source)
        manifest = SplitManifest.model_validate_json(SplitLayout(source).manifest.read_text())
        run_dirs = [Path(d) for d in manifest.run_dirs]
        missing = [str(d) for d in run_dirs if not d.is_dir()]
        if missing:
            raise InputError(
                f"split {source} was made from {missing[0]}, which is not here: the audit "
                "shows each example's frames and trace from its run directory"
            )
        wanted = {e.problem_id for e in data.sft} | {e.problem_id for e in data.rl}
        examples = [e for e in load_accepted(run_dirs, True, []) if e.problem_id in wanted]
        return "split", run_dirs, examples, excluded
    if RunLayout(source).records.is_dir():
        return "run", [source], load_accepted([source], True, excluded), excluded
    raise InputError(
        f"{source} is neither a run directory ({RunLayout(source).records.name}/) nor a split "
        f"({SplitLayout(source).manifest.name})"
    )


def create_audit(source: str | Path, out: str | Path, n: int = 800, seed: int = 0) -> AuditManifest:
    """Sample ``n`` accepted examples of a run or split into the audit folder ``out``."""
    source = Path(source)
    layout = AuditLayout(out)
    if layout.sample.exists():
        raise InputError(
            f"{layout.root} already holds an audit (sample.jsonl): its labels refer to that "
            "sample; choose another --out"
        )
    kind, run_dirs, examples, excluded = _load_source(source)
    if not examples:
        raise InputError(f"{source} has no accepted examples to audit")
    chosen, strata = stratified_sample(examples, n, seed)
    items = [
        AuditItem(
            item_id=e.problem_id,
            stratum=stratum_of(e),
            generation_model=generation_model(e),
            trace_model=trace_model(e),
            example=e,
            frames=_frames_of(run_dirs, e.video_id),
        )
        for e in chosen
    ]
    manifest = AuditManifest(
        source=str(source),
        kind=kind,
        run_dirs=[str(d) for d in run_dirs],
        seed=seed,
        requested=n,
        population=len(examples),
        sampled=len(items),
        strata=strata,
        excluded_unfinished=excluded,
    )
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write(layout.sample, "".join(i.model_dump_json() + "\n" for i in items))
    atomic_write(layout.manifest, manifest.model_dump_json(indent=1) + "\n")
    return manifest


def load_audit(root: str | Path) -> tuple[AuditManifest, list[AuditItem]]:
    layout = AuditLayout(root)
    if not layout.manifest.is_file() or not layout.sample.is_file():
        raise InputError(f"{root} is not an audit folder: make one with `vkr audit RUN_DIR --out`")
    manifest = AuditManifest.model_validate_json(layout.manifest.read_text())
    return manifest, [item for _, item in read_jsonl(layout.sample, AuditItem)]


# ---------------------------------------------------------------- labels


def open_labels(root: str | Path) -> LabelHistory:
    """labels.sqlite of an audit: every label ever given, one current per example and
    annotator (a changed label is a new row; the old one points at it)."""
    return LabelHistory(AuditLayout(root).labels, LABELS)


def current_labels(root: str | Path) -> list[tuple[str, str, str]]:
    """(item_id, annotator, label) of every current label of the audit."""
    with open_labels(root) as store:
        return [(label.item_id, label.annotator, label.label) for label in store.current()]


VERDICT_RULE = (
    "an item's verdict is the adjudicator's label where the adjudicator labelled it; "
    "otherwise ok only if every annotator said ok, and flagged if any annotator flagged it, "
    "with the flag most of its annotators gave (a tie goes to the label listed first)"
)


def item_verdicts(
    labels: Iterable[tuple[str, str, str]], adjudicator: str | None = None
) -> dict[str, str]:
    """Each labelled item's verdict under ``VERDICT_RULE``.

    Any flag wins over ok, not the latest label: a flagged example that stays in the corpus
    is a wrong training target, a dropped good one is one example fewer, and one expert who
    sees an unsupported step is evidence the others may have missed. The price is that more
    annotators flag more; an adjudicator's label settles a disputed item.
    """
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for item_id, annotator, label in labels:
        by_item[item_id][annotator] = label
    if adjudicator is not None and not any(adjudicator in given for given in by_item.values()):
        named = sorted({a for given in by_item.values() for a in given})
        raise InputError(
            f"adjudicator {adjudicator!r} labelled no example of this audit (annotators: "
            f"{', '.join(named) or 'none yet'})"
        )
    verdicts = {}
    for item_id, given in by_item.items():
        if adjudicator is not None and adjudicator in given:
            verdicts[item_id] = given[adjudicator]
            continue
        flags = Counter(label for label in given.values() if label != "ok")
        if not flags:
            verdicts[item_id] = "ok"
        else:
            verdicts[item_id] = max(LABELS[1:], key=lambda f: (flags[f], -LABELS.index(f)))
    return verdicts


def agreement(
    labels: Iterable[tuple[str, str, str]], adjudicator: str | None = None
) -> list[dict[str, Any]]:
    """Per pair of annotators (the adjudicator left out: it labels the disputes): the items
    both labelled, raw agreement, Cohen's kappa over the four labels and over ok vs flagged,
    and the items they disagree on."""
    by_annotator: dict[str, dict[str, str]] = defaultdict(dict)
    for item_id, annotator, label in labels:
        if annotator != adjudicator:
            by_annotator[annotator][item_id] = label
    pairs = []
    for a, b in combinations(sorted(by_annotator), 2):
        shared = sorted(set(by_annotator[a]) & set(by_annotator[b]))
        if not shared:
            continue
        four = [(by_annotator[a][i], by_annotator[b][i]) for i in shared]
        flagged = [(x != "ok", y != "ok") for x, y in four]
        kappa4, kappa2 = cohen_kappa(four), cohen_kappa([(str(x), str(y)) for x, y in flagged])
        pairs.append(
            {
                "annotators": [a, b],
                "items": len(shared),
                "agreement": sum(x == y for x, y in four) / len(shared),
                "kappa": None if kappa4 is None else round(kappa4, 4),
                "kappa_ok_vs_flagged": None if kappa2 is None else round(kappa2, 4),
                "disagreements": [
                    {"item_id": i, "labels": {a: x, b: y}}
                    for i, (x, y) in zip(shared, four, strict=True)
                    if x != y
                ],
            }
        )
    return pairs


# ---------------------------------------------------------------- score


def wilson(k: float, n: float) -> tuple[float, float]:
    """The Wilson 95 % interval of k in n (0, 0 for n = 0); k and n may be effective
    (weighted) counts."""
    return wilson_interval(k, n) if n > 0 else (0.0, 0.0)


def _rates(verdicts: Iterable[str]) -> dict[str, Any]:
    counts = Counter(verdicts)
    n = sum(counts.values())
    row: dict[str, Any] = {"n": n}
    for label in (*LABELS, FLAGGED):
        count = n - counts["ok"] if label == FLAGGED else counts[label]
        low, high = wilson(count, n)
        row[label] = {"count": count, "rate": count / n if n else 0.0, "low": low, "high": high}
    return row


def stratified_rates(
    verdicts_by_stratum: dict[str, list[str]], population: dict[str, int]
) -> dict[str, Any]:
    """The population estimate of each label's rate: each stratum's rate weighted by its
    share of the accepted population, with a Wilson interval on the effective sample size.

    The sample takes at least a few from every stratum, so small strata are oversampled and
    the plain mean over labelled items is biased towards them. The estimate is
    p = sum_h W_h p_h with W_h = N_h / N (Cochran, Sampling Techniques, 3rd ed. 1977, ch. 5,
    stratified sampling for proportions). Its interval is Wilson's with n replaced by the
    effective sample size n_eff = 1 / sum_h (W_h^2 / n_h) (Kish, "Weighting for unequal
    P_i", J. Official Statistics 8(2), 1992: the design effect of unequal weights), the
    Wilson-with-effective-sample-size interval
    recommended for stratified samples by Franco, Little, Louis and Slud, "Comparative
    study of confidence intervals for proportions in complex sample surveys", JSSAM 7(3),
    2019. No finite-population correction: it only narrows the interval, and is negligible
    at the paper's 800 of 315K. Strata with no label yet are left out and the weights
    renormalised over the rest (``population_covered`` says how much that leaves).
    """
    labelled = {h: v for h, v in verdicts_by_stratum.items() if v}
    total = sum(population.values())
    covered = sum(population.get(h, 0) for h in labelled)
    weights = {h: population.get(h, 0) / covered for h in labelled} if covered else {}
    design = sum(w * w / len(labelled[h]) for h, w in weights.items())
    n_eff = 1 / design if design else 0.0
    row: dict[str, Any] = {
        "n": sum(len(v) for v in labelled.values()),
        "n_effective": round(n_eff, 2),
        "population": total,
        "population_covered": covered / total if total else 0.0,
        "strata_unlabelled": sorted(set(population) - set(labelled)),
    }
    for label in (*LABELS, FLAGGED):
        rate = 0.0
        for h, w in weights.items():
            given = labelled[h]
            hits = sum((v != "ok") if label == FLAGGED else (v == label) for v in given)
            rate += w * hits / len(given)
        low, high = wilson(rate * n_eff, n_eff)
        row[label] = {"rate": rate, "low": low, "high": high}
    return row


def score_audit(root: str | Path, adjudicator: str | None = None) -> dict[str, Any]:
    """The population estimate of each label's rate (weighted by stratum), the rates per
    skill and model over their labelled items, and the annotators' agreement."""
    manifest, items = load_audit(root)
    labels = current_labels(root)
    verdicts = item_verdicts(labels, adjudicator)
    labelled = [i for i in items if i.item_id in verdicts]
    groups: dict[str, dict[str, list[str]]] = {
        "stratum": defaultdict(list),
        "skill": defaultdict(list),
        "generation_model": defaultdict(list),
        "trace_model": defaultdict(list),
    }
    for item in labelled:
        verdict = verdicts[item.item_id]
        groups["stratum"][item.stratum].append(verdict)
        groups["skill"][item.example.skill].append(verdict)
        groups["generation_model"][item.generation_model].append(verdict)
        groups["trace_model"][item.trace_model].append(verdict)
    population = {h: row["population"] for h, row in manifest.strata.items()}
    by_stratum = {}
    for h in sorted(manifest.strata):
        row = _rates(groups["stratum"].get(h, []))
        row |= {"population": population[h], "sampled": manifest.strata[h]["sampled"]}
        by_stratum[h] = row
    annotators = sorted({a for _, a, _ in labels})
    pairs = agreement(labels, adjudicator)
    return {
        "source": manifest.source,
        "sampled": len(items),
        "labelled": len(labelled),
        "unlabelled": len(items) - len(labelled),
        "verdict_rule": VERDICT_RULE,
        "adjudicator": adjudicator,
        "overall": stratified_rates(groups["stratum"], population),
        "unweighted": _rates(verdicts[i.item_id] for i in labelled),
        "by_stratum": by_stratum,
        **{
            f"by_{name}": {key: _rates(values) for key, values in sorted(group.items())}
            for name, group in groups.items()
            if name != "stratum"
        },
        "agreement": {
            "annotators": annotators,
            "pairs": pairs,
            "disputed": sorted({d["item_id"] for p in pairs for d in p["disagreements"]}),
        },
    }


def _md(text: str) -> str:
    """Text for a Markdown table cell: a stratum ("skill | model") or a model name may hold
    the column separator."""
    return text.replace("|", "\\|")


def _cell(rate: dict[str, Any], n: int) -> str:
    if not n:
        return "—"  # nothing labelled: a 0 % with an empty interval would read as a result
    count = f"{rate['count']} " if "count" in rate else ""
    return f"{count}({100 * rate['rate']:.1f} %, {100 * rate['low']:.1f}–{100 * rate['high']:.1f})"


def _row(title: str, n: int, rates: dict[str, Any]) -> str:
    cells = " | ".join(_cell(rates[label], n) for label in SCORED)
    return f"| {_md(title)} | {n} | {cells} |"


def score_markdown(score: dict[str, Any]) -> str:
    overall, agree = score["overall"], score["agreement"]
    head = "| | n | " + " | ".join(SCORED_NAMES[label] for label in SCORED) + " |"
    rule = "|---" * (len(SCORED) + 2) + "|"
    lines = [
        f"# Audit of {score['source']}",
        "",
        f"{score['labelled']} of {score['sampled']} sampled examples labelled "
        f"({score['unlabelled']} not yet). Each cell: count (rate, Wilson 95 % interval).",
        "",
        "The **population** row weights each stratum (skill | generation model) by its share "
        "of the accepted examples, as the sample over-represents small strata; its interval "
        f"is Wilson's on the effective sample size ({overall['n_effective']}). The other rows "
        "are plain rates over the labelled examples of the group.",
    ]
    if overall["strata_unlabelled"]:
        lines += [
            "",
            f"The estimate covers {100 * overall['population_covered']:.1f} % of the "
            f"population: no label yet in {'; '.join(overall['strata_unlabelled'])}.",
        ]
    lines += [
        "",
        head,
        rule,
        _row("**population** (weighted by stratum)", overall["n"], overall),
        _row("labelled examples, unweighted", score["unweighted"]["n"], score["unweighted"]),
    ]
    for name, title in (
        ("skill", "skill"),
        ("generation_model", "generation model"),
        ("trace_model", "trace model"),
    ):
        for key, row in score[f"by_{name}"].items():
            lines.append(_row(f"{title}: {key}", row["n"], row))
    lines += [
        "",
        "## Strata",
        "",
        "| stratum | accepted | sampled | labelled | flagged |",
        "|---|---|---|---|---|",
    ]
    for key, row in score["by_stratum"].items():
        lines.append(
            f"| {_md(key)} | {row['population']} | {row['sampled']} | {row['n']} | "
            f"{_cell(row[FLAGGED], row['n'])} |"
        )
    lines += ["", "## Agreement", "", f"Verdicts: {score['verdict_rule']}."]
    if score["adjudicator"]:
        lines.append(f"Adjudicator: {score['adjudicator']}.")
    if not agree["pairs"]:
        lines += ["", "No two annotators labelled the same example."]
    else:
        lines += [
            "",
            "| annotators | both labelled | agreement | kappa (4 labels) | kappa (ok vs flagged) "
            "| disagree on |",
            "|---|---|---|---|---|---|",
        ]
        for pair in agree["pairs"]:
            kappas = [
                "n/a" if k is None else f"{k:.2f}"
                for k in (pair["kappa"], pair["kappa_ok_vs_flagged"])
            ]
            ids = ", ".join(d["item_id"] for d in pair["disagreements"]) or "—"
            lines.append(
                f"| {_md(' & '.join(pair['annotators']))} | {pair['items']} | "
                f"{100 * pair['agreement']:.1f} % | {kappas[0]} | {kappas[1]} | {ids} |"
            )
    return "\n".join(lines) + "\n"


def write_score(
    root: str | Path, adjudicator: str | None = None
) -> tuple[dict[str, Any], list[Path]]:
    score = score_audit(root, adjudicator)
    layout = AuditLayout(root)
    atomic_write(layout.score_json, json.dumps(score, indent=1) + "\n")
    atomic_write(layout.score_md, score_markdown(score))
    return score, [layout.score_json, layout.score_md]


# ---------------------------------------------------------------- drop


def drop_flagged(
    root: str | Path, split_dir: str | Path, adjudicator: str | None = None
) -> tuple[list[str], SplitManifest]:
    """Remove the examples whose verdict (``VERDICT_RULE``) is anything but ok from the
    split's files; the ids removed."""
    from corpus.split import _side

    _, items = load_audit(root)
    sampled = {i.item_id for i in items}
    verdicts = item_verdicts(current_labels(root), adjudicator)
    flagged = {pid for pid, label in verdicts.items() if label != "ok" and pid in sampled}
    split = SplitLayout(split_dir)
    data = load_split(split_dir)
    manifest = SplitManifest.model_validate_json(split.manifest.read_text())
    present = {e.problem_id for e in data.sft} | {e.problem_id for e in data.rl}
    removed = sorted(flagged & present)
    sft = [e for e in data.sft if e.problem_id not in flagged]
    rl = [e for e in data.rl if e.problem_id not in flagged]
    # Rewrite only rows that stay, as the split wrote them: nothing else about a row changes.
    for path in (split.sft, split.rl):
        kept = [row for _, row in read_jsonl(path) if row.get("problem_id") not in flagged]
        atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    total = len(sft) + len(rl)
    manifest = manifest.model_copy(
        update={
            "sft": _side(sft, sorted({e.video_id for e in sft})),
            "rl": _side(rl, sorted({e.video_id for e in rl})),  # type: ignore[arg-type]
            "sft_share": len(sft) / total if total else 0.0,
            "open_ended_below_full_reward": [
                pid for pid in manifest.open_ended_below_full_reward if pid not in flagged
            ],
        }
    )
    atomic_write(split.manifest, manifest.model_dump_json(indent=1) + "\n")
    atomic_write(
        AuditLayout(root).dropped,
        json.dumps({"split": str(split_dir), "removed": removed}, indent=1) + "\n",
    )
    return removed, manifest
