"""Where a lossless method's row differs from plain greedy in a generation-grid cell, how far
apart the model's top two logits were at the first differing token.

Lossless decoding keeps the model's greedy token, but "the model's greedy token" is only as
sharp as the arithmetic: in bf16 two logits can be equal, or one rounding unit apart (0.125
near 20), and then a forward over other shapes (a verifying forward over several tokens, a
batch without its finished rows) can round the other way. This reads every such row again,
teacher-forced on plain's tokens up to the difference at batch 1 in the cell's dtype, and
records the top two logits there: a gap of a rounding unit or less is a tie, anything wider
would be a bug.

    PYTHONPATH=src python bench/ties.py --out-dir results/generation/grid

writes `<out-dir>/ties.md` (and `ties.json`) from the cells in `<out-dir>/bench/`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import generation as G  # noqa: E402
from adainfer.files import write_json, write_text_atomic  # noqa: E402
from adainfer.stepper import teacher_forced  # noqa: E402

LOSSLESS = (
    "lossless",
    "lossless-planned",
    "lossless-exits@5%",
    "lossless-exits-planned@5%",
    "adainfer-plain",
)


def differing_rows(data: dict) -> list[dict]:
    """Rows of lossless methods whose tokens differ from plain's, with the first difference."""
    out = []
    for record in data["batches"].values():
        plain = record["runs"]["plain"]["tokens"]
        for name in LOSSLESS:
            mine = record["runs"].get(name, {}).get("tokens")
            for i, (p, m) in enumerate(zip(plain, mine or [])):
                if p != m:
                    n = G.common_prefix(p, m)
                    at = n if n < min(len(p), len(m)) else None  # None: one is a prefix
                    out.append(
                        {"id": record["ids"][i], "method": name, "at": at, "plain": p, "mine": m}
                    )
    return out


@torch.inference_mode()
def top_two(model, tokenizer, prompt: str, tokens: list[int]) -> tuple[list[int], list[float]]:
    """The top two tokens and logits (float32) after `prompt` and `tokens`."""
    inputs, _ = teacher_forced(model, tokenizer, [prompt], [tokens])
    logits = model(**inputs).logits[0, -1].float()
    top = logits.topk(2)
    return top.indices.tolist(), top.values.tolist()


def cell_ties(data: dict, model, tokenizer, prompts: dict[str, str]) -> list[dict]:
    rows = []
    for row in differing_rows(data):
        if row["at"] is None:  # one row is a prefix of the other: they stopped differently
            rows.append({**_head(data, row), "gap": None, "note": "stopped at another length"})
            continue
        ids, values = top_two(model, tokenizer, prompts[row["id"]], row["plain"][: row["at"] + 1])
        theirs = {row["plain"][row["at"]], row["mine"][row["at"]]}
        rows.append(
            {
                **_head(data, row),
                "top2": ids,
                "logits": values,
                "gap": values[0] - values[1],
                "note": "plain's and the method's tokens are the top two"
                if set(ids) == theirs
                else "another token between them",
            }
        )
    return rows


def _head(data: dict, row: dict) -> dict:
    return {
        "cell": G.cell_name(data),
        "method": row["method"],
        "id": row["id"],
        "token": row["at"],
        "of": len(row["plain"]),
    }


def table(rows: list[dict]) -> str:
    header = (
        "| cell | method | problem | first differing token | top two logits there | gap | reading |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        logits = " / ".join(f"{v:.3f}" for v in r.get("logits", [])) or "-"
        gap = "-" if r["gap"] is None else f"{r['gap']:.3f}"
        at = "-" if r["token"] is None else f"{r['token'] + 1} of {r['of']}"
        lines.append(
            f"| {r['cell']} | {r['method']} | {r['id']} | {at} | {logits} | {gap} | {r['note']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=G.RESULTS / "grid")
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for data in G.load_cells(args.out_dir):
        if not differing_rows(data):
            continue
        model, tokenizer = G.default_loader(data["model"], data["dtype"])
        task = G.make_task(G.TASK_OF[data["model"]], None, tokenizer, args.data_dir)
        rows += cell_ties(data, model, tokenizer, {it.id: it.prompt for it in task.items})
    write_json(args.out_dir / "ties.json", rows)
    write_text_atomic(args.out_dir / "ties.md", table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
