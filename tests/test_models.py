"""The trainer's prompt encoding equals what the diffusers pipelines condition on at inference."""

from types import SimpleNamespace

import pytest
import torch

from para_trainer.models.loading import ModelError, StableDiffusionModels, encode_prompts, load_models
from para_trainer.models.tiny import build_tiny_pipeline

CAPTIONS = ["a photo of sks toy, on a blue background", "a toy"]


def test_sd1_encoding_equals_the_pipelines_and_long_prompts_use_windows():
    pipe = build_tiny_pipeline("sd1")
    models = StableDiffusionModels(pipe, "sd1", False, "builtin:tiny-sd1")
    with torch.no_grad():
        hidden, added = encode_prompts(models, CAPTIONS)
        expected, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
        long_hidden, _ = encode_prompts(models, CAPTIONS, max_token_length=150)
    assert added is None and torch.equal(hidden, expected)
    assert long_hidden.shape == (2, 152, pipe.text_encoder.config.hidden_size)  # bos + 2 x 75 + eos, as sd-scripts
    assert torch.equal(long_hidden[:, 1:76], hidden[:, 1:76])  # the first window is the plain encoding


def test_sdxl_encoding_equals_the_pipelines():
    pipe = build_tiny_pipeline("sdxl")
    models = StableDiffusionModels(pipe, "sdxl", False, "builtin:tiny-sdxl")
    with torch.no_grad():
        hidden, added = encode_prompts(models, CAPTIONS)
        expected, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(hidden, expected, atol=1e-6)
    assert torch.allclose(added["text_embeds"], pooled, atol=1e-6)


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm():
    pipe = build_tiny_pipeline("sd1")
    models = StableDiffusionModels(pipe, "sd1", False, "builtin:tiny-sd1")
    ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden, _ = encode_prompts(models, CAPTIONS, clip_skip=2)
        layers = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        expected = pipe.text_encoder.final_layer_norm(layers[-2])
    assert torch.equal(hidden, expected)


def args(**kw):
    base = dict(pretrained_model_name_or_path=None, v2=False, v_parameterization=False, sdxl=False, vae=None)
    return SimpleNamespace(**(base | kw))


@pytest.mark.parametrize("name, kind, version", [("builtin:tiny-sd1", "sd1", "sd_v1"),
                                                 ("builtin:tiny-sd2", "sd2", "sd_v2_v"),
                                                 ("builtin:tiny-sdxl", "sdxl", "sdxl_base_v1-0")])
def test_builtin_models_and_their_versions(name, kind, version):
    models = load_models(args(pretrained_model_name_or_path=name))
    assert models.kind == kind and models.base_model_version == version
    assert not any(p.requires_grad for p in models.unet.parameters())


@pytest.mark.parametrize("kw, message", [
    (dict(pretrained_model_name_or_path="builtin:tiny-sd3"), "unknown built-in model"),
    (dict(pretrained_model_name_or_path="builtin:tiny-sd1", sdxl=True), "not an SDXL model"),
    (dict(pretrained_model_name_or_path="builtin:tiny-sdxl", v2=True), "--v2 cannot be used"),
    (dict(), "--pretrained_model_name_or_path is required"),
])
def test_model_errors(kw, message):
    with pytest.raises(ModelError, match=message):
        load_models(args(**kw))
