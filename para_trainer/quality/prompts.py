"""The fixed prompt set of the study, per concept: what each prompt asks for and what the judge checks.

    identity   "a photo of sks toy" on its own: the subject as it was taught (fidelity, recognition, diversity)
    edit       the subject moved to another background, corner or size, or given another colour: is the edit
               applied (the prompt's attribute found: the CLIP-T role) and is the subject still there?
    class      the class noun without the identifier ("a photo of a toy on the beach") and world prompts naming a
               shape: does the subject leak in, and does the model still draw what the prompt says (drift)?
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..toyworld.concepts import IDENTIFIER, get_concept
from ..toyworld.world import COLOURS, compose, object_phrase

IDENTITY_SEEDS = 4  # samples of the identity prompt (diversity is measured across them)
EDIT_SEEDS = 2
CLASS_SEEDS = 2
SINGLE_IMAGE_SEEDS = 4  # single-image editing: every prompt over 4 noise seeds (is the result the same?)
TASKS = ("subject", "single-image")


@dataclass(frozen=True)
class Prompt:
    text: str
    kind: str  # "identity", "edit", "class"
    checks: dict = field(default_factory=dict)  # attribute -> value the judge should find ("object" too)
    seed: int = 0


def _subject(name: str, size: str | None = None, colour: str | None = None) -> str:
    concept = get_concept(name)
    return object_phrase(f"{IDENTIFIER} {concept.class_noun}", colour, None, size, article=False)


def edit_colour(name: str) -> str:
    """A colour far from the concept's own (the first of these that differs)."""
    default = get_concept(name).default_colour
    return next(c for c in ("purple", "blue", "green", "red") if c != default and c in COLOURS)


def prompt_set(name: str) -> list[Prompt]:
    """The prompts of one concept, each with its seed (seeds differ between prompts and repeats)."""
    items: list[Prompt] = []
    for s in range(IDENTITY_SEEDS):
        items.append(Prompt(compose("a photo of {object}", _subject(name), None, None), "identity",
                            {"object": name}, seed=1000 + s))
    edits = [({"background": bg}, compose("a photo of {object} {background}", _subject(name), None, bg))
             for bg in ("beach", "snow", "grass", "night")]
    edits += [({"position": "top left", "size": "small"},
               compose("a photo of {object} {position}", _subject(name, "small"), "top left", None)),
              ({"position": "bottom right", "size": "small"},
               compose("a photo of {object} {position}", _subject(name, "small"), "bottom right", None))]
    colour = edit_colour(name)
    edits.append(({"colour": colour}, compose("a photo of {object}", _subject(name, colour=colour), None, None)))
    for i, (checks, text) in enumerate(edits):
        for s in range(EDIT_SEEDS):
            items.append(Prompt(text, "edit", {"object": name, **checks}, seed=2000 + 10 * i + s))
    noun = get_concept(name).class_noun
    world = [({}, compose("a photo of {object}", f"a {noun}", None, None)),
             ({"background": "beach"}, compose("a photo of {object} {background}", f"a {noun}", None, "beach")),
             ({"object": "ball", "colour": "red", "background": "grass"},
              compose("a photo of {object} {background}", "a red ball", None, "grass")),
             ({"object": "box", "colour": "blue", "background": "snow"},
              compose("a photo of {object} {background}", "a blue box", None, "snow")),
             ({"object": "star", "colour": "yellow", "background": "wall"},
              compose("a photo of {object} {background}", "a yellow star", None, "wall"))]
    for i, (checks, text) in enumerate(world):
        for s in range(CLASS_SEEDS):
            items.append(Prompt(text, "class", checks, seed=3000 + 10 * i + s))
    return items


def single_image_prompts(name: str) -> list[Prompt]:
    """Single-image editing: the one photo's caption and three edits of it, each over the same noise seeds."""
    colour = edit_colour(name)
    texts = [("identity", {"object": name}, compose("a photo of {object}", _subject(name), None, None))]
    texts += [("edit", {"object": name, "background": bg},
               compose("a photo of {object} {background}", _subject(name), None, bg)) for bg in ("grass", "snow")]
    texts.append(("edit", {"object": name, "colour": colour},
                  compose("a photo of {object}", _subject(name, colour=colour), None, None)))
    return [Prompt(text, kind, checks, seed=4000 + s) for kind, checks, text in texts
            for s in range(SINGLE_IMAGE_SEEDS)]


def prompts_for(task: str, name: str) -> list[Prompt]:
    return single_image_prompts(name) if task == "single-image" else prompt_set(name)
