"""Tables and plots. Library code returns numbers; this module only formats and draws them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import write_atomic


def _save(fig, path, dpi: int) -> None:
    """A PNG written whole or not at all (a kill mid-write leaves the previous figure)."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_layers(
    summary: dict, layer_acc: np.ndarray | None, path: str | Path, title: str = ""
) -> Path:
    """Left: accuracy if every query stopped at layer l. Right: each policy's accuracy against
    the layers it used."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    L = summary["num_layers"]
    if layer_acc is not None:
        ax = axes[0]
        ax.plot(np.arange(1, L + 1), 100 * layer_acc, marker="o", ms=3)
        ax.set_xlabel("layer l")
        ax.set_ylabel("top-1 accuracy at layer l (%)")
        ax.set_title("Answer emerges with depth (logit lens)")
        ax.set_xlim(1, L)
        ax.grid(alpha=0.3)
    ax = axes[1]
    markers = "osD^v<>pPX*h"
    for i, (name, s) in enumerate(summary["policies"].items()):
        ax.scatter(
            100 * s["mean_exit_layer"] / L,
            100 * s["accuracy"],
            s=60,
            marker=markers[i % len(markers)],
            zorder=3,
            alpha=0.8,
            label=f"{name} (true FLOPs {100 * s['true_flops_ratio']:.0f}%)",
        )
    ax.set_xlabel("layers used (% of full depth)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Policies: accuracy against layers used")
    ax.set_xlim(-2, 105)
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8, loc="center left")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    _save(fig, path, dpi=120)  # write_atomic makes the folder
    plt.close(fig)
    return path


def plot_demo(summary: dict, layer_acc: np.ndarray, path: str | Path, title: str = "") -> Path:
    """The default demo for a newcomer. Left: accuracy if every query stopped at layer l, with
    the layers where the plan checks. Right: measured time against the plain model's, with each
    row's accuracy."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    L = summary["num_layers"]
    left.plot(np.arange(1, L + 1), 100 * layer_acc, marker="o", ms=3, label="stop every query here")
    for i, layer in enumerate(summary["planned_check_layers"]):
        left.axvline(
            layer, color="tab:green", ls="--", label="the plan checks here" if not i else None
        )
    left.set(xlabel="layer l", ylabel="top-1 accuracy at layer l (%)", xlim=(1, L))
    left.set_title("Where the answer appears (calibration queries)")
    left.legend(fontsize=8, loc="upper left")
    left.grid(alpha=0.3)
    _time_bars(right, summary)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    _save(fig, path, dpi=120)
    plt.close(fig)
    return path


def _time_bars(ax, summary: dict) -> None:
    """One bar per row (the plain model first, at 1.0), labelled with its accuracy."""
    full = summary["policies"]["full"]
    rows = [("plain model", 1.0, full["accuracy"])]  # its answers are the full engine's
    rows += [(n, s["time_vs_plain"], s["accuracy"]) for n, s in summary["policies"].items()]
    names, times, accs = zip(*rows)
    y = np.arange(len(rows))[::-1]
    bars = ax.barh(y, times, color=["tab:gray", *["tab:blue"] * (len(rows) - 1)])
    for bar, acc in zip(bars, accs):
        x, mid = bar.get_width(), bar.get_y() + bar.get_height() / 2
        ax.text(x + 0.01, mid, f"{x:.2f}x, accuracy {100 * acc:.1f}%", va="center", fontsize=9)
    ax.axvline(1.0, color="black", lw=0.8)
    right = max(1.6, max(times) + 0.6)  # room for the labels
    ax.set(yticks=y, yticklabels=names, xlim=(0, right), xlabel="time relative to the plain model")
    ax.set_title(f"Measured side by side on {summary['num_queries']} held-out queries")
    ax.grid(alpha=0.3, axis="x")


# ----------------------------------------------------------------------------- adainfer reproduce
def matching(rows, **where) -> list[dict]:
    """The rows whose fields match `where` (each a value, or a callable test of the field)."""
    return [
        r for r in rows if all((v(r[k]) if callable(v) else r[k] == v) for k, v in where.items())
    ]


def row_mean(rows, key, **where):
    """n-weighted mean of `key` over rows matching `where` (a value, or a callable test)."""
    sel = [r for r in matching(rows, **where) if r.get(key) is not None]
    n = sum(r["n"] for r in sel)
    return sum(r[key] * r["n"] for r in sel) / n if n else None


def exit_moments(rows, **where) -> tuple[float, float] | tuple[None, None]:
    """(mean, variance) of the exit layer over every query of the matching rows, from their
    exit-layer histograms (the paper's Observation 1 reports both)."""
    hists = [r["exit_layer_histogram"] for r in matching(rows, **where)]
    if not hists:
        return None, None
    hist = np.sum(hists, axis=0)
    layers = np.arange(1, len(hist) + 1)
    mean = float((hist * layers).sum() / hist.sum())
    return mean, float((hist * (layers - mean) ** 2).sum() / hist.sum())


def paper_tasks(tasks) -> list[str]:
    """The tasks the paper singles out in its figures and Table 7: sentiment (SST-2) and an
    MMLU subject (here MMLU, or its first subject group); else the first two tasks."""
    mmlu = [t for t in tasks if t.startswith("mmlu")][:1]
    return ([t for t in tasks if t == "sst2"] + mmlu) or list(tasks[:2])


FEW_SHOT, ZERO_SHOT = (lambda k: k > 0), (lambda k: k == 0)


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(rows, family, policy, **where) -> str:
    """'accuracy / FLOPs' of one policy over the matching rows."""
    acc, flops = (
        row_mean(rows, key, family=family, policy=policy, **where)
        for key in ("accuracy", "flops_ratio")
    )
    return f"{_pct(acc)} / {_pct(flops)}"


def markdown_table(header, rows) -> str:
    """A GitHub markdown table: `header` names the columns, each row is a list of cells.

    A row of another width, or a cell holding "|", is a ValueError: rendered, it would shift
    the row's cells under the wrong column names and drop the last (a reader sees no error)."""
    rows = [[str(c) for c in row] for row in rows]
    for row in [list(header), *rows]:
        if len(row) != len(header) or any("|" in c for c in row):
            raise ValueError(f"a table row of {len(row)} cells under {len(header)} columns: {row}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def eval_table(summary: dict) -> str:
    """`adainfer eval` / demo: one row per policy, the full model first."""
    body = [
        [
            name,
            f"{100 * s['accuracy']:.1f}%",
            f"{s['mean_exit_layer']:.1f} / {s['num_layers']}",
            f"{100 * s['flops_ratio']:.1f}%",
            f"{100 * s['true_flops_ratio']:.1f}%",
            "-" if s["time_vs_plain"] is None else f"{s['time_vs_plain']:.2f}x",
        ]
        for name, s in summary["policies"].items()
    ]
    return markdown_table(
        ["policy", "accuracy", "mean exit layer", "paper FLOPs", "true FLOPs", "time vs plain"],
        body,
    )


def format_layers(layers) -> str:
    """A check schedule in a table cell: 'first..last /stride', 'none' (never checks) or '-'."""
    if layers is None:
        return "-"
    if not layers:
        return "none"
    return f"{layers[0]}..{layers[-1]}" + (f" /{layers[1] - layers[0]}" if len(layers) > 1 else "")


def _ratio(row, variant) -> str:
    """'median [25th-75th percentile]' of the variant's paired per-batch time ratios to plain."""
    iqr = row.get(f"{variant}/plain_iqr")
    return f"{row[f'{variant}/plain']:.3f}" + (f" [{iqr[0]:.2f}-{iqr[1]:.2f}]" if iqr else "")


def _plan_test(row) -> str:
    """The promise the row's plan keeps ('risk <= epsilon, delta'), or 'agreement / confidence'
    of the test it passed before risk control ('-': not recorded, or off)."""
    if row.get("risk"):
        return f"{row['risk']} <= {row['epsilon']:g}, delta {row['delta']:g}"
    agreement = f"{row['min_agreement']:g}" if "min_agreement" in row else "-"
    return agreement + " / " + (f"{row['confidence']:g}" if row.get("confidence") else "-")


def bench_table(rows) -> str:
    """`adainfer bench`: one row per model, dtype, task and batch size."""
    short = any("shortlist" in r for r in rows)  # shortlist columns where a row has them
    return markdown_table(_bench_header(short), [_bench_row(r, short) for r in rows])


def _bench_header(short: bool) -> list[str]:
    header = [
        "model",
        "dtype",
        "task",
        "bs",
        "full acc",
        "policy acc",
        "exit layer (policy / oracle)",
        "checks",
        "paper / true FLOPs",
        "check cost, layers (exact / bf16 head" + (" / shortlist)" if short else ")"),
        "check layers",
        "plan's test: risk bound, or agreement / loss-bound confidence",
        "policy/plain",
        "never/plain",
        "hooks/plain",
        "oracle/plain",
        "prompts/s (plain / policy)",
        "peak MB (plain / policy)",
    ]
    if short:
        header += [
            "shortlist: check layers",
            "shortlist: acc",
            "shortlist: exit layer",
            "shortlist/plain",
        ]
    return header


def _bench_row(r, short: bool) -> list:
    nan = float("nan")
    p, o = r["policy"], r["oracle"]
    costs = (
        f"{r.get('check_cost_layers', nan):.2f} / {r.get('check_cost_bf16_head_layers', nan):.2f}"
    )
    if short:
        costs += f" / {r.get('check_cost_shortlist_layers') or nan:.2f}"
    line = [
        r["model"],
        r["dtype"],
        r["task"],
        r["batch_size"],
        f"{100 * r['full_accuracy']:.1f}",
        f"{100 * p['accuracy']:.1f}",
        f"{p['mean_exit_layer']:.1f} / {o['mean_exit_layer']:.1f}",
        f"{p['mean_checks']:.1f}",
        f"{100 * p['flops_ratio']:.1f}% / {100 * p['true_flops_ratio']:.1f}%",
        costs,
        format_layers(r.get("check_layers")),
        _plan_test(r),
        _ratio(r, "policy"),
        _ratio(r, "never"),
        _ratio(r, "hooks"),
        _ratio(r, "oracle"),
        f"{r['prompts_per_s_plain']:.1f} / {r['prompts_per_s_policy']:.1f}",
        f"{r['peak_mem_plain_mb']:.0f} / {r['peak_mem_policy_mb']:.0f}",
    ]
    if short:
        s = r.get("shortlist")
        line += (
            ["-"] * 4
            if s is None
            else [
                format_layers(r.get("shortlist_check_layers")),
                f"{100 * s['accuracy']:.1f}",
                f"{s['mean_exit_layer']:.1f}",
                _ratio(r, "shortlist"),
            ]
        )
    return line


def bench_retimed(rows) -> str:
    """Cells timed more than once: every earlier timing next to the one in the table, so a re-run
    adds evidence and never hides what came before."""
    lines = []
    for r in (r for r in rows if r.get("earlier_timings")):
        runs = r["earlier_timings"] + [r]
        said = "; ".join(
            f"policy/plain {_ratio(t, 'policy')}, never/plain {_ratio(t, 'never')} "
            f"({t.get('paired_samples', '?')} paired, "
            f"checks at {format_layers(t.get('check_layers'))})"
            for t in runs
        )
        lines.append(
            f"- {r['model']} {r['dtype']} {r['task']} bs {r['batch_size']}, oldest first: {said}"
        )
    return "\n".join(lines)


def bench_targets(rows) -> str:
    """The speed issue's time and memory targets, checked on the grid: each one's worst cell.

    Conversion applies where the policy saves layers (paper FLOPs below 100%). Memory compares
    whole-process peaks (resident set before the call + peak above it); rows from before
    `resident_mb` was recorded compare the peaks above the resident set, with 1 MB of slack for
    its sampling's granularity."""

    def cell(r):
        return f"{r['model']} {r['dtype']} {r['task']} bs {r['batch_size']}"

    def worst(name, limit_of, value_of, cells):
        cells = [r for r in cells if limit_of(r) is not None]
        if not cells:
            return f"- {name}: no cell applies"
        r = max(cells, key=lambda r: value_of(r) - limit_of(r))
        within = sum(value_of(c) <= limit_of(c) for c in cells)
        return (
            f"- {name}: {'met' if within == len(cells) else 'NOT met'}, {within} of {len(cells)} "
            f"cells within; worst {value_of(r):.3f} against {limit_of(r):.3f} ({cell(r)})"
        )

    def peak(r, variant):  # MB, whole process where the row knows its resident set
        return r.get("resident_mb", 0) + r[f"peak_mem_{variant}_mb"]

    saves = [r for r in rows if r["policy"]["flops_ratio"] < 1]
    return "\n".join(
        [
            worst(
                "never slower, policy/plain <= 1.03",
                lambda r: 1.03,
                lambda r: r["policy/plain"],
                rows,
            ),
            worst(
                "overhead, never/plain <= 1.05 at batch 1 and 32",
                lambda r: 1.05 if r["batch_size"] in (1, 32) else None,
                lambda r: r["never/plain"],
                rows,
            ),
            worst(
                "conversion, policy/plain <= 1.10 x true FLOPs ratio at batch 1, 1.15 x above",
                lambda r: (
                    (1.10 if r["batch_size"] == 1 else 1.15) * r["policy"]["true_flops_ratio"]
                ),
                lambda r: r["policy/plain"],
                saves,
            ),
            worst(
                "memory, policy peak <= plain peak + 10% "
                "(MB, the process's resident set at the peak)",
                lambda r: 1.10 * peak(r, "plain") + (0 if "resident_mb" in r else 1.0),
                lambda r: peak(r, "policy"),
                rows,
            ),
        ]
    )


def reproduce_tables(results: dict) -> str:
    """tables.md of `adainfer reproduce`: the paper's tables, from results.json's numbers."""
    settings = _shot_settings(results["config"]["shots"])
    out = _reproduce_header(results["config"]) + _table_1(results)
    for title, cond in settings:
        out += _full_vs_svm_table(results, title, cond)
        out += _policies_table(results, title, cond)
        out += _choice_table(results, title, cond)
    out += _generalization_table(results)
    out += _factor_table(results)
    out += _observation_1_table(results, settings)
    out += _layer_accuracy_table(results, settings)
    out += _oracle_tables(results, settings)
    if results.get("notes"):
        out += ["", "## Notes", ""] + [f"- {k}: {v}" for k, v in results["notes"].items()]
    return "\n".join(out) + "\n"


def _shot_settings(shots) -> list:
    """[(title, test of k)]: zero-shot and few-shot (its k averaged), where the run has them."""
    few = [k for k in shots if k > 0]
    settings = [("zero-shot", ZERO_SHOT)] if 0 in shots else []
    if few:
        averaged = ", averaged" if len(few) > 1 else ""
        settings.append((f"few-shot (k = {', '.join(map(str, few))}{averaged})", FEW_SHOT))
    return settings


def _reproduce_header(cfg) -> list[str]:
    held_out = (
        " The held-out examples of each task (indices into its data) are in results.json, "
        "`config.held_out`."
        if cfg.get("held_out")
        else ""
    )
    return [
        f"# AdaInfer reproduction: {cfg['model']} ({cfg['dtype']})",
        "",
        f"Tasks: {', '.join(cfg['tasks'])}; {cfg['n_queries']} held-out queries per task and k "
        f"(fewer where the task has fewer); k in {cfg['shots']}; classifiers trained on "
        f"{cfg['n_train']} pool queries per task ({cfg['train_shots']}-shot) of the random "
        f"training subset {cfg['train_tasks']}; seed {cfg['seed']}. Accuracy: top-1 over the "
        "whole vocabulary at the exit layer (the paper's); `choice`: restricted to the choice "
        "tokens (lm-eval-harness style). FLOPs in % of the full model: paper formula / true "
        "(checks charged)." + held_out,
    ]


def _full_vs_svm_table(results, title, cond) -> list[str]:
    """Tables 2/3: the full model against the paper's SVM, per task and per task group."""
    rows, tasks = results["rows"], results["config"]["tasks"]
    groups = list(dict.fromkeys(r["group"] for r in rows))

    def pct(key, policy, scope):
        return _pct(row_mean(rows, key, family="main", policy=policy, shots=cond, **scope))

    body = [
        [
            name,
            pct("accuracy", "full", scope),
            pct("accuracy", "svm", scope),
            pct("flops_ratio", "svm", scope),
            pct("true_flops_ratio", "svm", scope),
            pct("flops_ratio", "oracle", scope),
        ]
        for name, scope in [
            *((t, {"task": t}) for t in tasks),
            *((f"**{g}**", {"group": g}) for g in groups),
        ]
    ]
    header = ["task", "full acc", "SVM acc", "SVM FLOPs", "SVM true FLOPs", "oracle FLOPs"]
    title = f"## Tables 2/3: full model vs AdaInfer (SVM), {title}"
    return ["", title, "", markdown_table(header, body)]


def _policies_table(results, title, cond) -> list[str]:
    """Tables 4/8/9: every policy's accuracy / FLOPs / true FLOPs, per task."""
    rows, names = results["rows"], results["families"]["main"]

    def cell(policy, task):
        return " / ".join(
            _pct(row_mean(rows, key, family="main", policy=policy, shots=cond, task=task))
            for key in ("accuracy", "flops_ratio", "true_flops_ratio")
        )

    body = [[t] + [cell(p, t) for p in names] for t in results["config"]["tasks"]]
    title = f"## Tables 4/8/9: policies compared, {title} (accuracy / FLOPs / true FLOPs)"
    return ["", title, "", markdown_table(["task", *names], body)]


def _choice_table(results, title, cond) -> list[str]:
    """Whole-vocabulary against choice-restricted accuracy, for the tasks that have choices."""
    rows = results["rows"]
    tasks = [
        t
        for t in results["config"]["tasks"]
        if row_mean(rows, "choice_accuracy", family="main", policy="full", task=t) is not None
    ]
    if not tasks:
        return []
    body = [
        [t]
        + [
            _pct(row_mean(rows, m, family="main", policy=p, shots=cond, task=t))
            for p in ("full", "svm")
            for m in ("accuracy", "choice_accuracy")
        ]
        for t in tasks
    ]
    header = ["task", "full: vocab", "full: choice", "SVM: vocab", "SVM: choice"]
    title = f"## Whole-vocabulary vs choice-restricted accuracy, {title}"
    return ["", title, "", markdown_table(header, body)]


def _generalization_table(results) -> list[str]:
    """Table 6: the SVM and the CRF trained on other tasks or another model, tested on SST-2
    and on all tasks (few-shot), with the mean and variance of the exit layer."""
    rows, scopes = results["rows"], ({"task": "sst2"}, {})
    body = [_generalization_row(rows, "full model", "-", "main", "full")]
    body += [
        _generalization_row(rows, "in-distribution (train: random task subset)", c, "main", c)
        for c in ("svm", "crf")
        if c in results["families"]["main"]
    ]
    for name in results["families"]["generalization"]:
        classifier, _, setting = name.partition(": ")
        body.append(_generalization_row(rows, setting, classifier, "generalization", name))
    header = [
        "trained on",
        "classifier",
        *(f"tested on {s.get('task', 'all tasks')}: acc / FLOPs" for s in scopes),
        "layers (mean exit, all tasks)",
        "variance (exit layer)",
    ]
    title = "## Table 6: generalization (few-shot; accuracy / FLOPs in %)"
    return ["", title, "", markdown_table(header, body)]


def _generalization_row(rows, setting, classifier, family, policy) -> list:
    mean, var = exit_moments(rows, family=family, policy=policy, shots=FEW_SHOT)
    return [
        setting,
        classifier,
        _cell(rows, family, policy, shots=FEW_SHOT, task="sst2"),
        _cell(rows, family, policy, shots=FEW_SHOT),
        "-" if mean is None else f"{mean:.2f}",
        "-" if var is None else f"{var:.2f}",
    ]


def _factor_table(results) -> list[str]:
    """Table 7: the SVM on each feature set, few-shot on sentiment and MMLU (the paper's
    columns) and on all tasks, zero-shot on all tasks; then per k over all tasks."""
    rows, names, tasks = results["rows"], results["families"]["factor"], results["config"]["tasks"]
    columns = [(f"{t}, few-shot", {"task": t, "shots": FEW_SHOT}) for t in paper_tasks(tasks)]
    columns += [
        ("all tasks, few-shot", {"shots": FEW_SHOT}),
        ("all tasks, 0-shot", {"shots": ZERO_SHOT}),
    ]
    columns = [(c, w) for c, w in columns if matching(rows, family="factor", **w)]

    def cell(f, **where):
        keys = ("accuracy", "flops_ratio", "true_flops_ratio")
        return " / ".join(_pct(row_mean(rows, k, family="factor", policy=f, **where)) for k in keys)

    body = [[f, *(cell(f, **w) for _, w in columns)] for f in names]
    title = "## Table 7: feature factor study (SVM; accuracy / FLOPs / true FLOPs)"
    out = ["", title, "", markdown_table(["features", *(c for c, _ in columns)], body)]
    shots = results["config"]["shots"]
    per_k = [[f, *(cell(f, shots=k) for k in shots)] for f in names]
    header = ["features", *(f"all tasks, {k}-shot" for k in shots)]
    return out + ["", "Per k:", "", markdown_table(header, per_k)]


def _observation_1_table(results, settings) -> list[str]:
    """Observation 1: where queries exit, as the mean and variance of the exit layer of every
    main policy over all tasks, per setting."""
    rows, L = results["rows"], results["model"]["num_layers"]
    body = []
    for p in results["families"]["main"]:
        line = [p]
        for _, cond in settings:
            mean, var = exit_moments(rows, family="main", policy=p, shots=cond)
            line.append("-" if mean is None else f"{mean:.2f} / {var:.2f}")
        body.append(line)
    header = ["policy", *(f"{title}: mean / variance" for title, _ in settings)]
    title = f"## Observation 1: exit layer (of L = {L}) over all tasks, mean and variance"
    return ["", title, "", markdown_table(header, body)]


def layer_curve(results, task, cond) -> np.ndarray | None:
    """Top-1 accuracy at each layer for one task over the matching k (n-weighted)."""
    cells = matching(results.get("layer_accuracy", []), task=task, shots=cond)
    if not cells:
        return None
    n = np.array([c["n"] for c in cells], float)
    return (n[:, None] * np.array([c["accuracy"] for c in cells])).sum(0) / n.sum()


def _layer_accuracy_table(results, settings) -> list[str]:
    """Figure 1 in numbers: accuracy at each layer for sentiment and MMLU, per setting."""
    columns = [
        (f"{t}, {title}", curve)
        for t in paper_tasks(results["config"]["tasks"])
        for title, cond in settings
        if (curve := layer_curve(results, t, cond)) is not None
    ]
    if not columns:
        return []
    L = results["model"]["num_layers"]
    body = [[l, *(_pct(c[l - 1]) for _, c in columns)] for l in range(1, L + 1)]
    title = "## Figure 1 in numbers: top-1 accuracy (%) if every query stopped at layer l"
    return ["", title, "", markdown_table(["layer", *(n for n, _ in columns)], body)]


def _size(n) -> str:
    """A parameter count as people quote it (135M, 1.54B); "-" where the traces lack it."""
    if n is None:
        return "-"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def model_statistics(results) -> list:
    """Model id, type, parameters, layers, hidden size, vocabulary and dtype, as a run's
    results record them (the columns of Table 1)."""
    m = results["model"]
    size = _size(m.get("parameters"))
    shape = [m["num_layers"], m["hidden_size"], m["vocab_size"]]
    return [m["model_id"], m["model_type"], size, *shape, results["config"]["dtype"]]


def _table_1(results) -> list[str]:
    """Table 1: the model's statistics, as the traces record them."""
    body = [model_statistics(results)]
    header = ["model", "type", "parameters", "layers", "hidden size", "vocabulary", "dtype"]
    return ["", "## Table 1: model statistics", "", markdown_table(header, body)]


ORACLE_NOTE = (
    "first correct: earliest layer whose top-1 is the gold token; settled: earliest layer after "
    "which the top-1 never changes (both averaged over the setting's k). Share = (L - policy "
    "exit) / (L - first correct), of those averages; `-` where less than half a layer was "
    "reachable; `lossy` where the policy loses more than 1 point of accuracy against the full "
    "model; `before the oracle` where it stops, on average, before the first correct layer "
    "without losing (the full model is as wrong)."
)


def _oracle_tables(results, settings) -> list[str]:
    """How much saving was reachable (the oracle bounds) and each policy's share of it."""
    policies = [p for p in results["families"]["main"] if p not in ("full", "oracle")]
    out = [
        "",
        "## Oracle bounds: how much saving was reachable, and how much each policy got",
        "",
        ORACLE_NOTE,
        "",
    ]
    header = ["task", "first correct", "settled", *(f"share: {p}" for p in policies)]
    for title, cond in settings:
        body = []
        for t in results["config"]["tasks"]:
            bounds = [x for x in results["oracle_bounds"] if x["task"] == t and cond(x["shots"])]
            if bounds:
                body.append(_oracle_row(results["rows"], t, cond, bounds, policies))
        out += ["", f"### {title}", "", markdown_table(header, body)]
    return out


def _oracle_row(rows, task, cond, bounds, policies) -> list:
    L = bounds[0]["num_layers"]
    first = np.mean([x["first_correct_layer"] for x in bounds])
    settled = np.mean([x["settled_layer"] for x in bounds])
    full_acc = row_mean(rows, "accuracy", family="main", policy="full", task=task, shots=cond)
    shares = []
    for p in policies:
        e = row_mean(rows, "mean_exit_layer", family="main", policy=p, task=task, shots=cond)
        acc = row_mean(rows, "accuracy", family="main", policy=p, task=task, shots=cond)
        if e is None or L - first < 0.5:
            shares.append("-")
        elif acc < full_acc - 0.01:  # saving by answering wrong is no share of the saving
            shares.append(f"lossy ({100 * (acc - full_acc):+.1f} acc)")
        elif e < first:  # stops before the oracle could: no share of a saving, a guess
            shares.append(f"before the oracle (exit {e:.1f})")
        else:
            shares.append(f"{100 * (L - e) / (L - first):.0f}%")
    return [task, f"{first:.1f} / {L}", f"{settled:.1f} / {L}", *shares]


def reproduce_figures(results: dict, traces, out_dir) -> list[Path]:
    """Figure 1 (accuracy vs layer), Figure 3 (features vs layer), exit-layer histograms."""
    plt, out_dir = _pyplot(), Path(out_dir)
    return [
        _figure_1(plt, results["config"], traces, out_dir / "fig1_accuracy_vs_layer.png"),
        _figure_3(plt, results["config"], traces, out_dir / "fig3_features_vs_layer.png"),
        _exit_histograms(plt, results, traces, out_dir / "exit_layer_histograms.png"),
    ]


def _integer_layers(ax, L: int) -> None:
    """Layer axis 1..L with whole-number ticks only (a layer 7.5 does not exist)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(1, L)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_below(fig, ax, ncol: int) -> None:
    """One legend for the figure, under the panels, so it covers no data."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)


def _figure_1(plt, cfg, traces, path: Path) -> Path:
    """Top-1 accuracy at each layer, one line per k, for SST-2 and MMLU (else the first tasks)."""
    L, shots_of = traces.num_layers, traces.shots
    shown = paper_tasks(cfg["tasks"])
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.4), squeeze=False)
    for ax, t in zip(axes[0], shown):
        for k in cfg["shots"]:
            m = (traces.task == t) & (shots_of == k)
            if m.any():
                ax.plot(
                    np.arange(1, L + 1),
                    100 * (traces.top1[m] == traces.gold[m, None]).mean(0),
                    marker="o",
                    ms=2.5,
                    label=f"{k}-shot",
                )
        ax.set(title=f"{t}: top-1 accuracy at each layer", xlabel="layer", ylabel="accuracy (%)")
        _integer_layers(ax, L)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0][0], ncol=len(cfg["shots"]))
    fig.suptitle(f"Figure 1 - {cfg['model']} (one line per k)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path, dpi=110)
    plt.close(fig)
    return path


def _figure_3(plt, cfg, traces, path: Path) -> Path:
    """The mean of each feature by layer, few-shot (zero-shot where the run has no k > 0),
    one panel per task the paper contrasts (sentiment, MMLU)."""
    L, names = traces.num_layers, traces.feature_names
    shown = [n for n in ("gap", "top_prob", "cos_attn", "cos_mlp", "cos_hidden") if n in names]
    tasks = paper_tasks(cfg["tasks"])
    few = traces.shots > 0 if (traces.shots > 0).any() else np.ones(len(traces), bool)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        m = few & (traces.task == t)
        for n in shown:
            v = traces.features[m][:, :, names.index(n)]
            ax.plot(
                np.arange(1, L + 1), np.nanmean(v, 0) if m.any() else np.full(L, np.nan), label=n
            )
        ax.set(title=f"{t}, few-shot ({int(m.sum())} queries)", xlabel="layer", ylabel="mean value")
        _integer_layers(ax, L)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0][0], ncol=len(shown))
    fig.suptitle(f"Figure 3 - mean features by layer, {cfg['model']}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    _save(fig, path, dpi=110)
    plt.close(fig)
    return path


def _exit_histograms(plt, results, traces, path: Path) -> Path:
    """Where the oracle and every classifier exit: one panel per task and setting (zero-shot
    and few-shot apart), as the share of the setting's queries at each layer."""
    L, tasks, model = traces.num_layers, results["config"]["tasks"], results["config"]["model"]
    rows = [r for r in results["rows"] if r["family"] == "main"]
    shown = [p for p in results["families"]["main"] if p != "full"]
    settings = _shot_settings(results["config"]["shots"])
    cols = 4
    per = -(-len(tasks) // cols)  # rows of panels per setting
    fig, axes = plt.subplots(
        per * len(settings),
        cols,
        figsize=(4 * cols, 2.9 * per * len(settings) + 0.8),
        squeeze=False,
    )
    for i, (title, cond) in enumerate(settings):
        panels = list(axes[i * per : (i + 1) * per].flat)
        for ax, t in zip(panels, tasks):
            _histogram_panel(ax, rows, shown, t, cond, L)
            ax.set_title(f"{t}, {title.split(' (')[0]}", fontsize=9)
        for ax in panels[len(tasks) :]:
            ax.axis("off")
    _legend_below(fig, axes[0][0], ncol=len(shown))
    fig.suptitle(f"Exit-layer distribution per task and setting ({model}); {settings[-1][0]}")
    fig.tight_layout(rect=(0, 0.03, 1, 0.98))
    _save(fig, path, dpi=100)
    plt.close(fig)
    return path


def _histogram_panel(ax, rows, shown, task, cond, L) -> None:
    # policies that never stop share the last layer's bar: styles and widths keep each visible
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 2))]
    for i, p in enumerate(shown):
        hist = np.sum(
            [r["exit_layer_histogram"] for r in matching(rows, task=task, policy=p, shots=cond)]
            or [np.zeros(L)],
            axis=0,
        )
        ax.step(
            np.arange(1, L + 1),
            hist / max(hist.sum(), 1),
            where="mid",
            label=p,
            linestyle=styles[i % len(styles)],
            linewidth=2.6 - 0.35 * (i % len(styles)),
        )
    ax.set(xlabel="exit layer", ylabel="share of queries")
    _integer_layers(ax, L)
    ax.grid(alpha=0.3)
