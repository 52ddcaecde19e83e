"""The embedded tiny SD1 / SD2 / SDXL pipelines and their project-built tokenizer."""

import re
import string

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from para_trainer.models.tiny import (
    KINDS,
    TOKENIZER_DIR,
    build_real_text_encoder_on_meta,
    build_real_unet_on_meta,
    build_tiny_pipeline,
    read_tiny_config,
    real_text_encoder_config,
    real_unet_config,
    save_tiny_pipeline,
)
from para_trainer.models.tiny_tokenizer import bytes_to_unicode, tokenizer_files, write_tokenizer_files

TEXT_ENCODERS = {"sd1": ["text_encoder"], "sd2": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}
PROMPTS = ["a photo of sks dog, red background", "an oil painting of a city street at sunset"]


@pytest.fixture(scope="module")
def tiny_pipelines():
    return {kind: build_tiny_pipeline(kind) for kind in KINDS}


def model_state_dicts(pipeline) -> dict:
    return {
        name: component.state_dict()
        for name, component in pipeline.components.items()
        if isinstance(component, torch.nn.Module)
    }


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[model].keys() == b[model].keys() and all(torch.equal(a[model][k], b[model][k]) for k in a[model])
        for model in a
    )


def module_types(model, collapse: str | None = None) -> dict[str, str]:
    """Module name -> class name; ``collapse`` names a layer list whose indices become ``*``."""
    types = {}
    for name, module in model.named_modules():
        if collapse:
            name = re.sub(rf"\b{collapse}\.\d+", f"{collapse}.*", name)
        types[name] = type(module).__name__
    return types


@pytest.mark.parametrize("kind", KINDS)
def test_build_is_seeded_and_leaves_global_rng_alone(kind, tiny_pipelines):
    rng_state = torch.random.get_rng_state()
    again = model_state_dicts(build_tiny_pipeline(kind, seed=0))
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert state_dicts_equal(model_state_dicts(tiny_pipelines[kind]), again)

    other_seed = model_state_dicts(build_tiny_pipeline(kind, seed=1))
    for model, state in again.items():
        assert not any(torch.equal(v, other_seed[model][k]) for k, v in state.items() if v.std() > 0), model


@pytest.mark.parametrize("kind", KINDS)
def test_configs_are_consistent_with_tokenizer_and_each_other(kind, tiny_pipelines):
    pipeline = tiny_pipelines[kind]
    expected_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    assert type(pipeline) is expected_cls
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if kind == "sdxl" else [])
    text_configs = [getattr(pipeline, name).config for name in TEXT_ENCODERS[kind]]
    for tokenizer, config in zip(tokenizers, text_configs):
        assert config.vocab_size == len(tokenizer)
        assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
        assert config.pad_token_id == tokenizer.pad_token_id
        assert config.max_position_embeddings == tokenizer.model_max_length == 77
    # SD2 and SDXL's second (OpenCLIP) tokenizer pad with "!", like the real ones.
    assert [t.pad_token for t in tokenizers] == {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}[kind]

    unet = pipeline.unet.config
    assert unet.cross_attention_dim == sum(c.hidden_size for c in text_configs)
    if kind == "sdxl":
        assert unet.projection_class_embeddings_input_dim == text_configs[1].projection_dim + 6 * unet.addition_time_embed_dim
    assert pipeline.scheduler.config.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    assert pipeline.vae.config.scaling_factor == (0.13025 if kind == "sdxl" else 0.18215)
    assert pipeline.vae_scale_factor == 8


@pytest.mark.parametrize("kind", KINDS)
def test_generation_is_finite_and_follows_the_prompt(kind, tiny_pipelines):
    images = tiny_pipelines[kind](
        PROMPTS, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert images.shape == (2, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0.05  # a real picture, not a flat or fully clipped one
    assert np.abs(images[0] - images[1]).mean() > 0.01  # the text conditioning reaches the image


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_offline_reload_round_trip(kind, tiny_pipelines, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    directory = save_tiny_pipeline(kind, tmp_path / kind)
    assert sorted(p.name for p in directory.glob("*/*.safetensors"))  # weights saved as safetensors
    pipeline_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    reloaded = pipeline_cls.from_pretrained(directory)
    original = tiny_pipelines[kind]
    assert state_dicts_equal(model_state_dicts(original), model_state_dicts(reloaded))
    assert reloaded.scheduler.config.prediction_type == original.scheduler.config.prediction_type
    assert reloaded.tokenizer(PROMPTS[0]).input_ids == original.tokenizer(PROMPTS[0]).input_ids
    if kind == "sdxl":
        assert reloaded.tokenizer_2.pad_token == "!"


@pytest.mark.parametrize("kind", KINDS)
def test_unet_module_names_match_the_real_model(kind, tiny_pipelines):
    tiny_unet = tiny_pipelines[kind].unet
    names = module_types(tiny_unet)
    if kind == "sdxl":
        # The tiny SDXL has 1/2/2 transformer blocks per level where the real one has 1/2/10:
        # compare with the block index wildcarded; the tiny model still has transformer_blocks.1.
        assert module_types(tiny_unet, "transformer_blocks") == module_types(build_real_unet_on_meta(kind), "transformer_blocks")
        assert names["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == "Linear"
        assert names["down_blocks.1.attentions.0.proj_in"] == "Linear"
        assert "down_blocks.0.attentions.0.proj_in" not in names  # first level has no attention
        assert names["add_embedding.linear_1"] == "Linear"
    else:
        assert names == module_types(build_real_unet_on_meta(kind))
        assert names["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == "Linear"
        # SD1's attention projections are 1x1 convolutions, SD2's are linear layers.
        assert names["down_blocks.0.attentions.0.proj_in"] == {"sd1": "Conv2d", "sd2": "Linear"}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_text_encoder_module_names_match_the_real_model(kind, tiny_pipelines):
    for name, real_config in zip(TEXT_ENCODERS[kind], real_text_encoder_config(kind)):
        tiny = getattr(tiny_pipelines[kind], name)
        assert type(tiny).__name__ == real_config["architectures"][0]
        assert module_types(tiny, "layers") == module_types(build_real_text_encoder_on_meta(real_config), "layers")
        prefix = "text_model." if name == "text_encoder_2" else ""  # transformers 5: only WithProjection has .text_model
        assert module_types(tiny)[prefix + "encoder.layers.0.self_attn.q_proj"] == "Linear"


def test_real_configs_have_the_published_parameter_counts():
    unet_params = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}
    text_params = {"sd1": [123_060_480], "sd2": [340_387_840], "sdxl": [123_060_480, 694_659_840]}
    for kind in KINDS:
        assert sum(p.numel() for p in build_real_unet_on_meta(kind).parameters()) == unet_params[kind]
        counts = [sum(p.numel() for p in build_real_text_encoder_on_meta(c).parameters()) for c in real_text_encoder_config(kind)]
        assert counts == text_params[kind]
    assert real_unet_config("sdxl")["transformer_layers_per_block"] == [1, 2, 10]
    assert read_tiny_config("sd1", "unet")["use_linear_projection"] is False
    with pytest.raises(ValueError):
        real_unet_config("sd3")


def test_tokenizer_generator_reproduces_committed_files(tmp_path):
    write_tokenizer_files(tmp_path)
    committed = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    assert committed == sorted(tokenizer_files()) == sorted(p.name for p in tmp_path.iterdir())
    for name in committed:
        assert (tmp_path / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_tokenizer_encodes_any_ascii_prompt_without_unknown_tokens():
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = tokenizer("a photo of sks dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[:7] == [tokenizer.bos_token_id, *tokenizer("a photo of sks dog", add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    assert len(ids) - ids.count(tokenizer.pad_token_id) == 6  # caption words are single tokens (BPE merges)

    prompt = string.printable.strip() + " Sks DOG, red background!"
    body = tokenizer(prompt, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in body
    byte_of = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    text = "".join(tokenizer.convert_ids_to_tokens(body)).replace("</w>", "")
    assert bytes(byte_of[c] for c in text).decode() == re.sub(r"\s", "", prompt.lower())

    truncated = tokenizer("dog " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(truncated) == 77 and truncated[-1] == tokenizer.eos_token_id
