"""The toy world's vocabulary: attributes, scenes, held-out combinations and captions.

A scene is one object on one background. The object is one of the world's shapes (each with its class noun) in
one of its colours and surface patterns, at one of five positions and in one of two sizes; or one of the held-out
concepts (``concepts.py``), which no caption of the world describes. Captions are drawn from several English
templates and name a subset of the attributes, always exactly the ones drawn (``parse_caption`` reads them back).

Everything here is plain data and seeded choices; ``render.py`` turns a scene into pixels.
"""

from __future__ import annotations

import difflib
import random
import re
from dataclasses import asdict, dataclass, replace

SHAPES = ("ball", "box", "star", "heart", "moon", "pyramid")  # each name is its class noun
COLOURS = {  # name -> RGB of the lit surface
    "red": (220, 45, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 45),
    "green": (50, 175, 75),
    "blue": (45, 95, 225),
    "purple": (145, 70, 195),
    "pink": (245, 135, 195),
    "white": (245, 245, 245),
}
PATTERNS = ("plain", "striped", "dotted")
BACKGROUNDS = ("grass", "beach", "snow", "night", "wooden floor", "wall")
POSITIONS = ("center", "top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "large")
GENERIC_NOUN = "toy"  # any object of the world; also the held-out concepts' class noun

ATTRIBUTES = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "background": BACKGROUNDS,
    "position": POSITIONS,
    "size": SIZES,
}

# Shape x background pairs that pretraining never shows, so that prompts composing them test generalisation.
HELD_OUT_PAIRS = (
    ("ball", "snow"),
    ("box", "beach"),
    ("star", "wooden floor"),
    ("heart", "night"),
    ("moon", "grass"),
    ("pyramid", "wall"),
)

# Caption phrases. The first of each list is the canonical one (used for evaluation prompts).
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
PATTERN_WORDS = {"plain": ("plain",), "striped": ("striped",), "dotted": ("dotted", "polka dot")}
POSITION_PHRASES = {
    "center": ("in the center", "in the middle"),
    "top left": ("at the top left", "in the top left corner"),
    "top right": ("at the top right", "in the top right corner"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
BACKGROUND_PHRASES = {
    "grass": ("on the grass", "on a lawn", "in a meadow"),
    "beach": ("on the beach", "at the beach", "by the sea"),
    "snow": ("in the snow", "on snow", "in a snowy field"),
    "night": ("at night", "under the night sky", "in the dark night"),
    "wooden floor": ("on a wooden floor", "on the wooden floor", "on wooden planks"),
    "wall": ("in front of a plain wall", "against a plain wall", "by a plain wall"),
}
BACKGROUND_ADJECTIVES = {  # "..., snowy background"
    "grass": "grassy", "beach": "beach", "snow": "snowy", "night": "night",
    "wooden floor": "wooden floor", "wall": "plain wall",
}
TEMPLATES = (
    "a photo of {object} {position} {background}",
    "{object} {background} {position}",
    "a picture of {object} {position}, {background}",
    "{object} {position}, {background_adjective} background",
    "a photo of {object} {position}, {background_adjective} background",
    "an image of {object} {position} {background}",
)
# How often a caption names each attribute (the noun is always there; the shape's own noun is replaced by the
# generic "toy" at GENERIC_NOUN_RATE).
MENTION_RATE = {"colour": 0.9, "pattern": 0.8, "background": 0.9, "position": 0.75, "size": 0.75}
GENERIC_NOUN_RATE = 0.15


class WorldError(ValueError):
    """An unknown attribute value or concept name."""


def check_value(attribute: str, value: str, extra: tuple[str, ...] = ()) -> str:
    """``value`` if it is a valid ``attribute`` value; else one error listing the valid ones."""
    valid = ATTRIBUTES[attribute] + extra
    if value in valid:
        return value
    close = difflib.get_close_matches(value, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise WorldError(f"unknown {attribute} {value!r}{hint}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class Scene:
    """What one image shows. ``obj`` is a shape of the world or a held-out concept's name; ``variant`` seeds the
    small variations (exact position and size, background texture, a concept's pose)."""

    obj: str
    colour: str
    pattern: str
    background: str
    position: str
    size: str
    variant: int = 0

    def attributes(self) -> dict[str, str]:
        values = asdict(self)
        values["shape"] = values.pop("obj")
        values.pop("variant")
        return values


def is_held_out_pair(scene: Scene) -> bool:
    return (scene.obj, scene.background) in HELD_OUT_PAIRS


def random_scene(rng: random.Random, allow_held_out: bool = False) -> Scene:
    """A uniformly drawn scene of the world; held-out shape x background pairs only if ``allow_held_out``."""
    while True:
        scene = Scene(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(PATTERNS), rng.choice(BACKGROUNDS),
                      rng.choice(POSITIONS), rng.choice(SIZES), rng.randrange(1 << 30))
        if allow_held_out or not is_held_out_pair(scene):
            return scene


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def object_phrase(noun: str, colour: str | None = None, pattern: str | None = None, size: str | None = None,
                  rng: random.Random | None = None, article: bool = True) -> str:
    """"a small red striped ball": the words in English order, synonyms drawn with ``rng`` (canonical without)."""
    def pick(options):
        return rng.choice(options) if rng else options[0]

    words = []
    if size:
        words.append(pick(SIZE_WORDS[size]))
    if colour:
        words.append(colour)
    if pattern:
        words.append(pick(PATTERN_WORDS[pattern]))
    phrase = " ".join(words + [noun])
    return with_article(phrase) if article else phrase


def caption(scene: Scene, rng: random.Random, always: tuple[str, ...] = ()) -> str:
    """One caption of ``scene`` from a random template, naming a random subset of its attributes and every
    attribute in ``always`` (the draws that decide what is named are made either way, so ``always=()`` gives
    the captions the shipped model was trained on)."""
    named = {attribute: rng.random() < rate or attribute in always for attribute, rate in MENTION_RATE.items()}
    noun = GENERIC_NOUN if rng.random() < GENERIC_NOUN_RATE else scene.obj
    obj = object_phrase(noun, scene.colour if named["colour"] else None, scene.pattern if named["pattern"] else None,
                        scene.size if named["size"] else None, rng)
    return compose(rng.choice(TEMPLATES), obj, scene.position if named["position"] else None,
                   scene.background if named["background"] else None, rng)


def compose(template: str, obj: str, position: str | None, background: str | None,
            rng: random.Random | None = None) -> str:
    """Fill a template; an attribute that is None leaves its slot out (with the words that belong to it)."""
    def pick(options):
        return rng.choice(options) if rng else options[0]

    if background is None:
        template = template.replace(", {background_adjective} background", "")
        template = template.replace(", {background}", "").replace(" {background}", "")
    if position is None:
        template = template.replace(" {position}", "")
    text = template.format(object=obj, position=pick(POSITION_PHRASES[position]) if position else "",
                           background=pick(BACKGROUND_PHRASES[background]) if background else "",
                           background_adjective=BACKGROUND_ADJECTIVES.get(background, ""))
    return " ".join(text.split())


def prompt(obj: str, colour: str | None = None, pattern: str | None = None, background: str | None = None,
           position: str | None = None, size: str | None = None) -> str:
    """The canonical evaluation prompt: "a photo of a small red striped ball at the top left on the beach"."""
    for attribute, value in (("colour", colour), ("pattern", pattern), ("background", background),
                             ("position", position), ("size", size)):
        if value is not None:
            check_value(attribute, value)
    return compose(TEMPLATES[0], object_phrase(obj, colour, pattern, size), position, background)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption of the world names: {"shape": ..., "colour": ..., ...} (``shape`` may be "toy")."""
    found = {}
    padded = f" {text.replace(',', ' ').lower()} "
    for attribute, table in (("background", BACKGROUND_PHRASES), ("position", POSITION_PHRASES)):
        for value, phrases in table.items():
            if any(f" {phrase} " in padded for phrase in phrases):
                found[attribute] = value
                for phrase in phrases:
                    padded = padded.replace(f" {phrase} ", "  ")
        if attribute == "background":
            for value, adjective in BACKGROUND_ADJECTIVES.items():
                if f" {adjective} background " in padded:
                    found[attribute] = value
                    padded = padded.replace(f" {adjective} background ", "  ")
    for attribute, table in (("size", SIZE_WORDS), ("pattern", PATTERN_WORDS)):
        for value, words in table.items():
            if any(f" {word} " in padded for word in words):
                found[attribute] = value
    for colour in COLOURS:
        if f" {colour} " in padded:
            found["colour"] = colour
    for noun in SHAPES + (GENERIC_NOUN,):
        if f" {noun} " in padded:
            found["shape"] = noun
    return found


def scene_from_attributes(obj: str, rng: random.Random, **fixed: str | None) -> Scene:
    """A scene with the given attributes and the others drawn at random (``fixed`` values None are drawn too)."""
    values = {
        "colour": rng.choice(tuple(COLOURS)), "pattern": rng.choice(PATTERNS), "background": rng.choice(BACKGROUNDS),
        "position": rng.choice(POSITIONS), "size": rng.choice(SIZES),
    }
    for attribute, value in fixed.items():
        if value is not None:
            values[attribute] = check_value(attribute, value)
    return Scene(obj, variant=rng.randrange(1 << 30), **values)


def vary(scene: Scene, **changes) -> Scene:
    return replace(scene, **changes)


def vocabulary() -> list[str]:
    """Every word a caption or prompt of the world can contain: the toy model's tokenizer keeps each as one token."""
    texts = [*SHAPES, GENERIC_NOUN, *COLOURS, "sks"]
    for table in (SIZE_WORDS, PATTERN_WORDS, POSITION_PHRASES, BACKGROUND_PHRASES):
        texts += [phrase for phrases in table.values() for phrase in phrases]
    texts += list(BACKGROUND_ADJECTIVES.values()) + list(TEMPLATES)
    words = []
    for text in texts:
        for word in re.sub(r"\{\w+\}", " ", text).replace(",", " , ").split():
            if word.isalpha() or word == ",":
                words.append(word)
    return list(dict.fromkeys(words))
