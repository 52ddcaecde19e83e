"""para-trainer sample: images with adapters applied, the contact sheet, seeds, strengths and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from networks import para
from para_trainer import cli
from para_trainer.files.export import export_lora, load_base_model
from para_trainer.files.metadata import FINGERPRINT_KEY, base_fingerprint

STEPS = ["--steps", "3", "--model", "builtin:tiny-sd1"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sample")
    models = load_base_model("builtin:tiny-sd1")
    network = para.create_network(1.0, 8, 1, None, models.text_encoder_for_network, models.unet)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in network.adapter_modules:
            module.para_b.copy_(torch.randn(module.para_b.shape, generator=generator))
    native = folder / "toy.safetensors"
    network.save_weights(str(native), None, {FINGERPRINT_KEY: base_fingerprint(network.adapter_modules)})
    lora = folder / "toy_lora.safetensors"
    export_lora(native, models, lora, dtype="fp32")
    return {"native": str(native), "lora": str(lora)}


def run(args):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sample", *args])
    return exit_info.value.code


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_images_and_contact_sheet(adapter, tmp_path, capsys):
    out = tmp_path / "out"
    assert run([*STEPS, "--network", adapter["native"], "--prompt", "a sks toy", "--prompt", "a red ball",
                "--seeds", "2", "--compare", "--strengths", "0", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # rows: base, toy at x0, toy at x1; columns: 2 prompts x 2 seeds
    images = sorted(p.name for p in out.glob("0*.png"))
    assert len(images) == 12 and "base | toy:1 @x0 | toy:1 @x1" in printed
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 4 * 64 and sheet.height > 3 * 64  # the grid plus label bands
    base, zero, one = (pixels(out / f"{row:02d}_00_seed0.png") for row in range(3))
    assert np.array_equal(base, zero)  # strength 0 is the base model, bit for bit
    assert np.abs(base - one).max() > 10  # the adapter changes the image
    assert not np.array_equal(pixels(out / "00_00_seed0.png"), pixels(out / "00_01_seed1.png"))
    text = Image.open(out / "02_00_seed0.png").info["parameters"]
    assert "Seed: 0" in text and "Adapters: toy:1 @x1" in text


def test_same_seed_same_image_and_native_equals_its_lora_export(adapter, tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    common = [*STEPS, "--prompt", "a sks toy", "--seed", "5"]
    assert run([*common, "--network", adapter["native"], "--out", str(a)]) == 0
    assert run([*common, "--network", adapter["native"], "--out", str(b)]) == 0
    assert run([*common, "--network", adapter["lora"], "--out", str(c)]) == 0
    first = pixels(a / "00_00_seed5.png")
    assert np.array_equal(first, pixels(b / "00_00_seed5.png"))
    assert np.abs(first - pixels(c / "00_00_seed5.png")).max() <= 2  # the export is exact up to float32 rounding


def test_prompt_file_with_sd_scripts_options(adapter, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks toy --d 11 --s 2 --w 72 --h 64\n# a comment\na red ball --n blurry\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run([*STEPS, "--network", f"{adapter['native']}:0.5", "--prompts-file", str(prompts), "--out", str(out)]) == 0
    first = Image.open(out / "00_00_seed11.png")
    assert first.size == (72, 64) and "Steps: 2" in first.info["parameters"]
    assert "Negative prompt: blurry" in Image.open(out / "00_01_seed0.png").info["parameters"]


@pytest.mark.parametrize("args, message", [
    (["--out", "OUT"], "--prompt TEXT"),
    (["--prompt", "x", "--compare", "--out", "OUT"], "give at least one --network"),
    (["--prompt", "x", "--network", "missing.safetensors", "--out", "OUT"], "missing.safetensors"),
    (["--prompt", "x", "--width", "64", "--out", "OUT"], "both --width and --height"),
])
def test_bad_input_is_one_message_and_no_images(tmp_path, capsys, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    assert run([*STEPS, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_single_image_edit_preset_runs_end_to_end(tmp_path):
    """The preset as written (shortened): one image, its edit prompts sampled at the end, then the sample command."""
    from para_trainer.training.train import main as train_main

    out = tmp_path / "edit"
    assert train_main(["--config_file", "presets/single_image_edit.toml", "--max_train_steps", "4",
                       "--sample_every_n_steps", "4", "--output_dir", str(out)]) == 0
    adapter = out / "one_image_para.safetensors"
    assert adapter.exists() and (out / "one_image_para_lora.safetensors").exists()
    assert len(list((out / "sample").glob("*.png"))) == 8  # the caption and three edits, two seeds each
    sheet = tmp_path / "sheet"
    assert run(["--model", "builtin:tiny-sd1", "--network", str(adapter), "--compare", "--prompt",
                "a photo of sks toy on the grass", "--seeds", "2", "--steps", "2", "--out", str(sheet)]) == 0
    assert len(list(sheet.glob("0*.png"))) == 4 and (sheet / "contact_sheet.png").exists()
