"""`para-trainer quality`: the papers' claims measured on the toy world (PaRa against LoRA, LoCon, LoKr, KronA).

methods.py  what is trained (module, rank, network args, learning rate) and the parameter budgets
prompts.py  the fixed prompt set per concept: identity, edits, class prompts
study.py    the cells (concept x method x budget x seed), trained with the project's trainer, resumable
scores.py   the judge's scores of one cell's samples: fidelity, recognition, alignment, drift, diversity
report.py   JSON, a Markdown table (mean +- std) and the plots
cli.py      the command
"""
