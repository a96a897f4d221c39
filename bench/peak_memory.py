"""Peak memory of the plain model and of adainfer with a saved policy, on the same batch.

`adainfer bench` measures this too, once per cell after the timing; this re-measures it alone,
e.g. after a memory fix, without the hour of timing:

    python bench/peak_memory.py --model gemma3-270m --dtype bfloat16 --task sst2 \\
        --batch-size 32 --data-dir ../shared/data \\
        --policy results/bench/policies/gemma3-270m-bfloat16-sst2.safetensors

Prints, in MB, the peak above the resident set before each call (what a batch adds) and the
process's total peak (weights included).
"""

from __future__ import annotations

import argparse

from adainfer import AdaptiveEngine, load
from adainfer.persist import load_policy
from adainfer.tasks import task_queries
from adainfer.timing import peak_memory, plain_forward, release_large_blocks, rss


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--task", default="sst2")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--policy", required=True, help="a saved policy file (e.g. from `adainfer bench`)"
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    release_large_blocks()
    model, tok = load(args.model, dtype=args.dtype)
    engine, policy = AdaptiveEngine(model, tok), load_policy(args.policy, model=model)
    _, test = task_queries(
        tok,
        [args.task],
        shots=args.shots,
        n_train=0,
        n_test=args.batch_size,
        data_dir=args.data_dir,
    )
    prompts = [q.prompt for q in test]
    enc = engine.encode(prompts)
    runs = {
        "plain": lambda: plain_forward(model, enc),
        "policy": lambda: engine.run(prompts, policy),
    }
    for fn in runs.values():
        fn()  # warm-up
    for name, fn in runs.items():
        before = rss()
        peaks = [peak_memory(fn, "cpu") for _ in range(args.repeats)]
        above, total = max(peaks) / 2**20, (before + max(peaks)) / 2**20
        print(f"{name:6s} peak above resident: {above:7.1f} MB   total peak: {total:7.1f} MB")


if __name__ == "__main__":
    main()
