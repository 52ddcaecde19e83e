"""Does a model draw the toy world? Sample prompts that name every attribute and let the judge check each one.

Prompts come in two halves: shape x background pairs that pretraining showed, and the held-out pairs it never
showed (compositional generalisation). For each attribute the score is the share of samples in which the judge
finds the prompt's value.

    para-trainer toyworld evaluate [--model builtin:toy-sd1] [--samples 240] [--out DIR] [--json]
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from .world import HELD_OUT_PAIRS, POSITIONS, SIZES, COLOURS, PATTERNS, BACKGROUNDS, SHAPES, prompt

SCORED = ("shape", "colour", "background", "position", "size", "pattern")


def evaluation_prompts(count: int, seed: int = 0) -> list[tuple[str, dict, bool]]:
    """(prompt, attributes it names, held-out pair?) — alternately a seen and a held-out shape x background pair."""
    rng = random.Random(f"evaluate/{seed}")
    items = []
    for i in range(count):
        held_out = i % 2 == 1
        while True:
            shape, background = (HELD_OUT_PAIRS[(i // 2) % len(HELD_OUT_PAIRS)] if held_out
                                 else (rng.choice(SHAPES), rng.choice(BACKGROUNDS)))
            if held_out or (shape, background) not in HELD_OUT_PAIRS:
                break
        attributes = {"shape": shape, "colour": rng.choice(tuple(COLOURS)), "pattern": rng.choice(PATTERNS),
                      "background": background, "position": rng.choice(POSITIONS), "size": rng.choice(SIZES)}
        text = prompt(shape, attributes["colour"], attributes["pattern"], background, attributes["position"],
                      attributes["size"])
        items.append((text, attributes, held_out))
    return items


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int = 30, guidance: float = 6.0,
           batch_size: int = 48, progress=None) -> np.ndarray:
    """uint8 images (N, 64, 64, 3), one per prompt, each from its own seeded generator."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        images = pipe(chunk, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
        if progress:
            progress(len(chunk))
    return np.concatenate(out)


def score(judge, images: np.ndarray, attributes: list[dict]) -> list[dict[str, bool]]:
    """Per image and attribute: whether the judge finds the prompt's value ("shape" is the object head)."""
    predicted = judge.predict(images)
    predicted["shape"] = predicted.pop("object")
    return [{a: predicted[a][i] == attrs[a] for a in SCORED if a in attrs} for i, attrs in enumerate(attributes)]


def summarize(hits: list[dict[str, bool]], held_out: list[bool]) -> dict[str, dict[str, float]]:
    table = {}
    for name, keep in (("seen pairs", False), ("held-out pairs", True)):
        rows = [h for h, flag in zip(hits, held_out) if flag == keep]
        table[name] = {a: float(np.mean([r[a] for r in rows])) for a in SCORED if rows and a in rows[0]}
        table[name]["samples"] = len(rows)
    return table


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    columns = min(columns, len(images))
    rows = [np.concatenate(list(images[i:i + columns]), axis=1) for i in range(0, len(images) - columns + 1, columns)]
    return np.concatenate(rows, axis=0)


def showcase_prompts() -> list[str]:
    """One row per shape: six scenes across the backgrounds; a last row of held-out pairs."""
    colours = list(COLOURS)
    rows = []
    for i, shape in enumerate(SHAPES):
        for j, background in enumerate(BACKGROUNDS):
            if (shape, background) in HELD_OUT_PAIRS:
                background = BACKGROUNDS[(j + 1) % len(BACKGROUNDS)]
            rows.append(prompt(shape, colours[(i + 2 * j) % len(colours)], PATTERNS[(i + j) % 3], background,
                               POSITIONS[(i + j) % len(POSITIONS)], SIZES[(i + j) % 2]))
    for i, (shape, background) in enumerate(HELD_OUT_PAIRS):
        rows.append(prompt(shape, colours[(3 * i + 1) % len(colours)], PATTERNS[i % 3], background,
                           POSITIONS[i % len(POSITIONS)], "large"))
    return rows


def position_prompts() -> list[str]:
    """One row per shape, small, one column per position, each row on one background the shape was seen on."""
    rows = []
    for i, shape in enumerate(SHAPES):
        background = next(b for b in BACKGROUNDS[i:] + BACKGROUNDS[:i] if (shape, b) not in HELD_OUT_PAIRS)
        rows += [prompt(shape, list(COLOURS)[i], "plain", background, position, "small") for position in POSITIONS]
    return rows


def _grid_file(pipe, prompts: list[str], columns: int, seed: int, options, path: Path) -> None:
    from PIL import Image

    images = sample(pipe, prompts, [seed + i for i in range(len(prompts))], options.steps, options.guidance)
    Image.fromarray(grid(images, columns)).save(path.with_suffix(".png"), optimize=True)
    path.with_suffix(".txt").write_text("\n".join(prompts) + "\n")


def run_evaluate(options) -> int:
    from ..files.export import load_base_model
    from .judge import load_judge

    pipe = load_base_model(options.model).pipeline
    judge = load_judge()
    items = evaluation_prompts(options.samples, options.seed)
    began = time.time()
    images = sample(pipe, [p for p, _, _ in items], [options.seed * 100_000 + i for i in range(len(items))],
                    options.steps, options.guidance)
    hits = score(judge, images, [a for _, a, _ in items])
    table = summarize(hits, [h for _, _, h in items])
    result = {"model": options.model, "samples": len(items), "steps": options.steps, "guidance": options.guidance,
              "seconds": round(time.time() - began, 1), "accuracy": table}
    if options.out:
        from PIL import Image

        out = Path(options.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluate.json").write_text(json.dumps(result, indent=2) + "\n")
        Image.fromarray(grid(images[:96], 12)).save(out / "samples.png", optimize=True)
        _grid_file(pipe, showcase_prompts(), len(BACKGROUNDS), options.seed, options, out / "showcase")
        _grid_file(pipe, position_prompts(), len(POSITIONS), options.seed, options, out / "positions")
    if options.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{options.model}: {len(items)} samples, {options.steps} steps, CFG {options.guidance} "
              f"({result['seconds']:.0f} s)")
        for name, row in table.items():
            print(f"  {name:15s} " + "  ".join(f"{a} {row[a]:.0%}" for a in SCORED if a in row)
                  + f"  (n={row['samples']})")
    return 0
