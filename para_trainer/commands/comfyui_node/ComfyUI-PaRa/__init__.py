"""ComfyUI-PaRa: native PaRa files through ComfyUI's own "Load LoRA" nodes.

A native PaRa file (written by para-trainer / networks.para) holds one `<module>.para_q` tensor (d_out, r) per
adapted layer: an orthonormal basis Q of the output directions the adapter removes. Merged files and PaRa + LoRA
files hold a chain of stages per layer (`stageN.para_q`, `stageN.lora_up/down`, `stageN.strength`).

This package registers a `para` weight adapter in `comfy.weight_adapter.adapters`, the list ComfyUI's LoRA loader
asks for every module of a file. The standard "Load LoRA" node then loads native files with its model and clip
strengths: ComfyUI hands the adapter the layer's weight as patched so far, in float32, and the adapter adds
ΔW = −m·QQᵀW (a chain: its stages in order). Several files compose in the order they are loaded, like
`para-trainer merge`. The package adds no node of its own (NODE_CLASS_MAPPINGS is empty).

The PaRa math is not a copy kept here: `para-trainer comfyui install` puts para-trainer's own networks/para.py
and networks/adapter_base.py into para_core/.
"""

from __future__ import annotations

import logging

import torch

import comfy.weight_adapter
from comfy.weight_adapter.base import WeightAdapterBase

from .para_core.para import Q_KEY, chain_delta_weight, reorthonormalized, scale_stages, stages_from_file

logger = logging.getLogger("ComfyUI-PaRa")


def _parts(x: str, lora: dict) -> dict:
    """The file's PaRa tensors of module `x`, by part name (`para_q`, `stage0.para_q`, ...); {} when none."""
    if f"{x}.{Q_KEY}" in lora:
        return {Q_KEY: lora[f"{x}.{Q_KEY}"]}
    if f"{x}.stage0.{Q_KEY}" not in lora and f"{x}.stage0.lora_up" not in lora:
        return {}
    prefix = f"{x}.stage"
    return {key[len(x) + 1:]: tensor for key, tensor in lora.items() if key.startswith(prefix)}


class PaRaAdapter(WeightAdapterBase):
    """One module of a native PaRa file: its chain of stages (plain PaRa: one reduction)."""

    name = "para"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights  # (stages,)

    @classmethod
    def load(cls, x, lora, alpha=None, dora_scale=None, loaded_keys=None):
        parts = _parts(x, lora)
        if not parts:
            return None
        stages = reorthonormalized(stages_from_file(parts, f"{x} (PaRa)"))
        keys = set() if loaded_keys is None else loaded_keys
        keys.update(f"{x}.{part}" for part in parts)
        return cls(keys, (stages,))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None, *args, **kwargs):
        stages = scale_stages(self.weights[0], strength)
        try:
            delta = chain_delta_weight(weight.to(intermediate_dtype), stages)
            weight += function(delta.to(intermediate_dtype)).type(weight.dtype)
        except Exception as error:  # as ComfyUI's own adapters do: log, leave the weight as it was
            logger.error("ComfyUI-PaRa: %s: %s", key, error)
        return weight


if not any(getattr(adapter, "name", None) == PaRaAdapter.name for adapter in comfy.weight_adapter.adapters):
    comfy.weight_adapter.adapters.append(PaRaAdapter)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
