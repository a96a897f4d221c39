"""What should a decode-time exit probe read? The shortlist features against the hidden state.

Issue 15 names two cheap exit signals that need no LM head: the shortlist features adainfer's
`TokenExitPolicy` reads (top probability and gap on a 4k-token shortlist, cosine to the
layer's input) and "a tiny learned probe on the hidden state" (CALM's early-exit classifier).
This plans both on the same calibration tokens, the way `TokenExitPolicy.fit_trace` plans
(probes on the even prompts, Learn-then-Test on the odd ones, the step costed by the cell's
measured `ExitCosts`); the shortlist probes also as `trace_exits` now trains them, on tokens
read on a shortlist that misses some of them (`training_misses`: read on their own shortlist,
the probes' tokens never miss it, and the last layer's probe passes everything; the
hidden-state probes are trained that way too); and sets them against the perfect probe (a
token leaves at the first candidate layer whose shortlist top-1 is already the full model's)
and the per-token oracle.

The calibration is a grid cell's (results/generation/grid): the crossfit half's prompts,
greedy-decoded 64 tokens each, read teacher-forced at every layer; with --check-trace the
shortlist trace is compared with the one the grid cell stored, so the plans are the cell's.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/exit_probes.py --out results/generation/probes

About 25 minutes on one thread (the decoding; a rerun reads the kept trace in out/.traces).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import generation as G  # noqa: E402
from adainfer import models  # noqa: E402
from adainfer.files import write_atomic, write_json, write_text_atomic  # noqa: E402
from adainfer.generation import SelfSpeculativeDecoder  # noqa: E402
from adainfer.lossy import (  # noqa: E402
    ExitCosts,
    ExitTrace,
    TokenExitPolicy,
    _halves,
    _plan,
    read_exits,
)

GRID = Path("results/generation/grid")
OUTCOME = ("step_cost", "exited_share", "head_skipped_share", "changed_share")
WIDE = {"max_checks": 6, "min_agreement": 0.0}  # the last six layers, whatever they agree


@torch.inference_mode()
def trace_with_hidden(model, tokenizer, prompts, deepest: int, batch: int = 8):
    """The grid's trace of `prompts` (`trace_exits` as the grid ran it, without training
    misses: greedy, 64 new tokens), each traced token's hidden state [N, deepest, H]
    (float16) at the last `deepest` layers, and the generated tokens [N]."""
    decoder = SelfSpeculativeDecoder(model, tokenizer)
    starts = range(0, len(prompts), batch)
    generated = []
    for s in starts:
        generated += decoder.generate(prompts[s : s + batch], max_new_tokens=64).tokens
        done = min(s + batch, len(prompts))
        print(f"decoded {done} of {len(prompts)} prompts", file=sys.stderr, flush=True)
    trace = read_exits(
        decoder, prompts, generated, batch_size=batch, training_misses=False, hidden_layers=deepest
    )
    tokens = np.concatenate([np.asarray(g, dtype=np.int64) for g in generated])
    return dataclasses.replace(trace, hidden=None), trace.hidden, tokens


def same_as_grid(trace: ExitTrace, model, prompts) -> None:
    """Stop unless the grid cell's stored trace of these prompts (`generation._exit_trace`'s
    file) holds the same shortlist reads: then the plans here are the cell's."""
    key = f"{getattr(model, 'adainfer_id', '')}|{model.dtype}|" + "\0".join(prompts)
    path = GRID / "exits" / ".traces" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if not path.is_file():
        raise SystemExit(f"no grid trace at {path} to compare with (run the grid cell first)")
    with np.load(path) as z:
        same = z["agree"].shape == trace.agree.shape and (z["agree"] == trace.agree).all()
        if not same or not np.allclose(z["features"], trace.features, atol=1e-3):
            raise SystemExit(f"the trace differs from the grid's {path}")
    print(f"the trace equals the grid's {path.name}", file=sys.stderr)


def plan(trace: ExitTrace, scores, layers, risk: float, costs: ExitCosts) -> dict:
    """Learn-then-Test on `scores` exactly as `TokenExitPolicy.fit_trace` plans its own."""
    halves = _halves(trace, scores, [x - 1 for x in layers], costs.rows)
    chosen, _, cal = _plan(*halves, list(layers), trace.num_layers, risk, 0.05, costs)
    return {"layers": chosen, **{k: cal[k] for k in OUTCOME}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--half", type=int, default=0, choices=[0, 1])
    p.add_argument("--risks", default="0.005,0.01,0.02")
    p.add_argument("--C", default="0.001,0.01,0.1", help="hidden-state probes' L2 strengths")
    p.add_argument("--deepest", type=int, default=8, help="hidden states of this many layers")
    p.add_argument("--check-trace", action="store_true", help="compare with the grid's trace")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = models.load(args.model, dtype=args.dtype)
    prompts = [it.prompt for it in G.humaneval_task(None).items]
    split = G.crossfit_split(len(prompts), 1)
    others = prompts[split:] if args.half == 0 else prompts[:split]  # as the grid's half
    key = f"{args.model}|{args.dtype}|{args.deepest}|" + "\0".join(others)
    cache = args.out / ".traces" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            trace = ExitTrace(*(z[k] for k in ("vocab", "features", "agree", "settled", "prompt")))
            hidden, tokens = z["hidden"], z["tokens"]
    else:
        trace, hidden, tokens = trace_with_hidden(model, tokenizer, others, args.deepest)
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays = {**trace.__dict__, "hidden": hidden, "tokens": tokens}  # tokens: for later
        write_atomic(cache, functools.partial(G._save_npz, arrays=arrays))
    stem = f"{args.model}-{args.dtype}-b1-risk0.01-half{args.half}.json"
    policy_file = TokenExitPolicy.load(GRID / "exits" / stem)
    costs = ExitCosts(**policy_file.costs_)
    if args.check_trace:
        same_as_grid(trace, model, others)

    L = trace.num_layers
    wide = list(range(L - WIDE["max_checks"] + 1, L + 1))
    generated = np.split(tokens, np.cumsum(np.bincount(trace.prompt))[:-1])
    decoder = SelfSpeculativeDecoder(model, tokenizer)
    missing = read_exits(decoder, others, [g.tolist() for g in generated])  # training misses
    rows = []
    for risk in map(float, args.risks.split(",")):
        for name, t in (("", trace), (", trained with shortlist misses", missing)):
            fitted = TokenExitPolicy(risk=risk, cost_batch_size=1).fit_trace(t, costs)
            c = fitted.calibration_
            rows.append(
                {
                    "probe": f"shortlist features (adainfer){name}",
                    "candidates": fitted.candidates(t),
                    "risk": risk,
                    "layers": fitted.layers_,
                    **{k: c[k] for k in OUTCOME},
                }
            )
        with_states = dataclasses.replace(missing, hidden=hidden)  # trained as the default
        for C in map(float, args.C.split(",")):
            for choice in ({}, WIDE):  # the default candidates, and the last six layers
                fitted = TokenExitPolicy(
                    risk=risk, cost_batch_size=1, C=C, hidden_state=True, **choice
                ).fit_trace(with_states, costs)
                rows.append(
                    {
                        "probe": f"hidden state + shortlist (adainfer), with misses, C={C:g}",
                        "candidates": fitted.candidates(with_states),
                        "risk": risk,
                        "layers": fitted.layers_,
                        **{k: fitted.calibration_[k] for k in OUTCOME},
                    }
                )
        perfect = trace.agree[:, [x - 1 for x in wide]].astype(float) * 2 - 1
        rows.append(
            {
                "probe": "perfect (shortlist already agrees)",
                "candidates": wide,
                "risk": risk,
                **plan(trace, perfect, wide, risk, costs),
            }
        )
        print(rows[-1], file=sys.stderr, flush=True)
    oracle = 1 - (L - trace.settled.mean()) * costs.layer
    write(args.out, rows, oracle, trace, args, costs)


def write(out: Path, rows, oracle: float, trace, args, costs) -> None:
    lines = [
        f"# Exit probes: what a decode-time exit check should read ({args.model}, {args.dtype}, "
        "batch 1)",
        "",
        f"Calibration: the grid cell's crossfit half {args.half} ({len(np.unique(trace.prompt))} "
        f"HumanEval prompts, {len(trace.prompt)} greedy tokens); step costs from the cell's "
        f"measured ExitCosts (a layer {costs.layer:.3f}, the LM head {costs.head:.3f}, a check "
        f"{costs.check:.4f}, a propagated layer {costs.propagate:.4f} of a plain step). Per-token "
        f"oracle (each token at its settled layer, free checks, the head still read): step "
        f"{oracle:.3f}. Command: `{' '.join(['bench/exit_probes.py', *sys.argv[1:]])}`.",
        "",
        "| probe | candidates | risk | check layers | step cost | leaving early | head skipped "
        "| changed (held out) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['probe']} | {r['candidates']} | {r['risk']:.1%} | {r['layers'] or 'none'} | "
            f"{r['step_cost']:.3f} | {r['exited_share']:.0%} | {r['head_skipped_share']:.0%} | "
            f"{r['changed_share']:.2%} |"
        )
    write_text_atomic(out / "probes.md", "\n".join(lines) + "\n")
    write_json(
        out / "probes.json", {"oracle_step_cost": oracle, "rows": rows, "argv": sys.argv[1:]}
    )


if __name__ == "__main__":
    main()
