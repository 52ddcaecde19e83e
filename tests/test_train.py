"""train_para.py end to end on the embedded tiny models: files, metadata, learning, resume, processes, bad input."""

import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from para_trainer.models import tiny as tiny_models
from para_trainer.training.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "para_trainer", "example_data")


def base_args(out, model="builtin:tiny-sd1", steps=3, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", os.path.join(DATA, "train"),
            "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(out), "--output_name", "run",
            "--network_dim", "2", "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "7",
            *extra]


def read_file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("model, version, architecture", [
    ("builtin:tiny-sd1", "sd_v1", "stable-diffusion-v1/lora"),
    ("builtin:tiny-sd2", "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
    ("builtin:tiny-sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_end_to_end_on_each_tiny_model(model, version, architecture, tmp_path):
    assert main(base_args(tmp_path, model, 2, "--network_args", "conv_dim=2")) == 0
    tensors, metadata = read_file(tmp_path / "run.safetensors")
    assert metadata["ss_base_model_version"] == version
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["ss_network_module"] == "networks.para"
    assert metadata["ss_steps"] == "2" and metadata["ss_network_dim"] == "2"
    assert metadata["ss_network_args"] == '{"conv_dim": "2", "dropout": null}'
    assert all(k.endswith(".para_q") for k in tensors)
    if version.startswith("sdxl"):
        assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
        assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in tensors)
    rows = list(csv.DictReader(open(tmp_path / "run_train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    # the exact LoRA/LoCon export is written beside the native file, for the same base
    lora, lora_metadata = read_file(tmp_path / "run_lora.safetensors")
    assert lora_metadata["para.base_fingerprint"] == metadata["para.base_fingerprint"]
    assert lora_metadata["ss_network_module"] == "networks.lora"
    assert {k.split(".")[0] for k in lora} == {k.split(".")[0] for k in tensors}
    assert any(t.dim() == 4 and t.shape[-1] == 3 for k, t in lora.items() if k.endswith("lora_down.weight"))


def test_no_export_lora_writes_only_the_native_file(tmp_path):
    assert main(base_args(tmp_path, "builtin:tiny-sd1", 1, "--no_export_lora")) == 0
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["run.safetensors"]


def test_resume_ends_with_the_same_adapter(tmp_path):
    whole = tmp_path / "whole"
    assert main(base_args(whole, "builtin:tiny-sd1", 6, "--train_batch_size", "2")) == 0
    first = tmp_path / "first"
    assert main(base_args(first, "builtin:tiny-sd1", 6, "--train_batch_size", "2", "--save_every_n_steps", "3",
                          "--save_state")) == 0
    state = first / "run-step00000003-state"
    assert (state / "train_state.json").exists()
    resumed = tmp_path / "resumed"
    assert main(base_args(resumed, "builtin:tiny-sd1", 6, "--train_batch_size", "2", "--resume", str(state))) == 0
    expected, _ = read_file(whole / "run.safetensors")
    got, _ = read_file(resumed / "run.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_8bit_optimizer_step_on_cpu(tmp_path):
    assert main(base_args(tmp_path, "builtin:tiny-sd1", 2, "--optimizer_type", "AdamW8bit")) == 0
    _, metadata = read_file(tmp_path / "run.safetensors")
    assert metadata["ss_optimizer"].startswith("bitsandbytes.optim.adamw.AdamW8bit")


def two_image_dataset(tmp_path):
    folder = tmp_path / "data" / "1_sks toy"
    folder.mkdir(parents=True)
    source = os.path.join(DATA, "train", "5_sks toy")
    for name in sorted(os.listdir(source))[:4]:  # two images and their captions
        shutil.copy(os.path.join(source, name), folder / name)
    assert len(list(folder.glob("*.png"))) == 2
    return str(folder.parent)


def test_two_processes_on_halves_equal_one_process_on_the_whole_batch(tmp_path):
    """One step: two gloo processes with one image each, gradients averaged, against one process with both images.
    Every sample draws its noise from its own generator, so both runs see the same noise. Plain SGD keeps the
    update proportional to the gradient (Adam's first step is a sign and would hide a wrong average)."""
    data = two_image_dataset(tmp_path)
    common = ["--train_data_dir", data, "--optimizer_type", "torch.optim.SGD", "--learning_rate", "0.5",
              "--max_grad_norm", "0"]
    one = tmp_path / "one"
    assert main(base_args(one, "builtin:tiny-sd1", 1, "--train_batch_size", "2", *common)) == 0
    two = tmp_path / "two"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
               os.path.join(ROOT, "train_para.py"),
               *base_args(two, "builtin:tiny-sd1", 1, "--train_batch_size", "1", *common)]
    # two processes on the same cores: OpenMP threads that spin while they wait would starve the other process
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, _ = read_file(one / "run.safetensors")
    got, _ = read_file(two / "run.safetensors")
    assert "x 2 processes" in result.stderr
    untrained = tmp_path / "untrained"  # the same run with a vanishing step: where B started
    assert main(base_args(untrained, "builtin:tiny-sd1", 1, "--train_batch_size", "2", *common[:4],
                          "--learning_rate", "1e-12", "--max_grad_norm", "0")) == 0
    start, _ = read_file(untrained / "run.safetensors")
    difference = max((expected[k] - got[k]).abs().max().item() for k in expected)
    movement = max((expected[k] - start[k]).abs().max().item() for k in expected)
    print(f"1-process vs 2-process adapters differ by {difference:.2e}; the step moved Q by {movement:.2e}")
    assert movement > 1e-3 and difference < 1e-5
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # only the main process wrote files


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear error, a non-zero exit and no output files


@pytest.mark.parametrize("change, message", [
    (["--train_data_dir", "/no/such/folder"], "/no/such/folder"),
    (["--optimizer_type", "AdamQ"], "unknown --optimizer_type 'AdamQ'"),
    (["--xformers"], "--sdpa"),
    (["--pretrained_model_name_or_path", "/no/such/model.safetensors"], "model.safetensors"),
    (["--network_args", "preset=exka"], "did you mean 'exca'"),
])
def test_bad_input_one_error_no_files(change, message, tmp_path, capsys):
    out = tmp_path / "out"
    args = base_args(out, "builtin:tiny-sd1", 2)
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1:args.index(change[i]) + 2] = change[i + 1:i + 2]
        else:
            args += change[i:i + 2]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert not out.exists() or not any(out.iterdir())


def test_empty_dataset_and_non_image_file(tmp_path, capsys):
    empty = tmp_path / "empty" / "3_sks toy"
    empty.mkdir(parents=True)
    assert main(base_args(tmp_path / "out1", "builtin:tiny-sd1", 2)[:2] + ["--train_data_dir", str(empty.parent)]
                + base_args(tmp_path / "out1")[4:]) == 2
    assert "no images" in capsys.readouterr().err
    bad = tmp_path / "bad" / "3_sks toy"
    bad.mkdir(parents=True)
    (bad / "a.png").write_bytes(b"this is not a png")
    assert main(base_args(tmp_path / "out2")[:2] + ["--train_data_dir", str(bad.parent)]
                + base_args(tmp_path / "out2")[4:]) == 2
    assert "a.png" in capsys.readouterr().err
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_bad_toml_key_is_named_with_a_suggestion(tmp_path, capsys):
    config = tmp_path / "my.toml"
    config.write_text('[training]\nlearning_rat = 1e-4\n')
    assert main(base_args(tmp_path / "out") + ["--config_file", str(config)]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Model sources, data configs, precision


def test_single_file_checkpoint_and_diffusers_folder_as_base(tmp_path):
    import hashlib

    from para_trainer.models.checkpoint import save_single_file

    single = tmp_path / "tiny-sd1.safetensors"
    save_single_file(tiny_models.build_tiny_pipeline("sd1"), single)  # the original SD key layout
    assert main(base_args(tmp_path / "a", str(single), 2)) == 0
    _, metadata = read_file(tmp_path / "a" / "run.safetensors")
    assert metadata["ss_sd_model_name"] == "tiny-sd1.safetensors"
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(single.read_bytes()).hexdigest()
    folder = tiny_models.save_tiny_pipeline("sd1", tmp_path / "tiny-sd1-folder")
    assert main(base_args(tmp_path / "b", str(folder), 2)) == 0
    _, metadata = read_file(tmp_path / "b" / "run.safetensors")
    assert metadata["ss_sd_model_hash"] == "IsADirectory"  # as sd-scripts writes for folders
    # the same weights in three forms train to the same adapter
    assert main(base_args(tmp_path / "c", "builtin:tiny-sd1", 2)) == 0
    adapters = [read_file(tmp_path / d / "run.safetensors")[0] for d in "abc"]
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]) and torch.equal(adapters[1][key], adapters[2][key])


def test_dataset_config_with_buckets_and_reg_images(tmp_path):
    from PIL import Image

    wide, tall = tmp_path / "wide" , tmp_path / "tall"
    for folder, size in ((wide, (96, 32)), (tall, (32, 96))):
        folder.mkdir()
        for i in range(2):
            Image.new("RGB", size, (40 * i, 120, 200)).save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text("a photo of sks toy")
    config = tmp_path / "dataset.toml"
    config.write_text(f'''[general]
caption_extension = ".txt"
[[datasets]]
resolution = 64
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "{wide}"
  num_repeats = 2
  [[datasets.subsets]]
  image_dir = "{tall}"
  [[datasets.subsets]]
  image_dir = "{DATA}/reg/1_toy"
  class_tokens = "toy"
  is_reg = true
''')
    args = base_args(tmp_path / "out", "builtin:tiny-sd1", 3)
    args = args[:2] + args[4:] + ["--dataset_config", str(config)]  # no --train_data_dir
    assert main(args) == 2  # bucket_reso_steps 32 is for SDXL: sd-scripts asks a multiple of 64 for SD1
    assert main([a.replace("tiny-sd1", "tiny-sdxl") for a in args]) == 0
    _, metadata = read_file(tmp_path / "out" / "run.safetensors")
    import json

    datasets = json.loads(metadata["ss_datasets"])
    buckets = datasets[0]["bucket_info"]["buckets"]
    resolutions = sorted(tuple(b["resolution"]) for b in buckets.values())
    assert (96, 32) in resolutions and (32, 96) in resolutions  # wide and tall images keep their shape
    assert (64, 64) in resolutions  # the square regularisation images
    assert metadata["ss_num_reg_images"] == "5"


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path):
    assert main(base_args(tmp_path / "plain", "builtin:tiny-sd1", 2, "--train_batch_size", "2")) == 0
    assert main(base_args(tmp_path / "ckpt", "builtin:tiny-sd1", 2, "--train_batch_size", "2",
                          "--gradient_checkpointing")) == 0
    plain, _ = read_file(tmp_path / "plain" / "run.safetensors")
    checkpointed, metadata = read_file(tmp_path / "ckpt" / "run.safetensors")
    assert metadata["ss_gradient_checkpointing"] == "True"
    for key in plain:
        assert torch.allclose(plain[key], checkpointed[key], atol=1e-6), key


@pytest.mark.parametrize("precision", [["bf16"], ["bf16", "--full_bf16"], ["fp16", "--full_fp16"]])
def test_mixed_precision_runs_stay_finite(precision, tmp_path):
    args = base_args(tmp_path, "builtin:tiny-sd1", 3, "--mixed_precision", *precision,
                     "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"))
    assert main(args) == 0
    tensors, metadata = read_file(tmp_path / "run.safetensors")
    assert metadata["ss_mixed_precision"] == precision[0]
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert any("tfevents" in name for _, _, files in os.walk(tmp_path / "logs") for name in files)


def test_uncached_hub_model_offline_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(base_args(tmp_path / "out", "someone/not-a-cached-model", 2)) == 2
    err = capsys.readouterr().err
    assert "someone/not-a-cached-model" in err and "HF_HUB_OFFLINE" in err


def test_bad_sample_prompt_file_stops_before_writing(tmp_path, capsys):
    prompts = tmp_path / "prompts.toml"
    prompts.write_text("[prompt\n")  # broken TOML
    out = tmp_path / "out"
    assert main(base_args(out, "builtin:tiny-sd1", 2, "--sample_prompts", str(prompts))) == 2
    assert "prompts.toml" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_lycoris_file_keeps_sd_scripts_text_encoder_names_for_the_webuis_and_loads_back(tmp_path):
    """LyCORIS under transformers 5 names text-encoder modules lora_te_encoder_layers_..., which no front end reads
    (CLIPTextModel lost its text_model level); the trainer saves them under sd-scripts' names, diffusers' kohya
    loader then changes the text encoder as our tools do, and --network_weights loads every weight back into
    LyCORIS."""
    from lycoris import kohya

    from para_trainer.files.adapter_files import apply_adapters, read_adapter
    from para_trainer.files.export import load_base_model
    from para_trainer.training.train import load_network_weights

    assert main(base_args(tmp_path, "builtin:tiny-sd1", 2, "--network_module", "lycoris.kohya", "--network_args",
                          "algo=locon", "preset=attn-mlp", "--learning_rate", "1e-2")) == 0
    path = str(tmp_path / "run.safetensors")
    tensors, _ = read_file(path)
    modules = {key.partition(".")[0] for key in tensors if key.startswith("lora_te")}
    assert modules and all(name.startswith("lora_te_text_model_encoder_layers_") for name in modules)

    ours = load_base_model("builtin:tiny-sd1")
    ids = ours.tokenizers[0](["a photo of sks toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base = ours.text_encoder_for_network(ids)[0]
        apply_adapters(ours, [(read_adapter(path), 1.0)])
        want = ours.text_encoder_for_network(ids)[0]
        theirs = load_base_model("builtin:tiny-sd1").pipeline
        theirs.load_lora_weights(path)
        got = theirs.text_encoder(ids)[0]
    assert (want - base).norm() > 1e-5
    assert (got - want).norm() / (want - base).norm() < 1e-3

    fresh = load_base_model("builtin:tiny-sd1")
    network = kohya.create_network(1.0, 2, 1.0, fresh.vae, fresh.text_encoder_for_network, fresh.unet, algo="locon",
                                   preset="attn-mlp")
    network.apply_to(fresh.text_encoder_for_network, fresh.unet, True, True)
    info = load_network_weights(network, path)
    assert not info.get("unexpected keys") and not info.get("missing keys")
    state = network.state_dict()
    loaded = {key.replace("lora_te_encoder_layers_", "lora_te_text_model_encoder_layers_"): value
              for key, value in state.items()}
    assert all(torch.equal(loaded[key], tensors[key].to(loaded[key].dtype)) for key in tensors)
