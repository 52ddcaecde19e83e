"""`para-trainer merge A B [C …] -o OUT`: several adapters as one native PaRa file, plus its exact LoRA export.

Sequential (default, the paper's multi-subject formula): per layer the files' stages are applied in argument
order, W1 = W0 - Q1Q1ᵀW0, W_m = W1 - Q2Q2ᵀW1, ... Order matters: (I - P2)(I - P1) ≠ (I - P1)(I - P2) unless
the subspaces are orthogonal. LoRA/LoCon/LoKr files join as additions, so `merge style.safetensors dog.safetensors`
is PaRa after LoRA, (I - QQᵀ)(W0 + BA).

--orthogonal: one projection per layer onto span[Q1, Q2, …], W_m = W0 - Q′Q′ᵀW0 — the same for any order, and
equal to the sequential merge only when the subspaces are orthogonal. PaRa files only, at strength 1.

The native file keeps every Q (no base weights needed); the LoRA export (with --model) is exact: rank Σr,
up = [-Q1 | -Q2], down = [Q1ᵀW0 ; Q2ᵀW1] — not the same as two separate LoRA exports, which both use W0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from networks.adapter_base import AdapterFileError, layer_key, set_layer_weight, write_adapter_file
from networks.para import Reduction, format_version, scale_stages, stages_to_file

from .. import __version__
from .adapter_files import AdapterFile, layer_chains, parse_file_and_strength, read_adapter
from .export import ExportError, _base_matches, export_lora, format_export_report, load_base_model, lora_export_path
from .metadata import FINGERPRINT_KEY, base_fingerprint

# Singular values of [Q1 | Q2 | …] below this are directions two files share: counted once in --orthogonal.
SPAN_TOLERANCE = 1e-6
CARRIED_METADATA = ("ss_base_model_version", "ss_v2", "modelspec.architecture", "modelspec.prediction_type",
                    "modelspec.implementation", "ss_sd_model_name", "ss_new_sd_model_hash")


class MergeError(ValueError):
    """A merge that cannot be done as asked."""


def merge_sequential(adapters: list[tuple[AdapterFile, float]]) -> dict[str, list]:
    """Per module, the stages of every file that has it, in argument order, each file's scaled by its strength."""
    chains: dict[str, list] = {}
    for adapter, strength in adapters:
        for name, stages in adapter.chains.items():
            chains.setdefault(name, []).extend(scale_stages(stages, strength))
    return chains


def orthonormal_span(qs: list[torch.Tensor]) -> torch.Tensor:
    """An orthonormal basis of span[Q1, Q2, …] (float64 SVD; shared directions counted once)."""
    stacked = torch.cat([q.double() for q in qs], dim=1)
    u, singular, _ = torch.linalg.svd(stacked, full_matrices=False)
    rank = int((singular > SPAN_TOLERANCE * singular[0]).sum())
    return u[:, :rank].float().contiguous()


def merge_orthogonal(adapters: list[tuple[AdapterFile, float]]) -> dict[str, list]:
    """Per module one Reduction onto the span of all files' Q's (order-free)."""
    for adapter, strength in adapters:
        if adapter.kind != "PaRa":
            raise MergeError(f"--orthogonal combines plain PaRa files; {adapter.path} is {adapter.kind}. "
                             "Merge it sequentially (without --orthogonal)")
        if strength != 1:
            raise MergeError(f"--orthogonal projects onto the joint span at full strength; {adapter.path} has "
                             f"strength {strength:g}. Drop the strength or merge sequentially")
    qs: dict[str, list[torch.Tensor]] = {}
    for adapter, _ in adapters:
        for name, stages in adapter.chains.items():
            qs.setdefault(name, []).append(stages[0].q)
    return {name: [Reduction(orthonormal_span(module_qs))] for name, module_qs in qs.items()}


def _check_bases(adapters, models, force: bool) -> list[str]:
    """Each PaRa file must record the given base, or the base with the files before it (trained on
    --base_weights); the model's weights are restored afterwards. Returns warnings (with --force)."""
    from .adapter_files import apply_adapters

    def fits(adapter, plan) -> bool:
        recorded = adapter.metadata.get(FINGERPRINT_KEY)
        return not (adapter.has_para and recorded) or _base_matches(recorded, [target for target, _ in plan])

    plans = [layer_chains(adapter, models, strength) for adapter, strength in adapters]
    fits_base = [fits(adapter, plan) for (adapter, _), plan in zip(adapters, plans)]
    warnings, backups = [], {}
    try:
        for (adapter, strength), plan, fitted in zip(adapters, plans, fits_base):
            if not (fitted or fits(adapter, plan)):
                message = f"{adapter.path} was trained on another base model than {models.source}"
                if not force:
                    raise MergeError(message + "; give the base it was trained on, or --force")
                warnings.append(message + " (--force)")
            for target, _ in plan:
                backups.setdefault(layer_key(target.layer), (target.layer, target.layer.weight.detach().clone()))
            apply_adapters(models, [(adapter, strength)])
    finally:
        with torch.no_grad():
            for layer, weight in backups.values():
                set_layer_weight(layer, weight)
    return warnings


def _metadata(adapters, mode: str, out: str, models) -> dict[str, str]:
    first = adapters[0][0].metadata
    metadata = {key: first[key] for key in CARRIED_METADATA if key in first}
    metadata.update({
        "ss_network_module": "networks.para",
        "ss_output_name": Path(out).stem,
        "para.merge_mode": mode,
        "para.merge": json.dumps([{"file": os.path.basename(a.path), "sha256": a.sha256, "kind": a.kind,
                                   "strength": s, "modules": len(a.chains)} for a, s in adapters]),
        "para_trainer.version": __version__,
    })
    fingerprints = {a.metadata.get(FINGERPRINT_KEY) for a, _ in adapters if a.has_para}
    if models is None and len(fingerprints) == 1 and None not in fingerprints:
        metadata[FINGERPRINT_KEY] = fingerprints.pop()  # every PaRa file was trained on the same base
    return metadata


def model_family(adapter: AdapterFile) -> str | None:
    """SD1, SD2 or SDXL, from the file's metadata or (SDXL) its module names; None when it does not say."""
    version = adapter.metadata.get("ss_base_model_version") or adapter.metadata.get("modelspec.architecture") or ""
    sdxl_names = any(name.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_",
                                      "lora_unet_output_blocks_")) for name in adapter.chains)
    if sdxl_names or "xl" in version:
        return "SDXL"
    if version.startswith(("sd_v2", "stable-diffusion-v2")):
        return "SD2"
    if version.startswith(("sd_v1", "stable-diffusion-v1")):
        return "SD1"
    return None


def check_same_family(adapters: list[AdapterFile]) -> None:
    """MergeError when the files were trained on different model families: one file would mix both."""
    families = {}
    for adapter in adapters:
        families.setdefault(model_family(adapter), adapter.path)
    families.pop(None, None)
    if len(families) > 1:
        listed = " and ".join(f"{path} is an {family} adapter" for family, path in families.items())
        raise MergeError(f"{listed}: merged, they would make one file that fits neither model; merge files trained "
                         "on the same base model")


def merge(inputs: list[tuple[str, float]], out: str, models=None, orthogonal: bool = False, force: bool = False,
          lora_out: str | None = None, lora_dtype="fp16") -> dict:
    """Write the merged native file to `out` and, with `models` and `lora_out`, its exact LoRA export."""
    out = str(out)
    if not out.endswith(".safetensors"):
        raise MergeError(f"output {out}: write the merged adapter as .safetensors")
    if len(inputs) < 2 and not (inputs and inputs[0][1] != 1):
        raise MergeError("give at least two adapter files to merge (or one with a strength, FILE:0.7)")
    paths = [os.path.abspath(p) for p, _ in inputs]
    if os.path.abspath(out) in paths or (lora_out and os.path.abspath(lora_out) in paths):
        raise MergeError(f"output {out} is one of the inputs; choose another output path")
    adapters = [(read_adapter(path), strength) for path, strength in inputs]
    check_same_family([adapter for adapter, _ in adapters])
    if not any(adapter.has_para for adapter, _ in adapters):
        raise MergeError("none of the files is a PaRa adapter; merge combines PaRa files with each other or with "
                         "LoRA/LoCon/LoKr files")
    warnings = []
    if models is not None:
        adapters = [(adapter.resolved(models), strength) for adapter, strength in adapters]
        warnings = _check_bases(adapters, models, force)  # also: every file fits the model
    elif any(adapter.needs_model for adapter, _ in adapters):
        raise MergeError("merging a LoKr/KronA file needs the base model (--model): its exact LoRA stage depends "
                         "on the layer shapes")
    chains = merge_orthogonal(adapters) if orthogonal else merge_sequential(adapters)
    tensors = {f"{name}.{key}": tensor for name, stages in chains.items()
               for key, tensor in stages_to_file(stages).items()}
    metadata = _metadata(adapters, "orthogonal" if orthogonal else "sequential", out, models)
    metadata["para.format_version"] = format_version(tensors)
    if models is not None:
        merged = AdapterFile(out, "PaRa chain", chains, metadata)
        metadata[FINGERPRINT_KEY] = base_fingerprint([target for target, _ in layer_chains(merged, models)])
    write_adapter_file(out, tensors, metadata)
    report = {"out": out, "mode": metadata["para.merge_mode"], "modules": len(chains),
              "ranks": sorted({sum(s.rank for s in stages) for stages in chains.values()}),
              "inputs": [{"path": a.path, "kind": a.kind, "strength": s, "modules": len(a.chains)}
                         for a, s in adapters], "warnings": warnings, "lora": None}
    if models is not None and lora_out:
        report["lora"] = export_lora(out, models, lora_out, dtype=lora_dtype)
    return report


def format_merge_report(report: dict) -> str:
    lines = [f"wrote the merged PaRa adapter {report['out']} ({report['mode']}, {report['modules']} modules, "
             f"total rank per module {'/'.join(map(str, report['ranks']))})"]
    lines += [f"  {i + 1}. {a['path']} ({a['kind']}, {a['modules']} modules) x{a['strength']:g}"
              for i, a in enumerate(report["inputs"])]
    lines += [f"  warning: {w}" for w in report["warnings"]]
    if report["lora"]:
        lines.append(format_export_report(report["lora"]))
    else:
        lines.append("  no LoRA export: give --model (the base model) to write one")
    return "\n".join(lines)


def run_merge(options) -> int:
    """`para-trainer merge` (options from cli.py); errors are printed as one line, exit status 2."""
    from ..models.checkpoint import CheckpointError
    from ..models.loading import ModelError
    from ..hub import HubError, resolve_path

    try:
        inputs = [(resolve_path(path), strength)
                  for path, strength in map(parse_file_and_strength, options.adapters)]
        check_same_family([read_adapter(path) for path, _ in inputs])  # before the (slow) base model is loaded
        models = load_base_model(options.model, v2=options.v2, options=options) if options.model else None
        lora_out = None if options.no_export_lora else lora_export_path(options.out)
        report = merge(inputs, options.out, models, options.orthogonal, options.force, lora_out,
                       options.precision)
    except (MergeError, ExportError, AdapterFileError, ModelError, CheckpointError, HubError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_merge_report(report))
    return 0
