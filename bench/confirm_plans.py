"""Would the planners' end-to-end check have caught a kept draft plan that drafts slower than
plain decoding? Each plan file given is timed as `DraftPlanner.confirm` now times a plan
before keeping it (`adainfer.drafting.time_plan`: its decoder against plain decoding on the
cell's calibration prompts, 3 batches, each generated twice by both in alternating order,
the prefill included), and what the check decides is written beside the plans, in
confirmations.json (one entry per plan file, --max-new-tokens and prompts, with the
machine). With --evaluated the plan is timed on the cell's first evaluated prompts instead
(what the grid cell measured it on).

The plans were fitted by bench/generation.py (`lossless-planned`), which kept them in the
out dir's plans/ as <model>-<dtype>-b<batch size>.json: the model is read from the file
name, its dtype and batch size from the plan, the calibration prompts from the task
bench/generation.py gives that model (`TASK_OF`).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/confirm_plans.py \\
        results/generation/grid/plans/gemma3-270m-fp32-b8.json --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adainfer import timing  # noqa: E402
from adainfer.drafting import load_plan, time_plan  # noqa: E402
from adainfer.files import read_json, write_json  # noqa: E402
from adainfer.models import load  # noqa: E402
from adainfer.schema import int_at_least  # noqa: E402
from generation import TASK_OF, make_task, plan_length  # noqa: E402


def confirm(
    path: Path,
    data_dir: str,
    batches: int,
    max_new_tokens: int | None,
    evaluated: bool,
    paragraphs: int = 3,
) -> dict:
    plan = load_plan(path)
    if plan.plain:
        return {"plan": plan.describe(), "timed": None}
    name = path.stem.rsplit("-", 2)[0]  # the bundled model's name, as the bench wrote it
    if name not in TASK_OF or "dtype" not in plan.meta:
        raise SystemExit(
            f"{path}: not a plan bench/generation.py kept (named <model>-<dtype>-b<batch "
            f"size>.json with a model of {sorted(TASK_OF)}, its dtype in the plan's meta)"
        )
    model, tokenizer = load(name, dtype=plan.meta["dtype"])
    task = make_task(TASK_OF[name], None, tokenizer, data_dir, calibration_paragraphs=paragraphs)
    prompts = [it.prompt for it in task.items] if evaluated else task.calibration
    length = max_new_tokens or plan_length(task)
    timed = time_plan(
        plan,
        model,
        tokenizer,
        prompts,
        batch_size=plan.batch_size,
        max_new_tokens=length,
        batches=batches,
    )
    return {
        "prompts": "evaluated" if evaluated else "calibration",
        "distinct_prompts": len(set(prompts[: batches * plan.batch_size])),
        "max_new_tokens": length,
        "plan": plan.describe(),
        "timed": timed,
        "decision": plan.confirmed(timed["median"]).describe(),
        "machine": timing.machine(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plans", nargs="+", type=Path, help="draft plan files (JSON)")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--batches", type=int_at_least(1), default=3)
    p.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=None,
        help="tokens a row (default: what the bench's planner now decodes, the task's "
        "length up to 128; Gemma fp32 b8's kept plan was fitted at 128)",
    )
    p.add_argument(
        "--evaluated",
        action="store_true",
        help="time on the cell's first evaluated prompts, not its calibration prompts",
    )
    p.add_argument(
        "--calibration-paragraphs",
        type=int_at_least(1),
        default=3,
        help="SQuAD: calibration prompts from this many paragraphs of each held-out article "
        "(bench/generation.py's setting; 1: the 8 prompts the committed cells were fitted on)",
    )
    p.add_argument("--threads", type=int_at_least(1), default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in args.plans:
        out = path.parent / "confirmations.json"
        found = read_json(out) if out.is_file() else {}
        length = args.max_new_tokens or "task"
        key = f"{path.name}@{length}-{'evaluated' if args.evaluated else 'calibration'}"
        if not args.evaluated and args.calibration_paragraphs > 1:  # 1: the first entries' kind
            key += f"-{args.calibration_paragraphs}-paragraphs"
        found[key] = confirm(
            path,
            args.data_dir,
            args.batches,
            args.max_new_tokens,
            args.evaluated,
            args.calibration_paragraphs,
        )
        write_json(out, found)
        print(f"{key}: {found[key].get('decision') or found[key]['plan']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
