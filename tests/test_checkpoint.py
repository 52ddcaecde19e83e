"""Single-file (A1111 / LDM layout) checkpoints: saving, loading, and agreement with diffusers' own converter."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from para_trainer.models import checkpoint
from para_trainer.models.checkpoint import CheckpointError, load_single_file, save_single_file
from para_trainer.models.tiny import (
    KINDS,
    build_tiny_pipeline,
    read_tiny_config,
    real_text_encoder_config,
    real_unet_config,
    save_tiny_pipeline,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def pipes():
    return {kind: build_tiny_pipeline(kind, seed=3) for kind in KINDS}


@pytest.fixture(scope="module")
def saved(pipes, tmp_path_factory):
    """Each tiny pipeline written as <kind>.safetensors (kind inferred, as callers will mostly leave it out)."""
    directory = tmp_path_factory.mktemp("single")
    return {kind: save_single_file(pipe, directory / f"{kind}.safetensors") for kind, pipe in pipes.items()}


def assert_same_weights(original, loaded):
    for name in COMPONENTS:
        model = getattr(original, name, None)
        if model is None:
            assert getattr(loaded, name, None) is None
            continue
        expected, actual = model.state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == actual.keys(), name
        for key, tensor in expected.items():
            assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), f"{name}.{key}"


def unet_output(pipe, kind):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    extra = None
    if kind == "sdxl":
        extra = {"text_embeds": torch.randn(1, 64, generator=generator),
                 "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        return pipe.unet(sample, 500, context, added_cond_kwargs=extra).sample


# --------------------------------------------------------------------------------------------------------------
# The layout written


def test_sd1_keys_are_the_original_layout(pipes, saved):
    pipe, sd = pipes["sd1"], load_file(saved["sd1"])
    unet, vae, te = pipe.unet, pipe.vae, pipe.text_encoder
    expected = {
        "model.diffusion_model.time_embed.0.weight": unet.time_embedding.linear_1.weight,
        "model.diffusion_model.input_blocks.0.0.weight": unet.conv_in.weight,
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": unet.down_blocks[0].resnets[0].norm1.weight,
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
            unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
        "model.diffusion_model.input_blocks.3.0.op.weight": unet.down_blocks[0].downsamplers[0].conv.weight,
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight":
            unet.down_blocks[1].resnets[0].conv_shortcut.weight,
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": unet.down_blocks[3].resnets[1].conv2.weight,
        "model.diffusion_model.middle_block.1.proj_in.weight": unet.mid_block.attentions[0].proj_in.weight,
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": unet.mid_block.resnets[1].time_emb_proj.weight,
        "model.diffusion_model.output_blocks.2.1.conv.weight": unet.up_blocks[0].upsamplers[0].conv.weight,
        "model.diffusion_model.output_blocks.5.2.conv.weight": unet.up_blocks[1].upsamplers[0].conv.weight,
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": unet.up_blocks[3].attentions[2].proj_out.weight,
        "model.diffusion_model.out.0.weight": unet.conv_norm_out.weight,
        "model.diffusion_model.out.2.weight": unet.conv_out.weight,
        "first_stage_model.encoder.down.0.block.0.conv1.weight": vae.encoder.down_blocks[0].resnets[0].conv1.weight,
        "first_stage_model.encoder.down.1.downsample.conv.weight":
            vae.encoder.down_blocks[1].downsamplers[0].conv.weight,
        "first_stage_model.encoder.mid.block_2.norm2.weight": vae.encoder.mid_block.resnets[1].norm2.weight,
        "first_stage_model.encoder.norm_out.weight": vae.encoder.conv_norm_out.weight,
        # diffusers numbers the decoder's blocks from the bottom, LDM from the top
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight":
            vae.decoder.up_blocks[3].resnets[0].conv_shortcut.weight,
        "first_stage_model.decoder.up.3.upsample.conv.weight": vae.decoder.up_blocks[0].upsamplers[0].conv.weight,
        "first_stage_model.decoder.mid.attn_1.norm.weight": vae.decoder.mid_block.attentions[0].group_norm.weight,
        "first_stage_model.quant_conv.weight": vae.quant_conv.weight,
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight":
            te.encoder.layers[0].self_attn.q_proj.weight,
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight":
            te.embeddings.token_embedding.weight,
        "cond_stage_model.transformer.text_model.final_layer_norm.bias": te.final_layer_norm.bias,
    }
    for key, tensor in expected.items():
        assert torch.equal(sd[key], tensor), key
    # LDM's VAE attention is made of 1x1 convolutions
    q = vae.encoder.mid_block.attentions[0].to_q.weight
    assert torch.equal(sd["first_stage_model.encoder.mid.attn_1.q.weight"], q[:, :, None, None])
    layout_prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(layout_prefixes) for k in sd)
    assert len(sd) == sum(len(m.state_dict()) for m in (unet, vae, te))
    with safe_open(saved["sd1"], "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    assert metadata["modelspec.prediction_type"] == "epsilon"


def test_sd2_text_encoder_is_open_clip(pipes, saved):
    te, sd = pipes["sd2"].text_encoder, load_file(saved["sd2"])
    attention = te.encoder.layers[0].self_attn
    prefix = "cond_stage_model.model."
    assert torch.equal(sd[prefix + "transformer.resblocks.0.attn.in_proj_weight"],
                       torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
    assert torch.equal(sd[prefix + "transformer.resblocks.0.attn.in_proj_bias"],
                       torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]))
    layer = te.encoder.layers[1]
    assert torch.equal(sd[prefix + "transformer.resblocks.1.ln_1.weight"], layer.layer_norm1.weight)
    assert torch.equal(sd[prefix + "transformer.resblocks.1.mlp.c_fc.weight"], layer.mlp.fc1.weight)
    assert torch.equal(sd[prefix + "transformer.resblocks.1.mlp.c_proj.bias"], layer.mlp.fc2.bias)
    assert torch.equal(sd[prefix + "transformer.resblocks.1.attn.out_proj.weight"], layer.self_attn.out_proj.weight)
    assert torch.equal(sd[prefix + "token_embedding.weight"], te.embeddings.token_embedding.weight)
    assert torch.equal(sd[prefix + "positional_embedding"], te.embeddings.position_embedding.weight)
    assert torch.equal(sd[prefix + "ln_final.weight"], te.final_layer_norm.weight)
    # SD2 conditions on OpenCLIP's penultimate layer: the file gets a stand-in last layer, as sd-scripts writes
    assert torch.equal(sd[prefix + "transformer.resblocks.2.attn.in_proj_weight"],
                       sd[prefix + "transformer.resblocks.1.attn.in_proj_weight"])
    assert sd[prefix + "text_projection"].shape == (48, 48)
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd)
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2  # SD2's Linear projections
    with safe_open(saved["sd2"], "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-v2-768-v"


def test_sdxl_keys_are_the_sgm_layout(pipes, saved):
    pipe, sd = pipes["sdxl"], load_file(saved["sdxl"])
    unet, te2 = pipe.unet, pipe.text_encoder_2
    expected = {
        "model.diffusion_model.label_emb.0.0.weight": unet.add_embedding.linear_1.weight,
        "model.diffusion_model.label_emb.0.2.bias": unet.add_embedding.linear_2.bias,
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": unet.down_blocks[0].resnets[0].conv1.weight,
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight":
            unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight,
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight":
            unet.down_blocks[2].attentions[0].transformer_blocks[1].attn2.to_k.weight,
        "model.diffusion_model.output_blocks.2.2.conv.weight": unet.up_blocks[0].upsamplers[0].conv.weight,
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight":
            unet.up_blocks[2].resnets[2].conv_shortcut.weight,
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight":
            pipe.text_encoder.encoder.layers[0].self_attn.q_proj.weight,
        "conditioner.embedders.1.model.ln_final.bias": te2.text_model.final_layer_norm.bias,
        # OpenCLIP projects with x @ text_projection, transformers with a Linear: the transpose
        "conditioner.embedders.1.model.text_projection": te2.text_projection.weight.T,
    }
    for key, tensor in expected.items():
        assert torch.equal(sd[key], tensor), key
    attention = te2.text_model.encoder.layers[1].self_attn
    assert torch.equal(sd["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"],
                       torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" not in sd  # no stand-in
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" not in sd  # SDXL's first level has no attention
    with safe_open(saved["sdxl"], "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


# --------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("kind", KINDS)
def test_safetensors_round_trip(kind, pipes, saved):
    loaded = load_single_file(saved[kind], v2=kind == "sd2")
    assert type(loaded) is type(pipes[kind])
    assert_same_weights(pipes[kind], loaded)
    assert torch.equal(unet_output(loaded, kind), unet_output(pipes[kind], kind))
    # the file's ModelSpec says the tiny SD2 predicts v
    expected_prediction = "v_prediction" if kind == "sd2" else "epsilon"
    assert loaded.scheduler.config.prediction_type == expected_prediction
    assert loaded.vae.config.scaling_factor == read_tiny_config(kind, "vae")["scaling_factor"]
    assert loaded.tokenizer("a photo").input_ids == pipes[kind].tokenizer("a photo").input_ids
    assert loaded.tokenizer.pad_token == pipes[kind].tokenizer.pad_token
    if kind == "sdxl":
        assert loaded.tokenizer_2.pad_token == "!"


def test_ckpt_round_trip_is_read_with_weights_only(pipes, tmp_path, monkeypatch):
    path = save_single_file(pipes["sdxl"], tmp_path / "model.ckpt", kind="sdxl")
    assert list(torch.load(path, weights_only=True)) == ["state_dict"]
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_single_file(path, sdxl=True)
    assert calls == [True]
    assert_same_weights(pipes["sdxl"], loaded)
    assert loaded.scheduler.config.prediction_type == "epsilon"
    assert load_single_file(path, v_parameterization=True).scheduler.config.prediction_type == "v_prediction"


def test_bare_state_dict_ckpt_and_clip_without_text_model_level(pipes, saved, tmp_path):
    """A bare-state-dict .ckpt with variations found in the wild: CLIP keys without 'text_model.', Linear VAE
    attention weights, position ids, EMA leftovers."""
    sd = load_file(saved["sd1"])
    sd = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
          for k, v in sd.items()}
    sd["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model_ema.decay"] = torch.tensor(0.9999)  # outside every component: ignored
    for key in [k for k in sd if k.startswith("first_stage_model.") and ".mid.attn_1.q.weight" in k]:
        sd[key] = sd[key][:, :, 0, 0]  # VAE attention stored as Linear weights, as some converters write it
    torch.save(sd, tmp_path / "bare.ckpt")
    assert_same_weights(pipes["sd1"], load_single_file(tmp_path / "bare.ckpt"))


def test_save_precision(pipes, tmp_path):
    path = save_single_file(pipes["sd1"], tmp_path / "half.safetensors", dtype="fp16")
    sd = load_file(path)
    assert {t.dtype for t in sd.values()} == {torch.float16}
    loaded = load_single_file(path)
    weight = pipes["sd1"].unet.conv_in.weight
    assert loaded.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(loaded.unet.conv_in.weight, weight.half().float())
    assert not torch.equal(weight.half().float(), weight)  # so the check above is about the cast


def test_diffusers_reads_our_files_the_same(pipes, saved, tmp_path):
    """Independent check of the layout: diffusers' own single-file loader gives the same tensors."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    for kind in KINDS:
        config = save_tiny_pipeline(kind, tmp_path / kind, seed=3)
        pipeline_class = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
        extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        theirs = pipeline_class.from_single_file(str(saved[kind]), config=str(config), local_files_only=True, **extra)
        assert_same_weights(pipes[kind], theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_converters_agree_with_our_layout(kind, pipes, saved):
    """diffusers' LDM -> diffusers conversion functions invert what save_single_file wrote, for every kind."""
    from diffusers.loaders import single_file_utils as sfu

    pipe, sd = pipes[kind], load_file(saved[kind])
    unet = sfu.convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config))
    vae = sfu.convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config))
    for theirs, model in ((unet, pipe.unet), (vae, pipe.vae)):
        ours = model.state_dict()
        assert theirs.keys() == ours.keys()
        assert all(torch.equal(theirs[k], ours[k]) for k in ours)
    open_clip = {"sd2": ("cond_stage_model.model.", pipe.text_encoder),
                 "sdxl": ("conditioner.embedders.1.model.", getattr(pipe, "text_encoder_2", None))}
    if kind in open_clip:
        prefix, model = open_clip[kind]
        theirs = sfu.convert_open_clip_checkpoint(model, sd, prefix=prefix)
        ours = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
                for k, v in model.state_dict().items()}
        assert all(torch.equal(theirs[k], ours[k]) for k in ours)


# --------------------------------------------------------------------------------------------------------------
# Errors


def test_truncated_files_give_one_clear_error(saved, pipes, tmp_path):
    ckpt = save_single_file(pipes["sd1"], tmp_path / "whole.ckpt")
    for source in (saved["sd1"], ckpt):
        data = source.read_bytes()
        broken = tmp_path / f"broken{source.suffix}"
        broken.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated") as error:
            load_single_file(broken)
        assert str(broken) in str(error.value) and "\n" not in str(error.value)


def test_unrelated_tensors_give_one_clear_error(tmp_path):
    save_file({"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=r"not a Stable Diffusion checkpoint.*model\.diffusion_model"):
        load_single_file(tmp_path / "other.safetensors")


def test_unknown_shape_names_the_key(saved, tmp_path):
    sd = load_file(saved["sd1"])
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.zeros(32, 9, 3, 3)  # an inpainting UNet's 9 input channels
    save_file(sd, tmp_path / "inpaint.safetensors")
    with pytest.raises(CheckpointError, match=rf"{key} \(shape \[32, 9, 3, 3\]\) matches no known unet"):
        load_single_file(tmp_path / "inpaint.safetensors")


def test_missing_tensor_is_named(saved, tmp_path):
    sd = load_file(saved["sdxl"])
    del sd["first_stage_model.decoder.conv_out.weight"]
    save_file(sd, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"first_stage_model\.decoder\.conv_out\.weight is missing"):
        load_single_file(tmp_path / "partial.safetensors")


def test_checkpoint_without_vae_is_refused(saved, tmp_path):
    sd = {k: v for k, v in load_file(saved["sd1"]).items() if not k.startswith("first_stage_model.")}
    save_file(sd, tmp_path / "no_vae.safetensors")
    with pytest.raises(CheckpointError, match=r"has no vae tensors \(first_stage_model\.\*\)"):
        load_single_file(tmp_path / "no_vae.safetensors")


class _NotATensor:
    pass


def test_ckpt_with_pickled_objects_is_refused(tmp_path):
    torch.save({"state_dict": {}, "trainer": _NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_single_file(tmp_path / "pickled.ckpt")


def test_model_kind_flags(saved, caplog):
    with pytest.raises(CheckpointError, match="--v2 was given but .* SD1"):
        load_single_file(saved["sd1"], v2=True)
    with pytest.raises(CheckpointError, match="--sdxl was given"):
        load_single_file(saved["sd2"], sdxl=True)
    with pytest.raises(CheckpointError, match="SDXL checkpoint"):
        load_single_file(saved["sdxl"], v2=True)
    with caplog.at_level(logging.WARNING, logger="para_trainer.models.checkpoint"):
        pipe = load_single_file(saved["sd2"])  # detected without --v2, with a warning
    assert "--v2 was not given" in caplog.text
    assert pipe.text_encoder.config.hidden_act == "gelu"


def test_failed_write_leaves_the_old_file(pipes, tmp_path, monkeypatch):
    path = save_single_file(pipes["sd1"], tmp_path / "model.safetensors")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_single_file(pipes["sd2"], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left behind


# --------------------------------------------------------------------------------------------------------------
# Full-size models: configs and shape matching (built on the meta device, so no memory is used)


@pytest.mark.parametrize("kind", KINDS)
def test_real_configs_match_the_real_models(kind):
    directory = checkpoint.REAL_CONFIG_DIR / kind
    unet = json.loads((directory / "unet.json").read_text())
    assert {k: v for k, v in unet.items() if k != "_class_name"} == real_unet_config(kind)
    for name, expected in zip(("text_encoder", "text_encoder_2"), real_text_encoder_config(kind)):
        config = json.loads((directory / f"{name}.json").read_text())
        assert {k: config[k] for k in expected} == expected
    vae = json.loads((directory / "vae.json").read_text())
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["latent_channels"] == 4
    assert vae["scaling_factor"] == (0.13025 if kind == "sdxl" else 0.18215)


REAL_SHAPES = {
    "sd1": {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768)},
    "sd2": {"model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.text_projection": (1024, 1024)},
    "sdxl": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
             "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280)},
}


@pytest.mark.parametrize("kind", KINDS)
def test_real_checkpoint_shapes_are_recognised(kind):
    """The LDM shapes of each full-size model (as in the released files) select its real config, not the tiny one."""
    shapes = {}
    for component, prefix in checkpoint.COMPONENTS[kind]:
        for key, shape in checkpoint._expected_shapes("real", kind, component).items():
            shapes[prefix + key] = shape
    for key, shape in REAL_SHAPES[kind].items():
        assert shapes[key] == shape, key
    for component, prefix in checkpoint.COMPONENTS[kind]:
        weights = {k[len(prefix):]: torch.empty(s, device="meta") for k, s in shapes.items() if k.startswith(prefix)}
        assert checkpoint._match_config("real.safetensors", kind, component, prefix, weights) == "real"
        # and loading maps every LDM tensor back onto the real model's parameter of the same shape
        config = checkpoint._read_config("real", kind, component)
        with torch.device("meta"):
            model = checkpoint._new_model(config)
        layout = checkpoint.component_layout(kind, component, config, checkpoint._has_projection(config))
        loaded = checkpoint.from_ldm(layout, weights)
        params = checkpoint._with_text_model_prefix(model.state_dict(), component)
        assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in params.items()}
    if kind == "sd2":  # files written by diffusers' converter lack the stand-in 24th layer; they load too
        prefix = "cond_stage_model.model."
        weights = {k[len(prefix):]: torch.empty(s, device="meta") for k, s in shapes.items()
                   if k.startswith(prefix) and ".resblocks.23." not in k}
        assert checkpoint._match_config("real.safetensors", kind, "text_encoder", prefix, weights) == "real"


def _write_full_size_vocabulary(folder):
    """A CLIP tokenizer folder with the real vocabulary size (49408), from the tiny vocabulary plus fillers."""
    tiny = checkpoint.TOKENIZER_DIR
    vocab = json.loads((tiny / "vocab.json").read_text())
    special = [t for t in vocab if t.startswith("<|")]
    words = [t for t in vocab if not t.startswith("<|")]
    words += [f"filler{i}</w>" for i in range(49406 - len(words))]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(words + special)}))
    for name in ("merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((tiny / name).read_bytes())


def test_real_model_tokenizers(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "TOKENIZER_SOURCES",
                        {key: [("para-trainer-tests/not-cached", None)] for key in checkpoint.TOKENIZER_SOURCES})
    with pytest.raises(CheckpointError, match="tokenizer is not available offline.*para-trainer-tests/not-cached"):
        checkpoint._load_tokenizer("real.safetensors", "sdxl", 1, "real", None)
    # sd-scripts' --tokenizer_cache_dir layout: <dir>/<repo id with _ for />
    _write_full_size_vocabulary(tmp_path / "para-trainer-tests_not-cached")
    tokenizer = checkpoint._load_tokenizer("real.safetensors", "sdxl", 1, "real", tmp_path)
    assert len(tokenizer) == 49408 and tokenizer.pad_token == "!"
    assert tokenizer("a photo").input_ids[0] == 49406
