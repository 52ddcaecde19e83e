"""DiffuseKronA — Kronecker adapters (Marjit et al., WACV 2025) as an sd-scripts network module, saved as LoKr.

Per adapted layer KronA learns two small matrices and adds their Kronecker product to the weight:

    ΔW = A ⊗ B     A: a1 x a2,   B: (d_out/a1) x (d_in/a2)        (conv: B is (d_out/a1, d_in/a2, kh, kw))

ΔW is the textbook `torch.kron(A, B)` (for a conv ΔW[o, i] = A[o // b1, i // b2] · B[o % b1, i % b2] with
B's kernel), not the row-permuted variant the authors' reference code computes. The scale is 1, as in the
paper and as LoKr uses for two full factors; the network multiplier applies on top. A starts random
(N(0, 1/a1²), the paper's init) and B at zero, so ΔW = 0 at step 0. Use it as `--network_module=networks.krona`.

network_args (strings, as sd-scripts passes them):
    a1, a2     the factor A's shape (default 64, 8: the paper's released scripts; its ablation also likes 4, 64).
               A dimension that a1 (of d_out) or a2 (of d_in) does not divide uses the divisor of that dimension
               nearest to the request (ties: the smaller one), with one log line per adjusted shape
               (`factor_pair`).
    preset     "attention" (default, the paper's targets: q/k/v/out of the UNet's self- and cross-attention, no
               text encoder) or one of networks.para's presets (full, exca, attn-only, sao).
    include, exclude   regexes over the sd-scripts module names (lora_unet_...), narrowing the preset.
    conv_dim   any value: switches on the resnet/sampler conv layers where the preset allows them (as in
               sd-scripts); conv layers use the same a1/a2, B carries the kernel. conv_alpha: no effect.
    dropout    dropout on the adapter's input (also --network_dropout); module_dropout: skip a whole layer.
network_dim and network_alpha have no effect (logged): the shapes come from a1/a2 and the scale is 1.

File format: LyCORIS LoKr with two full factors, sd-scripts key names; per adapted layer
    <lora_name>.lokr_w1   float (a1, a2)                 A
    <lora_name>.lokr_w2   float (b1, b2) or (b1, b2, kh, kw) for a conv          B
    <lora_name>.alpha     float scalar, 1.0               (ignored: two full factors mean scale 1 in every loader)
plus the metadata passed in, `ss_network_module`, `krona.format_version` and sd-scripts' `sshs_*` hashes.
AUTOMATIC1111, Forge and ComfyUI load it as LoKr with no extension (they use kron(lokr_w1, lokr_w2) for any
shape). LyCORIS's own loader guesses one `factor` from the shapes, so it rebuilds only pairs that its
`factorization` could produce (A = (f, f) with f dividing both sides and f <= d/f, e.g. a1 = a2 = 16 on SD
attention; or its balanced default), not the paper's (64, 8). diffusers has no LoKr loader: use the LoRA
from `krona_lora_factors`. Any LoKr file (full or low-rank factors, Tucker; not DoRA) loads here, its scale
folded into A.

Inside an sd-scripts checkout: sd-scripts ships its own, different networks/krona.py. Copy this file there
under another name beside adapter_base.py (e.g. networks/para_krona.py) and pass
--network_module=networks.para_krona; files record that name in ss_network_module.

Needs only torch, safetensors, the standard library and adapter_base.py beside it.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_base import (
    PRESETS,
    AdapterFileError,
    AdapterModule,
    AdapterNetwork,
    NetworkArgsError,
    Preset,
    choice,
    describe_file_model,
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

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
W1_KEY, W2_KEY, ALPHA_KEY = "lokr_w1", "lokr_w2", "alpha"
DEFAULT_A1, DEFAULT_A2 = 64, 8


# --------------------------------------------------------------------------------------------------
# Functional core


def factor_pair(dimension: int, requested: int) -> int:
    """The factor used for `dimension` when `requested` is asked: `requested` if it divides `dimension`, else the
    divisor of `dimension` nearest to it (ties: the smaller divisor). The other factor is dimension // result.

    E.g. factor_pair(320, 64) = 64, factor_pair(32, 64) = 32, factor_pair(320, 48) = 40, factor_pair(100, 15) = 10.
    """
    if dimension <= 0 or requested <= 0:
        raise ValueError(f"dimension {dimension} and factor {requested} must be above 0")
    divisors = [d for d in range(1, dimension + 1) if dimension % d == 0]
    return min(divisors, key=lambda d: (abs(d - requested), d))


def kron_delta_weight(a: torch.Tensor, b: torch.Tensor, weight_shape, scale: float = 1.0) -> torch.Tensor:
    """ΔW = scale · kron(A, B) in the layer weight's shape, the rule of LyCORIS, AUTOMATIC1111 and ComfyUI.

    Linear: A (a1, a2), B (b1, b2). Conv: B (b1, b2, kh, kw), A taken as (a1, a2, 1, 1); a 2-D B of shape
    (b1, b2·kh·kw) gives the same ΔW after the reshape. Computed in A's dtype (promote to float32 first if needed).
    """
    if b.dim() > a.dim():
        a = a.reshape(*a.shape, *[1] * (b.dim() - a.dim()))
    delta = torch.kron(a, b.to(a.dtype))
    if scale != 1:
        delta = delta * scale
    return delta.reshape(tuple(weight_shape))


def krona_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, stride=1, padding=0,
                  dilation=1) -> torch.Tensor:
    """(A ⊗ B) x without forming A ⊗ B: the adapter's contribution to the layer output (scale 1).

    Linear (B 2-D, x (..., d_in)): each x as X (a2, b2) gives vec(A X Bᵀ). Conv2d (B 4-D, x (N, d_in, H, W)): B
    convolves each of the a2 input-channel groups and A mixes the groups, or A first, whichever costs less.
    """
    a, b = a.to(x.dtype), b.to(x.dtype)
    a1, a2 = a.shape
    b1, b2 = b.shape[:2]
    if b.dim() == 2:
        xs = x.reshape(*x.shape[:-1], a2, b2)
        if a2 * b1 * (b2 + a1) <= a1 * b2 * (a2 + b1):
            y = torch.matmul(a, torch.matmul(xs, b.t()))  # (..., a2, b1) -> (..., a1, b1)
        else:
            y = torch.matmul(torch.matmul(a, xs), b.t())  # (..., a1, b2) -> (..., a1, b1)
        return y.reshape(*x.shape[:-1], a1 * b1)
    if x.dim() == 3:  # an unbatched image
        return krona_forward(x[None], a, b, stride, padding, dilation)[0]
    n, _, h, w = x.shape
    kernel = b.shape[2] * b.shape[3]
    if a1 * b2 * (a2 + b1 * kernel) < a2 * b1 * (b2 * kernel + a1):
        mixed = torch.einsum("ij,njchw->nichw", a, x.reshape(n, a2, b2, h, w)).reshape(n * a1, b2, h, w)
        y = F.conv2d(mixed, b, None, stride, padding, dilation)  # (n·a1, b1, H', W')
    else:
        z = F.conv2d(x.reshape(n * a2, b2, h, w), b, None, stride, padding, dilation)  # (n·a2, b1, H', W')
        y = torch.einsum("ij,njphw->niphw", a, z.reshape(n, a2, b1, *z.shape[-2:]))
    return y.reshape(n, a1 * b1, *y.shape[-2:])


def krona_lora_factors(a: torch.Tensor, b: torch.Tensor, weight_shape, scale: float = 1.0,
                       rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ΔW = scale · kron(A, B) as a kohya LoRA/LoCon pair: (up, down, relative Frobenius error of up @ down).

    With A = Ua Sa Vaᵀ and B = Ub Sb Vbᵀ, kron(A, B) = kron(Ua, Ub) kron(Sa, Sb) kron(Va, Vb)ᵀ is an SVD of ΔW:
    its singular values are the products sa_i·sb_j. rank=None keeps every non-zero one (rank(A)·rank(B), exact
    up to rounding); rank=k keeps the k largest products, and the error reported is that of the dropped ones.
    Each kept singular value is split as √s between up and down. Linear: up (out, k), down (k, in); conv: up
    (out, k, 1, 1), down (k, in, kh, kw). float32 (float64 for float64 input); at least rank 1 (zeros if ΔW = 0).
    """
    out_dtype = torch.promote_types(a.dtype, torch.float32)
    weight_shape = tuple(weight_shape)
    a64 = a.detach().to(torch.float64)
    b64 = b.detach().reshape(b.shape[0], -1).to(torch.float64)  # a conv kernel goes with B's columns
    ua, sa, vha = torch.linalg.svd(a64, full_matrices=False)
    ub, sb, vhb = torch.linalg.svd(b64, full_matrices=False)
    products = torch.outer(sa, sb).flatten() * abs(scale)  # index i·len(sb) + j
    order = torch.argsort(products, descending=True)
    tolerance = products.max() * max(weight_shape[0], math.prod(weight_shape[1:])) * torch.finfo(out_dtype).eps
    exact_rank = int((products > tolerance).sum())
    keep = max(1, min(exact_rank, rank if rank is not None else exact_rank))
    kept = order[:keep]
    i, j = kept // len(sb), kept % len(sb)
    root = products[kept].sqrt()
    up = (ua[:, i][:, None, :] * ub[:, j][None, :, :]).reshape(-1, keep) * root * (-1.0 if scale < 0 else 1.0)
    down = (vha[i][:, :, None] * vhb[j][:, None, :]).reshape(keep, -1) * root[:, None]
    total = products.square().sum()
    dropped = total - products[kept].square().sum()
    error = float((dropped.clamp_min(0) / total).sqrt()) if total > 0 else 0.0
    up, down = up.to(out_dtype), down.to(out_dtype)
    if len(weight_shape) == 4:
        return up[:, :, None, None].contiguous(), down.reshape(keep, *weight_shape[1:]).contiguous(), error
    return up.contiguous(), down.contiguous(), error


def lokr_full_factors(parts: dict[str, torch.Tensor], weight_shape, name: str = "module") -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
    """Any LoKr module's tensors -> full (A, B) with ΔW = kron(A, B) as the WebUIs compute it.

    Low-rank factors are multiplied out (Tucker: lokr_t2 rebuilt), and the loaders' scale (alpha / dim when a
    factor is low-rank, dim from lokr_w2_b or else lokr_w1_b; 1 for two full factors) is folded into A.
    B comes back in the layer's layout: (b1, b2), or (b1, b2, kh, kw) for a conv.
    """
    if "dora_scale" in parts:
        raise AdapterFileError(f"{name}: a LoKr file with DoRA (dora_scale) cannot load into networks.krona")
    w1 = parts.get("lokr_w1")
    if w1 is None and "lokr_w1_a" in parts and "lokr_w1_b" in parts:
        w1 = parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
    w2 = parts.get("lokr_w2")
    if w2 is None and "lokr_t2" in parts and "lokr_w2_a" in parts and "lokr_w2_b" in parts:
        w2 = torch.einsum("ij...,ip,jr->pr...", parts["lokr_t2"].float(), parts["lokr_w2_a"].float(),
                          parts["lokr_w2_b"].float())
    elif w2 is None and "lokr_w2_a" in parts and "lokr_w2_b" in parts:
        w2 = parts["lokr_w2_a"].float() @ parts["lokr_w2_b"].float()
    if w1 is None or w2 is None or w1.dim() != 2:
        raise AdapterFileError(f"{name}: not a complete LoKr module (it has {', '.join(sorted(parts))}); expected "
                               "lokr_w1 (or lokr_w1_a + lokr_w1_b) and lokr_w2 (or lokr_w2_a + lokr_w2_b)")
    dim = next((parts[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in parts), None)
    scale = float(parts["alpha"]) / dim if dim and "alpha" in parts else 1.0
    out, inp, *kernel = tuple(weight_shape)
    a1, a2 = w1.shape
    if out % a1 or inp % a2 or w2.numel() * w1.numel() != math.prod(weight_shape):
        raise AdapterFileError(
            f"{name}: lokr_w1 {tuple(w1.shape)} and lokr_w2 {tuple(w2.shape)} do not make the layer's weight "
            f"{tuple(weight_shape)}")
    return w1 * scale, w2.reshape(out // a1, inp // a2, *kernel)


# --------------------------------------------------------------------------------------------------
# One adapted layer


class KronaModule(AdapterModule):
    """out = base(x) + m·(A ⊗ B) x, computed factored (`krona_forward`); lokr_w1 = A, lokr_w2 = B."""

    file_keys = (W1_KEY, W2_KEY, ALPHA_KEY)

    def __init__(self, lora_name: str, layer: nn.Module, a1: int, a2: int, **kwargs):
        super().__init__(lora_name, layer, **kwargs)
        out, inp, *kernel = layer.weight.shape
        if self.is_conv and (layer.groups != 1 or layer.padding_mode != "zeros"):
            raise NetworkArgsError(f"{lora_name}: KronA supports convs with groups=1 and zero padding only; "
                                   "exclude this layer (network_args exclude=...)")
        if out % a1 or inp % a2:
            raise NetworkArgsError(f"{lora_name}: A of shape ({a1}, {a2}) does not divide the layer's ({out}, {inp})")
        self.a1, self.a2 = a1, a2
        self.lokr_w1 = nn.Parameter(torch.randn(a1, a2) / a1)
        self.lokr_w2 = nn.Parameter(torch.zeros(out // a1, inp // a2, *kernel))  # ΔW = 0 at step 0
        self._register_load_state_dict_pre_hook(self._drop_file_alpha)

    @property
    def a(self) -> torch.Tensor:
        return self.lokr_w1

    @property
    def b(self) -> torch.Tensor:
        return self.lokr_w2

    def conv_arguments(self) -> dict:
        layer = self.layer
        return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation) if self.is_conv else {}

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout:
            x = F.dropout(x, p=self.dropout)
        delta = krona_forward(x, self.lokr_w1, self.lokr_w2, **self.conv_arguments())
        return out + self.multiplier * delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        a = self.lokr_w1.detach()
        return kron_delta_weight(a.to(torch.promote_types(a.dtype, torch.float32)), self.lokr_w2.detach(),
                                 self.layer.weight.shape, self.multiplier)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {W1_KEY: self.lokr_w1.detach().clone(), W2_KEY: self.lokr_w2.detach().clone(),
                ALPHA_KEY: torch.tensor(1.0)}

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        a, b = lokr_full_factors(tensors, self.layer.weight.shape, self.lora_name)
        if tuple(a.shape) != tuple(self.lokr_w1.shape):
            raise AdapterFileError(f"{self.lora_name}: the file's lokr_w1 has shape {tuple(a.shape)}, this network "
                                   f"expects {tuple(self.lokr_w1.shape)} (network_args a1, a2)")
        self.lokr_w1.copy_(a)
        self.lokr_w2.copy_(b)

    # load_state_dict(file tensors), as sd-scripts' gen_img does: the file's alpha is no parameter here.
    @staticmethod
    def _drop_file_alpha(state_dict, prefix, *args) -> None:
        state_dict.pop(prefix + ALPHA_KEY, None)


# --------------------------------------------------------------------------------------------------
# The network


class KronaNetwork(AdapterNetwork):
    network_module = __name__  # "networks.krona", or the name it was copied under in sd-scripts
    file_kinds = ("LoKr",)

    def __init__(self, modules: list[KronaModule], multiplier: float = 1.0, metadata: dict | None = None):
        super().__init__(modules, multiplier, metadata)
        self.file_metadata.setdefault("krona.format_version", FORMAT_VERSION)

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value, device):
        """sd-scripts' scale_weight_norms: ‖A ⊗ B‖ = ‖A‖·‖B‖ capped at max_norm; A and B each scaled by √ratio."""
        scaled, norms = 0, []
        for module in self.adapter_modules:
            norm = module.lokr_w1.norm() * module.lokr_w2.norm()
            desired = norm.clamp(max=max_norm_value)
            ratio = float(desired / norm) if norm > 0 else 1.0
            if ratio != 1.0:
                scaled += 1
                module.lokr_w1.mul_(ratio ** 0.5)
                module.lokr_w2.mul_(ratio ** 0.5)
            norms.append(float(norm) * ratio)
        return scaled, sum(norms) / max(len(norms), 1), max(norms, default=0.0)


# --------------------------------------------------------------------------------------------------
# sd-scripts' entry points

PRESETS_KRONA = {
    "attention": Preset(
        text_encoder=False, conv_blocks="never", only=r"_attn[12]_to_(q|k|v|out_0)$",
        description="DiffuseKronA's targets: q/k/v/out of the UNet's self- (attn1) and cross-attention (attn2); "
        "no text encoder"),
    **PRESETS,
}

NETWORK_ARGS = {
    "a1": positive_int,
    "a2": positive_int,
    "conv_dim": positive_int,  # a switch: conv layers on (their factors are a1/a2 too)
    "conv_alpha": float,  # accepted for sd-scripts configs; KronA has no scale, so it has no effect
    "preset": choice(PRESETS_KRONA),
    "include": regex,
    "exclude": regex,
    "dropout": probability,
    "module_dropout": probability,
}
UNSUPPORTED_ARGS = {
    "rank_dropout": "KronA has no rank dimension to drop; use dropout or module_dropout",
    "factor": "LoKr's factor=f splits both sides as (f, d/f); networks.krona takes the shape of A as a1 and a2 "
              "(factor=f is a1=f a2=f)",
    "factor_in": "that is an argument of sd-scripts' own networks.krona; here a2 is A's column count (d_in side)",
    "factor_out": "that is an argument of sd-scripts' own networks.krona; here a1 is A's row count (d_out side)",
    "algo": "algo= selects a LyCORIS algorithm; networks.krona is KronA only (use --network_module=lycoris.kohya "
            "for LyCORIS)",
} | {
    key: "KronA's factors are always full matrices (LoKr's full-matrix mode)"
    for key in ("decompose_both", "full_matrix", "use_tucker", "use_scalar")
} | refused_lora_args(
    block_dims="KronA has one factor shape (a1, a2) for every layer; use preset/include/exclude to choose layers",
    block_lrs="per-block learning rates are not implemented for KronA",
    loraplus="LoRA+ scales lora_up's learning rate; KronA has no up matrix",
)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder, unet,
                   neuron_dropout: float | None = None, **kwargs) -> KronaNetwork:
    """sd-scripts' create_network: KronA on the preset's layers (network_args arrive as strings)."""
    args = parse_network_args(kwargs, NETWORK_ARGS, UNSUPPORTED_ARGS)
    a1, a2 = args.get("a1") or DEFAULT_A1, args.get("a2") or DEFAULT_A2
    preset_name = args.get("preset") or "attention"
    targets = select_target_layers(text_encoder, unet, PRESETS_KRONA[preset_name], args.get("conv_dim") is not None,
                                   args.get("include"), args.get("exclude"))
    if not targets:
        raise NetworkArgsError(f"preset {preset_name!r} with these include/exclude patterns selects no layer")
    dropout = neuron_dropout if neuron_dropout is not None else args.get("dropout")
    adjusted: dict[tuple, int] = {}
    modules = []
    for target in targets:
        out, inp = target.layer.weight.shape[:2]
        f1, f2 = factor_pair(out, a1), factor_pair(inp, a2)
        if (f1, f2) != (a1, a2):
            adjusted[(out, inp, f1, f2)] = adjusted.get((out, inp, f1, f2), 0) + 1
        modules.append(KronaModule(target.lora_name, target.layer, f1, f2, dropout=dropout,
                                   module_dropout=args.get("module_dropout")))
    for (out, inp, f1, f2), count in adjusted.items():
        logger.warning("KronA: a1=%d, a2=%d do not divide the (%d, %d) weight of %d layers; using A of shape "
                       "(%d, %d), the divisors nearest to the request", a1, a2, out, inp, count, f1, f2)
    network = KronaNetwork(modules, multiplier)
    params = network.trainable_parameter_count()
    lora_params = sum(4 * (m.out_features + m.in_features) for m in modules)
    logger.info("KronA (%s, a1=%d, a2=%d): %d text-encoder and %d UNet layers, %d trainable parameters (LoRA rank 4 "
                "on the same layers: %d)", preset_name, a1, a2, len(network.text_encoder_modules),
                len(network.unet_modules), params, lora_params)
    if network_dim is not None or network_alpha not in (None, 1, 1.0) or args.get("conv_alpha") is not None:
        logger.info("network_dim/network_alpha/conv_alpha have no effect on KronA: the factor shapes come from "
                    "network_args a1/a2 and the scale is 1 (LoKr's rule for two full factors)")
    return network


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """sd-scripts' create_network_from_weights: a network with the file's modules and factor shapes (weights not
    loaded). Reads any LoKr file (KronA's own, or LyCORIS LoKr with full or low-rank factors)."""
    metadata = {}
    if weights_sd is None:
        weights_sd, metadata = read_adapter_file(str(file))
    groups = group_by_module(weights_sd)
    not_lokr = [name for name, parts in groups.items() if not ({"lokr_w1", "lokr_w1_a"} & parts.keys())]
    if not_lokr:
        raise AdapterFileError(
            f"{file} is not a KronA/LoKr file: module {not_lokr[0]} has no lokr_w1 "
            f"(it has {', '.join(sorted(groups[not_lokr[0]]))}); LoRA/LoCon files load with networks.lora")
    options = parse_network_args({k: v for k, v in kwargs.items() if k in ("dropout", "module_dropout")},
                                 NETWORK_ARGS)
    modules = []
    for target in layers_for_file(text_encoder, unet, groups, metadata, str(file)):
        parts = groups[target.lora_name]
        w1 = parts.get(W1_KEY)
        a1, a2 = tuple(w1.shape) if w1 is not None else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[-1])
        out, inp = target.layer.weight.shape[:2]
        if out % a1 or inp % a2:
            raise AdapterFileError(
                f"{file} does not fit this model: module {target.lora_name} has lokr_w1 of shape ({a1}, {a2}) but "
                f"the layer's weight is ({out}, {inp}){describe_file_model(metadata)}")
        modules.append(KronaModule(target.lora_name, target.layer, a1, a2, dropout=options.get("dropout"),
                                   module_dropout=options.get("module_dropout")))
    return KronaNetwork(modules, multiplier), weights_sd
