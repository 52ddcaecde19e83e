"""Do two runs of the same quality cells end in the same place? For every cell both study folders finished: the
relative difference of the adapters' weights and each run's scores. Used to check what one thread instead of two
(another order of float sums) does to a cell; run from the repository root:
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    .venv/bin/para-trainer quality --out output/threads-1 --methods lora --ks 1 --seeds 1 --concepts duck \
        --lr-factors 1 0.3
    .venv/bin/para-trainer quality --out output/threads-1 --methods para --ks 1 --seeds 1 --concepts duck
    .venv/bin/python docs/quality/probes/compare_runs.py output/threads-1 output/quality-14800
"""
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

SCORES = ("fidelity", "recognition", "alignment", "class_accuracy", "leak")


def main(first: Path, second: Path) -> None:
    print("| cell | weights, relative difference | " + " | ".join(SCORES) + " |")
    print("|---|---|" + "---|" * len(SCORES))
    for path in sorted(first.glob("cells/*-steps/*/*.json")):
        other = second / path.relative_to(first)
        if not other.exists():
            continue
        a, b = load_file(str(path.with_suffix(".safetensors"))), load_file(str(other.with_suffix(".safetensors")))
        difference = sum(float((a[k].float() - b[k].float()).norm()) ** 2 for k in a) ** 0.5
        size = sum(float(b[k].float().norm()) ** 2 for k in b) ** 0.5
        scores = json.loads(path.read_text())["final"], json.loads(other.read_text())["final"]
        print(f"| {path.parent.name}/{path.stem} | {difference / size:.1e} | "
              + " | ".join(f"{scores[0][s]:.3f} / {scores[1][s]:.3f}" for s in SCORES) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
