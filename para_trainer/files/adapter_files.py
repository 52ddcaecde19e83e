"""Any adapter file as chains of PaRa/LoRA stages per layer: what merge, sample and export --to merged apply.

Native PaRa files (plain, PaRa + LoRA, merged) are chains already (networks/para.py). A kohya LoRA/LoCon module
is one Addition with strength alpha/rank (the scale every kohya loader uses). A LoKr module (DiffuseKronA's
networks.krona, or LyCORIS) becomes one Addition holding the exact LoRA factors of kron(A, B) once the model's
layer shape is known (`resolved`). Other kinds (LoHa, OFT, IA3, DoRA, diffusers/peft key names) are refused.

A file's strength multiplies every stage's strength: W0 + m·ΔW for a one-stage file (every PaRa or LoRA file),
and stage by stage for a merged chain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field

import torch

from networks.adapter_base import (
    AdapterFileError,
    group_by_module,
    layer_key,
    layers_for_file,
    module_kind_of_parts,
    read_adapter_file,
    set_layer_weight,
)
from networks.para import (
    Q_KEY,
    Addition,
    Reduction,
    chain_delta_weight,
    check_stages_fit,
    scale_stages,
    stages_from_file,
)

from .metadata import file_sha256

LORA_PARTS = {"lora_up.weight", "lora_down.weight", "alpha"}


@dataclass
class AdapterFile:
    path: str
    kind: str  # "PaRa", "PaRa chain" (merged or PaRa + LoRA), "LoRA", "LoCon", "LoKr"
    chains: dict[str, list]  # sd-scripts module name -> stages, in the file's order
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    @property
    def has_para(self) -> bool:
        return self.kind.startswith("PaRa")

    @property
    def needs_model(self) -> bool:
        """LoKr modules become stages only with the layer's shape (a conv kernel is not in every LoKr file)."""
        return any(isinstance(stages, LokrParts) for stages in self.chains.values())

    def resolved(self, models) -> "AdapterFile":
        """This file with every LoKr module turned into its exact LoRA stage for the model's layers."""
        if not self.needs_model:
            return self
        layers = layers_for_file(models.text_encoder_for_network, models.unet, self.chains, self.metadata, self.path)
        shapes = {target.lora_name: tuple(target.layer.weight.shape) for target in layers}
        chains = {name: [_lokr_addition(stages.parts, shapes[name], f"{self.path}: module {name}")]
                  if isinstance(stages, LokrParts) else stages for name, stages in self.chains.items()}
        return dataclasses.replace(self, chains=chains)


@dataclass(frozen=True)
class LokrParts:
    """A LoKr module's tensors, until the layer shape is known."""

    parts: dict


def read_adapter(path: str) -> AdapterFile:
    """Read any supported adapter file; AdapterFileError naming the first module that cannot be applied."""
    path = str(path)
    tensors, metadata = read_adapter_file(path)
    groups = group_by_module(tensors)
    if not groups:
        raise AdapterFileError(f"{path} holds no adapter tensors")
    chains, kinds = {}, set()
    for name, parts in groups.items():
        stages, kind = _module_stages(name, parts, path)
        chains[name] = stages
        kinds.add(kind)
    if len(kinds) > 1 and not kinds <= {"LoRA", "LoCon"}:
        raise AdapterFileError(f"{path} mixes adapter kinds ({', '.join(sorted(kinds))}); para-trainer applies "
                               "files with one kind of module")
    kind = "LoCon" if kinds == {"LoRA", "LoCon"} else kinds.pop()
    return AdapterFile(path, kind, chains, metadata, file_sha256(path))


def _module_stages(name: str, parts: dict[str, torch.Tensor], path: str) -> tuple[list, str]:
    where = f"{path}: module {name}"
    if any(part == Q_KEY or part.startswith("stage") for part in parts):
        stages = stages_from_file(parts, where)
        plain = len(stages) == 1 and isinstance(stages[0], Reduction)
        return [dataclasses.replace(s, **_float32(s)) for s in stages], "PaRa" if plain else "PaRa chain"
    if {"lora_up.weight", "lora_down.weight"} <= set(parts):
        extra = set(parts) - LORA_PARTS
        if extra:
            raise AdapterFileError(f"{where} has {', '.join(sorted(extra))}: only plain LoRA/LoCon modules "
                                   "(lora_up, lora_down, alpha) can be applied; Tucker (lora_mid) and DoRA "
                                   "(dora_scale) modules cannot")
        up, down = parts["lora_up.weight"].float(), parts["lora_down.weight"].float()
        rank = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        kind = "LoCon" if down.dim() == 4 and down.shape[2:] != (1, 1) else "LoRA"
        return [Addition(up, down, alpha / rank)], kind
    if any(part.startswith("lokr_") for part in parts):
        return LokrParts(parts), "LoKr"
    raise AdapterFileError(f"{where} is a {module_kind_of_parts(parts)} module ({', '.join(sorted(parts))}); "
                           "para-trainer applies native PaRa, kohya LoRA/LoCon and LoKr files")


def _float32(stage) -> dict:
    if isinstance(stage, Reduction):
        return {"q": stage.q.float()}
    return {"up": stage.up.float(), "down": stage.down.float()}


def _lokr_addition(parts: dict[str, torch.Tensor], weight_shape, where: str) -> Addition:
    from networks.krona import krona_lora_factors, lokr_full_factors

    a, b = lokr_full_factors(parts, weight_shape, where)  # the loaders' alpha/dim scale is folded into A
    up, down, _ = krona_lora_factors(a, b, weight_shape)  # exact: rank(A)·rank(B)
    return Addition(up, down, 1.0)


def layer_chains(adapter: AdapterFile, models, strength: float = 1.0) -> list[tuple[object, list]]:
    """(TargetLayer, stages at `strength`) for every module of the file; AdapterFileError when it does not fit."""
    adapter = adapter.resolved(models)
    layers = layers_for_file(models.text_encoder_for_network, models.unet, adapter.chains, adapter.metadata,
                             adapter.path)
    result = []
    for target in layers:
        stages = adapter.chains[target.lora_name]
        check_stages_fit(target.lora_name, stages, target.layer, adapter.path)
        result.append((target, scale_stages(stages, strength)))
    return result


@torch.no_grad()
def apply_adapters(models, adapters: list[tuple[AdapterFile, float]]) -> None:
    """Bake the files into the model's weights in order (each on the weights the ones before left), float32 math.

    Every file is matched to the model before the first weight changes.
    """
    plans = [layer_chains(adapter, models, strength) for adapter, strength in adapters]
    for plan in plans:
        for target, stages in plan:
            weight = target.layer.weight
            delta = chain_delta_weight(weight, stages)
            set_layer_weight(target.layer, weight.to(delta.dtype) + delta)


@contextlib.contextmanager
def adapters_applied(models, adapters: list[tuple[AdapterFile, float]]):
    """Within the block the model's weights hold the adapters (apply_adapters); afterwards the original weights,
    bit for bit. Files at strength 0 are left out, so they give the base model exactly."""
    backups = {}
    for adapter, strength in adapters:
        for target, _ in layer_chains(adapter, models, strength):
            backups.setdefault(layer_key(target.layer), (target.layer, target.layer.weight.detach().clone()))
    try:
        apply_adapters(models, [(adapter, strength) for adapter, strength in adapters if strength != 0])
        yield models
    finally:
        with torch.no_grad():
            for layer, weight in backups.values():
                set_layer_weight(layer, weight)


def parse_file_and_strength(text: str) -> tuple[str, float]:
    """FILE[:STRENGTH] -> (FILE, STRENGTH); a colon not followed by a number belongs to the path (C:\\...)."""
    head, colon, tail = str(text).rpartition(":")
    if colon:
        try:
            return head, float(tail)
        except ValueError:
            if head and os.path.exists(head) and not os.path.exists(text):
                raise AdapterFileError(f"{text}: the strength {tail!r} is not a number; write FILE:0.8") from None
    return str(text), 1.0
