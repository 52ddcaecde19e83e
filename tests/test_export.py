"""para_trainer.files.export: the exact LoRA/LoCon export (checked through diffusers' own loader and A1111's formula),
merged checkpoints, the base-model check and bad input."""

import argparse
import hashlib
import json
import logging

import pytest
import torch
from safetensors import safe_open

from networks import para
from networks.adapter_base import named_layers
from para_trainer.files.export import ExportError, export_lora, export_merged, load_base_model, run_export
from para_trainer.files.metadata import FINGERPRINT_KEY, base_fingerprint
from para_trainer.models import tiny as tiny_models
from para_trainer.models.checkpoint import load_single_file
from para_trainer.models.loading import StableDiffusionModels

KINDS = ["sd1", "sdxl"]
VERSIONS = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def save_native(network, models, path, seed, fingerprint=True):
    """Give every B a random value (a trained adapter, not the orthogonal init) and save the native file."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.adapter_modules:
            module.para_b.copy_(torch.randn(module.para_b.shape, generator=generator))
    metadata = {"ss_base_model_version": models.base_model_version, "ss_seed": "42"}
    if fingerprint:
        metadata[FINGERPRINT_KEY] = base_fingerprint(network.adapter_modules)
    network.save_weights(str(path), None, metadata)


def model_inputs(models):
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 700, (2, 77), generator=generator)
    unet = models.unet
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    added = None
    if models.is_sdxl:
        added = {"text_embeds": torch.randn(2, models.text_encoders[1].config.projection_dim, generator=generator),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return ids, latents, context, added


@torch.no_grad()
def model_outputs(pipe, inputs):
    """Each text encoder's last hidden state and the UNet's prediction."""
    ids, latents, context, added = inputs
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    outputs = [encoder(ids).last_hidden_state for encoder in encoders]
    outputs.append(pipe.unet(latents, 10, context, added_cond_kwargs=added).sample)
    return outputs


def make_adapter(kind, folder):
    """A PaRa adapter with 3x3 conv layers on a tiny model, saved natively and exported as fp32 LoRA, and the
    outputs of the PaRa-adapted model."""
    models = load_base_model(f"builtin:tiny-{kind}")
    network = para.create_network(1.0, 4, 1, None, models.text_encoder_for_network, models.unet, conv_dim="2")
    save_native(network, models, folder / "native.safetensors", seed=1)
    inputs = model_inputs(models)
    base_outputs = model_outputs(models.pipeline, inputs)
    network.apply_to(models.text_encoder_for_network, models.unet)
    network.eval()
    reference = model_outputs(models.pipeline, inputs)
    network.restore()
    assert all(relative(b, r) > 1e-2 for b, r in zip(base_outputs, reference))  # the adapter changes every output
    exported = folder / "exported.safetensors"
    report = export_lora(folder / "native.safetensors", models, exported, dtype=torch.float32)
    return {"kind": kind, "models": models, "native": folder / "native.safetensors", "inputs": inputs,
            "reference": reference, "conv3x3": {m.lora_name for m in network.adapter_modules if m.rank == 2},
            "exported": exported, "report": report}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """kind -> the adapter of make_adapter, built on first use."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = make_adapter(kind, tmp_path_factory.mktemp(kind))
        return cache[kind]

    return get


# --------------------------------------------------------------------------------------------------
# The exported LoRA/LoCon is PaRa


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_loads_the_export_as_the_para_model(kind, adapters):
    adapter = adapters(kind)
    out, report = adapter["exported"], adapter["report"]
    fresh = tiny_models.build_tiny_pipeline(adapter["kind"], seed=0)
    fresh.load_lora_weights(str(out))  # diffusers' own kohya converter and peft layers
    for got, want in zip(model_outputs(fresh, adapter["inputs"]), adapter["reference"]):
        assert relative(got, want) <= 1e-4
    assert report["kind"] == "LoCon" and report["conv3x3_modules"] == len(adapter["conv3x3"]) > 0
    assert report["base_check"] == "match" and report["max_relative_error"] < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_a1111_formula_gives_the_para_delta_of_every_module(kind, adapters):
    adapter = adapters(kind)
    out = adapter["exported"]
    tensors, _ = read(out)
    native, _ = read(adapter["native"])
    models = adapter["models"]
    layers = {t.lora_name: t.layer for t in named_layers(models.text_encoder_for_network, models.unet)}
    modules = {key.split(".")[0] for key in native}
    assert set(tensors) == {f"{m}.{part}" for m in modules for part in ("lora_up.weight", "lora_down.weight", "alpha")}
    multiplier = 0.7
    for module in modules:
        weight, q = layers[module].weight, native[f"{module}.para_q"]
        up, down, alpha = (tensors[f"{module}.{p}"] for p in ("lora_up.weight", "lora_down.weight", "alpha"))
        # A1111's network_lora: scale = alpha / dim with dim = down.shape[0]; conv: up (out, r) @ down (r, in*k*k)
        dim = down.shape[0]
        if weight.dim() == 4:
            assert up.shape == (weight.shape[0], dim, 1, 1) and down.shape == (dim, *weight.shape[1:])
        else:
            assert up.shape == (weight.shape[0], dim) and down.shape == (dim, weight.shape[1])
        delta = (up.reshape(up.shape[0], dim) @ down.reshape(dim, -1)).reshape(weight.shape)
        delta = delta * (alpha.item() / dim) * multiplier
        assert alpha.dim() == 0 and alpha.item() == q.shape[1] == dim
        assert (module in adapter["conv3x3"]) == (weight.dim() == 4 and weight.shape[-1] == 3)
        assert relative(delta, para.para_delta_weight(weight, q, multiplier)) <= 1e-5, module


@pytest.mark.parametrize("kind", KINDS)
def test_metadata_of_the_export(kind, adapters):
    adapter = adapters(kind)
    out = adapter["exported"]
    _, metadata = read(out)
    native_bytes = adapter["native"].read_bytes()
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "4"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2"}
    assert metadata["ss_base_model_version"] == VERSIONS[adapter["kind"]]
    assert metadata["modelspec.architecture"].endswith("/lora")
    assert ("xl" in metadata["modelspec.architecture"]) == (adapter["kind"] == "sdxl")
    assert metadata["ss_output_name"] == "exported"
    assert metadata["ss_seed"] == "42"  # training metadata carried over
    assert metadata[FINGERPRINT_KEY]  # tells which base the export is exact for
    assert "para.format_version" not in metadata
    assert metadata["para.exported_from"] == hashlib.sha256(native_bytes).hexdigest()
    data = out.read_bytes()
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_precision_errors(adapters, tmp_path):
    adapter = adapters("sd1")
    reports = {}
    for precision in ("fp16", "bf16"):
        reports[precision] = export_lora(adapter["native"], adapter["models"], tmp_path / f"{precision}.safetensors",
                                         dtype=precision, metadata_overrides={"ss_output_name": "mine"})
    # the reported error is the one a loader gets from the file (recomputed here from the stored factors)
    tensors, metadata = read(tmp_path / "fp16.safetensors")
    native, _ = read(adapter["native"])
    layers = {t.lora_name: t.layer for t in named_layers(adapter["models"].text_encoder_for_network,
                                                         adapter["models"].unet)}
    worst = 0.0
    for key, q in native.items():
        module = key.split(".")[0]
        up, down = tensors[f"{module}.lora_up.weight"], tensors[f"{module}.lora_down.weight"]
        assert up.dtype == down.dtype == torch.float16
        product = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
        weight = layers[module].weight.double()
        worst = max(worst, relative(product, -q.double() @ (q.double().t() @ weight.reshape(weight.shape[0], -1))))
    assert reports["fp16"]["max_relative_error"] == pytest.approx(worst, rel=1e-6)
    assert 1e-5 < reports["fp16"]["max_relative_error"] <= 1e-3
    assert 2 * reports["fp16"]["max_relative_error"] < reports["bf16"]["max_relative_error"] <= 1e-2
    assert reports["bf16"]["warnings"] and not reports["fp16"]["warnings"]
    assert metadata["ss_output_name"] == "mine" and metadata["para.export_precision"] == "fp16"


# --------------------------------------------------------------------------------------------------
# Merged models


@pytest.mark.parametrize("kind", KINDS)
def test_merged_model_equals_the_para_model(kind, adapters, tmp_path):
    adapter = adapters(kind)
    # SD1 as an A1111 single file, SDXL as a diffusers folder; both loaded back as the trainer loads models
    out = tmp_path / ("merged.safetensors" if adapter["kind"] == "sd1" else "merged")
    models = load_base_model(f"builtin:tiny-{adapter['kind']}")
    report = export_merged([(adapter["native"], 1.0)], models, out)
    assert report["format"] == ("single file" if adapter["kind"] == "sd1" else "diffusers")
    loaded = load_base_model(str(out))
    for got, want in zip(model_outputs(loaded.pipeline, adapter["inputs"]), adapter["reference"]):
        assert relative(got, want) <= 1e-5


def test_merging_two_adapters_is_sequential(adapters, tmp_path):
    adapter = adapters("sd1")
    models = load_base_model("builtin:tiny-sd1")
    network = para.create_network(1.0, 3, 1, None, models.text_encoder_for_network, models.unet,
                                  include="attn1_to_q$")
    save_native(network, models, tmp_path / "second.safetensors", seed=2)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = {m.lora_name: m.layer for m in network.adapter_modules}[name]
    w0 = layer.weight.detach().double().clone()
    q1 = read(adapter["native"])[0][f"{name}.para_q"].double()
    q2 = read(tmp_path / "second.safetensors")[0][f"{name}.para_q"].double()

    report = export_merged([(adapter["native"], 0.5), (tmp_path / "second.safetensors", 1.0)], models,
                           tmp_path / "merged.ckpt")
    w1 = w0 - 0.5 * q1 @ (q1.t() @ w0)
    expected = w1 - q2 @ (q2.t() @ w1)
    other_order = (w0 - q2 @ (q2.t() @ w0)) - 0.5 * q1 @ (q1.t() @ (w0 - q2 @ (q2.t() @ w0)))
    assert relative(expected, other_order) > 1e-3  # the order matters, so the check below sees it
    assert relative(layer.weight, expected) <= 1e-6
    assert [a["base_check"] for a in report["adapters"]] == ["match", "match"]
    loaded = load_single_file(tmp_path / "merged.ckpt")
    assert torch.equal(loaded.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
                       layer.weight)


# --------------------------------------------------------------------------------------------------
# The base model check and bad input: one clear error, no output file


@pytest.mark.parametrize("kind", KINDS)
def test_export_needs_a_base(kind, adapters, tmp_path):
    adapter = adapters(kind)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ExportError, match="needs the base model it was trained on"):
        export_lora(adapter["native"], None, out)
    assert not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_another_base_is_refused_unless_forced(kind, adapters, tmp_path):
    adapter = adapters(kind)
    kind = adapter["kind"]
    other = StableDiffusionModels(tiny_models.build_tiny_pipeline(kind, seed=1), kind, False, "seed 1")
    out = tmp_path / "out.safetensors"
    with pytest.raises(ExportError, match="trained on another base model .*use --force"):
        export_lora(adapter["native"], other, out)
    with pytest.raises(ExportError, match="trained on another base model"):
        export_merged([(adapter["native"], 1.0)], other, tmp_path / "merged.safetensors")
    assert list(tmp_path.iterdir()) == []
    report = export_lora(adapter["native"], other, out, force=True)
    assert report["base_check"] == "mismatch (forced)" and report["warnings"] and out.exists()
    _, native_metadata = read(adapter["native"])
    tensors, metadata = read(out)  # the export is PaRa of the base it was computed from, and says which one
    assert metadata["para.trained_base_fingerprint"] == native_metadata[FINGERPRINT_KEY]
    other_layers = [t for t in named_layers(other.text_encoder_for_network, other.unet)
                    if t.lora_name + ".lora_up.weight" in tensors]
    assert metadata[FINGERPRINT_KEY] == base_fingerprint(other_layers) != native_metadata[FINGERPRINT_KEY]


def test_adapter_of_another_architecture_is_refused(adapters, tmp_path):
    adapter = adapters("sdxl")  # against the SD1 base
    sd1 = load_base_model("builtin:tiny-sd1")
    with pytest.raises(ExportError, match=r"does not fit this model: its module lora_\w+ has no layer.*sdxl_base"):
        export_lora(adapter["native"], sd1, tmp_path / "out.safetensors")
    with pytest.raises(ExportError, match="does not fit this model"):
        export_merged([(adapter["native"], 1.0)], sd1, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_missing_or_taken_in_fp16(adapters, tmp_path, caplog):
    adapter = adapters("sd1")
    tensors, metadata = read(adapter["native"])
    models = adapter["models"]
    from networks.adapter_base import write_adapter_file

    del metadata[FINGERPRINT_KEY]
    write_adapter_file(str(tmp_path / "nofp.safetensors"), tensors, metadata)
    with caplog.at_level(logging.WARNING):
        report = export_lora(tmp_path / "nofp.safetensors", models, tmp_path / "a.safetensors")
    assert report["base_check"] == "missing" and "does not record which base model" in caplog.text
    # a trainer that cast the base to fp16 fingerprints the rounded weights: still this base
    layers = [t for t in named_layers(models.text_encoder_for_network, models.unet)
              if f"{t.lora_name}.para_q" in tensors]
    metadata[FINGERPRINT_KEY] = base_fingerprint(layers, torch.float16)
    assert metadata[FINGERPRINT_KEY] != base_fingerprint(layers)
    write_adapter_file(str(tmp_path / "fp16.safetensors"), tensors, metadata)
    assert export_lora(tmp_path / "fp16.safetensors", models, tmp_path / "b.safetensors")["base_check"] == "match"


def test_bad_files_and_paths(adapters, tmp_path):
    adapter = adapters("sd1")
    models = adapter["models"]
    with pytest.raises(ExportError, match="not a native PaRa file .*LoRA module"):
        export_lora(adapter["exported"], models, tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match="adapter file not found"):
        export_lora(tmp_path / "missing.safetensors", models, tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match="as .safetensors"):
        export_lora(adapter["native"], models, tmp_path / "x.ckpt")
    with pytest.raises(ExportError, match="is the adapter file itself"):
        export_lora(adapter["native"], models, adapter["native"])
    with pytest.raises(ExportError, match="single-file checkpoint .* or as a diffusers folder"):
        export_merged([(adapter["native"], 1.0)], models, tmp_path / "x.pt")
    with pytest.raises(ExportError, match="unknown export precision"):
        export_lora(adapter["native"], models, tmp_path / "x.safetensors", dtype="fp8")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# `para-trainer export` (run_export, given the options cli.py parses)


def export_options(adapters, out, **overrides):
    options = {"adapters": [str(a) for a in adapters], "model": "builtin:tiny-sd1", "out": str(out), "to": "lora",
               "precision": None, "multiplier": None, "force": False, "v2": False, "v_parameterization": False,
               "rank": None}
    return argparse.Namespace(**{**options, **overrides})


def test_export_command(adapters, tmp_path, capsys):
    native = adapters("sd1")["native"]
    assert run_export(export_options([native], tmp_path / "a.safetensors")) == 0
    printed = capsys.readouterr().out
    assert "wrote LoCon" in printed and "(fp16, sd_v1)" in printed and "base model check: match" in printed
    assert run_export(export_options([native, native], tmp_path / "m.safetensors", to="merged",
                                     multiplier=[1.0, 0.5], precision="fp16")) == 0
    assert "x0.5" in capsys.readouterr().out and (tmp_path / "m.safetensors").exists()
    for options, message in [
        (export_options([native], tmp_path / "b.safetensors", model=None), "needs the base model"),
        (export_options([native, native], tmp_path / "b.safetensors"), "--to lora exports one native file"),
        (export_options([native], tmp_path / "b", to="merged", multiplier=[1, 2]), "2 --multiplier values for 1"),
        (export_options([native], tmp_path / "b.safetensors", model=str(tmp_path / "nothing")), "model not found"),
    ]:
        assert run_export(options) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "m.safetensors"]
