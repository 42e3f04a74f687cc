"""The seed-example bank: expert examples shown to the generator, 3 per round.

Format: jsonl, one SeedExample per line with the fields discipline, subject, skill
(VidR | KnowVid | KnowVidR), question, options (list of "A. ..." strings, or null for
open-ended), answer (the letter for multiple choice, a short text otherwise), reasoning.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

from pydantic import ValidationError

from vkr_core.log import get_logger
from vkr_core.schemas import InputError, SeedExample

log = get_logger("vkr.seeds")

DEFAULT_SEED_BANK = (
    Path(__file__).resolve().parent.parent / "plugins" / "skills" / "seed_bank.jsonl"
)


class SeedBank:
    def __init__(self, examples: list[SeedExample], source: str = "<memory>"):
        if not examples:
            raise InputError(f"seed bank {source} is empty: it needs examples for each skill")
        self.source = source
        self.examples = examples
        self._by_key: dict[tuple[str, str], list[SeedExample]] = defaultdict(list)
        self._by_skill: dict[str, list[SeedExample]] = defaultdict(list)
        for ex in examples:
            self._by_key[(ex.discipline.lower(), ex.skill)].append(ex)
            self._by_skill[ex.skill].append(ex)
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def load(cls, path: str | Path | None = None) -> SeedBank:
        p = Path(path) if path else DEFAULT_SEED_BANK
        if not p.is_file():
            raise InputError(f"seed bank not found: {p}")
        examples = []
        for number, line in enumerate(p.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                examples.append(SeedExample.model_validate(json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"seed bank {p} line {number} is not JSON: {exc.msg}") from None
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(x) for x in err["loc"])
                raise InputError(f"seed bank {p} line {number}: {where}: {err['msg']}") from None
        return cls(examples, str(p))

    def skills(self) -> set[str]:
        return set(self._by_skill)

    def pick(self, discipline: str, skill: str, k: int, rng: random.Random) -> list[SeedExample]:
        """k seeds of the same discipline and skill; other disciplines only when too few."""
        same = self._by_key.get((discipline.lower(), skill), [])
        if len(same) >= k:
            return rng.sample(same, k)
        pool = self._by_skill.get(skill, [])
        if not pool:
            raise InputError(f"seed bank {self.source} has no {skill} examples")
        if (discipline, skill) not in self._warned:
            self._warned.add((discipline, skill))
            log.warning(
                "few seeds for discipline; filling from other disciplines",
                discipline=discipline,
                skill=skill,
                have=len(same),
                want=k,
            )
        others = [ex for ex in pool if ex not in same]
        return same + rng.sample(others, min(k - len(same), len(others)))
