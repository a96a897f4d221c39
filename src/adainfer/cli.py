"""Command-line interface: a thin layer over the library (argparse, one function per command)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from .features import ALL_FEATURES
from .files import FolderInUse, OutputLock, write_text_atomic
from .policies import POLICIES
from .schema import int_at_least


def _features(text: str) -> tuple[str, ...]:
    from .features import check_names

    try:
        return check_names(f.strip() for f in text.split(",") if f.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _param(text: str):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--param takes KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            number = cast(value)
        except ValueError:
            continue
        if not math.isfinite(number):  # threshold=nan: a policy that never stops
            raise argparse.ArgumentTypeError(f"--param {key}: {value!r} is not a finite number")
        return key, number
    return key, value


def parse_check_cost(text: str) -> float | dict[int, float]:
    """'0.8' (one cost), or '1:1.24,8:0.2,32:0.1' (batch size: cost), in decoder layers; a
    ValueError that says what is expected for anything else."""
    try:
        if ":" not in text:
            costs = {1: float(text)}
        else:
            costs = {
                int(b): float(c)
                for b, c in (item.split(":") for item in text.split(",") if item.strip())
            }
    except ValueError:
        raise ValueError(
            "--check-cost takes a number of layers or BATCH:COST pairs like 1:1.2,8:0.2; "
            f"got {text!r}"
        ) from None
    # a negative or NaN cost makes every check look free: it planned checks at every layer
    if not costs or min(costs) < 1 or not all(0 <= c < math.inf for c in costs.values()):
        raise ValueError(
            f"--check-cost: batch sizes must be >= 1 and costs finite and >= 0; got {text!r}"
        )
    return costs[1] if ":" not in text else costs


def _check_cost(text: str) -> float | dict[int, float]:
    """parse_check_cost for argparse, which shows the message of an ArgumentTypeError only."""
    try:
        return parse_check_cost(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_args(p, work="prefill", model="smollm2-135m", default_help="", dtype_help=""):
    p.add_argument(
        "--model",
        default=model,
        help="bundled alias (smollm2-135m, gemma3-270m, qwen2.5-0.5b, qwen2.5-1.5b), local HF "
        f"folder, .gguf file or hub id (default: {default_help or '%(default)s'})",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="float32 (exact), bfloat16, or auto: whichever runs this command's work "
        f"({work}) faster on this machine, measured once per model and cached; bf16 can be "
        f"several times slower on CPUs without native bf16 (default: {dtype_help or 'auto'})",
    )
    p.set_defaults(work=work)
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument(
        "--device-map",
        default=None,
        help="passed to from_pretrained (e.g. auto: accelerate spreads a model too big for one "
        "device); overrides --device",
    )


def _load(args):
    """Load the model the way the command line asked for."""
    from .models import load

    return load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        work=args.work,
    )


def _task_args(p, n_train: bool):
    p.add_argument(
        "--task",
        action="append",
        required=True,
        help="built-in rule task name or a .json/.jsonl file of {input, output}; "
        "repeat for several",
    )
    _shots_arg(p)
    p.add_argument(
        "--n-test",
        type=int_at_least(1),
        default=40,
        help="queries held out per task for evaluation; collect and eval must use the same value "
        "and --seed so they never overlap (default: %(default)s)",
    )
    if n_train:
        _n_train_arg(p)
    p.add_argument(
        "--seed", type=int, default=0, help="split and demonstration seed (default: %(default)s)"
    )
    _batch_size_arg(p)
    _data_dir_arg(p)


def _shots_arg(p):
    p.add_argument(
        "--shots",
        type=int_at_least(0),
        default=5,
        help="demonstrations per prompt (default: %(default)s)",
    )


def _n_train_arg(p):
    p.add_argument(
        "--n-train",
        type=int_at_least(0),
        default=40,
        help="training queries per task (default: %(default)s)",
    )


def _batch_size_arg(p):
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=8,
        help="prompts per forward pass (default: %(default)s)",
    )


def _max_batch_tokens_arg(p):
    from .collect import MAX_BATCH_TOKENS

    p.add_argument(
        "--max-batch-tokens",
        type=int_at_least(0),
        default=MAX_BATCH_TOKENS,
        help="padded tokens per batch at most: longer prompts run in smaller batches, one alone "
        "past half of it (on CPU a padded batch's attention costs twice a lone prompt's); "
        "0: no limit, e.g. on a GPU (default: %(default)s)",
    )


def _data_dir_arg(p):
    p.add_argument(
        "--data-dir",
        default=None,
        help="local copy of the benchmark data (layout of shared/data); default "
        "$ADAINFER_DATA_DIR, else the Hugging Face hub via `datasets`",
    )


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share of queries is between 0 and 1, got {text}")
    return value


def _confidence(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(
            f"a confidence is at least 0 and below 1 (0.95 for 95%), got {text}"
        )
    return value


def _plan_test_args(p, prefix: str):
    from .checks import CONFIDENCE, MIN_AGREEMENT
    from .risk import DELTA, EPSILON, RISK, RISKS

    p.add_argument(
        "--risk",
        choices=(*RISKS, "none"),
        default=RISK,
        help=f"{prefix}what a check plan promises to bound: consistency (the share of answers "
        "that differ from the full model's; needs no gold labels), accuracy (the share the full "
        "model gets right and the plan wrong), or none (the agreement / loss-bound test, no "
        f"guarantee) (default {RISK})",
    )
    p.add_argument(
        "--epsilon",
        type=_open_share,
        default=EPSILON,
        help=f"{prefix}the risk a plan may reach (default {EPSILON})",
    )
    p.add_argument(
        "--delta",
        type=_open_share,
        default=DELTA,
        help=f"{prefix}the chance, over the calibration queries, that the plan's risk is above "
        f"--epsilon nonetheless (default {DELTA}); the promise holds for queries like the "
        "calibration ones, not for another task",
    )
    p.add_argument(
        "--min-agreement",
        type=_share,
        default=None,
        help=f"{prefix}with --risk none: the share of calibration queries whose answer a check "
        f"plan must keep equal to the full model's (default {MIN_AGREEMENT})",
    )
    p.add_argument(
        "--confidence",
        type=_confidence,
        default=None,
        help=f"{prefix}with --risk none: a plan that changes more answers still passes if its "
        f"accuracy loss is within 1 point at this one-sided confidence (default {CONFIDENCE}; "
        "0: agreement test only)",
    )


def plan_test(args) -> dict:
    """The planner's test as PlannedPolicy takes it, from `_plan_test_args`' options."""
    risk = None if args.risk == "none" else args.risk
    test = dict(risk=risk, epsilon=args.epsilon, delta=args.delta)
    if risk is None:
        test.update(min_agreement=args.min_agreement, confidence=args.confidence)
    return test


def _open_share(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a share above 0 and below 1, got {text}")
    return value


def _int_list(low: int):
    """Comma-separated whole numbers of at least `low`, repeats dropped, in the order given."""
    item = int_at_least(low)

    def parse(text: str) -> tuple[int, ...]:
        # item() raises for a bad one, naming it
        values = tuple(dict.fromkeys(item(x) for x in text.split(",") if x.strip()))
        if not values:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated whole numbers of at least {low}, got {text!r}"
            )
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adainfer",
        description="Per-input early exit for Hugging Face decoder-only LLMs (AdaInfer), "
        "without touching the weights.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser in (  # in the order `adainfer --help` lists them
        _collect_parser,
        _fit_parser,
        _eval_parser,
        _demo_parser,
        _reproduce_parser,
        _claims_parser,
        _bench_parser,
        _generate_parser,
        _calibrate_exits_parser,
        _plan_drafts_parser,
        _lm_eval_parser,
    ):
        add_parser(sub)
    return parser


def _collect_parser(sub):
    p = sub.add_parser(
        "collect",
        help="run training queries at full depth and record features + labels at every layer",
        description="Write, for every training query and layer, the exit features and the label "
        "(1 if that layer's top-1 token is the gold answer's first token) as parquet parts. "
        "Re-running with the same --out resumes where a killed run stopped.",
    )
    _model_args(p)
    _task_args(p, n_train=True)
    p.add_argument(
        "--features",
        type=_features,
        default=ALL_FEATURES,
        help=f"comma-separated features to record (default: all: {','.join(ALL_FEATURES)})",
    )
    p.add_argument(
        "--held-out",
        action="store_true",
        help="record the --n-test held-out queries instead of the training "
        "ones, to judge policies offline on many queries (bench/plan_quality.py --test-traces)",
    )
    _max_batch_tokens_arg(p)
    p.add_argument("--out", required=True, help="output folder")


def _fit_parser(sub):
    p = sub.add_parser(
        "fit",
        help="train an exit policy on collected data and save it (no pickle)",
        description="Train a policy (svm, crf, logistic, layer-logistic; gap/never/oracle need no "
        "training) on a collect folder and save it as a .safetensors policy file that records the "
        "model it is for.",
    )
    p.add_argument("--data", required=True, help="folder written by `adainfer collect`")
    p.add_argument(
        "--policy",
        default="svm",
        choices=sorted(POLICIES),
        help="policy type (default: %(default)s)",
    )
    p.add_argument(
        "--features",
        type=_features,
        default=None,
        help="comma-separated features (default: the policy's own: gap,top_prob, the paper's; "
        "gap,top_prob,entropy,layer_frac for layer-logistic, which needs layer_frac)",
    )
    p.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        help="policy parameter KEY=VALUE, e.g. threshold=0.9 or C=10",
    )
    p.add_argument("--tasks", help="comma-separated subset of collected tasks to train on")
    p.add_argument(
        "--target",
        choices=("gold", "final"),
        default="gold",
        help="what the classifier learns per layer: gold (the paper: the top-1 is the gold token) "
        "or final (the top-1 is already the full model's answer; keeps its answers) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--check-cost",
        type=_check_cost,
        default=None,
        help="cost of one exit check in decoder layers (see `adainfer bench`, column "
        "check_cost_layers), or per batch size as 1:1.2,8:0.2,32:0.1: learns where checking "
        "pays and stores that schedule (one per batch size); "
        "omit to check every layer as in the paper",
    )
    _plan_test_args(p, "with --check-cost: ")
    p.add_argument("--out", required=True, help="policy file to write (.safetensors)")


def _eval_parser(sub):
    p = sub.add_parser(
        "eval",
        help="evaluate policies against the full model on held-out queries",
        description="Run the plain model, the full-depth engine and each policy on the same "
        "held-out queries and write a JSON summary: accuracy, mean exit layer, paper and true "
        "FLOPs ratios, wall time.",
    )
    _model_args(p)
    _task_args(p, n_train=False)
    p.add_argument(
        "--policy",
        action="append",
        required=True,
        help="policy file or name (gap, never, oracle); repeat for several",
    )
    p.add_argument(
        "--min-layer",
        type=int_at_least(1),
        default=1,
        help="first layer to check (default: %(default)s)",
    )
    p.add_argument(
        "--stride",
        type=int_at_least(1),
        default=1,
        help="check every STRIDE layers (default: %(default)s)",
    )
    p.add_argument(
        "--shortlist",
        type=int_at_least(1),
        default=None,
        help="after a row's first exact check, check it on its top-K tokens only "
        "(exact confirmation before any stop)",
    )
    p.add_argument(
        "--allow-other-model",
        action="store_true",
        help="use policies trained for another model (inter-model generalisation)",
    )
    p.add_argument("--out", required=True, help="JSON summary to write")


def _demo_parser(sub):
    p = sub.add_parser(
        "demo",
        help="calibrate an exit plan and time it against the plain model, offline (~10 min)",
        description="Qwen2.5-0.5B on SST-2 5-shot (the bundled model; SST-2 from --data-dir): "
        "collect calibration traces, plan exit checks by Learn-then-Test, time the plan next to "
        "the plain model on held-out queries; prints a table and one verdict line and writes a "
        "plot. --smoke runs SmolLM2-135M on built-in rule tasks with the paper's policies "
        "instead: no data needed, a few minutes, nothing to save on that model.",
    )
    _model_args(
        p,
        model=None,
        default_help="qwen2.5-0.5b, with --smoke smollm2-135m",
        dtype_help="bfloat16 on CPUs with native bf16, else auto",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the small pipeline check: SmolLM2-135M, four rule tasks, 40 + 40 queries each",
    )
    p.add_argument(
        "--out-dir",
        default="runs/demo",
        help="where to write data, policies, summary.json, table.md and the plot "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--task", action="append", help="task (repeat); default: sst2, or the rule tasks"
    )
    p.add_argument("--shots", type=int_at_least(0), default=None, help="default: 5")
    p.add_argument(
        "--n-train",
        type=int_at_least(1),
        default=None,
        help="calibration queries per task (default: 320, smoke 40)",
    )
    p.add_argument(
        "--n-test",
        type=int_at_least(1),
        default=None,
        help="held-out queries per task (default: 96, smoke 40)",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(1),
        default=1,
        help="torch threads (default: %(default)s: the time ratios are steadier, and on a "
        "machine shared with another job two threads wait on each other)",
    )
    _batch_size_arg(p)
    _data_dir_arg(p)


def _reproduce_parser(sub):
    from .reproduce import DEFAULT_TASKS

    p = sub.add_parser(
        "reproduce",
        help="the paper's experiments on any model: tables, JSON and figures",
        description="Run held-out queries of each task at every k once at full depth (traces), "
        "train the classifiers on a random subset of the tasks' training pools, replay every "
        "policy on the traces and write results.json, tables.md (Tables 2/3, 4/8/9, 6, 7, oracle "
        "bounds) and figures. Resumes after a kill; under `torchrun --nproc-per-node N` ranks "
        "share the queries.",
    )
    _model_args(p)
    p.add_argument(
        "--task", action="append", help=f"task (repeat); default: {' '.join(DEFAULT_TASKS)}"
    )
    p.add_argument(
        "--n-queries",
        type=int_at_least(1),
        default=200,
        help="held-out queries per task and k (default: %(default)s)",
    )
    p.add_argument(
        "--shots",
        type=_int_list(0),
        default=(0, 5, 10, 15, 20),
        help="comma-separated k values (default: 0,5,10,15,20)",
    )
    _n_train_arg(p)
    p.add_argument(
        "--train-shots",
        type=int_at_least(0),
        default=5,
        help="k for training queries (default: %(default)s)",
    )
    p.add_argument(
        "--n-train-tasks",
        type=int_at_least(1),
        default=None,
        help="size of the random task subset the classifiers train on (default: two thirds)",
    )
    p.add_argument(
        "--transfer-from",
        default=None,
        help="another model's reproduce folder: adds inter-model generalization "
        "(train there, test here)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for splits, demonstrations and the training subset (default: %(default)s)",
    )
    _batch_size_arg(p)
    _max_batch_tokens_arg(p)
    _data_dir_arg(p)
    p.add_argument(
        "--out-dir", required=True, help="output folder (traces/, results.json, tables.md, *.png)"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild tables and figures from the traces already in --out-dir (no model run)",
    )


def _claims_parser(sub):
    p = sub.add_parser(
        "claims",
        help="the paper's claims, model by model, from reproduce folders' results.json",
        description="Set every claim of the paper against each reproduce folder (holds / does "
        "not hold / cannot be tested here, with the number that decides it), with Table 1 "
        "(model statistics) and a scale table across the models. Reads results.json only.",
    )
    p.add_argument("folders", nargs="+", help="reproduce output folders, in the order shown")
    p.add_argument("--out", default=None, help="write the markdown here (default: print it)")
    p.add_argument(
        "--readme",
        default=None,
        help="also replace the block between the adainfer-claims markers in this markdown file",
    )


def _bench_parser(sub):
    from .bench import MIN_PAIRED

    p = sub.add_parser(
        "bench",
        help="wall-clock time of adainfer next to the plain model (a benchmark, not a test)",
        description="Interleave plain / never / hooks / policy / oracle variants on the same "
        "queries per model, dtype, task and batch size; print and write bench.md and bench.json "
        "with accuracy, exit layers, checks, FLOPs ratios, median wall time, time ratios, prompts "
        "per second and peak memory.",
    )
    p.add_argument("--model", action="append", help="model (repeat); default: smollm2-135m")
    p.add_argument("--task", action="append", help="task (repeat); default: sst2 and capitalize")
    _shots_arg(p)
    p.add_argument(
        "--batch-sizes",
        type=_int_list(1),
        default=(1, 8, 32),
        help="comma-separated (default: 1,8,32)",
    )
    p.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma-separated (default: %(default)s)"
    )
    p.add_argument(
        "--n-queries",
        type=int_at_least(1),
        default=32,
        help="timed queries per task (default: %(default)s)",
    )
    p.add_argument(
        "--n-train",
        type=int_at_least(0),
        default=200,
        help="calibration queries per task for the default policy and its check plan; "
        "fewer where the task's held-out split is smaller (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int_at_least(1),
        default=3,
        help="timed repeats per variant; medians are reported (default: %(default)s)",
    )
    p.add_argument(
        "--min-paired",
        type=int_at_least(1),
        default=None,
        help="paired (batch, repeat) time ratios per cell at least; finished cells holding fewer "
        f"are timed again, their earlier timings kept in the row (default: {MIN_PAIRED})",
    )
    p.add_argument(
        "--policy",
        default=None,
        help="a saved policy file instead of the default (a logistic regression per layer on gap, "
        "top_prob and entropy, fitted on the calibration queries)",
    )
    _plan_test_args(p, "")
    p.add_argument(
        "--shortlist",
        type=int_at_least(0),
        default=256,
        help="also time shortlist checks on this many candidate tokens per row, "
        "with their own plan (0: skip) (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    _data_dir_arg(p)
    p.add_argument(
        "--out-dir", default="results/bench", help="output folder (default: %(default)s)"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild bench.md from the bench.json in --out-dir (no model run)",
    )


def _generate_parser(sub):
    p = sub.add_parser(
        "generate",
        help="generate text: lossless by default (plain decoding or planned drafts), lossy "
        "with --exits; one prompt streams",
        description="Continue each prompt. Lossless, the default: without drafting settings "
        "plain decoding; with --draft-plan (from `adainfer plan-drafts`) or --draft-layer, "
        "every round drafts up to --draft-tokens tokens from an early layer (with --draft-exits, "
        "each from the layer a token-exit policy picks for it) and the full model verifies them "
        "from the next layer on, so greedy output is the plain model's token for "
        "token and sampled output follows its distribution. Lossy, opt-in: --exits (a policy "
        "from `adainfer calibrate-exits`) lets every token leave at its own layer; the share of "
        "tokens that differ from plain greedy decoding is held to the risk the policy was "
        "calibrated for, on prompts like its calibration prompts. The two modes do not combine. "
        "A single prompt streams, cut before a stop string as the result is.",
    )
    _model_args(p, "decode")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    p.add_argument("--prompts-file", default=None, help=PROMPTS_FILE_HELP)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    p.add_argument(
        "--exits",
        default=None,
        help="lossy mode: a token-exit policy file from `adainfer calibrate-exits`; every "
        "token leaves at its own layer",
    )
    p.add_argument(
        "--draft-exits",
        default=None,
        help="lossless drafts by a token-exit policy file: each draft leaves where the policy "
        "says, up to --draft-tokens a round, and the full model verifies them",
    )
    p.add_argument(
        "--max-new-tokens", type=int_at_least(1), default=64, help="(default: %(default)s)"
    )
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    p.add_argument("--top-k", type=int_at_least(0), default=0, help="0: off (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    p.add_argument(
        "--draft-layer", type=int_at_least(1), default=None, help="draft from this layer"
    )
    p.add_argument(
        "--draft-tokens",
        type=int_at_least(1),
        default=4,
        help="tokens drafted per round (default: %(default)s)",
    )
    p.add_argument(
        "--draft-plan",
        default=None,
        help="a plan from `adainfer plan-drafts` (how deep, how far and over which vocabulary "
        "to draft, or with --exits how many exit drafts a round; plain decoding where drafting "
        "does not pay); replaces --draft-layer",
    )
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")


PROMPTS_FILE_HELP = (
    "a text file with one prompt per line, or a .json / .jsonl list of prompts (strings or "
    '{"prompt": ...} objects) for prompts that span lines'
)


def _calibrate_exits_parser(sub):
    from .risk import DELTA

    p = sub.add_parser(
        "calibrate-exits",
        help="calibrate lossy generation's per-token exits on unlabeled prompts",
        description="Greedy-decode the prompts with the full model, read every generated token "
        "at every layer, and fit where tokens may leave so that the share of tokens that "
        "differ from the full model's (teacher-forced) is at most --epsilon, except with "
        "probability --delta (Learn-then-Test on half the prompts; tokens are treated as "
        "exchangeable). Use the file with `adainfer generate --exits`.",
    )
    _model_args(p, "decode")
    p.add_argument("--prompts-file", default=None, help=PROMPTS_FILE_HELP)
    p.add_argument(
        "--python-prompts",
        type=int_at_least(2),
        default=None,
        help="calibrate on this many code prompts built from the Python standard library's "
        "documented functions (label-free, no download; for code models)",
    )
    p.add_argument(
        "--epsilon",
        "--risk",
        type=float,
        default=0.01,
        help="share of tokens allowed to differ from the full model's (default: %(default)s)",
    )
    p.add_argument(
        "--delta",
        type=float,
        default=DELTA,
        help="chance that the calibrated share is above --epsilon after all (default: %(default)s)",
    )
    p.add_argument(
        "--vocab-size",
        type=int_at_least(2),
        default=4096,
        help="shortlist read by the exit check (default: %(default)s)",
    )
    p.add_argument(
        "--hidden-state",
        action="store_true",
        help="the exit probes also read the token's hidden state (CALM's learned classifier; "
        "on Qwen2.5-Coder-0.5B cheaper plans at 0.5%% risk, none at 1%%; a larger file)",
    )
    p.add_argument(
        "--max-new-tokens", type=int_at_least(1), default=64, help="(default: %(default)s)"
    )
    _batch_size_arg(p)
    p.add_argument(
        "--plan-batch-size",
        type=int_at_least(1),
        default=1,
        help="the batch size you will generate at: the costs are timed and the plan made for "
        "it (a row that leaves early saves less when other rows still run the layer) "
        "(default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="the policy file to write (JSON)")


def cmd_calibrate_exits(args):
    from tqdm.auto import tqdm

    from .lossy import TokenExitPolicy
    from .risk import check_level, min_queries
    from .taskdata import python_prompts, read_prompts

    if (args.prompts_file is None) == (args.python_prompts is None):
        raise ValueError("give either --prompts-file or --python-prompts N")
    check_level(args.epsilon, args.delta)
    prompts = (
        read_prompts(args.prompts_file)
        if args.prompts_file
        else python_prompts(args.python_prompts)
    )
    model, tokenizer = _load(args)
    policy = TokenExitPolicy(
        args.epsilon,
        delta=args.delta,
        vocab_size=args.vocab_size,
        cost_batch_size=args.plan_batch_size,
        hidden_state=args.hidden_state,
    )
    policy.fit(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=lambda batches: tqdm(batches, desc="calibration batches"),
    )
    policy.save(args.out)
    c = policy.calibration_
    if not policy.layers_:
        print(
            f"no exit plan passed the test on {c['tokens']} held-out tokens "
            f"({c['accepted']} of {c['candidates']} candidates accepted, or none pays): the "
            f"file decodes plainly. Certifying epsilon {args.epsilon} at delta {args.delta} "
            f"needs at least {min_queries(args.epsilon, args.delta)} held-out tokens"
        )
    print(
        f"wrote {args.out}: checks at layers {policy.layers_} of {policy.num_layers_}; on "
        f"{c['tokens']} held-out tokens {c['changed_share']:.2%} changed, mean exit layer "
        f"{c['mean_exit_layer']:.2f} (oracle {c['oracle_mean_settled']:.2f}), "
        f"{c['share_of_oracle_saving']:.0%} of the oracle's layers, "
        f"{c['head_skipped_share']:.0%} read on the shortlist (the full LM head skipped); a "
        f"step planned at {c['step_cost']:.2f} of a plain one at batch size "
        f"{args.plan_batch_size} (the oracle's: {c['oracle_step_cost']:.2f})"
    )


def _plan_drafts_parser(sub):
    p = sub.add_parser(
        "plan-drafts",
        help="measure whether and how to draft for a model, dtype and batch size on this machine",
        description="Generate the calibration prompts plainly, measure how often drafts from "
        "each candidate depth and draft vocabulary agree with the full model, time the pieces "
        "of a drafting round against a plain decode step on this machine, and write the "
        "setting with the most tokens per second, or plain decoding where nothing beats it by "
        "--margin. With --exits, plan drafts that leave where a token-exit policy says "
        "instead: how many a round may make, or plain decoding. Use the plan with "
        "`adainfer generate --draft-plan`.",
    )
    _model_args(p, "decode")
    p.add_argument("--prompts-file", required=True, help=PROMPTS_FILE_HELP)
    p.add_argument("--batch-size", type=int_at_least(1), default=1, help="(default: 1)")
    p.add_argument(
        "--max-new-tokens", type=int_at_least(1), default=128, help="(default: %(default)s)"
    )
    p.add_argument(
        "--margin", type=float, default=1.03, help="least estimated speed-up (default: 1.03)"
    )
    p.add_argument(
        "--repeats", type=int_at_least(1), default=15, help="timing samples (default: 15)"
    )
    p.add_argument(
        "--confirm-batches",
        type=int_at_least(0),
        default=3,
        help="calibration batches on which a drafting plan is timed end to end against plain "
        "decoding; it is kept only if no slower (default: 3; 0: trust the estimate)",
    )
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads")
    p.add_argument(
        "--exits",
        default=None,
        help="a token-exit policy file (`adainfer calibrate-exits`) whose exits draft",
    )
    p.add_argument("--out", required=True, help="the plan file to write (JSON)")


LM_EVAL_HELP = """\
Everything after `lm-eval` goes to lm-evaluation-harness's own command line (`lm-eval run`;
its options follow below), with the adainfer model registered and these defaults:
  --model adainfer       unless --model is given
  --include_path DIR     the task configs shipped with adainfer, reading --data-dir, unless
                         --include_path is given: adainfer_sst2, adainfer_sst2_top1 (the
                         paper's whole-vocabulary top-1), adainfer_mmlu (4 subjects),
                         adainfer_commonsense_qa, adainfer_squad (generation); tag `adainfer`
adainfer's own option:
  --data-dir DIR         local benchmark data (layout of shared/data); default
                         $ADAINFER_DATA_DIR, else ../shared/data from the current directory
Model args (--model_args key=value,...): pretrained (alias, folder, .gguf or hub id), policy
(a policy file from `adainfer fit`; none: the plain model), mode (lossless|lossy, for
generation), exits (for lossy), draft_plan, dtype, device, compare_plain, allow_other_model.
After lm-eval's tables it prints adainfer's: mean exit layer, FLOPs ratios, time and answers
against the plain Hugging Face model on the same requests (also saved in the results JSON
under config.adainfer).

Example (offline, the bundled SmolLM2):
  adainfer lm-eval --model_args pretrained=smollm2-135m,policy=svm.safetensors \\
      --tasks adainfer_sst2_top1 --num_fewshot 5 --limit 50 --batch_size 8
"""


def _lm_eval_parser(sub):
    # add_help=False: --help and every other unknown option go on to lm-eval's parser
    p = sub.add_parser(
        "lm-eval",
        add_help=False,
        help="lm-evaluation-harness with the adainfer model and offline task configs "
        "(`adainfer lm-eval --help`)",
    )
    p.add_argument("--data-dir", default=None)


def cmd_lm_eval(args):
    try:
        from .lmeval import REPORTS, report_table, task_dir
    except ImportError as e:
        raise ValueError(
            f"lm-eval is not installed ({e}): pip install 'adainfer[lmeval]'"
        ) from None
    import lm_eval.__main__ as harness

    rest = list(args.rest)
    asked_help = "-h" in rest or "--help" in rest
    if asked_help:
        print(LM_EVAL_HELP)
    if not _given(rest, "--model", "-M"):
        rest = ["--model", "adainfer", *rest]
    if not _given(rest, "--include_path") and not asked_help:
        try:
            rest += ["--include_path", str(task_dir(args.data_dir))]
        except FileNotFoundError as e:  # lm-eval's own tasks need no data dir
            print(f"adainfer lm-eval: not adding the shipped task configs: {e}", file=sys.stderr)
    done = len(REPORTS)
    argv, sys.argv = sys.argv, ["lm-eval", *rest]
    try:
        harness.cli_evaluate()  # reads sys.argv, as the `lm-eval` command does
    finally:
        sys.argv = argv
    for report in REPORTS[done:]:
        print(f"\n{report_table(report)}")


def _given(args: list[str], *names: str) -> bool:
    return any(a in names or a.startswith(tuple(f"{n}=" for n in names)) for a in args)


def cmd_plan_drafts(args):
    import torch
    from tqdm.auto import tqdm

    from .drafting import DraftPlanner, ExitDraftPlanner
    from .lossy import TokenExitPolicy
    from .taskdata import read_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts_file)
    policy = TokenExitPolicy.load(args.exits) if args.exits else None
    model, tokenizer = _load(args)
    settings = dict(
        margin=args.margin,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        confirm_batches=args.confirm_batches,
    )
    planner = ExitDraftPlanner(policy, **settings) if policy else DraftPlanner(**settings)
    planner.fit(
        model,
        tokenizer,
        prompts,
        batch_size=args.batch_size,
        progress=lambda it: tqdm(it, desc="plan-drafts", leave=False),
    )
    planner.save(args.out)
    print(f"{planner.plan_.describe()}; wrote {args.out}")


def cmd_collect(args):
    from .collect import collect, collected_ids
    from .prefill import AdaptiveEngine
    from .tasks import task_queries

    model, tok = _load(args)
    train, test = task_queries(
        tok,
        args.task,
        shots=args.shots,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        data_dir=args.data_dir,
    )
    queries = test if args.held_out else train
    before = collected_ids(args.out)  # a resumed run says what it added, not what it holds
    out = collect(
        AdaptiveEngine(model, tok),
        queries,
        args.out,
        batch_size=args.batch_size,
        features=args.features,
        max_batch_tokens=args.max_batch_tokens or None,
    )
    kind = "held-out" if args.held_out else "training"
    ran = sum(q.id not in before for q in queries)
    if not ran:
        print(f"all {len(queries)} {kind} queries were already collected in {out}; nothing to run")
        return
    layers = model.config.num_hidden_layers
    kept = f" ({len(queries) - ran} were already there)" if ran < len(queries) else ""
    print(f"collected {ran} {kind} queries x {layers} layers into {out}{kept}")


def cmd_fit(args):
    from .checks import PlannedPolicy, promise
    from .persist import save_policy
    from .pipeline import fit_policy, resolve_policy

    policy = resolve_policy(args.policy, args.features)
    if isinstance(policy, PlannedPolicy):  # a saved file: its classifier is fitted and planned anew
        policy = policy.policy_
    policy.set_params(**dict(args.param))
    tasks = args.tasks.split(",") if args.tasks else None
    tune = not any(k == "threshold" for k, _ in args.param)  # a threshold given by hand is kept
    policy = fit_policy(
        args.data,
        policy,
        tasks,
        check_cost=args.check_cost,
        target=args.target,
        tune_threshold=tune,
        **plan_test(args),
    )
    where = "".join(
        f", batch {b}+: checks at layers {list(p.check_layers) or 'none (plain model)'}"
        for b, p in policy.plans_.items()
    )
    if args.check_cost is not None and policy.threshold_ is not None:
        where += f", stop threshold {policy.threshold_}"
    path = save_policy(policy, args.out)
    print(f"saved {args.policy} policy ({', '.join(policy.features)}{where}) to {path}")
    print(promise(policy.plans_))


def cmd_eval(args):
    with OutputLock(args.out, folder=False):  # two evals into one file: one would be lost
        _eval(args)


def _eval(args):
    from .evaluate import evaluate
    from .files import write_json
    from .pipeline import resolve_policy
    from .prefill import AdaptiveEngine
    from .report import eval_table
    from .tasks import task_queries

    policies = {p: resolve_policy(p, ready=True) for p in args.policy}
    model, tok = _load(args)
    engine = AdaptiveEngine(
        model, tok, min_layer=args.min_layer, stride=args.stride, shortlist=args.shortlist
    )
    _, test = task_queries(
        tok,
        args.task,
        shots=args.shots,
        n_train=0,
        n_test=args.n_test,
        seed=args.seed,
        data_dir=args.data_dir,
    )
    summary = evaluate(
        engine, test, policies, batch_size=args.batch_size, allow_other_model=args.allow_other_model
    )
    summary.update(
        model=getattr(model, "adainfer_id", args.model),
        tasks=args.task,
        shots=args.shots,
        seed=args.seed,
    )
    write_json(args.out, summary)
    print(eval_table(summary))
    print(f"\nwrote {args.out}")


def cmd_demo(args):
    import torch

    from .demo import run_demo

    torch.set_num_threads(args.threads)
    s = run_demo(
        args.model,
        args.out_dir,
        smoke=args.smoke,
        tasks=tuple(args.task) if args.task else None,
        shots=args.shots,
        n_train=args.n_train,
        n_test=args.n_test,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        data_dir=args.data_dir,
    )
    print(
        f"\n{s['model']} ({s['dtype']}, {args.threads} thread(s)), {s['shots']}-shot, tasks "
        f"{', '.join(s['tasks'])}: {s['calibration_queries']} calibration queries, "
        f"{s['num_queries']} held-out queries; full = every layer through the engine's hooks"
        + ("; oracle = earliest layer whose top-1 is the gold token" if args.smoke else "")
        + "\n"
    )
    print(s["table"])
    planned = s["planned_check_layers"]
    where = f"layers {planned}" if planned else "no layer (no check pays: it runs the plain model)"
    print(
        f"\none exit check costs {s['check_cost_layers']:.2f} decoder layers here; "
        f"the planned policy checks at {where}"
    )
    print(s["plan_promise"])
    print(f"\nwrote {args.out_dir}/summary.json, {args.out_dir}/table.md and {s['plot']}")
    print(f"\nverdict: {s['verdict']}")


def cmd_reproduce(args):
    from .reproduce import DEFAULT_TASKS, run_reproduce

    results = run_reproduce(
        args.model,
        args.out_dir,
        tasks=args.task or DEFAULT_TASKS,
        n_queries=args.n_queries,
        shots=args.shots,
        n_train=args.n_train,
        train_shots=args.train_shots,
        n_train_tasks=args.n_train_tasks,
        transfer_from=args.transfer_from,
        seed=args.seed,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens or None,
        dtype=args.dtype,
        data_dir=args.data_dir,
        device=args.device,
        device_map=args.device_map,
        report_only=args.report_only,
    )
    if results is not None:  # rank 0 (or a single process) writes the report
        print(f"wrote {args.out_dir}/results.json, tables.md and figures")


def cmd_claims(args):
    from .claims import claims_report, splice

    block = claims_report(args.folders)
    if args.out:
        write_text_atomic(args.out, block)
    else:
        print(block)
    if args.readme:
        write_text_atomic(args.readme, splice(Path(args.readme).read_text(), block))


def cmd_bench(args):
    from .bench import run_bench, write_report

    if args.report_only:
        with OutputLock(args.out_dir):  # run_bench takes it itself
            write_report(args.out_dir)
    else:
        run_bench(
            tuple(args.model or ["smollm2-135m"]),
            args.out_dir,
            tasks=tuple(args.task or ["sst2", "capitalize"]),
            shots=args.shots,
            batch_sizes=args.batch_sizes,
            dtypes=tuple(args.dtypes.split(",")),
            n_queries=args.n_queries,
            n_train=args.n_train,
            repeats=args.repeats,
            policy_path=args.policy,
            plan_test=plan_test(args),
            shortlist=args.shortlist or None,
            min_paired=args.min_paired,
            device=args.device,
            data_dir=args.data_dir,
        )
    print((Path(args.out_dir) / "bench.md").read_text())  # the table and the targets
    print(f"wrote {args.out_dir}/bench.md and bench.json")


def cmd_generate(args):
    import json

    import numpy as np

    from .drafting import load_plan
    from .generation import TextStream, generate
    from .lossy import TokenExitPolicy
    from .taskdata import read_prompts

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise ValueError("give a --prompt (repeat it for a batch) or a --prompts-file")
    exits = TokenExitPolicy.load(args.exits) if args.exits else None
    draft_exits = TokenExitPolicy.load(args.draft_exits) if args.draft_exits else None
    if args.draft_plan and args.draft_layer is not None:
        raise ValueError("give --draft-plan or --draft-layer, not both")
    plan = load_plan(args.draft_plan) if args.draft_plan else None
    model, tokenizer = _load(args)
    one = len(prompts) == 1 and not args.json
    stream = TextStream(tokenizer, args.stop or ()) if one else None
    result = generate(
        model,
        tokenizer,
        prompts,
        draft_layer=args.draft_layer,
        draft_tokens=args.draft_tokens,
        exits=exits,
        draft_exits=draft_exits,
        plan=plan,
        chat=args.chat,
        stop_strings=args.stop,
        seed=args.seed,
        on_tokens=stream,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
    )
    if args.json:
        fields = ("texts", "tokens", "draft_layer", "rounds", "wall_time_s")
        fields += ("exit_layers", "head_skips", "draft_layers")
        data = {f: getattr(result, f) for f in fields}
        data.update(drafted=result.drafted.tolist(), accepted=result.accepted.tolist())
        print(json.dumps(data, indent=2))
        return
    if stream is None:
        for i, text in enumerate(result.texts):
            print(f"--- {i}\n{text}")
    else:
        stream.end()
        print()
    tokens = sum(len(t) for t in result.tokens)
    drafts = "" if result.draft_layer is None else f", {result.acceptance:.0%} of drafts kept"
    if result.draft_layers is not None:
        depth = np.mean([d for row in result.draft_layers for d in row])
        drafts += f", mean draft layer {depth:.2f} of {model.config.num_hidden_layers}"
    if result.exit_layers is not None:
        skipped = np.mean([s for row in result.head_skips for s in row])
        drafts = (
            f", mean exit layer {result.mean_exit_layer:.2f} of {model.config.num_hidden_layers}"
            f", {skipped:.0%} read on the shortlist (the full LM head skipped)"
        )
    print(
        f"[{tokens} tokens in {result.wall_time_s:.1f} s{drafts}]",
        file=sys.stderr,
    )


COMMANDS = {
    "generate": cmd_generate,
    "calibrate-exits": cmd_calibrate_exits,
    "plan-drafts": cmd_plan_drafts,
    "bench": cmd_bench,
    "collect": cmd_collect,
    "fit": cmd_fit,
    "eval": cmd_eval,
    "demo": cmd_demo,
    "reproduce": cmd_reproduce,
    "lm-eval": cmd_lm_eval,
    "claims": cmd_claims,
}


def main(argv=None) -> int:
    from .models import ModelNotAvailable

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "lm-eval":  # its options are lm-eval's, passed on as they are
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ModelNotAvailable, FolderInUse) as e:
        # user errors (bad task file, unknown alias, a policy for another model, ...): one line
        if args.verbose:  # the whole traceback, for bug reports
            raise
        print(
            f"adainfer {args.command}: error: {e} (run with -v for the traceback)", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
