"""FLUX.1 single files as sd-scripts reads them: the transformer in the BFL layout (flux1-dev.safetensors), the
autoencoder in the LDM layout (ae.safetensors), CLIP-L and T5-XXL with transformers' keys (clip_l.safetensors,
t5xxl_fp16.safetensors) — to diffusers models and back, at any width (diffusers' own BFL converter assumes 3072).

The transformer's layer correspondence is networks/adapter_base.py's (FLUX_DOUBLE_LAYERS, FLUX_SINGLE_LAYERS,
FLUX_EMBEDDERS: the tables the network module names its layers by); the norms and the final layer are here.
Configs are read off the tensors' shapes; what shapes do not tell (the attention heads of CLIP, RoPE's axes) follows
FLUX.1's and builtin:tiny-flux's rules.
"""

from __future__ import annotations

import torch

from networks.adapter_base import FLUX_DOUBLE_LAYERS, FLUX_EMBEDDERS, FLUX_SINGLE_LAYERS

PREFIXES = ("model.diffusion_model.",)  # ComfyUI-style full checkpoints carry the transformer under this
DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
FINAL = {"final_layer.linear": "proj_out"}  # and final_layer.adaLN_modulation.1 = norm_out.linear, halves swapped


class BflError(ValueError):
    """A file that is not the FLUX part it was given as."""


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _without_prefix(key: str) -> str:
    return next((key[len(p):] for p in PREFIXES if key.startswith(p)), key)


def _count(keys, prefix: str) -> int:
    numbers = {int(k[len(prefix):].split(".")[0]) for k in keys if k.startswith(prefix)}
    return max(numbers) + 1 if numbers else 0


def transformer_from_bfl(state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """(FluxTransformer2DModel config, its state dict) from a BFL-layout transformer state dict."""
    state = {_without_prefix(key): tensor for key, tensor in state.items()}
    if "img_in.weight" not in state or "double_blocks.0.img_attn.qkv.weight" not in state:
        raise BflError("holds no FLUX transformer in the BFL layout (no img_in / double_blocks.0.img_attn.qkv)")
    hidden, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    config = {"patch_size": 1, "in_channels": in_channels, "out_channels": None,
              "num_layers": _count(state, "double_blocks."), "num_single_layers": _count(state, "single_blocks."),
              "attention_head_dim": head_dim, "num_attention_heads": hidden // head_dim,
              "joint_attention_dim": state["txt_in.weight"].shape[1],
              "pooled_projection_dim": state["vector_in.in_layer.weight"].shape[1],
              "guidance_embeds": "guidance_in.in_layer.weight" in state,
              "axes_dims_rope": rope_axes(head_dim)}
    out = {}

    def move(bfl: str, paths: tuple[str, ...]):
        for suffix in ("weight", "bias"):
            tensor = state.pop(f"{bfl}.{suffix}", None)
            if tensor is None:
                continue
            sizes = _part_sizes(bfl, tensor.shape[0], hidden, len(paths))
            for path, chunk in zip(paths, tensor.split(sizes)):
                out[f"{path}.{suffix}"] = chunk.clone()

    for i in range(config["num_layers"]):
        for bfl, paths in FLUX_DOUBLE_LAYERS.items():
            move(f"double_blocks.{i}.{bfl}", tuple(f"transformer_blocks.{i}.{p}" for p in paths))
        for bfl, name in DOUBLE_NORMS.items():
            out[f"transformer_blocks.{i}.{name}"] = state.pop(f"double_blocks.{i}.{bfl}")
    for i in range(config["num_single_layers"]):
        for bfl, paths in FLUX_SINGLE_LAYERS.items():
            move(f"single_blocks.{i}.{bfl}", tuple(f"single_transformer_blocks.{i}.{p}" for p in paths))
        for bfl, name in SINGLE_NORMS.items():
            out[f"single_transformer_blocks.{i}.{name}"] = state.pop(f"single_blocks.{i}.{bfl}")
    for bfl, path in {**FLUX_EMBEDDERS, **FINAL}.items():
        move(bfl, (path,))
    for suffix in ("weight", "bias"):
        out[f"norm_out.linear.{suffix}"] = _swap_halves(state.pop(f"final_layer.adaLN_modulation.1.{suffix}"))
    if state:
        raise BflError(f"has {len(state)} tensors a FLUX transformer does not ({', '.join(sorted(state)[:3])}, ...)")
    return config, out


def transformer_to_bfl(model) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel's weights in the BFL layout (the inverse of transformer_from_bfl)."""
    state = model.state_dict()
    out = {}

    def move(bfl: str, paths: tuple[str, ...]):
        for suffix in ("weight", "bias"):
            parts = [state[f"{p}.{suffix}"] for p in paths if f"{p}.{suffix}" in state]
            if parts:
                out[f"{bfl}.{suffix}"] = torch.cat(parts).contiguous()

    for i in range(len(model.transformer_blocks)):
        for bfl, paths in FLUX_DOUBLE_LAYERS.items():
            move(f"double_blocks.{i}.{bfl}", tuple(f"transformer_blocks.{i}.{p}" for p in paths))
        for bfl, name in DOUBLE_NORMS.items():
            out[f"double_blocks.{i}.{bfl}"] = state[f"transformer_blocks.{i}.{name}"].contiguous()
    for i in range(len(model.single_transformer_blocks)):
        for bfl, paths in FLUX_SINGLE_LAYERS.items():
            move(f"single_blocks.{i}.{bfl}", tuple(f"single_transformer_blocks.{i}.{p}" for p in paths))
        for bfl, name in SINGLE_NORMS.items():
            out[f"single_blocks.{i}.{bfl}"] = state[f"single_transformer_blocks.{i}.{name}"].contiguous()
    for bfl, path in {**FLUX_EMBEDDERS, **FINAL}.items():
        move(bfl, (path,))
    for suffix in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap_halves(state[f"norm_out.linear.{suffix}"])
    return out


def _part_sizes(bfl: str, rows: int, hidden: int, parts: int) -> list[int]:
    if parts == 1:
        return [rows]
    if bfl.endswith("linear1"):  # q, k, v, then the MLP's input
        return [hidden, hidden, hidden, rows - 3 * hidden]
    return [rows // parts] * parts


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE's (t, h, w) dims: FLUX.1's (16, 56, 56) at head 128, else a quarter and three eighths twice."""
    return (16, 56, 56) if head_dim == 128 else (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)


# --------------------------------------------------------------------------------------------------
# The four files sd-scripts trains FLUX from


FLUX_AE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}  # FLUX.1's AE: z = 0.3611·(x − 0.1159)
REAL_CLIP_VOCAB, REAL_T5_VOCAB = 49408, 32128
REAL_TOKENIZERS = {"clip_l": "openai/clip-vit-large-patch14", "t5xxl": "google/t5-v1_1-xxl"}  # as sd-scripts


def _read(path: str, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, ValueError) as error:  # safetensors' own errors are ValueError subclasses or OSError
        raise BflError(f"--{what} {path}: cannot read it as .safetensors ({error})") from None


def ae_from_ldm(state: dict[str, torch.Tensor]):
    """AutoencoderKL from an LDM-layout FLUX autoencoder (ae.safetensors)."""
    from diffusers import AutoencoderKL

    from ..checkpoint import from_ldm, vae_layout

    if "encoder.conv_in.weight" not in state or "decoder.conv_out.weight" not in state:
        raise BflError("holds no autoencoder in the LDM layout (no encoder.conv_in / decoder.conv_out)")
    levels = _count(state, "encoder.down.")
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    config = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * levels,
              "up_block_types": ["UpDecoderBlock2D"] * levels, "block_out_channels": widths,
              "layers_per_block": _count(state, "encoder.down.0.block."), "act_fn": "silu",
              "latent_channels": state["encoder.conv_out.weight"].shape[0] // 2,
              "norm_num_groups": 32 if widths[0] % 32 == 0 else 8, "sample_size": 1024 if widths[0] >= 128 else 64,
              "use_quant_conv": "quant_conv.weight" in state, "use_post_quant_conv": "post_quant_conv.weight" in state,
              **FLUX_AE_FACTORS}
    model = AutoencoderKL(**config)
    model.load_state_dict(from_ldm(vae_layout(config), state))
    return model


def ae_to_ldm(vae) -> dict[str, torch.Tensor]:
    from ..checkpoint import to_ldm, vae_layout

    return {k: v.contiguous() for k, v in to_ldm(vae_layout(dict(vae.config)), vae.state_dict()).items()}


def clip_from_state(state: dict[str, torch.Tensor]):
    """CLIPTextModel from clip_l.safetensors (transformers' keys, with or without text_model.)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    state = {k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k: v
             for k, v in state.items()}
    if "text_model.embeddings.token_embedding.weight" not in state:
        raise BflError("holds no CLIP text model (no text_model.embeddings.token_embedding)")
    vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
    real = vocab == REAL_CLIP_VOCAB
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=_count(state, "text_model.encoder.layers."),
        intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=max(1, hidden // 64), hidden_act="quick_gelu",
        max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
        # CLIP-L's config pools at the highest token id (eos 2, the legacy rule); the tiny one at its eos
        bos_token_id=0 if real else vocab - 2, eos_token_id=2 if real else vocab - 1, pad_token_id=1 if real else vocab - 1)
    model = CLIPTextModel(config)
    state = {k: v for k, v in state.items() if not k.startswith("text_projection") and not k.endswith("position_ids")}
    inner = getattr(model, "text_model", None)
    if inner is None:  # transformers 5: no text_model level
        state = {k[len("text_model."):]: v for k, v in state.items()}
    model.load_state_dict(state)
    return model


def t5_from_state(state: dict[str, torch.Tensor]):
    """T5EncoderModel from t5xxl*.safetensors (transformers' keys)."""
    from transformers import T5Config, T5EncoderModel

    if "encoder.block.0.layer.0.SelfAttention.q.weight" not in state:
        raise BflError("holds no T5 encoder (no encoder.block.0.layer.0.SelfAttention.q)")
    embedding = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    vocab, d_model = embedding.shape
    buckets, heads = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    inner = state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads,
                      d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                      num_layers=_count(state, "encoder.block."), relative_attention_num_buckets=buckets,
                      feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new",
                      tie_word_embeddings=False, dropout_rate=0.0)
    model = T5EncoderModel(config)
    state = dict(state)
    state.setdefault("shared.weight", embedding)
    state.setdefault("encoder.embed_tokens.weight", embedding)
    model.load_state_dict(state, strict=False)
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise BflError(f"lacks T5 tensors ({', '.join(missing[:3])}, ...)")
    return model


def _tokenizers(clip_vocab: int, t5_vocab: int, cache_dir: str | None):
    from transformers import CLIPTokenizer, T5Tokenizer

    from ..tiny_tokenizer import TOKENIZER_DIR
    from .tiny import t5_tokenizer

    def real(name, loader):
        try:
            return loader.from_pretrained(REAL_TOKENIZERS[name], cache_dir=cache_dir)
        except OSError:
            raise BflError(f"the {name} tokenizer ({REAL_TOKENIZERS[name]}) is not in the Hugging Face cache and "
                           "cannot be downloaded; give --tokenizer_cache_dir where it is, as for sd-scripts") from None

    clip = real("clip_l", CLIPTokenizer) if clip_vocab == REAL_CLIP_VOCAB else \
        CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="<|endoftext|>")
    t5 = real("t5xxl", T5Tokenizer) if t5_vocab == REAL_T5_VOCAB else t5_tokenizer()
    return clip, t5


def load_bfl_pipeline(transformer: str, ae: str | None, clip_l: str | None, t5xxl: str | None,
                      torch_dtype=torch.float32, tokenizer_dir: str | None = None):
    """A FluxPipeline from sd-scripts' four files; one BflError naming what is missing or wrong."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    missing = [f"--{name}" for name, path in (("ae", ae), ("clip_l", clip_l), ("t5xxl", t5xxl)) if not path]
    if missing:
        raise BflError(f"{transformer} is a FLUX.1 transformer in the BFL layout: sd-scripts' FLUX files need "
                       f"{', '.join(missing)} too (the autoencoder, CLIP-L and T5-XXL files)")
    parts = {}
    for name, path, build in (("transformer", transformer, None), ("ae", ae, ae_from_ldm),
                              ("clip_l", clip_l, clip_from_state), ("t5xxl", t5xxl, t5_from_state)):
        option = "pretrained_model_name_or_path" if name == "transformer" else name
        state = _read(path, option)
        try:
            if build is None:
                config, weights = transformer_from_bfl(state)
                model = FluxTransformer2DModel(**config)
                model.load_state_dict(weights)
            else:
                model = build(state)
        except BflError as error:
            raise BflError(f"--{option} {path} {error}") from None
        parts[name] = torch.nn.Module.to(model.eval(), dtype=torch_dtype)
    clip_tokenizer, t5_tokenizer = _tokenizers(parts["clip_l"].config.vocab_size, parts["t5xxl"].config.vocab_size,
                                               tokenizer_dir)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=parts["ae"], text_encoder=parts["clip_l"],
                        tokenizer=clip_tokenizer, text_encoder_2=parts["t5xxl"], tokenizer_2=t5_tokenizer,
                        transformer=parts["transformer"])


def save_bfl_files(pipe, folder) -> dict[str, str]:
    """sd-scripts' four FLUX files of a pipeline: flux1.safetensors (BFL), ae.safetensors (LDM), clip_l and t5xxl."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip_state = pipe.text_encoder.state_dict()
    if not hasattr(pipe.text_encoder, "text_model"):  # transformers 5: write the keys every tool reads
        clip_state = {"text_model." + k: v for k, v in clip_state.items()}
    files = {"transformer": transformer_to_bfl(pipe.transformer), "ae": ae_to_ldm(pipe.vae),
             "clip_l": clip_state, "t5xxl": pipe.text_encoder_2.state_dict()}
    names = {"transformer": "flux1.safetensors", "ae": "ae.safetensors", "clip_l": "clip_l.safetensors",
             "t5xxl": "t5xxl.safetensors"}
    written = {}
    for part, state in files.items():
        path = folder / names[part]
        tmp = path.with_name(".tmp-" + path.name)
        if part == "t5xxl":
            state = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}  # = shared.weight
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(path)
        written[part] = str(path)
    return written
