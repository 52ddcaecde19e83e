"""Resumable state of the toy world's long jobs (VAE, UNet and text encoder, judge).

A checkpoint is a dict of tensors and numbers (models' and optimizer's state dicts, the step), written under a
temporary name and renamed, and read back with ``weights_only=True``: an interrupted job continues from its last
checkpoint and never meets a half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch


def save_state(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume(path: Path, modules: dict, optimizer, log: Callable[[str], None], label: str) -> tuple[int, dict]:
    """Load ``path`` into ``modules`` ({key in the checkpoint: module}) and ``optimizer``: (step, the checkpoint),
    or (0, {}) when there is none yet."""
    if not path.exists():
        return 0, {}
    state = torch.load(path, weights_only=True)
    for key, module in modules.items():
        module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    step = int(state["step"])
    log(f"{label}: resuming at step {step}")
    return step, state
