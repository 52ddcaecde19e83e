"""What an adapter or model file is, wherever it was made: kind, base model, modules, ranks, metadata, hashes.

Only the tensors' shapes and dtypes are read (plus 0-d `alpha` values), so a 7 GB checkpoint is inspected from
its header; the hashes stream through the file once. Module keys are grouped as the WebUIs do (kohya names split
at the first dot) or, for diffusers/peft names (`unet.down_blocks.0...to_q.lora_A.weight`), at the adapter part.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
from collections import Counter

from networks.adapter_base import (
    empty_file_message,
    module_kind_of_parts,
    non_finite_keys,
    pickle_refused_message,
)

from .metadata import legacy_model_hash


class InspectError(ValueError):
    """A file that cannot be read as tensors."""


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
KOHYA_PREFIXES = ("lora_", "lycoris_", "oft_")
# The adapter part of a key with a dotted module name (diffusers/peft, old diffusers attention processors).
DOTTED_PART = re.compile(
    r"^(?P<module>.+?)\.(?P<part>(?:lora_[AB]|lora_(?:up|down|mid)|lora\.(?:up|down)|lora_linear_layer\.(?:up|down)"
    r"|lora_magnitude_vector|dora_scale|alpha|lokr_\w+|hada_\w+|oft_\w+|para_q|diff(?:_b)?)(?:\..+)?)$")
# Layers that are convolutions with a k x k kernel (k > 1) in every SD UNet: resnet convs, samplers, conv_in/out.
CONV3X3_NAME = re.compile(r"_(conv1|conv2|conv|op|in_layers_2|out_layers_3|conv_in|conv_out)$")
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")
ARCHITECTURE_VERSIONS = {"stable-diffusion-v1": "sd_v1", "stable-diffusion-v2-512": "sd_v2",
                         "stable-diffusion-v2-768-v": "sd_v2_v", "stable-diffusion-xl-v1-base": "sdxl_base_v1-0",
                         "flux-1-dev": "flux1", "flux-1-schnell": "flux1"}
CROSS_ATTENTION_WIDTHS = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}
TEXT_ENCODER_WIDTHS = {768: "sd_v1", 1024: "sd_v2"}
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
KIND_DESCRIPTIONS = {
    "native PaRa": "PaRa's own format (Q per layer): loads in para-trainer and the PaRa WebUI extension; export "
                   "it with `para-trainer export` for A1111/ComfyUI/Forge/diffusers",
    "native PaRa chain": "PaRa's own format with several stages per layer (a para-trainer merge, PaRa + LoRA): "
                         "loads in para-trainer and the PaRa WebUI extension; the rank shown is the LoRA export's",
    "LoRA": "kohya LoRA (lora_up/lora_down)",
    "LoCon": "kohya LoRA with k x k conv layers (LoCon)",
    "diffusers/peft LoRA": "LoRA with diffusers/peft key names (lora_A/lora_B)",
    "checkpoint": "a Stable Diffusion model checkpoint, not an adapter",
    "FLUX transformer": "a FLUX.1 transformer in the BFL layout (flux1-dev.safetensors), not an adapter",
    "model weights": "plain model weights without adapter keys, not an adapter",
}


# --------------------------------------------------------------------------------------------------
# Module kinds


def _group(keys) -> tuple[dict[str, dict[str, str]], bool]:
    """module -> {part: key}, and whether the module names are dotted (diffusers/peft style)."""
    groups: dict[str, dict[str, str]] = {}
    dotted = False
    for key in keys:
        head, _, part = key.partition(".")
        if not head.startswith(KOHYA_PREFIXES):
            match = DOTTED_PART.match(key)
            if match:
                head, part, dotted = match["module"], match["part"], True
            else:
                head, _, part = key.rpartition(".")
        groups.setdefault(head, {})[part] = key
    return groups, dotted


def _module_rank(kind: str, shape) -> int | None:
    """The rank as the WebUIs read it (alpha / rank is the scale), from `shape(part)`; None when full-rank."""
    if kind == "native PaRa":
        return shape("para_q")[1]
    if kind == "native PaRa chain":  # the LoRA-export rank: every stage's Q or LoRA factor
        rank, i = 0, 0
        while shape(f"stage{i}.strength") is not None:
            rank += (shape(f"stage{i}.para_q") or shape(f"stage{i}.lora_up"))[1]
            i += 1
        return rank
    for part in ("lora_down.weight", "lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight",
                 "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if shape(part) is not None:
            return shape(part)[0]
    return None


def _is_conv3x3(name: str, shape) -> bool:
    for part in ("lora_down.weight", "lora_A.weight", "lokr_w2", "diff"):
        if shape(part) is not None:
            return len(shape(part)) == 4 and tuple(shape(part)[2:]) != (1, 1)
    if shape("lora_mid.weight") is not None or shape("lokr_t2") is not None or shape("hada_t1") is not None:
        return True
    return bool(CONV3X3_NAME.search(name.replace(".", "_")))  # native PaRa, LoHa, low-rank LoKr: by layer name


# --------------------------------------------------------------------------------------------------
# Reading


def _read_entries(path: str):
    """({key: (shape, dtype name)}, {alpha key: value}, metadata, file format) without loading big tensors."""
    if os.path.getsize(path) == 0:
        raise InspectError(empty_file_message(path))
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as file:
                metadata = file.metadata() or {}
                entries, scalars = {}, {}
                for key in file.keys():
                    piece = file.get_slice(key)
                    shape = tuple(piece.get_shape())
                    entries[key] = (shape, SAFETENSORS_DTYPES.get(piece.get_dtype(), piece.get_dtype().lower()))
                    if key.endswith("alpha") and len(shape) <= 1 and (not shape or shape[0] == 1):
                        scalars[key] = float(file.get_tensor(key).float().reshape(-1)[0])
        except Exception as error:
            raise InspectError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {error}") from None
        return entries, scalars, metadata, "safetensors"
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InspectError(pickle_refused_message(path)) from None
    except Exception as error:
        raise InspectError(f"{path} is neither .safetensors nor a readable torch file: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InspectError(f"{path} does not hold a dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    entries = {k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in tensors.items()}
    scalars = {k: float(v.float().reshape(-1)[0]) for k, v in tensors.items() if k.endswith("alpha") and v.numel() == 1}
    return entries, scalars, {}, "torch pickle (weights only)"


def _non_finite_tensors(path: str, file_format: str) -> list[str]:
    """The keys of an adapter file's tensors that hold NaN or Inf (one tensor in memory at a time)."""
    if file_format == "safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as file:
            return [key for key in file.keys() if non_finite_keys({key: file.get_tensor(key)})]
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state["state_dict"] if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) else state
    return non_finite_keys({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def _parse_metadata(metadata: dict[str, str]) -> dict:
    parsed = {}
    for key, value in sorted(metadata.items()):
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        parsed[key] = value
    return parsed


# --------------------------------------------------------------------------------------------------
# Base model version


def _version_from_metadata(metadata: dict[str, str]) -> tuple[str | None, str | None]:
    if metadata.get("ss_base_model_version"):
        return metadata["ss_base_model_version"], "metadata ss_base_model_version"
    architecture = metadata.get("modelspec.architecture")
    if architecture:
        base = architecture.split("/")[0]
        return ARCHITECTURE_VERSIONS.get(base, base), "metadata modelspec.architecture"
    if metadata.get("ss_v2") == "True":
        return "sd_v2", "metadata ss_v2"
    return None, None


def _version_from_keys(keys: list[str], groups: dict[str, dict[str, str]], entries) -> tuple[str | None, str | None]:
    flux_blocks = ("double_blocks.", "single_blocks.", "model.diffusion_model.double_blocks.")
    if any(k.startswith(flux_blocks) or k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))
           for k in keys):
        return "flux1", "guessed from key names"
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl_base_v1-0", "guessed from key names"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd_v2", "guessed from key names"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd_v1", "guessed from key names"
    names = [n.replace(".", "_") for n in groups]
    if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2_")) or
           re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_", n) for n in names):
        return "sdxl_base_v1-0", "guessed from key names"
    # Real models' widths: cross-attention context (768 / 1024 / 2048) and the text encoder's (768 / 1024).
    for name, parts in groups.items():
        flat = name.replace(".", "_")
        for part in ("lora_down.weight", "lora_A.weight", "diff"):
            if part in parts and flat.endswith("attn2_to_k"):
                version = CROSS_ATTENTION_WIDTHS.get(entries[parts[part]][0][1])
                if version:
                    return version, "guessed from layer widths"
        if "para_q" in parts and "self_attn_q_proj" in flat:
            version = TEXT_ENCODER_WIDTHS.get(entries[parts["para_q"]][0][0])
            if version:
                return version, "guessed from layer widths"
    if any(n.startswith(("lora_te_", "lora_unet_down_blocks_", "lora_unet_up_blocks_", "unet_", "text_encoder_"))
           for n in names):
        return "sd_v1/sd_v2", "guessed from key names (SD1 and SD2 share them)"
    return None, None


# --------------------------------------------------------------------------------------------------
# Hashes


def _hashes(path: str, metadata: dict[str, str], safetensors: bool, entries_are_adapter: bool) -> dict:
    full, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        if safetensors:
            size_bytes = f.read(8)
            full.update(size_bytes)
            full.update(f.read(int.from_bytes(size_bytes, "little")))
        for block in iter(lambda: f.read(1 << 20), b""):
            full.update(block)
            if safetensors:
                data.update(block)
    sha256 = full.hexdigest()
    hashes = {"sha256": sha256, "autov2": sha256[:10], "legacy_model_hash": legacy_model_hash(path)}
    if not safetensors:
        return hashes
    hashes["addnet_hash"] = data.hexdigest()  # what A1111 computes when the file has no sshs_model_hash
    stored = metadata.get("sshs_model_hash")
    hashes["sshs_model_hash"] = stored
    hashes["sshs_model_hash_matches"] = None if stored is None else _hex(stored) == hashes["addnet_hash"]
    if stored and stored.startswith("0x"):
        hashes["sshs_model_hash_scheme"] = "LyCORIS (sha256 over each tensor's own serialisation, not the addnet hash)"
    stored_legacy = metadata.get("sshs_legacy_hash")
    hashes["sshs_legacy_hash"] = stored_legacy
    if entries_are_adapter and os.path.getsize(path) < 1 << 30:
        from safetensors.torch import load_file

        from networks.adapter_base import addnet_hashes

        hashes["addnet_legacy_hash"] = addnet_hashes(load_file(path), metadata)[1]  # as sd-scripts writes it
        hashes["sshs_legacy_hash_matches"] = None if stored_legacy is None else \
            _hex(stored_legacy) == hashes["addnet_legacy_hash"]
    return hashes


def _hex(value: str) -> str:
    value = value.strip().lower()
    return value[2:] if value.startswith("0x") else value  # LyCORIS writes "0x..."


# --------------------------------------------------------------------------------------------------
# The report


def inspect(path, hashes: bool = True) -> dict:
    """Everything this module can tell about the file at `path` (a plain, JSON-serialisable dict)."""
    path = str(path)
    if os.path.isdir(path):
        return _inspect_diffusers_folder(path)
    if not os.path.isfile(path):
        raise InspectError(f"file not found: {path}")
    entries, scalars, metadata, file_format = _read_entries(path)
    keys = list(entries)
    report = {"path": path, "file_format": file_format, "size_bytes": os.path.getsize(path)}
    notes = []

    groups, dotted = _group(keys)
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in keys):
        kind, module_kinds, modules = "checkpoint", {}, {}
    elif "img_in.weight" in keys and any(k.startswith("double_blocks.") for k in keys):
        kind, module_kinds, modules = "FLUX transformer", {}, {}
    else:
        modules = {name: module_kind_of_parts(parts) for name, parts in groups.items()}
        if dotted:
            modules = {name: "diffusers/peft LoRA" if k == "LoRA" else k for name, k in modules.items()}
        module_kinds = dict(Counter(modules.values()))
        adapter_kinds = {k for k in module_kinds if k not in ("norm", "unknown")}
        if not adapter_kinds:
            all_plain = keys and all(k.endswith((".weight", ".bias")) for k in keys)
            kind = "model weights" if all_plain else "unknown"
        elif len(adapter_kinds) == 1:
            kind = adapter_kinds.pop()
        else:
            kind = "mixed (" + ", ".join(sorted(adapter_kinds)) + ")"
    adapter = kind not in ("checkpoint", "FLUX transformer", "model weights", "unknown")
    adapted = {name: k for name, k in modules.items() if k not in ("norm", "unknown")}

    ranks, conv3x3 = Counter(), 0
    for name, module_kind in adapted.items():
        parts = groups[name]
        shape = lambda part, parts=parts: entries[parts[part]][0] if part in parts else None  # noqa: E731
        rank = _module_rank(module_kind, shape)
        if rank is not None:
            ranks[rank] += 1
        conv3x3 += _is_conv3x3(name, shape)
    if kind == "LoRA" and conv3x3:
        kind = "LoCon"
    text_encoder = sum(name.replace(".", "_").startswith(TEXT_ENCODER_PREFIXES) for name in adapted)

    version, source = _version_from_metadata(metadata)
    if version is None:
        version, source = _version_from_keys(keys, groups, entries)
    report.update({
        "kind": kind,
        "description": KIND_DESCRIPTIONS.get(kind, ""),
        "module_kinds": module_kinds,
        "modules": len(adapted),
        "text_encoder_modules": text_encoder,
        "unet_modules": len(adapted) - text_encoder,
        "conv_modules": conv3x3,
        "ranks": {"histogram": dict(sorted(ranks.items())), "min": min(ranks), "max": max(ranks)} if ranks else None,
        "alphas": dict(sorted(Counter(scalars.values()).items())),
        "dtypes": dict(Counter(dtype for _, dtype in entries.values())),
        "tensors": len(entries),
        "base_model_version": version,
        "base_model_source": source,
        "metadata": _parse_metadata(metadata),
    })
    if hashes:
        report["hashes"] = _hashes(path, metadata, file_format == "safetensors", adapter)
        if report["hashes"].get("sshs_model_hash_scheme"):
            notes.append("sshs_model_hash was written by LyCORIS, which hashes differently from sd-scripts; A1111 "
                         "shows it as it is")
        elif report["hashes"].get("sshs_model_hash_matches") is False:
            notes.append("sshs_model_hash does not match the tensors: A1111 will show a wrong hash in infotexts")
    if metadata.get("para.exported_from"):
        notes.append(f"exported from a native PaRa file (sha256 {metadata['para.exported_from'][:16]}…); exact only "
                     "on the base model it was exported for")
    if adapter:
        bad = _non_finite_tensors(path, file_format)
        report["non_finite_tensors"] = bad
        if bad:
            notes.insert(0, f"{len(bad)} tensors hold NaN or Inf (e.g. {bad[0]}): the training that wrote this file "
                            "diverged; para-trainer's commands refuse it and a WebUI would draw black or noisy images."
                            " Use an earlier save, or train again with a lower learning rate")
    if kind == "unknown" and keys:
        unknown = next((n for n, k in modules.items() if k == "unknown"), keys[0])
        notes.append(f"no known adapter keys, e.g. {unknown}: {sorted(groups.get(unknown, {}))[:4]}")
    report["notes"] = notes
    return report


def _inspect_diffusers_folder(path: str) -> dict:
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        raise InspectError(f"{path} is a folder but not a diffusers model (no model_index.json)")
    with open(index, encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name", "")
    version, source = None, None
    if "XL" in class_name:
        version, source = "sdxl_base_v1-0", "model_index.json"
    else:
        try:
            with open(os.path.join(path, "unet", "config.json"), encoding="utf-8") as f:
                width = json.load(f).get("cross_attention_dim")
            version, source = CROSS_ATTENTION_WIDTHS.get(width, "sd_v1/sd_v2"), "unet/config.json"
        except OSError:
            pass
    return {"path": path, "file_format": "diffusers folder", "kind": "checkpoint",
            "description": f"a diffusers {class_name or 'model'} folder, not an adapter", "modules": 0,
            "base_model_version": version, "base_model_source": source, "metadata": {}, "notes": []}


def format_report(report: dict) -> str:
    """The report as text for a terminal; long metadata values are shortened (`--json` prints them whole)."""
    size = report.get("size_bytes")
    lines = [f"file: {report['path']} ({report['file_format']}" + (f", {size / 2 ** 20:.1f} MiB)" if size else ")")]
    kind = report["kind"]
    lines.append(f"kind: {kind}" + (f" — {report['description']}" if report.get("description") else ""))
    if len(report.get("module_kinds") or {}) > 1:
        lines.append("module kinds: " + ", ".join(f"{k} {n}" for k, n in sorted(report["module_kinds"].items())))
    version = report.get("base_model_version")
    lines.append(f"base model: {version} ({report['base_model_source']})" if version else "base model: unknown")
    if report.get("modules"):
        denoiser = "FLUX transformer" if version == "flux1" else "UNet"
        lines.append(f"modules: {report['modules']} (text encoder {report['text_encoder_modules']}, {denoiser} "
                     f"{report['unet_modules']}), on k x k convolutions: {report['conv_modules']}")
    ranks = report.get("ranks")
    if ranks:
        histogram = ", ".join(f"{r} ({n})" for r, n in ranks["histogram"].items())
        lines.append(f"ranks: {histogram}; min {ranks['min']}, max {ranks['max']}")
    if report.get("alphas"):
        lines.append("alpha: " + ", ".join(f"{a:g} ({n})" for a, n in report["alphas"].items()))
    if report.get("dtypes"):
        lines.append("dtypes: " + ", ".join(f"{d} ({n})" for d, n in report["dtypes"].items())
                     + f"; {report['tensors']} tensors")
    hashes = report.get("hashes")
    if hashes:
        lines.append("hashes:")
        lines.append(f"  sha256: {hashes['sha256']} (A1111 short hash {hashes['autov2']})")
        lines.append(f"  legacy model hash: {hashes['legacy_model_hash']}")
        if "addnet_hash" in hashes:
            lines.append(f"  addnet hash (recomputed): {hashes['addnet_hash']}")
            stored, matches = hashes["sshs_model_hash"], hashes["sshs_model_hash_matches"]
            lines.append("  sshs_model_hash: " + ("not in the file" if stored is None else
                                                  f"{stored} ({'matches' if matches else 'DOES NOT MATCH'})"))
            if hashes.get("sshs_model_hash_scheme"):
                lines.append(f"    scheme: {hashes['sshs_model_hash_scheme']}")
            if "addnet_legacy_hash" in hashes:
                stored, matches = hashes["sshs_legacy_hash"], hashes.get("sshs_legacy_hash_matches")
                lines.append("  sshs_legacy_hash: " + ("not in the file" if stored is None else
                                                       f"{stored} ({'matches' if matches else 'does not match'})"))
    metadata = report.get("metadata") or {}
    lines.append(f"metadata: {len(metadata)} keys" + (":" if metadata else ""))
    for key, value in metadata.items():
        text = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"  {key}: {text if len(text) <= 120 else text[:117] + '...'}")
    lines += [f"note: {note}" for note in report.get("notes", [])]
    return "\n".join(lines)


def run_inspect(options) -> int:
    """`para-trainer inspect` (options from cli.py's parser): text, or the whole report as JSON with --json."""
    from ..hub import HubError, resolve_path

    try:  # an hf://USER/REPO/FILE reference is read from the Hugging Face cache (downloaded once)
        report = inspect(resolve_path(options.file), hashes=not options.no_hash)
    except (InspectError, HubError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, ensure_ascii=False) if options.json else format_report(report))
    return 0
