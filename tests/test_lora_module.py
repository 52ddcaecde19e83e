"""networks.lora, the study's LoRA baseline: its math against W0 + (alpha/r)·up·down, its files read back by our
tools and by diffusers' own kohya loader, and its key names equal PaRa's on the same preset."""

import pytest
import torch
from torch import nn

from networks import lora, para
from networks.adapter_base import AdapterFileError, NetworkArgsError, read_adapter_file
from para_trainer.files.adapter_files import apply_adapters, read_adapter
from para_trainer.files.export import load_base_model
from para_trainer.models import tiny as tiny_models


def randomize(network, seed=0, scale=0.2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.adapter_modules:
            module.lora_up.copy_(torch.randn(module.lora_up.shape, generator=generator) * scale)
    return network


@pytest.mark.parametrize("conv", [False, True])
def test_output_is_the_layer_with_w0_plus_scaled_up_down(conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, 3, padding=1) if conv else nn.Linear(6, 8)
    module = lora.LoRAModule("lora_unet_x", layer, rank=3, alpha=1.5)
    with torch.no_grad():
        module.lora_up.normal_()
    x = torch.randn(2, 6, 5, 5) if conv else torch.randn(4, 6)
    up, down = module.lora_up.reshape(8, 3), module.lora_down.reshape(3, -1)
    delta = (1.5 / 3) * (up @ down)
    merged = layer.weight + delta.reshape(layer.weight.shape)
    want = (nn.functional.conv2d(x, merged, layer.bias, padding=1) if conv
            else nn.functional.linear(x, merged, layer.bias))
    module.apply_to()
    got = layer(x)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(module.delta_weight(), delta.reshape(layer.weight.shape), atol=1e-6)
    module.multiplier = 0.5
    assert torch.allclose(module.delta_weight(), 0.5 * delta.reshape(layer.weight.shape), atol=1e-6)


def test_starts_as_a_no_op_and_alpha_follows_sd_scripts():
    models = load_base_model("builtin:tiny-sd1")
    network = lora.create_network(1.0, 4, None, None, models.text_encoder_for_network, models.unet)
    assert all(float(m.lora_up.detach().abs().max()) == 0 for m in network.adapter_modules)
    assert {m.alpha for m in network.adapter_modules} == {1.0}  # sd-scripts: network_alpha defaults to 1
    assert lora.LoRAModule("lora_unet_y", nn.Linear(4, 4), 2, alpha=0).alpha == 2  # alpha 0 means r
    with pytest.raises(NetworkArgsError, match="block_dims"):
        lora.create_network(1.0, 4, 1, None, models.text_encoder_for_network, models.unet, block_dims="2,2")


def test_key_names_are_paras_on_the_same_preset():
    models = load_base_model("builtin:tiny-sd1")
    for preset in ("full", "exca"):
        mine = lora.create_network(1.0, 2, 1, None, models.text_encoder_for_network, models.unet, preset=preset)
        theirs = para.create_network(1.0, 2, 1, None, models.text_encoder_for_network, models.unet, preset=preset)
        assert [m.lora_name for m in mine.adapter_modules] == [m.lora_name for m in theirs.adapter_modules]


def test_file_round_trip_and_our_tools_apply_the_same_weights(tmp_path):
    models = load_base_model("builtin:tiny-sd1")
    network = randomize(lora.create_network(1.0, 2, 2.0, None, models.text_encoder_for_network, models.unet,
                                            conv_dim="1", conv_alpha="0.5"))
    deltas = {m.lora_name: m.delta_weight() for m in network.adapter_modules}
    assert any(m.is_conv and m.layer.kernel_size == (3, 3) for m in network.adapter_modules)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), None, {"ss_base_model_version": "sd_v1"})
    tensors, metadata = read_adapter_file(str(path))
    assert metadata["ss_network_module"] == "networks.lora"

    fresh = load_base_model("builtin:tiny-sd1")
    again, _ = lora.create_network_from_weights(1.0, str(path), None, fresh.text_encoder_for_network, fresh.unet)
    again.apply_to(fresh.text_encoder_for_network, fresh.unet)
    again.load_weights(str(path))
    again.save_weights(str(tmp_path / "again.safetensors"), None, {"ss_base_model_version": "sd_v1"})
    again_tensors, again_metadata = read_adapter_file(str(tmp_path / "again.safetensors"))
    assert again_metadata == metadata  # (safetensors orders header keys as it likes: compare contents)
    assert again_tensors.keys() == tensors.keys()
    assert all(torch.equal(again_tensors[k], tensors[k]) for k in tensors)

    adapter = read_adapter(str(path))
    assert adapter.kind == "LoCon"
    target = load_base_model("builtin:tiny-sd1")
    before = {n: p.detach().clone() for n, p in target.unet.named_parameters()}
    apply_adapters(target, [(adapter, 1.0)])
    by_name = {m.lora_name: m for m in network.adapter_modules}
    changed = 0
    for name, param in target.unet.named_parameters():
        if not torch.equal(param, before[name]):
            changed += 1
    assert changed == len([m for m in by_name.values() if m.lora_name.startswith("lora_unet_")])
    for module in network.adapter_modules:
        if module.lora_name.startswith("lora_unet_"):
            path_name = [n for n, m in models.unet.named_modules() if m is module.layer][0]
            got = dict(target.unet.named_parameters())[f"{path_name}.weight"] - before[f"{path_name}.weight"]
            assert torch.allclose(got, deltas[module.lora_name], atol=1e-6)


def test_diffusers_kohya_loader_computes_what_the_network_computes(tmp_path):
    reference = tiny_models.build_tiny_pipeline("sd1", seed=0)
    network = randomize(lora.create_network(1.0, 2, 1.0, None, reference.text_encoder, reference.unet), seed=1)
    path = tmp_path / "lora.safetensors"
    network.save_weights(str(path), None, {})
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, reference.unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        base = reference.unet(latents, 10, context).sample
        network.apply_to(reference.text_encoder, reference.unet)
        want = reference.unet(latents, 10, context).sample
    fresh = tiny_models.build_tiny_pipeline("sd1", seed=0)
    fresh.load_lora_weights(str(path))
    with torch.no_grad():
        got = fresh.unet(latents, 10, context).sample
    assert (want - base).norm() > 1e-3
    assert ((got - want).norm() / (want - base).norm()) < 1e-3


def test_other_kinds_of_file_are_named(tmp_path):
    models = load_base_model("builtin:tiny-sd1")
    pnet = para.create_network(1.0, 2, 1, None, models.text_encoder_for_network, models.unet)
    pnet.save_weights(str(tmp_path / "para.safetensors"), None, {})
    with pytest.raises(AdapterFileError, match="not a LoRA/LoCon file.*networks.para"):
        lora.create_network_from_weights(1.0, str(tmp_path / "para.safetensors"), None,
                                         models.text_encoder_for_network, models.unet)


def test_scale_weight_norms_caps_every_module():
    models = load_base_model("builtin:tiny-sd1")
    network = randomize(lora.create_network(1.0, 2, 2.0, None, models.text_encoder_for_network, models.unet), scale=3)
    norms = [float(m.delta_weight().norm()) for m in network.adapter_modules]
    scaled, mean, largest = network.apply_max_norm_regularization(0.5, "cpu")
    assert scaled == sum(n > 0.5 for n in norms) > 0
    after = [float(m.delta_weight().norm()) for m in network.adapter_modules]
    assert max(after) <= 0.5 + 1e-5 and largest == pytest.approx(max(after), rel=1e-4)
    assert all(a == pytest.approx(min(n, 0.5), rel=1e-4) for a, n in zip(after, norms))


def test_a_lycoris_file_with_text_encoder_layers_applies_as_lycoris_computes_it(tmp_path):
    """LyCORIS under transformers 5 writes lora_te_encoder_layers_... (CLIPTextModel lost its text_model level);
    our tools read those modules as lora_te_text_model_encoder_layers_..., the names every front end uses, and the
    text encoder then computes what LyCORIS's own forward computes."""
    from lycoris import kohya

    models = load_base_model("builtin:tiny-sd1")
    encoder = models.text_encoder_for_network
    ids = models.tokenizers[0](["a photo of sks toy"], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        base = encoder(ids)[0]
    network = kohya.create_network(1.0, 2, 2, models.vae, encoder, models.unet, algo="locon", preset="attn-mlp")
    network.apply_to(encoder, models.unet, True, True)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0, 0.2)  # LyCORIS starts its up weights at zero
        expected = encoder(ids)[0]
    path = tmp_path / "locon.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})

    adapter = read_adapter(str(path))
    names = {name for name in adapter.chains if name.startswith("lora_te")}
    assert names and all(name.startswith("lora_te_text_model_encoder_layers_") for name in names)
    fresh = load_base_model("builtin:tiny-sd1")
    apply_adapters(fresh, [(adapter, 1.0)])
    with torch.no_grad():
        got = fresh.text_encoder_for_network(ids)[0]
    assert not torch.allclose(got, base, atol=1e-3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
