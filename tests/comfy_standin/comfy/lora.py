"""comfy.lora: load_lora (a file's tensors -> patches per model weight) and calculate_weight (patches applied to a
weight, in the order they were added), with ComfyUI's handling of alpha, dora_scale and unknown keys."""

import logging

import torch

from . import weight_adapter


def load_lora(lora, to_load, log_missing=True):
    """`to_load`: the file's module names -> the model's weight keys. Every adapter class is asked for every
    module; keys that no adapter took are reported, one warning each, and otherwise ignored."""
    patch_dict = {}
    loaded_keys = set()
    for x in to_load:
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded_keys.add(f"{x}.alpha")
        dora_scale = None
        if f"{x}.dora_scale" in lora:
            dora_scale = lora[f"{x}.dora_scale"]
            loaded_keys.add(f"{x}.dora_scale")
        for adapter_class in weight_adapter.adapters:
            adapter = adapter_class.load(x, lora, alpha, dora_scale, loaded_keys)
            if adapter is not None:
                patch_dict[to_load[x]] = adapter
                loaded_keys.update(adapter.loaded_keys)
    if log_missing:
        for key in lora:
            if key not in loaded_keys:
                logging.warning("lora key not loaded: %s", key)
    return patch_dict


def calculate_weight(patches, weight, key, intermediate_dtype=torch.float32, original_weights=None):
    """patches: (strength, adapter, strength_model, offset, function) in the order they were added."""
    for strength, v, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        old_weight = None
        if offset is not None:
            old_weight = weight
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        if isinstance(v, weight_adapter.WeightAdapterBase):
            output = v.calculate_weight(weight, key, strength, strength_model, offset, function, intermediate_dtype,
                                        original_weights)
            if output is None:
                logging.warning("Calculate Weight Failed: %s %s", v.name, key)
            else:
                weight = output
                if old_weight is not None:
                    weight = old_weight
            continue
        raise NotImplementedError("the stand-in knows weight adapters only")
    return weight


def patched_weight(weight, patches, key):
    """What ModelPatcher does with a weight: a float32 copy, the patches in order, cast back to its dtype."""
    result = calculate_weight(patches, weight.detach().to(torch.float32).clone(), key)
    return result.to(weight.dtype)
