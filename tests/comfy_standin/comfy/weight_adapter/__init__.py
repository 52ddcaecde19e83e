"""comfy.weight_adapter: `adapters` is the module-level list comfy.lora.load_lora asks, in order, for every module
of a file; custom nodes append their adapter classes to it."""

from .base import WeightAdapterBase  # noqa: F401
from .lora import LoRAAdapter

adapters = [LoRAAdapter]
