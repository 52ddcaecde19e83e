"""para_trainer.files.inspect on files made by this project and by others (peft/diffusers, LyCORIS, checkpoints)."""

import argparse
import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from networks import para
from para_trainer.files.export import export_lora, load_base_model
from para_trainer.files.inspect import InspectError, format_report, inspect, run_inspect
from para_trainer.models import tiny as tiny_models
from para_trainer.models.checkpoint import save_single_file


def conv3x3_layers(unet):
    """The 3x3 convolutions of the UNet's resnets and samplers: the layers conv_dim adapts with LoCon."""
    return [layer for block in unet.modules() if type(block).__name__ in ("ResnetBlock2D", "Downsample2D", "Upsample2D")
            for layer in block.modules() if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (3, 3)]


@pytest.fixture(scope="module")
def sd1():
    return load_base_model("builtin:tiny-sd1")


@pytest.fixture(scope="module")
def files(sd1, tmp_path_factory):
    """A native PaRa file with 3x3 convs (rank 4, conv rank 2) and its LoCon export; and its counts."""
    folder = tmp_path_factory.mktemp("inspect")
    network = para.create_network(1.0, 4, 1, None, sd1.text_encoder_for_network, sd1.unet, conv_dim="2")
    network.save_weights(str(folder / "native.safetensors"), None,
                         {"ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps({"img": {"cat": 3}})})
    export_lora(folder / "native.safetensors", sd1, folder / "lora.safetensors")
    counts = {"modules": len(network.adapter_modules), "text_encoder": len(network.text_encoder_modules),
              "conv3x3": len(conv3x3_layers(sd1.unet))}
    return folder, counts


def test_native_para(files):
    folder, counts = files
    report = inspect(folder / "native.safetensors")
    assert counts["conv3x3"] == 50 and counts["text_encoder"] == 12  # tiny SD1: 22 resnets, 3 + 3 samplers
    assert report["kind"] == "native PaRa"
    assert report["modules"] == counts["modules"]
    assert report["text_encoder_modules"] == counts["text_encoder"]
    # PaRa's Q has no kernel: the 3x3 convs are found by their layer names (conv1/conv2/conv, not conv_shortcut)
    assert report["conv_modules"] == counts["conv3x3"]
    other = counts["modules"] - counts["conv3x3"]
    assert report["ranks"] == {"histogram": {2: counts["conv3x3"], 4: other}, "min": 2, "max": 4}
    assert (report["base_model_version"], report["base_model_source"]) == ("sd_v1", "metadata ss_base_model_version")
    assert report["metadata"]["ss_tag_frequency"] == {"img": {"cat": 3}}  # JSON values parsed
    assert report["dtypes"] == {"float32": report["modules"]}
    hashes = report["hashes"]
    assert hashes["sshs_model_hash_matches"] is True and hashes["sshs_legacy_hash_matches"] is True
    assert hashes["sha256"] == hashlib.sha256((folder / "native.safetensors").read_bytes()).hexdigest()
    text = format_report(report)
    assert "kind: native PaRa" in text and f"ranks: 2 ({counts['conv3x3']}), 4 ({other}); min 2, max 4" in text


def test_exported_locon(files):
    folder, counts = files
    report = inspect(folder / "lora.safetensors")
    native = inspect(folder / "native.safetensors", hashes=False)
    assert report["kind"] == "LoCon"
    assert report["modules"] == native["modules"] and report["ranks"] == native["ranks"]
    assert report["conv_modules"] == counts["conv3x3"]  # from the 3x3 kernels of lora_down
    assert report["alphas"] == {2.0: counts["conv3x3"], 4.0: counts["modules"] - counts["conv3x3"]}
    assert report["dtypes"] == {"float16": 2 * report["modules"], "float32": report["modules"]}
    assert report["hashes"]["sshs_model_hash_matches"] is True
    assert any("exported from a native PaRa file" in note for note in report["notes"])


def test_lora_without_conv_and_a_wrong_hash(files, tmp_path):
    folder, _ = files
    with safe_open(str(folder / "lora.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.split(".")[0].endswith(("conv1", "conv2", "conv"))}
    metadata["sshs_model_hash"] = "0" * 64
    save_file(tensors, str(tmp_path / "lora.safetensors"), metadata)
    report = inspect(tmp_path / "lora.safetensors")
    assert report["kind"] == "LoRA" and report["conv_modules"] == 0
    assert report["hashes"]["sshs_model_hash_matches"] is False
    assert any("does not match" in note for note in report["notes"])


def test_peft_lora_saved_by_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = tiny_models.build_tiny_pipeline("sd1").unet
    unet.add_adapter(LoraConfig(r=3, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    report = inspect(tmp_path / "pytorch_lora_weights.safetensors")
    attention_layers = 16 * 2 * 4  # attn1 and attn2 of each transformer block: q, k, v, out
    assert report["kind"] == "diffusers/peft LoRA"
    assert report["modules"] == report["unet_modules"] == attention_layers + 22
    assert report["conv_modules"] == 22  # resnet conv1, from lora_A's 3x3 kernel
    assert report["ranks"] == {"histogram": {3: attention_layers + 22}, "min": 3, "max": 3}
    assert report["base_model_version"] == "sd_v1/sd_v2"  # the key names do not tell SD1 from SD2
    assert report["hashes"]["sshs_model_hash"] is None


def test_lokr_written_by_lycoris(tmp_path):
    from lycoris import kohya

    pipe = tiny_models.build_tiny_pipeline("sd1")
    network = kohya.create_network(1.0, 2, 2, pipe.vae, pipe.text_encoder, pipe.unet, algo="lokr", factor="4",
                                   preset="attn-only")
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    network.save_weights(str(tmp_path / "lokr.safetensors"), torch.float32, {"ss_network_module": "lycoris.kohya"})
    report = inspect(tmp_path / "lokr.safetensors")
    with safe_open(str(tmp_path / "lokr.safetensors"), framework="pt") as f:
        w2_b = [f.get_slice(k).get_shape() for k in f.keys() if k.endswith(".lokr_w2_b")]
    assert report["kind"] == "LoKr"
    # LyCORIS's attn-only preset finds the tiny text encoder's 2 layers x 4 attention projections here
    assert report["modules"] == report["text_encoder_modules"] == len(w2_b) == 8
    assert report["ranks"]["min"] == report["ranks"]["max"] == 2 == w2_b[0][0]
    assert report["base_model_version"] == "sd_v1/sd_v2"
    assert report["hashes"]["sshs_model_hash_scheme"].startswith("LyCORIS")


def test_checkpoints_are_not_adapters(sd1, tmp_path):
    save_single_file(tiny_models.build_tiny_pipeline("sdxl"), tmp_path / "xl.safetensors")
    report = inspect(tmp_path / "xl.safetensors")
    assert report["kind"] == "checkpoint" and report["modules"] == 0
    assert (report["base_model_version"], report["base_model_source"]) == (
        "sdxl_base_v1-0", "metadata modelspec.architecture")
    assert "addnet_legacy_hash" not in report["hashes"]  # no tensors loaded for a model
    save_single_file(sd1.pipeline, tmp_path / "sd1.ckpt")  # no metadata: the version comes from the keys
    report = inspect(tmp_path / "sd1.ckpt")
    assert report["kind"] == "checkpoint" and report["file_format"].startswith("torch")
    assert (report["base_model_version"], report["base_model_source"]) == ("sd_v1", "guessed from key names")
    assert "addnet_hash" not in report["hashes"] and len(report["hashes"]["sha256"]) == 64


def test_sdxl_version_guessed_from_key_names(tmp_path):
    pipe = tiny_models.build_tiny_pipeline("sdxl")
    network = para.create_network(1.0, 2, 1, None, [pipe.text_encoder, pipe.text_encoder_2], pipe.unet,
                                  preset="attn-only")
    network.save_weights(str(tmp_path / "xl.safetensors"))
    report = inspect(tmp_path / "xl.safetensors", hashes=False)
    assert report["kind"] == "native PaRa" and report["modules"] == len(network.adapter_modules)
    assert (report["base_model_version"], report["base_model_source"]) == (
        "sdxl_base_v1-0", "guessed from key names")
    assert "hashes" not in report


def test_unreadable_and_unknown_files(tmp_path):
    with pytest.raises(InspectError, match="file not found"):
        inspect(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InspectError, match="not a readable .safetensors file"):
        inspect(tmp_path / "junk.safetensors")
    save_file({"something.else": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    report = inspect(tmp_path / "other.safetensors")
    assert report["kind"] == "unknown" and report["notes"]


def test_inspect_command(files, capsys):
    folder, counts = files
    path = str(folder / "lora.safetensors")
    assert run_inspect(argparse.Namespace(file=path, json=True, no_hash=False)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "LoCon" and report["modules"] == counts["modules"]
    assert report["ranks"]["histogram"] == {"2": counts["conv3x3"], "4": counts["modules"] - counts["conv3x3"]}
    assert report["hashes"]["sshs_model_hash_matches"] is True
    assert run_inspect(argparse.Namespace(file=path, json=False, no_hash=True)) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"file: {path}") and "kind: LoCon" in text and "hashes:" not in text
    assert run_inspect(argparse.Namespace(file=path + ".missing", json=False, no_hash=False)) == 2
    assert capsys.readouterr().err.startswith("error: file not found")
