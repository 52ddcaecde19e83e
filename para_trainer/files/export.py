"""Exporting native PaRa files: an exact LoRA/LoCon file that every front end loads, or a merged checkpoint.

A PaRa layer is W = W0 - m·Q Qᵀ W0. With lora_up = -Q and lora_down = Qᵀ W0 (computed from the exact base
weight) and alpha = r, a kohya LoRA/LoCon loader computes W0 + m·up·down·(alpha/r), the same W
(frontend-formats.md §6.1). The file is exact only on the base model it was computed against, so the native file's
`para.base_fingerprint` (sha256 of the adapted layers' base weights) is checked against the base given here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from networks.adapter_base import (
    AdapterFileError,
    group_by_module,
    layers_for_file,
    module_kind_of_parts,
    read_adapter_file,
    set_layer_weight,
    write_adapter_file,
)
from networks.para import Q_KEY, chain_delta_weight, chain_lora_factors, check_stages_fit, stages_from_file

from .. import __version__
from ..models.loading import IMPLEMENTATIONS
from .adapter_files import layer_chains, read_adapter
from .metadata import FINGERPRINT_KEY, base_fingerprint, file_sha256

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION_NAMES = {dtype: name for name, dtype in PRECISIONS.items()}
# The dtypes a trainer may have cast the base to before fingerprinting it (--full_fp16/bf16, --fp8_base).
FINGERPRINT_ROUNDINGS = (None, torch.float16, torch.bfloat16) + (
    (torch.float8_e4m3fn,) if hasattr(torch, "float8_e4m3fn") else ())
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
OTHER_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".json")


class ExportError(ValueError):
    """An export that cannot be done as asked (no base, another base, not a PaRa file, bad output path)."""


# --------------------------------------------------------------------------------------------------
# Which base an adapter was trained on


# --------------------------------------------------------------------------------------------------
# Inputs


def load_base_model(model: str, v2: bool = False, sdxl: bool = False, v_parameterization: bool = False,
                    options=None):
    """The base model (diffusers folder, single file, Hub id or builtin:tiny-*) in float32, as the trainer loads it.
    `options` may carry --ae/--clip_l/--t5xxl, the parts of a BFL single-file FLUX transformer."""
    from ..models.flux import FLUX_PART_OPTIONS
    from ..models.loading import load_models

    parts = {name: getattr(options, name, None) for name in FLUX_PART_OPTIONS}
    return load_models(SimpleNamespace(pretrained_model_name_or_path=model, v2=v2, sdxl=sdxl,
                                       v_parameterization=v_parameterization, vae=None, **parts))



def _precision(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in PRECISION_NAMES:
        return dtype
    if isinstance(dtype, str) and dtype.lower() in PRECISIONS:
        return PRECISIONS[dtype.lower()]
    raise ExportError(f"unknown export precision {dtype!r}; use one of {', '.join(PRECISIONS)}")


def _is_para_module(parts) -> bool:
    return any(part == Q_KEY or part.startswith("stage") for part in parts)


def _read_native(path: str) -> tuple[dict[str, list], dict[str, str]]:
    """A native PaRa file as chains: sd-scripts module name -> stages (plain PaRa: one Reduction)."""
    try:
        tensors, metadata = read_adapter_file(str(path))
    except AdapterFileError as error:
        raise ExportError(str(error)) from None
    groups = group_by_module(tensors)
    if not groups or not all(_is_para_module(parts) for parts in groups.values()):
        name = next((n for n, parts in groups.items() if not _is_para_module(parts)), None)
        what = f"{module_kind_of_parts(groups[name])} module {name}" if name else "no module"
        raise ExportError(f"{path} is not a native PaRa file (it has {what}); export takes the .safetensors that "
                          "PaRa training or para-trainer merge wrote, with <module>.para_q tensors")
    try:
        chains = {name: stages_from_file(parts, f"{path}: module {name}") for name, parts in groups.items()}
    except AdapterFileError as error:
        raise ExportError(str(error)) from None
    return chains, metadata


def _base_layers(path, groups, metadata, models):
    """The base layer of every module of the file; one clear error when the file does not fit the model."""
    if models is None:
        raise ExportError(f"exporting {path} needs the base model it was trained on (--model: a diffusers folder, "
                          "a .safetensors/.ckpt checkpoint or builtin:tiny-*): PaRa's LoRA factors are computed "
                          "from the base weights")
    try:
        layers = layers_for_file(models.text_encoder_for_network, models.unet, groups, metadata, str(path))
    except AdapterFileError as error:
        raise ExportError(str(error)) from None
    try:
        for target in layers:
            check_stages_fit(target.lora_name, groups[target.lora_name], target.layer, str(path))
    except AdapterFileError as error:
        raise ExportError(str(error)) from None
    return layers


def _base_matches(recorded: str, layers) -> bool:
    # A model cast to fp16/bf16/fp8 for training fingerprints as the rounded float32 base does.
    return any(base_fingerprint(layers, dtype) == recorded for dtype in FINGERPRINT_ROUNDINGS)


def _check_base(path, metadata, layers, force: bool, warnings: list[str], matched_before: bool = False) -> str:
    """Compare the file's base fingerprint with the given base: "match", "missing" or "mismatch (forced)"."""
    recorded = metadata.get(FINGERPRINT_KEY)
    if not recorded:
        _warn(warnings, f"{path} does not record which base model it was trained on ({FINGERPRINT_KEY}); the "
                        "export is exact only if the given model is that base")
        return "missing"
    if matched_before or _base_matches(recorded, layers):
        return "match"
    message = (f"{path}: the adapter was trained on another base model (fingerprint {recorded[:16]}…); the "
               "export is exact only for that base")
    if not force:
        raise ExportError(message + "; use --force to export anyway")
    _warn(warnings, message + "; exporting anyway (--force)")
    return "mismatch (forced)"


def _warn(warnings: list[str], message: str) -> None:
    logger.warning("%s", message)
    warnings.append(message)


def _same_file(a, b) -> bool:
    return os.path.abspath(str(a)) == os.path.abspath(str(b))


# --------------------------------------------------------------------------------------------------
# LoRA/LoCon export


def _relative_error(up: torch.Tensor, down: torch.Tensor, stages, weight: torch.Tensor) -> float:
    """‖up·down - ΔW‖ / ‖ΔW‖ of the factors as stored against the chain's ΔW in float64."""
    exact = chain_delta_weight(weight.double(), stages).reshape(weight.shape[0], -1)
    product = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
    return ((product - exact).norm() / exact.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


def _check_lora_output(adapter_path: str, out_path: str) -> None:
    if not out_path.endswith(".safetensors"):
        raise ExportError(f"output {out_path}: write the LoRA as .safetensors (its metadata and hashes need it)")
    if _same_file(adapter_path, out_path):
        raise ExportError(f"output {out_path} is the adapter file itself; choose another output path")


def _rank_counts(ranks: dict[str, int]) -> dict[int, int]:
    """rank -> number of modules, by rank."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    return dict(sorted(counts.items()))


def _uniform_alphas(tensors: dict[str, torch.Tensor], ranks: dict[str, int], conv3x3: set[str]) -> None:
    """One alpha for all linear modules and one for all 3x3 convs (the largest rank of each), with each module's
    up scaled by rank/alpha so that alpha/rank·up·down is unchanged.

    diffusers' kohya converter maps an attention module's own alpha to a key that matches no layer, so such a
    module would load with the wrong scale (measured: KronA exports, whose ranks differ per module).
    """
    for group in ({n for n in ranks if n not in conv3x3}, conv3x3):
        if not group:
            continue
        alpha = max(ranks[n] for n in group)
        for name in group:
            if ranks[name] != alpha:
                up = tensors[f"{name}.lora_up.weight"]
                tensors[f"{name}.lora_up.weight"] = (up.float() * (ranks[name] / alpha)).to(up.dtype)
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))


def _rank_summary(ranks: dict[str, int], conv3x3: set[str]) -> tuple[int, int | None, bool]:
    """(network_dim, conv_dim or None, whether ranks differ within a layer type)."""
    linear = {r for name, r in ranks.items() if name not in conv3x3}
    conv = {r for name, r in ranks.items() if name in conv3x3}
    dim = max(linear) if linear else max(conv)
    return dim, (max(conv) if conv else None), len(linear) > 1 or len(conv) > 1


def _lora_metadata(native: dict[str, str], models, out_path: str, ranks: dict[str, int], conv3x3: set[str],
                   native_sha256: str, precision: str, overrides: dict | None) -> dict[str, str]:
    version = models.base_model_version
    dim, conv_dim, uneven = _rank_summary(ranks, conv3x3)
    metadata = {k: v for k, v in native.items() if not k.startswith("sshs_") and k != "para.format_version"}
    if "ss_network_args" in native:
        metadata["para.network_args"] = native["ss_network_args"]  # the PaRa training arguments
    metadata.pop("ss_network_args", None)
    if conv_dim is not None:  # where sd-scripts' LoRA records the 3x3-conv rank
        metadata["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(conv_dim)})
    if uneven:
        # rank -> modules (alpha: the largest rank of the layer kind, _uniform_alphas)
        metadata["para.export_ranks"] = json.dumps({str(r): n for r, n in _rank_counts(ranks).items()})
    metadata.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(dim),
        "ss_v2": str(models.kind == "sd2"),
        "ss_base_model_version": version,  # A1111/Forge file the LoRA under SD1/SD2/SDXL by this
        "ss_output_name": Path(out_path).stem,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{models.architecture}/lora",
        "modelspec.implementation": IMPLEMENTATIONS.get(version, "diffusers"),
        "modelspec.prediction_type": "v" if models.v_parameterization else "epsilon",
        "para.exported_from": native_sha256,
        "para.export_precision": precision,
        "para_trainer.version": __version__,
    })
    if models.kind == "flux":
        del metadata["modelspec.prediction_type"]  # sd-scripts writes none for flow-matching models
    metadata.setdefault("modelspec.title", metadata["ss_output_name"])
    metadata.setdefault("modelspec.date", time.strftime("%Y-%m-%dT%H:%M:%S"))
    metadata.update({k: str(v) for k, v in (overrides or {}).items()})
    return metadata


def export_lora(adapter_path, models, out_path, dtype=torch.float16, force: bool = False,
                metadata_overrides: dict | None = None) -> dict:
    """Write the native PaRa file `adapter_path` as an exact kohya LoRA/LoCon .safetensors for the base `models`.

    Returns a report: modules, conv3x3 modules, ranks, the largest relative error of a module's ΔW as stored
    (vs the exact float64 ΔW), the base check, warnings. Nothing is written when an error is raised.
    """
    adapter_path, out_path = str(adapter_path), str(out_path)
    precision = _precision(dtype)
    _check_lora_output(adapter_path, out_path)
    groups, native_metadata = _read_native(adapter_path)
    layers = _base_layers(adapter_path, groups, native_metadata, models)
    warnings: list[str] = []
    base_check = _check_base(adapter_path, native_metadata, layers, force, warnings)

    tensors, ranks, conv3x3 = {}, {}, set()
    worst_error, worst_module = 0.0, None
    for target in layers:
        name, weight = target.lora_name, target.layer.weight.detach()
        stages = groups[name]  # the Q's PaRa uses, as stored (no re-orthonormalisation)
        up, down = chain_lora_factors(weight, stages)
        up, down = up.to(precision), down.to(precision)
        error = _relative_error(up, down, stages, weight)
        if error > worst_error:
            worst_error, worst_module = error, name
        rank = up.shape[1]
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.lora_down.weight"] = down
        ranks[name] = rank
        if target.is_conv3x3:
            conv3x3.add(name)
    _uniform_alphas(tensors, ranks, conv3x3)

    precision_name = PRECISION_NAMES[precision]
    metadata = _lora_metadata(native_metadata, models, out_path, ranks, conv3x3, file_sha256(adapter_path),
                              precision_name, metadata_overrides)
    if base_check != "match":  # the factors are exact PaRa of the base they were computed from: record that one
        if native_metadata.get(FINGERPRINT_KEY):
            metadata["para.trained_base_fingerprint"] = native_metadata[FINGERPRINT_KEY]
        metadata[FINGERPRINT_KEY] = base_fingerprint(layers)
    write_adapter_file(out_path, tensors, metadata)
    if precision == torch.bfloat16:
        _warn(warnings, f"bf16 export: largest relative error of a module's ΔW is {worst_error:.1e} "
                        "(fp16 keeps about 8x less); use --precision fp16 or fp32 unless a loader needs bf16")
    return {
        "out": out_path,
        "kind": "LoCon" if conv3x3 else "LoRA",
        "modules": len(layers),
        "conv3x3_modules": len(conv3x3),
        "ranks": _rank_counts(ranks),
        "precision": precision_name,
        "max_relative_error": worst_error,
        "worst_module": worst_module,
        "base_model_version": models.base_model_version,
        "base_check": base_check,
        "warnings": warnings,
    }


def _is_lokr_file(path: str) -> bool:
    try:
        tensors, _ = read_adapter_file(str(path))
    except AdapterFileError:
        return False
    groups = group_by_module(tensors)
    return bool(groups) and all(any(part.startswith("lokr_") for part in parts) for parts in groups.values())


def export_krona_lora(adapter_path, models, out_path, dtype=torch.float16, rank: int | None = None,
                      metadata_overrides: dict | None = None) -> dict:
    """A KronA/LoKr file as a kohya LoRA/LoCon for loaders without LoKr (diffusers): exact at rank(A)·rank(B), or
    truncated to `rank` per module (the largest singular values; the error is reported).

    kron(A, B) does not involve the base weights, so any model with the same layers gives the same file; the model
    gives the layer shapes and the version metadata.
    """
    from networks.krona import kron_delta_weight, krona_lora_factors, lokr_full_factors

    adapter_path, out_path = str(adapter_path), str(out_path)
    precision = _precision(dtype)
    _check_lora_output(adapter_path, out_path)
    if models is None:
        raise ExportError(f"exporting {adapter_path} needs the base model (--model) for the layer shapes")
    try:
        tensors, native_metadata = read_adapter_file(adapter_path)
        groups = group_by_module(tensors)
        layers = layers_for_file(models.text_encoder_for_network, models.unet, groups, native_metadata, adapter_path)
        tensors, ranks, conv3x3 = {}, {}, set()
        worst_error, worst_module, largest_rank_error = 0.0, None, 0.0
        for target in layers:
            name, shape = target.lora_name, tuple(target.layer.weight.shape)
            a, b = lokr_full_factors(groups[name], shape, f"{adapter_path}: module {name}")
            up, down, truncation = krona_lora_factors(a, b, shape, 1.0, rank)
            up, down = up.to(precision), down.to(precision)
            exact = kron_delta_weight(a.double(), b.double(), shape).reshape(shape[0], -1)
            product = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
            error = ((product - exact).norm() / exact.norm().clamp_min(1e-300)).item()
            if error > worst_error:
                worst_error, worst_module = error, name
            largest_rank_error = max(largest_rank_error, truncation)
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.lora_down.weight"] = down
            ranks[name] = up.shape[1]
            if target.is_conv3x3:
                conv3x3.add(name)
    except AdapterFileError as error:
        raise ExportError(str(error)) from None
    _uniform_alphas(tensors, ranks, conv3x3)
    metadata = _lora_metadata(native_metadata, models, out_path, ranks, conv3x3, file_sha256(adapter_path),
                              PRECISION_NAMES[precision], metadata_overrides)
    metadata.pop("krona.format_version", None)
    if rank is not None:
        metadata["para.export_truncated_rank"] = str(rank)
    write_adapter_file(out_path, tensors, metadata)
    return {"out": out_path, "kind": "LoCon" if conv3x3 else "LoRA", "modules": len(layers),
            "conv3x3_modules": len(conv3x3), "ranks": _rank_counts(ranks),
            "precision": PRECISION_NAMES[precision], "max_relative_error": worst_error, "worst_module": worst_module,
            "base_model_version": models.base_model_version, "base_check": "not needed (kron(A, B) has no W0)",
            "truncation_error": largest_rank_error if rank is not None else None, "warnings": []}


# --------------------------------------------------------------------------------------------------
# Merged checkpoint


def _merged_output_format(out: str) -> str:
    suffix = Path(out).suffix.lower()
    if suffix in SINGLE_FILE_SUFFIXES:
        return "single file"
    if suffix in OTHER_FILE_SUFFIXES or (os.path.exists(out) and not os.path.isdir(out)):
        raise ExportError(f"output {out}: a merged model is written as a single-file checkpoint (.safetensors or "
                          ".ckpt) or as a diffusers folder (a path without a file suffix)")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "model_index.json")):
        raise ExportError(f"output folder {out} exists and is not a diffusers model; choose a new or empty folder")
    return "diffusers"


def _save_diffusers_folder(pipe, out: str, dtype) -> None:
    """save_pretrained into a temporary folder beside `out`, then swap it in: never a half-written model."""
    out_path = Path(out).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        if dtype is not None:
            for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
                model = getattr(pipe, name, None)
                if model is not None:
                    torch.nn.Module.to(model, dtype=dtype)  # ModelMixin.to would warn about kept-fp32 modules
        from ..models.tiny import save_pretrained_quietly

        save_pretrained_quietly(pipe, temp)
        old = None
        if out_path.exists():
            old = out_path.with_name(f".{out_path.name}.old-{os.getpid()}")
            os.replace(out_path, old)
        os.replace(temp, out_path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if temp.exists():
            shutil.rmtree(temp)


def _save_flux_transformer(models, out: str, dtype) -> None:
    """The (merged) FLUX transformer as one BFL-layout .safetensors file, written atomically."""
    from safetensors.torch import save_file

    from ..models.flux.bfl import transformer_to_bfl

    if not out.endswith(".safetensors"):
        raise ExportError(f"output {out}: a FLUX transformer is written as .safetensors (or as a diffusers folder)")
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous()
               for k, v in transformer_to_bfl(models.unet).items()}
    metadata = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": models.architecture,
                "modelspec.implementation": IMPLEMENTATIONS["flux1"], "para_trainer.version": __version__}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    temp = Path(out).with_name(f".tmp-{Path(out).name}")
    try:
        save_file(tensors, str(temp), metadata=metadata)
        os.replace(temp, out)
    finally:
        if temp.exists():
            temp.unlink()


@torch.no_grad()
def export_merged(adapters, models, out, dtype=None, force: bool = False) -> dict:
    """Bake adapter files into the base, in float32, in the given order: W <- W - m·Q Qᵀ W per PaRa file (a
    chain stage by stage), W <- W + m·ΔW for LoRA/LoCon/LoKr files (adapter_files.py).

    `adapters`: (path, multiplier) pairs. `out`: a .safetensors/.ckpt single-file checkpoint (what A1111 loads
    as a model) or a path without suffix for a diffusers folder. `dtype` (None: as loaded, float32) casts what
    is written. The weights of `models` are changed in place (also when a later file's base check fails);
    nothing is written when an error is raised.
    """
    out = str(out)
    save_dtype = _precision(dtype) if dtype is not None else None
    if models is None:
        raise ExportError("merging needs the base model (--model) to merge into")
    output_format = _merged_output_format(out)
    adapters = [(str(path), float(multiplier)) for path, multiplier in adapters]
    if not adapters:
        raise ExportError("give at least one native PaRa file to merge")
    for path, _ in adapters:
        if _same_file(path, out) or _same_file(models.source, out):
            raise ExportError(f"output {out} is one of the inputs; choose another output path")

    # Read every file and match it to the model before changing a weight.
    warnings: list[str] = []
    plans = []
    for path, multiplier in adapters:
        try:
            adapter = read_adapter(path).resolved(models)
            plans.append((adapter, layer_chains(adapter, models, multiplier), multiplier))
        except AdapterFileError as error:
            raise ExportError(str(error)) from None
    # Each PaRa file must fit the untouched base or, trained with --base_weights, the base with the files before it.
    fits_base = [bool(a.metadata.get(FINGERPRINT_KEY)) and _base_matches(a.metadata[FINGERPRINT_KEY],
                                                                         [t for t, _ in plan]) for a, plan, _ in plans]
    if models.kind == "flux" and output_format == "single file":
        changed = sorted({t.lora_name for _, plan, _ in plans for t, _ in plan if not t.in_unet})
        if changed:
            raise ExportError(f"a merged FLUX single file is the transformer in the BFL layout (what ComfyUI, Forge "
                              f"and sd-scripts load as flux1-dev.safetensors); these files also change the text "
                              f"encoders ({changed[0]}, ...): write a diffusers folder instead (an -o path without "
                              "a suffix)")
    report_adapters = []
    for fits, (adapter, plan, multiplier) in zip(fits_base, plans):
        base_check = _check_base(adapter.path, adapter.metadata, [t for t, _ in plan], force, warnings, fits) \
            if adapter.has_para else "not needed"
        for target, stages in plan:
            weight = target.layer.weight
            delta = chain_delta_weight(weight, stages)
            set_layer_weight(target.layer, weight.to(delta.dtype) + delta)
        report_adapters.append({"path": adapter.path, "multiplier": multiplier, "modules": len(plan),
                                "base_check": base_check})

    if output_format == "single file" and models.kind == "flux":
        _save_flux_transformer(models, out, save_dtype)
    elif output_format == "single file":
        from ..models.checkpoint import save_single_file

        save_single_file(models.pipeline, out, dtype=save_dtype)
    else:
        _save_diffusers_folder(models.pipeline, out, save_dtype)
    written_dtype = save_dtype or models.unet.dtype
    return {"out": out, "format": output_format, "adapters": report_adapters,
            "precision": PRECISION_NAMES.get(written_dtype, str(written_dtype)),
            "base_model_version": models.base_model_version, "warnings": warnings}


# --------------------------------------------------------------------------------------------------
# Reports for the command line


def format_export_report(report: dict) -> str:
    if "adapters" in report:
        lines = [f"wrote the merged model to {report['out']} ({report['format']}, {report['precision']})"]
        lines += [f"  merged {a['path']} x{a['multiplier']:g}: {a['modules']} layers, base {a['base_check']}"
                  for a in report["adapters"]]
        return "\n".join(lines)
    ranks = ", ".join(f"rank {r}: {n}" for r, n in report["ranks"].items())
    return "\n".join([
        f"wrote {report['kind']} {report['out']} ({report['precision']}, {report['base_model_version']})",
        f"  {report['modules']} modules ({report['conv3x3_modules']} 3x3 conv), {ranks}; alpha/rank·up·down = ΔW",
        f"  largest relative error of a module's ΔW as stored: {report['max_relative_error']:.1e} "
        f"({report['worst_module']})",
        f"  base model check: {report['base_check']}",
    ] + ([f"  truncated to rank {max(report['ranks'])}: largest relative error of a module's ΔW "
          f"{report['truncation_error']:.2e}"] if report.get("truncation_error") is not None else []))


def run_export(options) -> int:
    """`para-trainer export` (options from cli.py's parser); errors are printed as one line, exit status 2."""
    from ..models.checkpoint import CheckpointError
    from ..models.loading import ModelError

    from ..hub import HubError, resolve_path

    try:
        adapters = [resolve_path(str(a)) for a in options.adapters]
        multipliers = options.multiplier or [1.0] * len(adapters)
        if options.to == "lora" and (len(adapters) != 1 or options.multiplier):
            raise ExportError("--to lora exports one native file, at strength 1 (set the strength in the front end, "
                              "e.g. <lora:name:0.8>); --multiplier and several files are for --to merged")
        if len(multipliers) != len(adapters):
            raise ExportError(f"{len(multipliers)} --multiplier values for {len(adapters)} files: give one per file")
        krona = options.to == "lora" and _is_lokr_file(adapters[0])
        if options.rank is not None and not krona:
            raise ExportError("--rank truncates the LoRA export of a KronA/LoKr file; PaRa's export is exact at its "
                              "own rank r")
        for path in adapters:  # a wrong file fails before the (slow) base model is loaded
            if options.to == "merged":
                read_adapter(path)
            elif not krona:
                _read_native(path)
        models = load_base_model(options.model, v2=options.v2, v_parameterization=options.v_parameterization,
                                 options=options) \
            if options.model else None
        if krona:
            report = export_krona_lora(adapters[0], models, options.out, dtype=options.precision or "fp16",
                                       rank=options.rank)
        elif options.to == "lora":
            report = export_lora(adapters[0], models, options.out, dtype=options.precision or "fp16",
                                 force=options.force)
        else:
            report = export_merged(list(zip(adapters, multipliers)), models, options.out, dtype=options.precision,
                                   force=options.force)
    except (ExportError, AdapterFileError, ModelError, CheckpointError, HubError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_export_report(report))
    return 0


def lora_export_path(native_path: str) -> str:
    """Where the LoRA export of a native file goes: NAME.safetensors -> NAME_lora.safetensors."""
    stem, extension = os.path.splitext(native_path)
    return f"{stem}_lora{extension}"
