"""Benchmark loaders: the real data files, malformed files, names, data-dir resolution, hub path."""

import json
import sys
import types
from collections import Counter

import pytest

from adainfer.benchmarks import (
    ENV_VAR,
    MMLU_GROUPS,
    MMLU_SUBJECTS,
    is_benchmark,
    list_benchmarks,
    load_benchmark,
)
from adainfer.taskdata import TaskError
from adainfer.tasks import load_task, task_queries
from conftest import SHARED_DATA, char_tokenizer

real = pytest.mark.skipif(
    not (SHARED_DATA / "README.md").is_file(), reason="shared benchmark data absent"
)


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)  # each test picks its data source explicitly


def load(name):
    return load_benchmark(name, SHARED_DATA)


def gold_in_choices(task):
    return all(e.choices and e.output in e.choices for e in task.examples + (task.pool or []))


# ----------------------------------------------------------------------------- real files
@real
def test_sst2_real():
    task = load("sst2")
    assert len(task) == 872 and len(task.pool) == 67349 and gold_in_choices(task)
    assert Counter(e.output for e in task.examples) == {"positive": 444, "negative": 428}
    assert (
        task.examples[0].input == "it 's a charming and often affecting journey ."
    )  # trailing space stripped
    assert not {e.input for e in task.examples} & {e.input for e in task.pool}


@real
def test_ag_news_real():
    task = load("ag_news")
    assert len(task) == 7600 and task.pool is None and gold_in_choices(task)
    assert Counter(e.output for e in task.examples) == dict.fromkeys(
        ["World", "Sports", "Business", "Sci/Tech"], 1900
    )
    assert task.examples[0] == load("ag_news").examples[0]
    assert task.examples[0].input.startswith(
        "Fears for T N pension after talks: Unions representing"
    )
    text = "\n".join(e.input for e in task.examples)
    assert "\\" not in text and "#39;" not in text and "  " not in text and "$10 million" in text


@real
def test_mmlu_real():  # its load time is a benchmark's business, not a unit test's
    task = load("mmlu")
    assert len(task) == 14042 and len(task.pool) == 285 and gold_in_choices(task)
    for e in (
        task.examples + task.pool
    ):  # options follow the question in order (2 options span lines)
        marks = [e.input.rfind(f"\n{letter}. ") for letter in "ABCD"]
        assert 0 < marks[0] < marks[1] < marks[2] < marks[3]
    anatomy = load("mmlu:anatomy")
    assert len(anatomy) == 135 and len(anatomy.pool) == 5
    assert anatomy.examples[0].output == "A"  # answer index 0
    assert anatomy.examples[1].input.startswith('A "dished face" profile')  # CSV quotes undone


@real
def test_mmlu_groups_cover_every_subject_once():
    subjects = [s for group in MMLU_GROUPS.values() for s in group]
    assert len(subjects) == len(set(subjects)) == 57 and set(subjects) == set(MMLU_SUBJECTS)
    assert sorted(
        p.name[: -len("_test.csv")] for p in (SHARED_DATA / "mmlu" / "test").glob("*.csv")
    ) == sorted(subjects)
    assert set(MMLU_GROUPS) == {"STEM", "humanities", "social_sciences", "other"}
    groups = [load(f"mmlu:{g}") for g in MMLU_GROUPS]
    assert sum(len(t) for t in groups) == 14042 and sum(len(t.pool) for t in groups) == 285
    assert all(len(t.pool) == 5 * len(MMLU_GROUPS[t.name[5:]]) for t in groups)
    assert load("mmlu:stem").examples == groups[0].examples  # group names are case-insensitive


@real
def test_commonsense_qa_and_squad_real():
    csqa = load("commonsense_qa")
    assert len(csqa) == 1221 and csqa.pool is None and gold_in_choices(csqa)
    assert all(e.choices == tuple("ABCDE") and e.input.count("\n") == 5 for e in csqa.examples)
    squad = load("squad")
    assert (
        4900 < len(squad) <= 4945 and squad.pool is None
    )  # repeated (context, question) pairs dropped
    assert all(e.output in e.input and not e.choices for e in squad.examples)


@real
def test_every_fv_and_lre_task_loads():
    names = list_benchmarks(SHARED_DATA)
    fv, lre = [n for n in names if n.startswith("fv:")], [n for n in names if n.startswith("lre:")]
    assert (
        len(fv) == 50
        and len(lre) == 39
        and "fv:conll2003_person" in fv
        and "lre:adj_antonym" in lre
    )
    assert {f"mmlu:{s}" for s in MMLU_SUBJECTS} <= set(names) and "squad" in names
    for name in fv + lre:
        task = load(name)
        assert len(task) >= 10 and task.pool is None, name
        assert len({e.input for e in task.examples}) == len(task), name  # duplicates dropped
        if task.examples[0].choices:
            assert len(task.examples[0].choices) <= 10 and gold_in_choices(task), name
    assert load("fv:sentiment").examples[0].choices == ("negative", "positive")
    assert load("fv:person-sport").examples[0].choices == (
        "baseball",
        "basketball",
        "football",
        "hockey",
        "soccer",
    )
    assert (
        load("fv:antonym").examples[0].choices == ()
        and load("lre:name_gender").examples[0].choices == ()
    )
    city = load("lre:city_in_country").examples[0]
    assert (city.input, city.output) == ("New York City", "United States")


@real
def test_sst2_test_queries_never_leak_into_training():
    train, test = task_queries(
        char_tokenizer(), ["sst2"], shots=5, n_train=10, n_test=10, data_dir=SHARED_DATA
    )
    assert len(train) == len(test) == 10
    test_inputs = {q.prompt.rsplit("Q: ", 1)[1][: -len("\nA:")] for q in test}
    dev = {e.input for e in load("sst2").examples}
    assert test_inputs <= dev
    for q in train + test:  # neither a training query nor any demonstration is a test query
        shown = q.prompt if q in train else q.prompt.rsplit("Q: ", 1)[0]
        assert not any(f"Q: {x}\nA:" in shown for x in test_inputs)
    assert all(
        q.answer in ("negative", "positive") and len(q.choice_tokens) == 2 for q in train + test
    )


# ----------------------------------------------------------------------------- malformed files
def write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def mini_data(root):
    """A tiny data dir in the real layout."""
    write(root, "sst2/dev.tsv", "text\tlabel\ngood \t1\nbad\t0\n")
    write(root, "sst2/train.tsv", 'sentence\tlabel\nfine\t1\nawful\t0\nmeh "quoted\t0\n')
    write(
        root,
        "ag_news/test.csv",
        '"2","Title, with comma","Body \\with ""quotes"" #36;5"\n"1","T","D"\n',
    )
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    for s in MMLU_SUBJECTS:
        write(root, f"mmlu/test/{s}_test.csv", header + '"Q, one?",a,b,c,d,3\n')
        write(root, f"mmlu/dev/{s}_dev.csv", header + "Q dev?,a,b,c,d,0\n")
    row = {
        "question": "Where?",
        "choices": {"label": list("ABC"), "text": ["x", "y", "z"]},
        "answerKey": "B",
    }
    write(root, "commonsense_qa/validation.jsonl", json.dumps(row) + "\n")
    write(
        root, "squad/squad_val_fv_style.json", json.dumps([{"input": "ctx\nq?", "output": "ctx"}])
    )
    write(
        root,
        "function_vectors/dataset_files/extractive/pick.json",
        json.dumps(
            [
                {"input": "a b", "output": ["a", "b"]},
                {"input": "c d", "output": "c"},
                {"input": "a b", "output": "b"},
            ]
        ),
    )
    write(
        root,
        "lre_relations/data/factual/capital.json",
        json.dumps({"name": "capital", "samples": [{"subject": "France", "object": "Paris"}]}),
    )
    return root


def test_mini_data_dir_parses(tmp_path):
    root = mini_data(tmp_path)
    sst2 = load_benchmark("sst2", root)
    assert [(e.input, e.output) for e in sst2.examples] == [
        ("good", "positive"),
        ("bad", "negative"),
    ]
    assert sst2.pool[2].input == 'meh "quoted'  # TSV quotes are literal text
    ag = load_benchmark("ag_news", root).examples
    assert (ag[0].input, ag[0].output) == ('Title, with comma: Body with "quotes" $5', "Sports")
    mmlu = load_benchmark("mmlu:anatomy", root)
    assert (
        mmlu.examples[0].input == "Q, one?\nA. a\nB. b\nC. c\nD. d"
        and mmlu.examples[0].output == "D"
    )
    csqa = load_benchmark("commonsense_qa", root).examples[0]
    assert (csqa.input, csqa.output, csqa.choices) == (
        "Where?\nA. x\nB. y\nC. z",
        "B",
        ("A", "B", "C"),
    )
    pick = load_benchmark("fv:pick", root).examples  # list output -> first; repeated input dropped
    assert [(e.output, e.choices) for e in pick] == [("a", ("a", "c")), ("c", ("a", "c"))]
    assert load_benchmark("lre:capital", root).examples[0].output == "Paris"
    assert list_benchmarks(root)[-2:] == ["fv:pick", "lre:capital"]


@pytest.mark.parametrize(
    "rel, text, name, where, what",
    [
        (
            "sst2/dev.tsv",
            "text\tlabel\ngood\t1\nbad\t0\textra\n",
            "sst2",
            "line 3",
            "expected 2 columns, got 3",
        ),
        ("sst2/dev.tsv", "text\tlabel\ngood\t2\n", "sst2", "line 2", "not 0 or 1"),
        ("sst2/dev.tsv", "good\t1\n", "sst2", "line 1", "expected a header"),
        (
            "ag_news/test.csv",
            '"1","a","b"\n"2","only two"\n',
            "ag_news",
            "line 2",
            "expected 3 columns",
        ),
        ("ag_news/test.csv", '"5","a","b"\n', "ag_news", "line 1", "class 5 is not 1-4"),
        (
            "mmlu/test/anatomy_test.csv",
            "question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,0\nq,a,b,c,d,4\n",
            "mmlu:anatomy",
            "line 3",
            "answer '4' is not an index 0-3",
        ),
        (
            "mmlu/dev/anatomy_dev.csv",
            "question,choice0,choice1,choice2,choice3,answer\n",
            "mmlu",
            "anatomy_dev.csv",
            "no data rows",
        ),
        (
            "commonsense_qa/validation.jsonl",
            '{"question": "q", "choices": {"label": ["A"], "text": ["x"]}}\n',
            "commonsense_qa",
            "line 1",
            "missing field 'answerKey'",
        ),
        (
            "commonsense_qa/validation.jsonl",
            '\n{"question": "q",\n',
            "commonsense_qa",
            "line 2",
            "not valid JSON",
        ),
        (
            "function_vectors/dataset_files/extractive/pick.json",
            '[{"input": "a"}]',
            "fv:pick",
            "item 0",
            "output",
        ),
        (
            "lre_relations/data/factual/capital.json",
            '{"samples": [{"subject": "x", "object": "y"}, {"subject": "z"}]}',
            "lre:capital",
            "sample 1",
            "missing field 'object'",
        ),
    ],
)
def test_malformed_files_name_file_and_row(tmp_path, rel, text, name, where, what):
    root = mini_data(tmp_path)
    path = write(root, rel, text)
    with pytest.raises(TaskError) as err:
        load_benchmark(name, root)
    assert str(path) in str(err.value) and where in str(err.value) and what in str(err.value)


def test_missing_files_are_named(tmp_path):
    root = mini_data(tmp_path)
    (root / "mmlu/test/virology_test.csv").unlink()
    with pytest.raises(TaskError, match="missing data file .*virology_test.csv"):
        load_benchmark("mmlu:other", root)
    assert load_benchmark("mmlu:STEM", root)  # other subjects still load
    (root / "sst2/dev.tsv").unlink()
    assert "sst2" not in list_benchmarks(root)
    with pytest.raises(TaskError, match="missing data file"):
        load_benchmark("sst2", root)


# ----------------------------------------------------------------------------- names
def test_unknown_names_list_the_valid_ones(tmp_path):
    root = mini_data(tmp_path)
    assert is_benchmark("sst2") and is_benchmark("mmlu:whatever") and is_benchmark("fv:x")
    assert not is_benchmark("capitalize") and not is_benchmark("mmlu_anatomy")
    with pytest.raises(
        TaskError, match="unknown MMLU subject .*'astrology'.*STEM.*abstract_algebra"
    ):
        load_benchmark("mmlu:astrology", root)
    with pytest.raises(TaskError, match="unknown fv task 'nope'.*valid: pick"):
        load_benchmark("fv:nope", root)
    with pytest.raises(TaskError, match="unknown lre task 'nope'.*valid: capital"):
        load_benchmark("lre:nope", root)
    with pytest.raises(TaskError, match="unknown benchmark 'imdb'.*sst2, ag_news, mmlu"):
        load_benchmark("imdb", root)
    with pytest.raises(TaskError, match="unknown task 'imdb'"):
        load_task("imdb", root)
    assert load_task("mmlu:anatomy", root).pool  # load_task routes benchmark names here


# ----------------------------------------------------------------------------- data dir resolution
def test_data_dir_from_env_var_and_argument(tmp_path, monkeypatch):
    env_root, arg_root = mini_data(tmp_path / "env"), mini_data(tmp_path / "arg")
    write(arg_root, "sst2/dev.tsv", "text\tlabel\nfrom arg\t1\n")
    monkeypatch.setenv(ENV_VAR, str(env_root))
    assert load_benchmark("sst2").examples[0].input == "good"
    assert load_benchmark("sst2", arg_root).examples[0].input == "from arg"  # the argument wins
    assert "fv:pick" in list_benchmarks()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(TaskError, match=f"nowhere does not exist .*{ENV_VAR}"):
        load_benchmark("sst2")


def test_without_data_dir_the_hub_error_says_what_to_do(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "datasets", None
    )  # `import datasets` fails: nothing touches the network
    with pytest.raises(TaskError, match=f"--data-dir or set {ENV_VAR}.*pip install datasets"):
        load_benchmark("sst2")

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(
        TaskError,
        match=f"cais/mmlu .*ConnectionError: hub unreachable.*--data-dir or set {ENV_VAR}",
    ):
        load_benchmark("mmlu:anatomy")
    with pytest.raises(TaskError, match="no Hugging Face hub copy; pass --data-dir"):
        load_benchmark("fv:antonym")
    assert "fv:antonym" not in list_benchmarks() and "mmlu:virology" in list_benchmarks()


def test_hub_rows_are_formatted_like_local_files(monkeypatch):
    rows = {  # the hub datasets' own field layouts
        ("nyu-mll/glue", "validation"): [{"sentence": "nice ", "label": 1, "idx": 0}],
        ("nyu-mll/glue", "train"): [{"sentence": "dull", "label": 0, "idx": 0}],
        ("fancyzhx/ag_news", "test"): [{"text": "Wall St. #39;s day\\Stocks rose.", "label": 2}],
        ("cais/mmlu", "test"): [
            {"question": "Q?", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": 1}
        ],
        ("cais/mmlu", "dev"): [
            {"question": "D?", "subject": "x", "choices": ["a", "b", "c", "d"], "answer": 0}
        ],
        ("tau/commonsense_qa", "validation"): [
            {
                "id": "1",
                "question": "Q?",
                "question_concept": "c",
                "choices": {"label": list("AB"), "text": ["x", "y"]},
                "answerKey": "A",
            }
        ],
        ("rajpurkar/squad", "validation"): [
            {
                "context": "Paris is big.",
                "question": "What?",
                "answers": {"text": ["Paris", "Paris"], "answer_start": [0, 0]},
            },
            {
                "context": "Paris is big.",
                "question": "Why?",
                "answers": {"text": ["big", "is big"], "answer_start": [9, 6]},
            },
        ],
    }
    calls = []

    def load_dataset(hub_id, config=None, split=None):
        calls.append((hub_id, config, split))
        return rows[hub_id, split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    sst2 = load_benchmark("sst2")
    assert (sst2.examples[0].input, sst2.examples[0].output, sst2.pool[0].output) == (
        "nice",
        "positive",
        "negative",
    )
    assert load_benchmark("ag_news").examples[0].input == "Wall St. 's day Stocks rose."
    assert load_benchmark("ag_news").examples[0].output == "Business"
    mmlu = load_benchmark("mmlu:anatomy")
    assert (mmlu.examples[0].output, mmlu.pool[0].output) == ("B", "A") and (
        "cais/mmlu",
        "anatomy",
        "test",
    ) in calls
    assert load_benchmark("commonsense_qa").examples[0].input == "Q?\nA. x\nB. y"
    squad = load_benchmark(
        "squad"
    ).examples  # only questions whose annotators agree, as in the local file
    assert [(e.input, e.output) for e in squad] == [("Paris is big.\nWhat?", "Paris")]
    assert ("nyu-mll/glue", "sst2", "validation") in calls


@pytest.mark.parametrize(
    "rel, name, data, where, what",
    [
        ("sst2/dev.tsv", "sst2", b"text\tlabel\ngood\t1\nna\xefve\t1\n", "line 3", "not UTF-8"),
        (
            "commonsense_qa/validation.jsonl",
            "commonsense_qa",
            b'{"question": "\xff"}\n',
            "line 1",
            "not UTF-8",
        ),
        (
            "lre_relations/data/factual/capital.json",
            "lre:capital",
            b'{"samples": [\n{"subject": "\xe9"}]}',
            "line 2",
            "not UTF-8",
        ),
        (
            "ag_news/test.csv",
            "ag_news",
            b'"1","a","b"\n"2","unterminated,"b"\n',
            "line 2",
            "malformed CSV",
        ),
    ],
)
def test_undecodable_or_broken_files_name_file_and_line(tmp_path, rel, name, data, where, what):
    root = mini_data(tmp_path)
    path = root / rel
    path.write_bytes(data)
    with pytest.raises(TaskError) as err:
        load_benchmark(name, root)
    assert str(path) in str(err.value) and where in str(err.value) and what in str(err.value)
