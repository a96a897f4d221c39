"""What a task is, and reading one from a file. A ground floor: imports nothing from adainfer,
so the benchmark loaders (benchmarks.py) and the task dispatcher (tasks.py) both build on it.

A task is a list of (input, output) examples. Any JSON list / JSONL file of
`{"input": ..., "output": ...}` items (the function-vectors format) is a task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    input: str
    output: str
    # for choice tasks: every answer the model may give (labels, letters)
    choices: tuple[str, ...] = ()


@dataclass
class Task:
    name: str
    examples: list[Example]  # where queries come from
    pool: list[Example] | None = None  # a separate demonstration pool (a train / dev split), if any

    def __len__(self) -> int:
        return len(self.examples)


class TaskError(ValueError):
    pass


def read_text(path: Path) -> str:
    """The file as UTF-8 text; a file in another encoding gets an error naming its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TaskError(
            f"{path}, line {line}: not UTF-8 text (byte {data[e.start]:#04x}); "
            "save the file as UTF-8"
        ) from None


def load_task_file(path: str | Path) -> Task:
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    text = read_text(path)
    if path.suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                items.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise TaskError(
                f'{path}: expected a JSON list of {{"input", "output"}} items, '
                f"got {type(data).__name__}"
            )
        items = [(f"item {i}", d) for i, d in enumerate(data)]
    examples = [_example(path, where, item) for where, item in items]
    if not examples:
        raise TaskError(f"{path}: no examples")
    return Task(path.stem, examples)


def _example(path, where, item) -> Example:
    if not isinstance(item, dict) or "input" not in item or "output" not in item:
        raise TaskError(f'{path}, {where}: each item needs an "input" and an "output" field')
    x, y = item["input"], item["output"]
    if isinstance(y, list):  # extractive function-vector tasks list several right answers
        y = y[0] if y else ""
    if not isinstance(x, str) or not isinstance(y, str) or not x.strip() or not y.strip():
        raise TaskError(f'{path}, {where}: "input" and "output" must be non-empty strings')
    return Example(x, y)
