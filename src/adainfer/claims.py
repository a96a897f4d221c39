"""The paper's claims set against every model's results, with a verdict and the number that
decides it; Table 1 (model statistics) and a scale table across the models.

Reads only the results.json that `adainfer reproduce` (or `--report-only`) wrote in each
folder, so a new model's folder joins by being named; nothing here is typed by hand. Each
verdict is "holds", "does not hold" or "cannot be tested here" (with the reason: the data
lacks the setting, or no classifier stops, so there is nothing for the claim to be about).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .files import read_json
from .report import (
    FEW_SHOT,
    ZERO_SHOT,
    exit_moments,
    layer_curve,
    markdown_table,
    model_statistics,
    row_mean,
)

HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "cannot be tested here"
POINT = 0.01  # one accuracy point: the paper's "< 1%" loss, and what "neutral" allows
MIN_SAVING = 0.10  # the low end of the paper's "10-50% of computation saved"
NO_STOP = 0.005  # saving under half a percent of the FLOPs: the classifier never stops
EARLY = 0.9  # "before the last layer": by 90% of the depth, i.e. at least a 10% saving
CLASSIFIERS = ("svm", "crf", "logistic", "gap")  # the paper's two, our logistic, its baseline

RULES = (
    "Few-shot averages every k > 0 of the run; accuracy is top-1 over the whole vocabulary, "
    "FLOPs the paper's formula (% of the full model). A point is 1% of accuracy. "
    f"A classifier that saves under {100 * NO_STOP:g}% of the FLOPs never stops, and a claim "
    "about what it does cannot be tested. 'Best classifier': fewest accuracy points lost per "
    "point of FLOPs saved, among the classifiers that stop. 'Saving': at least "
    f"{100 * MIN_SAVING:.0f}% of the FLOPs at under 1 point. 'Neutral': accuracy and FLOPs "
    "within 1 point of the paper's features (gap, top prob); 'harmful': accuracy 1 point or more "
    "below them, or FLOPs 1 point or more above them at no gain in accuracy. Generalization "
    "holds when the SVM trained elsewhere is within 1 point of the in-distribution SVM and "
    "keeps at least half its saving. Zero- vs few-shot holds when "
    "zero-shot classification is under 10% and few-shot 10 points or more above it. The "
    "layer-wise curve holds when few-shot SST-2 accuracy reaches the last layer's (within 1 "
    f"point) by layer {EARLY:g} L. Observation 1 holds when the oracle's exit layer averages at "
    f"most {EARLY:g} L with a standard deviation of at least one layer."
)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    number: str

    def __str__(self) -> str:
        return f"{self.verdict}: {self.number}"


def load_results(folder: str | Path) -> dict:
    """A reproduce folder's results.json, with the folder's name (the model's short name)."""
    folder = Path(folder)
    results = read_json(folder / "results.json", "reproduce results.json")
    return {**results, "folder": folder.name}


# ----------------------------------------------------------------------------- numbers
def _mean(r, key, family, policy, **where):
    return row_mean(r["rows"], key, family=family, policy=policy, **where)


def _acc_flops(r, family, policy, **where):
    """(accuracy, FLOPs ratio) of one policy over the matching rows, few-shot unless said."""
    where = {"shots": FEW_SHOT, **where}
    return _mean(r, "accuracy", family, policy, **where), _mean(
        r, "flops_ratio", family, policy, **where
    )


def _pair(acc, flops) -> str:
    return f"{100 * acc:.1f}% at {100 * flops:.1f}% FLOPs"


def _percent(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _has_few_shot(r) -> bool:
    return any(k > 0 for k in r["config"]["shots"])


# ----------------------------------------------------------------------------- the claims
def svm_best(r) -> Verdict:
    """The paper recommends the SVM: the best of its classifiers."""
    if not _has_few_shot(r):
        return Verdict(UNTESTABLE, "no few-shot run")
    full, _ = _acc_flops(r, "main", "full")
    stops = {}
    for c in (c for c in CLASSIFIERS if c in r["families"]["main"]):
        acc, flops = _acc_flops(r, "main", c)
        if 1 - flops >= NO_STOP:
            stops[c] = 100 * (full - acc) / (100 * (1 - flops))
    if "svm" not in stops:
        acc, flops = _acc_flops(r, "main", "svm")
        return Verdict(UNTESTABLE, f"the SVM never stops ({_pair(acc, flops)})")
    said = ", ".join(f"{c} {v:.2f}" for c, v in sorted(stops.items(), key=lambda x: x[1]))
    best = min(stops, key=stops.get)
    return Verdict(HOLDS if best == "svm" else FAILS, f"points lost per point saved: {said}")


def saving(r) -> Verdict:
    """10-50% of the FLOPs saved at under 1 point of accuracy, few-shot."""
    if not _has_few_shot(r):
        return Verdict(UNTESTABLE, "no few-shot run")
    full, _ = _acc_flops(r, "main", "full")
    acc, flops = _acc_flops(r, "main", "svm")
    true = _mean(r, "true_flops_ratio", "main", "svm", shots=FEW_SHOT)
    ok = 1 - flops >= MIN_SAVING and full - acc < POINT
    return Verdict(
        HOLDS if ok else FAILS,
        f"SVM saves {100 * (1 - flops):.1f}% (true {100 * (1 - true):.1f}%) at "
        f"{100 * (acc - full):+.1f} points ({100 * full:.1f}% -> {100 * acc:.1f}%)",
    )


def _factor_deltas(r, name):
    """(accuracy change, FLOPs change) of the SVM with feature set `name` against the base
    features, few-shot; None where the run has no such feature set or no stop at all."""
    if name not in r["families"]["factor"] or not _has_few_shot(r):
        return None
    base, with_it = (_acc_flops(r, "factor", f) for f in ("base", name))
    if 1 - base[1] < NO_STOP and 1 - with_it[1] < NO_STOP:
        return None
    return with_it[0] - base[0], with_it[1] - base[1]


def _factor_claim(r, name, want: str) -> Verdict:
    deltas = _factor_deltas(r, name)
    if deltas is None:
        return Verdict(UNTESTABLE, f"the SVM never stops, with or without {name[1:]}")
    d_acc, d_flops = deltas
    said = f"{100 * d_acc:+.1f} points at {100 * d_flops:+.1f} points of FLOPs"
    if want == "neutral":
        ok = abs(d_acc) < POINT and abs(d_flops) < POINT
    else:  # a worse trade-off: accuracy lost, or layers spent for no accuracy
        ok = d_acc <= -POINT or (d_flops >= POINT and d_acc <= 0)
    return Verdict(HOLDS if ok else FAILS, said)


def attn_neutral(r) -> Verdict:
    return _factor_claim(r, "+attn", "neutral")


def mlp_harmful(r) -> Verdict:
    return _factor_claim(r, "+mlp", "harmful")


def hidden_harmful(r) -> Verdict:
    return _factor_claim(r, "+hidden state", "harmful")


def _transfer(r, setting: str, **where) -> Verdict:
    """The SVM trained in `setting` against the in-distribution SVM, few-shot."""
    if not _has_few_shot(r):
        return Verdict(UNTESTABLE, "no few-shot run")
    name = next(
        (g for g in r["families"]["generalization"] if g.startswith(f"svm: {setting}")), None
    )
    if name is None:
        return Verdict(UNTESTABLE, f"no {setting} run (reproduce --transfer-from)")
    home = _acc_flops(r, "main", "svm", **where)
    away = _acc_flops(r, "generalization", name, **where)
    if 1 - home[1] < NO_STOP:
        return Verdict(UNTESTABLE, f"the in-distribution SVM never stops ({_pair(*home)})")
    said = f"{_pair(*away)} against in-distribution {_pair(*home)}"
    ok = away[0] >= home[0] - POINT and 1 - away[1] >= (1 - home[1]) / 2
    return Verdict(HOLDS if ok else FAILS, said)


def inter_task(r) -> Verdict:
    """Trained on question answering, tested on sentiment (the paper's inter-task setting)."""
    if "sst2" not in r["config"]["tasks"]:
        return Verdict(UNTESTABLE, "no SST-2 in the run")
    return _transfer(r, "inter-task", task="sst2")


def inter_model(r) -> Verdict:
    """Trained on another model's traces, tested here on all tasks."""
    return _transfer(r, "inter-model")


def zero_vs_few(r) -> Verdict:
    """Zero-shot top-1 is near zero on classification with this template; few-shot is not."""
    where = dict(family="main", policy="full", group="classification")
    zero = row_mean(r["rows"], "accuracy", shots=ZERO_SHOT, **where)
    few = row_mean(r["rows"], "accuracy", shots=FEW_SHOT, **where)
    if zero is None or few is None:
        return Verdict(UNTESTABLE, "the run lacks zero-shot or few-shot classification")
    ok = zero < 0.10 and few >= zero + 0.10
    return Verdict(
        HOLDS if ok else FAILS,
        f"classification {100 * zero:.1f}% zero-shot, {100 * few:.1f}% few-shot",
    )


def _reached(curve) -> int:
    """The first layer whose accuracy is within a point of the last layer's."""
    return next(l for l, a in enumerate(curve, 1) if a >= curve[-1] - POINT)


def layer_curve_claim(r) -> Verdict:
    """Accuracy by layer: the answer is reached before the last layer (few-shot SST-2; MMLU
    shown for the paper's task contrast)."""
    L = r["model"]["num_layers"]
    curves = {t: layer_curve(r, t, FEW_SHOT) for t in r["config"]["tasks"] if t in ("sst2", "mmlu")}
    if curves.get("sst2") is None:
        return Verdict(UNTESTABLE, "no few-shot SST-2 per-layer accuracy in results.json")
    said = "; ".join(
        f"{t} reaches its last layer's {100 * c[-1]:.1f}% at layer {_reached(c)} of {L}"
        + (f" (peak {100 * max(c):.1f}% at layer {int(c.argmax()) + 1})" if max(c) > c[-1] else "")
        for t, c in curves.items()
        if c is not None
    )
    return Verdict(HOLDS if _reached(curves["sst2"]) <= EARLY * L else FAILS, said)


def observation_1(r) -> Verdict:
    """Inputs need different depths: the oracle's exit layer averages below the full depth and
    varies from input to input. The SVM's mean and variance are shown next to it."""
    if not _has_few_shot(r):
        return Verdict(UNTESTABLE, "no few-shot run")
    L = r["model"]["num_layers"]
    mean, var = exit_moments(r["rows"], family="main", policy="oracle", shots=FEW_SHOT)
    svm = exit_moments(r["rows"], family="main", policy="svm", shots=FEW_SHOT)
    ok = mean <= EARLY * L and var >= 1
    return Verdict(
        HOLDS if ok else FAILS,
        f"oracle exit layer {mean:.2f} of {L}, variance {var:.2f}; SVM {svm[0]:.2f}, "
        f"variance {svm[1]:.2f}",
    )


CLAIMS = (
    ("SVM is the best of the classifiers (SVM, CRF, logistic, GAP)", svm_best),
    ("10-50% of FLOPs saved at < 1 point, few-shot (SVM, all tasks)", saving),
    ("attention cosine feature is neutral (Table 7)", attn_neutral),
    ("MLP cosine feature is harmful (Table 7)", mlp_harmful),
    ("hidden-state cosine feature is harmful (Table 7)", hidden_harmful),
    ("inter-task: trained on QA, tested on SST-2 (Table 6)", inter_task),
    ("inter-model: trained on another model, all tasks (Table 6)", inter_model),
    ("zero-shot near 0 on classification, few-shot where it matters", zero_vs_few),
    ("layer-wise accuracy: reached before the last layer (Figure 1, SST-2)", layer_curve_claim),
    ("Observation 1: exit layer below full depth, varying per input", observation_1),
)


# ----------------------------------------------------------------------------- the tables
def claim_table(models: list[dict]) -> str:
    """One row per claim, one column per model: verdict and the number that decides it."""
    body = [[title, *(str(check(r)) for r in models)] for title, check in CLAIMS]
    return markdown_table(["claim", *(r["folder"] for r in models)], body)


def table_1(models: list[dict]) -> str:
    """Table 1: the models' statistics, as their traces and runs record them."""
    body = []
    for r in models:
        cfg = r["config"]
        test = sum(x["n"] for x in r["rows"] if x["family"] == "main" and x["policy"] == "full")
        runs = [len(cfg["tasks"]), ", ".join(map(str, cfg["shots"])), test]
        body.append([r["folder"], *model_statistics(r), *runs])
    header = ["folder", "model", "type", "parameters", "layers", "hidden", "vocabulary", "dtype"]
    header += ["tasks", "k"]
    return markdown_table([*header, "test queries"], body)


def shared_shots(models: list[dict]) -> list[int]:
    """The few-shot k that every run has: models compared at other k would differ by k too."""
    sets = [{k for k in r["config"]["shots"] if k > 0} for r in models if _has_few_shot(r)]
    return sorted(set.intersection(*sets)) if sets else []


def scale_table(models: list[dict]) -> str:
    """In the role of the paper's Table 5: the method's few-shot numbers on each model, at the
    k every run has (all few-shot k where the runs share none)."""
    shared = shared_shots(models)
    shots = (lambda k: k in shared) if shared else FEW_SHOT
    body = []
    for r in models:
        if not _has_few_shot(r):
            continue
        svm = _acc_flops(r, "main", "svm", shots=shots)
        crf = _acc_flops(r, "main", "crf", shots=shots)
        true = _mean(r, "true_flops_ratio", "main", "svm", shots=shots)
        moments = [
            exit_moments(r["rows"], family="main", policy=p, shots=shots) for p in ("svm", "oracle")
        ]
        body.append(
            [
                r["folder"],
                r["model"]["num_layers"],
                f"{100 * _acc_flops(r, 'main', 'full', shots=shots)[0]:.1f}",
                f"{100 * svm[0]:.1f} / {100 * svm[1]:.1f} / {100 * true:.1f}",
                f"{100 * crf[0]:.1f} / {100 * crf[1]:.1f}",
                f"{100 * _acc_flops(r, 'main', 'oracle', shots=shots)[1]:.1f}",
                _percent(_acc_flops(r, "main", "oracle", shots=shots, task="sst2")[1]),
                *(f"{m:.2f} / {v:.2f}" for m, v in moments),
            ]
        )
    header = [
        "model",
        "layers",
        "full acc",
        "SVM acc / FLOPs / true FLOPs",
        "CRF acc / FLOPs",
        "oracle FLOPs",
        "oracle FLOPs, SST-2",
        "SVM exit layer: mean / variance",
        "oracle exit layer: mean / variance",
    ]
    return markdown_table(header, body)


def _scale_setting(models) -> str:
    shared = shared_shots(models)
    if not shared:
        return "few-shot (each run's k)"
    return f"few-shot at the k every run has (k = {', '.join(map(str, shared))})"


def claims_report(folders) -> str:
    """The markdown block: the claim table, Table 1 and the scale table, with the rules."""
    models = [load_results(f) for f in folders]
    names = ", ".join(f"`{Path(f).as_posix()}`" for f in folders)
    return "\n".join(
        [
            f"Generated by `adainfer claims {' '.join(Path(f).as_posix() for f in folders)}` "
            f"from the results.json of {names}; do not edit by hand.",
            "",
            "### The paper's claims, model by model",
            "",
            RULES,
            "",
            claim_table(models),
            "",
            "### Table 1: model statistics",
            "",
            table_1(models),
            "",
            f"### Scale (the role of the paper's Table 5): {_scale_setting(models)}, all tasks",
            "",
            scale_table(models),
            "",
        ]
    )


BEGIN = "<!-- adainfer claims: begin -->"
END = "<!-- adainfer claims: end -->"


def splice(text: str, block: str) -> str:
    """`text` with what lies between the BEGIN and END markers replaced by `block`."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"the file needs the markers '{BEGIN}' and, after it, '{END}'")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}{END}{tail}"
