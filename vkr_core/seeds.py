"""The seed-example bank: expert examples shown to the generator, 3 per round.

Seeds come from two places: those a skill's plugin ships (``SkillSpec.seeds``, usually read
with :func:`read_seeds` from a jsonl file beside the plugin) and a user's own bank, given with
``--seed-bank``. For each skill a run uses the user's bank when it holds examples of that
skill, and the plugin's seeds otherwise.

Format: jsonl, one SeedExample per line with the fields discipline, subject, skill (the name
of a registered skill), question, options (list of "A. ..." strings, or null for
open-ended), answer (the letter for multiple choice, a short text otherwise), reasoning,
and optionally sampling (``{"fps": 0.2, "max_frames": 64}``: the frames the reasoning's
timestamps were cited on; `vkr seeds export` writes it).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from vkr_core.errors import describe_validation_error
from vkr_core.log import get_logger
from vkr_core.schemas import InputError, SeedExample

if TYPE_CHECKING:
    from vkr_core.plugins import Registry

log = get_logger("vkr.seeds")


def read_seeds(path: str | Path, skills: Collection[str] | None = None) -> list[SeedExample]:
    """The examples of a jsonl seed file; a bad line is an InputError naming the file and line.

    :param skills: the registered skill names; an example of any other skill is refused.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"seed bank not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"seed bank {p} is not UTF-8 text") from None
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = SeedExample.model_validate(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"seed bank {p} line {number} is not JSON: {exc.msg}") from None
        except ValidationError as exc:
            raise InputError(
                f"seed bank {p} line {number}: {describe_validation_error(exc)}"
            ) from None
        if skills is not None and example.skill not in skills:
            raise InputError(
                f"seed bank {p} line {number}: skill {example.skill!r} is not a registered "
                f"skill (registered: {', '.join(sorted(skills)) or 'none'}); install the plugin "
                "that provides it or correct the name"
            )
        examples.append(example)
    return examples


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
    def load(cls, path: str | Path, skills: Collection[str] | None = None) -> SeedBank:
        """A bank of the examples in a jsonl file (see :func:`read_seeds`)."""
        return cls(read_seeds(path, skills), str(path))

    @classmethod
    def for_run(
        cls, registry: Registry, skills: Sequence[str], path: str | Path | None = None
    ) -> SeedBank:
        """The bank a run uses for ``skills``: per skill, the examples ``path`` holds, else
        the seeds its plugin ships. A skill with neither is an InputError saying how to add some.
        """
        own: dict[str, list[SeedExample]] = defaultdict(list)
        if path is not None:
            from_file = read_seeds(path, set(registry.skills))
            if not from_file:
                raise InputError(f"seed bank {path} is empty: it needs examples for each skill")
            for example in from_file:
                own[example.skill].append(example)
        examples: list[SeedExample] = []
        missing: list[str] = []
        for name in skills:
            chosen = own.get(name) or list(registry.get("skill", name).seeds)
            if not chosen:
                missing.append(name)
            examples.extend(chosen)
        if missing:
            named = ", ".join(
                f"{name!r} (plugin {registry.owners.get(('skill', name), '?')!r})"
                for name in missing
            )
            one = len(missing) == 1
            rest = [name for name in skills if name not in missing]
            raise InputError(
                f"skill{'' if one else 's'} {named} {'has' if one else 'have'} no seed examples: "
                f"{'its plugin ships' if one else 'their plugins ship'} none"
                + (f" and seed bank {path} has none" if path is not None else "")
                + '; write some to a jsonl seed bank (one example per line with "skill": '
                "the skill's name; see the README's \"Seed examples\") and pass it with "
                "--seed-bank FILE"
                + (
                    f", or leave {'it' if one else 'them'} out with --skills {','.join(rest)}"
                    if rest
                    else ""
                )
            )
        source = "the skills' own seeds" if path is None else f"{path} and the skills' own seeds"
        return cls(examples, source)

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
