"""The ComfyUI-PaRa node package against a stand-in of ComfyUI's LoRA loading (tests/comfy_standin, written from
ComfyUI's comfy/lora.py and comfy/weight_adapter/): `para-trainer comfyui install`, every module's ΔW = −m·QQᵀW,
files composed in load order, merged chains, the LoRA export agreeing, and what ComfyUI does without the node."""

import importlib.util
import logging
import os
import shutil
import sys

import pytest
from safetensors.torch import load_file

from networks.adapter_base import named_layers
from para_trainer.models.loading import load_models
from para_trainer.training.train import main as train_main

from commands import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "para_trainer", "example_data", "train")
STANDIN = os.path.join(ROOT, "tests", "comfy_standin", "comfy")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two native files trained on tiny-sd1 (text encoder, attention and 3x3 convs), their LoRA exports, and their
    sequential merge."""
    root = tmp_path_factory.mktemp("comfy_files")
    for name, seed in (("a", "7"), ("b", "8")):
        assert train_main(["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", DATA,
                           "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(root),
                           "--output_name", name, "--network_dim", "2", "--network_args", "conv_dim=2",
                           "--max_train_steps", "2", "--learning_rate", "1e-2", "--seed", seed]) == 0
    assert run_cli("merge", root / "a.safetensors", root / "b.safetensors", "-o", root / "ab.safetensors",
                   "--no-export-lora") == 0
    return root


@pytest.fixture(scope="module")
def model():
    class Args:
        pretrained_model_name_or_path = "builtin:tiny-sd1"
        v2 = v_parameterization = False
        vae = None

    models = load_models(Args())
    return {t.lora_name: t.layer.weight.detach().clone() for t in
            named_layers(models.text_encoder_for_network, models.unet)}


@pytest.fixture
def comfyui(tmp_path, monkeypatch):
    """A ComfyUI folder whose `comfy` package is the stand-in, importable as `comfy` for the test's duration."""
    root = tmp_path / "ComfyUI"
    shutil.copytree(STANDIN, root / "comfy")
    (root / "custom_nodes").mkdir()
    monkeypatch.syspath_prepend(str(root))
    ours = lambda name: name == "comfy" or name.startswith(("comfy.", "ComfyUI-PaRa"))  # noqa: E731
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if ours(name)}
    yield root
    for name in [name for name in sys.modules if ours(name)]:
        del sys.modules[name]
    sys.modules.update(saved)


def import_node(root):
    """Import custom_nodes/ComfyUI-PaRa the way ComfyUI imports a custom node folder: a package named after it."""
    folder = root / "custom_nodes" / "ComfyUI-PaRa"
    spec = importlib.util.spec_from_file_location("ComfyUI-PaRa", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI-PaRa"] = module
    spec.loader.exec_module(module)
    return module


def apply(files_and_strengths, model):
    """What the Load LoRA nodes do: each file's patches added in order, then every weight patched in float32."""
    import comfy.lora

    patches = {}
    for path, strength in files_and_strengths:
        for key, adapter in comfy.lora.load_lora(load_file(str(path)), {name: name for name in model}).items():
            patches.setdefault(key, []).append((strength, adapter, 1.0, None, None))
    return {key: comfy.lora.patched_weight(model[key], key_patches, key) for key, key_patches in patches.items()}


def relative_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def test_install_checks_the_folder_and_never_overwrites_silently(comfyui, tmp_path, capsys):
    assert run_cli("comfyui", "install", tmp_path / "nothing") == 2
    assert "is not a ComfyUI folder: comfy/ is missing" in capsys.readouterr().err
    old = tmp_path / "old"
    (old / "comfy").mkdir(parents=True)
    assert run_cli("comfyui", "install", old) == 2
    assert "has no comfy/weight_adapter/" in capsys.readouterr().err
    assert run_cli("comfyui", "install", comfyui) == 0
    node = comfyui / "custom_nodes" / "ComfyUI-PaRa"
    assert (node / "__init__.py").is_file() and (node / "para_core" / "para.py").is_file()
    assert (node / "para_core" / "para.py").read_bytes() == open(os.path.join(ROOT, "networks", "para.py"), "rb").read()
    assert run_cli("comfyui", "install", comfyui) == 0  # the same install again: nothing to do
    (node / "__init__.py").write_text("# edited\n")
    assert run_cli("comfyui", "install", comfyui) == 2
    assert "pass --force" in capsys.readouterr().err
    assert run_cli("comfyui", "install", comfyui, "--force") == 0
    assert "# edited" not in (node / "__init__.py").read_text()


@pytest.mark.parametrize("strength", [1.0, 0.5, -0.7])
def test_every_module_removes_its_directions(files, model, comfyui, strength):
    assert run_cli("comfyui", "install", comfyui) == 0
    import_node(comfyui)
    patched = apply([(files / "a.safetensors", strength)], model)
    tensors = load_file(str(files / "a.safetensors"))
    modules = {key.split(".")[0] for key in tensors}
    assert set(patched) == modules and any(model[name].dim() == 4 and model[name].shape[-1] == 3 for name in modules)
    for name in modules:
        w = model[name].float()
        q = tensors[f"{name}.para_q"].float()
        expected = -strength * (q @ (q.t() @ w.reshape(w.shape[0], -1))).reshape(w.shape)
        assert relative_error(patched[name].float() - w, expected) < 1e-5, name


def test_two_files_compose_in_load_order_and_a_merge_matches(files, model, comfyui):
    assert run_cli("comfyui", "install", comfyui) == 0
    import_node(comfyui)
    a, b = load_file(str(files / "a.safetensors")), load_file(str(files / "b.safetensors"))
    ab = apply([(files / "a.safetensors", 0.8), (files / "b.safetensors", 0.6)], model)
    ba = apply([(files / "b.safetensors", 0.6), (files / "a.safetensors", 0.8)], model)
    merged = apply([(files / "ab.safetensors", 1.0)], model)
    for name in ab:
        w = model[name].float().reshape(model[name].shape[0], -1)
        qa, qb = a[f"{name}.para_q"].float(), b[f"{name}.para_q"].float()
        first = w - 0.8 * qa @ (qa.t() @ w)
        expected = first - 0.6 * qb @ (qb.t() @ first)  # (I - 0.6·Pb)(I - 0.8·Pa) W
        assert relative_error(ab[name].float().reshape(w.shape) - w, expected - w) < 1e-5, name
    differs = max(relative_error(ab[n].float(), ba[n].float()) for n in ab)
    assert differs > 1e-6  # sequential, not added: the order shows
    for name in ab:  # the merged file (para-trainer merge, sequential) is the same chain at strength 1
        w = model[name].float()
        qa, qb = a[f"{name}.para_q"].float(), b[f"{name}.para_q"].float()
        flat = w.reshape(w.shape[0], -1)
        first = flat - qa @ (qa.t() @ flat)
        expected = first - qb @ (qb.t() @ first)
        assert relative_error(merged[name].float().reshape(flat.shape) - flat, expected - flat) < 1e-5, name


def test_the_lora_export_gives_the_same_weights(files, model, comfyui):
    assert run_cli("comfyui", "install", comfyui) == 0
    import_node(comfyui)
    native = apply([(files / "a.safetensors", 0.9)], model)
    exported = apply([(files / "a_lora.safetensors", 0.9)], model)  # ComfyUI's own LoRA adapter, fp16 factors
    assert set(native) == set(exported)
    for name in native:
        w = model[name].float()
        assert relative_error(exported[name].float() - w, native[name].float() - w) < 2e-3, name


def test_without_the_node_comfyui_applies_nothing_and_says_so(files, model, comfyui, caplog):
    import comfy.lora

    tensors = load_file(str(files / "a.safetensors"))
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(tensors, {name: name for name in model})
    assert patches == {}
    warned = {r.getMessage().removeprefix("lora key not loaded: ") for r in caplog.records}
    assert warned == set(tensors)
