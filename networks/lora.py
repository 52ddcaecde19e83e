"""LoRA as sd-scripts' networks/lora.py trains it: the baseline PaRa is measured against, over the same base.

Per adapted layer LoRA learns down (r x d_in) and up (d_out x r) and adds their product to the weight:

    ΔW = (alpha / r) · up · down      (conv: down carries the layer's kernel, up is 1x1: kohya's LoCon layout)

down starts kaiming-uniform (a = √5) and up at zero, so ΔW = 0 at step 0, as in sd-scripts. The scale is
network_alpha / network_dim (sd-scripts' default network_alpha is 1); the network multiplier applies on top.
Use it as `--network_module=networks.lora` with this project's trainer; inside an sd-scripts checkout use
sd-scripts' own networks/lora.py, which reads and writes the same files.

network_args (strings, as sd-scripts passes them):
    preset     which layers, as networks.para's presets (default "full": sd-scripts' own targets — the UNet's
               transformer blocks and the text encoder's attention and MLP; resnet blocks and samplers too
               when conv_dim is set).
    conv_dim, conv_alpha   rank and alpha of the 3x3 conv layers (switches them on where the preset allows).
    include, exclude       regexes over the sd-scripts module names, narrowing the preset.
    dropout, rank_dropout, module_dropout   as sd-scripts' LoRA.

File format: sd-scripts' LoRA, read by every front end: per layer
    <lora_name>.lora_down.weight   (r, d_in) or (r, c_in, kh, kw)
    <lora_name>.lora_up.weight     (d_out, r) or (d_out, r, 1, 1)
    <lora_name>.alpha              scalar
The math is networks.para's LoRA stage (`lora_output`, `chain_delta_weight` of one `Addition`): one place.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .adapter_base import (
    PRESETS,
    AdapterFileError,
    AdapterModule,
    AdapterNetwork,
    NetworkArgsError,
    choice,
    group_by_module,
    layers_for_file,
    parse_network_args,
    positive_int,
    probability,
    read_adapter_file,
    refused_lora_args,
    regex,
    select_target_layers,
)
from .para import Addition, chain_delta_weight, lora_output

logger = logging.getLogger(__name__)

UP_KEY, DOWN_KEY, ALPHA_KEY = "lora_up.weight", "lora_down.weight", "alpha"


class LoRAModule(AdapterModule):
    """out = base(x) + m·(alpha/r)·up·down·x."""

    file_keys = (DOWN_KEY, UP_KEY, ALPHA_KEY)

    def __init__(self, lora_name: str, layer: nn.Module, rank: int, alpha: float | None = None, **kwargs):
        super().__init__(lora_name, layer, **kwargs)
        if rank < 1:
            raise NetworkArgsError(f"{lora_name}: LoRA rank must be at least 1, not {rank}")
        self.rank = rank
        self.alpha = float(rank if alpha is None or alpha == 0 else alpha)  # sd-scripts: alpha 0/None means r
        kernel = tuple(layer.weight.shape[1:]) if self.is_conv else (self.in_features,)
        down = torch.empty(rank, *kernel)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.lora_down = nn.Parameter(down)
        self.lora_up = nn.Parameter(torch.zeros(self.out_features, rank, *((1, 1) if self.is_conv else ())))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        down = self.lora_down
        if self.training and self.rank_dropout:
            keep = (torch.rand(self.rank, device=down.device) > self.rank_dropout).to(down.dtype)
            down = down * keep.view(-1, *([1] * (down.dim() - 1))) / (1 - self.rank_dropout)
        if self.training and self.dropout:
            x = nn.functional.dropout(x, p=self.dropout)
        return out + (self.multiplier * self.scale) * lora_output(x, self.lora_up, down, self.layer)

    def delta_weight(self) -> torch.Tensor:
        stage = Addition(self.lora_up.detach(), self.lora_down.detach(), self.scale)
        return chain_delta_weight(self.layer.weight, [stage], self.multiplier)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {DOWN_KEY: self.lora_down.detach().clone(), UP_KEY: self.lora_up.detach().clone(),
                ALPHA_KEY: torch.tensor(self.alpha)}

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, parameter in ((DOWN_KEY, self.lora_down), (UP_KEY, self.lora_up)):
            if key not in tensors:
                raise AdapterFileError(f"{self.lora_name}: the file has no {key}")
            tensor = tensors[key]
            if tensor.numel() != parameter.numel() or tensor.shape[0] != parameter.shape[0]:
                raise AdapterFileError(f"{self.lora_name}: the file's {key} has shape {tuple(tensor.shape)}, this "
                                       f"network expects {tuple(parameter.shape)} (network_dim/conv_dim)")
            parameter.copy_(tensor.reshape(parameter.shape))
        if ALPHA_KEY in tensors:
            self.alpha = float(tensors[ALPHA_KEY])


class LoRANetwork(AdapterNetwork):
    network_module = __name__  # "networks.lora"
    file_kinds = ("LoRA",)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device):
        """sd-scripts' scale_weight_norms: ‖scale·up·down‖ capped at max_norm (up and down scaled by √ratio)."""
        scaled, norms = 0, []
        for module in self.adapter_modules:
            norm = module.delta_weight().norm() / max(abs(module.multiplier), 1e-12)
            ratio = float(max_norm_value / norm) if norm > max_norm_value else 1.0
            if ratio != 1.0:
                scaled += 1
                module.lora_up.mul_(ratio ** 0.5)
                module.lora_down.mul_(ratio ** 0.5)
            norms.append(float(norm) * ratio)
        return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)


NETWORK_ARGS = {
    "conv_dim": positive_int,
    "conv_alpha": float,
    "preset": choice(PRESETS),
    "include": regex,
    "exclude": regex,
    "dropout": probability,
    "rank_dropout": probability,
    "module_dropout": probability,
}
UNSUPPORTED_ARGS = refused_lora_args(
    block_dims="block-wise ranks are not implemented in networks.lora; use preset/include/exclude to choose layers",
    block_lrs="per-block learning rates are not implemented in networks.lora",
    loraplus="LoRA+ is not implemented in networks.lora",
)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder, unet,
                   neuron_dropout: float | None = None, **kwargs) -> LoRANetwork:
    """sd-scripts' create_network: LoRA on the preset's layers (network_args arrive as strings)."""
    args = parse_network_args(kwargs, NETWORK_ARGS, UNSUPPORTED_ARGS)
    rank = positive_int(network_dim) if network_dim is not None else 4
    alpha = 1.0 if network_alpha is None else float(network_alpha)
    conv_rank, conv_alpha = args.get("conv_dim"), args.get("conv_alpha", 1.0)
    preset_name = args.get("preset") or "full"
    targets = select_target_layers(text_encoder, unet, PRESETS[preset_name], conv_rank is not None,
                                   args.get("include"), args.get("exclude"))
    if not targets:
        raise NetworkArgsError(f"preset {preset_name!r} with these include/exclude patterns selects no layer")
    if conv_rank is None and any(t.is_conv3x3 for t in targets):
        conv_rank, conv_alpha = rank, alpha  # a preset that always adapts 3x3 convs (exca): network_dim there too
    dropout = neuron_dropout if neuron_dropout is not None else args.get("dropout")
    modules = [LoRAModule(t.lora_name, t.layer, conv_rank if t.is_conv3x3 else rank,
                          conv_alpha if t.is_conv3x3 else alpha, dropout=dropout,
                          rank_dropout=args.get("rank_dropout"), module_dropout=args.get("module_dropout"))
               for t in targets]
    network = LoRANetwork(modules, multiplier)
    logger.info("LoRA (%s): %d text-encoder and %d UNet layers, %d trainable parameters", preset_name,
                len(network.text_encoder_modules), len(network.unet_modules), network.trainable_parameter_count())
    return network


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """sd-scripts' create_network_from_weights: a network with the file's modules, ranks and alphas."""
    metadata = {}
    if weights_sd is None:
        weights_sd, metadata = read_adapter_file(str(file))
    groups = group_by_module(weights_sd)
    not_lora = [name for name, parts in groups.items() if not {DOWN_KEY, UP_KEY} <= parts.keys()]
    if not_lora:
        raise AdapterFileError(
            f"{file} is not a LoRA/LoCon file: module {not_lora[0]} has no {DOWN_KEY}/{UP_KEY} "
            f"(it has {', '.join(sorted(groups[not_lora[0]]))}); PaRa files load with networks.para, "
            "LoKr/KronA files with networks.krona")
    options = parse_network_args({k: v for k, v in kwargs.items() if k in ("dropout", "module_dropout")},
                                 NETWORK_ARGS)
    modules = []
    for target in layers_for_file(text_encoder, unet, groups, metadata, str(file)):
        parts = groups[target.lora_name]
        alpha = parts.get(ALPHA_KEY)
        module = LoRAModule(target.lora_name, target.layer, parts[DOWN_KEY].shape[0],
                            None if alpha is None else float(alpha), dropout=options.get("dropout"),
                            module_dropout=options.get("module_dropout"))
        modules.append(module)
    return LoRANetwork(modules, multiplier), weights_sd
