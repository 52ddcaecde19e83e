"""networks.para as sd-scripts uses it: key names, files, the calling sequence, parameter counts, bad input."""

import hashlib
import os

import pytest
import safetensors
import torch

from networks import adapter_base, para
from para_trainer.models import tiny as tiny_models

# ---------------------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="module")
def sd1():
    return tiny_models.build_tiny_pipeline("sd1", seed=0)


@pytest.fixture(scope="module")
def sdxl():
    return tiny_models.build_tiny_pipeline("sdxl", seed=0)


def real_models_on_meta(kind):
    """The real SD1.5/SD2.1/SDXL UNet and text encoders, built on the meta device (no memory, real names)."""
    unet = tiny_models.build_real_unet_on_meta(kind)
    encoders = [tiny_models.build_real_text_encoder_on_meta(c) for c in tiny_models.real_text_encoder_config(kind)]
    return (encoders[0] if len(encoders) == 1 else encoders), unet


def text_encoders_of(pipe):
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    return encoders[0] if len(encoders) == 1 else encoders


# ---------------------------------------------------------------------------------------------------
# Key names, derived here independently from sd-scripts' documented layout (kohya-contract §2.2)

TRANSFORMER_BLOCK_LAYERS = ["attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
                            "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2"]


def expected_sd_unet_names():
    attentions = [f"down_blocks_{b}_attentions_{i}" for b in range(3) for i in range(2)]
    attentions += ["mid_block_attentions_0"]
    attentions += [f"up_blocks_{b}_attentions_{i}" for b in (1, 2, 3) for i in range(3)]
    names = set()
    for a in attentions:
        names |= {f"lora_unet_{a}_proj_in", f"lora_unet_{a}_proj_out"}
        names |= {f"lora_unet_{a}_transformer_blocks_0_{layer}" for layer in TRANSFORMER_BLOCK_LAYERS}
    return names


def expected_sdxl_unet_names():
    depth = {"input_blocks_4_1": 2, "input_blocks_5_1": 2, "input_blocks_7_1": 10, "input_blocks_8_1": 10,
             "middle_block_1": 10, "output_blocks_0_1": 10, "output_blocks_1_1": 10, "output_blocks_2_1": 10,
             "output_blocks_3_1": 2, "output_blocks_4_1": 2, "output_blocks_5_1": 2}
    names = set()
    for a, blocks in depth.items():
        names |= {f"lora_unet_{a}_proj_in", f"lora_unet_{a}_proj_out"}
        names |= {f"lora_unet_{a}_transformer_blocks_{k}_{layer}" for k in range(blocks) for layer in
                  TRANSFORMER_BLOCK_LAYERS}
    return names


def expected_te_names(prefix, layers):
    return {f"{prefix}_text_model_encoder_layers_{i}_{layer}" for i in range(layers)
            for layer in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                          "mlp_fc1", "mlp_fc2")}


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_keys_equal_sd_scripts_names_for_real_sd1_and_sd2(kind):
    text_encoder, unet = real_models_on_meta(kind)
    network = para.create_network(1.0, 4, 1, None, text_encoder, unet)
    names = {m.lora_name for m in network.adapter_modules}
    te_layers = 12 if kind == "sd1" else 23
    assert names == expected_sd_unet_names() | expected_te_names("lora_te", te_layers)
    assert len(expected_sd_unet_names()) == 192  # sd-scripts' count for SD1 (kohya-contract §2.2)
    proj_in = next(m for m in network.unet_modules if m.lora_name.endswith("_0_proj_in"))
    assert proj_in.is_conv == (kind == "sd1")  # 1x1 conv in SD1, Linear in SD2


def test_conv_dim_adds_sd_scripts_86_resnet_and_sampler_modules():
    text_encoder, unet = real_models_on_meta("sd1")
    plain = para.create_network(1.0, 4, 1, None, None, unet)
    with_conv = para.create_network(1.0, 4, 1, None, None, unet, conv_dim="2")
    added = {m.lora_name: m for m in with_conv.unet_modules} .keys() - {m.lora_name for m in plain.unet_modules}
    assert len(added) == 86
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in added
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in added
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in added
    ranks = {m.lora_name: m.rank for m in with_conv.unet_modules}
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 2  # 3x3: conv_dim
    assert ranks["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == 4  # Linear in a resnet: network_dim


def test_keys_equal_sd_scripts_sgm_names_for_real_sdxl():
    text_encoders, unet = real_models_on_meta("sdxl")
    network = para.create_network(1.0, 4, 1, None, text_encoders, unet)
    names = {m.lora_name for m in network.adapter_modules}
    assert names == expected_sdxl_unet_names() | expected_te_names("lora_te1", 12) | expected_te_names("lora_te2", 32)


def test_sdxl_sgm_names_map_back_to_the_same_layers_through_diffusers_loader(sdxl):
    """diffusers' own kohya-SDXL key conversion turns our SGM names back into the layers they came from."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    network = para.create_network(1.0, 2, 1, None, None, sdxl.unet, conv_dim="2")
    names = [m.lora_name for m in network.unet_modules]
    for sgm in ("input_blocks_3_0_op", "output_blocks_2_2_conv", "input_blocks_1_0_in_layers_2",
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q", "middle_block_1_proj_in"):
        assert f"lora_unet_{sgm}" in names
    state = {}
    for name in names:
        state.update({f"{name}.lora_down.weight": torch.zeros(1), f"{name}.lora_up.weight": torch.zeros(1),
                      f"{name}.alpha": torch.tensor(1.0)})
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=sdxl.unet.config)
    converted = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    layers = dict(sdxl.unet.named_modules())
    paths = {key.rsplit(".lora_", 1)[0] for key in converted}
    assert paths <= set(layers)
    assert {id(layers[p]) for p in paths} == {id(m.layer) for m in network.unet_modules}


def test_transformers5_text_encoder_keeps_text_model_names(sd1):
    assert not hasattr(sd1.text_encoder, "text_model")  # transformers 5 dropped this level
    network = para.create_network(1.0, 2, 1, None, sd1.text_encoder, sd1.unet)
    te_names = {m.lora_name for m in network.text_encoder_modules}
    layers = sd1.text_encoder.config.num_hidden_layers
    assert te_names == expected_te_names("lora_te", layers)


# ---------------------------------------------------------------------------------------------------
# Presets, parameter counts and file size


def lora_parameter_count(network):
    return sum(m.rank * (m.in_features + m.out_features) for m in network.adapter_modules)


@pytest.mark.parametrize("preset", ["full", "exca"])
def test_trainable_parameters_are_d_out_times_r_about_half_of_lora(preset, tmp_path):
    text_encoder, unet = real_models_on_meta("sd1")
    network = para.create_network(1.0, 4, 1, None, text_encoder, unet, preset=preset)
    expected = sum(m.out_features * m.rank for m in network.adapter_modules)
    assert network.trainable_parameter_count() == expected
    lora = lora_parameter_count(network)
    print(f"SD1.5 preset={preset}: {len(network.adapter_modules)} layers, PaRa {expected:,} parameters, "
          f"LoRA at the same ranks {lora:,}, ratio {expected / lora:.3f}")
    square = [m for m in network.adapter_modules if m.in_features == m.out_features]
    assert square and all(m.out_features * m.rank * 2 == m.rank * (m.in_features + m.out_features) for m in square)
    if preset == "full":
        # Derived by hand: a transformer block of width C has output sizes 4C (attn1) + 4C (attn2) + 8C (GEGLU)
        # + C (ff out) + 2C (proj_in/out) = 19C; SD1.5 has 5 blocks at 320, 5 at 640, 6 at 1280. CLIP-L has
        # 4*768 + 3072 + 768 outputs per layer, 12 layers. Rank 4.
        assert expected == 4 * (19 * (5 * 320 + 5 * 640 + 6 * 1280) + 12 * (4 * 768 + 3072 + 768)) == 1_280_256

    file = tmp_path / "para.safetensors"
    network.save_weights(str(file), torch.float16, {"ss_network_module": "networks.para"})
    tensor_bytes = expected * 2
    overhead = file.stat().st_size - tensor_bytes
    assert 0 < overhead < 64 * 1024  # the header: key names and a few KiB of metadata, nothing else
    with safetensors.safe_open(str(file), "pt") as f:
        assert all(key.endswith(".para_q") for key in f.keys())
        assert sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys()) == expected


def test_exca_preset_excludes_cross_attention_time_embedding_and_text_encoder():
    text_encoder, unet = real_models_on_meta("sd1")
    network = para.create_network(1.0, 4, 1, None, text_encoder, unet, preset="exca")
    names = [m.lora_name for m in network.adapter_modules]
    assert not network.text_encoder_modules
    assert not any("_attn2_" in n or "time_emb" in n for n in names)
    assert any(n.endswith("_attn1_to_q") for n in names) and any(n.endswith("_ff_net_2") for n in names)
    assert any(n.endswith("_resnets_0_conv1") for n in names)  # 3x3 convs at conv_dim = network_dim


def test_include_and_exclude_narrow_the_preset():
    text_encoder, unet = real_models_on_meta("sd1")
    network = para.create_network(1.0, 4, 1, None, text_encoder, unet, preset="attn-only", include="attn1",
                                  exclude="up_blocks")
    names = {m.lora_name for m in network.adapter_modules}
    assert names and all("attn1" in n and "up_blocks" not in n for n in names)


# ---------------------------------------------------------------------------------------------------
# Files


def unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if pipe.unet.config.addition_embed_type == "text_time":
        pooled = pipe.text_encoder_2.config.projection_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return sample, torch.tensor([500]), context, kwargs


def model_outputs(pipe):
    sample, t, context, kwargs = unet_inputs(pipe)
    tokens = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        return pipe.unet(sample, t, context, **kwargs).sample, pipe.text_encoder(tokens.input_ids)[0]


@pytest.mark.parametrize("fixture", ["sd1", "sdxl"])
def test_save_then_create_from_weights_then_load_gives_identical_outputs(fixture, request, tmp_path):
    pipe = request.getfixturevalue(fixture)
    text_encoder = text_encoders_of(pipe)
    base = model_outputs(pipe)
    torch.manual_seed(0)
    network = para.create_network(1.0, 3, 1, None, text_encoder, pipe.unet, conv_dim="2")
    network.apply_to(text_encoder, pipe.unet)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.2 * torch.randn_like(p))
    trained = model_outputs(pipe)
    assert not torch.allclose(trained[0], base[0])
    file = str(tmp_path / "adapter.safetensors")
    network.save_weights(file, None, {"ss_output_name": "adapter"})
    network.restore()
    assert all(torch.equal(a, b) for a, b in zip(model_outputs(pipe), base))

    loaded, weights = para.create_network_from_weights(1.0, file, None, text_encoder, pipe.unet)
    assert [m.lora_name for m in loaded.adapter_modules] == [m.lora_name for m in network.adapter_modules]
    loaded.apply_to(text_encoder, pipe.unet)
    loaded.load_weights(file)
    assert all(torch.equal(a, b) for a, b in zip(model_outputs(pipe), trained))
    loaded.restore()

    # gen_img.py's way: for_inference object, apply_to, then load_state_dict(file tensors, strict=False)
    inference, weights = para.create_network_from_weights(1.0, file, None, text_encoder, pipe.unet, for_inference=True)
    inference.apply_to(text_encoder, pipe.unet)
    inference.load_state_dict(weights, False)
    assert all(torch.equal(a, b) for a, b in zip(model_outputs(pipe), trained))
    inference.restore()


def test_file_metadata_and_addnet_hashes_as_sd_scripts_computes_them(tmp_path):
    text_encoder, unet = real_models_on_meta("sd1")  # real widths: the file passes the 1 MiB legacy-hash window
    network = para.create_network(1.0, 8, 1, None, None, unet)
    file = tmp_path / "hashes.safetensors"
    given = {"ss_network_dim": "8", "ss_output_name": "hashes", "modelspec.title": "hashes"}
    network.save_weights(str(file), None, given)
    data = file.read_bytes()
    assert len(data) > 0x110000
    header_size = int.from_bytes(data[:8], "little")
    with safetensors.safe_open(str(file), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in given.items():
        assert metadata[key] == value  # written as given
    assert metadata["ss_network_module"] == "networks.para"
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header_size:]).hexdigest()
    # legacy hash: sd-scripts serialises with only the ss_* metadata and hashes 64 KiB at offset 1 MiB
    ss_only = safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    assert not any(key.endswith(".weight") or key.split(".")[-1] == "weight" for key in tensors)


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_pt_and_ckpt_files_round_trip_without_unpickling_code(suffix, tmp_path, sd1):
    network = para.create_network(1.0, 2, 1, None, sd1.text_encoder, sd1.unet)
    file = str(tmp_path / f"adapter{suffix}")
    network.save_weights(file, torch.float16, None)
    tensors, metadata = adapter_base.read_adapter_file(file)
    assert metadata == {}
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert set(tensors) == {f"{m.lora_name}.para_q" for m in network.adapter_modules}


def test_no_truncated_file_under_the_final_name_when_saving_fails(tmp_path, monkeypatch, sd1):
    network = para.create_network(1.0, 2, 1, None, None, sd1.unet)
    file = tmp_path / "adapter.safetensors"

    def broken_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    import safetensors.torch as st
    monkeypatch.setattr(st, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        network.save_weights(str(file))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# sd-scripts' calling sequence, gradients


def test_sd_scripts_calling_sequence_trains_only_b(sd1, tmp_path):
    """create_network -> apply_to -> prepare_optimizer_params -> accelerator.prepare -> prepare_grad_etc ->
    on_epoch_start -> steps -> save_weights, as train_network.py calls them."""
    from accelerate import Accelerator

    pipe = tiny_models.build_tiny_pipeline("sd1", seed=0)
    text_encoder, unet = pipe.text_encoder, pipe.unet
    for model in (text_encoder, unet):
        model.requires_grad_(False)
    base = {n: p.detach().clone() for m in (text_encoder, unet) for n, p in m.named_parameters(prefix=str(id(m)))}
    net_kwargs = {"conv_dim": "2", "preset": "full", "dropout": None}  # strings, plus the injected dropout
    network = para.create_network(1.0, 4, 1, None, text_encoder, unet, neuron_dropout=None, **net_kwargs)
    network.apply_to(text_encoder, unet, True, True)
    groups, descriptions = network.prepare_optimizer_params(5e-3, 1e-2, 1e-3)
    assert descriptions == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [5e-3, 1e-2]
    optimizer = torch.optim.AdamW(groups)
    accelerator = Accelerator(cpu=True)
    network, optimizer = accelerator.prepare(network, optimizer)
    unwrapped = accelerator.unwrap_model(network)
    unwrapped.prepare_grad_etc(text_encoder, unet)
    unwrapped.on_epoch_start(text_encoder, unet)
    before = {n: p.detach().clone() for n, p in unwrapped.named_parameters()}
    sample, t, _, kwargs = unet_inputs(pipe)
    tokens = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt")
    for step in range(3):
        unwrapped.on_step_start(text_encoder, unet)
        context = text_encoder(tokens.input_ids)[0]
        loss = unet(sample, t, context).sample.square().mean()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unwrapped.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for model in (text_encoder, unet):
        for name, p in model.named_parameters(prefix=str(id(model))):
            assert p.grad is None and torch.equal(p, base[name]), f"base weight {name} changed"
    assert all(name.endswith(".para_b") for name, _ in unwrapped.named_parameters())
    assert all(not torch.equal(p, before[n]) for n, p in unwrapped.named_parameters())
    file = tmp_path / "trained.safetensors"
    unwrapped.save_weights(str(file), torch.float16, {"ss_network_module": "networks.para"})
    assert file.exists()


def test_sdxl_text_encoders_get_one_learning_rate_each(sdxl):
    network = para.create_network(1.0, 2, 1, None, text_encoders_of(sdxl), sdxl.unet)
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 2e-4], 3e-4, 1e-3)
    assert descriptions == ["textencoder1", "textencoder2", "unet"]
    assert [g["lr"] for g in groups] == [1e-4, 2e-4, 3e-4]
    groups, descriptions = network.prepare_optimizer_params(None, 0, 1e-3)  # unet lr 0: not trained
    assert descriptions == ["textencoder1", "textencoder2"] and [g["lr"] for g in groups] == [1e-3, 1e-3]


def test_base_weights_merge_to_as_sd_scripts_calls_it(sd1, tmp_path):
    pipe = tiny_models.build_tiny_pipeline("sd1", seed=0)
    network = para.create_network(1.0, 3, 1, None, pipe.text_encoder, pipe.unet)
    network.apply_to(pipe.text_encoder, pipe.unet)
    hooked = model_outputs(pipe)
    file = str(tmp_path / "base.safetensors")
    network.save_weights(file)
    network.restore()
    module, weights_sd = para.create_network_from_weights(1.0, file, None, pipe.text_encoder, pipe.unet,
                                                          for_inference=True)
    module.merge_to(pipe.text_encoder, pipe.unet, weights_sd, torch.float32, "cpu")
    merged = model_outputs(pipe)
    for a, b in zip(merged, hooked):
        assert ((a - b).norm() / b.norm()).item() < 1e-5
    module.restore_weights()
    fresh = tiny_models.build_tiny_pipeline("sd1", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), fresh.unet.state_dict().values()))


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear error each


@pytest.mark.parametrize("kwargs, message", [
    ({"conv_dim": "abc"}, "network_args conv_dim='abc'"),
    ({"preset": "exka"}, "did you mean 'exca'"),
    ({"conv_dimm": "4"}, "unknown network_args key 'conv_dimm' \\(did you mean 'conv_dim'\\?\\)"),
    ({"dropout": "1.5"}, "network_args dropout='1.5': must be a probability"),
    ({"include": "attn(["}, "not a valid regular expression"),
    ({"block_dims": "2,2,2"}, "not supported"),
])
def test_wrong_network_args_give_one_clear_error(kwargs, message, sd1):
    with pytest.raises(para.NetworkArgsError, match=message):
        para.create_network(1.0, 4, 1, None, sd1.text_encoder, sd1.unet, **kwargs)


def test_rank_above_layer_width_is_refused(sd1):
    with pytest.raises(para.NetworkArgsError, match="lower network_dim"):
        para.create_network(1.0, 10_000, 1, None, sd1.text_encoder, sd1.unet)


def test_sdxl_file_into_sd1_names_the_first_module_that_does_not_fit(sd1, sdxl, tmp_path):
    network = para.create_network(1.0, 2, 1, None, text_encoders_of(sdxl), sdxl.unet)
    file = str(tmp_path / "sdxl.safetensors")
    network.save_weights(file, None, {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(para.AdapterFileError, match=r"its module lora_te1_\w+ has no layer.*sdxl_base_v1-0"):
        para.create_network_from_weights(1.0, file, None, sd1.text_encoder, sd1.unet)


def test_file_with_wrong_widths_is_refused(sd1, tmp_path):
    network = para.create_network(1.0, 2, 1, None, sd1.text_encoder, sd1.unet)
    state = network.file_state()
    name = next(iter(state))
    state[name] = torch.zeros(state[name].shape[0] + 8, 2)
    file = str(tmp_path / "wrong.safetensors")
    adapter_base.write_adapter_file(file, state, {})
    with pytest.raises(para.AdapterFileError, match=f"module {name.split('.')[0]} has Q of shape"):
        para.create_network_from_weights(1.0, file, None, sd1.text_encoder, sd1.unet)


def test_truncated_file_gives_one_clear_error(sd1, tmp_path):
    network = para.create_network(1.0, 2, 1, None, sd1.text_encoder, sd1.unet)
    file = tmp_path / "adapter.safetensors"
    network.save_weights(str(file))
    file.write_bytes(file.read_bytes()[: os.path.getsize(file) // 2])
    with pytest.raises(para.AdapterFileError, match="truncated or corrupt"):
        para.create_network_from_weights(1.0, str(file), None, sd1.text_encoder, sd1.unet)


def test_lora_file_is_not_taken_for_a_para_file(sd1, tmp_path):
    file = str(tmp_path / "lora.safetensors")
    adapter_base.write_adapter_file(file, {"lora_unet_x.lora_down.weight": torch.zeros(2, 4),
                                           "lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, {})
    with pytest.raises(para.AdapterFileError, match="not a native PaRa file"):
        para.create_network_from_weights(1.0, file, None, sd1.text_encoder, sd1.unet)
