"""The paper's claims across models (`adainfer claims`), and the check anyone can run:
`reproduce --report-only` rebuilds a committed report byte for byte."""

import json
import shutil
from pathlib import Path

import pytest

from adainfer.claims import (
    BEGIN,
    CLAIMS,
    END,
    FAILS,
    HOLDS,
    UNTESTABLE,
    claims_report,
    load_results,
    scale_table,
    shared_shots,
    splice,
)
from adainfer.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "report-qwen2.5-0.5b"  # make_report_fixture.py
REBUILT = ("tables.md", "results.json")  # compared byte for byte; the PNGs are not


def test_report_only_rebuilds_the_committed_report_byte_for_byte(tmp_path):
    copy = tmp_path / "report"
    shutil.copytree(FIXTURE, copy)
    for name in REBUILT:
        (copy / name).unlink()  # rebuilt, not left in place
    assert main(["reproduce", "--out-dir", str(copy), "--report-only"]) == 0
    for name in REBUILT:
        assert (copy / name).read_bytes() == (FIXTURE / name).read_bytes(), (
            f"{name} differs: if the report was meant to change, run "
            "tests/fixtures/make_report_fixture.py and re-run --report-only on results/*/"
        )


def test_every_claim_gets_a_verdict_and_its_number():
    results = load_results(FIXTURE)
    verdicts = {title: check(results) for title, check in CLAIMS}
    assert all(v.verdict in (HOLDS, FAILS, UNTESTABLE) and v.number for v in verdicts.values())
    inter_model = next(v for t, v in verdicts.items() if t.startswith("inter-model"))
    assert inter_model.verdict == UNTESTABLE  # the fixture has no --transfer-from
    # the fixture's SVM stops: the saving claim is decided by a number, not untestable
    saving = next(v for t, v in verdicts.items() if t.startswith("10-50%"))
    assert saving.verdict in (HOLDS, FAILS) and "SVM saves" in saving.number


def test_a_run_without_few_shot_cannot_test_the_few_shot_claims(tmp_path):
    results = json.loads((FIXTURE / "results.json").read_text())
    results["rows"] = [r for r in results["rows"] if r["shots"] == 0]
    results["layer_accuracy"] = [c for c in results["layer_accuracy"] if c["shots"] == 0]
    results["config"]["shots"] = [0]
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "results.json").write_text(json.dumps(results))
    zero = load_results(tmp_path / "zero")
    assert all(check(zero).verdict == UNTESTABLE for _, check in CLAIMS)


def test_the_claims_command_writes_its_block_into_a_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Results\n\n{BEGIN}\nold\n{END}\n\nmore text\n")
    out = tmp_path / "claims.md"
    args = ["claims", str(FIXTURE), str(FIXTURE), "--out", str(out), "--readme", str(readme)]
    assert main(args) == 0
    block = out.read_text()
    assert block == claims_report([FIXTURE, FIXTURE])
    assert readme.read_text() == f"# Results\n\n{BEGIN}\n{block}{END}\n\nmore text\n"
    assert "| claim | report-qwen2.5-0.5b | report-qwen2.5-0.5b |" in block
    for title in ("Table 1: model statistics", "the role of the paper's Table 5"):
        assert title in block
    with pytest.raises(ValueError, match="markers"):
        splice("no markers here", block)


def test_the_scale_table_compares_models_at_the_k_they_share(tmp_path):
    """A run with more k averages them where a run with fewer cannot: the scale table keeps
    the k every run has, so the models differ by model alone."""
    results = json.loads((FIXTURE / "results.json").read_text())
    kept = max(results["config"]["shots"])
    more = {**results, "config": {**results["config"], "shots": [0, kept, kept + 5]}}
    more["rows"] = results["rows"] + [  # a worse k the narrow run lacks
        {**r, "shots": kept + 5, "accuracy": 0.0} for r in results["rows"] if r["shots"] == kept
    ]
    for name, data in (("narrow", results), ("wide", more)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
    narrow, wide = load_results(tmp_path / "narrow"), load_results(tmp_path / "wide")
    assert shared_shots([wide, narrow]) == [kept]
    rows = scale_table([wide, narrow]).splitlines()[2:]
    assert rows[0].split("|")[2:] == rows[1].split("|")[2:]  # only the folder differs
    assert scale_table([wide]).splitlines()[2] != rows[0]  # alone, it averages both k
    assert f"(k = {kept})" in claims_report([tmp_path / "wide", tmp_path / "narrow"])
