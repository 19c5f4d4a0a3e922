"""Sentences about orders, made from templates, each with the JSON object it should be read into; a train split and
a disjoint held-out split, fixed by a seed (:mod:`examples.templates`).

Every sentence says who ordered (a full name), from which city, what (an item, in the plural) and how many:

==============  =============================================================================================
``plain``       the fields in the order of the keys, the quantity in digits: "Anna Berg from Oslo ordered 4 lamps."
``words``       the quantity in words: "Anna Berg from Oslo bought four lamps."
``reordered``   the item and quantity first: "Four lamps were ordered by Anna Berg from Oslo."
``distractor``  another number or name beside them: "Anna Berg (31) from Oslo ordered 4 lamps for Tom."
==============  =============================================================================================

The answer is always ``{"name": "Anna Berg", "city": "Oslo", "item": "lamp", "quantity": 4}``: the item in the
singular, the quantity a number. It is for the reward only; the model never sees it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from examples import templates

Split = templates.Split
SPLITS = templates.SPLITS
FAMILIES = ("plain", "words", "reordered", "distractor")
DEFAULT_SEED = 0
KEYS = ("name", "city", "item", "quantity")

NAMES = (
    "Anna Berg", "Bruno Costa", "Clara Weiss", "David Okafor", "Elena Petrova", "Farid Haddad", "Greta Lund",
    "Hiro Tanaka", "Ines Moreau", "Jakob Novak", "Kira Sato", "Luca Romano", "Maya Cohen", "Nils Berger",
    "Olga Ivanova", "Pedro Alves", "Rita Kovacs", "Sami Laine", "Tara Singh", "Ugo Ferri", "Vera Holm",
    "Wim de Vries", "Yara Nasser", "Zane Miller", "Alma Ruiz", "Boris Klein", "Celia Duarte", "Dario Conti",
    "Eva Lindgren", "Femi Adeyemi",
)  # fmt: skip
CITIES = (
    "Oslo", "Lyon", "Porto", "Turin", "Krakow", "Ghent", "Malmo", "Bilbao", "Leeds", "Graz", "Utrecht", "Bergen",
    "Seville", "Dresden", "Nantes", "Aarhus", "Split", "Brno", "Cork", "Basel", "Tampere", "Riga", "Genoa", "Lille",
)  # fmt: skip
FRIENDS = ("Tom", "Sara", "Ali", "Mia", "Leo", "Ana", "Max", "Ida", "Ben", "Zoe", "Omar", "Lily")
ITEMS = (
    "lamp", "chair", "kettle", "towel", "candle", "basket", "mirror", "blanket", "notebook", "pillow", "bottle",
    "helmet", "jacket", "wallet", "teapot", "backpack", "umbrella", "scarf", "glove", "cup", "plate", "spoon",
    "bucket", "clock",
)  # fmt: skip
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


class Item(str):
    """An item's name; ``{item:s}`` writes it in the plural."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        if spec == "s":
            return self[:-1] + "ves" if self.endswith("f") else self + "s"
        return super().__format__(spec)


class Quantity(int):
    """A quantity; ``{quantity:w}`` writes it in words, ``{quantity:W}`` capitalized."""

    def __format__(self, spec: str) -> str:
        if spec in ("w", "W"):
            word = WORDS[self]
            return word.capitalize() if spec == "W" else word
        return super().__format__(spec)


VALUES: dict[str, tuple[object, ...]] = {
    "name": NAMES,
    "city": CITIES,
    "item": tuple(Item(i) for i in ITEMS),
    "quantity": tuple(Quantity(q) for q in range(2, 13)),
    "age": tuple(range(21, 80)),
    "friend": FRIENDS,
}


@dataclass(frozen=True)
class Template:
    """One kind of sentence: several phrasings with the same slots."""

    name: str
    family: str
    phrasings: tuple[str, ...]

    @property
    def slots(self) -> tuple[str, ...]:
        return templates.slots(self.phrasings[0])


@dataclass(frozen=True)
class Task:
    """One sentence to read; ``answer`` is what the reward compares against, never shown to the model."""

    id: str
    question: str
    answer: dict[str, Any]
    family: str
    template: str
    split: Split


TEMPLATES: tuple[Template, ...] = (
    Template(
        "ordered",
        "plain",
        (
            "{name} from {city} ordered {quantity} {item:s}.",
            "{name} of {city} placed an order for {quantity} {item:s}.",
            "{name}, who lives in {city}, ordered {quantity} {item:s}.",
        ),
    ),
    Template(
        "bought",
        "plain",
        (
            "{name} in {city} bought {quantity} {item:s}.",
            "{name} from {city} purchased {quantity} {item:s} online.",
            "Customer {name} ({city}) bought {quantity} {item:s}.",
        ),
    ),
    Template(
        "ordered_in_words",
        "words",
        (
            "{name} from {city} ordered {quantity:w} {item:s}.",
            "{name} of {city} placed an order for {quantity:w} {item:s}.",
            "{name}, who lives in {city}, ordered {quantity:w} {item:s}.",
        ),
    ),
    Template(
        "bought_in_words",
        "words",
        (
            "{name} in {city} bought {quantity:w} {item:s}.",
            "{name} from {city} purchased {quantity:w} {item:s} online.",
            "Customer {name} ({city}) bought {quantity:w} {item:s}.",
        ),
    ),
    Template(
        "passive",
        "reordered",
        (
            "{quantity:W} {item:s} were ordered by {name} from {city}.",
            "{quantity} {item:s} were bought by {name} in {city}.",
            "{quantity:W} {item:s} are on their way to {city}, ordered by {name}.",
        ),
    ),
    Template(
        "city_first",
        "reordered",
        (
            "In {city}, {name} ordered {quantity} {item:s}.",
            "From {city}: an order of {quantity} {item:s} by {name}.",
            "A customer in {city}, {name}, bought {quantity:w} {item:s}.",
        ),
    ),
    Template(
        "with_age",
        "distractor",
        (
            "{name} ({age}) from {city} ordered {quantity} {item:s}.",
            "{name}, aged {age}, of {city} bought {quantity} {item:s}.",
            "{name} from {city}, {age} years old, ordered {quantity:w} {item:s}.",
        ),
    ),
    Template(
        "as_a_gift",
        "distractor",
        (
            "{name} from {city} ordered {quantity} {item:s} as a gift for {friend}.",
            "For {friend}'s birthday, {name} of {city} bought {quantity} {item:s}.",
            "{name} in {city} ordered {quantity:w} {item:s} for {friend}.",
        ),
    ),
)

# The order sentences cycle through families.
FAMILY_CYCLE = FAMILIES
GENERATOR = templates.Generator("extraction", TEMPLATES, FAMILY_CYCLE, VALUES)


def answer(values: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object a sentence with these slot values should be read into."""
    return {
        "name": values["name"],
        "city": values["city"],
        "item": str(values["item"]),
        "quantity": int(values["quantity"]),
    }


def questions(split: Split, n: int, seed: int = DEFAULT_SEED) -> list[Task]:
    """``n`` sentences of ``split``, cycling through the families and, within a family, its templates."""
    return [
        Task(f"{split}-{i}", sentence, answer(values), template.family, template.name, split)
        for i, (template, values, sentence) in enumerate(GENERATOR.draw(split, n, seed))
    ]


def find(sentence: str) -> Task | None:
    """The task a sentence was made from, or None: how a judge that sees only the recorded call (a reward hook)
    recovers the answer. Works for both splits, any seed."""
    found = GENERATOR.match(sentence)
    if found is None:
        return None
    template, values, split = found
    task_id = f"{template.name}:" + ",".join(f"{s}={v}" for s, v in values.items())
    return Task(task_id, sentence, answer(values), template.family, template.name, split)
