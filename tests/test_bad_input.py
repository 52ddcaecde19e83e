"""Mistakes a new user makes: one clear message naming the problem, a non-zero exit, and no file left behind.

The cases of the rough-edges issue, each run through the command a user types (the trainer's main, or the
`para-trainer` CLI in-process); the messages are checked for the option or file they must name.
"""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from para_trainer.training.train import main as train_main

from commands import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "para_trainer", "example_data")


def train_args(out, *extra, steps=2, data=os.path.join(DATA, "train"), model="builtin:tiny-sd1"):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "64", "--output_dir", str(out), "--output_name", "run", "--network_dim", "2",
            "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--seed", "7", *map(str, extra)]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def read_file(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """An SD1 and an SDXL native file and the SD1 file's LoRA export, trained 1 step; and the SD1 file with NaN."""
    root = tmp_path_factory.mktemp("adapters")
    assert train_main(train_args(root / "sd1", steps=1)) == 0
    assert train_main(train_args(root / "sdxl", steps=1, model="builtin:tiny-sdxl")) == 0
    tensors, metadata = read_file(root / "sd1" / "run.safetensors")
    key = sorted(tensors)[3]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(root / "nan.safetensors"), metadata)
    return {"sd1": root / "sd1" / "run.safetensors", "sd1_lora": root / "sd1" / "run_lora.safetensors",
            "sdxl": root / "sdxl" / "run.safetensors", "nan": root / "nan.safetensors", "nan_key": key}


# --------------------------------------------------------------------------------------------------
# Wrong results that used to exit 0


def test_zero_steps_is_refused(tmp_path, capsys):
    assert train_main(train_args(tmp_path / "out", steps=0)) == 2
    line = error_line(capsys)
    assert "--max_train_steps 0: train at least 1 step" in line and "is not a no-op" in line
    assert not (tmp_path / "out").exists()


def test_images_trained_on_the_folder_name_are_counted(tmp_path, caplog):
    folder = tmp_path / "data" / "2_sks toy"
    folder.mkdir(parents=True)
    for name in ("img_1.png", "img_2.png", "img_3.png"):
        shutil.copy(os.path.join(DATA, "train", "5_sks toy", name), folder / name)
    (folder / "img_1.caption").write_text("a photo of sks toy on the beach\n")
    args = train_args(tmp_path / "out", steps=1, data=tmp_path / "data")
    args[args.index("--caption_extension") + 1] = ".caption"
    assert train_main(args) == 0
    assert any("2 of 3 images have no .caption caption file" in r.message and "'sks toy'" in r.message
               for r in caplog.records if r.levelname == "WARNING")


def test_txt_captions_with_the_default_caption_extension(tmp_path, capsys):
    args = train_args(tmp_path / "out")
    del args[args.index("--caption_extension"):args.index("--caption_extension") + 2]  # left at .caption
    assert train_main(args) == 2
    line = error_line(capsys)
    assert "no image has a .caption caption file" in line and "5 of 5 have a .txt file" in line
    assert "--caption_extension .txt" in line
    assert not (tmp_path / "out").exists()


def test_a_caption_file_that_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "data" / "1_sks toy"
    folder.mkdir(parents=True)
    shutil.copy(os.path.join(DATA, "train", "5_sks toy", "img_1.png"), folder / "img_1.png")
    (folder / "img_1.txt").mkdir()
    assert train_main(train_args(tmp_path / "out", data=tmp_path / "data")) == 2
    assert f"caption file {folder / 'img_1.txt'} is a folder" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_network_weights_of_another_architecture(adapters, tmp_path, capsys):
    assert train_main(train_args(tmp_path / "out", "--network_weights", adapters["sdxl"])) == 2
    line = error_line(capsys)
    assert "does not fit this model: 0 of its" in line and "sdxl_base_v1-0" in line
    assert not (tmp_path / "out").exists()


def test_network_weights_with_no_adapter_module(tmp_path, capsys):
    save_file({"some.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    assert train_main(train_args(tmp_path / "out", "--network_weights", tmp_path / "other.safetensors")) == 2
    assert "holds no adapter modules (its keys: some)" in error_line(capsys)


def test_a_lora_file_as_network_weights(adapters, tmp_path, capsys):
    assert train_main(train_args(tmp_path / "out", "--network_weights", adapters["sd1_lora"])) == 2
    line = error_line(capsys)
    assert "is a LoRA file; networks.para continues training only from its own native PaRa files" in line
    assert "--to merged" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["export", "merge", "sample", "train"])
def test_every_command_refuses_nan(adapters, command, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {"export": ["export", adapters["nan"], "--model", "builtin:tiny-sd1", "-o", out / "x.safetensors"],
            "merge": ["merge", adapters["nan"], adapters["sd1"], "-o", out / "x.safetensors"],
            "sample": ["sample", "--model", "builtin:tiny-sd1", "--network", adapters["nan"], "--prompt", "a toy",
                       "--out", out],
            "train": ["train", *train_args(out, "--network_weights", adapters["nan"])]}[command]
    assert run_cli(*argv) == 2
    line = error_line(capsys)
    assert "holds NaN or Inf in 1 of its" in line and adapters["nan_key"] in line
    assert files_in(out) == []


def test_inspect_says_a_file_holds_nan(adapters, capsys):
    assert run_cli("inspect", adapters["nan"]) == 0
    assert f"note: 1 tensors hold NaN or Inf (e.g. {adapters['nan_key']})" in capsys.readouterr().out
    assert run_cli("inspect", adapters["sd1"]) == 0
    assert "NaN" not in capsys.readouterr().out


def test_merge_of_sd1_and_sdxl_files(adapters, tmp_path, capsys):
    assert run_cli("merge", adapters["sdxl"], adapters["sd1"], "-o", tmp_path / "x.safetensors") == 2
    line = error_line(capsys)
    assert "is an SDXL adapter and" in line and "is an SD1 adapter" in line
    assert files_in(tmp_path) == []


def test_resume_appends_to_the_log_without_duplicates(tmp_path):
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert train_main(train_args(whole, steps=6)) == 0
    assert train_main(train_args(run, "--save_every_n_steps", "3", "--save_state", steps=6)) == 0
    log = run / "run_train_log.csv"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:5]) + "\n")  # the run was killed after step 4; its last state is step 3
    (run / ".tmp-abcd.safetensors").write_bytes(b"half a file")  # what a SIGKILL during a save leaves
    assert train_main(train_args(run, "--resume", run / "run-step00000003-state", steps=6)) == 0
    rows = list(csv.DictReader(open(log)))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in csv.DictReader(open(whole / "run_train_log.csv"))]
    assert not (run / ".tmp-abcd.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs as asked on a CUDA GPU")
def test_fp16_on_a_cpu_says_what_runs(tmp_path, caplog):
    assert train_main(train_args(tmp_path, "--mixed_precision", "fp16", steps=1)) == 0
    assert any("runs fp16 on a CPU as float32" in r.message for r in caplog.records if r.levelname == "WARNING")
    _, metadata = read_file(tmp_path / "run.safetensors")
    assert metadata["ss_mixed_precision"] == "no"


SIMULATED_AVX512_BF16 = r'''
import importlib.util, sys, types
calls = []
fake = types.ModuleType("kernels")
def get_kernel(*args, **kwargs):
    calls.append(args)
    raise RuntimeError("no network here")
fake.get_kernel = get_kernel
sys.modules["kernels"] = fake

class Loader:
    def __init__(self, loader): self.loader = loader
    def create_module(self, spec): return self.loader.create_module(spec)
    def exec_module(self, module):
        self.loader.exec_module(module)
        module.has_avx512bf16 = lambda: True  # as on a CPU with AVX512-BF16: bitsandbytes asks the Hub for a kernel

class AVX512BF16:
    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        spec.loader = Loader(spec.loader)
        return spec

sys.meta_path.insert(0, AVX512BF16())
if sys.argv[1] == "protected":
    from para_trainer.training.optimizers import keep_bitsandbytes_offline
    keep_bitsandbytes_offline()
import bitsandbytes  # diffusers imports it so whenever a command loads a model
print("get_kernel calls:", len(calls), sys.modules.get("kernels") is fake)
'''


def test_bitsandbytes_stays_offline_and_quiet(tmp_path):
    pytest.importorskip("bitsandbytes")
    script = tmp_path / "simulate.py"
    script.write_text(SIMULATED_AVX512_BF16)
    results = {}
    for mode in ("bare", "protected"):
        done = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        results[mode] = (done.stdout.strip().splitlines()[-1], done.stderr)
    # the simulation is real: unprotected, bitsandbytes reaches for the Hub and warns
    assert results["bare"][0] == "get_kernel calls: 1 True" and "kernels-community" in results["bare"][1]
    assert results["protected"][0] == "get_kernel calls: 0 True"
    assert "kernels-community" not in results["protected"][1]


# --------------------------------------------------------------------------------------------------
# One line instead of a traceback


@pytest.mark.parametrize("extra, expected", [
    (["--network_dim", "0"], "--network_dim 0: the rank must be a whole number above 0"),
    (["--network_dim", "-4"], "--network_dim -4: the rank must be a whole number above 0"),
    (["--learning_rate", "-1"], "--learning_rate -1.0: a learning rate cannot be negative"),
    (["--lr_scheduler", "bogus"], "--lr_scheduler bogus is not supported by para-trainer: use one of constant (the "
                                  "default), constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial"),
    (["--optimizer_args", "weight_decay=abc"], "--optimizer_args weight_decay=abc: AdamW refused this value"),
])
def test_bad_numbers_and_names(extra, expected, tmp_path, capsys):
    assert train_main(train_args(tmp_path / "out", *extra)) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_dir_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert train_main(train_args(tmp_path / "afile" / "sub")) == 2
    assert f"--output_dir {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder" in \
        error_line(capsys)


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert train_main(train_args(tmp_path, steps=1)) == 2
    line = error_line(capsys)
    assert line == (f"error: could not write {tmp_path / 'run.safetensors'}: No space left on device; nothing was "
                    "left under that name (free some space, or choose another --output_dir)")
    assert [name for name in files_in(tmp_path) if name.endswith(".safetensors") or name.startswith(".tmp")] == []


def test_empty_model_and_adapter_files(tmp_path, capsys):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    args = train_args(tmp_path / "out")
    args[1] = str(tmp_path / "empty.safetensors")
    assert train_main(args) == 2
    assert f"{tmp_path / 'empty.safetensors'} is empty (0 bytes)" in error_line(capsys)
    assert run_cli("export", tmp_path / "empty.safetensors", "--model", "builtin:tiny-sd1", "-o",
                   tmp_path / "x.safetensors") == 2
    assert "is empty (0 bytes)" in error_line(capsys)
    assert run_cli("inspect", tmp_path / "empty.safetensors") == 2
    assert error_line(capsys) == f"error: {tmp_path / 'empty.safetensors'} is empty (0 bytes): the download or copy " \
                                 "did not finish; fetch it again"


def test_resume_with_another_rank(tmp_path, capsys):
    assert train_main(train_args(tmp_path / "first", "--save_state", steps=1)) == 0
    assert train_main(train_args(tmp_path / "second", "--resume", tmp_path / "first" / "run-state",
                                 "--network_dim", "4")) == 2
    line = error_line(capsys)
    assert "the saved network has other shapes than this one" in line and "saved (" in line and ", 2), here (" in line
    assert "same --network_dim" in line
    assert files_in(tmp_path / "second") in ([], ["run_train_log.csv"])


@pytest.mark.parametrize("extra, expected", [
    (["--steps", "0"], "--steps 0: sample with at least 1 step"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is available here"),
])
def test_sample_options(extra, expected, tmp_path, capsys):
    if extra[0] == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert run_cli("sample", "--model", "builtin:tiny-sd1", "--prompt", "a toy", "--out", tmp_path / "out",
                   *extra) == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_sample_out_onto_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert run_cli("sample", "--model", "builtin:tiny-sd1", "--prompt", "a toy", "--out", tmp_path / "afile") == 2
    assert "is a file; --out names a folder" in error_line(capsys)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("command", [["tiny-model", "sd1"], ["tiny-model", "toy-sd1"], ["example-data"]])
def test_writing_under_a_file(command, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert run_cli(*command, tmp_path / "afile" / "x") == 2
    assert f"{tmp_path / 'afile'} is a file, not a folder" in error_line(capsys)


def test_a_vae_path_that_does_not_exist(tmp_path, capsys):
    assert train_main(train_args(tmp_path / "out", "--vae", tmp_path / "nope" / "vae.safetensors")) == 2
    line = error_line(capsys)
    assert f"--vae {tmp_path / 'nope' / 'vae.safetensors'}: no such file or folder" in line
    assert "internet" not in line


def test_a_strength_that_is_not_a_number(adapters, tmp_path, capsys):
    assert run_cli("merge", f"{adapters['sd1']}:abc", adapters["sd1"], "-o", tmp_path / "x.safetensors") == 2
    assert error_line(capsys) == f"error: {adapters['sd1']}:abc: the strength 'abc' is not a number; write FILE:0.8"


@pytest.mark.parametrize("repo", ["bad repo id!!", "a/b/c"])
def test_push_to_a_malformed_repo_id(adapters, repo, capsys):
    assert run_cli("push", adapters["sd1"], repo) == 2
    line = error_line(capsys)
    assert f"push: {repo!r} is not a repository id" in line and "hf://" not in line


def test_a_bad_value_for_a_known_prompt_option(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a photo of sks toy --w abc\n")
    assert run_cli("sample", "--model", "builtin:tiny-sd1", "--prompts-file", tmp_path / "prompts.txt", "--out",
                   tmp_path / "out") == 2
    assert "prompt 1: --w abc: write the width in pixels, a whole number (e.g. --w 512)" in error_line(capsys)
    assert train_main(train_args(tmp_path / "train", "--sample_prompts", tmp_path / "prompts.txt")) == 2
    assert "--w abc: write the width" in error_line(capsys)


def test_pickles_are_not_loaded(tmp_path, capsys):
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "code.pt")  # more than tensors: needs unpickling
    assert train_main(train_args(tmp_path / "out", "--network_weights", tmp_path / "code.pt")) == 2
    line = error_line(capsys)
    assert "is a pickle that holds more than tensors, and pickles are never unpickled here" in line
    assert ".safetensors" in line and "weights_only" not in line
    assert run_cli("inspect", tmp_path / "code.pt") == 2
    inspected = capsys.readouterr().err.strip().splitlines()
    assert len(inspected) == 1 and "pickles are never unpickled here" in inspected[0]


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    out, err_file = tmp_path / "out", tmp_path / "stderr.txt"
    env = dict(os.environ, PYTHONPATH=ROOT)
    # stderr goes to a file, not a pipe that nobody reads while it trains. And a suite started in the background
    # (`nohup ... &`) hands its children SIGINT ignored, which Python keeps: the child would train on. A user's
    # terminal sends Ctrl-C to Python's default handler, so the child gets that handler back.
    with open(err_file, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "para_trainer", "train",
                                    *train_args(out, "--save_every_n_steps", "2", "--save_state", steps=100000)],
                                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        log = out / "run_train_log.csv"
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) > 5 and (out / "run-step00000002-state").exists():
                break
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:  # kill it, or it trains on and slows every later test
            process.kill()
            process.wait()
            pytest.fail("training did not stop within 120 s of Ctrl-C:\n" + err_file.read_text()[-2000:])
    err = err_file.read_text()
    assert process.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "last saved state" in last and "--resume" in last
    assert "Traceback" not in err
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]
