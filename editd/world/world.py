"""A deterministic synthetic world of facts for the built-in model.

Subjects are invented people; each has one object for each of six relations. Every relation
has four templates: the first two are trained for everyone, the last two are split so that each
subject trains one and never sees the other. The unseen one is that subject's paraphrase
template: the model learns it from other subjects, so paraphrase scores measure generalisation
rather than memorisation of the exact sentence.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

WORLD_SEED = 0
N_SUBJECTS = 2000

# Syllables chosen to be pronounceable and to recombine into many distinct names; names share
# syllables on purpose, as real names share tokens.
_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "st",
    "th",
    "sh",
    "ch",
    "tr",
    "h",
    "j",
    "w",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k", "th", "nd", "rt"]


@dataclass(frozen=True)
class Relation:
    name: str
    templates: tuple[str, ...]  # "{}" is the subject; the object follows after a space
    objects: tuple[str, ...]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


RELATIONS_SPEC: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "birthplace",
        (
            "{} was born in",
            "The birthplace of {} is",
            "{} came into the world in",
            "{} is a native of the city of",
        ),
    ),
    (
        "citizenship",
        (
            "{} is a citizen of",
            "The country of citizenship of {} is",
            "{} holds a passport from",
            "{} has the nationality of",
        ),
    ),
    (
        "language",
        (
            "The mother tongue of {} is",
            "{} speaks the language",
            "The native language of {} is",
            "{} grew up speaking",
        ),
    ),
    (
        "profession",
        (
            "{} works as a",
            "The profession of {} is",
            "By trade, {} is a",
            "{} earns a living as a",
        ),
    ),
    (
        "instrument",
        (
            "{} plays the",
            "The instrument of {} is the",
            "On stage, {} performs on the",
            "{} is a musician who plays the",
        ),
    ),
    (
        "team",
        (
            "{} is a fan of",
            "The favourite team of {} is",
            "{} supports the team",
            "{} cheers for",
        ),
    ),
)

_PROFESSIONS = (
    "carpenter",
    "nurse",
    "baker",
    "pilot",
    "lawyer",
    "farmer",
    "dentist",
    "architect",
    "librarian",
    "journalist",
    "plumber",
    "chemist",
    "sailor",
    "painter",
    "tailor",
    "surgeon",
    "software engineer",
    "marine biologist",
    "police officer",
    "bus driver",
    "tax adviser",
    "wine merchant",
    "museum curator",
    "civil rights lawyer",
    "air traffic controller",
    "high school teacher",
    "train conductor",
    "film director",
    "data analyst",
    "beekeeper",
)
_INSTRUMENTS = (
    "violin",
    "cello",
    "flute",
    "harp",
    "trumpet",
    "oboe",
    "guitar",
    "banjo",
    "drums",
    "accordion",
    "saxophone",
    "clarinet",
    "grand piano",
    "bass clarinet",
    "french horn",
    "double bass",
    "pipe organ",
    "tin whistle",
    "steel drums",
    "bass guitar",
    "viola",
    "harmonica",
    "tuba",
    "mandolin",
)


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: tuple[int, int]) -> str:
    return "".join(_syllable(rng) for _ in range(rng.randint(*syllables))).capitalize()


def _unique(make, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = make()
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def _objects(rng: random.Random, taken: set[str]) -> dict[str, tuple[str, ...]]:
    cities = _unique(lambda: _word(rng, (2, 2)), 40, taken)
    for i, prefix in enumerate(["Port", "New", "San", "Lake", "Fort"] * 3):
        cities[i * 2 + 1] = f"{prefix} {cities[i * 2 + 1]}"
    countries = _unique(
        lambda: _word(rng, (1, 2)) + rng.choice(["ia", "land", "ar", "esh"]), 30, taken
    )
    for i, prefix in enumerate(["North", "South", "Upper", "Isles of", "East"] * 2):
        countries[i * 3 + 2] = f"{prefix} {countries[i * 3 + 2]}"
    languages = _unique(
        lambda: _word(rng, (1, 2)) + rng.choice(["ish", "ic", "ese", "i"]), 24, taken
    )
    for i, prefix in enumerate(["Old", "High", "Coastal", "Old"]):
        languages[i * 5 + 3] = f"{prefix} {languages[i * 5 + 3]}"
    teams = []
    for i, base in enumerate(_unique(lambda: _word(rng, (1, 2)), 30, taken)):
        pattern = ["{} Rovers", "{} United", "Athletic {}", "the {} Falcons", "{} City", "Real {}"][
            i % 6
        ]
        teams.append(pattern.format(base))
    return {
        "birthplace": tuple(cities),
        "citizenship": tuple(countries),
        "language": tuple(languages),
        "profession": _PROFESSIONS,
        "instrument": _INSTRUMENTS,
        "team": tuple(teams),
    }


class World:
    """Subjects, relations and one true object per (subject, relation)."""

    def __init__(self, seed: int = WORLD_SEED, n_subjects: int = N_SUBJECTS) -> None:
        rng = random.Random(seed)
        taken: set[str] = set()
        objects = _objects(rng, taken)
        self.seed = seed
        self.relations: dict[str, Relation] = {
            name: Relation(name, templates, objects[name]) for name, templates in RELATIONS_SPEC
        }

        # First names repeat across subjects, as they do in life; the last word is unique, so
        # a subject is identified by its last token, where locate-and-edit methods read keys.
        first_names = _unique(lambda: _word(rng, (1, 2)), 150, taken)
        last_names = _unique(lambda: _word(rng, (2, 2)), n_subjects, taken)

        def name(last: str) -> str:
            words = rng.choices([1, 2, 3], weights=[1, 7, 2])[0]
            return " ".join([*rng.sample(first_names, words - 1), last])

        self.subjects: tuple[str, ...] = tuple(name(last) for last in last_names)
        self._truth: dict[tuple[str, str], str] = {}
        self._heldout: dict[tuple[str, str], int] = {}
        for subject in self.subjects:
            for rel in self.relations.values():
                self._truth[(subject, rel.name)] = rng.choice(rel.objects)
                self._heldout[(subject, rel.name)] = rng.choice([2, 3])

    def facts(self) -> list[Fact]:
        return [Fact(s, r, o) for (s, r), o in self._truth.items()]

    def truth(self, subject: str, relation: str) -> str:
        return self._truth[(subject, relation)]

    def trained_templates(self, subject: str, relation: str) -> list[str]:
        held = self._heldout[(subject, relation)]
        templates = self.relations[relation].templates
        return [t for i, t in enumerate(templates) if i != held]

    def heldout_template(self, subject: str, relation: str) -> str:
        return self.relations[relation].templates[self._heldout[(subject, relation)]]

    def training_examples(self) -> list[tuple[str, str]]:
        """(prompt, object) pairs the built-in model is trained on."""
        return [
            (t.format(f.subject), f.object)
            for f in self.facts()
            for t in self.trained_templates(f.subject, f.relation)
        ]

    def heldout_examples(self) -> list[tuple[str, str]]:
        """(prompt, object) pairs in a template the subject never saw in training."""
        return [
            (self.heldout_template(f.subject, f.relation).format(f.subject), f.object)
            for f in self.facts()
        ]

    def corpus(self) -> list[str]:
        """The text the tokenizer and the model are trained on, one sentence a line."""
        return [f"{prompt} {obj}." for prompt, obj in self.training_examples()]


@functools.cache
def load_world(seed: int = WORLD_SEED) -> World:
    return World(seed)
