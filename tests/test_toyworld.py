"""The toy world: the renderer, captions, held-out pairs and concepts, the concept datasets and the CLI."""

import hashlib
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from para_trainer.toyworld import render as R
from para_trainer.toyworld.concepts import (CONCEPTS, TRAINING_SCENES, concept_scene, dreambooth_caption,
                                            random_concept_scene, training_scenes)
from para_trainer.toyworld.dataset import concept_scenes, held_out_pair_scenes, world_scenes
from para_trainer.toyworld.files import concept_files, png_bytes
from para_trainer.toyworld.world import (ATTRIBUTES, BACKGROUNDS, COLOURS, GENERIC_NOUN, HELD_OUT_PAIRS, MENTION_RATE,
                                         PATTERNS, POSITIONS, SHAPES, SIZES, Scene, WorldError, caption, check_value,
                                         is_held_out_pair, parse_caption, prompt, random_scene, vocabulary)

ROOT = Path(__file__).resolve().parents[1]


def test_world_has_the_promised_vocabulary():
    assert len(SHAPES) >= 6 and len(COLOURS) == 8 and len(PATTERNS) == 3 and len(BACKGROUNDS) == 6
    assert len(POSITIONS) == 5 and len(SIZES) == 2 and len(CONCEPTS) >= 5


def test_same_scene_same_bytes_and_variants_differ():
    rng = random.Random(3)
    scenes = [random_scene(rng, allow_held_out=True) for _ in range(12)]
    scenes += [random_concept_scene(name, rng) for name in CONCEPTS]
    for scene in scenes:
        first, second = R.render(scene), R.render(replace(scene))
        assert first.dtype == np.uint8 and first.shape == (64, 64, 3)
        assert first.tobytes() == second.tobytes()
        assert R.render(replace(scene, variant=scene.variant + 1)).tobytes() != first.tobytes()


def test_renders_are_the_same_in_another_process():
    """A fresh interpreter (other import order, other NumPy state) draws the same bytes."""
    scenes = world_scenes(6, seed=11, allow_held_out=True) + concept_scenes(5, seed=11)
    here = hashlib.sha256(b"".join(R.render(s).tobytes() for s in scenes)).hexdigest()
    code = ("import hashlib; from para_trainer.toyworld.dataset import world_scenes, concept_scenes; "
            "from para_trainer.toyworld.render import render; "
            "s = world_scenes(6, seed=11, allow_held_out=True) + concept_scenes(5, seed=11); "
            "print(hashlib.sha256(b''.join(render(x).tobytes() for x in s)).hexdigest())")
    there = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert there.stdout.strip() == here


def _object_pixels(scene: Scene) -> np.ndarray:
    """Where the object is: pixels that differ from the same scene's background alone."""
    rng = np.random.Generator(np.random.PCG64(scene.variant))
    bare = R.Canvas(R.background(scene.background, rng))
    return np.abs(R.render(scene).astype(int) - bare.pixels().astype(int)).sum(-1) > 30


def _main_colour(pixels: np.ndarray) -> str:
    """The world colour most object pixels are a lit shade of (outline and shadow pixels match none)."""
    names = list(COLOURS)
    shades = np.array([[np.array(COLOURS[n]) * f // 100 for f in (85, 95, 105)] for n in names])  # (8, 3, 3)
    distance = np.abs(pixels[:, None, None, :].astype(int) - shades[None]).sum(-1).min(-1)  # (N, 8)
    votes = np.bincount(distance.argmin(-1)[distance.min(-1) < 45], minlength=len(names))
    return names[int(votes.argmax())]


def test_renders_show_the_scene_attributes():
    """Position, size and colour are where and what the scene says (measured on the pixels)."""
    rng = random.Random(5)
    for _ in range(40):
        scene = replace(random_scene(rng, allow_held_out=True), pattern="plain")
        mask = _object_pixels(scene)
        ys, xs = np.nonzero(mask)
        middle = np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2])
        distance = {p: np.abs(middle - R.centre(p, scene.size)).max() for p in POSITIONS}
        assert min(distance, key=distance.get) == scene.position and distance[scene.position] <= R.JITTER + 3, scene
        other = _object_pixels(replace(scene, size="small" if scene.size == "large" else "large")).sum()
        small, large = sorted((mask.sum(), other)) if scene.size == "small" else sorted((other, mask.sum()))
        assert large > 1.8 * small and (mask.sum() == large) == (scene.size == "large"), scene
        assert _main_colour(R.render(scene)[mask]) == scene.colour, scene


def test_patterns_are_drawn():
    base = Scene("ball", "blue", "plain", "wall", "center", "large", variant=1)
    plain = R.render(base)
    for pattern in ("striped", "dotted"):
        changed = (np.abs(R.render(replace(base, pattern=pattern)).astype(int) - plain).sum(-1) > 60).sum()
        assert changed > 60, pattern


def test_captions_name_exactly_the_attributes_drawn():
    rng = random.Random(7)
    for _ in range(3000):
        scene = random_scene(rng, allow_held_out=True)
        text = caption(scene, rng)
        named = parse_caption(text)
        assert named["shape"] in (scene.obj, GENERIC_NOUN), text
        for attribute, value in named.items():
            if attribute != "shape":
                assert scene.attributes()[attribute] == value, (text, scene)


def test_the_layout_phase_names_the_position_in_every_caption():
    for seed in range(500):
        rng, same = random.Random(seed), random.Random(seed)
        scene = random_scene(rng, allow_held_out=True)
        assert random_scene(same, allow_held_out=True) == scene
        text, plain = caption(scene, rng, always=("position",)), caption(scene, same)
        named = parse_caption(text)
        assert named["position"] == scene.position, text
        assert {k: v for k, v in named.items() if k != "position"} == \
            {k: v for k, v in parse_caption(plain).items() if k != "position"}, (text, plain)


def test_a_caption_that_names_everything_parses_back_to_the_scene(monkeypatch):
    import para_trainer.toyworld.world as world

    monkeypatch.setattr(world, "MENTION_RATE", {k: 1.0 for k in MENTION_RATE})
    monkeypatch.setattr(world, "GENERIC_NOUN_RATE", 0.0)
    rng = random.Random(8)
    for _ in range(500):
        scene = random_scene(rng, allow_held_out=True)
        assert parse_caption(world.caption(scene, rng)) == scene.attributes()


def test_evaluation_prompts_parse_back():
    for shape in SHAPES:
        text = prompt(shape, "pink", "dotted", "wooden floor", "bottom left", "small")
        assert parse_caption(text) == {"shape": shape, "colour": "pink", "pattern": "dotted",
                                       "background": "wooden floor", "position": "bottom left", "size": "small"}


def test_pretraining_never_sees_held_out_pairs_or_concepts():
    scenes = world_scenes(5000, seed=0)
    assert not any(is_held_out_pair(s) for s in scenes)
    assert {s.obj for s in scenes} == set(SHAPES)
    seen_pairs = {(s.obj, s.background) for s in scenes}
    assert len(seen_pairs) == len(SHAPES) * len(BACKGROUNDS) - len(HELD_OUT_PAIRS)
    assert {(s.obj, s.background) for s in held_out_pair_scenes(60, 0)} == set(HELD_OUT_PAIRS)


def test_no_caption_can_name_a_concept():
    words = set(vocabulary())
    assert not set(CONCEPTS) & words
    forbidden = {"smiley", "robot", "emblem", "gift", "ribbon", "duck", "face", "beak", "antenna", "bow"}
    assert not forbidden & words
    rng = random.Random(9)
    for _ in range(500):
        assert set(parse_caption(caption(random_scene(rng), rng)).values()).isdisjoint(CONCEPTS)


def test_concepts_render_in_every_scene_and_differ_from_every_shape():
    rng = random.Random(10)
    for name in CONCEPTS:
        for background in BACKGROUNDS:
            scene = random_concept_scene(name, rng, background=background)
            assert scene.obj == name and scene.background == background
            assert _object_pixels(scene).sum() > 50
        # the concept's own look is not any shape's: against every shape, colour and pattern in the same place
        scene = concept_scene(name, "wall", "center", "large", variant=3)
        mine = R.render(scene).astype(int)
        closest = min(np.abs(R.render(Scene(s, c, p, "wall", "center", "large", 3)).astype(int) - mine).mean()
                      for s in SHAPES for c in COLOURS for p in PATTERNS)
        assert closest > 4, name


def test_concept_training_set_and_captions():
    files = concept_files("robot", images=5, class_images=3)
    assert sorted(files) == sorted([f"train/5_sks toy/img_{i}.{e}" for i in range(1, 6) for e in ("png", "txt")]
                                   + [f"reg/1_toy/img_{i}.{e}" for i in range(1, 4) for e in ("png", "txt")])
    assert files["train/5_sks toy/img_1.txt"] == b"a photo of sks toy\n" == (dreambooth_caption("robot") + "\n").encode()
    assert [s.background for s in training_scenes("robot")] == [bg for bg, _, _ in TRAINING_SCENES]
    assert files == concept_files("robot", images=5, class_images=3)


def test_png_bytes_are_read_back_exactly(tmp_path):
    pixels = R.render(random_scene(random.Random(1)))
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(pixels))
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels)


def test_unknown_names_get_one_error_listing_the_valid_ones():
    with pytest.raises(WorldError, match=r"unknown colour 'bleu' \(did you mean 'blue'\?\); valid: red, orange"):
        check_value("colour", "bleu")
    with pytest.raises(WorldError, match="valid: smiley-ball, robot, emblem-star, gift-box, duck"):
        concept_scene("robott", "wall", "center", "large")
    with pytest.raises(WorldError, match="unknown background 'moon'"):
        prompt("ball", background="moon")
    assert set(ATTRIBUTES) == {"shape", "colour", "pattern", "background", "position", "size"}


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "para_trainer", "toyworld", *args], cwd=cwd, capture_output=True,
                          text=True)


def test_cli_render_concept_and_bad_names(tmp_path):
    done = _cli("render", str(tmp_path / "a.png"), "--object", "star", "--colour", "green", "--background", "snow",
                "--position", "top left", "--size", "small", "--pattern", "dotted", "--seed", "4")
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "a.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    scene_line = done.stdout
    assert '"shape": "star"' in scene_line and '"position": "top left"' in scene_line
    assert pixels.shape == (64, 64, 3)
    for args, message in (
        (["render", str(tmp_path / "b.png"), "--object", "robo"], "unknown shape 'robo' (did you mean 'robot'?)"),
        (["render", str(tmp_path / "b.png"), "--size", "huge"], "unknown size 'huge'; valid: small, large"),
        (["concept", "dragon", str(tmp_path / "c")], "unknown concept 'dragon'; valid: smiley-ball, robot"),
        (["pretrain", "--workdir", str(tmp_path / "w"), "--stages", "vae,unets"], "unknown stage 'unets'"),
        (["evaluate", "--model", str(tmp_path / "missing.safetensors")], "model not found: "),
    ):
        failed = _cli(*args)
        assert failed.returncode == 2 and message in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c").exists()
    done = _cli("concept", "duck", str(tmp_path / "duck"), "--class-images", "2")
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "duck" / "train" / "5_sks toy").glob("*.png"))) == 5
    assert len(list((tmp_path / "duck" / "reg" / "1_toy").glob("*.png"))) == 2


def test_pretraining_runs_every_stage_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The recipe end to end at toy size: an UNet stage interrupted before its layout phase continues to exactly
    the weights of an uninterrupted one, and the export is a diffusers SD1 pipeline that loads and draws."""
    import shutil

    import torch
    from diffusers import StableDiffusionPipeline

    from para_trainer.toyworld.pretrain import Recipe, run

    recipe = Recipe(images=48, vae_crop_steps=2, vae_full_steps=1, vae_mixed_steps=1, vae_concept_images=8,
                    vae_batch=4, unet_steps=2, layout_steps=2, layout_min_timestep=500, unet_batch=2, unet_warmup=1,
                    checkpoint_every=2)
    whole = tmp_path / "whole"
    run(whole, ("data", "vae", "latents", "unet", "export"), out=tmp_path / "toy", recipe=recipe, threads=1)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(whole, interrupted, ignore=shutil.ignore_patterns("unet-state.pt"))
    from para_trainer.toyworld import pretrain

    def save_then_stop(state, path):  # the machine goes down right after the checkpoint at step 2
        save_state(state, path)
        if state["step"] == 2:
            raise KeyboardInterrupt

    save_state = pretrain.save_state
    monkeypatch.setattr(pretrain, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(interrupted, ("unet",), recipe=recipe, threads=1)
    monkeypatch.setattr(pretrain, "save_state", save_state)
    assert torch.load(interrupted / "unet-state.pt", weights_only=True)["step"] == 2
    run(interrupted, ("unet",), recipe=recipe, threads=1)
    expected = torch.load(whole / "unet-state.pt", weights_only=True)
    got = torch.load(interrupted / "unet-state.pt", weights_only=True)
    assert got["step"] == 4
    assert all(torch.equal(a, b) for a, b in zip(expected["ema"], got["ema"]))
    assert "resuming at step 2" in (interrupted / "pretrain.log").read_text()

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "toy", torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "toy" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert list(pipe.unet.config.block_out_channels) == [32, 64, 128, 128]
    image = pipe("a photo of a red ball", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_sample_sheet_puts_each_step_in_a_row_and_each_prompt_in_a_column(tmp_path):
    """The trainer's sample/contact_sheet.png on toy-sd1: rows in step order (the base model's first), columns by
    prompt index, the training images last, 64 px shown at 128; another run's samples left out."""
    from para_trainer.models.sampling import contact_sheet
    from para_trainer.toyworld.report import sample_sheet

    def solid(value):
        return Image.new("RGB", (64, 64), (value, 255 - value, 7))

    names = {("000500", 1): 10, ("000500", 0): 20, ("000000", 1): 30, ("000000", 0): 40, ("000250", 0): 50,
             ("000250", 1): 60}
    for (tag, index), value in names.items():
        solid(value).save(tmp_path / f"run_{tag}_{index:02d}_20261207120000_{index + 1}.png")
    solid(99).save(tmp_path / f"other_000000_00_20261207000000.png")  # another run's name: not in the sheet
    photo = tmp_path / "photo.png"
    solid(70).save(photo)
    sheet = sample_sheet(tmp_path, "run", ["first prompt", "second prompt"], [str(photo)])

    def big(value):
        return solid(value).resize((128, 128), Image.NEAREST)

    expected = contact_sheet([[big(40), big(30)], [big(50), big(60)], [big(20), big(10)], [big(70)]],
                             ["base model (before)", "step 250", "step 500", "training images"],
                             ["first prompt", "second prompt"])
    assert sheet.size == expected.size and sheet.tobytes() == expected.tobytes()
