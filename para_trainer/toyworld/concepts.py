"""Held-out concepts: subjects whose look no caption of the world can produce.

Each is drawn from parts the world never combines (a face, a ribbon, an emblem, a robot's head, a duck's beak),
in any scene, position and size, with a main colour that prompts may change ("a blue sks toy"). They are what
personalization learns: a training set of a few renders with DreamBooth captions ("a photo of sks toy"), and
unlimited fresh renders to score samples against. Their class noun is the world's generic "toy".
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import render as R
from .world import BACKGROUNDS, COLOURS, GENERIC_NOUN, POSITIONS, SIZES, Scene, WorldError, check_value

_YELLOW, _GREY, _DARK, _WHITE = (250, 215, 55), (185, 190, 200), (30, 30, 35), (250, 250, 250)


def _second(colour: str, preferred: tuple, fallback: tuple) -> tuple:
    """A contrasting colour: ``preferred`` unless the main colour is too close to it."""
    main = np.array(COLOURS[colour])
    return fallback if np.abs(main - np.array(preferred)).sum() < 120 else preferred


def draw_smiley_ball(canvas: R.Canvas, colour: str, cx, cy, r, rng: np.random.Generator) -> None:
    """A ball with slanted stripes of two colours and a smiling face."""
    main = COLOURS[colour]
    second = _second(colour, _YELLOW, (60, 90, 220))
    tilt = int(rng.integers(-2, 3))
    band = ((R.Y - cy) * 4 + (R.X - cx) * tilt) // (4 * max(R.UNIT * 2, r // 3))
    surface = np.where((band % 2 == 0)[:, :, None], np.asarray(main, np.int32), np.asarray(second, np.int32))
    mask = R.disc(cx, cy, r)
    R.paint_object(canvas, mask, np.broadcast_to(surface, (R.GRID, R.GRID, 3)), main)
    look = int(rng.integers(-r // 6, r // 6 + 1))
    for ex in (cx + look - r // 3, cx + look + r // 3):
        canvas.paint(R.disc(ex, cy - r // 4, max(R.UNIT, r // 7)), _DARK)
    mx, my = cx + look, cy + r // 8
    outer, inner = r // 2, r // 2 - max(R.UNIT, r // 8)
    d2 = (R.X - mx) ** 2 + (R.Y - my) ** 2
    canvas.paint((R.Y > my) & (d2 <= outer * outer) & (d2 >= inner * inner), _DARK)


def draw_robot(canvas: R.Canvas, colour: str, cx, cy, r, rng: np.random.Generator) -> None:
    """A robot: a body in the main colour, a grey head with yellow eyes, an antenna with a red tip, arms, legs."""
    main = COLOURS[colour]
    tip = _second(colour, (230, 40, 40), (60, 90, 220))
    lean = int(rng.integers(-1, 2)) * r // 16
    legs_top, body_top, head_top, bottom = cy + r * 55 // 100, cy - r * 15 // 100, cy - r * 70 // 100, cy + r
    for side in (-1, 1):
        leg_x = cx + side * r * 28 // 100
        canvas.paint(R.rect(leg_x - r // 9, legs_top, leg_x + r // 9, bottom), (70, 70, 80))
        arm_x = cx + side * r * 70 // 100
        canvas.paint(R.rect(min(arm_x, arm_x - side * r // 6), body_top + r // 10,
                            max(arm_x, arm_x - side * r // 6), body_top + r * 55 // 100), _GREY)
    body = R.rect(cx - r * 55 // 100, body_top, cx + r * 55 // 100, legs_top)
    R.paint_object(canvas, body, R.lit(main, cy, r), main)
    canvas.paint(R.rect(cx - r // 5, body_top + r // 6, cx + r // 5, body_top + r * 40 // 100), R.tint(main, 55))
    hx = cx + lean
    canvas.paint(R.rect(hx - r // 30 - R.UNIT // 2, cy - r, hx + R.UNIT // 2, head_top), (70, 70, 80))
    canvas.paint(R.disc(hx, cy - r + r // 12, max(R.UNIT, r // 8)), tip)
    head = R.rect(hx - r * 40 // 100, head_top, hx + r * 40 // 100, body_top)
    R.paint_object(canvas, head, R.lit(_GREY, cy, r), _GREY)
    for side in (-1, 1):
        ex = hx + side * r * 18 // 100
        canvas.paint(R.rect(ex - r // 10, head_top + r // 7, ex + r // 10, head_top + r * 33 // 100), _YELLOW)


def draw_emblem_star(canvas: R.Canvas, colour: str, cx, cy, r, rng: np.random.Generator) -> None:
    """A star with a round emblem in its middle: a disc of a contrasting colour around a white dot."""
    main = COLOURS[colour]
    emblem = _second(colour, (40, 80, 200), (220, 40, 40))
    cy = cy + r // 10
    spin = int(rng.integers(-1, 2))
    points = R.star_points(cx, cy, r, inner_percent=50)
    points = [(x + spin * (y - cy) // 12, y) for x, y in points]
    R.paint_object(canvas, R.polygon(points), R.lit(main, cy, r), main)
    R.paint_object(canvas, R.disc(cx, cy, r * 34 // 100), R.lit(emblem, cy, r), emblem)
    canvas.paint(R.disc(cx, cy, r * 13 // 100), _WHITE)


def draw_gift_box(canvas: R.Canvas, colour: str, cx, cy, r, rng: np.random.Generator) -> None:
    """A box wrapped in a ribbon of a contrasting colour, with a bow on top."""
    main = COLOURS[colour]
    ribbon = _second(colour, _YELLOW, (220, 40, 40))
    a, o = r * 78 // 100, r * 26 // 100
    cy = cy + r // 10
    front = R.polygon([(cx - a, cy - a + o), (cx + a - o, cy - a + o), (cx + a - o, cy + a), (cx - a, cy + a)])
    top = R.polygon([(cx - a, cy - a + o), (cx - a + o, cy - a), (cx + a, cy - a), (cx + a - o, cy - a + o)])
    side = R.polygon([(cx + a - o, cy - a + o), (cx + a, cy - a), (cx + a, cy + a - o), (cx + a - o, cy + a)])
    whole = front | top | side
    canvas.paint(whole, R.lit(main, cy, r))
    canvas.paint(top, R.lit(R.tint(main, 25), cy, r))
    canvas.paint(side, R.lit(R.shade(main, 72), cy, r))
    band = max(R.UNIT, r // 7)
    mid = cx - o // 2
    canvas.paint(whole & (np.abs(R.X - mid) <= band), ribbon)
    canvas.paint(front & (np.abs(R.Y - (cy + o // 2)) <= band), ribbon)
    R.paint_edges(canvas, whole, [top, side], main)
    bow_y = cy - a - r // 10
    lean = int(rng.integers(-1, 2)) * r // 12
    for side_sign in (-1, 1):
        canvas.paint(R.ellipse(mid + lean + side_sign * r // 5, bow_y, r // 5, r // 8), ribbon)
    canvas.paint(R.disc(mid + lean, bow_y, r // 10), R.shade(ribbon, 70))


def draw_duck(canvas: R.Canvas, colour: str, cx, cy, r, rng: np.random.Generator) -> None:
    """A rubber duck: a round body and head in the main colour, an orange beak, a black eye, a darker wing."""
    main = COLOURS[colour]
    beak = _second(colour, (245, 125, 25), (220, 40, 40))
    facing = 1 if rng.integers(0, 2) else -1

    def x(offset):
        return cx + facing * offset

    body = R.ellipse(x(-r // 10), cy + r * 35 // 100, r * 85 // 100, r * 55 // 100)
    head = R.disc(x(r * 30 // 100), cy - r * 35 // 100, r * 42 // 100)
    R.paint_object(canvas, body | head, R.lit(main, cy, r), main)
    canvas.paint(R.ellipse(x(-r * 25 // 100), cy + r * 35 // 100, r * 38 // 100, r * 22 // 100), R.shade(main, 80))
    tip = x(r * 95 // 100)
    beak_points = [(x(r * 62 // 100), cy - r * 45 // 100), (tip, cy - r * 30 // 100), (x(r * 62 // 100), cy - r * 15 // 100)]
    canvas.paint(R.polygon(beak_points), beak)
    canvas.paint(R.disc(x(r * 38 // 100), cy - r * 45 // 100, max(R.UNIT, r // 10)), _DARK)


@dataclass(frozen=True)
class Concept:
    name: str
    default_colour: str
    description: str
    draw: Callable
    class_noun: str = GENERIC_NOUN


CONCEPTS = {c.name: c for c in (
    Concept("smiley-ball", "red", "a ball with slanted two-colour stripes and a smiling face", draw_smiley_ball),
    Concept("robot", "blue", "a robot with a coloured body, a grey head, yellow eyes and an antenna", draw_robot),
    Concept("emblem-star", "yellow", "a star with a round emblem of a contrasting colour", draw_emblem_star),
    Concept("gift-box", "green", "a box wrapped in a ribbon with a bow", draw_gift_box),
    Concept("duck", "yellow", "a rubber duck with an orange beak", draw_duck),
)}

# Where a concept's training photos are taken: indoors, mostly large and near the centre, so that moving it
# to the beach, the snow or a corner is something a model has to generalise to.
TRAINING_SCENES = (
    ("wall", "center", "large"),
    ("wooden floor", "center", "large"),
    ("wall", "bottom left", "large"),
    ("wooden floor", "bottom right", "small"),
    ("wall", "center", "small"),
)
IDENTIFIER = "sks"


def get_concept(name: str) -> Concept:
    if name not in CONCEPTS:
        import difflib

        close = difflib.get_close_matches(name, list(CONCEPTS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise WorldError(f"unknown concept {name!r}{hint}; valid: {', '.join(CONCEPTS)}")
    return CONCEPTS[name]


def concept_scene(name: str, background: str, position: str, size: str, colour: str | None = None,
                  variant: int = 0) -> Scene:
    concept = get_concept(name)
    return Scene(name, check_value("colour", colour or concept.default_colour), "plain",
                 check_value("background", background), check_value("position", position),
                 check_value("size", size), variant)


def training_scenes(name: str, count: int = 5, seed: int = 0) -> list[Scene]:
    """The concept's training photos (at most ``len(TRAINING_SCENES)``)."""
    rng = random.Random(f"{name}/{seed}")
    return [concept_scene(name, bg, pos, size, variant=rng.randrange(1 << 30))
            for bg, pos, size in TRAINING_SCENES[:count]]


def random_concept_scene(name: str, rng: random.Random, **fixed) -> Scene:
    """A fresh render of the concept in a random scene (``fixed`` pins background/position/size/colour)."""
    values = {"background": rng.choice(BACKGROUNDS), "position": rng.choice(POSITIONS), "size": rng.choice(SIZES),
              "colour": None}
    values.update({k: v for k, v in fixed.items() if v is not None})
    return concept_scene(name, values["background"], values["position"], values["size"], values["colour"],
                         rng.randrange(1 << 30))


def dreambooth_caption(name: str) -> str:
    return f"a photo of {IDENTIFIER} {get_concept(name).class_noun}"
