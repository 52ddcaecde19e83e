"""`para-trainer bench` in its smoke mode (tiny UNet, 2 steps): the report's shape, parameter counts, file sizes."""

import argparse
import contextlib
import io
import json
import os
import statistics
import struct

import pytest
import torch

from para_trainer import cli
from para_trainer.commands import bench
from para_trainer.models.tiny import read_tiny_config

METHODS = ["floor", "para", "peft-lora", "peft-para", "sd-lora", "locon", "krona"]
RANKLESS = ("floor", "krona")
RANK = 4


def options(**changes):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    parsed = parser.parse_args(["--smoke"])
    for key, value in changes.items():
        setattr(parsed, key, value)
    # what run() does for --smoke
    parsed.unet, parsed.latent_size, parsed.rounds, parsed.steps, parsed.warmup = "tiny", 8, 1, 2, 0
    return parsed


def transformer_layer_widths():
    """(d_in, d_out) of q/k/v/out of both attentions and the two feed-forward Linears of every transformer block,
    found through diffusers' BasicTransformerBlock objects rather than the bench's name pattern."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in read_tiny_config("sd1", "unet").items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    widths = []
    for block in unet.modules():
        if block.__class__.__name__ == "BasicTransformerBlock":
            for attention in (block.attn1, block.attn2):
                for layer in (attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]):
                    widths.append((layer.in_features, layer.out_features))
            for layer in (block.ff.net[0].proj, block.ff.net[2]):
                widths.append((layer.in_features, layer.out_features))
    return widths


def tensor_bytes_in(path):
    """Bytes of tensor data in a .safetensors file: its size minus the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
    return os.path.getsize(path) - 8 - header_length


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CLI run for the whole file (the memory/file child process costs ~10 s of imports): every method at
    rank 4, LyCORIS LoKr made unimportable to check the skip note."""
    files = tmp_path_factory.mktemp("bench-files")

    def missing(*_):
        raise ImportError("No module named 'lycoris'")

    output = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(output):
        patch.setitem(bench.ATTACH, "lokr", missing)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["bench", "--smoke", "--json", "--methods", ",".join(METHODS + ["lokr"]),
                      "--ranks", str(RANK), "--keep-files", str(files)])
    assert exit_info.value.code == 0
    return json.loads(output.getvalue()), files


def rows(report):
    return {(r["method"], r["rank"]): r for r in report["results"]}


def test_one_row_per_method_and_rank_with_timings_and_memory(smoke):
    report, _ = smoke
    table = rows(report)
    expected = {("floor", None), ("krona", None)} | {(m, RANK) for m in METHODS + ["lokr"] if m not in RANKLESS}
    assert set(table) == expected
    assert table[("lokr", RANK)]["note"] == "skipped: No module named 'lycoris'"
    assert table[("lokr", RANK)]["step_seconds"] == [] and table[("lokr", RANK)]["file_bytes"] is None
    for key, row in table.items():
        if key == ("lokr", RANK) or (key == ("krona", None) and row["note"]):
            continue  # (networks/krona.py not importable here: a skip note instead of numbers)
        assert row["note"] == ""
        assert all(t > 0 for t in row["step_seconds"]) and len(row["floor_ratios"]) == 1
        # the floor: one step before the first method and one after each method timed
        timed = sum(1 for k, r in table.items() if k != ("floor", None) and not r["note"])
        assert len(row["step_seconds"]) == (1 + timed if key == ("floor", None) else 2)
        assert row["peak_memory_bytes"] > 0
        assert row["layers"] == len(transformer_layer_widths())
    assert table[("floor", None)]["step_vs_floor"] == 1.0
    assert table[("peft-lora", RANK)]["step_vs_peft_lora"] == 1.0
    floor_cpu = statistics.median(table[("floor", None)]["cpu_seconds"])
    para_cpu = statistics.median(table[("para", RANK)]["cpu_seconds"])
    assert table[("para", RANK)]["cpu_vs_floor"] == round(para_cpu / floor_cpu, 3) != 1.0
    assert table[("floor", None)]["file_bytes"] is None and table[("floor", None)]["trainable_params"] == 0


def test_trainable_parameters_follow_each_method_shape_rule(smoke):
    report, _ = smoke
    table = rows(report)
    widths = transformer_layer_widths()
    d_out = sum(o for _, o in widths)
    d_in_plus_out = sum(i + o for i, o in widths)
    assert report["conditions"]["sum_d_out"] == d_out
    assert table[("para", RANK)]["trainable_params"] == d_out * RANK
    assert table[("peft-para", RANK)]["trainable_params"] == d_out * RANK
    for lora in ("peft-lora", "sd-lora", "locon"):
        assert table[(lora, RANK)]["trainable_params"] == d_in_plus_out * RANK


def test_saved_files_hold_exactly_the_trained_tensors_and_keep_the_shape_ratio(smoke):
    report, files = smoke
    table = rows(report)
    widths = transformer_layer_widths()
    shape_ratio = sum(o for _, o in widths) / sum(i + o for i, o in widths)
    para_file = files / f"para-r{RANK}" / "adapter.safetensors"
    lora_file = files / f"peft-lora-r{RANK}" / "adapter_model.safetensors"
    assert table[("para", RANK)]["file_bytes"] == os.path.getsize(para_file)
    assert table[("peft-lora", RANK)]["file_bytes"] == os.path.getsize(lora_file)
    para_tensors, lora_tensors = tensor_bytes_in(para_file), tensor_bytes_in(lora_file)
    assert para_tensors == 4 * RANK * sum(o for _, o in widths)  # a float32 Q per layer
    assert lora_tensors == 4 * RANK * sum(i + o for i, o in widths)
    assert para_tensors / lora_tensors == pytest.approx(shape_ratio, rel=1e-12)
    # whole files: headers and metadata are what keeps tiny files off the exact ratio
    assert table[("para", RANK)]["file_vs_peft_lora"] == pytest.approx(shape_ratio, rel=0.05)


def test_table_names_every_method_and_the_checks(smoke):
    report, _ = smoke
    assert report["conditions"]["ranks"] == [RANK] and report["conditions"]["device"] == "cpu"
    text = bench.format_report(report)
    for method in METHODS + ["lokr"]:
        assert bench.METHOD_LABELS[method] in text
    assert "skipped: No module named 'lycoris'" in text
    checks = {c["target"].split(" (")[0] for c in report["checks"]}
    assert checks == {f"peak memory / peft LoRA at r={RANK}", f"file size / peft LoRA at r={RANK}",
                      f"step time / peft PaRa at r={RANK}"}


def test_rank_beyond_the_narrowest_layer_is_one_clear_error():
    with pytest.raises(bench.BenchError, match=r"--ranks 32: PaRa needs 0 < r < 32"):
        bench.run_bench(options(methods=["para"], ranks=[4, 32]))


def test_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--methods", "para,dora"])
    assert "unknown dora" in capsys.readouterr().err


def test_cli_prints_bad_options_as_one_error_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--smoke", "--methods", "para", "--ranks", "40"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --ranks 40: PaRa needs 0 < r < 32, the outputs of the "
                                               "narrowest targeted layer")


def test_flop_counts_grow_with_the_adapter(smoke):
    report, _ = smoke
    table = rows(report)
    floor = table[("floor", None)]["gflop"]
    assert floor > 0
    for method in ("para", "peft-lora", "peft-para", "sd-lora", "locon"):
        assert table[(method, RANK)]["gflop"] > floor
    # the same LoRA math in peft and in the sd-scripts-style module: the same work
    assert table[("peft-lora", RANK)]["gflop"] == pytest.approx(table[("sd-lora", RANK)]["gflop"], rel=1e-6)


def test_cpu_timing_keeps_freed_memory_and_says_so(smoke):
    report, _ = smoke
    # glibc (this Linux): mallopt is there, so the timing process kept freed memory and the report names it
    assert report["conditions"]["timing_malloc"] == "glibc keeps freed memory (no page faults per step)"
    assert "glibc returning freed blocks" in report["conditions"]["memory"]  # the memory child: the other mode


def test_flux_bench_runs_para_beside_peft_lora_on_the_same_weights(tmp_path):
    """--unet flux: PaRa on the BFL-fused layers (q/k/v and linear1 stacked), peft LoRA on diffusers' split ones;
    both cover the same weights, and PaRa's parameters are d_out·r per fused layer."""
    from diffusers import FluxTransformer2DModel

    from para_trainer.models.flux.tiny import read_config

    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--smoke", "--unet", "flux", "--json", "--methods", "floor,para,peft-lora", "--ranks", "2",
                  "--keep-files", str(tmp_path)])
    assert exit_info.value.code == 0
    report = rows(json.loads(output.getvalue()))
    config = {k: v for k, v in read_config("transformer").items() if not k.startswith("_")}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and name.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert report[("peft-lora", 2)]["layers"] == len(linears)
    assert report[("peft-lora", 2)]["trainable_params"] == sum(2 * (m.in_features + m.out_features) for m in linears)
    assert report[("para", 2)]["trainable_params"] == sum(2 * m.out_features for m in linears)  # same rows, fused
    double, single = config["num_layers"], config["num_single_layers"]
    assert report[("para", 2)]["layers"] == 10 * double + 3 * single
    assert all(r["step_seconds"] for r in report.values())
