"""para-trainer merge: sequential and --orthogonal merges of PaRa files, PaRa after LoRA, their exact LoRA
exports, and the merged native file in networks.para, the trainer and the command line."""

import argparse

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from networks import para
from networks.adapter_base import named_layers, write_adapter_file
from para_trainer import cli
from para_trainer.files.export import load_base_model
from para_trainer.files.metadata import FINGERPRINT_KEY, base_fingerprint
from para_trainer.files.merge import MergeError, merge


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def layer_weights(models):
    return {t.lora_name: t.layer for t in named_layers(models.text_encoder_for_network, models.unet)}


def save_para(models, path, seed, orthogonal_to=None):
    """A PaRa file (with 3x3 convs) with random Q's; `orthogonal_to` (name -> Q): Q's orthogonal to those."""
    network = para.create_network(1.0, 3, 1, None, models.text_encoder_for_network, models.unet, conv_dim="2")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.adapter_modules:
            b = torch.randn(module.para_b.shape, generator=generator, dtype=torch.float64)
            if orthogonal_to is not None:
                q = orthogonal_to[module.lora_name].double()
                b = b - q @ (q.t() @ b)
            module.para_b.copy_(b.float())
    network.save_weights(str(path), None, {FINGERPRINT_KEY: base_fingerprint(network.adapter_modules)})
    return {name.split(".")[0]: q for name, q in read(path)[0].items()}


def save_lora(models, path, seed, rank=2, alpha=1.0):
    """A kohya LoRA/LoCon file on a few UNet layers (random up and down, alpha != rank)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in list(layer_weights(models).items())[-12:]:
        w = layer.weight
        up_shape = (w.shape[0], rank, 1, 1) if w.dim() == 4 else (w.shape[0], rank)
        tensors[f"{name}.lora_up.weight"] = 0.1 * torch.randn(up_shape, generator=generator)
        tensors[f"{name}.lora_down.weight"] = torch.randn((rank, *w.shape[1:]), generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    write_adapter_file(str(path), tensors, {"ss_network_module": "networks.lora"})
    return tensors


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    models = load_base_model("builtin:tiny-sd1")
    qa = save_para(models, folder / "dog.safetensors", seed=1)
    qb = save_para(models, folder / "hat.safetensors", seed=2)
    qc = save_para(models, folder / "orth.safetensors", seed=3, orthogonal_to=qa)
    lora = save_lora(models, folder / "style.safetensors", seed=4)
    return {"folder": folder, "models": models, "qa": qa, "qb": qb, "qc": qc, "lora": lora,
            "w0": {name: layer.weight.detach().clone() for name, layer in layer_weights(models).items()}}


def explicit_sequential(w0, *qs, strengths=None):
    """W1 = W0 - m1 Q1Q1ᵀW0, W2 = W1 - m2 Q2Q2ᵀW1, ... in float64, the paper's formula written out."""
    w = w0.double().reshape(w0.shape[0], -1)
    for i, q in enumerate(qs):
        q = q.double()
        w = w - (strengths[i] if strengths else 1.0) * q @ (q.t() @ w)
    return w.reshape(w0.shape)


def layer_output(layer, x, weight):
    if weight.dim() == 4:
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight, layer.bias)


def random_input(layer, generator):
    if layer.weight.dim() == 4:
        return torch.randn(2, layer.weight.shape[1], 8, 8, generator=generator, dtype=torch.float64)
    return torch.randn(3, 5, layer.weight.shape[1], generator=generator, dtype=torch.float64)


def test_merged_forward_is_w1_then_w2_in_float64(setup, tmp_path):
    out = tmp_path / "dog_hat.safetensors"
    merge([(str(setup["folder"] / "dog.safetensors"), 1.0), (str(setup["folder"] / "hat.safetensors"), 0.5)],
          out)
    models = load_base_model("builtin:tiny-sd1")
    models.unet.double()
    models.text_encoders[0].double()
    network, weights = para.create_network_from_weights(1.0, str(out), None, models.text_encoder_for_network,
                                                        models.unet)
    network.apply_to(models.text_encoder_for_network, models.unet)
    network.load_weights(str(out))
    layers = layer_weights(models)
    generator = torch.Generator().manual_seed(0)
    assert set(setup["qa"]) == {m.lora_name for m in network.adapter_modules}
    for name, qa in setup["qa"].items():
        layer = layers[name]
        x = random_input(layer, generator)
        with torch.no_grad():
            got = layer(x)
            want = layer_output(layer, x, explicit_sequential(layer.weight, qa, setup["qb"][name], strengths=[1, .5]))
        assert ((got - want).norm() / want.norm()).item() <= 1e-10, name
    # merge_to bakes the same chain into the weights
    network.merge_to()
    for name, qa in setup["qa"].items():
        want = explicit_sequential(setup["w0"][name].double(), qa, setup["qb"][name], strengths=[1, .5])
        assert ((layers[name].weight - want).norm() / want.norm()).item() <= 1e-10


def test_lora_export_of_the_merge_is_exact_with_rank_r1_plus_r2(setup, tmp_path):
    out, lora_out = tmp_path / "merged.safetensors", tmp_path / "merged_lora.safetensors"
    models = setup["models"]
    report = merge([(str(setup["folder"] / "dog.safetensors"), 1.0), (str(setup["folder"] / "hat.safetensors"), 1.0)],
                   out, models, lora_out=str(lora_out), lora_dtype="fp32")
    assert report["lora"]["base_check"] == "match" and report["lora"]["max_relative_error"] < 1e-6
    tensors, metadata = read(lora_out)
    assert metadata["ss_network_module"] == "networks.lora"
    for name, qa in setup["qa"].items():
        qb, w0 = setup["qb"][name], setup["w0"][name]
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        rank = qa.shape[1] + qb.shape[1]
        assert float(tensors[f"{name}.alpha"]) == rank == up.shape[1] == down.shape[0]
        up2d, down2d = up.double().reshape(up.shape[0], -1), down.double().reshape(rank, -1)
        w1 = explicit_sequential(w0, qa).reshape(w0.shape[0], -1)
        # up = [-Q1 | -Q2], down = [Q1ᵀW0 ; Q2ᵀW1]
        assert torch.allclose(up2d, -torch.cat([qa, qb], 1).double(), atol=1e-7)
        expected_down = torch.cat([qa.double().t() @ w0.double().reshape(w0.shape[0], -1), qb.double().t() @ w1])
        assert torch.allclose(down2d, expected_down, atol=1e-5)
        delta = explicit_sequential(w0, qa, qb) - w0.double()
        assert ((up2d @ down2d - delta.reshape(w0.shape[0], -1)).norm() / delta.norm()).item() < 1e-6
        # two separate exports would both use W0: that is not the merge
        separate = -(qa.double() @ qa.double().t() + qb.double() @ qb.double().t()) @ w0.double().reshape(
            w0.shape[0], -1)
        assert ((separate - delta.reshape(w0.shape[0], -1)).norm() / delta.norm()).item() > 1e-3


def test_order_matters_when_subspaces_overlap_and_not_when_orthogonal(setup, tmp_path):
    folder = setup["folder"]
    dog, hat, orth = (str(folder / f"{n}.safetensors") for n in ("dog", "hat", "orth"))

    def chains(*paths):
        out = tmp_path / f"m{len(list(tmp_path.iterdir()))}.safetensors"
        merge([(p, 1.0) for p in paths], out)
        network, _ = para.create_network_from_weights(1.0, str(out), None, setup["models"].text_encoder_for_network,
                                                      setup["models"].unet)
        network.load_weights(str(out))
        return {m.lora_name: m.delta_weight().double() for m in network.adapter_modules}

    ab, ba = chains(dog, hat), chains(hat, dog)
    worst = max(((ab[n] - ba[n]).norm() / ab[n].norm()).item() for n in ab)
    assert worst > 1e-2  # (I-P2)(I-P1) != (I-P1)(I-P2): overlapping subspaces
    ac, ca = chains(dog, orth), chains(orth, dog)
    assert max(((ac[n] - ca[n]).norm() / ac[n].norm()).item() for n in ac) < 1e-5


def test_orthogonal_merge_is_order_free_and_projects_onto_the_span(setup, tmp_path):
    folder = setup["folder"]
    dog, hat = str(folder / "dog.safetensors"), str(folder / "hat.safetensors")
    merge([(dog, 1.0), (hat, 1.0)], tmp_path / "ab.safetensors", orthogonal=True)
    merge([(hat, 1.0), (dog, 1.0)], tmp_path / "ba.safetensors", orthogonal=True)
    ab, metadata = read(tmp_path / "ab.safetensors")
    ba, _ = read(tmp_path / "ba.safetensors")
    assert metadata["para.merge_mode"] == "orthogonal" and metadata["para.format_version"] == "1"
    for name, qa in setup["qa"].items():
        q1, q2 = ab[f"{name}.para_q"].double(), ba[f"{name}.para_q"].double()
        assert q1.shape[1] == qa.shape[1] + setup["qb"][name].shape[1]
        assert torch.allclose(q1 @ q1.t(), q2 @ q2.t(), atol=1e-6)
        assert torch.allclose(q1.t() @ q1, torch.eye(q1.shape[1], dtype=torch.float64), atol=1e-6)
        # span[Qa, Qb] is inside span(Q'): the projection leaves both bases unchanged
        both = torch.cat([qa, setup["qb"][name]], 1).double()
        assert torch.allclose(q1 @ (q1.t() @ both), both, atol=1e-6)


def test_para_after_lora_is_one_exact_lora(setup, tmp_path):
    models = setup["models"]
    out, lora_out = tmp_path / "style_dog.safetensors", tmp_path / "style_dog_lora.safetensors"
    report = merge([(str(setup["folder"] / "style.safetensors"), 1.0), (str(setup["folder"] / "dog.safetensors"), 1.0)],
                   out, models, lora_out=str(lora_out), lora_dtype="fp32")
    lora, checked = setup["lora"], 0
    has_conv3x3 = any(t.dim() == 4 and t.shape[-1] > 1 for t in lora.values())
    assert [i["kind"] for i in report["inputs"]] == ["LoCon" if has_conv3x3 else "LoRA", "PaRa"]
    tensors, _ = read(lora_out)
    lora_modules = {key.split(".")[0] for key in lora}
    for name in set(setup["qa"]) | lora_modules:
        w0 = setup["w0"][name].double().reshape(setup["w0"][name].shape[0], -1)
        up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
        scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
        got = scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        w = w0
        if name in lora_modules:  # (I - QQᵀ)(W0 + s·BA)
            b = lora[f"{name}.lora_up.weight"].double().reshape(w0.shape[0], -1)
            a = lora[f"{name}.lora_down.weight"].double().reshape(b.shape[1], -1)
            w = w0 + (float(lora[f"{name}.alpha"]) / b.shape[1]) * b @ a
        if name in setup["qa"]:
            q = setup["qa"][name].double()
            w = w - q @ (q.t() @ w)
            checked += name in lora_modules
        assert down.shape[0] == (b.shape[1] if name in lora_modules else 0) + (
            setup["qa"][name].shape[1] if name in setup["qa"] else 0)
        want = w - w0
        assert ((got - want).norm() / want.norm()).item() < 1e-6, name
    assert checked >= 8  # modules where PaRa comes after the LoRA


def test_merged_file_in_the_trainer_base_weights_and_refused_as_network_weights(setup, tmp_path):
    from para_trainer.training.train import main as train_main

    merged = tmp_path / "merged.safetensors"
    merge([(str(setup["folder"] / "dog.safetensors"), 1.0), (str(setup["folder"] / "hat.safetensors"), 1.0)], merged)
    common = ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir",
              "para_trainer/example_data/train", "--caption_extension", ".txt", "--resolution", "64",
              "--network_dim", "2", "--max_train_steps", "1", "--learning_rate", "1e-3", "--no_export_lora"]
    assert train_main(common + ["--output_dir", str(tmp_path / "a"), "--base_weights", str(merged)]) == 0
    assert (tmp_path / "a" / "last.safetensors").exists()
    assert train_main(common + ["--output_dir", str(tmp_path / "b"), "--network_weights", str(merged),
                                "--network_args", "conv_dim=2"]) != 0
    assert not (tmp_path / "b" / "last.safetensors").exists()


def test_merge_command_writes_both_files(setup, tmp_path, capsys):
    folder = setup["folder"]
    out = tmp_path / "cli.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", f"{folder / 'dog.safetensors'}", f"{folder / 'hat.safetensors'}:0.8", "-o", str(out),
                  "--model", "builtin:tiny-sd1"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "x0.8" in printed and "cli_lora.safetensors" in printed
    tensors, metadata = read(out)
    assert metadata["para.format_version"] == "2" and metadata["para.merge_mode"] == "sequential"
    name = next(iter(setup["qa"]))
    assert float(tensors[f"{name}.stage1.strength"]) == pytest.approx(0.8)
    assert torch.equal(tensors[f"{name}.stage0.para_q"], setup["qa"][name])
    assert (tmp_path / "cli_lora.safetensors").exists()
    from para_trainer.files.inspect import inspect

    report = inspect(str(out), hashes=False)
    assert report["kind"] == "native PaRa chain" and report["ranks"]["max"] == 2 * setup["qa"][name].shape[1]


@pytest.mark.parametrize("case, message", [
    ("one", "at least two adapter files"),
    ("orthogonal-lora", "--orthogonal combines plain PaRa files"),
    ("orthogonal-strength", "at full strength"),
    ("only-lora", "none of the files is a PaRa adapter"),
    ("loha", "is a LoHa module"),
    ("not-safetensors", "write the merged adapter as .safetensors"),
])
def test_bad_merges_say_what_to_do_and_write_nothing(setup, tmp_path, capsys, case, message):
    folder = setup["folder"]
    dog, style = f"{folder / 'dog.safetensors'}", f"{folder / 'style.safetensors'}"
    loha = tmp_path / "loha.safetensors"
    write_adapter_file(str(loha), {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2),
                                   "lora_unet_x.hada_w2_a": torch.zeros(2, 2), "lora_unet_x.hada_w2_b": torch.zeros(2, 2)},
                       {})
    out = tmp_path / "out.safetensors"
    args = {"one": [dog], "orthogonal-lora": [dog, style, "--orthogonal"],
            "orthogonal-strength": [dog, dog + ":0.5", "--orthogonal"], "only-lora": [style, style],
            "loha": [dog, str(loha)], "not-safetensors": [dog, dog]}[case]
    target = tmp_path / "out.ckpt" if case == "not-safetensors" else out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", *args, "-o", str(target)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [loha]


def test_a_file_trained_on_another_base_is_refused_without_force(setup, tmp_path):
    other = load_base_model("builtin:tiny-sd1")
    with torch.no_grad():
        next(iter(layer_weights(other).values())).weight.add_(1.0)
    paths = [(str(setup["folder"] / "dog.safetensors"), 1.0), (str(setup["folder"] / "hat.safetensors"), 1.0)]
    with pytest.raises(MergeError, match="another base model"):
        merge(paths, tmp_path / "x.safetensors", other, lora_out=str(tmp_path / "x_lora.safetensors"))
    assert not list(tmp_path.iterdir())
    report = merge(paths, tmp_path / "x.safetensors", other, force=True, lora_out=str(tmp_path / "x_lora.safetensors"))
    assert report["warnings"] and (tmp_path / "x_lora.safetensors").exists()


def test_parse_file_and_strength():
    from para_trainer.files.adapter_files import parse_file_and_strength

    assert parse_file_and_strength("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_file_and_strength(r"C:\models\a.safetensors") == (r"C:\models\a.safetensors", 1.0)
    assert parse_file_and_strength("hf://user/repo/a.safetensors@main:2") == ("hf://user/repo/a.safetensors@main", 2.0)
    assert argparse  # the CLI's parser builds
    assert cli.build_parser().parse_args(["merge", "a", "b", "-o", "c.safetensors"]).orthogonal is False
