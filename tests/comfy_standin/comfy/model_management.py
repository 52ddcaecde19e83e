"""comfy.model_management, as far as weight adapters use it."""

import torch


def cast_to_device(tensor: torch.Tensor, device, dtype, copy: bool = False) -> torch.Tensor:
    result = tensor.to(device=device, dtype=dtype)
    return result.clone() if copy and result is tensor else result
