"""What every network module in this folder shares: the sd-scripts plumbing around one algorithm.

sd-scripts' train_network.py drives a network module through a fixed contract (create_network,
create_network_from_weights, apply_to, prepare_optimizer_params, save_weights, merge_to, ...). This file
implements that contract once, over `AdapterModule`, the small base class each algorithm file subclasses
(para.py, krona.py). It finds the target layers by class name as sd-scripts does, names them with
sd-scripts' keys (`lora_unet_...`, `lora_te_...`, SGM names for SDXL), hooks their forward without
replacing the module objects, and reads and writes the files with sd-scripts' addnet hashes.

Needs only torch, safetensors and the standard library, so the folder can be dropped into sd-scripts.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"

# sd-scripts' defaults, matched by class name so that diffusers' and sd-scripts' own UNet classes both match.
UNET_TRANSFORMER_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
LAYER_CLASSES = ("Linear", "Conv2d")


class NetworkArgsError(ValueError):
    """A network argument (network_dim, network_args, ...) that cannot be used."""


class AdapterFileError(ValueError):
    """An adapter file that cannot be read, or that does not fit the model."""


# --------------------------------------------------------------------------------------------------
# Which layers, under which names


@dataclass(frozen=True)
class Preset:
    """Which layers a preset adapts. Name filters are regexes over the sd-scripts key (`lora_unet_...`)."""

    text_encoder: bool
    conv_blocks: str  # UNet resnet blocks and samplers: "with_conv_dim" (as sd-scripts), "always" or "never"
    only: str | None = None
    exclude: str | None = None
    description: str = ""


PRESETS = {
    "full": Preset(
        text_encoder=True, conv_blocks="with_conv_dim",
        description="sd-scripts' default targets: the Linear/1x1 layers of the UNet's transformer blocks and of "
        "the text encoders' attention and MLP; resnet blocks and samplers too when conv_dim is set"),
    "exca": Preset(
        text_encoder=False, conv_blocks="always", exclude=r"_attn2_|_time_emb_proj$|_emb_layers_1$",
        description="the PaRa paper's choice (ExCA): every layer of the UNet's transformer and resnet blocks and "
        "samplers except cross-attention (attn2) and the time-embedding projections; 3x3 convs at conv_dim "
        "(default: network_dim); no text encoder"),
    "attn-only": Preset(
        text_encoder=True, conv_blocks="never", only=r"_attn[12]_to_(q|k|v|out_0)$|_self_attn_(q|k|v|out)_proj$",
        description="q/k/v/out of the UNet's self- and cross-attention and of the text encoders' self-attention"),
    "sao": Preset(
        text_encoder=False, conv_blocks="never", only=r"_attn1_to_(q|k|v|out_0)$",
        description="self-attention only (the paper's SAO subset): q/k/v/out of the UNet's attn1"),
}


class StackedLinear:
    """Several Linear layers that read the same input, seen as one layer whose outputs are theirs stacked.

    FLUX's fused layers are split in diffusers: BFL's `img_attn.qkv` is `attn.to_q`, `to_k`, `to_v`, and a single
    block's `linear1` is those three plus `proj_mlp`. An adapter keyed on the fused layer acts on this view, so a
    file means the same on either layout. `weight` and `bias` are the parts' stacked (read-only copies: write with
    `set_layer_weight`). Once hooked, the first part called computes the adapted stacked output once and each part
    returns its rows of it; the next call with another input computes afresh.
    """

    def __init__(self, parts: list[nn.Module]):
        if any(part.__class__.__name__ != "Linear" for part in parts):
            raise TypeError("StackedLinear stacks Linear layers only")
        if len({part.weight.shape[1] for part in parts}) != 1:
            raise ValueError("stacked layers must read inputs of one size")
        self.parts = tuple(parts)
        self.sizes = tuple(part.weight.shape[0] for part in parts)
        self._originals = None
        self._served: tuple | None = None  # (input, its version, stacked output, parts served)

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([_stackable(part.weight) for part in self.parts])

    @property
    def bias(self) -> torch.Tensor | None:
        if all(part.bias is None for part in self.parts):
            return None
        return torch.cat([_stackable(part.bias) if part.bias is not None else part.weight.new_zeros(size)
                          for part, size in zip(self.parts, self.sizes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        forwards = self._originals or [part.forward for part in self.parts]
        return torch.cat([forward(x) for forward in forwards], dim=-1)

    __call__ = forward

    def hook(self, adapted_forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._originals = [part.forward for part in self.parts]
        for index, part in enumerate(self.parts):
            part.forward = lambda x, index=index: self._serve(index, x, adapted_forward)

    def unhook(self) -> None:
        for part, original in zip(self.parts, self._originals or []):
            if getattr(original, "__self__", None) is part and original.__func__ is type(part).forward:
                del part.forward
            else:
                part.forward = original
        self._originals = None
        self._served = None

    def _serve(self, index: int, x: torch.Tensor, adapted_forward) -> torch.Tensor:
        served = self._served
        if served is None or served[0] is not x or served[1] != x._version or index in served[3]:
            served = self._served = (x, x._version, adapted_forward(x), set())
        served[3].add(index)
        if len(served[3]) == len(self.parts):
            self._served = None  # every part has its rows: hold no activations
        start = sum(self.sizes[:index])
        return served[2][..., start:start + self.sizes[index]]


def _stackable(tensor: torch.Tensor) -> torch.Tensor:
    """fp8 storage (sd-scripts' --fp8_base, diffusers' layerwise casting) as float32: cat does not take fp8."""
    return tensor.float() if tensor.dtype in FP8_DTYPES else tensor


FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def layer_weights(layer) -> list[tuple[torch.Tensor, slice]]:
    """(weight parameter, its rows in the layer's weight) for a Linear/Conv2d or each part of a StackedLinear."""
    if isinstance(layer, StackedLinear):
        starts = [sum(layer.sizes[:i]) for i in range(len(layer.sizes))]
        return [(part.weight, slice(start, start + size))
                for part, start, size in zip(layer.parts, starts, layer.sizes)]
    return [(layer.weight, slice(None))]


def layer_key(layer) -> tuple[int, ...]:
    """The same for every view of the same weights (a StackedLinear is built afresh by each lookup)."""
    return tuple(id(weight) for weight, _ in layer_weights(layer))


@torch.no_grad()
def set_layer_weight(layer, value: torch.Tensor) -> None:
    """Copy `value` (the layer's weight shape) into the layer's weight, or into each stacked part its rows."""
    for weight, rows in layer_weights(layer):
        weight.copy_(value[rows].to(weight.dtype))


@dataclass(frozen=True)
class TargetLayer:
    lora_name: str  # sd-scripts key, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    layer: nn.Module | StackedLinear  # an nn.Linear or nn.Conv2d of the model, or Linears stacked (FLUX)
    in_unet: bool
    text_encoder_index: int | None = None  # 1-based index for SDXL's two text encoders

    @property
    def is_conv3x3(self) -> bool:
        return self.layer.__class__.__name__ == "Conv2d" and tuple(self.layer.kernel_size) != (1, 1)


def as_text_encoder_list(text_encoder) -> list[nn.Module]:
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [te for te in text_encoder if te is not None]
    return [text_encoder]


def text_encoder_prefixes(text_encoders: list[nn.Module]) -> list[str]:
    """lora_te (one encoder), lora_te1/lora_te2 (SDXL); FLUX's [CLIP-L, T5-XXL] are lora_te1 and lora_te3."""
    if len(text_encoders) == 1:
        return [TEXT_ENCODER_PREFIX]
    return [f"{TEXT_ENCODER_PREFIX}{3 if is_t5(te) else i + 1}" for i, te in enumerate(text_encoders)]


def is_t5(text_encoder: nn.Module) -> bool:
    return text_encoder.__class__.__name__.startswith("T5")


def text_encoder_module_path(text_encoder: nn.Module, path: str) -> str:
    # transformers 5's CLIPTextModel lost its `.text_model` level; keep the names every tool knows.
    return path if hasattr(text_encoder, "text_model") or is_t5(text_encoder) else "text_model." + path


_SGM_RESNET_LAYERS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                      "conv_shortcut": "skip_connection"}


def is_diffusers_sdxl_unet(unet: nn.Module) -> bool:
    config = getattr(unet, "config", None)
    return getattr(config, "addition_embed_type", None) == "text_time" and hasattr(unet, "down_blocks")


def sdxl_unet_path_to_sgm(path: str, up_blocks_with_attention: set[int]) -> str:
    """diffusers SDXL UNet module path -> the SGM/LDM path of sd-scripts' SDXL UNet (input_blocks...).

    Paths outside the down/mid/up blocks (time embedding, conv_in/out) are returned unchanged.
    """
    parts = path.split(".")
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        head = "middle_block.1" if kind == "attentions" else f"middle_block.{2 * index}"
    elif parts[0] in ("down_blocks", "up_blocks"):
        down = parts[0] == "down_blocks"
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            head = f"input_blocks.{3 + 3 * block}.0"
            rest = ["op"] + rest[1:]  # Downsample2D.conv is SGM's Downsample.op
        elif kind == "upsamplers":
            head = f"output_blocks.{3 * block + 2}.{2 if block in up_blocks_with_attention else 1}"
        else:
            number = 1 + 3 * block + index if down else 3 * block + index
            head = f"{'input' if down else 'output'}_blocks.{number}.{0 if kind == 'resnets' else 1}"
    else:
        return path
    if kind == "resnets" and rest and rest[0] in _SGM_RESNET_LAYERS:
        rest = _SGM_RESNET_LAYERS[rest[0]].split(".") + rest[1:]
    return ".".join([head] + rest)


def _unet_path_namer(unet: nn.Module) -> Callable[[str], str]:
    if not is_diffusers_sdxl_unet(unet):
        return lambda path: path
    with_attention = {i for i, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")}
    return lambda path: sdxl_unet_path_to_sgm(path, with_attention)


# FLUX.1. sd-scripts' lora_flux names layers by the BFL model's paths (its own flux_models.Flux, as in the BFL
# checkpoints): every Linear of the DoubleStreamBlock and SingleStreamBlock modules, and with in_dims the
# embedders. diffusers' FluxTransformer2DModel splits BFL's fused layers; these tables give each BFL layer the
# diffusers layers that make it up, in the order of their rows.
FLUX_BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock")
FLUX_T5_BLOCKS = ("T5Attention", "T5DenseGatedActDense")
FLUX_DOUBLE_LAYERS = {  # BFL path in double_blocks.N -> diffusers paths in transformer_blocks.N
    "img_mod.lin": ("norm1.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
FLUX_SINGLE_LAYERS = {  # BFL path in single_blocks.N -> diffusers paths in single_transformer_blocks.N
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
FLUX_EMBEDDERS = {  # lora_flux's in_dims targets, in its order: img_in, time_in, vector_in, guidance_in, txt_in
    "img_in": "x_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
}
# final_layer.adaLN_modulation.1 is diffusers' norm_out.linear with its two output halves swapped (shift and
# scale): no stack of whole layers expresses it, so it is not offered on the diffusers layout.


def flux_layout(model: nn.Module | None) -> str | None:
    """"bfl" (sd-scripts' and BFL's Flux), "diffusers" (FluxTransformer2DModel) or None (not FLUX)."""
    if model is None:
        return None
    if hasattr(model, "double_blocks") and hasattr(model, "single_blocks"):
        return "bfl"
    if hasattr(model, "transformer_blocks") and hasattr(model, "single_transformer_blocks"):
        return "diffusers"
    return None


def flux_layers(model: nn.Module, embedders: bool = True) -> list[tuple[str, str, nn.Module | StackedLinear]]:
    """(BFL path, kind, layer) of every adaptable FLUX layer: kind "block" for the double/single blocks' Linears,
    "embedder" for in_dims' layers. On diffusers a fused BFL layer is a StackedLinear of its parts."""
    found = []
    if flux_layout(model) == "bfl":
        for path, module in model.named_modules():
            if module.__class__.__name__ in FLUX_BLOCKS:
                found += [(f"{path}.{child_path}", "block", child) for child_path, child in module.named_modules()
                          if child.__class__.__name__ == "Linear"]
        modules = dict(model.named_modules())
        found += [(path, "embedder", modules[path]) for path in FLUX_EMBEDDERS if path in modules] if embedders else []
        return found
    modules = dict(model.named_modules())

    def layer(paths):
        parts = [modules[p] for p in paths]
        return parts[0] if len(parts) == 1 else StackedLinear(parts)

    for i in range(len(model.transformer_blocks)):
        found += [(f"double_blocks.{i}.{bfl}", "block", layer([f"transformer_blocks.{i}.{p}" for p in paths]))
                  for bfl, paths in FLUX_DOUBLE_LAYERS.items()]
    for i in range(len(model.single_transformer_blocks)):
        found += [(f"single_blocks.{i}.{bfl}", "block", layer([f"single_transformer_blocks.{i}.{p}" for p in paths]))
                  for bfl, paths in FLUX_SINGLE_LAYERS.items()]
    if embedders:
        found += [(bfl, "embedder", modules[path]) for bfl, path in FLUX_EMBEDDERS.items() if path in modules]
    return found


# lora_flux's per-type ranks (network_args), matched on the sd-scripts key in this order, first match wins
FLUX_TYPE_DIMS = (
    ("img_attn_dim", lambda name: "img_attn" in name),
    ("txt_attn_dim", lambda name: "txt_attn" in name),
    ("img_mlp_dim", lambda name: "img_mlp" in name),
    ("txt_mlp_dim", lambda name: "txt_mlp" in name),
    ("img_mod_dim", lambda name: "img_mod" in name),
    ("txt_mod_dim", lambda name: "txt_mod" in name),
    ("single_dim", lambda name: "single_blocks" in name and "linear" in name),
    ("single_mod_dim", lambda name: "modulation" in name),
)
FLUX_IN_DIMS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")  # in_dims' five values, in order


@dataclass(frozen=True)
class FluxTargets:
    """lora_flux's choice of layers (its network_args), for any algorithm that gives each layer a rank."""

    train_blocks: str = "all"  # "all", "double" or "single"
    train_t5xxl: bool = False
    type_dims: dict = None  # FLUX_TYPE_DIMS name -> rank (0: leave that type out)
    in_dims: tuple | None = None  # five ranks for FLUX_IN_DIMS (0: leave out)
    double_indices: frozenset | None = None  # None: every block
    single_indices: frozenset | None = None


def flux_block_index(name: str) -> int:
    return int(name.split("_")[4])  # lora_unet_double_blocks_N_...


def select_flux_layers(text_encoder, flux, targets: FluxTargets, rank: int, with_text_encoder: bool = True,
                       include: str | None = None, exclude: str | None = None) -> list[tuple[TargetLayer, int]]:
    """(layer, rank) for every layer lora_flux would train with these network_args (include/exclude after)."""
    te_blocks = TEXT_ENCODER_BLOCKS + (FLUX_T5_BLOCKS if targets.train_t5xxl else ())  # CLIP-L; T5 when asked
    chosen = [(t, rank) for t in named_layers(text_encoder, None, None, te_blocks)] if with_text_encoder else []
    for path, kind, layer in flux_layers(flux):
        name = lora_name(UNET_PREFIX, path)
        if kind == "embedder":
            which = next(i for i, stem in enumerate(FLUX_IN_DIMS) if path.startswith(stem))
            layer_rank = targets.in_dims[which] if targets.in_dims else 0
        else:
            double = path.startswith("double_blocks.")
            if targets.train_blocks != "all" and targets.train_blocks != ("double" if double else "single"):
                continue
            indices = targets.double_indices if double else targets.single_indices
            if indices is not None and flux_block_index(name) not in indices:
                continue
            layer_rank = next((targets.type_dims[key] for key, matches in FLUX_TYPE_DIMS
                               if matches(name) and (targets.type_dims or {}).get(key) is not None), rank)
        if layer_rank:
            chosen.append((TargetLayer(name, layer, True, None), layer_rank))
    return [(t, r) for t, r in chosen
            if not (include and not re.search(include, t.lora_name)) and not (exclude and re.search(exclude, t.lora_name))]


def lora_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def named_layers(text_encoder, unet, block_classes_unet: Iterable[str] | None = None,
                 block_classes_te: Iterable[str] | None = None) -> list[TargetLayer]:
    """Linear/Conv2d layers under the given block classes (None: every layer), with their sd-scripts names.

    A layer reachable through several target blocks is listed once.
    """
    found: dict[str, TargetLayer] = {}

    def collect(root, prefix, blocks, namer, in_unet, te_index):
        for path, module in root.named_modules():
            if blocks is not None and module.__class__.__name__ not in blocks:
                continue
            for child_path, child in (module.named_modules() if blocks is not None else [("", module)]):
                if child.__class__.__name__ not in LAYER_CLASSES:
                    continue
                full_path = ".".join(p for p in (path, child_path) if p)
                name = lora_name(prefix, namer(full_path))
                if name in found and found[name].layer is not child:
                    raise RuntimeError(f"two layers map to the same key {name}")
                found[name] = TargetLayer(name, child, in_unet, te_index)

    text_encoders = as_text_encoder_list(text_encoder)
    for i, (te, prefix) in enumerate(zip(text_encoders, text_encoder_prefixes(text_encoders))):
        te_index = i + 1 if len(text_encoders) > 1 else None
        blocks = block_classes_te
        if blocks is not None and is_t5(te):
            blocks = [b for b in blocks if b in FLUX_T5_BLOCKS]  # T5 only when asked for by its own classes
        collect(te, prefix, blocks, lambda p, te=te: text_encoder_module_path(te, p), False, te_index)
    if flux_layout(unet):
        # FLUX: the blocks' Linears; everything else (the embedders) only when no block classes narrow the search
        for path, kind, layer in flux_layers(unet, embedders=block_classes_unet is None):
            name = lora_name(UNET_PREFIX, path)
            found[name] = TargetLayer(name, layer, True, None)
    elif unet is not None:
        collect(unet, UNET_PREFIX, block_classes_unet, _unet_path_namer(unet), True, None)
    return list(found.values())


def select_target_layers(text_encoder, unet, preset: Preset, conv_dim_set: bool,
                         include: str | None = None, exclude: str | None = None) -> list[TargetLayer]:
    """The layers a preset adapts, narrowed by the user's include/exclude regexes over sd-scripts keys."""
    with_conv = preset.conv_blocks == "always" or (preset.conv_blocks == "with_conv_dim" and conv_dim_set)
    unet_blocks = UNET_TRANSFORMER_BLOCKS + (UNET_CONV_BLOCKS if with_conv else ())
    te_blocks = TEXT_ENCODER_BLOCKS if preset.text_encoder else ()
    selected = []
    for target in named_layers(text_encoder, unet, unet_blocks, te_blocks):
        name = target.lora_name
        if (preset.only and not re.search(preset.only, name)) or (preset.exclude and re.search(preset.exclude, name)):
            continue
        if (include and not re.search(include, name)) or (exclude and re.search(exclude, name)):
            continue
        selected.append(target)
    return selected


# --------------------------------------------------------------------------------------------------
# network_args: strings from sd-scripts' command line, checked once here


def closest(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def parse_network_args(kwargs: dict, spec: dict[str, Callable], unsupported: dict[str, str] | None = None) -> dict:
    """Convert sd-scripts' string network_args with `spec` (name -> converter); unknown names are errors."""
    parsed = {}
    for key, value in kwargs.items():
        if unsupported and key in unsupported:
            raise NetworkArgsError(f"network_args {key} is not supported by this network module: {unsupported[key]}")
        if key not in spec:
            raise NetworkArgsError(
                f"unknown network_args key {key!r}{closest(key, spec)}; known keys: {', '.join(sorted(spec))}")
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")
                             and not getattr(spec[key], "reads_none", False)):
            parsed[key] = None
            continue
        try:
            parsed[key] = spec[key](value)
        except (TypeError, ValueError) as error:
            raise NetworkArgsError(f"network_args {key}={value!r}: {error}") from None
    return parsed


# sd-scripts LoRA arguments that other algorithms refuse (each says why in its UNSUPPORTED_ARGS).
BLOCK_DIM_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
BLOCK_LR_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def refused_lora_args(block_dims: str, block_lrs: str, loraplus: str) -> dict[str, str]:
    """sd-scripts LoRA network_args that an algorithm refuses, each group with the algorithm's reason."""
    return ({key: block_dims for key in BLOCK_DIM_ARGS} | {key: block_lrs for key in BLOCK_LR_ARGS}
            | {key: loraplus for key in LORAPLUS_ARGS})


def positive_int(value) -> int:
    number = int(str(value).strip()) if not isinstance(value, int) else value
    if number <= 0:
        raise ValueError("must be a whole number above 0")
    return number


def probability(value) -> float:
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise ValueError("must be a probability in [0, 1)")
    return number


def regex(value) -> str:
    try:
        re.compile(str(value))
    except re.error as error:
        raise ValueError(f"not a valid regular expression ({error})") from None
    return str(value)


def choice(choices: Iterable[str]) -> Callable[[str], str]:
    options = list(choices)

    def convert(value) -> str:
        value = str(value).strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}{closest(value, options)}")
        return value

    return convert


def non_negative_int(value) -> int:
    number = int(str(value).strip()) if not isinstance(value, int) else value
    if number < 0:
        raise ValueError("must be a whole number, 0 or more (0 leaves the layers out)")
    return number


def boolean(value) -> bool:
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise ValueError("must be True or False")
    return text == "true"


def five_ints(value) -> tuple[int, ...]:
    """lora_flux's in_dims: "[a,b,c,d,e]" or "a,b,c,d,e" (ranks for img_in, time_in, vector_in, guidance_in,
    txt_in)."""
    items = [item for item in str(value).strip().strip("[]").split(",") if item.strip()]
    numbers = tuple(non_negative_int(item) for item in items)
    if len(numbers) != len(FLUX_IN_DIMS):
        raise ValueError(f"needs 5 whole numbers, one each for {', '.join(FLUX_IN_DIMS)} (0 leaves one out)")
    return numbers


def block_indices(value) -> frozenset | None:
    """lora_flux's train_double/single_block_indices: "all", "none" or a list such as "0,1,4-5"."""
    text = str(value).strip().lower()
    if text == "all":
        return None
    if text in ("none", ""):
        return frozenset()
    chosen = set()
    for item in text.split(","):
        first, dash, last = item.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError("must be all, none or block numbers and ranges such as 0,1,4-5")
        chosen |= set(range(int(first), int(last if dash else first) + 1))
    return frozenset(chosen)


block_indices.reads_none = True  # "none" is a value here (no block), not "unset"


# lora_flux's network_args (flux-contract §1.2) as this folder reads them; only for FLUX models
FLUX_NETWORK_ARGS = {
    "train_blocks": choice(("all", "double", "single")),
    "train_t5xxl": boolean,
    "split_qkv": boolean,
    "in_dims": five_ints,
    "train_double_block_indices": block_indices,
    "train_single_block_indices": block_indices,
    "verbose": boolean,
    **{key: non_negative_int for key, _ in FLUX_TYPE_DIMS},
}
FLUX_UNSUPPORTED_ARGS = {
    "ggpo_beta": "GGPO perturbs LoRA's weights by their norms; it has no PaRa form",
    "ggpo_sigma": "GGPO perturbs LoRA's weights by their norms; it has no PaRa form",
    "network_reg_dims": "use img_attn_dim ... single_mod_dim, in_dims, include/exclude to set ranks per layer",
    "network_reg_lrs": "per-module learning rates are not implemented here",
}


def flux_targets(args: dict, flux) -> FluxTargets:
    """FluxTargets from parsed network_args; FLUX-only arguments on another model are an error."""
    given = sorted(key for key in FLUX_NETWORK_ARGS if key in args and args[key] is not None)
    if not flux_layout(flux):
        if given:
            raise NetworkArgsError(f"network_args {given[0]} is for FLUX.1 models (sd-scripts' lora_flux); this "
                                   "model is a Stable Diffusion UNet")
        return FluxTargets()
    return FluxTargets(
        train_blocks=args.get("train_blocks") or "all",
        train_t5xxl=bool(args.get("train_t5xxl")),
        type_dims={key: args[key] for key, _ in FLUX_TYPE_DIMS if args.get(key) is not None},
        in_dims=args.get("in_dims"),
        double_indices=args.get("train_double_block_indices"),
        single_indices=args.get("train_single_block_indices"),
    )


# --------------------------------------------------------------------------------------------------
# Files: read with clear errors, write atomically with sd-scripts' addnet hashes


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' sshs_model_hash and sshs_legacy_hash, over the file as written with only ss_* metadata."""
    from safetensors.torch import save

    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_size = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_size:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a truncated file under `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(handle)
    try:
        write(temp_path)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def write_adapter_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """.safetensors with metadata and addnet hashes; .pt/.ckpt as a plain tensor dict, as sd-scripts does."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        metadata = dict(metadata or {})
        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = addnet_hashes(tensors, metadata)
        _atomic_write(path, lambda temp: save_file(tensors, temp, metadata))
    else:
        _atomic_write(path, lambda temp: torch.save(tensors, temp))


def empty_file_message(path: str) -> str:
    return f"{path} is empty (0 bytes): the download or copy did not finish; fetch it again"


def pickle_refused_message(path: str) -> str:
    """What to say of a .pt/.ckpt that torch.load(weights_only=True) refuses: it holds more than tensors."""
    return (f"{path} is a pickle that holds more than tensors, and pickles are never unpickled here (loading one can "
            "run any code in it). Convert it to .safetensors once, where you trust the file (e.g. with "
            "safetensors.torch.save_file on its state dict), and give that file")


def non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of the tensors that hold NaN or Inf."""
    return [key for key, tensor in tensors.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def read_adapter_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file; .pt/.ckpt load with weights_only (no code is run). A file that
    holds NaN or Inf is refused: applied, exported or merged, it would only spread them."""
    tensors, metadata = _read_tensor_file(path)
    bad = non_finite_keys(tensors)
    if bad:
        raise AdapterFileError(f"{path} holds NaN or Inf in {len(bad)} of its {len(tensors)} tensors (e.g. {bad[0]}): "
                               "the training that wrote it diverged. Use an earlier save, or train again with a lower "
                               "learning rate")
    return tensors, metadata


def _read_tensor_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        raise AdapterFileError(f"adapter file not found: {path}")
    if os.path.getsize(path) == 0:
        raise AdapterFileError(empty_file_message(path))
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except Exception as error:  # safetensors raises its own error types for every kind of damage
            raise AdapterFileError(
                f"{path} is not a readable .safetensors file (truncated or corrupt?): {error}. "
                "Re-download or re-export it.") from None
        return tensors, metadata
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AdapterFileError(pickle_refused_message(path)) from None
    except Exception as error:
        raise AdapterFileError(f"{path} is not a readable tensor file ({type(error).__name__}); save it as "
                               ".safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFileError(f"{path} does not hold a dict of tensors")
    return state, {}


def group_by_module(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`lora_unet_x.para_q` -> {"lora_unet_x": {"para_q": ...}}: split at the first dot, as the WebUIs do."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        groups.setdefault(standard_module_name(module), {})[part] = tensor
    return groups


_CLIP_WITHOUT_TEXT_MODEL = re.compile(r"^(lora_te[12]?)_encoder_layers_")


def standard_module_name(name: str) -> str:
    """LyCORIS (4.1.3) under transformers 5 names CLIP's layers without the `text_model` level that CLIPTextModel
    lost there (lora_te_encoder_layers_0_mlp_fc1); sd-scripts, the WebUIs and this project write
    lora_te_text_model_encoder_layers_0_mlp_fc1. lora_te3 (FLUX's T5) has no such level and is left alone."""
    return _CLIP_WITHOUT_TEXT_MODEL.sub(r"\1_text_model_encoder_layers_", name)


def rename_modules(path: str, renames: dict[str, str], out: str) -> None:
    """Copy the safetensors adapter `path` to `out` with its modules renamed (old -> new); metadata kept, hashes
    computed again, written through a temporary name."""
    tensors, metadata = _read_tensor_file(path)
    renamed = {}
    for key, tensor in tensors.items():
        module, dot, part = key.partition(".")
        renamed[renames.get(module, module) + dot + part] = tensor
    write_adapter_file(out, renamed, metadata)


def file_modules(path: str) -> set[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {key.partition(".")[0] for key in f.keys()}


def standardize_module_names(path: str) -> int:
    """Give a safetensors adapter written by another network module (LyCORIS under transformers 5) the module names
    every front end reads (standard_module_name), in place; the number of modules renamed (0: file untouched)."""
    renames = {m: standard_module_name(m) for m in file_modules(path) if standard_module_name(m) != m}
    if renames:
        rename_modules(path, renames, path)
    return len(renames)


def renames_for_network(path: str, network_modules: set[str]) -> dict[str, str]:
    """File module -> the network's own name for it, where the network names a module otherwise than the file's
    standard name (LyCORIS under transformers 5 loading a file with sd-scripts' text-encoder names)."""
    own_by_standard = {standard_module_name(m): m for m in network_modules if standard_module_name(m) != m}
    return {m: own_by_standard[m] for m in file_modules(path) if m not in network_modules and m in own_by_standard}


def module_kind_of_parts(parts) -> str:
    """The adapter type of one module from its part names (`lora_up.weight`, `para_q`, ...)."""
    parts = set(parts)
    if "para_q" in parts:
        return "native PaRa"
    if any(part.startswith("stage") and part.endswith((".para_q", ".lora_up")) for part in parts):
        return "native PaRa chain"
    if {"lora_up.weight", "lora_down.weight"} <= parts or {"lora_A.weight", "lora_B.weight"} <= parts:
        return "LoRA"
    if {"lora.up.weight", "lora.down.weight"} <= parts or \
            {"lora_linear_layer.up.weight", "lora_linear_layer.down.weight"} <= parts:
        return "diffusers/peft LoRA"
    if "hada_w1_a" in parts:
        return "LoHa"
    if parts & {"lokr_w1", "lokr_w1_a"}:
        return "LoKr"
    if "diff" in parts:
        return "full/diff"
    if parts & {"oft_blocks", "oft_diag"}:
        return "OFT"
    if {"weight", "on_input"} <= parts:
        return "IA3"
    if "a1.weight" in parts:
        return "GLoRA"
    if parts & {"w_norm", "b_norm"}:
        return "norm"
    return "unknown"


def describe_file_model(metadata: dict[str, str]) -> str:
    version = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture")
    return f" (the file says it was trained on {version})" if version else ""


# --------------------------------------------------------------------------------------------------
# One adapted layer


class AdapterModule(nn.Module):
    """One adapted Linear/Conv2d layer. Subclasses give the algorithm; this class hooks, merges and restores.

    The base layer is hooked as sd-scripts does (its `forward` attribute is replaced; the module object and
    its name stay), and kept outside this module's parameters and state_dict.
    """

    # The tensors this module writes to a file, without the "<lora_name>." prefix (what loaders key on).
    file_keys: tuple[str, ...] = ()

    def __init__(self, lora_name: str, layer: nn.Module, multiplier: float = 1.0, dropout: float | None = None,
                 rank_dropout: float | None = None, module_dropout: float | None = None):
        super().__init__()
        if layer.__class__.__name__ not in LAYER_CLASSES and not isinstance(layer, StackedLinear):
            raise TypeError(f"{lora_name}: cannot adapt a {layer.__class__.__name__}")
        self.lora_name = lora_name
        self._base = (layer,)  # a tuple hides the layer from parameters(), state_dict() and .to()
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.merged = False
        self._org_forward = None
        self._weight_backup: torch.Tensor | None = None

    @property
    def layer(self) -> nn.Module:
        return self._base[0]

    @property
    def is_conv(self) -> bool:
        return self.layer.__class__.__name__ == "Conv2d"

    @property
    def out_features(self) -> int:
        return self.layer.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.layer.weight[0].numel()  # in * kh * kw for a conv

    # ---- hooking

    def apply_to(self) -> None:
        if self._org_forward is not None:
            return
        self._org_forward = self.layer.forward
        if isinstance(self.layer, StackedLinear):
            self.layer.hook(self.forward)
        else:
            self.layer.forward = self.forward

    def remove(self) -> None:
        """Give the layer its own forward back."""
        if self._org_forward is None:
            return
        if isinstance(self.layer, StackedLinear):
            self.layer.unhook()
            self._org_forward = None
            return
        if self.layer.__dict__.get("forward") == self.forward:
            if getattr(self._org_forward, "__self__", None) is self.layer and \
                    self._org_forward.__func__ is type(self.layer).forward:
                del self.layer.forward
            else:
                self.layer.forward = self._org_forward
        self._org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        if self.merged or self.multiplier == 0:
            return out
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return out
        return self.adapt_output(x, out)

    # ---- what an algorithm supplies

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW in float32 and the layer's weight shape, with the multiplier applied."""
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # ---- merging into the base weight and back

    @torch.no_grad()
    def merge(self, device=None) -> None:
        """W <- W + ΔW, computed in float32; `restore_weight` gives W back bit for bit."""
        if self.merged:
            return
        weight = self.layer.weight
        self._weight_backup = weight.detach().to("cpu", copy=True)
        if device is not None:
            self.to(device)
        delta = self.delta_weight().to(weight.device)
        set_layer_weight(self.layer, weight.to(delta.dtype) + delta)
        self.merged = True

    @torch.no_grad()
    def restore_weight(self) -> None:
        if not self.merged:
            return
        set_layer_weight(self.layer, self._weight_backup)
        self._weight_backup = None
        self.merged = False

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------
# The network: sd-scripts' interface over a set of AdapterModules


class AdapterNetwork(nn.Module):
    """sd-scripts' network interface (kohya-contract §1), shared by every algorithm in this folder."""

    network_module = "networks.adapter_base"  # what ss_network_module says; subclasses override
    file_kinds: tuple[str, ...] = ()  # what module_kind_of_parts says of this network's own files
    train_t5xxl = False  # flux_train_network.py reads it (FLUX: T5-XXL layers in the network)

    def __init__(self, modules: list[AdapterModule], multiplier: float = 1.0, metadata: dict | None = None):
        super().__init__()
        self.multiplier = multiplier
        self.text_encoder_modules = [m for m in modules if not m.lora_name.startswith(UNET_PREFIX)]
        self.unet_modules = [m for m in modules if m.lora_name.startswith(UNET_PREFIX)]
        self.file_metadata = dict(metadata or {})  # what this network writes into every file it saves
        for module in modules:
            module.multiplier = multiplier
            self.add_module(module.lora_name, module)  # state_dict keys: <lora_name>.<parameter>

    @property
    def adapter_modules(self) -> list[AdapterModule]:
        return self.text_encoder_modules + self.unet_modules

    # ---- sd-scripts' calls

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        dropped = (self.text_encoder_modules if not apply_text_encoder else []) + (
            self.unet_modules if not apply_unet else [])
        for module in dropped:
            delattr(self, module.lora_name)
        self.text_encoder_modules = self.text_encoder_modules if apply_text_encoder else []
        self.unet_modules = self.unet_modules if apply_unet else []
        for module in self.adapter_modules:
            module.apply_to()

    def restore(self) -> None:
        """Un-hook every layer (the reverse of apply_to)."""
        for module in self.adapter_modules:
            module.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for module in self.adapter_modules:
            module.multiplier = multiplier

    def is_mergeable(self) -> bool:
        return True

    def load_weights(self, file: str):
        tensors, metadata = read_adapter_file(file)
        self.check_file_fits(group_by_module(tensors), metadata, file)
        return self.load_file_state(tensors, file)

    def check_file_fits(self, groups: dict[str, dict], metadata: dict, file: str) -> None:
        """AdapterFileError when a file given to continue training is of another kind (a LoRA for PaRa) or from
        another model (almost none of its modules has a layer in this network)."""
        kinds = {module_kind_of_parts(parts) for parts in groups.values()} - {"unknown"}
        if not kinds:
            keys = ", ".join(sorted(groups)[:3]) + (", ..." if len(groups) > 3 else "")
            raise AdapterFileError(f"{file} holds no adapter modules (its keys: {keys}); give a file this network "
                                   "wrote")
        if self.file_kinds and not kinds & set(self.file_kinds):
            raise AdapterFileError(
                f"{file} is a {', '.join(sorted(kinds))} file; {self.network_module} continues training only from "
                f"its own {self.file_kinds[0]} files. To start from it, bake it into the base model (para-trainer "
                "export FILE --to merged --model BASE -o MERGED.safetensors) and train on that")
        names = {m.lora_name for m in self.adapter_modules}
        matched = len(set(groups) & names)
        if groups and matched * 10 < len(groups):  # nothing or almost nothing in common
            raise AdapterFileError(
                f"{file} does not fit this model: {matched} of its {len(groups)} modules have a layer in this "
                f"network{describe_file_model(metadata) or ' (the file does not say which model it was trained on)'}"
                ". Give a file trained on this base model, or leave --network_weights out to start afresh")

    def load_file_state(self, tensors: dict[str, torch.Tensor], source: str = "the weights"):
        """Load file tensors into the modules; returns (missing modules, unexpected modules) as sd-scripts prints."""
        groups = group_by_module(tensors)
        by_name = {m.lora_name: m for m in self.adapter_modules}
        for name, module in by_name.items():
            if name in groups:
                module.load_file_tensors(groups[name])
        missing = sorted(set(by_name) - set(groups))
        unexpected = sorted(set(groups) - set(by_name))
        if missing or unexpected:
            logger.warning("%s: %d modules of the network not in %s, %d modules of it not in the network",
                           self.network_module, len(missing), source, len(unexpected))
        return {"missing_modules": missing, "unexpected_modules": unexpected}

    def enable_gradient_checkpointing(self) -> None:
        pass  # nothing to do: adapters recompute with their layers

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def on_step_start(self, text_encoder=None, unet=None) -> None:
        pass

    def get_trainable_params(self):
        return self.parameters()

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        if isinstance(text_encoder_lr, (list, tuple)):
            text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
        return self.prepare_optimizer_params_with_multiple_te_lrs(text_encoder_lr, unet_lr, default_lr)

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr=None, unet_lr=None, default_lr=None):
        """One group per text encoder (SDXL: one learning rate each, or one for both) and one for the UNet."""
        te_lrs = list(text_encoder_lr) if isinstance(text_encoder_lr, (list, tuple)) else [text_encoder_lr]
        by_encoder: dict[str, list[AdapterModule]] = {}
        for module in self.text_encoder_modules:
            by_encoder.setdefault(module.lora_name.split("_")[1], []).append(module)  # "te", "te1", "te2"
        groups, descriptions = [], []

        def add(modules, lr, description):
            params = [p for m in modules for p in m.parameters()]
            lr = default_lr if lr is None else lr
            if not params or lr == 0:
                return
            group = {"params": params}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
            descriptions.append(description)

        for i, (encoder, modules) in enumerate(sorted(by_encoder.items())):
            lr = te_lrs[min(i, len(te_lrs) - 1)] if te_lrs else None
            add(modules, lr, "textencoder" if len(by_encoder) == 1 else f"textencoder{i + 1}")
        add(self.unet_modules, unet_lr, "unet")
        return groups, descriptions

    def apply_max_norm_regularization(self, max_norm_value, device):
        raise NotImplementedError

    # ---- files

    def file_state(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        state = {}
        for module in self.adapter_modules:
            for key, tensor in module.file_tensors().items():
                state[f"{module.lora_name}.{key}"] = tensor.to(dtype) if dtype is not None else tensor
        return state

    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: dict | None = None) -> None:
        metadata = dict(metadata) if metadata else {}
        for key, value in self.file_metadata.items():
            metadata.setdefault(key, value)
        metadata.setdefault("ss_network_module", self.network_module)
        write_adapter_file(file, self.file_state(dtype), metadata)

    # ---- merging (sd-scripts' --base_weights and inference)

    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        if weights_sd is not None:
            self.load_file_state(weights_sd)
        for module in self.adapter_modules:
            module.merge(device)

    def restore_weights(self) -> None:
        """Undo merge_to: every merged layer gets its original weight back, bit for bit."""
        for module in self.adapter_modules:
            module.restore_weight()

    def trainable_parameter_count(self) -> int:
        return sum(m.trainable_parameter_count() for m in self.adapter_modules)


def layers_for_file(text_encoder, unet, groups: dict[str, dict], metadata: dict, file: str) -> list[TargetLayer]:
    """The model layers a file's modules belong to; the first module that does not fit is an error."""
    layers = {t.lora_name: t for t in named_layers(text_encoder, unet)}
    for name in groups:
        if name not in layers:
            raise AdapterFileError(
                f"{file} does not fit this model: its module {name} has no layer in the model"
                f"{describe_file_model(metadata)}. Use the base model the adapter was trained on.")
    return [target for name, target in layers.items() if name in groups]  # the model's order, as create_network
