"""Tasks: built-in rule tasks, task files with clear errors, prompts, splits, gold tokens."""

import json

import pytest

from adainfer.taskdata import Example, TaskError
from adainfer.tasks import (
    RULE_TASKS,
    answer_token,
    build_prompt,
    few_shot_prompts,
    held_out_indices,
    load_task,
    split,
    task_queries,
)
from conftest import SHARED_DATA, char_tokenizer


def test_rule_tasks_are_generated_and_correct():
    cap = load_task("capitalize")
    assert len(cap) > 200 and all(e.output == e.input.capitalize() for e in cap.examples)
    last = load_task("last_item")
    assert all(e.output == e.input.split(", ")[-1] for e in last.examples)
    assert set(RULE_TASKS) >= {"capitalize", "lowercase", "first_item", "last_item"}


def test_prompt_template_is_the_papers():
    demos = [Example("a", "A"), Example("b", "B")]
    assert build_prompt("c", demos) == "Q: a\nA: A\n\nQ: b\nA: B\n\nQ: c\nA:"
    assert build_prompt("c") == "Q: c\nA:"


def test_split_is_disjoint_and_seeded():
    task = load_task("capitalize")
    pool, test = split(task, 30, seed=1)
    assert len(test) == 30 and not {e.input for e in pool} & {e.input for e in test}
    assert split(task, 30, seed=1)[1] == test and split(task, 30, seed=2)[1] != test


def test_a_query_never_appears_among_its_own_demonstrations():
    task = load_task("first_item")
    pool = task.examples[:50]
    prompts = few_shot_prompts(pool[:20], pool, k=10, seed=3)
    for q, p in zip(pool[:20], prompts):
        demos = p.split("\n\n")[:-1]
        assert f"Q: {q.input}\n" not in "\n\n".join(demos) + "\n"
        assert p.endswith(f"Q: {q.input}\nA:") and len(demos) == 10
    assert few_shot_prompts(pool[:20], pool, k=10, seed=3) == prompts


def test_train_and_test_queries_do_not_overlap():
    tok = char_tokenizer()
    train, test = task_queries(
        tok, ["capitalize", "last_item"], shots=3, n_train=20, n_test=10, seed=0
    )
    assert len(train) == 40 and len(test) == 20
    test_inputs = {q.prompt.rsplit("Q: ", 1)[1] for q in test}
    for q in train:  # no test query is a training query or any training demonstration
        assert not any(f"Q: {x}" in q.prompt for x in test_inputs)
    assert len({q.id for q in train + test}) == 60


@pytest.mark.parametrize(
    "name", ["capitalize", "sst2"]
)  # split from the task, and the task's own pool
def test_held_out_indices_name_the_test_queries(name):
    if name == "sst2" and not SHARED_DATA.exists():
        pytest.skip("shared data folder not present")
    task = load_task(name, SHARED_DATA)
    _, test = task_queries(
        char_tokenizer(), [name], shots=2, n_train=0, n_test=12, seed=5, data_dir=SHARED_DATA
    )
    idx = held_out_indices(task, 12, seed=5)
    assert len(set(idx)) == 12
    assert [q.prompt.rsplit("Q: ", 1)[1] for q in test] == [
        f"{task.examples[i].input}\nA:" for i in idx
    ]
    assert held_out_indices(task, 12, seed=6) != idx


def test_gold_is_the_first_token_of_the_answer():
    tok = char_tokenizer()  # one token per character: " Apple" -> " "
    assert answer_token(tok, "Q: apple\nA:", "Apple") == tok.convert_tokens_to_ids(" ")


def test_task_files_json_and_jsonl(tmp_path):
    j = tmp_path / "t.json"
    j.write_text(json.dumps([{"input": "x", "output": "y"}, {"input": "u", "output": ["v", "w"]}]))
    assert [e.output for e in load_task(str(j)).examples] == ["y", "v"]
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"input": "x", "output": "y"}\n\n{"input": "u", "output": "v"}\n')
    assert len(load_task(str(jl))) == 2


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"input": "x", "output": "y"}\n{"input": "x"\n', "line 2: not valid JSON"),
        (
            "bad.jsonl",
            '{"input": "x", "output": "y"}\n{"inp": "x", "output": "y"}\n',
            "line 2: each item needs",
        ),
        (
            "bad.json",
            '[{"input": "x", "output": "y"}, {"input": "", "output": "y"}]',
            "item 1: .* non-empty",
        ),
        ("bad.json", '{"input": "x"}', "expected a JSON list"),
        ("bad.json", "[1, 2", "not valid JSON"),
        ("bad.json", "[]", "no examples"),
    ],
)
def test_malformed_task_files_name_the_item_at_fault(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        load_task(str(path))


def test_task_file_in_another_encoding_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        '{"input": "x", "output": "y"}\n{"input": "café", "output": "y"}\n'.encode("latin-1")
    )
    with pytest.raises(
        TaskError, match=r"latin1.jsonl, line 2: not UTF-8 .*save the file as UTF-8"
    ):
        load_task(str(path))


def test_unknown_task_lists_the_builtin_ones():
    with pytest.raises(TaskError, match="capitalize"):
        load_task("no_such_task")


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data folder not present")
def test_real_function_vector_file_loads():
    task = load_task(str(SHARED_DATA / "function_vectors/dataset_files/abstractive/antonym.json"))
    assert len(task) > 100 and task.examples[0].input and task.examples[0].output


def test_read_prompts_from_text_json_and_jsonl(tmp_path):
    from adainfer.taskdata import TaskError, read_prompts

    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    (tmp_path / "p.json").write_text('["a\\nb", {"prompt": "c"}]')
    (tmp_path / "p.jsonl").write_text('"x"\n{"prompt": "y\\nz"}\n')
    assert read_prompts(tmp_path / "p.txt") == ["one", "two"]
    assert read_prompts(tmp_path / "p.json") == ["a\nb", "c"]
    assert read_prompts(tmp_path / "p.jsonl") == ["x", "y\nz"]
    (tmp_path / "bad.json").write_text('[{"text": "no prompt"}]')
    with pytest.raises(TaskError, match="prompt"):
        read_prompts(tmp_path / "bad.json")
    with pytest.raises(TaskError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_python_prompts_are_code_with_docstrings():
    from adainfer.taskdata import python_prompts

    prompts = python_prompts(20)
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert all(p.startswith("def ") and p.rstrip().endswith('"""') for p in prompts)
    assert python_prompts(20, seed=1) != prompts
