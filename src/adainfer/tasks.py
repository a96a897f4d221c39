"""Tasks by name, prompts and gold tokens.

A task (`taskdata.Task`) is a list of (input, output) examples. Prompts follow the paper's
template: `Q: {x}\\nA: {y}\\n\\n` for each of k demonstrations, then `Q: {x}\\nA:`. The gold
token is the first token the model would have to produce after `A:`, i.e. the first token of
" " + output.

Built-in rule tasks are generated from a small word list shipped with the package, so the
demo and the tests need no data download. `load_task` also takes a benchmark name
(benchmarks.py) or a JSON / JSONL task file (`taskdata.load_task_file`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .benchmarks import is_benchmark, load_benchmark
from .taskdata import Example, Task, TaskError, load_task_file

log = logging.getLogger(__name__)


def _words() -> list[str]:
    text = files("adainfer").joinpath("data/words.txt").read_text()
    return list(dict.fromkeys(w.strip() for w in text.split() if w.strip()))


def _word_task(name: str, fn: Callable[[str], tuple[str, str]]) -> Callable[[], Task]:
    return lambda: Task(name, [Example(*fn(w)) for w in _words()])


def _list_task(name: str, pick: Callable[[list[str]], str], size: int = 3) -> Callable[[], Task]:
    def make() -> Task:
        words, rng = _words(), random.Random(name)
        items = [rng.sample(words, size) for _ in range(len(words))]
        return Task(name, [Example(", ".join(xs), pick(xs)) for xs in items])

    return make


RULE_TASKS: dict[str, Callable[[], Task]] = {
    "capitalize": _word_task("capitalize", lambda w: (w, w.capitalize())),
    "lowercase": _word_task("lowercase", lambda w: (w.capitalize(), w)),
    "uppercase": _word_task("uppercase", lambda w: (w, w.upper())),
    "first_letter": _word_task("first_letter", lambda w: (w, w[0])),
    "first_item": _list_task("first_item", lambda xs: xs[0]),
    "last_item": _list_task("last_item", lambda xs: xs[-1]),
}


def load_task(name_or_path: str, data_dir: str | Path | None = None) -> Task:
    """A built-in rule task, a benchmark (sst2, mmlu:<subject>, fv:<name>, ...; see
    adainfer.benchmarks) or a JSON / JSONL file of {"input", "output"} items."""
    if name_or_path in RULE_TASKS:
        return RULE_TASKS[name_or_path]()
    if is_benchmark(name_or_path):
        return load_benchmark(name_or_path, data_dir)
    path = Path(name_or_path)
    if path.suffix in (".json", ".jsonl") or path.exists():
        return load_task_file(path)
    raise TaskError(
        f"unknown task {name_or_path!r}: use a built-in rule task ({', '.join(RULE_TASKS)}), "
        "a benchmark (sst2, ag_news, mmlu[:subject|group], commonsense_qa, squad, fv:<name>, "
        "lre:<name>) "
        'or a path to a .json / .jsonl file of {"input": ..., "output": ...} items'
    )


# ----------------------------------------------------------------------------- prompts
def build_prompt(query: str, demos: Sequence[Example] = ()) -> str:
    shots = "".join(f"Q: {d.input}\nA: {d.output}\n\n" for d in demos)
    return f"{shots}Q: {query}\nA:"


def split(task: Task, n_test: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Disjoint (pool, test) split: demonstrations and training queries come from the pool."""
    if not 0 < n_test < len(task):
        raise TaskError(f"task {task.name} has {len(task)} examples; cannot hold out {n_test}")
    order = _shuffled(len(task), seed)
    test = [task.examples[i] for i in order[:n_test]]
    pool = [task.examples[i] for i in order[n_test:]]
    return pool, test


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def held_out_indices(task: Task, n_test: int, seed: int = 0) -> list[int]:
    """Which of `task.examples` `task_queries` holds out as test queries, in query order: the
    split a results file records. The rest (or the task's own pool) serves demonstrations."""
    if task.pool is not None:
        return random.Random(seed).sample(
            range(len(task.examples)), min(n_test, len(task.examples))
        )
    return _shuffled(len(task), seed)[: min(n_test, len(task) // 2)]


def few_shot_prompts(
    queries: Sequence[Example], pool: Sequence[Example], k: int, seed: int = 0
) -> list[str]:
    """One prompt per query with k demonstrations from `pool`, never the query itself."""
    prompts = []
    for i, q in enumerate(queries):
        candidates = [e for e in pool if e.input != q.input]
        if k > len(candidates):
            raise TaskError(f"asked for {k} demonstrations but the pool has only {len(candidates)}")
        demos = random.Random(f"{seed}-{i}-{q.input}").sample(candidates, k)
        prompts.append(build_prompt(q.input, demos))
    return prompts


def answer_token(tokenizer, prompt: str, answer: str) -> int:
    """The first token the model must emit after `prompt` to start `answer` (after a space)."""
    full = tokenizer(prompt + " " + answer, add_special_tokens=True)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(full) > len(head) and full[: len(head)] == head:
        return full[len(head)]
    # The space merged into the prompt's last token: fall back to the answer on its own.
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]


@dataclass(frozen=True)
class Query:
    """One prompt to run, with what it takes to score it."""

    id: str  # stable across runs: resuming and merging key on it
    task: str
    prompt: str
    answer: str
    gold: int  # first token of " " + answer
    choice_tokens: tuple[int, ...] = ()  # first token of " " + each choice (choice tasks)
    shots: int = 0


def make_queries(
    tokenizer,
    task: str,
    examples: Sequence[Example],
    pool: Sequence[Example],
    shots: int,
    seed: int = 0,
) -> list[Query]:
    prompts = (
        few_shot_prompts(examples, pool, shots, seed)
        if shots
        else [build_prompt(e.input) for e in examples]
    )
    return [
        Query(
            f"{task}/{shots}shot/{seed}/{i}",
            task,
            p,
            e.output,
            answer_token(tokenizer, p, e.output),
            tuple(answer_token(tokenizer, p, c) for c in e.choices),
            shots,
        )
        for i, (e, p) in enumerate(zip(examples, prompts))
    ]


def task_queries(
    tokenizer,
    names: Sequence[str | Task],
    *,
    shots: int,
    n_train: int,
    n_test: int,
    seed: int = 0,
    data_dir=None,
    strict: bool = True,
):
    """(train queries, test queries) over several tasks; test examples never serve as demos.

    A task without its own demonstration pool is split in two (at most half held out, so
    small tasks keep a pool); training queries are a seeded sample of the pool (all of it, when
    `strict=False` and the pool is smaller than n_train). A name may be a loaded Task."""
    train, test = [], []
    for name in names:
        task = name if isinstance(name, Task) else load_task(name, data_dir)
        if task.pool is not None:  # the benchmark has its own demonstration split
            pool = task.pool
            held_out = [task.examples[i] for i in held_out_indices(task, n_test, seed)]
        else:
            pool, held_out = split(task, min(n_test, len(task) // 2), seed)
        if len(held_out) < n_test:  # capped: say so, the summary counts fewer queries
            log.warning(
                "task %s has %d examples: holding out %d, not the %d asked (--n-test)",
                task.name,
                len(task),
                len(held_out),
                n_test,
            )
        n = n_train if strict else min(n_train, len(pool))
        if n > len(pool):
            raise TaskError(f"task {task.name} has {len(pool)} pool examples; cannot train on {n}")
        # a training query's own demonstrations come from the rest of the pool (few_shot_prompts)
        train += make_queries(
            tokenizer, task.name, random.Random(seed).sample(pool, n), pool, shots, seed
        )
        test += make_queries(tokenizer, task.name, held_out, pool, shots, seed + 1)
    return train, test
