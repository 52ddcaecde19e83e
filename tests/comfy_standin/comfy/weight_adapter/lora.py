"""comfy.weight_adapter.lora, for kohya LoRA/LoCon keys only (lora_up.weight, lora_down.weight, alpha)."""

import torch

from .. import model_management
from .base import WeightAdapterBase


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights  # (up, down, alpha)

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        loaded_keys = set() if loaded_keys is None else loaded_keys
        up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
        if up not in lora:
            return None
        loaded_keys.update((up, down))
        return cls(loaded_keys, (lora[up], lora[down], alpha))

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32,
                         original_weight=None):
        up = model_management.cast_to_device(self.weights[0], weight.device, intermediate_dtype)
        down = model_management.cast_to_device(self.weights[1], weight.device, intermediate_dtype)
        scale = self.weights[2] / down.shape[0] if self.weights[2] is not None else 1.0
        diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
        weight += function((strength * scale * diff).type(weight.dtype))
        return weight
