"""KronA files in the tools: export (exact and truncated LoRA, checked through diffusers' loader), PaRa after
KronA in merge, sample and inspect."""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from networks import krona, para
from networks.adapter_base import named_layers
from para_trainer import cli
from para_trainer.files.export import load_base_model
from para_trainer.files.inspect import inspect
from para_trainer.files.merge import merge
from para_trainer.files.metadata import FINGERPRINT_KEY, base_fingerprint
from para_trainer.models import tiny as tiny_models


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def run(args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    return exit_info.value.code


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained-looking KronA file (a1 = a2 = 4, with 3x3 convs) and a PaRa file, on the tiny SD1 model."""
    folder = tmp_path_factory.mktemp("krona")
    models = load_base_model("builtin:tiny-sd1")
    network = krona.create_network(1.0, None, None, None, models.text_encoder_for_network, models.unet,
                                   preset="full", conv_dim="1", a1="4", a2="4")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.adapter_modules:
            for p in (module.lokr_w1, module.lokr_w2):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    network.save_weights(str(folder / "krona.safetensors"), None, {"ss_base_model_version": "sd_v1"})
    deltas = {m.lora_name: m.delta_weight().double() for m in network.adapter_modules}
    pnet = para.create_network(1.0, 2, 1, None, models.text_encoder_for_network, models.unet)
    with torch.no_grad():
        for module in pnet.adapter_modules:
            module.para_b.copy_(torch.randn(module.para_b.shape, generator=generator))
    pnet.save_weights(str(folder / "para.safetensors"), None, {FINGERPRINT_KEY: base_fingerprint(pnet.adapter_modules)})
    return {"folder": folder, "models": models, "deltas": deltas}


def unet_output(pipe):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return pipe.unet(latents, 10, context).sample


def test_exact_lora_export_loads_in_diffusers_as_the_krona_model(files, tmp_path, capsys):
    out = tmp_path / "krona_lora.safetensors"
    assert run(["export", str(files["folder"] / "krona.safetensors"), "--model", "builtin:tiny-sd1", "-o", str(out),
                "--precision", "fp32"]) == 0
    assert "base model check: not needed" in capsys.readouterr().out
    tensors, metadata = read(out)
    assert metadata["ss_network_module"] == "networks.lora"
    for name, delta in files["deltas"].items():
        up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
        scale = float(tensors[f"{name}.alpha"]) / down.shape[0]  # the kohya loaders' alpha / rank
        product = scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        assert ((product - delta.reshape(delta.shape[0], -1)).norm() / delta.norm()).item() < 1e-5
    reference = tiny_models.build_tiny_pipeline("sd1", seed=0)
    network, _ = krona.create_network_from_weights(1.0, str(files["folder"] / "krona.safetensors"), None,
                                                   reference.text_encoder, reference.unet)
    network.apply_to(reference.text_encoder, reference.unet)
    network.load_weights(str(files["folder"] / "krona.safetensors"))
    want = unet_output(reference)
    fresh = tiny_models.build_tiny_pipeline("sd1", seed=0)
    fresh.load_lora_weights(str(out))  # diffusers' own kohya converter
    got = unet_output(fresh)
    assert ((got - want).norm() / (want - unet_output(tiny_models.build_tiny_pipeline("sd1", seed=0))).norm()) < 1e-3


def test_truncated_export_prints_the_measured_error(files, tmp_path, capsys):
    out = tmp_path / "krona_r2.safetensors"
    assert run(["export", str(files["folder"] / "krona.safetensors"), "--model", "builtin:tiny-sd1", "-o", str(out),
                "--precision", "fp32", "--rank", "2"]) == 0
    printed = capsys.readouterr().out
    tensors, _ = read(out)
    worst = 0.0
    for name, delta in files["deltas"].items():
        up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
        assert up.shape[1] == 2
        product = up.reshape(up.shape[0], -1) @ down.reshape(2, -1)
        worst = max(worst, ((product - delta.reshape(delta.shape[0], -1)).norm() / delta.norm()).item())
    assert 0.05 < worst < 1
    assert f"truncated to rank 2: largest relative error of a module's ΔW {worst:.2e}" in printed


def test_rank_is_refused_for_para(files, tmp_path, capsys):
    assert run(["export", str(files["folder"] / "para.safetensors"), "--model", "builtin:tiny-sd1",
                "-o", str(tmp_path / "x.safetensors"), "--rank", "2"]) == 2
    assert "--rank truncates the LoRA export of a KronA/LoKr file" in capsys.readouterr().err


def test_para_after_krona_is_one_exact_lora(files, tmp_path):
    models = files["models"]
    out, lora = tmp_path / "m.safetensors", tmp_path / "m_lora.safetensors"
    with pytest.raises(Exception, match="needs the base model"):
        merge([(str(files["folder"] / "krona.safetensors"), 1.0), (str(files["folder"] / "para.safetensors"), 1.0)],
              out)
    report = merge([(str(files["folder"] / "krona.safetensors"), 1.0), (str(files["folder"] / "para.safetensors"), 1.0)],
                   out, models, lora_out=str(lora), lora_dtype="fp32")
    assert [i["kind"] for i in report["inputs"]] == ["LoKr", "PaRa"]
    tensors, _ = read(lora)
    paras, _ = read(files["folder"] / "para.safetensors")
    layers = {t.lora_name: t.layer.weight for t in named_layers(models.text_encoder_for_network, models.unet)}
    checked = 0
    for name, delta in files["deltas"].items():
        if f"{name}.para_q" not in paras:
            continue
        w0 = layers[name].detach().double().reshape(delta.shape[0], -1)
        q = paras[f"{name}.para_q"].double()
        w = w0 + delta.reshape(delta.shape[0], -1)
        want = w - q @ (q.t() @ w) - w0  # (I - QQᵀ)(W0 + kron(A, B))
        up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
        scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
        got = scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        assert ((got - want).norm() / want.norm()).item() < 1e-5
        checked += 1
    assert checked > 10


def test_sample_and_inspect_take_krona_files(files, tmp_path, capsys):
    out = tmp_path / "s"
    assert run(["sample", "--model", "builtin:tiny-sd1", "--network", str(files["folder"] / "krona.safetensors"),
                "--compare", "--strengths", "0", "1", "--prompt", "a toy", "--steps", "2", "--out", str(out)]) == 0

    def pixels(name):
        from PIL import Image
        return np.asarray(Image.open(out / name)).astype(int)

    assert np.array_equal(pixels("00_00_seed0.png"), pixels("01_00_seed0.png"))
    assert not np.array_equal(pixels("00_00_seed0.png"), pixels("02_00_seed0.png"))
    report = inspect(str(files["folder"] / "krona.safetensors"))
    assert report["kind"] == "LoKr"
