"""The DreamBench evaluator's plumbing, on tiny random CLIP and DINO models built from configs: the numbers mean
nothing here, so what is checked is what does not depend on trained weights — an image against itself scores 1,
a shuffled pairing scores lower, CLIP-T equals the cosine computed by hand from the model, batching changes
nothing, prompts come from caption files and PNG parameters, and a missing model is one clear error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from para_trainer.quality.dreambench import (DreamBenchError, Encoders, dreambench_prompts, evaluate_folder,
                                             image_similarity, prompt_file)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, ViTConfig,
                              ViTImageProcessor, ViTModel)

    from para_trainer.toyworld.model import write_tokenizer

    root = tmp_path_factory.mktemp("dreambench-models")
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(root / "tokenizer"))
    clip = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16))
    clip.save_pretrained(root / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(root / "clip")
    dino = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8), add_pooling_layer=False)
    dino.save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    return root


def images(count, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)) for _ in range(count)]


def write(folder, pictures, prompts=None, how="txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(pictures):
        info = PngInfo()
        if prompts and how == "png":
            info.add_text("parameters", f"{prompts[i]}\nSteps: 20, Sampler: Euler a, Seed: {i}")
        picture.save(folder / f"{i:02d}.png", pnginfo=info)
        if prompts and how == "txt":
            (folder / f"{i:02d}.txt").write_text(prompts[i] + "\n")
    return folder


def test_dreambench_prompts_are_the_data_sets():
    objects, live = dreambench_prompts("sks", "backpack"), dreambench_prompts("sks", "dog", live=True)
    assert len(objects) == len(live) == 25 and len(set(objects)) == 25
    assert objects[0] == "a sks backpack in the jungle" and objects[-1] == "a cube shaped sks backpack"
    assert objects[:10] == [p.replace("dog", "backpack") for p in live[:10]] and objects[20:] == \
        [p.replace("dog", "backpack") for p in live[20:]]
    assert "a sks dog wearing a santa hat" in live and "a sks backpack floating in an ocean of milk" in objects
    text = prompt_file(objects[:2], 4)
    assert text.splitlines() == [f"{objects[i]} --d {s}" for i in range(2) for s in range(4)]


def test_an_image_scores_one_against_itself_and_a_shuffled_pairing_scores_lower(models, tmp_path):
    encoders = Encoders.load(str(models / "clip"), str(models / "dino"), batch_size=3)
    pictures = images(5, 1)
    prompts = [f"a photo of a red ball {i}" for i in range(5)]
    generated = write(tmp_path / "gen", pictures, prompts)
    same = evaluate_folder(generated, write(tmp_path / "same", pictures), encoders=encoders, pairing="one")
    assert same["scores"]["DINO"] == pytest.approx(1.0, abs=1e-5)
    assert same["scores"]["CLIP-I"] == pytest.approx(1.0, abs=1e-5)
    shuffled = evaluate_folder(generated, write(tmp_path / "shuffled", pictures[1:] + pictures[:1]),
                               encoders=encoders, pairing="one")
    assert shuffled["scores"]["DINO"] < 1.0 - 1e-3 and shuffled["scores"]["CLIP-I"] < 1.0 - 1e-3
    assert shuffled["scores"]["CLIP-T"] == same["scores"]["CLIP-T"]
    everything = evaluate_folder(generated, tmp_path / "same", encoders=encoders, pairing="all")
    assert everything["scores"]["DINO"] < 1.0 - 1e-3  # every image against all five: four are different


def test_scores_equal_the_cosines_computed_by_hand_whatever_the_batch(models, tmp_path):
    from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

    pictures, reals = images(7, 2), images(3, 3)
    prompts = [f"a {c} star on the beach" for c in ("red", "blue", "green", "pink", "white", "yellow", "orange")]
    result = evaluate_folder(write(tmp_path / "gen", pictures, prompts, how="png"), write(tmp_path / "real", reals),
                             encoders=Encoders.load(str(models / "clip"), str(models / "dino"), batch_size=2))
    assert [row["prompt"] for row in result["per_image"]] == prompts  # read from the PNG's parameters
    clip, processor = CLIPModel.from_pretrained(models / "clip"), CLIPProcessor.from_pretrained(models / "clip")
    with torch.no_grad():
        def image_embeddings(batch):
            out = clip.get_image_features(pixel_values=processor(images=batch, return_tensors="pt").pixel_values)
            return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)

        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        out = clip.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        texts = torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)
        generated, real = image_embeddings(pictures), image_embeddings(reals)
        dino, dino_processor = ViTModel.from_pretrained(models / "dino"), ViTImageProcessor.from_pretrained(
            models / "dino")
        cls = [torch.nn.functional.normalize(
            dino(pixel_values=dino_processor(images=x, return_tensors="pt").pixel_values).last_hidden_state[:, 0],
            dim=-1) for x in (pictures, reals)]
    expected_t = float((generated * texts).sum(-1).mean())
    expected_i = float((generated @ real.T).mean())
    expected_dino = float((cls[0] @ cls[1].T).mean())
    assert result["scores"]["CLIP-T"] == pytest.approx(expected_t, abs=1e-5)
    assert result["scores"]["CLIP-I"] == pytest.approx(expected_i, abs=1e-5)
    assert result["scores"]["DINO"] == pytest.approx(expected_dino, abs=1e-5)
    again = evaluate_folder(tmp_path / "gen", tmp_path / "real",
                            encoders=Encoders.load(str(models / "clip"), str(models / "dino"), batch_size=16))
    assert again["scores"] == pytest.approx(result["scores"], abs=1e-5)
    assert image_similarity(generated, real, "one").shape == (7,)


def cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "para_trainer", "quality", *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def test_cli_scores_a_folder_and_writes_prompt_files(models, tmp_path):
    prompts_path = tmp_path / "prompts.txt"
    done = cli("--dreambench-prompts", prompts_path, "--class-noun", "dog", "--live")
    assert done.returncode == 0, done.stderr
    assert len(prompts_path.read_text().splitlines()) == 100
    write(tmp_path / "gen", images(3, 4))
    done = cli("--images", tmp_path / "gen", "--prompt", "a sks dog", "--reference", write(tmp_path / "r", images(2, 5)),
               "--clip-model", models / "clip", "--dino-model", models / "dino", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["scores"]) == {"CLIP-T", "CLIP-I", "DINO"} and result["images"] == 3


def test_bad_input_gets_one_clear_error(models, tmp_path):
    write(tmp_path / "gen", images(2, 6))
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}
    done = cli("--images", tmp_path / "gen", "--prompt", "x", "--clip-model", "openai/clip-vit-base-patch32",
               env=offline)
    assert done.returncode == 2 and "CLIP model 'openai/clip-vit-base-patch32' could not be loaded" in done.stderr
    assert "Traceback" not in done.stderr
    done = cli("--images", tmp_path / "gen", "--clip-model", models / "clip", "--dino-model", "none")
    assert done.returncode == 2 and "no prompt for 00.png" in done.stderr, done.stderr
    done = cli("--images", tmp_path / "nothing", "--clip-model", models / "clip")
    assert done.returncode == 2 and "not a folder of images" in done.stderr
    done = cli("--dreambench-prompts", tmp_path / "p.txt")
    assert done.returncode == 2 and "--class-noun" in done.stderr and not (tmp_path / "p.txt").exists()
    with pytest.raises(DreamBenchError, match="not a readable image"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
        evaluate_folder(tmp_path / "bad", prompt="x", encoders=Encoders.load(str(models / "clip"), None))
