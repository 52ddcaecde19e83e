"""How presets/single_image_edit.toml's values were chosen: a grid of rank × learning rate × steps, measured.

    python -m para_trainer.commands.edit_study --out output/edit_study [--ranks 1 2 4 8] [--lrs 1e-3 3e-3 1e-2]
                                      [--steps 100 200] [--seeds 4]

Each setting trains PaRa with the preset on its one image (para_trainer/example_data/one_image) and then
generates, over several seeds, the training caption and edited captions (20 DDIM steps, CFG 7.5). The embedded
model's VAE has random weights, so its pixels say nothing; everything is measured on the generated LATENTS
(8×8×4), against the training image's latent (the VAE encoder's mean, scaled):
  * fidelity   RMSE between the training image's latent and the latents for its own caption (lower: learned);
  * spread     mean per-element standard deviation over seeds for the caption (lower: the same result whatever
               the noise — what PaRa's single-image editing relies on, as no noise inversion is used);
  * edit       RMSE between the caption's and the edited captions' latents at the same seed (the prompt still
               changes the result).
The best setting has the lowest fidelity among those keeping `edit` at least EDIT_KEPT of the untrained model's.
The table goes to stdout and OUT/edit_study.csv.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..files.adapter_files import adapters_applied, read_adapter
from ..training.example_images import ONE_IMAGE_CAPTION, ONE_IMAGE_FOLDER, PACKAGE_COPY
from ..models.sampling import make_scheduler

PRESET = "presets/single_image_edit.toml"
EDITS = [
    "a photo of sks toy on the grass",
    "a photo of a blue sks toy on a wooden floor",
    "a photo of sks toy in the snow",
]
EDIT_KEPT = 0.5
SAMPLE_STEPS = 20


def _latents(models, prompt: str, seeds: int) -> np.ndarray:
    """(seeds, 4, 8, 8) generated latents for `prompt` at seeds 0..seeds-1."""
    pipe = models.pipeline
    original = pipe.scheduler
    pipe.scheduler = make_scheduler("ddim", original.config)
    try:
        with torch.no_grad():
            return np.stack([pipe(prompt, height=64, width=64, num_inference_steps=SAMPLE_STEPS, guidance_scale=7.5,
                                  generator=torch.Generator().manual_seed(seed), output_type="latent",
                                  ).images[0].double().numpy() for seed in range(seeds)])
    finally:
        pipe.scheduler = original


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean()))


def measure(models, target: np.ndarray, seeds: int) -> dict[str, float]:
    """fidelity, spread and edit (see the module docstring) of the model as it is now."""
    own = _latents(models, ONE_IMAGE_CAPTION, seeds)
    edits = [_latents(models, prompt, seeds) for prompt in EDITS]
    return {"fidelity": _rmse(own, target[None]), "spread": float(own.std(axis=0).mean()),
            "edit": float(np.mean([_rmse(own, edited) for edited in edits]))}


def train_setting(out_dir: str, rank: int, lr: float, steps: list[int]) -> dict[int, str]:
    """Train with the preset at (rank, lr), saving at every step count in `steps`; {steps: adapter file}."""
    from ..training.train import main as train_main

    every = min(steps)
    if any(s % every for s in steps):
        raise SystemExit(f"--steps {steps}: every step count must be a multiple of the smallest")
    argv = ["--config_file", PRESET, "--network_dim", str(rank), "--learning_rate", str(lr),
            "--max_train_steps", str(max(steps)), "--save_every_n_steps", str(every), "--output_dir", out_dir,
            "--output_name", "edit", "--no_export_lora", "--sample_every_n_steps", "0"]
    if train_main(argv) != 0:
        raise SystemExit(f"training rank {rank}, lr {lr} failed")
    files = {}
    for step in steps:
        named = os.path.join(out_dir, f"edit-step{step:08d}.safetensors")
        files[step] = named if os.path.exists(named) else os.path.join(out_dir, "edit.safetensors")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m para_trainer.commands.edit_study", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="output/edit_study")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--seeds", type=int, default=4)
    options = parser.parse_args(argv)

    from PIL import Image

    from ..files.export import load_base_model

    models = load_base_model("builtin:tiny-sd1")
    image_path = glob.glob(os.path.join(PACKAGE_COPY, *ONE_IMAGE_FOLDER.split("/"), "*.png"))[0]
    pixels = torch.from_numpy(np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32))
    with torch.no_grad():
        target = (models.vae.encode(pixels.permute(2, 0, 1)[None] / 127.5 - 1).latent_dist.mean[0]
                  * models.latent_scale).double().numpy()
    rows = [{"rank": 0, "lr": 0.0, "steps": 0, **measure(models, target, options.seeds)}]  # the untrained model
    for rank in options.ranks:
        for lr in options.lrs:
            files = train_setting(os.path.join(options.out, f"r{rank}_lr{lr:g}"), rank, lr, options.steps)
            for steps, path in files.items():
                with adapters_applied(models, [(read_adapter(path), 1.0)]):
                    rows.append({"rank": rank, "lr": lr, "steps": steps, **measure(models, target, options.seeds)})
                print("rank {rank} lr {lr:g} steps {steps}: fidelity {fidelity:.3f} spread {spread:.3f} "
                      "edit {edit:.3f}".format(**rows[-1]), flush=True)

    base = rows[0]
    kept = [row for row in rows[1:] if row["edit"] >= EDIT_KEPT * base["edit"]]
    best = min(kept, key=lambda row: row["fidelity"]) if kept else None
    Path(options.out).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(options.out, "edit_study.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["best"])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "best": row is best})
    print("\nrank | lr | steps | fidelity | spread | edit")
    for row in rows:
        label = "untrained" if row is base else f"{row['rank']} | {row['lr']:g} | {row['steps']}"
        print(f"{label} | {row['fidelity']:.3f} | {row['spread']:.3f} | {row['edit']:.3f}"
              + ("  <- best" if row is best else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
