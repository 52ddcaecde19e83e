"""The multi-subject claim: two subjects trained apart, then used together on one model. Is each still itself?

Subject A is taught as "sks toy" and subject B as "dog toy" (any word of the tokenizer that toy-sd1 never saw in
pretraining serves as an identifier; its tokenizer has "sks" and a few such words, "dog" among them). For PaRa
(full, r = 2) and LoRA (r = 1) — equal parameters, the study's settings — each subject is trained alone, then:

    PaRa   `para-trainer merge A B` (sequential) and `merge A B --orthogonal`: one native file
    LoRA   both files applied together: they add up, the usual way to use two LoRAs at once

Each identifier's prompts ("a photo of sks toy", "... on the beach", four noise seeds each) are drawn with the
combination and with that subject's file alone; the judge scores, per subject, recognition (the share of its
prompts' samples it calls that subject) and fidelity (mean cosine similarity to fresh renders of it). The toy
world draws one object per image, so "both in one picture" cannot be asked; what is asked is whether each
identifier still brings back its own subject once the other is in the model.

Results go to <out>/multi-subject/ (results.json, results.md); trained files stay there, so a rerun only samples.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .methods import Variant
from .study import Cell, Study, _write_json, captured

IDENTIFIERS = ("sks", "dog")
PAIR = ("robot", "duck")
VARIANTS = (Variant("para", 2), Variant("lora", 1))
TEMPLATES = ("a photo of {} toy", "a photo of {} toy on the beach")
SEEDS = (4000, 4001, 4002, 4003)


def prompts(identifier: str) -> tuple[list[str], list[int]]:
    texts = [t.format(identifier) for t in TEMPLATES for _ in SEEDS]
    return texts, [s for _ in TEMPLATES for s in SEEDS]


class MultiSubject:
    def __init__(self, study: Study, pair=PAIR, seed: int = 0):
        self.study = study
        self.pair = tuple(pair)
        self.seed = seed
        self.out = study.out / "multi-subject"

    def data_dir(self, concept: str, identifier: str) -> Path:
        from ..toyworld.files import concept_files, write_files

        directory = self.out / "data" / f"{concept}-{identifier}"
        if not (directory / ".done").exists():
            write_files({k: v for k, v in concept_files(concept, 5, class_images=0, identifier=identifier).items()
                         if k.startswith("train/")}, directory)
            (directory / ".done").write_text("")
        return directory / "train"

    def adapter(self, variant: Variant, concept: str, identifier: str) -> Path:
        """The subject's file, trained once with the study's settings (kept: a rerun only samples)."""
        from ..training.train import main as train_main

        path = self.out / f"{variant.key}-s{self.seed}" / f"{concept}-{identifier}.safetensors"
        if path.exists():
            return path
        self.study.log(f"multi-subject: training {variant.key} on {concept} as '{identifier} toy' "
                       f"({self.study.settings.steps} steps)")
        work = self.out / "work" / f"{variant.key}-{concept}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        argv = self.study.train_argv(Cell(concept, variant, self.seed), work)
        argv[argv.index("--train_data_dir") + 1] = str(self.data_dir(concept, identifier))
        with captured(work / "train.log"):
            code = train_main(argv)
        if code != 0:
            raise RuntimeError(f"multi-subject {variant.key} {concept}: training failed (exit {code}); see "
                               f"{work / 'train.log'}")
        path.parent.mkdir(parents=True, exist_ok=True)
        (work / "adapter.safetensors").replace(path)
        shutil.rmtree(work.parent, ignore_errors=True)  # one training at a time: nothing else lives there
        return path

    def combinations(self, variant: Variant, files: list[Path]) -> dict[str, list[tuple[str, float]]]:
        """label -> the adapter files (and strengths) applied together for that setting."""
        if variant.method != "para":
            return {"both files added": [(str(f), 1.0) for f in files]}
        from ..files.merge import merge

        result = {}
        for mode, orthogonal in (("merged (sequential)", False), ("merged (orthogonal)", True)):
            path = files[0].parent / f"merged-{'orthogonal' if orthogonal else 'sequential'}.safetensors"
            if not path.exists():
                merge([(str(f), 1.0) for f in files], str(path), orthogonal=orthogonal)
            result[mode] = [(str(path), 1.0)]
        return result

    def scores(self, adapters: list[tuple[str, float]]) -> dict[str, dict[str, float]]:
        """Per subject: recognition and fidelity on its identifier's prompts, with `adapters` applied."""
        from ..files.adapter_files import adapters_applied, read_adapter
        from ..toyworld.evaluate import sample

        study, result = self.study, {}
        study.log("multi-subject: sampling with " + (" + ".join(Path(p).stem for p, _ in adapters) or "no adapter"))
        with adapters_applied(study.models, [(read_adapter(p), s) for p, s in adapters]):
            for concept, identifier in zip(self.pair, IDENTIFIERS):
                texts, seeds = prompts(identifier)
                images = sample(study.models.pipeline, texts, seeds, study.settings.sample_steps,
                                study.settings.guidance)
                predicted = study.judge.predict(images)
                similarity = study.judge.embed(images) @ study.references(concept).T
                result[concept] = {"recognition": float(np.mean([p == concept for p in predicted["object"]])),
                                   "fidelity": float(similarity.mean())}
        return result

    def run(self) -> dict:
        rows = [{"method": "base model", "setting": "no adapter", **self._flat(self.scores([]))}]
        for variant in VARIANTS:
            files = [self.adapter(variant, c, i) for c, i in zip(self.pair, IDENTIFIERS)]
            alone = {}
            for concept, path in zip(self.pair, files):
                alone[concept] = self.scores([(str(path), 1.0)])[concept]
            rows.append({"method": variant.key, "setting": "each file alone", **self._flat(alone)})
            for label, adapters in self.combinations(variant, files).items():
                rows.append({"method": variant.key, "setting": label, **self._flat(self.scores(adapters))})
        result = {"pair": list(self.pair), "identifiers": list(IDENTIFIERS), "seed": self.seed,
                  "steps": self.study.settings.steps, "prompts": list(TEMPLATES), "noise_seeds": list(SEEDS),
                  "rows": rows}
        _write_json(self.out / "results.json", result)
        (self.out / "results.md").write_text(self.table(result))
        return result

    def _flat(self, scores: dict) -> dict:
        return {f"{concept} {metric}": value for concept in self.pair for metric, value in scores[concept].items()}

    def table(self, result: dict) -> str:
        a, b = self.pair
        head = (f"| method | setting | {a} ('{IDENTIFIERS[0]}') recognised | {a} fidelity | "
                f"{b} ('{IDENTIFIERS[1]}') recognised | {b} fidelity |")
        lines = [head, "|---|---|---|---|---|---|"]
        for row in result["rows"]:
            lines.append(f"| {row['method']} | {row['setting']} | {row[f'{a} recognition']:.2f} | "
                         f"{row[f'{a} fidelity']:.3f} | {row[f'{b} recognition']:.2f} | {row[f'{b} fidelity']:.3f} |")
        return "\n".join(lines) + "\n"


def run_multi_subject(study: Study, pair=PAIR, seed: int = 0) -> str:
    """Run (or resume) the claim; returns the Markdown table."""
    claim = MultiSubject(study, pair, seed)
    return claim.table(claim.run())
