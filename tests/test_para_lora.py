"""PaRa + LoRA trained together (network_args lora_dim, para_strength α1, lora_strength α2):
ΔW = (-α1 Q | α2 B)(α1 QᵀW0 ; α2 A) = -α1² Q QᵀW0 + α2²·(lora_alpha/lora_dim)·B A."""

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from networks import para
from para_trainer.files.export import export_lora, load_base_model

STRENGTHS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def models64():
    models = load_base_model("builtin:tiny-sd1")
    models.unet.double()
    models.text_encoders[0].double()
    return models


def joint_network(models, a1, a2, seed=0, lora_alpha=None, lora_dim=3):
    kwargs = {"conv_dim": "2", "para_strength": str(a1)}
    if lora_dim:
        kwargs.update(lora_dim=str(lora_dim), lora_strength=str(a2))
    if lora_alpha is not None:
        kwargs["lora_alpha"] = str(lora_alpha)
    network = para.create_network(1.0, 2, 1, None, models.text_encoder_for_network, models.unet, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.adapter_modules:
            module.para_b.copy_(torch.randn(module.para_b.shape, generator=generator))
            if module.lora_rank:  # a trained LoRA part (it starts at 0)
                module.lora_up.copy_(torch.randn(module.lora_up.shape, generator=generator))
    network.double()
    return network


def layer_input(layer, generator):
    if layer.weight.dim() == 4:
        return torch.randn(2, layer.weight.shape[1], 8, 8, generator=generator, dtype=torch.float64)
    return torch.randn(2, 5, layer.weight.shape[1], generator=generator, dtype=torch.float64)


def with_weight(layer, x, weight):
    if weight.dim() == 4:
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight, layer.bias)


def paper_weight(module, a1, a2, scale=1.0):
    """W0 + (-α1 Q | α2 B)(α1 QᵀW0 ; α2 A), the paper's joint form, in float64."""
    w0 = module.layer.weight.double()
    w = w0.reshape(w0.shape[0], -1)
    q, _ = torch.linalg.qr(module.para_b.detach().double())
    up = torch.cat([-a1 * q, a2 * module.lora_up.detach().double() * scale ** 0.5], 1)
    down = torch.cat([a1 * q.t() @ w, a2 * module.lora_down.detach().double() * scale ** 0.5], 0)
    return (w + up @ down).reshape(w0.shape)


@pytest.mark.parametrize("a1", STRENGTHS)
@pytest.mark.parametrize("a2", STRENGTHS)
def test_joint_forward_is_the_papers_formula(models64, a1, a2):
    network = joint_network(models64, a1, a2)
    network.apply_to(models64.text_encoder_for_network, models64.unet)
    try:
        generator = torch.Generator().manual_seed(1)
        kinds = set()
        for module in network.adapter_modules[::7]:
            x = layer_input(module.layer, generator)
            with torch.no_grad():
                got = module.layer(x)
                want = with_weight(module.layer, x, paper_weight(module, a1, a2))
            assert ((got - want).norm() / want.norm()).item() <= 1e-10, module.lora_name
            kinds.add(module.layer.weight.dim())
        assert kinds == {2, 4}  # linear and 3x3 conv layers both checked
    finally:
        network.restore()


def test_lora_alpha_scales_the_lora_part(models64):
    network = joint_network(models64, 1.0, 0.5, lora_alpha=6, lora_dim=3)  # scale α2²·alpha/dim = 0.25·2
    module = network.adapter_modules[3]
    assert module.lora_scale == pytest.approx(0.5)
    want = paper_weight(module, 1.0, 0.5, scale=2.0) - module.layer.weight.double()
    assert torch.allclose(module.delta_weight(), want, atol=1e-12)


def test_strength_zero_lora_is_plain_para_bit_for_bit(models64):
    joint = joint_network(models64, 1.0, 0.0, seed=3)
    plain = joint_network(models64, 1.0, 1.0, seed=3, lora_dim=None)
    generator = torch.Generator().manual_seed(2)
    for module_joint, module_plain in list(zip(joint.adapter_modules, plain.adapter_modules))[::9]:
        with torch.no_grad():
            module_plain.para_b.copy_(module_joint.para_b)
        x = layer_input(module_joint.layer, generator)
        module_joint.apply_to()
        with torch.no_grad():
            got = module_joint.layer(x)
        module_joint.remove()
        module_plain.apply_to()
        with torch.no_grad():
            want = module_plain.layer(x)
        module_plain.remove()
        assert torch.equal(got, want)


def test_para_strength_zero_is_plain_lora(models64):
    network = joint_network(models64, 0.0, 1.0, seed=4)
    generator = torch.Generator().manual_seed(5)
    for module in network.adapter_modules[::9]:
        x = layer_input(module.layer, generator)
        w0 = module.layer.weight.double()
        lora = (module.lora_up.detach() @ module.lora_down.detach()).reshape(w0.shape)
        module.apply_to()
        with torch.no_grad():
            got = module.layer(x)
        module.remove()
        want = with_weight(module.layer, x, w0 + lora)
        assert ((got - want).norm() / want.norm()).item() <= 1e-10


def test_joint_file_round_trip_and_exact_lora_export(tmp_path):
    models = load_base_model("builtin:tiny-sd1")
    network = joint_network(models, 1.0, 0.5)
    network.float()
    path = tmp_path / "joint.safetensors"
    network.save_weights(str(path), None, {})
    with safe_open(str(path), framework="pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert metadata["para.format_version"] == "2"
    name = network.adapter_modules[0].lora_name
    assert {k for k in keys if k.startswith(name + ".")} == {
        f"{name}.stage0.para_q", f"{name}.stage0.strength", f"{name}.stage1.lora_up", f"{name}.stage1.lora_down",
        f"{name}.stage1.strength"}
    loaded, _ = para.create_network_from_weights(1.0, str(path), None, models.text_encoder_for_network, models.unet)
    loaded.load_weights(str(path))
    for original, again in zip(network.adapter_modules, loaded.adapter_modules):
        assert again.lora_rank == 3 and again.lora_scale == pytest.approx(0.25)
        assert torch.equal(original.delta_weight(), again.delta_weight())
    report = export_lora(path, models, tmp_path / "joint_lora.safetensors", dtype="fp32")
    assert report["max_relative_error"] < 1e-6
    assert report["ranks"] == {2 + 3: len(network.adapter_modules)}


def test_lora_strength_without_lora_dim_is_refused(models64):
    with pytest.raises(para.NetworkArgsError, match="give lora_dim"):
        para.create_network(1.0, 2, 1, None, models64.text_encoder_for_network, models64.unet, lora_strength="0.5")


def test_trainer_trains_both_parts_and_resumes_from_the_file(tmp_path):
    from para_trainer.training.train import main as train_main

    common = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir",
              "para_trainer/example_data/train", "--caption_extension", ".txt", "--resolution", "64",
              "--network_dim", "2", "--max_train_steps", "3", "--learning_rate", "1e-2",
              "--network_args", "lora_dim=2", "lora_strength=0.5", "--seed", "1"]
    assert train_main(common + ["--output_dir", str(tmp_path / "a")]) == 0
    out = tmp_path / "a" / "last.safetensors"
    with safe_open(str(out), framework="pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("stage1.lora_up")]
        assert float(f.get_tensor(next(k for k in f.keys() if k.endswith("stage1.strength")))) == pytest.approx(0.25)
    assert ups and all(up.abs().max() > 0 for up in ups)  # the LoRA part trained (it starts at 0)
    assert (tmp_path / "a" / "last_lora.safetensors").exists()
    assert train_main(common + ["--output_dir", str(tmp_path / "b"), "--network_weights", str(out)]) == 0
