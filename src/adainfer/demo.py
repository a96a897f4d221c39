"""`adainfer demo`: the whole method on the bundled model, offline, in a few minutes.

Collect per-layer features on built-in rule tasks (few-shot), fit the exit policies, evaluate
them on held-out queries next to the full model and the oracle bound, print a table and draw
accuracy against layers used.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .checks import promise
from .collect import collect
from .evaluate import evaluate, layer_accuracy
from .files import OutputLock, write_json, write_text_atomic
from .models import DEFAULT_MODEL, load
from .persist import save_policy
from .pipeline import fit_policy
from .policies import OracleExit, SVMExit, standard_policies
from .prefill import AdaptiveEngine
from .report import eval_table, plot_accuracy_vs_layers
from .tasks import task_queries
from .timing import measure_check_cost

log = logging.getLogger(__name__)

DEMO_TASKS = ("capitalize", "lowercase", "first_item", "last_item")


def run_demo(
    model: str = DEFAULT_MODEL,
    out_dir: str | Path = "runs/demo",
    *,
    tasks=DEMO_TASKS,
    shots: int = 5,
    n_train: int = 40,
    n_test: int = 40,
    batch_size: int = 8,
    dtype: str = "auto",
    device: str = "cpu",
    device_map=None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    out = Path(out_dir)
    with OutputLock(out):  # a second demo into this folder would overwrite this one's files
        lm, tokenizer = load(model, dtype=dtype, device=device, device_map=device_map)
        engine = AdaptiveEngine(lm, tokenizer)
        train, test = task_queries(
            tokenizer, tasks, shots=shots, n_train=n_train, n_test=n_test, seed=seed
        )
        collect(engine, train, out / "collect", batch_size=batch_size, progress=progress)
        policies = {}
        for name, policy in standard_policies().items():
            policies[name] = fit_policy(out / "collect", policy)
            save_policy(policies[name], out / "policies" / f"{name}.safetensors")
        # the same classifier, checking only where a check can pay for itself on this machine
        check_cost = measure_check_cost(engine, [q.prompt for q in test[:batch_size]])
        planned = fit_policy(
            out / "collect",
            SVMExit(features=("gap", "top_prob", "layer_frac")),
            check_cost=check_cost,
        )
        policies["svm+layer, planned"] = planned
        save_policy(planned, out / "policies" / "svm+layer-planned.safetensors")
        summary = evaluate(
            engine,
            test,
            {**policies, "oracle": OracleExit()},
            batch_size=batch_size,
            progress=progress,
        )
        layer_acc = layer_accuracy(engine, test, batch_size=batch_size, progress=progress)
        summary.update(
            model=getattr(lm, "adainfer_id", model),
            dtype=str(lm.dtype).removeprefix("torch."),
            tasks=list(tasks),
            shots=shots,
            n_train_per_task=n_train,
            n_test_per_task=n_test,
            seed=seed,
            check_cost_layers=check_cost,
            planned_check_layers=list(planned.planned_checks()),
            plan_promise=promise(planned.plans_),
            layer_accuracy=layer_acc.tolist(),
            table=eval_table(summary),
        )
        write_json(out / "summary.json", summary)
        write_text_atomic(out / "table.md", summary["table"] + "\n")
        summary["plot"] = str(
            plot_accuracy_vs_layers(
                summary,
                layer_acc,
                out / "accuracy_vs_layers.png",
                f"{summary['model']}, {shots}-shot rule tasks",
            )
        )
        return summary
