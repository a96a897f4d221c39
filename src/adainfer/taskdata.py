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


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a .json list of strings (or of objects with a "prompt" field), a
    .jsonl file of either, or plain text with one prompt per line (prompts that span lines,
    such as code, need JSON)."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"prompts file {path} does not exist")
    text = read_text(path)
    if path.suffix not in (".json", ".jsonl"):
        prompts = [line for line in text.splitlines() if line.strip()]
    else:
        try:
            items = (
                json.loads(text)
                if path.suffix == ".json"
                else [json.loads(line) for line in text.splitlines() if line.strip()]
            )
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(items, list):
            raise TaskError(f"{path}: expected a JSON list of prompts")
        prompts = [i.get("prompt") if isinstance(i, dict) else i for i in items]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise TaskError(
            f'{path}: expected non-empty prompts (strings, or objects with a "prompt" string)'
        )
    return prompts


STDLIB_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "codecs", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "difflib", "dis", "email.utils", "fnmatch",
    "fractions", "functools", "gettext", "glob", "graphlib", "hashlib", "heapq", "hmac",
    "html", "http.cookies", "inspect", "ipaddress", "json.decoder", "linecache", "locale",
    "logging", "operator", "pathlib", "pickletools", "posixpath", "pprint", "quopri",
    "random", "reprlib", "secrets", "shlex", "shutil", "statistics", "string", "tarfile",
    "tempfile", "textwrap", "tokenize", "traceback", "typing", "urllib.parse", "uuid",
    "wave", "weakref", "zipfile",
)  # fmt: skip


def python_prompts(n: int, seed: int = 0) -> list[str]:
    """Up to `n` unlabeled code-completion prompts from the Python standard library on this
    machine: a documented function's signature and docstring, its body left to the model.
    Label-free calibration data for code models, with no download."""
    import importlib
    import inspect
    import random

    prompts = []
    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for fname, fn in sorted(vars(module).items()):
            if not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            doc = inspect.getdoc(fn)
            if fname.startswith("_") or not doc or len(doc) < 40:
                continue
            try:
                signature = str(inspect.signature(fn))
            except (TypeError, ValueError):
                continue
            first, *rest = doc.splitlines()[:12]
            more = "".join(f"\n    {line}" if line else "\n" for line in rest)
            prompts.append(f'def {fname}{signature}:\n    """{first}{more}\n    """\n')
    random.Random(seed).shuffle(prompts)
    return prompts[:n]
