"""What the examples' question generators share: templates with slots, a seeded train/held-out split, and
reading a question back into its template and slot values.

A template has a name, a family (what answering it needs) and several phrasings of one question with slots in
braces (``"Which customers live in {city}?"``, ``"{name} ordered {quantity:w} {item:s}."``: a format spec after
the colon, passed to the value's ``__format__``). Every slot draws its value from a pool.

The split keeps the two sets of questions apart: every pool is cut in two by the seed (about a third held out, and
never used in training) and one phrasing of every template is kept for held-out questions only (held-out
questions use all). Every template has a slot, so no held-out question text is ever a training question. Questions
cycle through the families in a fixed order and, within a family, through its templates; a longer list starts
with the shorter one. :meth:`Generator.match` turns a question back into its template and values, which is how
a judge that sees only a recorded call recovers the reference answer.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Generic, Literal, Protocol, TypeVar

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")
HELDOUT_FRACTION = 1 / 3  # of each value pool


class Template(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def family(self) -> str: ...
    @property
    def phrasings(self) -> tuple[str, ...]: ...
    @property
    def slots(self) -> tuple[str, ...]: ...


TemplateT = TypeVar("TemplateT", bound=Template)


def slots(text: str) -> tuple[str, ...]:
    """The slot names in ``text`` (``{name}``, ``{name:spec}``), in order, each once."""
    return tuple(dict.fromkeys(field for _, field, _, _ in string.Formatter().parse(text) if field))


@dataclass(frozen=True)
class Generator(Generic[TemplateT]):
    """An example's questions: its ``templates``, asked family by family in the order of ``cycle``, with slot
    values from ``values``. ``name`` (the example's) and the seed fix every draw."""

    name: str
    templates: tuple[TemplateT, ...]
    cycle: tuple[str, ...]
    values: Mapping[str, tuple[object, ...]]

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.cycle))

    def pools(self, split: Split, seed: int) -> dict[str, tuple[object, ...]]:
        """The values each slot takes in ``split``: about a third of every pool is held out, the rest trains."""
        pools = {}
        for slot, values in self.values.items():
            shuffled = list(values)
            random.Random(f"{self.name}-values:{seed}:{slot}").shuffle(shuffled)
            cut = max(1, round(len(shuffled) * HELDOUT_FRACTION))
            pools[slot] = tuple(shuffled[:cut] if split == "heldout" else shuffled[cut:])
        return pools

    def phrasings(self, template: TemplateT, split: Split, seed: int) -> tuple[str, ...]:
        """The phrasings ``split`` uses: training lacks one (chosen by the seed), held out uses all."""
        if split == "heldout":
            return template.phrasings
        kept = random.Random(f"{self.name}-phrasing:{seed}:{template.name}").randrange(len(template.phrasings))
        return tuple(p for i, p in enumerate(template.phrasings) if i != kept)

    def draw(self, split: Split, n: int, seed: int) -> list[tuple[TemplateT, dict[str, object], str]]:
        """``n`` questions of ``split``: each one's template, slot values and text."""
        rng = random.Random(f"{self.name}-questions:{seed}:{split}")
        pools = self.pools(split, seed)
        by_family = {family: [t for t in self.templates if t.family == family] for family in self.families}
        for family_templates in by_family.values():
            rng.shuffle(family_templates)
        drawn = []
        seen = dict.fromkeys(self.families, 0)
        for i in range(n):
            family = self.cycle[i % len(self.cycle)]
            family_templates = by_family[family]
            template = family_templates[seen[family] % len(family_templates)]
            seen[family] += 1
            values = {slot: rng.choice(pools[slot]) for slot in template.slots}
            drawn.append((template, values, rng.choice(self.phrasings(template, split, seed)).format(**values)))
        return drawn

    def match(self, question: str) -> tuple[TemplateT, dict[str, object], Split] | None:
        """The template, slot values and split (by the default seed's pools) a question was made from, or None."""
        for template, phrasing, specs in self._patterns:
            found = phrasing.fullmatch(question.strip())
            if found is None:
                continue
            values = {}
            for slot, text in found.groupdict().items():
                value = next((v for v in self.values[slot] if format(v, specs[slot]) == text), None)
                if value is None:
                    break
                values[slot] = value
            else:
                train = self.pools("train", 0)
                split: Split = "train" if all(values[s] in train[s] for s in values) else "heldout"
                return template, values, split
        return None

    @cached_property
    def _patterns(self) -> tuple[tuple[TemplateT, re.Pattern[str], dict[str, str]], ...]:
        return tuple((t, *_pattern(p)) for t in self.templates for p in t.phrasings)


def _pattern(phrasing: str) -> tuple[re.Pattern[str], dict[str, str]]:
    """A regular expression matching the questions made from ``phrasing``, a named group per slot, and each
    slot's format spec."""
    parts, specs = [], {}
    for literal, slot, spec, _ in string.Formatter().parse(phrasing):
        parts.append(re.escape(literal))
        if slot:
            parts.append(f"(?P<{slot}>.+?)")
            specs[slot] = spec or ""
    return re.compile("".join(parts)), specs
