"""Benchmark tasks of the paper: SST-2, AG News, MMLU, CommonsenseQA, SQuAD and the
function-vector / linear-relation task pools.

Where the data comes from: the `data_dir` argument, else `$ADAINFER_DATA_DIR` (a local copy
laid out as in the project's shared data README), else the Hugging Face hub through the
`datasets` library (fv:* and lre:* have no hub copy and need a data dir).

Every example is rendered for the prompt template `Q: {input}\\nA: {output}`, so the gold
answer is kept to one word or letter wherever the benchmark allows it:

| name              | queries (pool)                         | input                                         | gold `output`                        | `choices`                 |
|-------------------|----------------------------------------|-----------------------------------------------|--------------------------------------|---------------------------|
| sst2              | GLUE validation (GLUE train)           | the sentence                                  | "negative" / "positive" (label 0/1)  | negative, positive        |
| ag_news           | test (none: carved by tasks.split)     | "title: description", entities unescaped      | World / Sports / Business / Sci/Tech | the four class names      |
| mmlu[:subj/group] | test rows (the subjects' 5 dev rows)   | question + "\\nA. ..\\nB. ..\\nC. ..\\nD. .."  | letter of the `answer` index 0-3     | A, B, C, D                |
| commonsense_qa    | validation (none)                      | question + "\\nA. ..\\n.. E. .."                | `answerKey` letter                   | A-E                       |
| squad             | fv-style validation (none)             | context + "\\n" + question                     | the (single agreed) answer span      | none                      |
| fv:<name>         | the task's JSON list (none)            | `input`                                       | `output` (first one if a list)       | distinct outputs if <= 10 |
| lre:<name>        | the relation's `samples` (none)        | `subject`                                     | `object`                             | none                      |

Tasks without their own pool get split into (pool, test) by index in tasks.split, so those
loaders keep only the first example of each repeated input (fv conll2003_*, national_parks,
lre product_by_company, ... repeat inputs): a held-out query then never reappears as a
training query. ag_news deliberately keeps pool=None rather than borrowing
function_vectors/.../ag_news.json, whose labels differ ("Science" for "Sci/Tech").

Two differences a user may meet: the hub's ag_news has one `text` field, title and description
already joined by a space, so hub prompts read "title description" where local files give
"title: description"; and each MMLU subject has only 5 dev rows, so few-shot demonstrations for
`mmlu` (all subjects, or a group) are drawn from the pooled dev rows of those subjects, not
the query's own subject alone; a single subject (`mmlu:anatomy`) allows k <= 5.
"""  # noqa: E501 (the table above is wider than a line)

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from .taskdata import Example, Task, TaskError, load_task_file, read_text

ENV_VAR = "ADAINFER_DATA_DIR"
SST2_LABELS = ("negative", "positive")
AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")  # classes.txt order: class 1..4
LETTERS = "ABCDEFGHIJ"
MAX_CLOSED_SET = 10  # an fv task with at most this many distinct outputs is scored as a choice task
FV_DIRS = ("abstractive", "extractive")
LRE_DIRS = ("factual", "linguistic", "bias")
HUB = {  # name -> (hub id, config) for users without a local copy
    "sst2": ("nyu-mll/glue", "sst2"),
    "ag_news": ("fancyzhx/ag_news", None),
    "mmlu": ("cais/mmlu", None),  # the config is the subject
    "commonsense_qa": ("tau/commonsense_qa", None),
    "squad": ("rajpurkar/squad", None),
}

# The four MMLU categories as lm-evaluation-harness groups the 57 subjects (its
# mmlu/_generate_configs.py). The MMLU paper's categories.py is the same except that it
# counts anatomy under "other" (health); we follow the harness, whose numbers get reported.
MMLU_GROUPS: dict[str, tuple[str, ...]] = {
    "STEM": (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    "social_sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "other": (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}
MMLU_SUBJECTS = tuple(sorted(s for group in MMLU_GROUPS.values() for s in group))
_GROUP_BY_LOWER = {g.lower(): g for g in MMLU_GROUPS}  # "mmlu:stem" works as well as "mmlu:STEM"

# One file per benchmark whose presence makes it loadable from a data dir.
_MARKER = {
    "sst2": "sst2/dev.tsv",
    "ag_news": "ag_news/test.csv",
    "mmlu": "mmlu/test",
    "commonsense_qa": "commonsense_qa/validation.jsonl",
    "squad": "squad/squad_val_fv_style.json",
}
FAMILIES = "sst2, ag_news, mmlu, mmlu:<subject|group>, commonsense_qa, squad, fv:<name>, lre:<name>"


# ----------------------------------------------------------------------------- public API
def is_benchmark(name: str) -> bool:
    # prefixed names count even if the suffix is wrong, so load_benchmark can list the valid ones
    return name in HUB or name.startswith(("mmlu:", "fv:", "lre:"))


def load_benchmark(name: str, data_dir: str | Path | None = None) -> Task:
    base, _, arg = name.partition(":")
    if not is_benchmark(name):
        raise TaskError(f"unknown benchmark {name!r}; valid: {FAMILIES}")
    root = _data_dir(data_dir)
    if base in ("fv", "lre"):
        if root is None:
            raise TaskError(
                f"{name}: {base}:* tasks have no Hugging Face hub copy; pass --data-dir or set "
                f"{ENV_VAR} to a folder holding function_vectors/ and lre_relations/"
            )
        return (_fv if base == "fv" else _lre)(name, root, arg)
    if base == "mmlu":
        return _mmlu(name, root, _mmlu_subjects(arg))
    return {"sst2": _sst2, "ag_news": _ag_news, "commonsense_qa": _csqa, "squad": _squad}[base](
        name, root
    )


def list_benchmarks(data_dir: str | Path | None = None) -> list[str]:
    """Every loadable name: all hub benchmarks without a data dir, else what the data dir holds."""
    root = _data_dir(data_dir)
    mmlu = ["mmlu", *(f"mmlu:{g}" for g in MMLU_GROUPS), *(f"mmlu:{s}" for s in MMLU_SUBJECTS)]
    if root is None:
        return ["sst2", "ag_news", *mmlu, "commonsense_qa", "squad"]
    names = [n for n in ("sst2", "ag_news") if (root / _MARKER[n]).exists()]
    names += mmlu if (root / _MARKER["mmlu"]).exists() else []
    names += [n for n in ("commonsense_qa", "squad") if (root / _MARKER[n]).exists()]
    names += [f"fv:{n}" for n in _json_names(root / "function_vectors" / "dataset_files", FV_DIRS)]
    names += [f"lre:{n}" for n in _json_names(root / "lre_relations" / "data", LRE_DIRS)]
    return names


# ----------------------------------------------------------------------------- sources
def _data_dir(data_dir) -> Path | None:
    chosen = data_dir or os.environ.get(ENV_VAR)
    if not chosen:
        return None
    root = Path(chosen).expanduser()
    if not root.is_dir():
        raise TaskError(
            f"data dir {root} does not exist (from {'--data-dir' if data_dir else ENV_VAR})"
        )
    return root


def _hub(name: str, split: str, config: str | None = None) -> list[tuple[str, dict]]:
    """Rows of a hub dataset as (where, row), for error messages like the local readers'."""
    hub_id, default_config = HUB[name]
    config = config or default_config
    hint = f"pass --data-dir or set {ENV_VAR} to a local copy of the data"
    try:
        import datasets  # lazy: an optional dependency, only needed without a data dir
    except ImportError:
        raise TaskError(
            f"{name}: no data dir given and the `datasets` library is missing; {hint}, "
            "or `pip install datasets`"
        ) from None
    try:
        rows = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # offline, hub down, renamed dataset, ...: all mean "use local files"
        raise TaskError(
            f"{name}: could not load {hub_id} ({config or 'default'}, {split}) from the "
            f"Hugging Face hub ({type(e).__name__}: {e}); {hint}"
        ) from None
    return [(f"{hub_id} {split} row {i}", row) for i, row in enumerate(rows)]


def _csv_rows(
    path: Path, columns: int, headers: Iterable[tuple[str, ...]] = (), delimiter: str = ","
):
    """(where, row) per record; `headers` lists the accepted header rows (none: no header)."""
    if not path.is_file():
        raise TaskError(f"missing data file {path}")
    headers = list(headers)
    # GLUE's TSVs are unquoted (sentences hold stray '"'); the CSVs quote fields with commas
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    data_rows = 0
    reader = csv.reader(
        io.StringIO(read_text(path), newline=""), delimiter=delimiter, quoting=quoting, strict=True
    )
    try:
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if headers and reader.line_num == 1:
                if tuple(row) not in headers:
                    raise TaskError(
                        f"{where}: expected a header {' or '.join(map(repr, headers))}, got {row}"
                    )
                continue
            if len(row) != columns:
                raise TaskError(f"{where}: expected {columns} columns, got {len(row)}")
            data_rows += 1
            yield where, row
    except csv.Error as e:  # an unterminated quote, most often
        raise TaskError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
    if not data_rows:
        raise TaskError(f"{path}: no data rows")


def _jsonl_rows(path: Path):
    if not path.is_file():
        raise TaskError(f"missing data file {path}")
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                yield f"{path}, line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}, line {n}: not valid JSON ({e.msg})") from None


def _examples(rows, make: Callable[..., Example]) -> list[Example]:
    """Apply `make` to each row, turning any defect into a TaskError that says where it is."""
    out = []
    for where, row in rows:
        try:
            out.append(make(row))
        except TaskError as e:
            raise TaskError(f"{where}: {e}") from None
        except KeyError as e:
            raise TaskError(f"{where}: missing field {e}") from None
        except (TypeError, ValueError, IndexError, AttributeError) as e:
            raise TaskError(f"{where}: malformed row ({type(e).__name__}: {e})") from None
    return out


def _unique(examples: list[Example]) -> list[Example]:
    # first example per input: tasks.split must not put the same input in pool and test
    seen: dict[str, Example] = {}
    for e in examples:
        seen.setdefault(e.input, e)
    return list(seen.values())


def _text(s) -> str:
    if not isinstance(s, str) or not s.strip():
        raise TaskError(f"expected a non-empty string, got {s!r}")
    return s.strip()


def _lettered(question: str, options) -> str:
    return _text(question) + "".join(
        f"\n{letter}. {str(o).strip()}" for letter, o in zip(LETTERS, options)
    )


# ----------------------------------------------------------------------------- loaders
def _sst2_example(sentence, label) -> Example:
    if str(label) not in ("0", "1"):
        raise TaskError(f"label {label!r} is not 0 or 1")
    return Example(_text(sentence), SST2_LABELS[int(label)], SST2_LABELS)


def _sst2(name, root):
    def read(split: str) -> list[Example]:
        if root is None:
            rows = _hub("sst2", "validation" if split == "dev" else split)
            return _examples(rows, lambda r: _sst2_example(r["sentence"], r["label"]))
        headers = [("text", "label"), ("sentence", "label")]  # the README's header; GLUE's own
        rows = _csv_rows(root / "sst2" / f"{split}.tsv", 2, headers, delimiter="\t")
        return _examples(rows, lambda r: _sst2_example(*r))

    return Task(name, read("dev"), read("train"))


def _clean_news(s: str) -> str:
    # the AG News CSV lost the '&' of numeric entities ("#39;" for "'", "#36;" for "$") and
    # writes line breaks as a backslash
    s = html.unescape(re.sub(r"#(\d+);", r"&#\1;", s))
    return " ".join(s.replace("\\", " ").split())


def _ag_news_example(text: str, label: int) -> Example:
    if not 0 <= label < 4:
        raise TaskError(f"class {label + 1} is not 1-4")
    return Example(_text(_clean_news(text)), AG_NEWS_CLASSES[label], AG_NEWS_CLASSES)


def _ag_news(name, root):
    if root is None:  # the hub's `text` is already title + " " + description; label is 0-based
        return Task(
            name,
            _examples(_hub("ag_news", "test"), lambda r: _ag_news_example(r["text"], r["label"])),
        )
    rows = _csv_rows(root / "ag_news" / "test.csv", 3)  # class (1-4), title, description
    # pool=None: tasks.split carves one out of the test rows
    return Task(
        name, _examples(rows, lambda r: _ag_news_example(f"{r[1].strip()}: {r[2]}", int(r[0]) - 1))
    )


def _mmlu_subjects(arg: str) -> tuple[str, ...]:
    if not arg:
        return MMLU_SUBJECTS
    if arg.lower() in _GROUP_BY_LOWER:
        return MMLU_GROUPS[_GROUP_BY_LOWER[arg.lower()]]
    if arg in MMLU_SUBJECTS:
        return (arg,)
    raise TaskError(
        f"unknown MMLU subject or group {arg!r}; groups: {', '.join(MMLU_GROUPS)}; "
        f"subjects: {', '.join(MMLU_SUBJECTS)}"
    )


def _mmlu_example(question, options, answer) -> Example:
    if len(options) != 4:
        raise TaskError(f"expected 4 choices, got {len(options)}")
    if str(answer).strip() not in ("0", "1", "2", "3"):
        raise TaskError(f"answer {answer!r} is not an index 0-3")
    return Example(_lettered(question, options), "ABCD"[int(answer)], tuple("ABCD"))


def _mmlu(name, root, subjects):
    header = [
        ("question", "choice0", "choice1", "choice2", "choice3", "answer")
    ]  # cais/mmlu export layout

    def split(kind: str) -> list[Example]:
        out = []
        for s in subjects:
            if root is None:
                rows = _hub("mmlu", kind, s)
                out += _examples(
                    rows, lambda r: _mmlu_example(r["question"], r["choices"], r["answer"])
                )
            else:
                rows = _csv_rows(root / "mmlu" / kind / f"{s}_{kind}.csv", 6, header)
                out += _examples(rows, lambda r: _mmlu_example(r[0], r[1:5], r[5]))
        return out

    return Task(name, split("test"), split("dev"))


def _csqa_example(row) -> Example:
    labels, texts = row["choices"]["label"], row["choices"]["text"]
    if not labels or len(labels) != len(texts):
        raise TaskError(f"choices has {len(labels)} labels but {len(texts)} texts")
    if row["answerKey"] not in labels:
        raise TaskError(f"answerKey {row['answerKey']!r} is not one of {labels}")
    return Example(_lettered(row["question"], texts), row["answerKey"], tuple(labels))


def _csqa(name, root):
    rows = (
        _hub("commonsense_qa", "validation")
        if root is None
        else _jsonl_rows(root / "commonsense_qa" / "validation.jsonl")
    )
    return Task(name, _unique(_examples(rows, _csqa_example)))


def _squad(name, root):
    if root is not None:
        path = root / _MARKER["squad"]
        if not path.is_file():
            raise TaskError(f"missing data file {path}")
        return Task(name, _unique(load_task_file(path).examples))

    # like the local fv-style file: context + question, keeping questions whose annotators agree
    def make(r):
        answers = set(r["answers"]["text"])
        if len(answers) == 1:
            return Example(f"{_text(r['context'])}\n{_text(r['question'])}", _text(answers.pop()))

    return Task(name, _unique([e for e in _examples(_hub("squad", "validation"), make) if e]))


def _json_names(base: Path, subdirs) -> list[str]:
    return sorted(p.stem for d in subdirs for p in (base / d).glob("*.json"))


def _find_json(name, base: Path, subdirs, family: str) -> Path:
    for d in subdirs:
        if (base / d / f"{name}.json").is_file():
            return base / d / f"{name}.json"
    valid = _json_names(base, subdirs)
    raise TaskError(
        f"unknown {family} task {name!r} under {base}; valid: {', '.join(valid) or '(none found)'}"
    )


def _fv(name, root, arg):
    path = _find_json(arg, root / "function_vectors" / "dataset_files", FV_DIRS, "fv")
    examples = _unique(load_task_file(path).examples)  # its errors name the file and item
    outputs = sorted({e.output for e in examples})
    if (
        len(outputs) <= MAX_CLOSED_SET
    ):  # sentiment, ag_news, person-sport, ...: score as a choice task
        examples = [Example(e.input, e.output, tuple(outputs)) for e in examples]
    return Task(name, examples)


def _lre(name, root, arg):
    path = _find_json(arg, root / "lre_relations" / "data", LRE_DIRS, "lre")
    try:
        samples = json.loads(read_text(path))["samples"]
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (KeyError, TypeError):
        raise TaskError(f'{path}: expected an object with a "samples" list') from None
    if not isinstance(samples, list) or not samples:
        raise TaskError(f'{path}: "samples" must be a non-empty list')
    rows = ((f"{path}, sample {i}", s) for i, s in enumerate(samples))
    return Task(
        name, _unique(_examples(rows, lambda s: Example(_text(s["subject"]), _text(s["object"]))))
    )
