"""The data layer: sd-scripts' DreamBooth folders and dataset configs, captions, buckets, batches, latent caching,
and the bundled example images."""

import json
import logging
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from para_trainer.training import example_images
from para_trainer.training.data import (DataError, ItemRef, SubsetSpec, TrainDataset, load_blueprints, make_bucket_resolutions,
                               process_caption)


def make_args(**overrides) -> SimpleNamespace:
    """sd-scripts' dataset arguments at their defaults."""
    values = dict(train_data_dir=None, reg_data_dir=None, dataset_config=None, in_json=None, resolution=None,
                  caption_extension=".caption", caption_extention=None, shuffle_caption=False, caption_separator=",",
                  keep_tokens=0, caption_prefix=None, caption_suffix=None, caption_dropout_rate=0.0,
                  caption_tag_dropout_rate=0.0, flip_aug=False, random_crop=False, enable_bucket=False,
                  min_bucket_reso=256, max_bucket_reso=1024, bucket_reso_steps=64, bucket_no_upscale=False,
                  train_batch_size=1, prior_loss_weight=1.0, dataset_repeats=1)
    values.update(overrides)
    return SimpleNamespace(**values)


def image(path: Path, size=(64, 64), color=(200, 30, 30), caption: str | None = None, ext=".txt") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption + "\n", encoding="utf-8")
    return path


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def build(**overrides) -> TrainDataset:
    return TrainDataset(load_blueprints(make_args(**overrides)))


def subset(**overrides) -> SubsetSpec:
    return SubsetSpec(image_dir="unused", **overrides)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# DreamBooth folders


def test_folder_layout_gives_repeats_and_class_tokens_and_skips_other_folders(tmp_path, caplog):
    train, reg = tmp_path / "train", tmp_path / "reg"
    image(train / "3_sks dog" / "a.png")
    image(train / "2_red_toy car" / "b.png")
    image(train / "notes" / "c.png")
    image(train / "0_disabled" / "d.png")
    image(reg / "1_dog" / "e.png")
    with caplog.at_level(logging.WARNING, logger="para_trainer.training.data"):
        [spec] = load_blueprints(make_args(train_data_dir=str(train), reg_data_dir=str(reg), resolution="64"))
    found = [(Path(s.image_dir).name, s.num_repeats, s.class_tokens, s.is_reg) for s in spec.subsets]
    assert found == [("2_red_toy car", 2, "red_toy car", False), ("3_sks dog", 3, "sks dog", False),
                     ("1_dog", 1, "dog", True)]
    assert "'notes' is skipped" in caplog.text and "'0_disabled' is skipped" in caplog.text
    assert spec.resolution == (64, 64)


def test_train_data_dir_must_be_the_parent_of_the_repeat_folders(tmp_path):
    image(tmp_path / "5_sks dog" / "a.png")
    with pytest.raises(DataError, match=r"5_sks dog.*no folders named like '10_sks dog'.*holds images directly"):
        load_blueprints(make_args(train_data_dir=str(tmp_path / "5_sks dog"), resolution="64"))


def test_resolution_is_required_and_parsed(tmp_path):
    image(tmp_path / "1_x" / "a.png")
    with pytest.raises(DataError, match="resolution is required"):
        load_blueprints(make_args(train_data_dir=str(tmp_path)))
    [spec] = load_blueprints(make_args(train_data_dir=str(tmp_path), resolution="96,64"))
    assert spec.resolution == (96, 64)  # sd-scripts: width,height


def test_captions_from_files_else_class_tokens(tmp_path, caplog):
    folder = tmp_path / "2_sks dog"
    image(folder / "with.png", caption="a photo of sks dog, red collar")
    image(folder / "without.png")
    image(folder / "other.png", caption="from a .caption file", ext=".caption")
    dataset = build(train_data_dir=str(tmp_path), resolution="64", caption_extension="txt")  # dot added
    captions = {Path(e.path).name: e.caption for e in dataset.datasets[0].entries}
    assert captions == {"with.png": "a photo of sks dog, red collar", "without.png": "sks dog", "other.png": "sks dog"}
    default = build(train_data_dir=str(tmp_path), resolution="64")  # sd-scripts' default extension is .caption
    assert {Path(e.path).name: e.caption for e in default.datasets[0].entries}["other.png"] == "from a .caption file"
    assert default.tag_frequency == {"2_sks dog": {"sks dog": 2, "from a .caption file": 1}}
    assert dataset.dataset_dirs == {"2_sks dog": {"n_repeats": 2, "img_count": 3}}

    (folder / "with.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"with\.txt is empty"):
        build(train_data_dir=str(tmp_path), resolution="64", caption_extension=".txt")


def test_deprecated_caption_extention_is_used(tmp_path):
    image(tmp_path / "1_x" / "a.png", caption="from txt")
    dataset = build(train_data_dir=str(tmp_path), resolution="64", caption_extention=".txt")
    assert dataset.datasets[0].entries[0].caption == "from txt"


# --------------------------------------------------------------------------------------------------
# Caption processing


def test_shuffle_keeps_the_first_tokens_and_is_reproducible():
    caption = "sks dog, t1, t2, t3, t4, t5, t6, t7"
    spec = subset(shuffle_caption=True, keep_tokens=1)
    results = [process_caption(caption, spec, gen(seed)) for seed in range(6)]
    for result in results:
        tokens = result.split(", ")
        assert tokens[0] == "sks dog"
        assert sorted(tokens[1:]) == [f"t{i}" for i in range(1, 8)]
    assert len(set(results)) > 1  # 7! orders: six seeds give the same one only if nothing is shuffled
    assert process_caption(caption, spec, gen(3)) == results[3]
    assert process_caption(caption, subset(keep_tokens=1), gen(0)) == caption  # keep_tokens alone changes nothing


def test_prefix_suffix_and_dropouts():
    spec = subset(caption_prefix="masterpiece,", caption_suffix=", outdoors")
    assert process_caption("sks dog", spec, gen(0)) == "masterpiece, sks dog , outdoors"  # sd-scripts joins with " "
    assert process_caption("sks dog, a, b", subset(caption_dropout_rate=1.0), gen(0)) == ""
    assert process_caption("sks dog, a, b", subset(caption_tag_dropout_rate=1.0, keep_tokens=1), gen(0)) == "sks dog"
    assert process_caption("x;y", subset(shuffle_caption=True, caption_separator=";", keep_tokens=2), gen(0)) == "x, y"


# --------------------------------------------------------------------------------------------------
# Dataset config files


DATASET_TOML = """
[general]
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = [96, 64]
batch_size = 2
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = "{a}"
  class_tokens = "sks dog"
  num_repeats = 3
  keep_tokens = 3
  flip_aug = false

  [[datasets.subsets]]
  image_dir = "{b}"
  is_reg = true
  caption_extension = "caption"

[[datasets]]
resolution = 64

  [[datasets.subsets]]
  image_dir = "{a}"
"""


def test_dataset_config_precedence(tmp_path, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    image(a / "1.png", caption="a caption")
    image(b / "1.png")
    config = write(tmp_path / "data.toml", DATASET_TOML.format(a=a, b=b))
    args = make_args(dataset_config=Path(config), train_data_dir=str(tmp_path / "ignored"), resolution="128",
                     flip_aug=True, train_batch_size=4, dataset_repeats=2, prior_loss_weight=0.5)
    with caplog.at_level(logging.WARNING, logger="para_trainer.training.data"):
        first, second = load_blueprints(args)
    assert "--train_data_dir is ignored" in caplog.text
    assert (first.resolution, first.batch_size, first.prior_loss_weight) == ((96, 64), 2, 0.5)
    assert (second.resolution, second.batch_size) == ((64, 64), 4)  # dataset > argument
    s1, s2 = first.subsets
    assert (s1.keep_tokens, s1.num_repeats, s1.flip_aug, s1.caption_extension, s1.shuffle_caption) == \
        (3, 3, False, ".txt", True)  # subset > dataset > general; false beats the argument's true
    assert (s2.keep_tokens, s2.num_repeats, s2.flip_aug, s2.caption_extension, s2.is_reg) == \
        (2, 2, True, ".caption", True)  # dataset > general; num_repeats from --dataset_repeats
    assert second.subsets[0].keep_tokens == 1  # general
    dataset = TrainDataset([first, second])
    summaries = dataset.subset_summaries()
    assert [s["batch_size_per_device"] for s in summaries] == [2, 4]
    assert summaries[0]["subsets"][0]["image_dir"] == "a" and summaries[0]["subsets"][1]["is_reg"] is True
    json.dumps(summaries)  # what goes into ss_datasets
    assert dataset.dataset_dirs == {"a": {"n_repeats": 3, "img_count": 1}, "a (2)": {"n_repeats": 2, "img_count": 1}}


def test_dataset_config_as_json(tmp_path):
    image(tmp_path / "a" / "1.png")
    config = {"general": {"enable_bucket": True, "min_bucket_reso": 64},
              "datasets": [{"resolution": 64, "subsets": [{"image_dir": str(tmp_path / "a"), "num_repeats": 2}]}]}
    path = write(tmp_path / "data.json", json.dumps(config))
    [spec] = load_blueprints(make_args(dataset_config=path))
    assert (spec.enable_bucket, spec.min_bucket_reso, spec.subsets[0].num_repeats) == (True, 64, 2)


@pytest.mark.parametrize("text, message", [
    ("[general]\nshufle_caption = true", r"\[general\]: unknown key 'shufle_caption' \(did you mean 'shuffle_caption'"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nnum_repeat = 2", r"did you mean 'num_repeats'"),
    ("[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'meta.json'", r"metadata_file is not supported"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\ncolor_aug = true", r"color_aug is not supported"),
    ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\nbatch_size = 2", r"'batch_size' is a dataset setting"),
    ("[[datasets]]\n[[datasets.subsets]]\nclass_tokens = 'x'", r"image_dir is required"),
    ("[[datasets]]\nresolution = '512'\n[[datasets.subsets]]\nimage_dir = 'x'", r"resolution must be an integer"),
    ("[general]\nimage_dir = 'x'", r"'image_dir' belongs in a \[\[datasets.subsets\]\]"),
    ("[[datasets]]\nresolution = 64", r"has no \[\[datasets.subsets\]\]"),
])
def test_dataset_config_errors(tmp_path, text, message):
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(DataError, match=message):
        load_blueprints(make_args(dataset_config=path, resolution="64"))


def test_harmless_values_of_unsupported_keys_are_accepted(tmp_path):
    image(tmp_path / "a" / "1.png")
    text = (f"[general]\ncolor_aug = false\nnetwork_multiplier = 1.0\ncache_info = true\n[[datasets]]\n"
            f"resolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'a'}'\nnum_repeats = 4")
    [spec] = load_blueprints(make_args(dataset_config=write(tmp_path / "ok.toml", text)))
    assert (spec.resolution, spec.subsets[0].num_repeats) == ((64, 64), 4)


# --------------------------------------------------------------------------------------------------
# Data problems: one DataError naming the path


def test_missing_folder_empty_dataset_and_broken_image(tmp_path):
    with pytest.raises(DataError, match=f"--train_data_dir {tmp_path / 'nowhere'}: folder not found"):
        build(train_data_dir=str(tmp_path / "nowhere"), resolution="64")
    (tmp_path / "train" / "2_empty").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found in .*2_empty"):
        build(train_data_dir=str(tmp_path / "train"), resolution="64")
    image(tmp_path / "train" / "2_empty" / "good.png")
    (tmp_path / "train" / "2_empty" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        build(train_data_dir=str(tmp_path / "train"), resolution="64")
    config = write(tmp_path / "d.toml", f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\n"
                                        f"image_dir = '{tmp_path / 'missing'}'")
    with pytest.raises(DataError, match=r"image folder not found: .*missing"):
        build(dataset_config=config)
    with pytest.raises(DataError, match=r"reg.*folder not found"):
        build(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), resolution="64")


# --------------------------------------------------------------------------------------------------
# Regularization images


def test_reg_images_are_cycled_to_the_train_count_and_weighted(tmp_path):
    for name in "ab":
        image(tmp_path / "train" / "3_sks dog" / f"{name}.png")
    for name in "cdef":
        image(tmp_path / "reg" / "1_dog" / f"{name}.png", color=(0, 0, 200))
    (tmp_path / "reg" / "1_empty").mkdir()  # sd-scripts warns and leaves it out
    dataset = build(train_data_dir=str(tmp_path / "train"), reg_data_dir=str(tmp_path / "reg"), resolution="64",
                    prior_loss_weight=0.25)
    assert (dataset.num_train_images, dataset.num_reg_images, dataset.num_reg_samples) == (6, 4, 6)
    per_image = Counter()
    weights = []
    for batch in dataset.batches_for_epoch(0, seed=1):
        loaded = dataset.load_batch(batch, gen(0))
        for ref, weight in zip(batch, loaded["loss_weights"].tolist()):
            entry = dataset.entry(ref)
            per_image[Path(entry.path).name] += 1
            weights.append((entry.subset.is_reg, weight))
    assert per_image == {"a.png": 3, "b.png": 3, "c.png": 2, "d.png": 2, "e.png": 1, "f.png": 1}
    assert set(weights) == {(False, 1.0), (True, 0.25)}
    assert dataset.reg_dataset_dirs == {"1_dog": {"n_repeats": 1, "img_count": 4}}


# --------------------------------------------------------------------------------------------------
# Buckets and cropping


def test_bucket_resolutions_match_sd_scripts():
    assert make_bucket_resolutions((64, 64), 32, 128, 16) == [
        (32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]


def test_images_of_different_aspect_land_in_their_buckets(tmp_path):
    folder = tmp_path / "2_x"
    for i in range(3):
        image(folder / f"wide{i}.png", (96, 64))
        image(folder / f"tall{i}.png", (64, 96))
    image(folder / "square.png", (64, 64))
    dataset = build(train_data_dir=str(tmp_path), resolution="64", enable_bucket=True, min_bucket_reso=32,
                    max_bucket_reso=128, bucket_reso_steps=16, train_batch_size=4)
    buckets = {Path(e.path).stem[:4]: e.bucket for e in dataset.datasets[0].entries}
    assert buckets == {"wide": (80, 48), "tall": (48, 80), "squa": (64, 64)}
    info = dataset.bucket_info
    assert [(b["resolution"], b["count"]) for b in info["buckets"].values()] == [([48, 80], 6), ([64, 64], 2),
                                                                               ([80, 48], 6)]
    assert info["mean_img_ar_error"] == pytest.approx((3 * (80 / 48 - 96 / 64) + 3 * (64 / 96 - 48 / 80)) / 7)
    batches = dataset.batches_for_epoch(0, seed=0)
    assert len(batches) == dataset.num_batches_per_epoch == 2 + 1 + 2
    for batch in batches:
        assert len({dataset.entry(ref).bucket for ref in batch}) == 1
        w, h = dataset.entry(batch[0]).bucket
        assert dataset.load_batch(batch, gen(0))["images"].shape == (len(batch), 3, h, w)


def test_bucket_no_upscale_keeps_small_images_small(tmp_path):
    image(tmp_path / "1_x" / "small.png", (40, 40))
    image(tmp_path / "1_x" / "big.png", (200, 100))
    dataset = build(train_data_dir=str(tmp_path), resolution="64", enable_bucket=True, min_bucket_reso=64,
                    bucket_reso_steps=16, bucket_no_upscale=True)
    found = {Path(e.path).stem: (e.bucket, e.resized) for e in dataset.datasets[0].entries}
    assert found == {"small": ((32, 32), (40, 40)), "big": ((64, 32), (64, 32))}


def test_min_bucket_reso_above_the_resolution_is_an_error(tmp_path):
    image(tmp_path / "1_x" / "a.png")
    with pytest.raises(DataError, match="min_bucket_reso 256 is larger than the resolution 64x64"):
        build(train_data_dir=str(tmp_path), resolution="64", enable_bucket=True)


def three_stripes(path: Path) -> None:
    """96x64: red, green, blue columns of 32 px."""
    pixels = np.zeros((64, 96, 3), dtype=np.uint8)
    pixels[:, :32, 0] = pixels[:, 32:64, 1] = pixels[:, 64:, 2] = 255
    path.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(path)


def test_without_buckets_images_are_centre_cropped_random_cropped_and_flipped(tmp_path):
    three_stripes(tmp_path / "1_x" / "a.png")
    dataset = build(train_data_dir=str(tmp_path), resolution="64")
    [batch] = dataset.batches_for_epoch(0, 0)
    pixels = dataset.load_batch(batch, gen(0))["images"][0]
    assert pixels.shape == (3, 64, 64) and pixels.min() == -1 and pixels.max() == 1
    red = (pixels[0] == 1).all(dim=0)  # columns that are red: the crop starts 16 px in
    assert red.tolist() == [True] * 16 + [False] * 48
    assert (pixels[2] == 1).all(dim=0).tolist() == [False] * 48 + [True] * 16

    cropped = build(train_data_dir=str(tmp_path), resolution="64", random_crop=True)
    starts = {int((cropped.load_batch(batch, gen(seed))["images"][0][0] == 1).all(dim=0).sum()) for seed in range(12)}
    assert len(starts) > 3 and all(0 <= s <= 32 for s in starts)  # 32 - offset red columns

    flipping = build(train_data_dir=str(tmp_path), resolution="64", flip_aug=True)
    loaded = [flipping.load_batch(batch, gen(seed)) for seed in range(8)]
    assert {b["flipped"][0] for b in loaded} == {True, False}
    for b in loaded:
        expected = pixels.flip(-1) if b["flipped"][0] else pixels
        assert torch.equal(b["images"][0], expected)
    assert torch.equal(flipping.load_batch(batch, gen(5))["images"], loaded[5]["images"])


# --------------------------------------------------------------------------------------------------
# Batch order


def test_batches_for_epoch_depend_only_on_seed_and_epoch(tmp_path):
    for i in range(10):
        image(tmp_path / "2_x" / f"{i}.png")
    dataset = build(train_data_dir=str(tmp_path), resolution="64", train_batch_size=3)
    again = build(train_data_dir=str(tmp_path), resolution="64", train_batch_size=3)
    order = dataset.batches_for_epoch(1, seed=7)
    assert order == again.batches_for_epoch(1, seed=7)
    assert order != dataset.batches_for_epoch(2, seed=7)
    assert order != dataset.batches_for_epoch(1, seed=8)
    assert dataset.num_batches_per_epoch == len(order) == 7  # 20 samples, batches of 3
    assert Counter(ref for batch in order for ref in batch) == {ItemRef(0, i): 2 for i in range(10)}


# --------------------------------------------------------------------------------------------------
# Latent caching


class FakeVAE:
    """Average-pools 8x8 blocks: latents that are easy to predict."""

    def __init__(self):
        self.encoded = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += images.shape[0]
        return F.avg_pool2d(images, 8)


def test_latents_cached_in_memory_replace_images(tmp_path):
    three_stripes(tmp_path / "1_x" / "a.png")
    dataset = build(train_data_dir=str(tmp_path), resolution="64", flip_aug=True)
    [batch] = dataset.batches_for_epoch(0, 0)
    first = dataset.load_batch(batch, gen(0))
    pixels = first["images"].flip(-1) if first["flipped"][0] else first["images"]  # as on disk
    vae = FakeVAE()
    dataset.cache_latents(vae, to_disk=False)
    assert vae.encoded == 2  # the image and its mirror
    for seed in range(6):
        loaded = dataset.load_batch(batch, gen(seed))
        assert "images" not in loaded and loaded["latents"].shape == (1, 3, 8, 8)
        source = pixels.flip(-1) if loaded["flipped"][0] else pixels
        assert torch.allclose(loaded["latents"], F.avg_pool2d(source, 8))
    assert not list(tmp_path.rglob("*.npz"))


def test_latents_cached_to_disk_are_reused(tmp_path):
    for i in range(3):
        image(tmp_path / "1_x" / f"{i}.png", color=(10 * i, 0, 0))
    vae = FakeVAE()
    build(train_data_dir=str(tmp_path), resolution="64").cache_latents(vae, to_disk=True, batch_size=2)
    assert vae.encoded == 3
    cache = tmp_path / "1_x" / "0_64x64.npz"
    assert sorted(p.name for p in tmp_path.rglob("*.npz")) == ["0_64x64.npz", "1_64x64.npz", "2_64x64.npz"]
    second = build(train_data_dir=str(tmp_path), resolution="64")
    second.cache_latents(vae, to_disk=True)
    assert vae.encoded == 3  # nothing encoded again
    assert torch.equal(second.datasets[0].entries[0].latents, torch.from_numpy(np.load(cache)["latents"]))

    np.savez(cache, latents=np.zeros((4, 4, 4), dtype=np.float32))  # wrong size: encoded again
    build(train_data_dir=str(tmp_path), resolution="64").cache_latents(vae, to_disk=True)
    assert vae.encoded == 4
    build(train_data_dir=str(tmp_path), resolution="64", flip_aug=True).cache_latents(vae, to_disk=True)
    assert vae.encoded == 4 + 6  # no flipped latents in the files yet: each image and its mirror


def test_latent_caching_refuses_random_crop(tmp_path):
    image(tmp_path / "1_x" / "a.png")
    dataset = build(train_data_dir=str(tmp_path), resolution="64", random_crop=True)
    with pytest.raises(DataError, match="cannot be used with random_crop"):
        dataset.cache_latents(FakeVAE(), to_disk=False)


# --------------------------------------------------------------------------------------------------
# Example images


def test_example_data_regenerates_byte_for_byte(tmp_path):
    written = example_images.write_example_dataset(str(tmp_path))
    shipped = Path(example_images.PACKAGE_COPY)
    relative = sorted(os.path.relpath(p, tmp_path) for p in written)
    assert relative == sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    for name in relative:
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), name
    # 11 uncompressed 64x64 RGB PNGs (12.4 KB each) and captions
    assert sum((shipped / name).stat().st_size for name in relative) < 140_000


def test_example_data_is_a_valid_dreambooth_dataset():
    shipped = Path(example_images.PACKAGE_COPY)
    dataset = build(train_data_dir=str(shipped / "train"), reg_data_dir=str(shipped / "reg"), resolution="64",
                    caption_extension=".txt", shuffle_caption=True, keep_tokens=1)
    assert (dataset.num_train_images, dataset.num_reg_images, dataset.num_reg_samples) == (25, 5, 25)
    captions = sorted(e.caption for e in dataset.datasets[0].entries)
    assert captions[0] == "a photo of a toy" and captions[-1] == "a photo of sks toy"
    with Image.open(shipped / "train" / "5_sks toy" / "img_1.png") as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape == (64, 64, 3) and len({tuple(p) for p in pixels.reshape(-1, 3)}) >= 5
    [batch] = [b for b in dataset.batches_for_epoch(0, 0)][:1]
    assert dataset.load_batch(batch, gen(0))["images"].shape == (1, 3, 64, 64)
