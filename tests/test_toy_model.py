"""builtin:toy-sd1 and the judge: shipped in the repository, loaded through every path tiny-sd1 supports with
nothing downloaded, and they really know the toy world (thresholds well below the measured rates)."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import toml
import torch
from safetensors import safe_open

from networks import para
from para_trainer.models import tiny as tiny_models
from para_trainer.models.loading import load_models
from para_trainer.toyworld import model as toy
from para_trainer.toyworld.concepts import CONCEPTS, random_concept_scene
from para_trainer.toyworld.dataset import concept_scenes, render_all, world_scenes
from para_trainer.toyworld.evaluate import sample, score
from para_trainer.toyworld.judge import WEIGHTS, HEADS, accuracy, load_judge
from para_trainer.toyworld.world import prompt

TOY = "builtin:toy-sd1"
IDENTITY_RISE = 0.1  # measured 2026-12-07 on the step-14,800 model: -0.16 -> 0.12 (+0.28), 2-core CPU machine
ROOT = Path(__file__).resolve().parents[1]


def model_args(source=TOY):
    return SimpleNamespace(pretrained_model_name_or_path=source, v2=False, v_parameterization=False, vae=None)


@pytest.fixture(scope="module")
def models():
    return load_models(model_args())


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_shipped_weights_are_fp16_and_within_the_budget():
    files = [f for f in toy.TOY_DIR.rglob("*") if f.is_file()] + [WEIGHTS]
    assert sum(f.stat().st_size for f in files) <= 30_000_000
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) == 4  # unet, vae, text encoder, judge
    for path in weights:
        with safe_open(str(path), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes <= {"F16", "I64"}, (path, dtypes)


def test_folder_is_a_diffusers_sd1_pipeline_with_the_generated_tokenizer(models):
    folder = toy.TOY_DIR
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    for name, text in toy.toy_tokenizer_files().items():
        assert (folder / "tokenizer" / name).read_bytes() == text.encode()
    unet_config = toy.component_config("unet")
    assert {k: unet_config[k] for k in toy.UNET_CONFIG} == toy.UNET_CONFIG | {"_class_name": "UNet2DConditionModel"}
    scheduler_config = toy.component_config("scheduler")
    assert {k: scheduler_config[k] for k in toy.SCHEDULER_CONFIG} == toy.SCHEDULER_CONFIG
    assert models.kind == "sd1" and not models.v_parameterization
    tokenizer, encoder = models.tokenizers[0], models.text_encoders[0]
    assert encoder.config.vocab_size == len(tokenizer)
    assert (encoder.config.bos_token_id, encoder.config.eos_token_id) == (tokenizer.bos_token_id,
                                                                           tokenizer.eos_token_id)
    # every word of the world is one token
    ids = tokenizer("a photo of a small purple polka dot pyramid at the bottom right, snowy background").input_ids
    assert len(ids) == 2 + 16
    # the VAE's scaling factor is the recipe's (1 / the RMS of posterior means and stds together), recomputed here
    # on fresh renders: the UNet was trained on latents scaled by it, so a file with another factor draws wrongly
    images = torch.from_numpy(render_all(world_scenes(64, seed=5), workers=1)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        posterior = models.vae.encode(images / 127.5 - 1).latent_dist
    spread = float(torch.cat([posterior.mean, posterior.std]).pow(2).mean().sqrt())
    assert models.latent_scale == pytest.approx(1 / spread, rel=0.1)


def test_sd_scripts_keys_are_sd15s(models):
    real_unet = tiny_models.build_real_unet_on_meta("sd1")
    [real_config] = tiny_models.real_text_encoder_config("sd1")
    real_text = tiny_models.build_real_text_encoder_on_meta(real_config)
    for preset in ("full", "exca"):
        toy_network = para.create_network(1.0, 2, None, None, models.text_encoders[0], models.unet, preset=preset)
        real_network = para.create_network(1.0, 2, None, None, real_text, real_unet, preset=preset)
        toy_unet = {m.lora_name for m in toy_network.unet_modules}
        assert toy_unet == {m.lora_name for m in real_network.unet_modules}, preset
        toy_te = {m.lora_name for m in toy_network.text_encoder_modules}
        assert toy_te <= {m.lora_name for m in real_network.text_encoder_modules}


def test_single_file_and_folder_load_the_same_weights(models, tmp_path):
    from para_trainer.models.checkpoint import save_single_file

    single = save_single_file(models.pipeline, tmp_path / "toy-sd1.safetensors")
    for source in (str(single), str(toy.TOY_DIR)):
        other = load_models(model_args(source))
        assert other.kind == "sd1"
        for name in ("unet", "vae"):
            mine, theirs = getattr(models, name).state_dict(), getattr(other, name).state_dict()
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
        ids = models.tokenizers[0]("a photo of sks toy").input_ids
        assert other.tokenizers[0]("a photo of sks toy").input_ids == ids


def test_the_judge_knows_fresh_renders(judge):
    scenes = world_scenes(240, seed=77, allow_held_out=True) + concept_scenes(120, seed=77)
    result = accuracy(judge, render_all(scenes, workers=1), scenes)
    assert set(result) == set(HEADS)
    assert min(result.values()) >= 0.95, result  # measured >= 0.98 on 4,500 renders (README)


def test_identity_embedding_separates_concepts(judge):
    rng = random.Random(3)
    names = list(CONCEPTS)
    embedded = {n: judge.embed(render_all([random_concept_scene(n, rng) for _ in range(12)], workers=1))
                for n in names}
    for name in names:
        own = float((embedded[name] @ embedded[name].T).mean())
        others = max(float((embedded[name] @ embedded[other].T).mean()) for other in names if other != name)
        assert own > others + 0.2, name


def test_toy_sd1_draws_what_the_prompt_says(models, judge):
    """Seeded samples, judged. On these 12 samples toy-sd1 was measured (2026-12-07) at shape 12/12, colour 12/12,
    size 12/12, background 9/12 and position 8/12. The thresholds keep a wide margin and stay well above chance
    (colour 1/8, size 1/2, background 1/6, object 1/11, position 1/5): a wrong latent scale, scheduler or text
    encoder drops them to chance."""
    prompts = [("ball", "red", "grass", "center"), ("box", "blue", "snow", "top left"),
               ("star", "yellow", "night", "center"), ("heart", "pink", "beach", "bottom right"),
               ("moon", "white", "night", "top right"), ("pyramid", "green", "wooden floor", "center")]
    texts = [prompt(s, c, None, b, p, "large") for s, c, b, p in prompts for _ in range(2)]
    attributes = [{"shape": s, "colour": c, "background": b, "position": p, "size": "large"} for s, c, b, p in prompts
                  for _ in range(2)]
    images = sample(models.pipeline, texts, list(range(len(texts))), steps=20, guidance=6.0)
    hits = score(judge, images, attributes)
    rates = {a: np.mean([h[a] for h in hits]) for a in attributes[0]}
    assert rates["colour"] >= 0.75 and rates["size"] >= 0.75, rates
    assert rates["shape"] >= 0.65 and rates["background"] >= 0.5 and rates["position"] >= 0.4, rates


def run_cli(*argv):
    from para_trainer import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    assert exit_info.value.code == 0, argv


def test_quickstart_on_toy_sd1_learns_the_subject_then_export_merge_sample(models, tmp_path, capsys):
    """The README's main job (its preset's steps, sampled only before and after): the judge finds the subject in the
    "sks toy" samples far more than before; then every tool on its files with --model builtin:toy-sd1, the merged
    single-file checkpoint computing exactly what toy-sd1 + the adapter computes."""
    from para_trainer.toyworld.report import identity_scores
    from para_trainer.training.train import main as train_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a photo of sks toy --w 64 --h 64 --d {seed} --s 20 --l 6\n" for seed in range(8))
                       + "a photo of a toy --w 64 --h 64 --d 9 --s 20 --l 6\n")
    out, preset = tmp_path / "quick", ROOT / "presets" / "quickstart.toml"
    steps = toml.load(preset)["training"]["max_train_steps"]
    assert train_main(["--config_file", str(preset), "--output_dir", str(out),
                       "--sample_every_n_steps", str(steps), "--sample_prompts", str(prompts)]) == 0
    printed = capsys.readouterr().out
    assert "judge (toy world)" in printed and "prompts with 'sks'" in printed and "prompts without 'sks'" in printed
    assert (out / "sample" / "contact_sheet.png").exists() and "contact sheet:" in printed
    before = sorted((out / "sample").glob("quickstart_000000_*.png"))
    after = sorted((out / "sample").glob(f"quickstart_{steps:06d}_*.png"))
    assert len(before) == len(after) == 9
    subject = sorted((ROOT / "para_trainer" / "example_data" / "train" / "5_sks toy").glob("*.png"))
    scores = identity_scores(before, after, ["a photo of sks toy"] * 8 + ["a photo of a toy"], subject, "sks")
    print("identity before -> after:", scores)
    subject = scores["with identifier"]
    assert subject.after > subject.before + IDENTITY_RISE, scores
    adapter = out / "quickstart.safetensors"

    merged = tmp_path / "merged.safetensors"
    run_cli("export", adapter, "--model", TOY, "--to", "merged", "--precision", "fp32", "-o", merged)
    merged_models = load_models(model_args(str(merged)))
    network, _ = para.create_network_from_weights(1.0, str(adapter), None, models.text_encoders[0], models.unet)
    network.apply_to(models.text_encoders[0], models.unet)
    network.load_weights(str(adapter))
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 128, generator=generator)
    with torch.no_grad():
        adapted = models.unet(x, 500, context).sample
        network.set_multiplier(0.0)
        base = models.unet(x, 500, context).sample
        network.set_multiplier(1.0)
        from_file = merged_models.unet(x, 500, context).sample
    network.restore()  # leave the shared fixture as it was
    assert (adapted - base).abs().max() > 1e-3
    assert torch.allclose(from_file, adapted, atol=1e-4, rtol=1e-4)

    run_cli("merge", adapter, f"{adapter}:0.5", "-o", tmp_path / "chain.safetensors", "--model", TOY)
    run_cli("sample", "--model", TOY, "--network", adapter, "--prompt", "a photo of sks toy", "--steps", "2",
            "--out", tmp_path / "samples")
    assert (tmp_path / "samples" / "contact_sheet.png").exists()


def test_evaluate_writes_its_results_and_grids(tmp_path, capsys):
    from PIL import Image

    from para_trainer.toyworld.world import POSITIONS, SHAPES, parse_caption

    run_cli("toyworld", "evaluate", "--model", TOY, "--samples", "4", "--steps", "2", "--out", tmp_path, "--json")
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "evaluate.json").read_text())
    assert {row["samples"] for row in printed["accuracy"].values()} == {2}
    positions = [parse_caption(line) for line in (tmp_path / "positions.txt").read_text().splitlines()]
    assert [(p["shape"], p["position"]) for p in positions] == [(s, q) for s in SHAPES for q in POSITIONS]
    assert Image.open(tmp_path / "positions.png").size == (64 * len(POSITIONS), 64 * len(SHAPES))
    assert Image.open(tmp_path / "showcase.png").size[0] == 64 * 6
