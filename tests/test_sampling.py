"""Sample images as sd-scripts makes them: prompt files, samplers, seeding, file names, contact sheets."""

import csv
import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from para_trainer.models import sampling
from para_trainer.models.sampling import (
    SAMPLERS,
    SamplePrompt,
    SamplingError,
    contact_sheet,
    generate_image,
    make_scheduler,
    parse_sample_name,
    read_prompt_file,
    resolve_settings,
    sample_images,
)
from para_trainer.models.tiny import build_tiny_pipeline
from para_trainer.training import args as args_module

# diffusers' k-diffusion schedulers trip numpy 2 deprecation warnings inside diffusers itself.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
FAST = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from more threads, and on a busy 2-core machine two threads spin-wait on each
    other (10x slower); restore the setting for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1():
    return build_tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def red_cube(sd1):
    """The reference image: seed 5, the default sampler (ddim), 64 px, 2 steps."""
    return generate_image(sd1, SamplePrompt("a red cube", seed=5, **FAST))


@pytest.fixture(scope="module")
def sd2():
    return build_tiny_pipeline("sd2")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_pipeline("sdxl")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Prompt files


def test_txt_prompt_file_with_sd_scripts_options(tmp_path, caplog):
    path = write(tmp_path, "prompts.txt", (
        "# a comment\n"
        "\n"
        "   # an indented comment\n"
        "a cat, best quality --n low quality, blurry --w 100 --h 72 --d 42 --s 2000 --l 5.5 --ss Euler_A\n"
        "plain prompt\n"
        "a dog --s 0 --W 96 --zz nope --g 3.5\n"
    ))
    with caplog.at_level(logging.WARNING, logger="para_trainer.models.sampling"):
        prompts = read_prompt_file(path)
    assert prompts == [
        SamplePrompt("a cat, best quality", "low quality, blurry", width=100, height=72, seed=42, steps=1000,
                     scale=5.5, sampler="euler_a"),
        SamplePrompt("plain prompt"),
        SamplePrompt("a dog", width=96, steps=1, guidance=3.5),  # --g: FLUX's guidance (no effect on SD)
    ]
    assert "--zz nope" in caplog.text and "prompt 3" in caplog.text


def test_toml_prompt_file_defaults_and_subsets(tmp_path):
    path = write(tmp_path, "prompts.toml", """
[prompt]
negative_prompt = "lowres"
width = 96
height = 80
sample_steps = 3
scale = 4.0
seed = 1

[[prompt.subset]]
prompt = "a cat"

[[prompt.subset]]
prompt = "a dog"
seed = 7
sample_sampler = "k_euler"
width = 64
""")
    assert read_prompt_file(path) == [
        SamplePrompt("a cat", "lowres", width=96, height=80, seed=1, steps=3, scale=4.0),
        SamplePrompt("a dog", "lowres", width=64, height=80, seed=7, steps=3, scale=4.0, sampler="k_euler"),
    ]


def test_json_prompt_file_objects_and_lines(tmp_path, caplog):
    path = write(tmp_path, "prompts.json", """[
        {"prompt": "a cat", "negative_prompt": "bad", "width": 72, "height": 88, "seed": 3, "sample_steps": 5,
         "scale": 6, "sample_sampler": "dpmsolver++"},
        {"prompt": "a dog", "seed": 9, "negative_prompt": "ugly", "steps": 50}
    ]""")
    with caplog.at_level(logging.WARNING, logger="para_trainer.models.sampling"):
        prompts = read_prompt_file(path)
    assert "prompt 2: unknown key(s) steps are ignored" in caplog.text  # sd-scripts' key is sample_steps
    assert prompts == [
        SamplePrompt("a cat", "bad", width=72, height=88, seed=3, steps=5, scale=6.0, sampler="dpmsolver++"),
        SamplePrompt("a dog", "ugly", seed=9),
    ]
    assert isinstance(prompts[0].scale, float)


def test_prompt_file_with_byte_order_mark_and_prompt_lines_in_json(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_bytes('[{"prompt": "a cat"}, "a dog --d 9 --n ugly"]'.encode("utf-8-sig"))
    assert read_prompt_file(path) == [SamplePrompt("a cat"), SamplePrompt("a dog", "ugly", seed=9)]


@pytest.mark.parametrize("name, text, message", [
    ("prompts.yaml", "prompt: a cat", "must end in .txt, .toml or .json"),
    ("comments.txt", "# only a comment\n\n", "has no prompts"),
    ("bad.txt", "a cat --l 1.2.3", r"--l 1\.2\.3 is not a number"),
    ("sampler.txt", "a cat --ss turbo", "unknown sampler 'turbo'"),
    ("syntax.toml", "[prompt\nprompt = 'x'", "not valid TOML"),
    ("nosubset.toml", "[prompt]\nprompt = 'a cat'\n", r"\[\[prompt.subset\]\]"),
    ("zero.toml", "[prompt]\n[[prompt.subset]]\nprompt = 'a'\nsample_steps = 0\n", "sample_steps must be at least 1"),
    ("syntax.json", "[{'prompt': 'a cat'}]", "not valid JSON"),
    ("object.json", '{"prompt": "a cat"}', "JSON list"),
    ("empty.json", "[]", "has no prompts"),
    ("width.json", '[{"prompt": "a cat", "width": "512"}]', "width must be a whole number"),
    ("noprompt.json", '[{"negative_prompt": "bad"}]', 'prompt 1 has no "prompt" key'),
    ("scale.json", '[{"prompt": "a", "scale": "high"}]', "scale must be a number"),
    ("seed.json", '[{"prompt": "a", "seed": 18446744073709551616}]', "seed 18446744073709551616 is out of range"),
])
def test_bad_prompt_files_raise_one_clear_error(tmp_path, name, text, message):
    with pytest.raises(SamplingError, match=message):
        read_prompt_file(write(tmp_path, name, text))


def test_missing_prompt_file(tmp_path):
    with pytest.raises(SamplingError, match="not found"):
        read_prompt_file(tmp_path / "nowhere.txt")


# ---------------------------------------------------------------------------------------------
# Samplers and schedulers


def test_sampler_names_are_sd_scripts_choices():
    table = Path(args_module.__file__).with_name("sd_scripts_args.tsv")
    with table.open(encoding="utf-8") as file:
        rows = {row["option"]: row for row in csv.DictReader(file, delimiter="\t")}
    assert list(SAMPLERS) == rows["--sample_sampler"]["choices"].split(",")


@pytest.mark.parametrize("name, class_name", [
    ("ddim", "DDIMScheduler"), ("pndm", "PNDMScheduler"), ("euler", "EulerDiscreteScheduler"),
    ("k_euler_a", "EulerAncestralDiscreteScheduler"), ("heun", "HeunDiscreteScheduler"),
    ("dpm_2", "KDPM2DiscreteScheduler"), ("k_dpm_2_a", "KDPM2AncestralDiscreteScheduler"),
    ("dpmsingle", "DPMSolverSinglestepScheduler"), ("dpmsolver", "DPMSolverMultistepScheduler"),
    ("ddpm", "DDPMScheduler"),
])
def test_make_scheduler_maps_like_sd_scripts(name, class_name):
    scheduler = make_scheduler(name, None)
    assert type(scheduler).__name__ == class_name
    config = scheduler.config
    assert (config.num_train_timesteps, config.beta_start, config.beta_end, config.beta_schedule) == (
        1000, 0.00085, 0.012, "scaled_linear")
    assert config.prediction_type == "epsilon"
    if "clip_sample" in config:  # sd-scripts switches it on
        assert config.clip_sample is True


def test_dpmsolver_algorithms():
    assert make_scheduler("dpmsolver", None).config.algorithm_type == "dpmsolver"
    assert make_scheduler("dpmsolver++", None).config.algorithm_type == "dpmsolver++"


def test_unknown_sampler():
    with pytest.raises(SamplingError, match="unknown sampler 'plms'"):
        make_scheduler("plms", None)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_generates_an_image(sd1, name):
    steps = sampling.PNDM_MIN_STEPS if name == "pndm" else 2
    prompt = SamplePrompt("a red cube", seed=1, sampler=name, width=64, height=64, steps=steps)
    if name.endswith("lms") and not HAS_SCIPY:
        with pytest.raises(SamplingError, match="needs scipy"):
            generate_image(sd1, prompt)
        return
    original = sd1.scheduler
    image = generate_image(sd1, prompt)
    assert image.size == (64, 64)
    assert pixels(image).std() > 0  # a NaN result decodes to one flat colour
    assert sd1.scheduler is original
    assert f"Sampler: {name}," in image.info["parameters"]


def test_pndm_with_too_few_steps(sd1):
    with pytest.raises(SamplingError, match="pndm needs at least 4 steps"):
        generate_image(sd1, SamplePrompt("a", sampler="pndm", seed=1, **FAST))


def test_v_prediction_kept_for_sd2(sd2, sd1, monkeypatch):
    assert make_scheduler("euler_a", sd2.scheduler.config).config.prediction_type == "v_prediction"
    assert make_scheduler("ddim", sd1.scheduler.config).config.prediction_type == "epsilon"
    assert make_scheduler("ddim", sd1.scheduler.config, "v_prediction").config.prediction_type == "v_prediction"

    used = []
    original_make = sampling.make_scheduler
    monkeypatch.setattr(sampling, "make_scheduler", lambda *a: used.append(original_make(*a)) or used[-1])
    prompt = SamplePrompt("a", seed=3, sampler="euler", **FAST)
    v_image = generate_image(sd2, prompt)
    eps_image = generate_image(sd2, prompt, prediction_type="epsilon")
    assert [s.config.prediction_type for s in used] == ["v_prediction", "epsilon"]
    assert not np.array_equal(pixels(v_image), pixels(eps_image))


# ---------------------------------------------------------------------------------------------
# Seeds, prompts, RNG


def test_seeds_and_prompts_decide_the_image(sd1, red_cube):
    first = red_cube
    again = generate_image(sd1, SamplePrompt("a red cube", seed=5, **FAST))
    other_seed = generate_image(sd1, SamplePrompt("a red cube", seed=6, **FAST))
    other_prompt = generate_image(sd1, SamplePrompt("a blue sphere", seed=5, **FAST))
    other_negative = generate_image(sd1, SamplePrompt("a red cube", "blurry", seed=5, **FAST))
    assert first.tobytes() == again.tobytes()
    for different in (other_seed, other_prompt, other_negative):
        assert first.tobytes() != different.tobytes()


def test_random_seed_is_recorded_and_differs(sd1):
    first = generate_image(sd1, SamplePrompt("a red cube", **FAST))
    second = generate_image(sd1, SamplePrompt("a red cube", **FAST))
    seeds = [int(re.search(r"Seed: (\d+)", image.info["parameters"]).group(1)) for image in (first, second)]
    assert seeds[0] != seeds[1]
    assert first.tobytes() != second.tobytes()
    # The recorded seed reproduces the image.
    replay = generate_image(sd1, SamplePrompt("a red cube", seed=seeds[0], **FAST))
    assert replay.tobytes() == first.tobytes()


def test_global_rng_state_untouched(sd1):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate_image(sd1, SamplePrompt("a", seed=1, sampler="euler_a", **FAST))
    generate_image(sd1, SamplePrompt("a", sampler="k_dpm_2_a", **FAST))
    assert torch.equal(torch.get_rng_state(), before)


def test_settings_defaults_and_rounding():
    settings = resolve_settings(SamplePrompt("a", width=70, height=30, seed=2), "euler_a", (512, 768))
    assert (settings.width, settings.height, settings.steps, settings.scale, settings.sampler) == (
        64, 64, 30, 7.5, "euler_a")
    settings = resolve_settings(SamplePrompt("a", height=103, sampler="k_lms"), "ddim", (515, 768))
    assert (settings.width, settings.height, settings.sampler, settings.seed_is_random) == (512, 96, "k_lms", True)
    assert settings.parameters_text(2).endswith(f"Seed: {settings.seed}, Size: 512x96, Clip skip: 2")


def test_clip_skip_for_sd1(sd1, red_cube):
    plain = red_cube
    skip1 = generate_image(sd1, SamplePrompt("a red cube", seed=5, **FAST), clip_skip=1)
    skip2 = generate_image(sd1, SamplePrompt("a red cube", seed=5, **FAST), clip_skip=2)
    assert plain.tobytes() == skip1.tobytes()
    assert plain.tobytes() != skip2.tobytes()
    assert "Clip skip: 2" in skip2.info["parameters"]
    # The last layer through our encoder is diffusers' own encoding: same tokens, same final layer norm.
    ours = sampling._encode_sd_prompt(sd1, "a red cube", 1, torch.device("cpu"))
    theirs = sd1.encode_prompt("a red cube", torch.device("cpu"), 1, False)[0]
    torch.testing.assert_close(ours, theirs)


def test_autocast_and_explicit_device(sd1, red_cube):
    prompt = SamplePrompt("a red cube", seed=5, **FAST)
    assert generate_image(sd1, prompt, device="cpu").tobytes() == red_cube.tobytes()
    image = generate_image(sd1, prompt, autocast_dtype=torch.bfloat16)
    assert image.size == (64, 64) and pixels(image).std() > 0


def test_sdxl_generation(sdxl):
    first = generate_image(sdxl, SamplePrompt("a red cube", seed=5, width=71, height=64, steps=2))
    again = generate_image(sdxl, SamplePrompt("a red cube", seed=5, width=64, height=64, steps=2), clip_skip=2)
    other = generate_image(sdxl, SamplePrompt("a blue sphere", seed=5, width=64, height=64, steps=2))
    assert first.size == (64, 64)  # rounded down to a multiple of 8
    assert first.tobytes() == again.tobytes()  # SDXL uses fixed layers; clip_skip does not apply
    assert first.tobytes() != other.tobytes()
    assert "Clip skip" not in again.info["parameters"]


# ---------------------------------------------------------------------------------------------
# Files and sheets


def test_sample_images_names_and_metadata(sd1, red_cube, tmp_path):
    prompts = [SamplePrompt("a red cube", width=70, height=64, seed=5, steps=2),
               SamplePrompt("a blue sphere", sampler="euler", **FAST)]
    paths = sample_images(sd1, prompts, tmp_path, "mylora", "e000003", "ddim", (64, 64))
    assert [p.parent for p in paths] == [tmp_path / "sample"] * 2
    assert re.fullmatch(r"mylora_e000003_00_\d{14}_5\.png", paths[0].name)
    assert re.fullmatch(r"mylora_e000003_01_\d{14}\.png", paths[1].name)  # sd-scripts: no suffix without a seed

    with Image.open(paths[0]) as saved:
        assert saved.size == (64, 64)  # 70 rounded down
        assert saved.text["parameters"] == "a red cube\nSteps: 2, Sampler: ddim, CFG scale: 7.5, Seed: 5, Size: 64x64"
        assert np.array_equal(pixels(saved), pixels(red_cube))
    with Image.open(paths[1]) as saved:
        assert re.search(r"Sampler: euler, CFG scale: 7\.5, Seed: \d+, Size: 64x64$", saved.text["parameters"])

    unnamed = sample_images(sd1, prompts[:1], tmp_path, None, "000010", "ddim", (64, 64))
    assert re.fullmatch(r"000010_00_\d{14}_5\.png", unnamed[0].name)
    assert [parse_sample_name(p.name) for p in paths + unnamed] == [("mylora_", "e000003", 0),
                                                                   ("mylora_", "e000003", 1), ("", "000010", 0)]
    assert parse_sample_name("contact_sheet.png") is None


def test_parameters_text_with_negative_prompt():
    settings = resolve_settings(SamplePrompt("a cat", "blurry, lowres", seed=9, steps=20, scale=6.0), "heun")
    assert settings.parameters_text() == ("a cat\nNegative prompt: blurry, lowres\n"
                                          "Steps: 20, Sampler: heun, CFG scale: 6, Seed: 9, Size: 512x512")


def solid(color, size=(20, 10)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_contact_sheet_without_labels_is_the_grid():
    colors = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(9, 9, 9), (50, 60, 70), (200, 100, 0)]]
    sheet = contact_sheet([[solid(c) for c in row] for row in colors])
    assert sheet.size == (60, 20)
    assert sheet.getpixel((0, 0)) == colors[0][0]
    assert sheet.getpixel((25, 5)) == colors[0][1]
    assert sheet.getpixel((59, 19)) == colors[1][2]


def test_contact_sheet_with_labels_and_a_missing_cell():
    images = [[solid((255, 0, 0)), solid((0, 0, 255))], [solid((0, 255, 0))]]
    sheet = contact_sheet(images, ["seed 1", "a much longer row label"], ["before", "after training"])
    left = sheet.width - 40
    top = sheet.height - 20
    assert left > 0 and top > 0
    assert sheet.getpixel((left, top)) == (255, 0, 0)
    assert sheet.getpixel((sheet.width - 1, top + 9)) == (0, 0, 255)
    assert sheet.getpixel((left, top + 10)) == (0, 255, 0)
    assert sheet.getpixel((sheet.width - 1, sheet.height - 1)) == (255, 255, 255)  # the missing cell
    # The longer label sets the label column: wider than for short labels.
    assert contact_sheet(images, ["a", "b"], ["x", "y"]).width < sheet.width
    # Some label text is drawn in the bands.
    band = np.asarray(sheet)[:top, :]
    assert (band < 128).any()


def test_contact_sheet_label_counts_must_match():
    with pytest.raises(SamplingError, match="1 row labels for 2 rows"):
        contact_sheet([[solid((0, 0, 0))], [solid((0, 0, 0))]], ["one"], None)
    with pytest.raises(SamplingError, match="3 column labels for 1 columns"):
        contact_sheet([[solid((0, 0, 0))]], None, ["a", "b", "c"])
