"""Rendered image sets: scenes drawn from a seed, rendered in parallel, kept as NumPy arrays in chunk files.

A set is ``(images uint8 N x 64 x 64 x 3, scenes)``; chunks already on disk are reused, so an interrupted
render picks up where it stopped. Scene lists depend only on (name, seed, count), never on the machine.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .concepts import CONCEPTS, random_concept_scene
from .render import render
from .world import COLOURS, HELD_OUT_PAIRS, Scene, random_scene, scene_from_attributes

CHUNK = 5000


def world_scenes(count: int, seed: int, allow_held_out: bool = False) -> list[Scene]:
    rng = random.Random(f"world/{seed}")
    return [random_scene(rng, allow_held_out) for _ in range(count)]


def held_out_pair_scenes(count: int, seed: int) -> list[Scene]:
    """Scenes of the shape x background pairs that pretraining never sees (other attributes at random)."""
    rng = random.Random(f"held-out/{seed}")
    scenes = []
    for i in range(count):
        shape, bg = HELD_OUT_PAIRS[i % len(HELD_OUT_PAIRS)]
        scenes.append(scene_from_attributes(shape, rng, background=bg))
    return scenes


def concept_scenes(count: int, seed: int, default_colour_rate: float = 0.5) -> list[Scene]:
    """Fresh renders of every concept in turn, in its own colour half of the time and any colour otherwise."""
    rng = random.Random(f"concepts/{seed}")
    names = list(CONCEPTS)
    scenes = []
    for i in range(count):
        colour = None if rng.random() < default_colour_rate else rng.choice(tuple(COLOURS))
        scenes.append(random_concept_scene(names[i % len(names)], rng, colour=colour))
    return scenes


def render_all(scenes: list[Scene], workers: int | None = None) -> np.ndarray:
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(scenes) < 64:
        return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, 64, 64, 3), np.uint8)
    with ProcessPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(render, scenes, chunksize=64)))


def scenes_to_json(scenes: list[Scene]) -> str:
    return json.dumps([asdict(s) for s in scenes])


def scenes_from_json(text: str) -> list[Scene]:
    return [Scene(**item) for item in json.loads(text)]


def rendered_set(directory, name: str, scenes: list[Scene], progress=None) -> np.ndarray:
    """The images of ``scenes``, rendered chunk by chunk into ``directory/name-NNN.npy`` (reused when present)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}-scenes.json").write_text(scenes_to_json(scenes))
    parts = []
    for index, start in enumerate(range(0, len(scenes), CHUNK)):
        path = directory / f"{name}-{index:03d}.npy"
        chunk = scenes[start:start + CHUNK]
        if path.exists():
            images = np.load(path, allow_pickle=False)
            if len(images) == len(chunk):
                parts.append(images)
                if progress:
                    progress(len(chunk))
                continue
        images = render_all(chunk)
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, images, allow_pickle=False)
        os.replace(tmp, path)
        parts.append(images)
        if progress:
            progress(len(chunk))
    return np.concatenate(parts) if parts else np.zeros((0, 64, 64, 3), np.uint8)
