"""A stand-in for the parts of ComfyUI that load LoRA files, written from ComfyUI's source (comfy/lora.py,
comfy/weight_adapter/, comfy/model_patcher.py, 2025) for para-trainer's tests. It keeps the contract a custom
weight adapter meets there; it is not ComfyUI and carries none of its code."""
