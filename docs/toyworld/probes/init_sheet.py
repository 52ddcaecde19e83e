"""docs/toyworld/init.png: what PaRa does to toy-sd1 before the first training step, with the paper's random
initial B (init=orthogonal) and with W0's least-used output directions (init=low_energy), rank 2, on the ExCA
and full presets. Eight prompts, DDIM 20 steps, CFG 6, the same seeds in every row; run from the repository root:
    .venv/bin/python docs/toyworld/probes/init_sheet.py docs/toyworld/init.png"""
import sys
from pathlib import Path

import torch
from PIL import Image

from networks import para
from para_trainer.files.export import load_base_model
from para_trainer.models.sampling import contact_sheet, save_png
from para_trainer.toyworld.evaluate import sample

PROMPTS = ["a photo of sks toy on the beach", "a photo of sks toy in the snow", "a photo of a toy",
           "a photo of a toy at night", "a photo of a red box on the grass", "a photo of a green star in the snow",
           "a photo of a blue heart on the beach", "a photo of a yellow moon at night"]


def row(models) -> list[Image.Image]:
    images = sample(models.pipeline, PROMPTS, list(range(len(PROMPTS))), steps=20, guidance=6.0)
    return [Image.fromarray(image).resize((96, 96), Image.NEAREST) for image in images]


rows, labels = [], []
for preset, init in ((None, None), ("exca", "orthogonal"), ("exca", "low_energy"), ("full", "orthogonal"),
                     ("full", "low_energy")):
    models = load_base_model("builtin:toy-sd1")
    if preset:
        torch.manual_seed(42)
        network = para.create_network(1.0, 2, None, models.vae, models.text_encoders[0], models.unet,
                                      preset=preset, init=init)
        network.apply_to(models.text_encoders[0], models.unet)
    rows.append(row(models))
    labels.append(f"{preset} r=2, init={init}" if preset else "toy-sd1 alone")
save_png(contact_sheet(rows, labels, PROMPTS), Path(sys.argv[1]))
