"""The judge's scores of one set of samples (the prompts of prompts.py), the papers' metrics in the toy world.

    fidelity      mean cosine similarity of the subject samples' judge embeddings to fresh renders of the
                  concept (identity and edit prompts; the role of DINO / CLIP-I)
    recognition   share of subject samples the judge calls the concept
    alignment     share of the edit prompts' attributes (background, position, size, colour) the judge finds in
                  the samples (the role of CLIP-T)
    leak          share of class-prompt samples ("a photo of a toy") the judge calls the concept
    class_accuracy  share of the class prompts' named attributes found (drift: the base model's minus this)
    diversity     mean cosine distance between the identity prompt's samples (different noise seeds)
    edit_spread   the same for each edit prompt, averaged: low means the edit comes out the same whatever the
                  noise (single-image editing's "no inversion needed")
(leak and class_accuracy are None where the prompts have no class prompt: single-image editing.)
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ..toyworld.concepts import random_concept_scene
from ..toyworld.render import render
from .prompts import Prompt

REFERENCE_RENDERS = 32
METRICS = ("fidelity", "recognition", "alignment", "leak", "class_accuracy", "diversity")
SINGLE_IMAGE_METRICS = ("fidelity", "recognition", "alignment", "diversity", "edit_spread")


def reference_embeddings(judge, concept: str, count: int = REFERENCE_RENDERS) -> torch.Tensor:
    """Fresh renders of the concept in random scenes (never the training photos), embedded."""
    rng = random.Random(f"quality-references/{concept}")
    return judge.embed(np.stack([render(random_concept_scene(concept, rng)) for _ in range(count)]))


def _found(predicted: dict[str, list[str]], i: int, checks: dict) -> list[bool]:
    return [predicted[attribute][i] == value for attribute, value in checks.items()]


def _mean(values) -> float | None:
    return float(np.mean(values)) if len(values) else None


def spread(embedded: torch.Tensor, groups: list[list[int]]) -> float | None:
    """Mean cosine distance between samples of the same prompt (different noise seeds), over the prompts."""
    values = []
    for group in groups:
        if len(group) > 1:
            pairs = embedded[group] @ embedded[group].T
            values.append(float((1 - pairs).sum() / (len(group) * (len(group) - 1))))
    return _mean(values)


def score(judge, images: np.ndarray, prompts: list[Prompt], concept: str, references: torch.Tensor) -> dict:
    predicted = judge.predict(images)
    embedded = judge.embed(images)
    subject = [i for i, p in enumerate(prompts) if p.kind in ("identity", "edit")]
    identity = [i for i, p in enumerate(prompts) if p.kind == "identity"]
    edits = [i for i, p in enumerate(prompts) if p.kind == "edit"]
    classes = [i for i, p in enumerate(prompts) if p.kind == "class"]
    similarity = embedded @ references.T
    edit_hits = [hit for i in edits for hit in _found(predicted, i, {k: v for k, v in prompts[i].checks.items()
                                                                     if k != "object"})]
    class_hits = [hit for i in classes for hit in _found(predicted, i, prompts[i].checks)]
    by_text: dict[str, list[int]] = {}
    for i in edits:
        by_text.setdefault(prompts[i].text, []).append(i)
    result = {
        "fidelity": float(similarity[subject].mean()),
        "recognition": float(np.mean([predicted["object"][i] == concept for i in subject])),
        "alignment": _mean(edit_hits),
        "leak": _mean([predicted["object"][i] == concept for i in classes]),
        "class_accuracy": _mean(class_hits),
        "diversity": spread(embedded, [identity]) or 0.0,
        "edit_spread": spread(embedded, list(by_text.values())),
    }
    by_attribute: dict[str, list[bool]] = {}
    for i in edits:
        for attribute, value in prompts[i].checks.items():
            if attribute != "object":
                by_attribute.setdefault(attribute, []).append(predicted[attribute][i] == value)
    result["alignment_by_attribute"] = {a: float(np.mean(v)) for a, v in sorted(by_attribute.items())}
    return result
