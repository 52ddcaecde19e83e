"""PaRa — Parameter Rank Reduction (Chen, Pan, Cai, Phung, ICLR 2025) as an sd-scripts network module.

Per adapted layer PaRa learns B (d_out x r), takes Q from QR(B) and uses W = W0 - Q Qᵀ W0: it removes r
directions from the layer's output space. Use it as `--network_module=networks.para` here or in sd-scripts.

The math lives in the functional core below (`orthonormal_basis`, `para_coefficients`, `para_expand`,
`para_delta_weight`, `para_lora_factors`); the training forward, merging, export, the WebUI extension and the
benchmark call it.

Native file format (one entry per adapted layer, sd-scripts key names):
    <lora_name>.para_q   float (d_out, r)   Q, the orthonormal basis of the removed directions
plus the metadata passed in, `ss_network_module`, `para.format_version` and sd-scripts' `sshs_*` hashes.
Q is stored rather than B: the layer depends on span(B) only, Q is what every consumer needs (merge,
export, WebUI) without a QR, and loading Q back as B resumes training with the same function.

Needs only torch, safetensors, the standard library and adapter_base.py beside it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_base import (
    PRESETS,
    AdapterFileError,
    AdapterModule,
    AdapterNetwork,
    NetworkArgsError,
    as_text_encoder_list,
    choice,
    describe_file_model,
    group_by_module,
    layers_for_file,
    parse_network_args,
    positive_int,
    probability,
    read_adapter_file,
    regex,
    select_target_layers,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
Q_KEY = "para_q"

# A B whose smallest |R_ii| falls this far below its largest has (numerically) lost a column: QR's gradient
# then blows up. float32 QR resolves about 1e-7; stop well before that.
RANK_LOSS_THRESHOLD = 1e-5


# --------------------------------------------------------------------------------------------------
# Functional core


def orthonormal_basis(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q of QR(B) in float32 or better (also under fp16/bf16 autocast), and min|R_ii| / max|R_ii| per matrix.

    Works on one B (d, r) or a batch (k, d, r). The ratio tells how close B is to losing rank.
    """
    with torch.autocast(device_type=b.device.type, enabled=False):
        q, r = torch.linalg.qr(b.to(torch.promote_types(b.dtype, torch.float32)), mode="reduced")
    diagonal = r.diagonal(dim1=-2, dim2=-1).abs()
    # LAPACK hands Q back column-major; row-major Q makes the projection's matmuls (and so its rounding) the
    # same whether Q comes from QR or from a file.
    return q.contiguous(), diagonal.amin(-1) / diagonal.amax(-1).clamp_min(torch.finfo(q.dtype).tiny)


def para_coefficients(h: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None, conv: bool) -> torch.Tensor:
    """Qᵀ(h - bias) along the output/channel dimension: the part of the bias-free output PaRa removes."""
    q = q.to(h.dtype)
    if conv:
        c = F.conv2d(h, q.t()[:, :, None, None])
    else:
        c = F.linear(h, q.t())
    if bias is not None:
        qb = bias.to(q.dtype) @ q
        c = c - (qb.view(-1, 1, 1) if conv else qb)
    return c


def para_expand(c: torch.Tensor, q: torch.Tensor, conv: bool) -> torch.Tensor:
    """Q c: back from r coefficients to the layer's output/channel dimension (two thin matmuls in all)."""
    q = q.to(c.dtype)
    return F.conv2d(c, q[:, :, None, None]) if conv else F.linear(c, q)


def para_delta_weight(weight: torch.Tensor, q: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """ΔW = -m Q (Qᵀ W) in float32 (float64 for float64 input), in W's shape (conv kernels flattened)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.reshape(weight.shape[0], -1).to(dtype)
    q = q.to(w.device, dtype)
    return (-multiplier * (q @ (q.t() @ w))).reshape(weight.shape)


def para_lora_factors(weight: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact LoRA form of PaRa: up @ down = -Q Qᵀ W (ΔW at multiplier 1), float32 or better.

    Linear: up (out, r), down (r, in). Conv2d: up (out, r, 1, 1), down (r, in, kh, kw) — the LoCon layout.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().reshape(weight.shape[0], -1).to(dtype)
    q = q.to(w.device, dtype)
    up, down = -q, q.t() @ w
    if weight.dim() == 4:
        return up[:, :, None, None].contiguous(), down.reshape(q.shape[1], *weight.shape[1:]).contiguous()
    return up.contiguous(), down.contiguous()


# --------------------------------------------------------------------------------------------------
# One adapted layer


class ParaModule(AdapterModule):
    """out = base(x) - m·Q Qᵀ (base(x) - bias): the bias-free output reused, no second matmul with W0."""

    file_keys = (Q_KEY,)

    def __init__(self, lora_name: str, layer: nn.Module, rank: int, **kwargs):
        super().__init__(lora_name, layer, **kwargs)
        if not 0 < rank < self.out_features:
            raise NetworkArgsError(
                f"rank {rank} does not fit {lora_name}: PaRa removes r of the layer's {self.out_features} output "
                f"directions, so r must be between 1 and {self.out_features - 1}; lower network_dim/conv_dim")
        self.rank = rank
        b = torch.empty(self.out_features, rank)
        nn.init.orthogonal_(b)  # full column rank from the start: QR's gradient needs it
        self.para_b = nn.Parameter(b)
        self.conditioning: torch.Tensor | None = None  # min|R_ii| / max|R_ii| of the last QR
        self._basis_cache: tuple[torch.Tensor, int, bool] | None = None  # (Q, B's version, grad mode)
        self._b_is_orthonormal_at = -1  # B's version when a stored Q was loaded into it
        self._loading_q = False
        self._register_load_state_dict_pre_hook(self._accept_file_key)
        self.register_load_state_dict_post_hook(self._mark_loaded_q)

    # Q for this forward pass: set by the network once per model call (one batched QR per shape), else here.
    def basis(self) -> torch.Tensor:
        b = self.para_b
        grad = torch.is_grad_enabled() and b.requires_grad
        cache = self._basis_cache
        if cache is not None and cache[1] == b._version and cache[2] == grad:
            return cache[0]
        if not grad and self._b_is_orthonormal_at == b._version:
            return b  # a loaded Q, not changed since: use it as it is (bit-identical round trips)
        q, self.conditioning = orthonormal_basis(b)
        self.conditioning = self.conditioning.detach()
        return q

    def set_basis(self, q: torch.Tensor, conditioning: torch.Tensor) -> None:
        self._basis_cache = (q, self.para_b._version, torch.is_grad_enabled() and self.para_b.requires_grad)
        self.conditioning = conditioning.detach()

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        q = self.basis()
        c = para_coefficients(out, q, self.layer.bias, self.is_conv)
        if self.training:
            if self.dropout:
                c = F.dropout(c, p=self.dropout)
            if self.rank_dropout:
                keep = (torch.rand(c.shape[0], self.rank, device=c.device) > self.rank_dropout).to(c.dtype)
                shape = (c.shape[0], self.rank, 1, 1) if self.is_conv else (c.shape[0],) + (1,) * (c.dim() - 2) + (
                    self.rank,)
                c = c * keep.view(shape) / (1 - self.rank_dropout)
        return out - self.multiplier * para_expand(c, q, self.is_conv)

    def current_q(self) -> torch.Tensor:
        with torch.no_grad():
            q = self.basis()
        return q.to(torch.promote_types(q.dtype, torch.float32))

    def delta_weight(self) -> torch.Tensor:
        return para_delta_weight(self.layer.weight, self.current_q(), self.multiplier)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {Q_KEY: self.current_q().detach().clone()}

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        q = tensors[Q_KEY]
        if tuple(q.shape) != tuple(self.para_b.shape):
            raise AdapterFileError(
                f"{self.lora_name}: the file's Q has shape {tuple(q.shape)}, this network expects "
                f"{tuple(self.para_b.shape)} ({self.out_features} outputs, rank {self.rank})")
        self.para_b.copy_(q.to(self.para_b.dtype))
        self._b_is_orthonormal_at = self.para_b._version
        self._basis_cache = None

    # gen_img.py-style load_state_dict(file tensors): the file's Q goes into B and is marked orthonormal.
    def _accept_file_key(self, state_dict, prefix, *args) -> None:
        if prefix + Q_KEY in state_dict and prefix + "para_b" not in state_dict:
            state_dict[prefix + "para_b"] = state_dict.pop(prefix + Q_KEY)
            self._loading_q = True

    @staticmethod
    def _mark_loaded_q(module: "ParaModule", incompatible_keys) -> None:
        if module._loading_q:
            module._b_is_orthonormal_at = module.para_b._version
            module._basis_cache = None
            module._loading_q = False

    def health(self) -> torch.Tensor:
        """-1 when B is not finite, else min|R_ii| / max|R_ii| of the last QR (1 before any): no sync here."""
        conditioning = self.conditioning if self.conditioning is not None else torch.ones((), device=self.para_b.device)
        return torch.where(torch.isfinite(self.para_b).all(), conditioning.to(self.para_b.device), -1.0)

    def health_problem(self, value: float) -> str | None:
        if value < 0:
            return f"{self.lora_name}: B holds NaN/inf (training diverged; lower the learning rate)"
        if value < RANK_LOSS_THRESHOLD:
            return (f"{self.lora_name}: B has lost rank (smallest/largest |R_ii| = {value:.2e}), so QR's gradient "
                    "would turn into NaN; lower the learning rate or the rank")
        return None


# --------------------------------------------------------------------------------------------------
# The network


class ParaRankLossError(RuntimeError):
    """B lost rank or became non-finite during training."""


class ParaNetwork(AdapterNetwork):
    network_module = "networks.para"

    def __init__(self, modules: list[ParaModule], multiplier: float = 1.0, metadata: dict | None = None):
        super().__init__(modules, multiplier, metadata)
        self.file_metadata.setdefault("para.format_version", FORMAT_VERSION)
        self._root_hooks = []

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True):
        super().apply_to(text_encoder, unet, apply_text_encoder, apply_unet)
        # Q once per model call for all its layers, batched by shape; gradient checkpointing's recomputation
        # reuses it instead of running QR again.
        roots = ([(te, self.text_encoder_modules) for te in as_text_encoder_list(text_encoder)]
                 if apply_text_encoder else []) + ([(unet, self.unet_modules)] if apply_unet and unet is not None else [])
        for root, modules in roots:
            layer_ids = {id(layer) for layer in root.modules()}
            owned = [m for m in modules if id(m.layer) in layer_ids]
            if owned:
                self._root_hooks.append(root.register_forward_pre_hook(lambda *_, owned=owned: refresh_bases(owned)))

    def restore(self) -> None:
        super().restore()
        for handle in self._root_hooks:
            handle.remove()
        self._root_hooks = []

    def on_step_start(self, text_encoder=None, unet=None) -> None:
        self.check_rank()

    def check_rank(self) -> None:
        """Raise when some B is not finite or has lost rank, instead of training on NaNs."""
        modules = self.adapter_modules
        if not modules:
            return
        device = modules[0].para_b.device
        values = torch.stack([m.health().to(device) for m in modules]).tolist()  # one sync
        problems = [message for m, value in zip(modules, values) if (message := m.health_problem(value))]
        if problems:
            more = f" (and {len(problems) - 1} more modules)" if len(problems) > 1 else ""
            raise ParaRankLossError(problems[0] + more)

    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: dict | None = None) -> None:
        self.check_rank()
        super().save_weights(file, dtype, metadata)

    def apply_max_norm_regularization(self, max_norm_value, device):
        # PaRa's projection does not depend on B's scale, so a norm cap on B changes nothing.
        logger.warning("scale_weight_norms has no effect on PaRa: the projection QQᵀ does not depend on B's norm")
        return 0, 0.0, 0.0


def refresh_bases(modules: list[ParaModule]) -> None:
    """One batched QR for all B's of the same shape; each module keeps its Q for this forward pass."""
    groups: dict[tuple, list[ParaModule]] = {}
    for module in modules:
        b = module.para_b
        groups.setdefault((tuple(b.shape), b.device, b.dtype), []).append(module)
    for group in groups.values():
        if not (torch.is_grad_enabled() and group[0].para_b.requires_grad):
            group = [m for m in group if m._b_is_orthonormal_at != m.para_b._version]
            if not group:
                continue
        q, conditioning = orthonormal_basis(torch.stack([m.para_b for m in group]))
        for module, module_q, module_conditioning in zip(group, q.unbind(0), conditioning.unbind(0)):
            module.set_basis(module_q, module_conditioning)


# --------------------------------------------------------------------------------------------------
# sd-scripts' entry points

NETWORK_ARGS = {
    "conv_dim": positive_int,
    "conv_alpha": float,  # accepted for sd-scripts configs; PaRa has no scale, so it has no effect
    "preset": choice(PRESETS),
    "include": regex,
    "exclude": regex,
    "dropout": probability,
    "rank_dropout": probability,
    "module_dropout": probability,
}
UNSUPPORTED_ARGS = {
    key: "PaRa has one rank per layer type (network_dim, conv_dim); use preset/include/exclude to choose layers"
    for key in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
} | {
    key: "per-block learning rates are not implemented for PaRa"
    for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
} | {
    key: "LoRA+ scales lora_up's learning rate; PaRa has no up matrix"
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
}


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder, unet,
                   neuron_dropout: float | None = None, **kwargs) -> ParaNetwork:
    """sd-scripts' create_network: PaRa on the preset's layers (network_args arrive as strings)."""
    args = parse_network_args(kwargs, NETWORK_ARGS, UNSUPPORTED_ARGS)
    rank = positive_int(network_dim) if network_dim is not None else 4
    preset_name = args.get("preset") or "full"
    preset = PRESETS[preset_name]
    conv_rank = args.get("conv_dim") or (rank if preset.conv_blocks == "always" else None)
    dropout = neuron_dropout if neuron_dropout is not None else args.get("dropout")
    targets = select_target_layers(text_encoder, unet, preset, args.get("conv_dim") is not None,
                                   args.get("include"), args.get("exclude"))
    if not targets:
        raise NetworkArgsError(f"preset {preset_name!r} with these include/exclude patterns selects no layer")
    modules = [
        ParaModule(t.lora_name, t.layer, conv_rank if t.is_conv3x3 else rank, dropout=dropout,
                   rank_dropout=args.get("rank_dropout"), module_dropout=args.get("module_dropout"))
        for t in targets
    ]
    network = ParaNetwork(modules, multiplier)
    params = network.trainable_parameter_count()
    lora_params = sum(m.rank * (m.in_features + m.out_features) for m in modules)
    logger.info("PaRa (%s): %d text-encoder and %d UNet layers, %d trainable parameters (LoRA at the same ranks: "
                "%d, ratio %.3f)", preset_name, len(network.text_encoder_modules), len(network.unet_modules),
                params, lora_params, params / lora_params)
    if network_alpha not in (None, 1, 1.0) or args.get("conv_alpha") is not None:
        logger.info("network_alpha/conv_alpha have no effect on PaRa: the projection has no scale")
    return network


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """sd-scripts' create_network_from_weights: a network with the file's modules and ranks (weights not loaded)."""
    metadata = {}
    if weights_sd is None:
        weights_sd, metadata = read_adapter_file(str(file))
    groups = group_by_module(weights_sd)
    not_para = [name for name, parts in groups.items() if Q_KEY not in parts]
    if not_para:
        raise AdapterFileError(
            f"{file} is not a native PaRa file: module {not_para[0]} has no {Q_KEY} "
            f"(it has {', '.join(sorted(groups[not_para[0]]))}); LoRA/LoCon files load with networks.lora")
    modules = []
    for target in layers_for_file(text_encoder, unet, groups, metadata, str(file)):
        q = groups[target.lora_name][Q_KEY]
        if q.dim() != 2 or q.shape[0] != target.layer.weight.shape[0]:
            raise AdapterFileError(
                f"{file} does not fit this model: module {target.lora_name} has Q of shape {tuple(q.shape)} but the "
                f"layer has {target.layer.weight.shape[0]} outputs{describe_file_model(metadata)}")
        modules.append(ParaModule(target.lora_name, target.layer, q.shape[1]))
    return ParaNetwork(modules, multiplier), weights_sd

