"""What the judge says about a training run on toy-sd1: did the samples become the subject?

At the end of a run whose base is toy-sd1 and whose sample prompts were drawn before and after training, the
trainer prints, per kind of prompt, the judge's identity score (mean cosine similarity of the samples' embeddings
to the training images' embeddings, the DINO score of the papers) before -> after:

    prompts with the identifier ("a photo of sks toy on the beach")   should rise: the subject is learned
    prompts without it ("a photo of a toy")                            should stay: the class is kept
"""

from __future__ import annotations

from pathlib import Path

from .model import UNET_CONFIG


def is_toy_model(unet) -> bool:
    """Whether a UNet has toy-sd1's architecture (whatever file or folder it came from)."""
    config = unet.config
    return (list(getattr(config, "block_out_channels", [])) == UNET_CONFIG["block_out_channels"]
            and list(config.block_out_channels) == UNET_CONFIG["block_out_channels"]
            and config.cross_attention_dim == UNET_CONFIG["cross_attention_dim"]
            and config.sample_size == UNET_CONFIG["sample_size"])


def identifier_of(class_tokens: str) -> str | None:
    """sd-scripts' folder convention "N_identifier class": the identifier is the first word ("sks" of "sks toy")."""
    words = class_tokens.split()
    return words[0] if len(words) >= 2 else None


def identity_scores(before: list[Path], after: list[Path], prompts: list[str], subject_images: list[str],
                    identifier: str) -> dict[str, tuple[float, float, int]]:
    """{"with identifier" / "without": (score before, score after, number of prompts)}."""
    from PIL import Image

    from .judge import load_judge

    judge = load_judge()

    def load(paths):
        return [Image.open(p).convert("RGB") for p in paths]

    references = judge.embed(load(subject_images))
    scores = {}
    for label, keep in (("with identifier", True), ("without", False)):
        chosen = [i for i, text in enumerate(prompts) if (identifier in text.split()) == keep]
        if not chosen:
            continue
        pair = []
        for paths in (before, after):
            embedded = judge.embed(load([paths[i] for i in chosen]))
            pair.append(float((embedded @ references.T).mean()))
        scores[label] = (pair[0], pair[1], len(chosen))
    return scores


def format_scores(scores: dict[str, tuple[float, float, int]], identifier: str) -> str:
    lines = ["judge (toy world): identity score of the samples against the training images, before -> after"]
    for label, (before, after, count) in scores.items():
        what = f"prompts with '{identifier}'" if label == "with identifier" else f"prompts without '{identifier}'"
        lines.append(f"  {what:28s} {before:.2f} -> {after:.2f}  ({count} prompt{'s' if count != 1 else ''})")
    return "\n".join(lines)
