"""Score one quick-start probe's adapter (run.sh): 16 samples from toy-sd1 + the adapter (its own DDIM, 20 steps,
CFG 6, seeds 0-15) — "a photo of sks toy" in four scenes x 2 seeds, "a photo of a toy" in four, four world prompts —
and what the judge sees: identity score (mean cosine similarity of the judge's embeddings to 32 fresh renders of
the concept), how many the object head calls the concept, how many world prompts keep their shape. `base` as a third
argument scores toy-sd1 alone first. Writes <adapter>.<base|after>.png (two rows of eight)."""
import json
import sys

import numpy as np
from PIL import Image

from networks import para
from para_trainer.files.export import load_base_model
from para_trainer.quality.scores import reference_embeddings
from para_trainer.toyworld.evaluate import sample
from para_trainer.toyworld.judge import load_judge

adapter, concept = sys.argv[1], sys.argv[2]
models = load_base_model("builtin:toy-sd1")
judge = load_judge()
references = reference_embeddings(judge, concept)
scenes = ["on the beach", "in the snow", "on the grass", "at night"]
world = {"a photo of a red box on the grass": "box", "a photo of a green star in the snow": "star",
         "a photo of a blue heart on the beach": "heart", "a photo of a yellow moon at night": "moon"}
prompts = [f"a photo of sks toy {s}" for s in scenes] * 2 + ["a photo of a toy"] + \
          [f"a photo of a toy {s}" for s in ("on the beach", "in the snow", "at night")] + list(world)


def report(tag):
    images = sample(models.pipeline, prompts, list(range(len(prompts))), steps=20, guidance=6.0)
    similarity = (judge.embed(images) @ references.T).mean(1).numpy()
    objects = judge.predict(images)["object"]
    print(tag, json.dumps({
        "sks_identity": round(float(similarity[:8].mean()), 3), "sks_called": objects[:8].count(concept),
        "class_identity": round(float(similarity[8:12].mean()), 3), "class_called": objects[8:12].count(concept),
        "world_shape_kept": sum(o == s for o, s in zip(objects[12:], world.values()))}), flush=True)
    Image.fromarray(np.concatenate([np.concatenate(list(images[i:i + 8]), 1) for i in (0, 8)])).save(
        f"{adapter}.{tag}.png")


if sys.argv[3:] == ["base"]:
    report("base")
network, _ = para.create_network_from_weights(1.0, adapter, None, models.text_encoders[0], models.unet)
network.apply_to(models.text_encoders[0], models.unet)
network.load_weights(adapter)
report("after")
