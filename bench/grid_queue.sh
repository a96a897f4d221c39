#!/usr/bin/env bash
# The generation grid of issue 15 (results/generation/grid), cell after cell, 1 torch thread a
# cell. Two lanes share the cells so that two cores each run one; every cell resumes where it
# stopped, so after an interruption rerun the same lanes:
#   nohup bench/grid_queue.sh a > grid-a.log 2>&1 &
#   nohup bench/grid_queue.sh b > grid-b.log 2>&1 &
# `side` runs the side runs (each its own folder) on one core: questions the grid raised;
# `misses` one more, after the probes' training changed (see there).
# Lane b waits until lane a's first cell has written the crossfit calibration (the same cut and
# traces serve batch 1 and 8), rather than decoding the same prompts twice at once.
# WARNING: --execute runs model-written code (HumanEval's harness); see bench/generation.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/generation/grid}
# adainfer-plain (adainfer's decoder skipping nothing) is the base of the lossy saving; the
# first two Qwen cells were started without it (lossless-planned stands in where it drafts
# nothing), and a cell's method list is fixed once it has batches
FIRST=plain,hf-early-exit,lossless-planned,lossy@1%,lossy@5%
METHODS=plain,adainfer-plain,hf-early-exit,lossless-planned,lossy@1%,lossy@5%
# the grid's SQuAD cells were calibrated on the 8 held-out articles' first questions only
ONE="--calibration-paragraphs 1"
cell() {  # methods model dtype batch-sizes [extra flags]
    local methods=$1 model=$2 dtype=$3 batches=$4
    shift 4
    OMP_NUM_THREADS=1 PYTHONPATH=src $PY bench/generation.py --models "$model" --dtypes "$dtype" \
        --batch-sizes "$batches" --methods "$methods" --threads 1 --execute --out-dir "$OUT" "$@"
}
case ${1:-} in
side)
    # does a lower risk keep pass@1 within a point? (the 1% plan loses 3.7-4.3 points in bf16)
    mkdir -p results/generation/lower-risk/exits
    cp -n "$OUT"/exits/.traces -r results/generation/lower-risk/exits/ 2>/dev/null || true
    OUT=results/generation/lower-risk cell plain,adainfer-plain,lossy@0.5% qwen2.5-0.5b bfloat16 8
    # and at batch 1, where a row that leaves saves its layers and head in full: the 0.5%
    # policies plan 0.90-0.94 of a plain step there (0.97-0.98 at batch 8), the oracle 0.88
    OUT=results/generation/lower-risk cell plain,adainfer-plain,lossy@0.5% qwen2.5-0.5b bfloat16 1
    # ../exit-drafts (done): drafts whose depth the 5% policy picks per token, with the stdlib
    # policy (made before exit drafts read --exit-calibration; today's command for it is
    # `cell plain,adainfer-plain,lossless-exits@5% qwen2.5-0.5b bfloat16 1,8 --limit 40
    # --exit-calibration stdlib` into a fresh folder)
    # the same drafts, cross-fitted, unplanned and as their ExitDraftPlanner plans them
    OUT=results/generation/exit-drafts-planned \
        cell plain,adainfer-plain,lossless-exits@5%,lossless-exits-planned@5% \
        qwen2.5-0.5b bfloat16 1,8 --limit 40
    ;;
misses)
    # the probes trained on tokens that miss the shortlist (trace_exits' training_misses, the
    # library default since the grid began): ../probes plans 0.926 of a plain step at 0.5%
    # where the grid's probes plan 0.939 (0.846 against 0.863 at 1%), mostly by skipping the
    # full LM head at the last layer, which changes no key or value
    OUT=results/generation/misses cell plain,adainfer-plain,lossy@0.5%,lossy@1% \
        qwen2.5-0.5b bfloat16 1 --training-misses
    # met at batch 1 (lossy@1%: 87% of the oracle's saving, pass@1 -0.6): batch 8 (the same
    # cut, so the same calibration traces)
    OUT=results/generation/misses cell plain,adainfer-plain,lossy@0.5%,lossy@1% \
        qwen2.5-0.5b bfloat16 8 --training-misses
    ;;
hidden)
    # the same with probes that also read the hidden state (TokenExitPolicy's hidden_state):
    # ../probes plans 0.887 of a plain step at 0.5% with them, 0.926 without
    OUT=results/generation/hidden cell plain,adainfer-plain,lossy@0.5%,lossy@1% \
        qwen2.5-0.5b bfloat16 1 --training-misses --hidden-state
    ;;
retime)
    # a b8 cell of 40 prompts has 5 pairs: Gemma fp32 b8 read lossless-planned 0.92x (IQR
    # 0.69-1.15) under a load of 3-5, its plan estimated 1.30x; timed again, 3 rounds a
    # batch, with the plan it drafted by (kept in plans/; the one-round cell in superseded/)
    cell $METHODS gemma3-270m float32 8 --rounds 3 $ONE
    ;;
squad-plans)
    # the same cell's draft plan fitted and checked on the clock on 24 calibration prompts
    # (3 paragraphs of each held-out article, today's default) instead of 8, one batch at b8:
    # does the check now keep only a plan that pays on the evaluated prompts?
    OUT=results/generation/squad-calibration cell plain,adainfer-plain,lossless-planned \
        gemma3-270m float32 8 --rounds 3
    ;;
a)
    cell $FIRST qwen2.5-0.5b bfloat16 8
    cell $METHODS smollm2-135m bfloat16 1,8 $ONE
    cell $METHODS qwen2.5-0.5b float32 1,8 --limit 40
    cell $METHODS smollm2-135m float32 1,8 $ONE
    cell $METHODS qwen2.5-1.5b float32 1,8 --limit 40
    ;;
b)
    until [ "$(ls "$OUT"/exits/qwen2.5-0.5b-bfloat16-b8-risk*-half*.json 2>/dev/null | wc -l)" -ge 4 ]; do
        sleep 60
    done
    cell $FIRST qwen2.5-0.5b bfloat16 1
    cell $METHODS gemma3-270m bfloat16 1,8 $ONE
    cell $METHODS qwen2.5-1.5b bfloat16 1,8 --limit 40
    cell $METHODS gemma3-270m float32 1,8 $ONE
    ;;
*)
    echo "usage: $0 side|misses|hidden|retime|squad-plans|a|b" >&2
    exit 2
    ;;
esac
