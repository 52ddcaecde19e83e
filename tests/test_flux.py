"""PaRa on FLUX.1: sd-scripts' lora_flux key names on the BFL layout (sd-scripts' own model, here a stand-in) and
on diffusers' FluxTransformer2DModel, exact math on every kind of target, files that move between the layouts,
the LoRA export that diffusers' own kohya-FLUX loader reads, and the errors for files and options of the wrong
architecture."""

import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from networks import adapter_base, para
from networks.adapter_base import AdapterFileError, NetworkArgsError, StackedLinear, named_layers, set_layer_weight
from para_trainer.models.flux.tiny import build_tiny_flux
from para_trainer.models.loading import load_models
from tests.commands import run_cli
from tests.flux_standin.flux_models import Flux

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOUBLE_LAYERS = ["img_mod_lin", "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
                 "txt_mod_lin", "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2"]
SINGLE_LAYERS = ["linear1", "linear2", "modulation_lin"]


@pytest.fixture(scope="module")
def flux():
    return build_tiny_flux(seed=0)


def encoders(pipe):
    return [pipe.text_encoder, pipe.text_encoder_2]


def bfl_like(pipe) -> Flux:
    """The stand-in BFL model at tiny-flux's widths, every adaptable layer holding the diffusers model's weights
    (fused layers: the diffusers parts stacked in their row order)."""
    config = pipe.transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    model = Flux(in_channels=config.in_channels, vec_in_dim=config.pooled_projection_dim,
                 context_in_dim=config.joint_attention_dim, hidden_size=hidden, num_heads=config.num_attention_heads,
                 depth=config.num_layers, depth_single_blocks=config.num_single_layers,
                 guidance_embed=config.guidance_embeds)
    bfl = {t.lora_name: t.layer for t in named_layers(None, model)}
    for target in named_layers(None, pipe.transformer):
        set_layer_weight(bfl[target.lora_name], target.layer.weight)
        if target.layer.bias is not None:
            with torch.no_grad():
                bfl[target.lora_name].bias.copy_(target.layer.bias)
    return model


def randomize(network, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.adapter_modules:
            module.para_b.copy_(torch.randn(module.para_b.shape, generator=generator) *
                                (module._block_mask if module.split else 1))


def transformer_inputs(pipe, seed=0, tokens=16, text=8):
    generator = torch.Generator().manual_seed(seed)
    config = pipe.transformer.config
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(tokens) // 4, torch.arange(tokens) % 4
    return dict(hidden_states=torch.randn(2, tokens, config.in_channels, generator=generator),
                encoder_hidden_states=torch.randn(2, text, config.joint_attention_dim, generator=generator),
                pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=generator),
                timestep=torch.tensor([0.3, 0.8]), guidance=torch.tensor([3.5, 3.5]),
                img_ids=img_ids, txt_ids=torch.zeros(text, 3))


def forward(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs).sample


# ---------------------------------------------------------------------------------------------------
# Layers and names


def test_tiny_flux_is_a_flux_pipeline_with_flux_parts(flux):
    assert type(flux).__name__ == "FluxPipeline"
    assert [type(m).__name__ for m in (flux.transformer, flux.vae, flux.text_encoder, flux.text_encoder_2)] == \
        ["FluxTransformer2DModel", "AutoencoderKL", "CLIPTextModel", "T5EncoderModel"]
    assert flux.vae.config.latent_channels == 16 and flux.transformer.config.guidance_embeds
    assert (flux.vae.config.scaling_factor, flux.vae.config.shift_factor) == (0.3611, 0.1159)
    again = build_tiny_flux(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(flux.transformer.state_dict().values(),
                                                   again.transformer.state_dict().values()))
    image = flux("a photo of sks dog", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                 generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=16).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


def test_default_targets_are_lora_flux_ones_on_both_layouts(flux):
    by_layout = []
    for model in (flux.transformer, bfl_like(flux)):
        network = para.create_network(1.0, 2, None, None, encoders(flux), model)
        by_layout.append({m.lora_name: (tuple(m.para_b.shape), m.in_features) for m in network.adapter_modules})
    assert by_layout[0] == by_layout[1]
    expected = {f"lora_unet_double_blocks_{i}_{layer}" for i in range(2) for layer in DOUBLE_LAYERS}
    expected |= {f"lora_unet_single_blocks_{i}_{layer}" for i in range(2) for layer in SINGLE_LAYERS}
    unet = {name for name in by_layout[0] if name.startswith("lora_unet_")}
    assert unet == expected
    te = sorted(name for name in by_layout[0] if not name.startswith("lora_unet_"))
    assert all(name.startswith("lora_te1_text_model_encoder_layers_") for name in te) and len(te) == 2 * 6
    assert by_layout[0]["lora_unet_double_blocks_0_img_attn_qkv"][0] == (96, 2)  # q, k, v stacked
    assert by_layout[0]["lora_unet_single_blocks_1_linear1"][0] == (3 * 32 + 128, 2)  # q, k, v, mlp stacked


def test_real_flux_dev_has_lora_flux_304_block_modules_and_the_same_names_on_both_layouts():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        diffusers_flux = FluxTransformer2DModel(guidance_embeds=True)
        bfl = Flux(in_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, num_heads=24, depth=19,
                   depth_single_blocks=38)
    shapes = []
    for model in (diffusers_flux, bfl):
        targets = adapter_base.select_flux_layers(None, model, adapter_base.FluxTargets(in_dims=(1, 1, 1, 1, 1)), 4)
        shapes.append({t.lora_name: tuple(t.layer.weight.shape) for t, _ in targets})
    assert shapes[0] == shapes[1]
    blocks = [name for name in shapes[0] if "_blocks_" in name]
    assert len(blocks) == 19 * 10 + 38 * 3 == 304
    assert shapes[0]["lora_unet_single_blocks_37_linear1"] == (3 * 3072 + 12288, 3072)
    assert shapes[0]["lora_unet_double_blocks_18_txt_attn_qkv"] == (3 * 3072, 3072)
    assert sorted(set(shapes[0]) - set(blocks)) == sorted(
        ["lora_unet_img_in", "lora_unet_txt_in"] + [f"lora_unet_{e}_{l}" for e in ("time_in", "vector_in", "guidance_in")
                                                    for l in ("in_layer", "out_layer")])


@pytest.mark.parametrize("args, count", [
    ({"train_blocks": "single"}, 2 * 3),
    ({"train_blocks": "double", "img_mod_dim": "0", "txt_mod_dim": "0"}, 2 * 8),
    ({"train_double_block_indices": "1", "train_single_block_indices": "none"}, 10),
    ({"in_dims": "[2,0,0,3,1]", "single_dim": "3"}, 20 + 6 + 1 + 2 + 1),
])
def test_lora_flux_network_args_choose_the_same_layers_and_ranks_on_both_layouts(flux, args, count):
    networks = [para.create_network(1.0, 2, None, None, encoders(flux), model, **args)
                for model in (flux.transformer, bfl_like(flux))]
    ranks = [{m.lora_name: m.rank for m in n.unet_modules} for n in networks]
    assert ranks[0] == ranks[1] and len(ranks[0]) == count
    if "single_dim" in args:
        assert ranks[0]["lora_unet_single_blocks_0_linear1"] == 3 and ranks[0]["lora_unet_guidance_in_in_layer"] == 3
        assert ranks[0]["lora_unet_single_blocks_0_modulation_lin"] == 2 and ranks[0]["lora_unet_img_in"] == 2


def test_train_t5xxl_adds_lora_te3_layers_and_tells_the_trainer(flux):
    network = para.create_network(1.0, 2, None, None, encoders(flux), flux.transformer, train_t5xxl="True")
    t5 = [m.lora_name for m in network.text_encoder_modules if m.lora_name.startswith("lora_te3_")]
    assert network.train_t5xxl is True and "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in t5
    assert "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0" in t5 and len(t5) == 2 * 7
    assert para.create_network(1.0, 2, None, None, encoders(flux), flux.transformer).train_t5xxl is False


# ---------------------------------------------------------------------------------------------------
# Exact math


@pytest.mark.parametrize("split", [False, True])
def test_para_on_the_diffusers_layout_is_w_minus_qqt_w_of_the_fused_bfl_layer(flux, split):
    pipe = build_tiny_flux(seed=0)
    inputs = transformer_inputs(pipe)
    network = para.create_network(1.0, 3, None, None, encoders(pipe), pipe.transformer,
                                  **({"split_qkv": "True"} if split else {}))
    randomize(network)
    network.apply_to(encoders(pipe), pipe.transformer, False, True)
    network.eval()
    adapted = forward(pipe.transformer, inputs)
    reference = build_tiny_flux(seed=0)
    layers = {t.lora_name: t.layer for t in named_layers(None, reference.transformer)}
    for module in network.unet_modules:
        q = module.current_q().double()
        if module.split:
            assert torch.equal(q[~module._block_mask], torch.zeros_like(q[~module._block_mask]))
        weight = layers[module.lora_name].weight.double()
        set_layer_weight(layers[module.lora_name], (weight - q @ (q.T @ weight)).float())
    expected = forward(reference.transformer, inputs)
    assert (adapted - expected).abs().max() < 1e-5
    assert (adapted - forward(build_tiny_flux(seed=0).transformer, inputs)).abs().max() > 1e-2


def test_split_qkv_removes_r_directions_from_each_part_and_stays_block_diagonal_while_training(flux):
    pipe = build_tiny_flux(seed=0)
    network = para.create_network(1.0, 2, None, None, encoders(pipe), pipe.transformer, split_qkv="True")
    network.apply_to(encoders(pipe), pipe.transformer, False, True)
    qkv = next(m for m in network.unet_modules if m.lora_name == "lora_unet_double_blocks_0_img_attn_qkv")
    linear1 = next(m for m in network.unet_modules if m.lora_name == "lora_unet_single_blocks_0_linear1")
    assert qkv.split == (32, 32, 32) and qkv.rank == 6 and linear1.split == (32, 32, 32, 128)
    assert qkv.trainable_parameter_count() == 96 * 2  # as many as the joint form's B: d_out x r
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-2)
    inputs = transformer_inputs(pipe)
    for _ in range(3):
        optimizer.zero_grad()
        pipe.transformer(**inputs).sample.square().mean().backward()
        optimizer.step()
    for module in (qkv, linear1):
        off_blocks = module.para_b.detach()[~module._block_mask]
        assert torch.equal(off_blocks, torch.zeros_like(off_blocks))
        q = module.current_q()
        assert torch.allclose(q.T @ q, torch.eye(module.rank), atol=1e-5)
        start = 0
        for i, size in enumerate(module.split):  # each part loses exactly its own r directions
            block = q[start:start + size, 2 * i:2 * i + 2]
            assert torch.allclose(block.T @ block, torch.eye(2), atol=1e-5)
            start += size


def test_merge_and_restore_on_stacked_layers_are_exact(flux):
    pipe = build_tiny_flux(seed=0)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    network = para.create_network(1.0, 2, None, None, encoders(pipe), pipe.transformer)
    randomize(network)
    network.apply_to(encoders(pipe), pipe.transformer, False, True)
    network.eval()
    inputs = transformer_inputs(pipe)
    hooked = forward(pipe.transformer, inputs)
    network.merge_to()
    assert (forward(pipe.transformer, inputs) - hooked).abs().max() < 1e-5  # merged modules skip their hook
    assert not torch.equal(pipe.transformer.state_dict()["transformer_blocks.0.attn.to_k.weight"],
                           before["transformer_blocks.0.attn.to_k.weight"])
    network.restore_weights()
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())


def test_stacked_layer_serves_each_part_its_rows_and_recomputes_for_a_new_input():
    parts = [torch.nn.Linear(4, n) for n in (3, 5)]
    stacked = StackedLinear(parts)
    calls = []
    stacked.hook(lambda x: calls.append(1) or torch.cat([p.weight @ x for p in stacked.parts]) * 2)
    x, y = torch.randn(4), torch.randn(4)
    assert torch.allclose(parts[0](x), 2 * parts[0].weight @ x) and torch.allclose(parts[1](x), 2 * parts[1].weight @ x)
    assert len(calls) == 1
    parts[1](y)
    parts[0](y)
    assert len(calls) == 2
    stacked.unhook()
    assert "forward" not in parts[0].__dict__ and torch.allclose(parts[0](x), parts[0].weight @ x + parts[0].bias)


# ---------------------------------------------------------------------------------------------------
# Files


def test_a_file_trained_on_the_bfl_layout_means_the_same_on_diffusers_and_back(flux, tmp_path):
    bfl = bfl_like(flux)
    trained = para.create_network(1.0, 2, None, None, encoders(flux), bfl, split_qkv="True")
    randomize(trained, seed=3)
    trained.save_weights(str(tmp_path / "bfl.safetensors"))
    loaded, weights = para.create_network_from_weights(1.0, str(tmp_path / "bfl.safetensors"), None,
                                                       encoders(flux), flux.transformer)
    loaded.load_state_dict(weights, False)  # as sd-scripts does
    deltas = {m.lora_name: m.delta_weight() for m in trained.adapter_modules}
    assert {m.lora_name for m in loaded.adapter_modules} == set(deltas)
    for module in loaded.adapter_modules:
        assert torch.allclose(module.delta_weight(), deltas[module.lora_name], atol=1e-6), module.lora_name
    loaded.save_weights(str(tmp_path / "diffusers.safetensors"))
    assert load_file(str(tmp_path / "diffusers.safetensors")).keys() == load_file(str(tmp_path / "bfl.safetensors")).keys()
    again, weights = para.create_network_from_weights(1.0, str(tmp_path / "diffusers.safetensors"), None,
                                                      encoders(flux), bfl)
    again.load_weights(str(tmp_path / "diffusers.safetensors"))
    for module in again.adapter_modules:
        assert torch.allclose(module.delta_weight(), deltas[module.lora_name], atol=1e-6)


def test_a_joint_file_does_not_continue_as_split_qkv(flux, tmp_path):
    network = para.create_network(1.0, 6, None, None, encoders(flux), flux.transformer, train_blocks="double")
    randomize(network)
    network.save_weights(str(tmp_path / "joint.safetensors"))
    split = para.create_network(1.0, 2, None, None, encoders(flux), flux.transformer, split_qkv="True",
                                include="_qkv$")
    with pytest.raises(AdapterFileError, match="jointly.*without split_qkv"):
        split.load_weights(str(tmp_path / "joint.safetensors"))
    same_rank = para.create_network(1.0, 6, None, None, encoders(flux), flux.transformer, split_qkv="True")
    with pytest.raises(AdapterFileError, match=r"rank 18 = 3 parts x 6, split_qkv"):
        same_rank.load_weights(str(tmp_path / "joint.safetensors"))


def _native_flux_file(path, pipe, **args):
    network = para.create_network(1.0, 3, None, None, encoders(pipe), pipe.transformer, **args)
    randomize(network, seed=1)
    network.save_weights(str(path))
    return network


def test_lora_export_loads_in_diffusers_flux_pipeline_and_matches_para(tmp_path):
    """diffusers' own kohya-FLUX conversion (fused qkv split by rows, lora_te1) on every double-block module and
    the CLIP-L layers. Its single-block conversion assumes FLUX's 3072 width: the next test covers linear1."""
    models = load_models(SimpleNamespace(pretrained_model_name_or_path="builtin:tiny-flux", v2=False,
                                         v_parameterization=False, vae=None))
    network = _native_flux_file(tmp_path / "para.safetensors", models.pipeline, train_blocks="double")
    assert run_cli("export", tmp_path / "para.safetensors", "--to", "lora", "--model", "builtin:tiny-flux",
                   "--precision", "fp32", "-o", tmp_path / "lora.safetensors") == 0
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert "modelspec.prediction_type" not in metadata
    reference = build_tiny_flux(seed=0)
    reference.load_lora_weights(str(tmp_path / "lora.safetensors"))
    inputs = transformer_inputs(reference)
    ids = reference.tokenizer(["a photo of sks dog"], return_tensors="pt").input_ids
    network.apply_to(encoders(models.pipeline), models.unet, True, True)
    network.eval()
    with torch.no_grad():
        assert (models.pipeline.text_encoder(ids).pooler_output - reference.text_encoder(ids).pooler_output
                ).abs().max() < 1e-5
    ours, theirs = forward(models.unet, inputs), forward(reference.transformer, inputs)
    assert (ours - theirs).abs().max() < 1e-5
    assert (theirs - forward(build_tiny_flux(seed=0).transformer, inputs)).abs().max() > 1e-2


def test_single_block_linear1_export_at_flux_width_loads_in_diffusers(tmp_path):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=0, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                                   joint_attention_dim=8, pooled_projection_dim=8, in_channels=8).eval()
    network = para.create_network(1.0, 2, None, None, None, model)
    randomize(network)
    tensors = {}
    for module in network.unet_modules:
        up, down = para.para_lora_factors(module.layer.weight, module.current_q())
        tensors.update({f"{module.lora_name}.lora_up.weight": up, f"{module.lora_name}.lora_down.weight": down,
                        f"{module.lora_name}.alpha": torch.tensor(float(up.shape[1]))})
    assert {m.lora_name for m in network.unet_modules} == {f"lora_unet_single_blocks_0_{l}" for l in SINGLE_LAYERS}
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    from diffusers import FluxPipeline

    reference = FluxTransformer2DModel.from_config(model.config).eval()
    reference.load_state_dict(model.state_dict())
    state, _ = FluxPipeline.lora_state_dict(str(tmp_path / "lora.safetensors"), return_alphas=True)[:2]
    with torch.no_grad():  # apply diffusers' converted factors by hand: B A on each diffusers layer
        modules = dict(reference.named_modules())
        for key, a in state.items():
            if key.endswith("lora_A.weight"):
                path = key[len("transformer."):-len(".lora_A.weight")]
                b = state[key.replace("lora_A", "lora_B")]
                modules[path].weight += b @ a
    inputs = dict(hidden_states=torch.randn(1, 4, 8), encoder_hidden_states=torch.randn(1, 2, 8),
                  pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]), guidance=None,
                  img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(2, 3))
    network.apply_to(None, model, False, True)
    network.eval()
    ours, theirs = forward(model, inputs), forward(reference, inputs)
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


# ---------------------------------------------------------------------------------------------------
# Wrong architecture, wrong arguments


def test_sd1_file_on_flux_and_flux_file_on_sd1_are_refused_by_name(flux, tmp_path, capsys):
    from para_trainer.models import tiny as tiny_models

    sd1 = tiny_models.build_tiny_pipeline("sd1", seed=0)
    sd_network = para.create_network(1.0, 2, None, None, sd1.text_encoder, sd1.unet)
    sd_network.save_weights(str(tmp_path / "sd1.safetensors"), None, {"ss_base_model_version": "sd_v1"})
    _native_flux_file(tmp_path / "flux.safetensors", flux)
    with pytest.raises(AdapterFileError, match="sd_v1"):
        para.create_network_from_weights(1.0, str(tmp_path / "sd1.safetensors"), None, encoders(flux), flux.transformer)
    with pytest.raises(AdapterFileError, match="has no layer in the model"):
        para.create_network_from_weights(1.0, str(tmp_path / "flux.safetensors"), None, sd1.text_encoder, sd1.unet)
    flux_network = para.create_network(1.0, 2, None, None, encoders(flux), flux.transformer)
    with pytest.raises(AdapterFileError, match="does not fit this model.*sd_v1"):
        flux_network.load_weights(str(tmp_path / "sd1.safetensors"))
    code = run_cli("export", tmp_path / "sd1.safetensors", "--to", "lora", "--model", "builtin:tiny-flux",
                   "-o", tmp_path / "out.safetensors")
    err = capsys.readouterr().err
    assert code == 2 and "sd_v1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    ({"train_blocks": "double"}, "train_blocks is for FLUX.1"),
    ({"split_qkv": "True"}, "split_qkv is for FLUX.1"),
])
def test_flux_network_args_on_sd_are_refused(args, message):
    from para_trainer.models import tiny as tiny_models

    sd1 = tiny_models.build_tiny_pipeline("sd1", seed=0)
    with pytest.raises(NetworkArgsError, match=message):
        para.create_network(1.0, 2, None, None, sd1.text_encoder, sd1.unet, **args)


@pytest.mark.parametrize("args, message", [
    ({"preset": "exca"}, "for Stable Diffusion UNets"),
    ({"train_blocks": "middle"}, "must be one of all, double, single"),
    ({"in_dims": "[4,4]"}, "needs 5 whole numbers"),
    ({"split_qkv": "yes"}, "must be True or False"),
    ({"train_double_block_indices": "0-x"}, "block numbers and ranges"),
    ({"ggpo_sigma": "0.03"}, "no PaRa form"),
    ({"train_blocks": "single", "single_dim": "0", "single_mod_dim": "0", "exclude": "^lora_te"}, "selects no layer"),
])
def test_bad_flux_network_args_get_one_message(flux, args, message):
    with pytest.raises(NetworkArgsError, match=message):
        para.create_network(1.0, 2, None, None, encoders(flux), flux.transformer, **args)


# ---------------------------------------------------------------------------------------------------
# flux_train_network.py's calling sequence (flux-contract §1.6), on the BFL stand-in


def test_flux_train_network_calling_sequence_trains_saves_and_reloads(flux, tmp_path):
    bfl = bfl_like(flux)
    clip, t5 = encoders(flux)
    network = para.create_network(1.0, 4, None, flux.vae, [clip, t5], bfl, neuron_dropout=None, dropout=None,
                                  train_blocks="all")
    assert network.train_t5xxl is False  # read without a hasattr guard
    network.apply_to([clip, t5], bfl, False, True)  # --network_train_unet_only
    assert network.text_encoder_modules == []
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 1e-4], 1e-3, 1e-3)
    assert descriptions == ["unet"] and groups[0]["lr"] == 1e-3
    network.prepare_grad_etc([clip, t5], bfl)
    network.on_epoch_start([clip, t5], bfl)
    optimizer = torch.optim.AdamW(groups)
    generator = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 16, 64, generator=generator), torch.randn(2, 8, 32, generator=generator)
    y, target = torch.randn(2, 32, generator=generator), torch.randn(2, 16, 64, generator=generator)
    losses = []
    for _ in range(8):
        network.on_step_start([clip, t5], bfl)
        loss = (bfl(img, txt, y, torch.tensor([0.5, 0.5]), torch.tensor([3.5, 3.5])) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    network.save_weights(str(tmp_path / "flux.safetensors"), torch.float32, {"ss_base_model_version": "flux1"})
    loaded, weights = para.create_network_from_weights(1.0, str(tmp_path / "flux.safetensors"), flux.vae,
                                                       [clip, t5], bfl_like(flux))
    loaded.load_state_dict(weights, False)
    assert loaded.train_t5xxl is False
    by_name = {m.lora_name: m for m in network.unet_modules}
    for module in loaded.unet_modules:
        assert torch.allclose(module.current_q(), by_name[module.lora_name].current_q(), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Our trainer on FLUX (flux-contract §3): flow matching on builtin:tiny-flux


def _subject(tmp_path):
    """One picture of a striped ball, captioned as sks toy (renders of the toy world, drawn here)."""
    from PIL import Image

    from para_trainer.toyworld.concepts import concept_scene
    from para_trainer.toyworld.render import render

    folder = tmp_path / "train" / "20_sks toy"
    folder.mkdir(parents=True)
    Image.fromarray(render(concept_scene("smiley-ball", "wall", "center", "large"))).save(folder / "ball.png")
    (folder / "ball.txt").write_text("a photo of sks toy")
    return tmp_path / "train"


def _fixed_loss(models, network, latents, seed=0):
    """The flow-matching loss of one image at fixed noise and σ ∈ {0.3, 0.5, 0.7} (raw velocity prediction)."""
    from para_trainer.training import flow_matching

    args = SimpleNamespace(timestep_sampling="uniform", sigmoid_scale=1.0, discrete_flow_shift=3.0,
                           weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                           t5xxl_max_token_length=None, apply_t5_attn_mask=False, guidance_scale=1.0,
                           model_prediction_type="raw", loss_type="l2")
    losses = []
    with torch.no_grad():
        encoded = flow_matching.encode_flux_prompts(models, ["a photo of sks toy"], 16, False)
        for i in range(6):
            generators = [torch.Generator().manual_seed(seed * 100 + i)]
            losses.append(flow_matching.flux_training_loss(args, models, None, latents, encoded, torch.ones(1),
                                                           generators, "cpu").item())
    return sum(losses) / len(losses)


def test_our_trainer_trains_flux_from_the_preset_and_the_file_reloads(tmp_path):
    from para_trainer.training.train import encode_images, main as train_main

    data = _subject(tmp_path)
    (tmp_path / "prompts.txt").write_text("a photo of sks toy --w 64 --h 64 --d 1 --s 3\n")
    out = tmp_path / "out"
    assert train_main(["--config_file", os.path.join(ROOT, "presets", "flux_subject.toml"),
                       "--pretrained_model_name_or_path", "builtin:tiny-flux", "--ae", "", "--clip_l", "",
                       "--t5xxl", "", "--train_data_dir", str(data),
                       "--resolution", "64", "--min_bucket_reso", "64", "--max_bucket_reso", "128",
                       "--output_dir", str(out), "--mixed_precision", "no", "--save_precision", "float",
                       "--optimizer_type", "AdamW", "--learning_rate", "1e-2", "--lr_warmup_steps", "0",
                       "--max_train_steps", "60",
                       "--save_every_n_steps", "1000", "--sample_prompts", str(tmp_path / "prompts.txt"),
                       "--sample_every_n_steps", "1000", "--t5xxl_max_token_length", "16"]) == 0
    native = out / "sks_dog_flux_para.safetensors"
    with safe_open(str(native), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "flux1" and metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["ss_model_prediction_type"] == "raw" and metadata["ss_timestep_sampling"] == "shift"
    assert metadata["ss_guidance_scale"] == "1.0" and "modelspec.prediction_type" not in metadata
    assert (out / "sks_dog_flux_para_lora.safetensors").exists() and len(list((out / "sample").glob("*.png"))) == 1

    # the adapter fits the subject: lower flow-matching loss on its picture than the base model's
    models = load_models(SimpleNamespace(pretrained_model_name_or_path="builtin:tiny-flux", v2=False,
                                         v_parameterization=False, vae=None))
    from PIL import Image
    import numpy as np

    pixels = np.asarray(Image.open(next(data.glob("*/*.png"))).convert("RGB"), dtype=np.float32) / 127.5 - 1
    latents = encode_images(models, torch.from_numpy(pixels).permute(2, 0, 1)[None], None)
    base = _fixed_loss(models, None, latents)
    network, weights = para.create_network_from_weights(1.0, str(native), None, models.text_encoder_for_network,
                                                        models.unet)
    network.load_state_dict(weights, False)
    network.apply_to(models.text_encoder_for_network, models.unet, True, True)
    network.eval()
    trained = _fixed_loss(models, network, latents)
    assert trained < 0.9 * base, (trained, base)  # measured 1.15 vs 1.40


@pytest.mark.parametrize("model, option, message", [
    ("builtin:tiny-sd1", ["--guidance_scale", "1.0"], "--guidance_scale is a FLUX.1 option"),
    ("builtin:tiny-sd1", ["--timestep_sampling", "shift"], "--timestep_sampling is a FLUX.1 option"),
    ("builtin:tiny-flux", ["--min_snr_gamma", "5"], "--min_snr_gamma is a Stable Diffusion option"),
    ("builtin:tiny-flux", ["--v_parameterization"], "--v_parameterization is a Stable Diffusion option"),
    ("builtin:tiny-flux", ["--blocks_to_swap", "18"], "--blocks_to_swap is not supported"),
    ("builtin:tiny-flux", ["--model_type", "chroma"], "only FLUX.1 is implemented"),
    ("builtin:tiny-flux", ["--ae", "ae.safetensors"], "--ae goes with a BFL single-file transformer"),
])
def test_options_of_the_other_architecture_stop_the_run_with_one_line(tmp_path, capsys, model, option, message):
    from para_trainer.training.train import main as train_main

    data = _subject(tmp_path)
    code = train_main(["--pretrained_model_name_or_path", model, "--train_data_dir", str(data), "--resolution", "64",
                       "--caption_extension", ".txt",
                       "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", *option])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and not any("Traceback" in line for line in err)
    assert not list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True


def test_every_training_preset_parses():
    from para_trainer.training.args import parse_args

    names = [name for name in os.listdir(os.path.join(ROOT, "presets"))
             if name.endswith(".toml") and name != "lycoris_locon.toml"]  # that one is LyCORIS' own preset format
    assert "flux_subject.toml" in names
    for path in sorted(os.path.join(ROOT, "presets", name) for name in names):
        assert parse_args(["--config_file", path]).output_dir, path


# ---------------------------------------------------------------------------------------------------
# sd-scripts' four FLUX files (BFL transformer, LDM autoencoder, CLIP-L, T5-XXL)


@pytest.fixture(scope="module")
def bfl_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bfl")
    assert run_cli("tiny-model", "flux", folder, "--bfl") == 0
    return {name: folder / f"{name}.safetensors" for name in ("flux1", "ae", "clip_l", "t5xxl")}


def test_bfl_files_have_the_bfl_key_layout_and_load_as_the_same_model(flux, bfl_files):
    from para_trainer.models.flux.bfl import load_bfl_pipeline

    assert set(load_file(str(bfl_files["flux1"]))) == set(bfl_like(flux).state_dict())  # sd-scripts' module tree
    assert "encoder.down.0.block.0.conv1.weight" in load_file(str(bfl_files["ae"]))  # the LDM layout
    pipe = load_bfl_pipeline(*(str(bfl_files[n]) for n in ("flux1", "ae", "clip_l", "t5xxl")))
    inputs = transformer_inputs(flux)
    assert torch.equal(forward(pipe.transformer, inputs), forward(flux.transformer, inputs))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    prompt = "a photo of a red ball on the beach in the snow"
    with torch.no_grad():
        assert torch.equal(pipe.vae.encode(image).latent_dist.mean, flux.vae.encode(image).latent_dist.mean)
        latents = torch.randn(1, 16, 8, 8)
        assert torch.equal(pipe.vae.decode(latents).sample, flux.vae.decode(latents).sample)
        clip = flux.tokenizer([prompt], return_tensors="pt").input_ids
        assert torch.equal(pipe.text_encoder(clip).pooler_output, flux.text_encoder(clip).pooler_output)
        t5 = flux.tokenizer_2([prompt], return_tensors="pt").input_ids
        assert torch.equal(pipe.text_encoder_2(t5).last_hidden_state, flux.text_encoder_2(t5).last_hidden_state)


def test_our_trainer_and_export_take_sd_scripts_flux_files(bfl_files, tmp_path):
    from para_trainer.training.train import main as train_main

    parts = ["--ae", bfl_files["ae"], "--clip_l", bfl_files["clip_l"], "--t5xxl", bfl_files["t5xxl"]]
    data = _subject(tmp_path)
    assert train_main([str(a) for a in ["--pretrained_model_name_or_path", bfl_files["flux1"], *parts,
                                        "--train_data_dir", data, "--resolution", "64", "--caption_extension", ".txt",
                                        "--output_dir", tmp_path / "out", "--max_train_steps", "2",
                                        "--network_train_unet_only"]]) == 0
    with safe_open(str(tmp_path / "out" / "last.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "flux1"
    assert run_cli("export", tmp_path / "out" / "last.safetensors", "--model", bfl_files["flux1"], *parts,
                   "-o", tmp_path / "again_lora.safetensors") == 0
    ours, again = (load_file(str(p)) for p in (tmp_path / "out" / "last_lora.safetensors",
                                                tmp_path / "again_lora.safetensors"))
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)


@pytest.mark.parametrize("leave_out", ["ae", "clip_l", "t5xxl"])
def test_a_missing_flux_part_is_named_and_nothing_is_written(bfl_files, tmp_path, capsys, leave_out):
    from para_trainer.training.train import main as train_main

    parts = [a for name in ("ae", "clip_l", "t5xxl") if name != leave_out
             for a in (f"--{name}", str(bfl_files[name]))]
    code = train_main(["--pretrained_model_name_or_path", str(bfl_files["flux1"]), *parts, "--train_data_dir",
                       str(_subject(tmp_path)), "--resolution", "64", "--caption_extension", ".txt",
                       "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"need --{leave_out} too" in err[-1] and len(err) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_wrong_file_as_a_flux_part_is_named(bfl_files, tmp_path, capsys):
    code = run_cli("sample", "--model", bfl_files["flux1"], "--ae", bfl_files["clip_l"], "--clip_l",
                   bfl_files["clip_l"], "--t5xxl", bfl_files["t5xxl"], "--prompt", "a toy", "--out", tmp_path / "s")
    err = capsys.readouterr().err
    assert code == 2 and "--ae" in err and "holds no autoencoder" in err and "Traceback" not in err


def test_merged_flux_single_file_is_the_bfl_transformer_with_para_baked_in(bfl_files, tmp_path):
    from para_trainer.models.flux.bfl import load_bfl_pipeline

    parts = [str(bfl_files[n]) for n in ("ae", "clip_l", "t5xxl")]
    models = load_models(SimpleNamespace(pretrained_model_name_or_path=str(bfl_files["flux1"]), v2=False,
                                         v_parameterization=False, vae=None, ae=parts[0], clip_l=parts[1],
                                         t5xxl=parts[2]))
    network = _native_flux_file(tmp_path / "para.safetensors", models.pipeline)  # with lora_te1 layers
    code = run_cli("export", tmp_path / "para.safetensors", "--to", "merged", "--model", bfl_files["flux1"],
                   "--ae", parts[0], "--clip_l", parts[1], "--t5xxl", parts[2], "-o", tmp_path / "merged.safetensors")
    assert code == 2 and not (tmp_path / "merged.safetensors").exists()  # CLIP-L would change: folder only
    unet_only = _native_flux_file(tmp_path / "unet.safetensors", models.pipeline, exclude="^lora_te")
    assert run_cli("export", tmp_path / "unet.safetensors", "--to", "merged", "--model", bfl_files["flux1"],
                   "--ae", parts[0], "--clip_l", parts[1], "--t5xxl", parts[2],
                   "-o", tmp_path / "merged.safetensors") == 0
    merged = load_bfl_pipeline(str(tmp_path / "merged.safetensors"), *parts)
    inputs = transformer_inputs(models.pipeline)
    unet_only.apply_to(None, models.unet, False, True)
    unet_only.eval()
    assert (forward(merged.transformer, inputs) - forward(models.unet, inputs)).abs().max() < 1e-5
    del network


def test_hub_model_card_of_a_flux_adapter_names_flux_and_no_automatic1111(tmp_path):
    from para_trainer.hub import build_model_card

    pipe = build_tiny_flux(seed=0)
    network = para.create_network(1.0, 2, None, None, encoders(pipe), pipe.transformer)
    network.save_weights(str(tmp_path / "fx.safetensors"), None, {"ss_base_model_version": "flux1"})
    card = str(build_model_card({"fx.safetensors": str(tmp_path / "fx.safetensors")}, "me/fx"))
    assert "for FLUX.1" in card and "- flux" in card and "AUTOMATIC1111" not in card


def test_cache_text_encoder_outputs_trains_the_same_adapter_with_the_text_encoders_off_the_device(tmp_path,
                                                                                                   monkeypatch):
    """The cache holds what the encoders would return: a run with it writes the same adapter as one without, and
    the encoders are moved away (called to("cpu")) once the cache is built."""
    from para_trainer.training import train as train_module

    data = _subject(tmp_path)
    common = ["--pretrained_model_name_or_path", "builtin:tiny-flux", "--train_data_dir", str(data), "--resolution",
              "64", "--caption_extension", ".txt", "--max_train_steps", "3", "--network_train_unet_only",
              "--seed", "3", "--t5xxl_max_token_length", "16", "--caption_prefix", "high quality"]
    moved = []
    real_build = train_module.build_cache

    def spy(captions, encode):
        cache = real_build(captions, encode)
        moved.append(sorted(cache))
        return cache

    monkeypatch.setattr(train_module, "build_cache", spy)
    assert train_module.main(common + ["--output_dir", str(tmp_path / "plain")]) == 0
    assert not moved
    assert train_module.main(common + ["--output_dir", str(tmp_path / "cached"), "--cache_text_encoder_outputs"]) == 0
    assert moved == [["high quality a photo of sks toy"]]
    plain, cached = (load_file(str(tmp_path / d / "last.safetensors")) for d in ("plain", "cached"))
    assert plain.keys() == cached.keys()
    assert all(torch.allclose(plain[k], cached[k], atol=1e-5) for k in plain)


def test_krona_on_flux_acts_on_the_fused_layers_as_the_bfl_layout_does():
    """networks.krona's preset=full finds lora_flux's layers through the same naming; on diffusers' split layers its
    ΔW = A ⊗ B applies to the stacked (BFL-fused) weight."""
    from networks import krona

    pipe = build_tiny_flux(seed=0)
    network = krona.create_network(1.0, None, None, None, encoders(pipe), pipe.transformer, preset="full", a1="8",
                                   a2="4", exclude="^lora_te")
    names = {m.lora_name for m in network.unet_modules}
    assert {f"lora_unet_double_blocks_0_{l}" for l in DOUBLE_LAYERS} <= names and len(names) == 26
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    network.apply_to(encoders(pipe), pipe.transformer, False, True)
    network.eval()
    inputs = transformer_inputs(pipe)
    adapted = forward(pipe.transformer, inputs)
    reference = build_tiny_flux(seed=0)
    layers = {t.lora_name: t.layer for t in named_layers(None, reference.transformer)}
    for module in network.unet_modules:
        weight = layers[module.lora_name].weight
        set_layer_weight(layers[module.lora_name], weight + module.delta_weight().to(weight.dtype))
    assert (adapted - forward(reference.transformer, inputs)).abs().max() < 1e-5
    assert (adapted - forward(build_tiny_flux(seed=0).transformer, inputs)).abs().max() > 1e-3


def test_fp8_base_stores_the_transformer_in_fp8_and_trains_the_same_layers(tmp_path, monkeypatch):
    """--fp8_base: the transformer's Linear weights are held in float8_e4m3fn (diffusers' layerwise casting, set
    before the network hooks the layers), the steps' losses are finite, and the file (every module) is written —
    but no LoRA export from the fp8-rounded base: PaRa's LoRA form is exact only from the full-precision one,
    which `para-trainer export` then reads and gets the export the trainer would write without fp8."""
    from para_trainer.training import train as train_module

    seen = {}
    real_store = train_module.store_base_in_fp8

    def spy(network, models, weight_dtype):
        seen["fingerprint"] = network.file_metadata["para.base_fingerprint"]  # taken before: full precision
        real_store(network, models, weight_dtype)
        seen["dtypes"] = {p.dtype for n, p in models.unet.named_parameters() if n.endswith("to_k.weight")}

    monkeypatch.setattr(train_module, "store_base_in_fp8", spy)
    data = _subject(tmp_path)
    assert train_module.main(["--pretrained_model_name_or_path", "builtin:tiny-flux", "--train_data_dir", str(data),
                              "--resolution", "64", "--caption_extension", ".txt", "--max_train_steps", "2",
                              "--network_train_unet_only", "--fp8_base", "--mixed_precision", "bf16",
                              "--learning_rate", "1e-2", "--output_dir", str(tmp_path / "out")]) == 0
    assert seen["dtypes"] == {torch.float8_e4m3fn}
    trained = load_file(str(tmp_path / "out" / "last.safetensors"))
    fresh = para.create_network(1.0, 4, None, None, None, build_tiny_flux(seed=0).transformer)
    assert len(trained) == len(fresh.unet_modules)
    assert not (tmp_path / "out" / "last_lora.safetensors").exists()
    assert run_cli("export", tmp_path / "out" / "last.safetensors", "--model", "builtin:tiny-flux", "-o",
                   tmp_path / "lora.safetensors") == 0  # the file's fingerprint is the full-precision base's
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        assert f.metadata()["para.base_fingerprint"] == seen["fingerprint"]
    import csv
    import math

    with open(tmp_path / "out" / "last_train_log.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)


def test_fp8_base_on_sd_is_refused_by_name(tmp_path, capsys):
    from para_trainer.training.train import main as train_main

    code = train_main(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir",
                       str(_subject(tmp_path)), "--resolution", "64", "--caption_extension", ".txt",
                       "--max_train_steps", "1", "--fp8_base", "--mixed_precision", "bf16",
                       "--output_dir", str(tmp_path / "out")])
    assert code == 2 and "--fp8_base is implemented for FLUX.1 only" in capsys.readouterr().err
