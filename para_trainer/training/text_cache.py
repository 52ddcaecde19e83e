"""--cache_text_encoder_outputs: every caption encoded once before training, then the text encoders leave the
accelerator (sd-scripts does the same; for FLUX it keeps T5-XXL's 9.5 GB off a 24 GB GPU).

Captions do not change between epochs when caching is allowed (args.py refuses it with shuffle, caption or tag
dropout, and with a trained text encoder), so the processed caption of every image is known up front.
"""

from __future__ import annotations

import torch

from .data import process_caption


def dataset_captions(dataset) -> list[str]:
    """Every processed caption the run will see (prefix and suffix applied; no random draws are left)."""
    return sorted({process_caption(entry.caption, entry.subset, torch.Generator())
                   for d in dataset.datasets for entry in d.entries})


def build_cache(captions: list[str], encode) -> dict:
    """{caption: encode([caption])} with each output detached on the CPU (tensors, tuples, dicts or None)."""
    with torch.no_grad():
        return {caption: _to_cpu(encode([caption])) for caption in captions}


def cached_outputs(cache: dict, captions: list[str], device):
    """The batch's outputs from the cache, stacked along the batch as the encoder would have returned them."""
    return _collate([cache[c] for c in captions], device)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _collate(items: list, device):
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(items).to(device)
    if isinstance(first, (tuple, list)):
        return type(first)(_collate(list(parts), device) for parts in zip(*items))
    if isinstance(first, dict):
        return {k: _collate([item[k] for item in items], device) for k in first}
    return first  # None
