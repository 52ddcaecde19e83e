"""PaRa — Parameter Rank Reduction (Chen, Pan, Cai, Phung, ICLR 2025) as an sd-scripts network module.

Per adapted layer PaRa learns B (d_out x r), takes Q from QR(B) and uses W = W0 - Q Qᵀ W0: it removes r
directions from the layer's output space. Use it as `--network_module=networks.para` here or in sd-scripts.

The math lives in the functional core below (`orthonormal_basis`, `para_coefficients`, `para_expand`,
`para_remove`, `para_delta_weight`, `para_lora_factors`, and for training `gram_bases`, `gram_coefficients`,
`gram_expand`: the same Q without running QR); the training forward, merging, export, the WebUI extension and
the benchmark call it.

Native file format (one entry per adapted layer, sd-scripts key names):
    <lora_name>.para_q   float (d_out, r)   Q, the orthonormal basis of the removed directions
plus the metadata passed in, `ss_network_module`, `para.format_version` ("1") and sd-scripts' `sshs_*` hashes.
A layer with a chain of stages applied in order — merged PaRa files, PaRa + LoRA (network_args lora_dim), PaRa
after a LoRA file — has, per stage i, `stageI.para_q` (W <- W - s·Q QᵀW) or `stageI.lora_up` (d_out, k[, 1, 1])
and `stageI.lora_down` (k, d_in[, kh, kw]) (W <- W + s·up·down), and `stageI.strength` (scalar s); version "2".
Q is stored rather than B: the layer depends on span(B) only, Q is what every consumer needs (merge,
export, WebUI) without a QR, and loading Q back as B resumes training with the same function.

Needs only torch, safetensors, the standard library and adapter_base.py beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_base import (
    FLUX_NETWORK_ARGS,
    FP8_DTYPES,
    FLUX_UNSUPPORTED_ARGS,
    PRESETS,
    AdapterFileError,
    AdapterModule,
    AdapterNetwork,
    NetworkArgsError,
    as_text_encoder_list,
    choice,
    describe_file_model,
    flux_layout,
    flux_targets,
    group_by_module,
    layers_for_file,
    parse_network_args,
    positive_int,
    probability,
    read_adapter_file,
    refused_lora_args,
    regex,
    select_flux_layers,
    select_target_layers,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
CHAIN_FORMAT_VERSION = "2"
Q_KEY = "para_q"
UP_KEY, DOWN_KEY, STRENGTH_KEY = "lora_up", "lora_down", "strength"  # parts of a chain's stages (stageN.*)
STAGE_PARTS = (Q_KEY, UP_KEY, DOWN_KEY, STRENGTH_KEY)

# A B whose smallest |R_ii| falls this far below its largest has (numerically) lost a column: QR's gradient
# then blows up. float32 QR resolves about 1e-7; stop well before that.
RANK_LOSS_THRESHOLD = 1e-5


# --------------------------------------------------------------------------------------------------
# Functional core


def exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where ΔW and LoRA factors are computed: float32, or float64 for float64 weights (fp8 base weights too:
    torch does not promote fp8)."""
    return torch.float32 if dtype in FP8_DTYPES else torch.promote_types(dtype, torch.float32)


def orthonormal_basis(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q of QR(B) in float32 or better (also under fp16/bf16 autocast), and min|R_ii| / max|R_ii| per matrix.

    Works on one B (d, r) or a batch (k, d, r). The ratio tells how close B is to losing rank.
    """
    with torch.autocast(device_type=b.device.type, enabled=False):
        q, r = torch.linalg.qr(b.to(torch.promote_types(b.dtype, torch.float32)), mode="reduced")
    # LAPACK hands Q back column-major; row-major Q makes the projection's matmuls (and so its rounding) the
    # same whether Q comes from QR or from a file.
    return q.contiguous(), _diagonal_ratio(r)


def _diagonal_ratio(triangular: torch.Tensor) -> torch.Tensor:
    diagonal = triangular.diagonal(dim1=-2, dim2=-1).abs()
    return diagonal.amin(-1) / diagonal.amax(-1).clamp_min(torch.finfo(triangular.dtype).tiny)


# Training does not form Q. With BᵀB = L Lᵀ (Cholesky), Q = B L⁻ᵀ is exactly QR's Q (R = Lᵀ), so
# Qᵀh = L⁻¹ Bᵀh and Q c = B L⁻ᵀ c: the layer needs only B and the r x r factor L. The Gram product and its
# backward are two BLAS-3 products, 2-3x faster on a CPU than Householder QR and its backward, which were most
# of PaRa's cost at small batches (issue 8's bench). Linear layers use G⁻¹ = (BᵀB)⁻¹ (`_RemoveFromLinearOutput`);
# convs solve with L on the rows while a layer sees fewer rows than it has outputs, beyond that form Q = B L⁻ᵀ once.
# BᵀB squares cond(B), so this runs only while cond(B) is small: measured in float32 on (320..10240) x (32, 128),
# the projection's error stayed within 2x of Householder's (about 1e-6) up to cond(B) = 10.
GRAM_MIN_RATIO = 0.1  # min|R_ii| / max|R_ii| below this: Householder QR


@dataclass(frozen=True)
class GramBasis:
    """Q = B L⁻ᵀ kept implicit: B (d, r), the lower Cholesky factor L (r, r) of BᵀB and, detached, (BᵀB)⁻¹."""

    b: torch.Tensor
    lower: torch.Tensor
    gram_inverse: torch.Tensor


class _StackedGram(torch.autograd.Function):
    """[BᵢᵀBᵢ] of same-shape B's as one batched product. The stacked copy of the B's is not kept for backward
    (it is rebuilt there), and the backward Bᵢ(Gᵢ + Gᵢᵀ) is one product (autograd's own takes two, then adds)."""

    @staticmethod
    def forward(ctx, *bs):
        ctx.save_for_backward(*bs)
        stacked = torch.stack(bs)
        return stacked.mT @ stacked

    @staticmethod
    def backward(ctx, grad):
        stacked = torch.stack(ctx.saved_tensors)
        return tuple((stacked @ (grad + grad.mT)).unbind(0))


def gram_bases(bs: list[torch.Tensor]) -> tuple[list[GramBasis] | None, torch.Tensor]:
    """For B's of one shape (d, r), float32 or better: one GramBasis each (B and the Cholesky factor of BᵀB, from
    one batched product and Cholesky) — None when some B is too ill-conditioned for it, the caller then uses
    `orthonormal_basis` — and min|R_ii| / max|R_ii| per B, as `orthonormal_basis` gives.
    """
    with torch.autocast(device_type=bs[0].device.type, enabled=False):
        bs = [b.to(torch.promote_types(b.dtype, torch.float32)) for b in bs]
        lower, info = torch.linalg.cholesky_ex(_StackedGram.apply(*bs))
        ratio = _diagonal_ratio(lower)
        if not bool(((info == 0) & (ratio >= GRAM_MIN_RATIO)).all()):  # one host sync per shape group
            return None, ratio
        inverse = torch.cholesky_inverse(lower.detach())
    return [GramBasis(*parts) for parts in zip(bs, lower.unbind(0), inverse.unbind(0))], ratio


def _solve_rows(c: torch.Tensor, lower: torch.Tensor, conv: bool, transposed: bool) -> torch.Tensor:
    """c L⁻ᵀ (transposed) or c L⁻¹ on every row of r coefficients (channels for a conv), in L's precision."""
    rows = (c.movedim(1, -1) if conv else c).to(lower.dtype)
    shape = rows.shape
    matrix = lower.mT if transposed else lower
    solved = torch.linalg.solve_triangular(matrix, rows.reshape(-1, shape[-1]), upper=transposed, left=False)
    solved = solved.reshape(shape).to(c.dtype)
    return solved.movedim(-1, 1) if conv else solved


def gram_coefficients(h: torch.Tensor, basis: GramBasis, bias: torch.Tensor | None, conv: bool) -> torch.Tensor:
    """Qᵀ(h - bias) as L⁻¹ Bᵀ(h - bias): the same numbers as `para_coefficients` with Q = B L⁻ᵀ."""
    return _solve_rows(para_coefficients(h, basis.b, bias, conv), basis.lower, conv, transposed=True)


def gram_expand(c: torch.Tensor, basis: GramBasis, conv: bool) -> torch.Tensor:
    """Q c as B (L⁻ᵀ c): `para_expand` with Q = B L⁻ᵀ."""
    return para_expand(_solve_rows(c, basis.lower, conv, transposed=False), basis.b, conv)


def para_remove(h: torch.Tensor, c: torch.Tensor, basis: torch.Tensor | GramBasis, scale: float,
                conv: bool) -> torch.Tensor:
    """h - scale·Q c for coefficients c = Qᵀ(h - bias) (Q a tensor or a GramBasis).

    For Linear layers the subtraction rides in the matmul (addmm): one pass over the output instead of three, and
    no negation pass in the backward; thin products are memory-bound, so passes are what PaRa's time is (issue 8).
    """
    gram = isinstance(basis, GramBasis)
    if conv:
        return torch.sub(h, (gram_expand if gram else para_expand)(c, basis, conv), alpha=scale)
    y = _solve_rows(c, basis.lower, conv, transposed=False) if gram else c
    matrix = (basis.b if gram else basis).to(h.dtype)
    flat = torch.addmm(h.reshape(-1, h.shape[-1]), y.reshape(-1, y.shape[-1]).to(h.dtype), matrix.t(), alpha=-scale)
    return flat.view(h.shape)


class _RemoveFromLinearOutput(torch.autograd.Function):
    """o = h - s·P(h - b) on rows of d outputs, P = B G⁻¹ Bᵀ the projector onto B's columns (G = BᵀB).

    Training's PaRa for Linear layers, with the whole gradient written out (through G too, so G⁻¹ comes in
    detached). Autograd of the same lines keeps h for B's gradient, in every layer; this keeps the output o
    instead, which the next operator mostly keeps anyway (attention its q/k/v, GEGLU its input). It also adds
    h's two gradients inside one matmul and runs no r x r solve on the rows: G⁻¹ is one r x r matrix per
    layer. Six thin matmuls in all, as autograd's.
    """

    @staticmethod
    def forward(ctx, h, b, gram_inverse, bias, scale):
        with _autocast_off(h):
            rows = h.reshape(-1, h.shape[-1])
            matrix = _cast(b, h.dtype)
            product = rows @ matrix if bias is None else torch.addmm(_cast(bias, h.dtype) @ matrix, rows, matrix, beta=-1)
            coefficients = _cast(product, gram_inverse.dtype)  # U B, U = h - b
            y = _cast(coefficients @ gram_inverse, h.dtype)
            out = torch.addmm(rows, y, matrix.t(), alpha=-scale)
        ctx.save_for_backward(out, coefficients, y, b, gram_inverse, bias)
        ctx.scale = scale
        return out.view(h.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out, coefficients, y, b, gram_inverse, bias = ctx.saved_tensors
        scale = ctx.scale
        with _autocast_off(grad):
            rows = grad.reshape(-1, grad.shape[-1])
            matrix = _cast(b, rows.dtype)
            grad_coefficients = _cast(rows @ matrix, gram_inverse.dtype)  # Γ B
            z = grad_coefficients @ gram_inverse  # Γ B G⁻¹
            z_rows = _cast(z, rows.dtype)
            grad_h = torch.addmm(rows, z_rows, matrix.t(), alpha=-scale).view(grad.shape) \
                if ctx.needs_input_grad[0] else None
            z_total = None if bias is None else z.sum(0)  # over the rows: where the bias enters
            grad_b = None
            if ctx.needs_input_grad[1]:
                # dL/dB = -s (I - P) X with X = (UᵀΓ + ΓᵀU) B G⁻¹ = Uᵀz + Γᵀy, U = h - b = o + s·y Bᵀ - b.
                # (I - P) B = 0 drops U's middle term; BᵀX = (ΓB)ᵀy + (1 - s)·(UB)ᵀz needs no pass over d.
                x = _cast(torch.addmm(rows.t() @ y, out.t(), z_rows), b.dtype)
                if bias is not None:
                    x = torch.addr(x, _cast(bias, b.dtype), _cast(z_total, b.dtype), alpha=-1)
                bt_x = grad_coefficients.t() @ _cast(y, gram_inverse.dtype)
                if scale != 1:
                    bt_x = torch.addmm(bt_x, coefficients.t(), z, alpha=1 - scale)
                grad_b = torch.addmm(x, b, _cast(gram_inverse @ bt_x, b.dtype), beta=-scale, alpha=scale)
            # a trainable base bias also reaches o through the +s·P b term: s·B G⁻¹ BᵀΣΓ = s·(Σz) Bᵀ
            grad_bias = _cast(z_total @ _cast(b, z.dtype).t(), bias.dtype).mul_(scale) \
                if ctx.needs_input_grad[3] else None
        return grad_h, grad_b, None, grad_bias, None


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # .to() costs a few microseconds even when it changes nothing; these run per layer and step
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _autocast_off(tensor: torch.Tensor):
    """No autocast for the ops inside (their dtypes are chosen explicitly); the context manager only when needed."""
    device_type = tensor.device.type
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
        else contextlib.nullcontext()


def para_remove_from_linear(h: torch.Tensor, basis: GramBasis, bias: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """h - scale·Q Qᵀ(h - bias) for a Linear layer's output while training (see `_RemoveFromLinearOutput`)."""
    return _RemoveFromLinearOutput.apply(h, basis.b, basis.gram_inverse, bias, scale)


def gram_q(basis: GramBasis) -> torch.Tensor:
    """Q = B L⁻ᵀ, formed (d·r² work, differentiable)."""
    return torch.linalg.solve_triangular(basis.lower.mT, basis.b, upper=True, left=False)


def para_coefficients(h: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None, conv: bool) -> torch.Tensor:
    """Qᵀ(h - bias) along the output/channel dimension: the part of the bias-free output PaRa removes."""
    q = q.to(h.dtype)
    shift = None if bias is None else -(bias.to(q.dtype) @ q)  # -Qᵀb rides along as the matmul's bias
    if conv:
        return F.conv2d(h, q.t()[:, :, None, None], shift)
    return F.linear(h, q.t(), shift)


def para_expand(c: torch.Tensor, q: torch.Tensor, conv: bool) -> torch.Tensor:
    """Q c: back from r coefficients to the layer's output/channel dimension (two thin matmuls in all)."""
    q = q.to(c.dtype)
    return F.conv2d(c, q[:, :, None, None]) if conv else F.linear(c, q)


def para_delta_weight(weight: torch.Tensor, q: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """ΔW = -m Q (Qᵀ W) in float32 (float64 for float64 input), in W's shape (conv kernels flattened)."""
    dtype = exact_dtype(weight.dtype)
    w = weight.reshape(weight.shape[0], -1).to(dtype)
    q = q.to(w.device, dtype)
    return (-multiplier * (q @ (q.t() @ w))).reshape(weight.shape)


def para_lora_factors(weight: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact LoRA form of PaRa: up @ down = -Q Qᵀ W (ΔW at multiplier 1), float32 or better.

    Linear: up (out, r), down (r, in). Conv2d: up (out, r, 1, 1), down (r, in, kh, kw) — the LoCon layout.
    """
    dtype = exact_dtype(weight.dtype)
    w = weight.detach().reshape(weight.shape[0], -1).to(dtype)
    q = q.to(w.device, dtype)
    up, down = -q, q.t() @ w
    if weight.dim() == 4:
        return up[:, :, None, None].contiguous(), down.reshape(q.shape[1], *weight.shape[1:]).contiguous()
    return up.contiguous(), down.contiguous()


# B at step 0: "orthogonal", a random subspace (the paper's), or "low_energy", W0's least-used output directions
INITS = ("orthogonal", "low_energy")


def low_energy_basis(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` output directions W0 uses least, orthonormal (out, rank): the left singular vectors of the
    flattened weight with the smallest singular values. Removing them changes the layer least — not at all where
    the layer has more outputs than inputs, since W0 then never writes to those directions (`init=low_energy`)."""
    w = weight.detach().reshape(weight.shape[0], -1).float()
    u = torch.linalg.svd(w, full_matrices=w.shape[0] > w.shape[1])[0]  # U (out, out); V no larger than needed
    return u[:, u.shape[1] - rank:].contiguous()


# Chains: several adapters on one layer, applied in order. A merge of PaRa files, PaRa with LoRA (the paper's
# joint form) and PaRa after a LoRA file are all chains of these two stage kinds.


@dataclass(frozen=True)
class Reduction:
    """W <- W - strength·Q Qᵀ W: a PaRa stage (Q: d_out x r, orthonormal columns)."""

    q: torch.Tensor
    strength: float = 1.0

    @property
    def rank(self) -> int:
        return self.q.shape[1]


@dataclass(frozen=True)
class Addition:
    """W <- W + strength·up·down: a LoRA/LoCon stage (kohya layout: conv up (out, k, 1, 1), down (k, in, kh, kw))."""

    up: torch.Tensor
    down: torch.Tensor
    strength: float = 1.0

    @property
    def rank(self) -> int:
        return self.up.shape[1]


def chain_delta_weight(weight: torch.Tensor, stages, multiplier: float = 1.0) -> torch.Tensor:
    """ΔW = W_chain - W0 for the stages applied to W0 in order, times `multiplier`, float32 or better.

    ΔW is accumulated on its own (never as W_chain - W0), so small updates keep their precision.
    """
    dtype = exact_dtype(weight.dtype)
    w0 = weight.detach().reshape(weight.shape[0], -1).to(dtype)
    delta = torch.zeros_like(w0)
    for stage in stages:
        if isinstance(stage, Reduction):
            q = stage.q.to(w0.device, dtype)
            delta = delta - stage.strength * (q @ (q.t() @ (w0 + delta)))
        else:
            up = stage.up.reshape(stage.up.shape[0], -1).to(w0.device, dtype)
            down = stage.down.reshape(stage.down.shape[0], -1).to(w0.device, dtype)
            delta = delta + stage.strength * (up @ down)
    return (multiplier * delta).reshape(weight.shape)


def scale_stages(stages, strength: float) -> list:
    """A file applied at `strength`: every stage's strength times it (a one-stage file: W0 + m·ΔW)."""
    return [dataclasses.replace(stage, strength=stage.strength * strength) for stage in stages]


def reorthonormalized(stages) -> list:
    """The stages with every fp16/bf16 Q made orthonormal again (rounding leaves it slightly off, and QQᵀ is then
    not quite a projection); float32 Q's are kept as they are."""
    return [Reduction(orthonormal_basis(stage.q.float())[0], stage.strength)
            if isinstance(stage, Reduction) and stage.q.dtype in (torch.float16, torch.bfloat16) else stage
            for stage in stages]


def chain_lora_factors(weight: torch.Tensor, stages) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact LoRA form of a chain: up @ down = W_chain - W0, rank Σ stage ranks, float32 or better.

    A Reduction adds up = -strength·Q, down = Qᵀ W_current (W_current = W0 + the factors so far); an Addition
    adds its own factors. Two PaRa files give up = [-Q1 | -Q2], down = [Q1ᵀW0 ; Q2ᵀW1]. Layout as para_lora_factors.
    """
    dtype = exact_dtype(weight.dtype)
    w0 = weight.detach().reshape(weight.shape[0], -1).to(dtype)
    up = w0.new_zeros(w0.shape[0], 0)
    down = w0.new_zeros(0, w0.shape[1])
    for stage in stages:
        if isinstance(stage, Reduction):
            q = stage.q.to(w0.device, dtype)
            new_up, new_down = -stage.strength * q, q.t() @ w0 + (q.t() @ up) @ down
        else:
            new_up = stage.strength * stage.up.reshape(stage.up.shape[0], -1).to(w0.device, dtype)
            new_down = stage.down.reshape(stage.down.shape[0], -1).to(w0.device, dtype)
        up, down = torch.cat([up, new_up], 1), torch.cat([down, new_down], 0)
    if weight.dim() == 4:
        return up[:, :, None, None].contiguous(), down.reshape(up.shape[1], *weight.shape[1:]).contiguous()
    return up.contiguous(), down.contiguous()


def lora_output(x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """up·down applied to the layer's input, as the layer applies W (a conv's stride, padding and dilation)."""
    up, down = up.to(x.dtype), down.to(x.dtype)
    if layer.__class__.__name__ == "Conv2d":
        kernel = down.reshape(down.shape[0], *layer.weight.shape[1:])
        hidden = F.conv2d(x, kernel, None, layer.stride, layer.padding, layer.dilation)
        return F.conv2d(hidden, up.reshape(up.shape[0], -1)[:, :, None, None])
    return F.linear(F.linear(x, down.reshape(down.shape[0], -1)), up.reshape(up.shape[0], -1))


def chain_output(x: torch.Tensor, out: torch.Tensor, stages, layer: nn.Module, multiplier: float = 1.0) -> torch.Tensor:
    """The layer's output with the chain applied: out + m·(W_chain - W0)x, computed stage by stage on outputs.

    A Reduction removes its directions from the current bias-free output; an Addition adds up·down·x.
    """
    conv = layer.__class__.__name__ == "Conv2d"
    h = out
    for stage in stages:
        if isinstance(stage, Reduction):
            h = para_remove(h, para_coefficients(h, stage.q, layer.bias, conv), stage.q, stage.strength, conv)
        else:
            h = h + stage.strength * lora_output(x, stage.up, stage.down, layer)
    return h if multiplier == 1 else out + multiplier * (h - out)


def format_version(tensors: dict[str, torch.Tensor]) -> str:
    """"1" for plain PaRa files (para_q only), "2" when some module holds a chain (stageN.* tensors)."""
    return CHAIN_FORMAT_VERSION if any(".stage" in key for key in tensors) else FORMAT_VERSION


def stages_to_file(stages) -> dict[str, torch.Tensor]:
    """A chain as file tensors (without the module prefix): a lone full-strength Reduction is the plain format."""
    if len(stages) == 1 and isinstance(stages[0], Reduction) and stages[0].strength == 1:
        return {Q_KEY: stages[0].q}
    tensors = {}
    for i, stage in enumerate(stages):
        if isinstance(stage, Reduction):
            tensors[f"stage{i}.{Q_KEY}"] = stage.q
        else:
            tensors[f"stage{i}.{UP_KEY}"] = stage.up
            tensors[f"stage{i}.{DOWN_KEY}"] = stage.down
        tensors[f"stage{i}.{STRENGTH_KEY}"] = torch.tensor(float(stage.strength))
    return tensors


def stages_from_file(parts: dict[str, torch.Tensor], where: str) -> list:
    """The chain of one module's file tensors (the inverse of stages_to_file); AdapterFileError when malformed."""
    if set(parts) == {Q_KEY}:
        return [Reduction(parts[Q_KEY])]
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in parts.items():
        stage, _, part = key.partition(".")
        if not (stage.startswith("stage") and stage[5:].isdigit()) or part not in STAGE_PARTS:
            raise AdapterFileError(f"{where}: unknown PaRa tensor {key!r} (expected {Q_KEY} or stageN.{Q_KEY}, "
                                   f"stageN.{UP_KEY}, stageN.{DOWN_KEY}, stageN.{STRENGTH_KEY})")
        by_index.setdefault(int(stage[5:]), {})[part] = tensor
    if sorted(by_index) != list(range(len(by_index))):
        raise AdapterFileError(f"{where}: PaRa stages {sorted(by_index)} are not numbered 0, 1, 2, ...")
    stages = []
    for i in range(len(by_index)):
        stage = by_index[i]
        strength = float(stage[STRENGTH_KEY]) if STRENGTH_KEY in stage else None
        if set(stage) == {Q_KEY, STRENGTH_KEY} and stage[Q_KEY].dim() == 2:
            stages.append(Reduction(stage[Q_KEY], strength))
        elif set(stage) == {UP_KEY, DOWN_KEY, STRENGTH_KEY} and stage[UP_KEY].shape[1] == stage[DOWN_KEY].shape[0]:
            stages.append(Addition(stage[UP_KEY], stage[DOWN_KEY], strength))
        else:
            raise AdapterFileError(f"{where}: PaRa stage {i} has {sorted(stage)} with mismatched or missing tensors")
    return stages


# --------------------------------------------------------------------------------------------------
# One adapted layer


class ParaModule(AdapterModule):
    """out = base(x) - m·s_p·Q Qᵀ (base(x) - bias) [+ m·s_l·up·down·x]: the bias-free output reused.

    s_p = para_strength² and, with lora_dim, a LoRA term trained with it: the paper's joint form
    ΔW = (-α1 Q | α2 B)(α1 QᵀW0 ; α2 A) = -α1² Q QᵀW0 + α2² B A, i.e. the chain [PaRa, then LoRA].
    """

    file_keys = (Q_KEY,)

    def __init__(self, lora_name: str, layer: nn.Module, rank: int, para_scale: float = 1.0,
                 lora_rank: int | None = None, lora_scale: float = 1.0, split: tuple[int, ...] | None = None,
                 init: str = INITS[0], **kwargs):
        super().__init__(lora_name, layer, **kwargs)
        sizes = split or (self.out_features,)
        if sum(sizes) != self.out_features:
            raise NetworkArgsError(f"{lora_name}: parts of {sizes} rows do not make its {self.out_features} outputs")
        if not 0 < rank < min(sizes):
            raise NetworkArgsError(
                f"rank {rank} does not fit {lora_name}: PaRa removes r of the layer's {min(sizes)} output "
                f"directions{' per part' if split else ''}, so r must be between 1 and {min(sizes) - 1}; lower "
                "network_dim/conv_dim")
        # split (FLUX's split_qkv): r directions removed from each part's rows (q, k, v, ...) instead of r across
        # the stacked rows: B and so Q are block-diagonal, kept so by zeroing the gradient off the blocks.
        self.split = tuple(split) if split else None
        self.rank = rank * len(sizes)
        b = torch.zeros(self.out_features, self.rank)
        for rows, columns in _blocks(sizes, rank):  # orthonormal from the start: QR's gradient needs full rank
            if init == "low_energy":
                b[rows, columns] = low_energy_basis(layer.weight[rows], rank).to(b.device)
            else:  # the paper's: a random subspace, so the model changes from step 0
                nn.init.orthogonal_(b[rows, columns])
        self.para_b = nn.Parameter(b)
        if self.split:
            mask = torch.zeros_like(b, dtype=torch.bool)
            for rows, columns in _blocks(sizes, rank):
                mask[rows, columns] = True
            self.register_buffer("_block_mask", mask, persistent=False)
            self.para_b.register_hook(lambda grad: grad * self._block_mask)
        self.conditioning: torch.Tensor | None = None  # min|R_ii| / max|R_ii| of the last QR
        self._basis_cache: tuple[torch.Tensor, int, bool] | None = None  # (Q, B's version, grad mode)
        self._b_is_orthonormal_at = -1  # B's version when a stored Q was loaded into it
        self._loading_q = False
        self._register_load_state_dict_pre_hook(self._accept_file_key)
        self.register_load_state_dict_post_hook(self._mark_loaded_q)
        self.para_scale = para_scale
        self.lora_rank = lora_rank
        self.lora_scale = lora_scale
        if lora_rank:
            down = torch.empty(lora_rank, self.in_features)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))  # as sd-scripts' LoRA; up = 0 makes the term 0 at step 0
            self.lora_down = nn.Parameter(down)
            self.lora_up = nn.Parameter(torch.zeros(self.out_features, lora_rank))
        else:
            self.register_parameter("lora_down", None)
            self.register_parameter("lora_up", None)

    # Q for this forward pass (a GramBasis while training): set by the network once per model call, batched
    # by shape, else a QR here.
    def basis(self) -> torch.Tensor | GramBasis:
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

    def set_basis(self, q: torch.Tensor | GramBasis, conditioning: torch.Tensor) -> None:
        self._basis_cache = (q, self.para_b._version, torch.is_grad_enabled() and self.para_b.requires_grad)
        self.conditioning = conditioning.detach()

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        q = self.basis()
        dropped = self.training and (self.dropout or self.rank_dropout)  # those act on the coefficients
        if isinstance(q, GramBasis) and not self.is_conv and not dropped:
            out = para_remove_from_linear(out, q, self.layer.bias, self.multiplier * self.para_scale)
            return self._add_lora(x, out)
        if isinstance(q, GramBasis) and out.numel() >= self.out_features ** 2:
            q = gram_q(q)  # at least as many rows as outputs: forming Q costs less than solving every row
        gram = isinstance(q, GramBasis)
        c = (gram_coefficients if gram else para_coefficients)(out, q, self.layer.bias, self.is_conv)
        if self.training:
            if self.dropout:
                c = F.dropout(c, p=self.dropout)
            if self.rank_dropout:
                keep = (torch.rand(c.shape[0], self.rank, device=c.device) > self.rank_dropout).to(c.dtype)
                shape = (c.shape[0], self.rank, 1, 1) if self.is_conv else (c.shape[0],) + (1,) * (c.dim() - 2) + (
                    self.rank,)
                c = c * keep.view(shape) / (1 - self.rank_dropout)
        return self._add_lora(x, para_remove(out, c, q, self.multiplier * self.para_scale, self.is_conv))

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.lora_rank:
            out = out + (self.multiplier * self.lora_scale) * lora_output(x, self.lora_up, self.lora_down, self.layer)
        return out

    def current_q(self) -> torch.Tensor:
        with torch.no_grad():
            if self.split and self._b_is_orthonormal_at != self.para_b._version:  # each block's Q, exact zeros off
                q = torch.zeros_like(self.para_b, dtype=torch.promote_types(self.para_b.dtype, torch.float32))
                for rows, columns in _blocks(self.split, self.rank // len(self.split)):
                    q[rows, columns] = orthonormal_basis(self.para_b[rows, columns])[0]
                return q
            q = self.basis()
        return q.to(torch.promote_types(q.dtype, torch.float32))

    def stages(self) -> list:
        """This layer as a chain (detached): [PaRa] or, with lora_dim, [PaRa, LoRA]; LoRA in kohya's file layout."""
        stages = [Reduction(self.current_q(), self.para_scale)]
        if self.lora_rank:
            up, down = self.lora_up.detach().float(), self.lora_down.detach().float()
            if self.is_conv:
                up, down = up[:, :, None, None], down.reshape(self.lora_rank, *self.layer.weight.shape[1:])
            stages.append(Addition(up, down, self.lora_scale))
        return stages

    def delta_weight(self) -> torch.Tensor:
        return chain_delta_weight(self.layer.weight, self.stages(), self.multiplier)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {key: tensor.clone() for key, tensor in stages_to_file(self.stages()).items()}

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        stages = stages_from_file(tensors, self.lora_name)
        expected = "PaRa then LoRA" if self.lora_rank else "PaRa"
        found = " then ".join("PaRa" if isinstance(s, Reduction) else "LoRA" for s in stages)
        if found != expected:
            raise AdapterFileError(f"{self.lora_name}: the file holds {found} for this layer, this network trains "
                                   f"{expected}; load merged files with --base_weights, and give lora_dim exactly "
                                   "when the file has a LoRA part")
        q = stages[0].q
        if self.split and tuple(q.shape) == tuple(self.para_b.shape) and bool((q[~self._block_mask] != 0).any()):
            raise AdapterFileError(
                f"{self.lora_name}: the file removes directions across the layer's stacked parts (q, k, v...) "
                "jointly; this network removes them per part (split_qkv=True). Continue without split_qkv")
        if tuple(q.shape) != tuple(self.para_b.shape):
            raise AdapterFileError(
                f"{self.lora_name}: the file's Q has shape {tuple(q.shape)}, this network expects "
                f"{tuple(self.para_b.shape)} ({self.out_features} outputs, rank {self.rank}"
                + (f" = {len(self.split)} parts x {self.rank // len(self.split)}, split_qkv" if self.split else "")
                + ")")
        if self.lora_rank:
            lora = stages[1]
            up, down = lora.up.reshape(lora.up.shape[0], -1), lora.down.reshape(lora.down.shape[0], -1)
            if up.shape != self.lora_up.shape or down.shape != self.lora_down.shape:
                raise AdapterFileError(f"{self.lora_name}: the file's LoRA part has rank {lora.rank}, this network "
                                       f"has lora_dim {self.lora_rank}")
            self.lora_up.copy_(up)
            self.lora_down.copy_(down)
            self.lora_scale = lora.strength
        self.para_scale = stages[0].strength
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

    def trainable_parameter_count(self) -> int:
        unused = int((~self._block_mask).sum()) if self.split and self.para_b.requires_grad else 0
        return super().trainable_parameter_count() - unused  # split: B's entries off the blocks stay 0

    def health(self) -> torch.Tensor:
        """-1 when B is not finite, else min|R_ii| / max|R_ii| of the last QR (1 before any): no sync here."""
        conditioning = self.conditioning if self.conditioning is not None else torch.ones((), device=self.para_b.device)
        # the sum is NaN/inf when an entry is (or when B has blown up past 1e38): one fast pass, where isfinite()
        # .all() takes four and vector_norm(inf) a slow one (7 ms a step at r = 32 in issue 8's bench)
        total = self.para_b.detach().sum()
        return torch.where(torch.isfinite(total), conditioning.to(self.para_b.device), -1.0)

    def health_problem(self, value: float) -> str | None:
        if value < 0:
            return f"{self.lora_name}: B holds NaN/inf (training diverged; lower the learning rate)"
        if value < RANK_LOSS_THRESHOLD:
            return (f"{self.lora_name}: B has lost rank (smallest/largest |R_ii| = {value:.2e}), so QR's gradient "
                    "would turn into NaN; lower the learning rate or the rank")
        return None


def _blocks(sizes: tuple[int, ...], rank: int):
    """(rows, columns) of each part's block in a block-diagonal (sum(sizes), rank·len(sizes)) matrix."""
    start = 0
    for i, size in enumerate(sizes):
        yield slice(start, start + size), slice(i * rank, (i + 1) * rank)
        start += size


class ParaChainModule(AdapterModule):
    """A layer with a fixed chain from a file (merged PaRa files, PaRa after a LoRA): inference and --base_weights.

    Nothing in it trains; to train on top of a merge, merge it into the base with --base_weights.
    """

    def __init__(self, lora_name: str, layer: nn.Module, stages, **kwargs):
        super().__init__(lora_name, layer, **kwargs)
        self._set_stages(stages)

    def _set_stages(self, stages) -> None:
        self._chain: list[tuple[type, float, tuple[str, ...]]] = []  # (stage kind, strength, buffer names)
        for i, stage in enumerate(stages):
            names = (f"stage{i}_q",) if isinstance(stage, Reduction) else (f"stage{i}_up", f"stage{i}_down")
            tensors = (stage.q,) if isinstance(stage, Reduction) else (stage.up, stage.down)
            for name, tensor in zip(names, tensors):
                # buffers follow .to(device); not persistent: the file format is stages_to_file's
                self.register_buffer(name, tensor.detach().float().clone(), persistent=False)
            self._chain.append((type(stage), float(stage.strength), names))

    def stages(self) -> list:
        return [kind(*(getattr(self, name) for name in names), strength) for kind, strength, names in self._chain]

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return chain_output(x, out, self.stages(), self.layer, self.multiplier)

    def delta_weight(self) -> torch.Tensor:
        return chain_delta_weight(self.layer.weight, self.stages(), self.multiplier)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {key: tensor.clone() for key, tensor in stages_to_file(self.stages()).items()}

    def load_file_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        stages = stages_from_file(tensors, self.lora_name)
        check_stages_fit(self.lora_name, stages, self.layer, "the file")
        for _, _, names in self._chain:
            for name in names:
                delattr(self, name)
        self._set_stages(stages)


def check_stages_fit(lora_name: str, stages, layer: nn.Module, source: str, about_file: str = "") -> None:
    """AdapterFileError unless every stage's factors have the layer's output and input sizes."""
    out_features, in_features = layer.weight.shape[0], layer.weight[0].numel()
    for i, stage in enumerate(stages):
        if isinstance(stage, Reduction):
            fits = stage.q.dim() == 2 and stage.q.shape[0] == out_features and 0 < stage.rank < out_features
        else:
            fits = stage.up.shape[0] == out_features and stage.down[0].numel() == in_features
        if not fits:
            what = (f"has Q of shape {tuple(stage.q.shape)}" if isinstance(stage, Reduction) else
                    f"has LoRA factors of shapes {tuple(stage.up.shape)}, {tuple(stage.down.shape)}")
            where = f" (stage {i})" if len(stages) > 1 else ""
            raise AdapterFileError(
                f"{source} does not fit this model: module {lora_name}{where} {what} but the layer has {out_features} "
                f"outputs and {in_features} inputs{about_file}. Use the base model the adapter was made for.")


# --------------------------------------------------------------------------------------------------
# The network


class ParaRankLossError(RuntimeError):
    """B lost rank or became non-finite during training."""


class ParaNetwork(AdapterNetwork):
    network_module = "networks.para"
    file_kinds = ("native PaRa", "native PaRa chain")

    def __init__(self, modules: list[ParaModule | ParaChainModule], multiplier: float = 1.0, metadata: dict | None = None):
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
            owned = [m for m in modules if id(m.layer) in layer_ids and isinstance(m, ParaModule)]
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
        modules = [m for m in self.adapter_modules if isinstance(m, ParaModule)]
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
        metadata = dict(metadata or {})
        metadata["para.format_version"] = format_version(self.file_state())
        super().save_weights(file, dtype, metadata)

    def apply_max_norm_regularization(self, max_norm_value, device):
        # PaRa's projection does not depend on B's scale, so a norm cap on B changes nothing.
        logger.warning("scale_weight_norms has no effect on PaRa: the projection QQᵀ does not depend on B's norm")
        return 0, 0.0, 0.0


def refresh_bases(modules: list[ParaModule]) -> None:
    """One batched factorization for all B's of the same shape; each module keeps its basis for this pass.

    Training gets GramBases (B and Cholesky factors, see `gram_bases`), anything else Householder Q.
    """
    groups: dict[tuple, list[ParaModule]] = {}
    for module in modules:
        b = module.para_b
        groups.setdefault((tuple(b.shape), b.device, b.dtype), []).append(module)
    for group in groups.values():
        training = torch.is_grad_enabled() and group[0].para_b.requires_grad
        if not training:
            group = [m for m in group if m._b_is_orthonormal_at != m.para_b._version]
            if not group:
                continue
        bs = [m.para_b for m in group]
        bases, conditioning = gram_bases(bs) if training else (None, None)
        if bases is None:
            q, conditioning = orthonormal_basis(torch.stack(bs))
            bases = q.unbind(0)
        for module, basis, module_conditioning in zip(group, bases, conditioning.unbind(0)):
            module.set_basis(basis, module_conditioning)


# --------------------------------------------------------------------------------------------------
# sd-scripts' entry points

NETWORK_ARGS = {
    "conv_dim": positive_int,
    "conv_alpha": float,  # accepted for sd-scripts configs; PaRa has no scale, so it has no effect
    "preset": choice(PRESETS),
    "init": choice(INITS),
    "include": regex,
    "exclude": regex,
    "dropout": probability,
    "rank_dropout": probability,
    "module_dropout": probability,
    # The paper's PaRa + LoRA: ΔW = -α1² Q QᵀW0 + α2²·(lora_alpha/lora_dim)·B A, trained together.
    "lora_dim": positive_int,
    "lora_alpha": float,
    "para_strength": float,  # α1
    "lora_strength": float,  # α2
}
UNSUPPORTED_ARGS = refused_lora_args(
    block_dims="PaRa has one rank per layer type (network_dim, conv_dim); use preset/include/exclude to choose layers",
    block_lrs="per-block learning rates are not implemented for PaRa",
    loraplus="LoRA+ scales lora_up's learning rate; PaRa has no up matrix",
)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder, unet,
                   neuron_dropout: float | None = None, **kwargs) -> ParaNetwork:
    """sd-scripts' create_network: PaRa on the preset's layers (network_args arrive as strings)."""
    args = parse_network_args(kwargs, {**NETWORK_ARGS, **FLUX_NETWORK_ARGS}, {**UNSUPPORTED_ARGS, **FLUX_UNSUPPORTED_ARGS})
    rank = positive_int(network_dim) if network_dim is not None else 4
    preset_name = args.get("preset") or "full"
    preset = PRESETS[preset_name]
    dropout = neuron_dropout if neuron_dropout is not None else args.get("dropout")
    flux = flux_targets(args, unet)
    if flux_layout(unet):  # FLUX.1: lora_flux's layers and per-type ranks
        if preset_name != "full":
            raise NetworkArgsError(f"preset {preset_name!r} is for Stable Diffusion UNets; on FLUX.1 choose layers "
                                   "with train_blocks, img_attn_dim ... single_mod_dim, in_dims, include/exclude")
        ranked = select_flux_layers(text_encoder, unet, flux, rank, True, args.get("include"), args.get("exclude"))
    else:
        conv_rank = args.get("conv_dim") or (rank if preset.conv_blocks == "always" else None)
        ranked = [(t, conv_rank if t.is_conv3x3 else rank) for t in select_target_layers(
            text_encoder, unet, preset, args.get("conv_dim") is not None, args.get("include"), args.get("exclude"))]
    if not ranked:
        raise NetworkArgsError(f"preset {preset_name!r} with these network_args and include/exclude patterns selects "
                               "no layer")
    lora_rank = args.get("lora_dim")
    if lora_rank is None and ("lora_alpha" in args or "lora_strength" in args):
        raise NetworkArgsError("lora_alpha/lora_strength set the LoRA part of PaRa + LoRA: give lora_dim=N too")
    para_scale = args.get("para_strength", 1.0) ** 2
    lora_scale = args.get("lora_strength", 1.0) ** 2 * (args.get("lora_alpha", lora_rank) / lora_rank) \
        if lora_rank else 1.0
    modules = [
        ParaModule(t.lora_name, t.layer, layer_rank, para_scale=para_scale, lora_rank=lora_rank,
                   lora_scale=lora_scale, dropout=dropout, rank_dropout=args.get("rank_dropout"),
                   module_dropout=args.get("module_dropout"),
                   split=split_parts(t) if args.get("split_qkv") else None, init=args.get("init") or INITS[0])
        for t, layer_rank in ranked
    ]
    network = ParaNetwork(modules, multiplier)
    network.train_t5xxl = flux.train_t5xxl
    params = network.trainable_parameter_count()
    lora_params = sum(m.rank * (m.in_features + m.out_features) for m in modules)
    logger.info("PaRa (%s): %d text-encoder and %d UNet layers, %d trainable parameters (LoRA at the same ranks: "
                "%d, ratio %.3f)", preset_name, len(network.text_encoder_modules), len(network.unet_modules),
                params, lora_params, params / lora_params)
    if network_alpha not in (None, 1, 1.0) or args.get("conv_alpha") is not None:
        logger.info("network_alpha/conv_alpha have no effect on PaRa: the projection has no scale")
    return network


def split_parts(target) -> tuple[int, ...] | None:
    """split_qkv: the parts of a FLUX fused layer (q, k, v of img/txt_attn.qkv; q, k, v, mlp of linear1)."""
    name = target.lora_name
    if not (name.endswith("_qkv") or name.endswith("_linear1")):
        return None
    sizes = getattr(target.layer, "sizes", None)  # the diffusers layout knows its parts
    if sizes is None:
        out = target.layer.weight.shape[0]
        if name.endswith("_qkv"):
            sizes = (out // 3,) * 3
        else:  # linear1 = 3 hidden + mlp_ratio·hidden rows, and linear2 reads hidden + mlp_ratio·hidden
            hidden = target.layer.weight.shape[1]
            sizes = (hidden,) * 3 + (out - 3 * hidden,)
    return tuple(sizes)


def create_network_from_weights(multiplier: float, file, vae, text_encoder, unet, weights_sd=None,
                                for_inference: bool = False, **kwargs):
    """sd-scripts' create_network_from_weights: a network with the file's modules and ranks (weights not loaded)."""
    metadata = {}
    if weights_sd is None:
        weights_sd, metadata = read_adapter_file(str(file))
    groups = group_by_module(weights_sd)
    not_para = [name for name, parts in groups.items()
                if not any(part == Q_KEY or part.startswith("stage") for part in parts)]
    if not_para:
        raise AdapterFileError(
            f"{file} is not a native PaRa file: module {not_para[0]} has no {Q_KEY} "
            f"(it has {', '.join(sorted(groups[not_para[0]]))}); LoRA/LoCon files load with networks.lora")
    modules = []
    for target in layers_for_file(text_encoder, unet, groups, metadata, str(file)):
        stages = stages_from_file(groups[target.lora_name], f"{file}: module {target.lora_name}")
        check_stages_fit(target.lora_name, stages, target.layer, str(file), describe_file_model(metadata))
        kinds = [type(stage) for stage in stages]
        if kinds == [Reduction]:
            module = ParaModule(target.lora_name, target.layer, stages[0].rank, para_scale=stages[0].strength)
        elif kinds == [Reduction, Addition]:  # PaRa + LoRA (trained jointly, or PaRa then a LoRA): trainable
            module = ParaModule(target.lora_name, target.layer, stages[0].rank, para_scale=stages[0].strength,
                                lora_rank=stages[1].rank, lora_scale=stages[1].strength)
        else:
            module = ParaChainModule(target.lora_name, target.layer, stages)
        modules.append(module)
    network = ParaNetwork(modules, multiplier)
    network.train_t5xxl = any(m.lora_name.startswith("lora_te3_") for m in modules)
    return network, weights_sd

