"""comfy.weight_adapter.base: the class every weight adapter derives from.

`load(x, lora, alpha, dora_scale, loaded_keys)` returns an adapter for module `x` of the file `lora` (a dict of
tensors), or None when the module is not of its kind; `calculate_weight(weight, key, strength, strength_model,
offset, function, intermediate_dtype, original_weight)` returns the weight with the adapter applied, given the
weight as patched so far.
"""


class WeightAdapterBase:
    name: str
    loaded_keys: set
    weights: tuple

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        raise NotImplementedError

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=None,
                         original_weight=None):
        raise NotImplementedError
