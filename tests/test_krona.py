"""networks.krona (DiffuseKronA as LoKr): the math, files the WebUIs and real LyCORIS read, the trainer, bad input."""

import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from networks import adapter_base, krona
from para_trainer.models import tiny as tiny_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "para_trainer", "example_data")
ATTENTION = re.compile(r"_attn[12]_to_(q|k|v|out_0)$")


@pytest.fixture
def unet():
    """The tiny SD1 UNet (widths 32/64/128, cross-attention 32), fresh for each test: networks hook its layers."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel.from_config(tiny_models.read_tiny_config("sd1", "unet")).eval()


def randomize(network, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.adapter_modules:
            for p in (module.lokr_w1, module.lokr_w2):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def read_file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def layer_weights(unet):
    return {adapter_base.lora_name("lora_unet", name): module.weight
            for name, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}


def webui_lokr_delta(parts, weight_shape):
    """ΔW as AUTOMATIC1111 and ComfyUI rebuild a LoKr module with full factors (frontend-formats §1.4, §2.2, §3.3):
    kron(w1, w2) (w1 unsqueezed to 4-D for a 4-D w2), reshaped to the weight; the scale is alpha/dim only when
    lokr_w1_b/lokr_w2_b give a dim, so with two full factors it is 1 whatever alpha says."""
    w1, w2 = parts["lokr_w1"].double(), parts["lokr_w2"].double()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(weight_shape)


def unet_inputs():
    generator = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 5, 32, generator=generator))


# ---------------------------------------------------------------------------------------------------
# The math


def test_factor_pair_uses_the_nearest_divisor():
    assert krona.factor_pair(320, 64) == 64
    assert krona.factor_pair(32, 64) == 32  # a request above the dimension: the dimension itself
    assert krona.factor_pair(320, 48) == 40  # divisors 32 and 40: 40 is nearer
    assert krona.factor_pair(100, 15) == 10  # 10 and 20 are equally near: the smaller one
    assert krona.factor_pair(7, 3) == 1


@pytest.mark.parametrize("layer, a1, a2", [
    (nn.Linear(20, 12), 3, 4),  # A first
    (nn.Linear(20, 12), 6, 2),  # B first
    (nn.Conv2d(20, 12, 3, stride=2, padding=1), 3, 4),  # A mixes the channel groups first
    (nn.Conv2d(768, 320, 3, padding=1), 64, 8),  # B convolves each group first
    (nn.Conv2d(20, 12, 1), 4, 5),
])
def test_forward_and_merge_equal_the_layer_with_w0_plus_kron(layer, a1, a2):
    layer = layer.double()
    module = krona.KronaModule("lora_unet_x", layer, a1, a2).double()
    randomize(krona.KronaNetwork([module]))
    module.multiplier = 0.7
    a, b = module.lokr_w1.detach(), module.lokr_w2.detach()
    b1, b2 = b.shape[:2]
    delta = torch.kron(a[:, :, None, None] if b.dim() == 4 else a, b) * 0.7
    o, i = 5, 11  # the Kronecker index rule, element by element
    torch.testing.assert_close(delta[o, i], 0.7 * a[o // b1, i // b2] * b[o % b1, i % b2], rtol=1e-15, atol=0)

    w0 = layer.weight.detach().clone()
    if isinstance(layer, nn.Linear):
        x = torch.randn(2, 7, 20, dtype=torch.float64)
        expected = F.linear(x, w0 + delta, layer.bias)
    else:
        x = torch.randn(2, layer.in_channels, 9, 9, dtype=torch.float64)
        expected = F.conv2d(x, w0 + delta, layer.bias, layer.stride, layer.padding)
    module.apply_to()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.delta_weight(), delta, rtol=1e-14, atol=1e-14)
    module.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    module.restore_weight()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("shape, a1, a2", [((12, 20), 4, 5), ((12, 20, 3, 3), 3, 4)])
def test_exact_and_truncated_lora_factors(shape, a1, a2):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(a1, 2, generator=generator) @ torch.randn(2, a2, generator=generator)  # rank 2
    b = torch.randn(shape[0] // a1, shape[1] // a2, *shape[2:], generator=generator)
    delta = krona.kron_delta_weight(a.double(), b.double(), shape, scale=-0.5)
    rank_b = torch.linalg.matrix_rank(b.reshape(b.shape[0], -1))
    up, down, error = krona.krona_lora_factors(a, b, shape, scale=-0.5)
    assert up.shape[1] == down.shape[0] == 2 * rank_b  # rank(A)·rank(B), not the full rank of ΔW's shape
    assert up.shape[2:] == ((1, 1) if len(shape) == 4 else ()) and down.shape[1:] == shape[1:]
    rebuilt = (up.flatten(1).double() @ down.flatten(1).double()).reshape(shape)
    assert (rebuilt - delta).norm() / delta.norm() < 1e-6 and error < 1e-6

    up, down, error = krona.krona_lora_factors(a, b, shape, scale=-0.5, rank=3)
    assert up.shape[1] == 3
    rebuilt = (up.flatten(1).double() @ down.flatten(1).double()).reshape(shape)
    measured = float((rebuilt - delta).norm() / delta.norm())
    singular = torch.linalg.svdvals(delta.reshape(shape[0], -1))  # Eckart-Young: the best rank-3 error
    best = float(singular[3:].norm() / singular.norm())
    print(f"rank 3 of {up.shape[1]}..{2 * rank_b}: reported {error:.6f}, measured {measured:.6f}")
    assert 0.05 < error and abs(error - measured) < 1e-6 and abs(error - best) < 1e-6


def test_zero_delta_gives_zero_rank_one_lora():
    up, down, error = krona.krona_lora_factors(torch.randn(4, 4), torch.zeros(3, 5), (12, 20))
    assert up.shape == (12, 1) and down.shape == (1, 20) and error == 0.0
    assert not up.any() or not down.any()


# ---------------------------------------------------------------------------------------------------
# The network on the tiny SD1 UNet


def expected_attention_names():
    attentions = [f"down_blocks_{b}_attentions_{i}" for b in range(3) for i in range(2)] + ["mid_block_attentions_0"]
    attentions += [f"up_blocks_{b}_attentions_{i}" for b in (1, 2, 3) for i in range(3)]
    return {f"lora_unet_{a}_transformer_blocks_0_attn{n}_to_{p}" for a in attentions for n in (1, 2)
            for p in ("q", "k", "v", "out_0")}


def test_default_targets_are_the_papers_attention_layers_and_start_at_zero(unet):
    sample, t, context = unet_inputs()
    with torch.no_grad():
        before = unet(sample, t, context).sample
    network = krona.create_network(1.0, None, None, None, None, unet)
    assert {m.lora_name for m in network.adapter_modules} == expected_attention_names()
    assert not network.text_encoder_modules
    assert all(not m.delta_weight().any() for m in network.adapter_modules)
    assert all(m.lokr_w1.std() > 0 for m in network.adapter_modules)  # else B would get no gradient
    network.apply_to(None, unet)
    out = unet(sample, t, context).sample
    assert torch.equal(out.detach(), before)
    out.square().mean().backward()
    assert all(m.lokr_w2.grad.abs().sum() > 0 for m in network.adapter_modules)


def test_unet_forward_equals_merge_to(unet):
    network = krona.create_network(1.0, None, None, None, None, unet, preset="full", conv_dim="1")
    assert any(m.is_conv and m.lokr_w2.shape[2:] == (3, 3) for m in network.adapter_modules)
    randomize(network)
    network.apply_to(None, unet)
    sample, t, context = unet_inputs()
    with torch.no_grad():
        hooked = unet(sample, t, context).sample
        network.merge_to(None, unet)
        merged = unet(sample, t, context).sample
        network.restore_weights()
        network.restore()
        plain = unet(sample, t, context).sample
    torch.testing.assert_close(merged, hooked, rtol=1e-4, atol=1e-5)
    assert (hooked - plain).abs().max() > 1e-2


def test_parameter_count_at_64_8_on_sd1_attention_is_below_lora_rank_4():
    unet = tiny_models.build_real_unet_on_meta("sd1")
    network = krona.create_network(1.0, None, None, None, None, unet, a1="64", a2="8")
    modules = network.adapter_modules
    assert len(modules) == 128 and all(m.lokr_w1.shape == (64, 8) for m in modules)
    krona_count = network.trainable_parameter_count()
    by_formula = sum(64 * 8 + (m.out_features // 64) * (m.in_features // 8) for m in modules)
    lora_count = sum(4 * (m.out_features + m.in_features) for m in modules)
    print(f"SD1 attention (128 layers): KronA (64, 8) {krona_count:,} parameters, LoRA rank 4 {lora_count:,}")
    assert krona_count == by_formula == 248_176
    assert lora_count == 797_184  # papers.md §2.4: LoRA r4 is 0.80 M on SD1.5
    assert krona_count < lora_count


def test_file_keys_are_what_automatic1111_and_comfyui_accept_as_lokr(unet, tmp_path):
    network = krona.create_network(1.0, None, None, None, None, unet, preset="full", conv_dim="1")
    path = tmp_path / "k.safetensors"
    network.save_weights(str(path), torch.float16, {"ss_output_name": "k"})
    tensors, metadata = read_file(path)
    groups = adapter_base.group_by_module(tensors)
    weights = layer_weights(unet)
    assert set(groups) == {m.lora_name for m in network.adapter_modules} and all(n in weights for n in groups)
    for name, parts in groups.items():
        # A1111: (lokr_w1 | w1_a+w1_b) and (lokr_w2 | w2_a+w2_b), plus alpha; never `weight` (IA3) or `scale`
        assert set(parts) == {"lokr_w1", "lokr_w2", "alpha"}, name
        assert parts["lokr_w1"].dim() == 2 and parts["lokr_w2"].dim() == weights[name].dim()
        assert parts["alpha"].dim() == 0
    assert metadata["ss_network_module"] == "networks.krona" and metadata["krona.format_version"] == "1"
    assert metadata["ss_output_name"] == "k" and "sshs_model_hash" in metadata


def test_webui_rule_holds_for_the_papers_non_square_factors(unet, tmp_path):
    network = krona.create_network(1.0, None, None, None, None, unet, preset="full", conv_dim="1", a1="64", a2="8")
    randomize(network)
    path = tmp_path / "k.safetensors"
    network.save_weights(str(path))
    groups = adapter_base.group_by_module(read_file(path)[0])
    shapes = {tuple(m.lokr_w1.shape) for m in network.adapter_modules}
    assert (64, 8) in shapes and any(m.is_conv for m in network.adapter_modules)
    for module in network.adapter_modules:
        expected = webui_lokr_delta(groups[module.lora_name], module.layer.weight.shape)
        torch.testing.assert_close(module.delta_weight().double(), expected, rtol=1e-6, atol=1e-7)


def test_network_load_state_dict_takes_the_file_tensors(unet, tmp_path):
    """sd-scripts' gen_img loads a file with network.load_state_dict; the file's alpha is accepted."""
    network = krona.create_network(1.0, None, None, None, None, unet, a1="4", a2="4")
    randomize(network)
    path = tmp_path / "k.safetensors"
    network.save_weights(str(path))
    other = krona.create_network(1.0, None, None, None, None, unet, a1="4", a2="4")
    assert not other.load_state_dict(read_file(path)[0], strict=True).missing_keys
    assert all(torch.equal(x, y) for x, y in zip(network.parameters(), other.parameters()))


def test_max_norm_caps_the_kronecker_product_norm(unet):
    network = krona.create_network(1.0, None, None, None, None, unet)
    randomize(network)
    norms = [m.delta_weight().norm() for m in network.adapter_modules]
    ordered = sorted(float(n) for n in norms)
    cap = (ordered[63] + ordered[64]) / 2  # half of the 128 layers above the cap
    scaled, mean, largest = network.apply_max_norm_regularization(cap, "cpu")
    after = [float(m.delta_weight().norm()) for m in network.adapter_modules]
    assert scaled == sum(n > cap for n in norms) == 64
    assert max(after) == pytest.approx(cap, rel=1e-5) and largest == pytest.approx(cap, rel=1e-5)
    assert all(a == pytest.approx(float(n), rel=1e-5) for a, n in zip(after, norms) if n <= cap)


# ---------------------------------------------------------------------------------------------------
# Round trips with the real LyCORIS package


LYCORIS_PRESET = {"enable_conv": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D"],
                  "unet_target_name": [], "text_encoder_target_module": [], "text_encoder_target_name": []}


@pytest.fixture
def lycoris_kohya(tmp_path):
    """lycoris.kohya with a preset of transformer and resnet blocks: LyCORIS keeps its preset in class attributes
    (restored afterwards), and its default "full" preset trips over diffusers' time embedding names."""
    kohya = pytest.importorskip("lycoris.kohya")
    cls = kohya.LycorisNetworkKohya
    saved = {k: v for k, v in vars(cls).items() if k.isupper()}
    cls.apply_preset(LYCORIS_PRESET)
    yield kohya
    for key, value in saved.items():
        setattr(cls, key, value)


def lycoris_deltas(network):
    return {m.lora_name: m.get_weight(m.shape).detach() for m in network.unet_loras}


def test_our_file_loads_in_lycoris_with_the_same_delta(unet, tmp_path, lycoris_kohya):
    """(4, 4) is a shape LyCORIS's loader can rebuild here (its factor guess gives (4, d/4) on every side)."""
    network = krona.create_network(1.0, None, None, None, None, unet, preset="full", conv_dim="1", a1="4", a2="4")
    randomize(network)
    path = tmp_path / "k.safetensors"
    network.save_weights(str(path))
    theirs, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, None, unet)
    deltas = lycoris_deltas(theirs)
    assert set(deltas) == {m.lora_name for m in network.adapter_modules}
    for module in network.adapter_modules:
        torch.testing.assert_close(deltas[module.lora_name], module.delta_weight(), rtol=1e-6, atol=1e-7)


def lycoris_file(kohya, unet, path, dim, alpha, **kwargs):
    preset = path.parent / "preset.toml"
    preset.write_text("\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}".replace("'", '"')
                                for k, v in LYCORIS_PRESET.items()))
    network = kohya.create_network(1.0, dim, alpha, None, None, unet, algo="lokr", preset=str(preset), **kwargs)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)  # as sd-scripts: registers the modules
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    network.save_weights(str(path), torch.float32, {})
    return network


@pytest.mark.parametrize("options, expected_keys", [
    (dict(dim=100000, alpha=1, full_matrix="True"), {"lokr_w1", "lokr_w2", "alpha"}),
    (dict(dim=2, alpha=1, conv_dim="2", conv_alpha="1", use_tucker="True", decompose_both="True"),
     {"lokr_w1_a", "lokr_w1_b", "lokr_t2", "lokr_w2_a", "lokr_w2_b"}),
])
def test_lycoris_lokr_file_loads_into_krona_with_the_same_delta(unet, tmp_path, lycoris_kohya, options,
                                                                 expected_keys):
    """Full factors (LyCORIS stores alpha = its huge dim: ignored, scale 1), and low-rank/Tucker factors on both
    sides with scale alpha/dim = 0.5, folded into A."""
    path = tmp_path / "lycoris.safetensors"
    theirs = lycoris_file(lycoris_kohya, unet, path, **options)
    tensors, _ = read_file(path)
    assert expected_keys <= {k.split(".", 1)[1] for k in tensors}
    network, weights = krona.create_network_from_weights(1.0, str(path), None, None, unet)
    network.apply_to(None, unet)
    network.load_weights(str(path))
    deltas = lycoris_deltas(theirs)
    assert {m.lora_name for m in network.adapter_modules} == set(deltas)
    assert any(m.is_conv and m.lokr_w2.shape[2:] == (3, 3) for m in network.adapter_modules)
    for module in network.adapter_modules:
        torch.testing.assert_close(module.delta_weight(), deltas[module.lora_name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# The trainer, the preset, bad input


def test_trainer_writes_a_krona_file_that_loads_back(unet, tmp_path):
    from para_trainer.training.train import main

    argv = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", os.path.join(DATA, "train"),
            "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(tmp_path), "--output_name", "run",
            "--network_module", "networks.krona", "--network_args", "a1=8", "a2=4", "--max_train_steps", "2",
            "--learning_rate", "1e-3", "--seed", "7", "--no_export_lora"]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["run.safetensors"]
    tensors, metadata = read_file(tmp_path / "run.safetensors")
    assert metadata["ss_network_module"] == "networks.krona"
    groups = adapter_base.group_by_module(tensors)
    assert set(groups) == expected_attention_names()
    assert all(parts["lokr_w1"].shape == (8, 4) for parts in groups.values())
    assert all(parts["lokr_w2"].abs().sum() > 0 for parts in groups.values())  # B left zero: it trained

    network, _ = krona.create_network_from_weights(1.0, str(tmp_path / "run.safetensors"), None, None, unet)
    network.apply_to(None, unet)
    network.load_weights(str(tmp_path / "run.safetensors"))
    for module in network.adapter_modules:
        expected = webui_lokr_delta(groups[module.lora_name], module.layer.weight.shape)
        torch.testing.assert_close(module.delta_weight().double(), expected, rtol=1e-6, atol=1e-8)


def test_krona_preset_parses_with_the_papers_recipe():
    from para_trainer.training.args import parse_args
    from para_trainer.training.optimizers import parse_optimizer_args

    args = parse_args(["--config_file", os.path.join(ROOT, "presets", "krona_subject.toml")])
    assert args.network_module == "networks.krona"
    assert {"a1=64", "a2=8", "preset=attention"} <= set(args.network_args)
    assert args.optimizer_type == "AdamW8bit" and 6e-4 <= args.learning_rate <= 1e-3
    assert parse_optimizer_args(args.optimizer_args)["weight_decay"] == 1e-2
    assert args.train_batch_size == 1 and args.gradient_accumulation_steps == 4
    assert 500 <= args.max_train_steps <= 1000
    unet = tiny_models.build_real_unet_on_meta("sd1")
    options = dict(item.split("=", 1) for item in args.network_args)
    network = krona.create_network(1.0, args.network_dim, args.network_alpha, None, None, unet, **options)
    assert len(network.adapter_modules) == 128


@pytest.mark.parametrize("options, message", [
    ({"a1": "0"}, "network_args a1='0': must be a whole number above 0"),
    ({"a2": "eight"}, "network_args a2='eight'"),
    ({"rank_dropout": "0.1"}, "rank_dropout is not supported"),
    ({"factor": "8"}, "factor=f is a1=f a2=f"),
    ({"factor_out": "64"}, "sd-scripts' own networks.krona"),
    ({"preset": "atention"}, "did you mean 'attention'"),
    ({"a3": "4"}, "unknown network_args key 'a3'"),
    ({"include": "no_such_layer"}, "selects no layer"),
    ({"include": "("}, "not a valid regular expression"),
])
def test_bad_network_args_give_one_clear_error(options, message):
    unet = tiny_models.build_real_unet_on_meta("sd1")
    with pytest.raises(adapter_base.NetworkArgsError, match=re.escape(message)):
        krona.create_network(1.0, None, None, None, None, unet, **options)


def test_files_that_do_not_fit_are_refused_by_name(unet, tmp_path):
    lora = tmp_path / "lora.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2)}, lora)
    with pytest.raises(adapter_base.AdapterFileError, match="not a KronA/LoKr file.*networks.lora"):
        krona.create_network_from_weights(1.0, str(lora), None, None, unet)

    bad = tmp_path / "bad.safetensors"
    save_file({f"{name}.lokr_w1": torch.zeros(3, 4), f"{name}.lokr_w2": torch.zeros(10, 8)}, bad)
    with pytest.raises(adapter_base.AdapterFileError, match=f"{name} has lokr_w1 of shape \\(3, 4\\)"):
        krona.create_network_from_weights(1.0, str(bad), None, None, unet)

    network = krona.create_network(1.0, None, None, None, None, unet, a1="8", a2="8")
    network.save_weights(str(tmp_path / "k8.safetensors"))
    other = krona.create_network(1.0, None, None, None, None, unet, a1="4", a2="4")
    with pytest.raises(adapter_base.AdapterFileError, match="lokr_w1 has shape \\(8, 8\\).*expects \\(4, 4\\)"):
        other.load_weights(str(tmp_path / "k8.safetensors"))
