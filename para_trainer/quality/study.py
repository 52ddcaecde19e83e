"""The study's cells: one concept, one method at one rank and learning rate, one training seed.

A cell trains with the project's own trainer (`train.main`, the command line a user would type) on the concept's
five photos, then samples the prompt set (prompts.py) with the adapter at each saved step and lets the judge
score them (scores.py). Every finished cell is one JSON file under ``<out>/cells/``, written atomically, so an
interrupted study picks up where it stopped; the final adapter stays beside it (the merge claims use it).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .methods import METHODS, Variant
from .prompts import prompts_for
from .scores import reference_embeddings, score


@dataclass(frozen=True)
class Settings:
    model: str = "builtin:toy-sd1"
    steps: int = 200  # training steps per cell
    batch: int = 2
    checkpoints: int = 2  # scored points besides step 0 (the base model): steps/2 and steps
    sample_steps: int = 20
    guidance: float = 6.0


@dataclass(frozen=True)
class Cell:
    concept: str
    variant: Variant
    seed: int
    task: str = "subject"  # or "single-image": one photo, edited by prompts (prompts.py)

    @property
    def key(self) -> str:
        where = self.concept if self.task == "subject" else f"{self.task}/{self.concept}"
        return f"{where}/{self.variant.key}-s{self.seed}"


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def file_parameters(path: str) -> int:
    """Learned numbers in an adapter file (alphas and other scalars left out)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    return int(sum(np.prod(s) for s in shapes if len(s) > 0 and np.prod(s) > 1))


@contextlib.contextmanager
def captured(log_path: Path):
    """The trainer's output (progress bars, log lines) into the cell's log, not onto the study's screen."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with open(log_path, "a") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        root.handlers = [logging.StreamHandler(stream)]
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.handlers, _ = saved
            root.setLevel(saved[1])


class Study:
    def __init__(self, out, settings: Settings = Settings(), log=print):
        self.out = Path(out)
        self.settings = settings
        self.log = log
        self._models = self._judge = None
        self._references: dict = {}
        logging.getLogger("LyCORIS").setLevel(logging.ERROR)  # before lycoris binds its handler to stdout

    # ---- shared pieces, loaded once

    @property
    def models(self):
        if self._models is None:
            from diffusers.utils import logging as diffusers_logging

            from ..files.export import load_base_model

            diffusers_logging.disable_progress_bar()
            self._models = load_base_model(self.settings.model)
            self._models.pipeline.set_progress_bar_config(disable=True)
        return self._models

    @property
    def judge(self):
        if self._judge is None:
            from ..toyworld.judge import load_judge

            self._judge = load_judge()
        return self._judge

    def references(self, concept: str):
        if concept not in self._references:
            self._references[concept] = reference_embeddings(self.judge, concept)
        return self._references[concept]

    def data_dir(self, concept: str, task: str = "subject") -> Path:
        """The concept's five photos (subject) or its first photo alone (single-image), as sd-scripts folders."""
        from ..toyworld.files import concept_files, write_files

        directory = self.out / "data" / (concept if task == "subject" else f"{task}-{concept}")
        if not (directory / ".done").exists():
            images = 1 if task == "single-image" else 5
            write_files({k: v for k, v in concept_files(concept, images, class_images=0).items()
                         if k.startswith("train/")}, directory)
            (directory / ".done").write_text("")
        return directory / "train"

    # ---- sampling and scoring

    def samples(self, concept: str, adapters: list[tuple[str, float]] = (), task: str = "subject") -> np.ndarray:
        """The prompt set's images with the adapter files applied (none: the base model)."""
        from ..files.adapter_files import adapters_applied, read_adapter
        from ..toyworld.evaluate import sample

        prompts = prompts_for(task, concept)
        files = [(read_adapter(path), strength) for path, strength in adapters]
        with adapters_applied(self.models, files):
            return sample(self.models.pipeline, [p.text for p in prompts], [p.seed for p in prompts],
                          self.settings.sample_steps, self.settings.guidance)

    def scores(self, concept: str, images: np.ndarray, task: str = "subject") -> dict:
        return score(self.judge, images, prompts_for(task, concept), concept, self.references(concept))

    def base(self, concept: str, task: str = "subject") -> dict:
        """The base model's scores on the concept's prompts (cached): step 0 of every cell."""
        path = self.out / "base" / (f"{concept}.json" if task == "subject" else f"{task}-{concept}.json")
        if path.exists():
            return json.loads(path.read_text())
        result = self.scores(concept, self.samples(concept, task=task), task)
        _write_json(path, result)
        return result

    # ---- one cell

    @property
    def cells_dir(self) -> Path:
        return self.out / "cells" / f"{self.settings.steps}-steps"

    def cell_path(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.key}.json"

    def adapter_path(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.key}.safetensors"

    def train_argv(self, cell: Cell, work: Path) -> list[str]:
        s = self.settings
        method = METHODS[cell.variant.method]
        data = self.data_dir(cell.concept, cell.task)
        return ["--pretrained_model_name_or_path", s.model, "--train_data_dir", str(data),
                "--caption_extension", ".txt", "--resolution", "64", *method.args(cell.variant.rank),
                "--learning_rate", f"{cell.variant.learning_rate:g}", "--max_train_steps", str(s.steps),
                "--train_batch_size", str(s.batch), "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
                "--mixed_precision", "no", "--seed", str(cell.seed), "--output_dir", str(work),
                "--output_name", "adapter", "--save_model_as", "safetensors", "--max_data_loader_n_workers", "0",
                "--save_every_n_steps", str(max(1, s.steps // s.checkpoints)), "--no_export_lora"]

    def score_steps(self, concept: str, work: Path, task: str = "subject") -> dict[int, dict]:
        """Scores at step 0 (the base model), at each intermediate save and at the end."""
        every = max(1, self.settings.steps // self.settings.checkpoints)
        files = {every * i: work / f"adapter-step{every * i:08d}.safetensors"
                 for i in range(1, self.settings.checkpoints)}
        files[self.settings.steps] = work / "adapter.safetensors"
        by_step = {0: self.base(concept, task)}
        for step, path in sorted(files.items()):
            by_step[step] = self.scores(concept, self.samples(concept, [(str(path), 1.0)], task), task)
        return by_step

    def run_cell(self, cell: Cell) -> dict:
        from ..training.train import main as train_main

        path = self.cell_path(cell)
        if path.exists():
            return json.loads(path.read_text())
        work = self.out / "work" / cell.key
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        argv = self.train_argv(cell, work)
        began = time.time()
        with captured(work / "train.log"):
            code = train_main(argv)
        if code != 0:
            raise RuntimeError(f"{cell.key}: training failed (exit {code}); see {work / 'train.log'}")
        trained = time.time() - began
        final = work / "adapter.safetensors"
        with open(work / "adapter_train_log.csv", newline="") as log:
            losses = [float(row["loss"]) for row in csv.DictReader(log)]
        began = time.time()
        by_step = self.score_steps(cell.concept, work, cell.task)
        result = {"cell": cell.key, "task": cell.task, "concept": cell.concept, **asdict(cell.variant),
                  "seed": cell.seed,
                  "learning_rate": cell.variant.learning_rate, "steps": self.settings.steps,
                  "parameters": file_parameters(str(final)), "file_bytes": final.stat().st_size,
                  "train_seconds": round(trained, 1),
                  "loss_first_tenth": float(np.mean(losses[:max(1, len(losses) // 10)])),
                  "loss_last_tenth": float(np.mean(losses[-max(1, len(losses) // 10):])),
                  "score_seconds": round(time.time() - began, 1),
                  "argv": argv, "by_step": {str(k): v for k, v in by_step.items()},
                  "final": by_step[self.settings.steps]}
        self.adapter_path(cell).parent.mkdir(parents=True, exist_ok=True)
        os.replace(final, self.adapter_path(cell))
        _write_json(path, result)
        shutil.rmtree(work, ignore_errors=True)
        return result

    def grid(self, concept: str, cells: list[Cell], path: Path) -> Path:
        """One row per cell (the base model first), one column per prompt: what the judge scored, to look at."""
        from PIL import Image

        from ..toyworld.evaluate import grid

        rows = [self.samples(concept)] + [self.samples(concept, [(str(self.adapter_path(c)), 1.0)]) for c in cells]
        pixels = np.concatenate([grid(row, len(row)) for row in rows], axis=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, optimize=True)
        return path

    def run(self, cells: list[Cell], progress: bool = True) -> list[dict]:
        from tqdm import tqdm

        results = []
        done = sum(self.cell_path(c).exists() for c in cells)
        if done:
            self.log(f"quality: {done} of {len(cells)} cells already done in {self.cells_dir}; running the rest")
        bar = tqdm(cells, desc="quality", unit="cell", disable=not progress, file=sys.stderr)
        for cell in bar:
            bar.set_postfix_str(cell.key)
            results.append(self.run_cell(cell))
        return results
