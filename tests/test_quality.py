"""`para-trainer quality`: the judge's scores mean what they say, the budgets are what they claim, a small study
runs end to end through the real trainer, resumes without retraining, and reports."""

import json
import random

import numpy as np
import torch
import pytest

from networks import lora, para
from para_trainer.files.export import load_base_model
from para_trainer.quality import report
from para_trainer.quality.methods import METHODS, Variant, budget_variants
from para_trainer.quality.prompts import prompt_set
from para_trainer.quality.scores import reference_embeddings, score
from para_trainer.quality.study import Cell, Settings, Study, file_parameters
from para_trainer.toyworld.concepts import concept_scene
from para_trainer.toyworld.judge import load_judge
from para_trainer.toyworld.render import render
from para_trainer.toyworld.world import BACKGROUNDS, POSITIONS, SIZES, Scene

from commands import run_cli

TOY = "builtin:toy-sd1"


def ideal_images(concept, prompts, rng, subject=None):
    """What a perfect model draws for each prompt: renders with every attribute the prompt names."""
    images = []
    for p in prompts:
        fixed = {k: v for k, v in p.checks.items() if k != "object"}
        background = fixed.get("background", rng.choice(BACKGROUNDS))
        position, size = fixed.get("position", rng.choice(POSITIONS)), fixed.get("size", rng.choice(SIZES))
        if p.kind == "class":
            scene = Scene(p.checks.get("object", "box"), fixed.get("colour", "green"), "plain", background, position,
                          size, rng.randrange(1 << 30))
        else:
            scene = concept_scene(subject or concept, background, position, size, fixed.get("colour"),
                                  rng.randrange(1 << 30))
        images.append(render(scene))
    return np.stack(images)


def test_scores_of_a_perfect_model_and_of_one_that_never_learned_the_subject():
    judge = load_judge()
    concept = "robot"
    prompts = prompt_set(concept)
    assert {p.kind for p in prompts} == {"identity", "edit", "class"}
    references = reference_embeddings(judge, concept)
    perfect = score(judge, ideal_images(concept, prompts, random.Random(0)), prompts, concept, references)
    assert perfect["recognition"] >= 0.9 and perfect["alignment"] >= 0.9 and perfect["class_accuracy"] >= 0.9
    assert perfect["leak"] == 0 and perfect["fidelity"] > 0.5 and perfect["diversity"] > 0
    other = score(judge, ideal_images(concept, prompts, random.Random(0), subject="duck"), prompts, concept,
                  references)
    assert other["recognition"] <= 0.1
    assert other["fidelity"] < perfect["fidelity"] - 0.3
    # the subject drawn for the class prompts too: every one of them leaks
    leaking = [p if p.kind != "class" else p.__class__(p.text, "edit", {"object": concept}, p.seed) for p in prompts]
    images = ideal_images(concept, leaking, random.Random(1))
    assert score(judge, images, prompts, concept, references)["leak"] >= 0.9


def test_budgets_pair_para_at_2k_and_k_with_the_others_at_k():
    variants = budget_variants(["para", "lora", "krona"], (1, 2))
    assert {(v.method, v.rank) for v in variants} == {("para", 1), ("para", 2), ("para", 4), ("lora", 1),
                                                      ("lora", 2), ("krona", 0)}
    models = load_base_model(TOY)
    counts = {}
    for module, rank in ((para, 2), (para, 1), (lora, 1)):
        network = module.create_network(1.0, rank, 1, None, models.text_encoder_for_network, models.unet,
                                        preset="full")
        counts[(module.__name__, rank)] = network.trainable_parameter_count()
    # "equal parameters": PaRa r=2 within 10% of LoRA r=1 on toy-sd1; "equal rank": PaRa about half
    assert 0.9 < counts[("networks.para", 2)] / counts[("networks.lora", 1)] < 1.1
    assert 0.45 < counts[("networks.para", 1)] / counts[("networks.lora", 1)] < 0.6


def test_verdicts_need_the_difference_to_exceed_two_standard_errors():
    assert report.verdict([0.1, 0.11, 0.09, 0.1])["verdict"] == "holds"
    assert report.verdict([-0.1, -0.11, -0.09, -0.1])["verdict"] == "does not hold"
    assert report.verdict([0.1, -0.1, 0.12, -0.09])["verdict"] == "within noise"
    assert report.verdict([0.3, 0.3])["verdict"] == "too few cells"


def test_a_small_study_trains_scores_resumes_and_reports(tmp_path, monkeypatch):
    study = Study(tmp_path, Settings(steps=2, checkpoints=2, sample_steps=2), log=lambda m: None)
    cells = [Cell("duck", Variant("para", 1), 0), Cell("duck", Variant("lora", 1), 0)]
    results = study.run(cells, progress=False)
    models = load_base_model(TOY)
    for result, module in zip(results, (para, lora)):
        assert set(result["by_step"]) == {"0", "1", "2"}
        assert result["by_step"]["0"] == json.loads((tmp_path / "base" / "duck.json").read_text())
        assert result["final"] == result["by_step"]["2"]
        network = module.create_network(1.0, 1, 1, None, models.text_encoder_for_network, models.unet,
                                        preset="full")
        assert result["parameters"] == network.trainable_parameter_count()
        adapter = study.adapter_path(Cell("duck", Variant(result["method"], 1), 0))
        assert file_parameters(str(adapter)) == result["parameters"]
        assert result["argv"][result["argv"].index("--network_module") + 1] == module.__name__
    assert not (tmp_path / "work" / "duck").exists() or not any((tmp_path / "work" / "duck").iterdir())

    # finished cells are never trained again; a cell without its JSON (interrupted) is
    import para_trainer.training.train as train_module

    calls = []
    real_main = train_module.main
    monkeypatch.setattr(train_module, "main", lambda argv: calls.append(argv) or real_main(argv))
    again = study.run(cells, progress=False)
    assert calls == [] and again == results
    study.cell_path(cells[1]).unlink()
    study.run(cells, progress=False)
    assert len(calls) == 1 and "networks.lora" in calls[0]

    summary = report.write_report(tmp_path)
    assert summary["cells"] == 2
    table = summary["table"]
    assert set(table) == {"PaRa (full) r=1 (2 steps)", "LoRA r=1 (2 steps)"}
    lora_row = table["LoRA r=1 (2 steps)"]
    assert lora_row["fidelity"]["mean"] == pytest.approx(results[1]["final"]["fidelity"])
    markdown = (tmp_path / "results.md").read_text()
    assert "| LoRA r=1 (2 steps) | " in markdown and "base model (no adapter)" in markdown
    pytest.importorskip("matplotlib")
    assert (tmp_path / "fidelity_vs_alignment.png").stat().st_size > 1000


def test_bad_requests_get_one_line(capsys, tmp_path):
    assert run_cli("quality", "--methods", "peft-para", "--out", tmp_path) == 2
    assert "peft's PaRa (DEFT para=True) has no sd-scripts network module" in capsys.readouterr().err
    assert run_cli("quality", "--concepts", "robto", "--out", tmp_path) == 2
    assert "did you mean 'robot'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    (tmp_path / "file").write_text("")
    assert run_cli("quality", "--quick", "--out", tmp_path / "file" / "study") == 2
    assert "cannot write the study's results under" in capsys.readouterr().err


def test_every_method_names_a_module_that_imports():
    import importlib

    for method in METHODS.values():
        module = importlib.import_module(method.module)
        assert hasattr(module, "create_network") and hasattr(module, "create_network_from_weights")


def fake_cell(method, rank, concept, seed, value, lr_factor=1.0):
    final = {"fidelity": value, "alignment": value, "class_accuracy": value}
    return {"method": method, "rank": rank, "concept": concept, "seed": seed, "steps": 200, "lr_factor": lr_factor,
            "final": final}


def test_comparisons_pair_cells_by_concept_and_seed_and_the_sweep_uses_common_pairs():
    cells = [fake_cell("para", 2, c, s, 0.5 + 0.1 * i) for i, c in enumerate("abc") for s in (0, 1)]
    cells += [fake_cell("lora", 1, c, s, 0.45 + 0.1 * i + 0.001 * s) for i, c in enumerate("abc") for s in (0, 1)]
    cells.append(fake_cell("lora", 1, "d", 0, 0.0))  # no PaRa partner: left out of the pairs
    result = report.compare(cells, ("para", 2), ("lora", 1))
    assert result["fidelity"]["pairs"] == 6
    assert result["fidelity"]["mean_difference"] == pytest.approx(0.05 - 0.0005)
    assert result["combined"]["verdict"] == "holds"
    cells += [fake_cell("lora", 1, "a", 0, 0.2, lr_factor=3.0)]
    spread = report.sweep_spread(cells)
    assert spread["LoRA r=1"]["cells_per_factor"] == 1  # only (a, 0) has both rates
    assert spread["LoRA r=1"]["by_factor"] == {"1": pytest.approx(0.45), "3": pytest.approx(0.2)}
    assert spread["LoRA r=1"]["best_factor"] == 1.0 and "PaRa (full) r=2" not in spread


def test_low_energy_init_is_compared_with_random_init_and_runs_only_when_named():
    import argparse

    from para_trainer.quality.cli import add_subcommand

    cells = [fake_cell("para-exca", 2, c, 0, 0.5) for c in "abc"]
    cells += [fake_cell("para-exca-low-energy", 2, c, 0, 0.6 + 0.01 * i) for i, c in enumerate("abc")]
    (claim,) = [c for c in report.claims(cells) if "low-energy init vs random init" in c["claim"]]
    assert claim["a"] == ["para-exca-low-energy", 2] and claim["fidelity"]["pairs"] == 3
    assert claim["fidelity"]["mean_difference"] == pytest.approx(0.11)
    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    add_subcommand(commands)
    default = commands.choices["quality"].parse_args([]).methods
    assert "para-exca" in default and "para-exca-low-energy" not in default
    assert "init=low_energy" in METHODS["para-exca-low-energy"].args(2)


def test_single_image_cells_train_on_one_photo_and_report_apart(tmp_path):
    from para_trainer.quality.prompts import single_image_prompts

    prompts = single_image_prompts("duck")
    assert len({p.text for p in prompts}) == 4 and len({p.seed for p in prompts}) == 4  # same seeds per prompt
    study = Study(tmp_path, Settings(steps=2, checkpoints=2, sample_steps=2), log=lambda m: None)
    cell = Cell("duck", Variant("para-exca", 1), 0, "single-image")
    result = study.run([cell], progress=False)[0]
    photos = list((tmp_path / "data" / "single-image-duck" / "train").glob("*/*.png"))
    assert len(photos) == 1
    assert result["task"] == "single-image" and result["final"]["leak"] is None
    assert result["final"]["edit_spread"] is not None
    assert (tmp_path / "base" / "single-image-duck.json").exists() and not (tmp_path / "base" / "duck.json").exists()
    summary = report.write_report(tmp_path)
    assert summary["cells"] == 0 and list(summary["single_image"]) == ["PaRa (exca) r=1 (2 steps)"]
    assert "Single-image editing" in (tmp_path / "results.md").read_text()


def test_multi_subject_merges_or_adds_two_subjects_and_scores_each(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import para_trainer.training.train as train_module
    from para_trainer.quality import multi_subject

    monkeypatch.setattr(multi_subject, "SEEDS", (4000,))
    monkeypatch.setattr(multi_subject, "TEMPLATES", ("a photo of {} toy",))
    study = Study(tmp_path, Settings(steps=2, checkpoints=2, sample_steps=2), log=lambda m: None)
    result = multi_subject.MultiSubject(study).run()
    assert [(r["method"], r["setting"]) for r in result["rows"]] == [
        ("base model", "no adapter"), ("para-r2", "each file alone"), ("para-r2", "merged (sequential)"),
        ("para-r2", "merged (orthogonal)"), ("lora-r1", "each file alone"), ("lora-r1", "both files added")]
    for row in result["rows"]:
        assert all(0 <= row[f"{c} recognition"] <= 1 and -1 <= row[f"{c} fidelity"] <= 1 for c in ("robot", "duck"))
    root = tmp_path / "multi-subject"
    captions = {p.read_text() for p in (root / "data" / "duck-dog" / "train").rglob("*.txt")}
    assert captions == {"a photo of dog toy\n"}  # the second subject has its own identifier
    robot, duck = (load_file(str(root / "para-r2-s0" / f"{n}.safetensors")) for n in ("robot-sks", "duck-dog"))
    merged = load_file(str(root / "para-r2-s0" / "merged-sequential.safetensors"))
    module = sorted(robot)[0].split(".")[0]
    assert torch.equal(merged[f"{module}.stage0.para_q"].float(), robot[f"{module}.para_q"].float())
    assert torch.equal(merged[f"{module}.stage1.para_q"].float(), duck[f"{module}.para_q"].float())
    assert "| para-r2 | merged (orthogonal) |" in (root / "results.md").read_text()

    calls = []  # a rerun samples again and trains nothing
    real_main = train_module.main
    monkeypatch.setattr(train_module, "main", lambda argv: calls.append(argv) or real_main(argv))
    assert multi_subject.MultiSubject(study).run() == result and calls == []


def test_para_is_compared_with_locon_lokr_and_krona_and_krona_with_lora():
    cells = [fake_cell("para-exca", 2, c, 0, 0.5) for c in "abc"]
    cells += [fake_cell(m, r, c, 0, 0.4 + 0.01 * i) for m, r in (("locon", 1), ("krona", 0), ("lora", 1))
              for i, c in enumerate("abc")]
    claims = {c["claim"]: c for c in report.claims(cells)}
    assert claims["PaRa (exca) r=2 vs LoCon (LyCORIS) r=1"]["fidelity"]["mean_difference"] == pytest.approx(0.09)
    assert claims["PaRa (exca) r=2 vs KronA (ours)"]["b"] == ["krona", 0]
    assert claims["KronA vs LoRA r=1 (DiffuseKronA)"]["fidelity"]["mean_difference"] == pytest.approx(0)
    assert not any("LoKr" in name for name in claims)  # no LoKr cells, no row


def test_learning_rate_sensitivity_pairs_each_concepts_spread_over_the_rates_both_ran():
    cells = []
    for i, c in enumerate("abcd"):  # LoRA moves by 0.3 (+0.01 i) across rates, KronA by 0.1
        cells += [fake_cell("lora", 1, c, 0, 0.5), fake_cell("lora", 1, c, 0, 0.2 - 0.01 * i, lr_factor=3.0),
                  fake_cell("lora", 1, c, 0, 0.45, lr_factor=0.3)]
        cells += [fake_cell("krona", 0, c, 0, 0.5), fake_cell("krona", 0, c, 0, 0.4, lr_factor=3.0)]
    cells.append(fake_cell("krona", 0, "e", 0, 0.9))  # one rate only: not a pair
    (claim,) = report.sensitivity(cells)
    assert claim["a"] == ["krona", 0] and claim["factors"] == ["1", "3"]  # x0.3 is LoRA's alone: not compared
    assert claim["spread"]["pairs"] == 4
    assert claim["spread"]["mean_difference"] == pytest.approx(0.3 + 0.015 - 0.1)
    assert claim["spread"]["verdict"] == "holds"
    assert "less sensitive" in report.markdown({}, None, [], {}, [claim])
