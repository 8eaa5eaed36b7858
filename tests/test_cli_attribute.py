"""`attribution attribute`: JSON output, every option combination, one-line errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attribution.cli import build_parser, main
from attribution.influence import clear_cache

FAST = ["--train-draws", "2", "--query-draws", "2", "--factor-draws", "1", "--quiet", "--json"]
MEASUREMENTS = ["loss", "lt:500", "elbo", "elbo-large", "elbo-simple", "trajectory", "square-norm"]


def _attribute(capsys, *args):
    rc = main(["attribute", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _check_output(out: str, queries, top: int, n_train: int):
    data = json.loads(out)
    assert data["config"]
    assert [q["query"] for q in data["queries"]] == list(queries)
    influence = data["config"]["method"] in ("kfac", "ekfac")
    for q in data["queries"]:
        assert len(q["neutral"]) == min(top, n_train)
        if influence:  # the stability figures beside the galleries (two rounds of draws or more)
            st = q["stability"]
            assert st["rounds_done"] == st["rounds_total"] and not st["preview"]
            assert -1 <= st["split_half_spearman"] <= 1 and 0 <= st["expected_top_pos"] <= min(top, n_train)
        for kind in ("positive", "negative", "neutral"):
            for e in q[kind]:
                assert set(e) == ({"index", "score", "id", "label", "se", "rank_interval"} if influence
                                  else {"index", "score", "id", "label"})
                assert 0 <= e["index"] < n_train and math.isfinite(e["score"])
                if influence:
                    assert e["se"] >= 0 and 1 <= e["rank_interval"][0] <= e["rank_interval"][1] <= n_train
        assert all(e["score"] > 0 for e in q["positive"]) and all(e["score"] < 0 for e in q["negative"])
        assert [e["score"] for e in q["positive"]] == sorted((e["score"] for e in q["positive"]), reverse=True)
    return data


def test_every_measurement_and_variant_gives_finite_scores(micro_run, capsys):
    clear_cache()
    run = str(micro_run.path)
    for m in MEASUREMENTS:
        rc, out, err = _attribute(capsys, "--run", run, "--query", "0,2", "--measurement", m, "--top", "4", *FAST)
        assert rc == 0, err
        data = _check_output(out, [0, 2], 4, 16)
        assert data["config"]["measurement"] == m
    for method in ("kfac", "ekfac"):
        for fisher in ("mc", "empirical"):
            for kt in ("expand", "reduce"):
                rc, out, err = _attribute(capsys, "--run", run, "--query", "1", "--method", method, "--fisher", fisher,
                                          "--kfac", kt, "--measurement", "elbo", "--approx-measurement", "loss",
                                          "--damping", "1e-6", *FAST)
                assert rc == 0, err
                cfg = _check_output(out, [1], 16, 16)["config"]
                assert (cfg["method"], cfg["fisher"], cfg["kfac_type"], cfg["damping"]) == (method, fisher, kt, 1e-6)
                assert cfg["approx_measurement"] == "loss"


def test_pixel_baseline_through_the_cli(micro_run, capsys):
    rc, out, err = _attribute(capsys, "--run", str(micro_run.path), "--query", "0-1", "--method", "pixel", "--top", "3",
                              "--quiet", "--json")
    assert rc == 0, err
    assert _check_output(out, [0, 1], 3, 16)["config"]["method"] == "pixel"


@pytest.mark.parametrize("args, message", [
    (["--measurement", "nope"], "unknown measurement"),
    (["--measurement", "lt:5000"], "0..999"),
    (["--query", "7"], "out of range"),
    (["--query", "a,b"], "--query"),
    (["--samples", "missing"], "no sample set"),
    (["--damping", "-1"], "damping"),
])
def test_bad_input_gives_one_line_error(micro_run, capsys, args, message):
    rc, out, err = _attribute(capsys, "--run", str(micro_run.path), *FAST, *args)
    assert rc == 2 and out == ""
    assert err.startswith("error:") and message in err and err.strip().count("\n") == 0, err


def test_missing_run_one_line_error_in_a_real_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "attribution", "attribute", "--run", str(tmp_path / "none")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: no run directory") and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_help_explains_every_option():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    p = sub.choices["attribute"]
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    text = p.format_help()
    for opt in ("--run", "--samples", "--query", "--method", "--measurement", "--approx-measurement", "--fisher",
                "--kfac", "--damping", "--top", "--json"):
        assert opt in text


DEMO = Path(__file__).resolve().parents[1] / "demo" / "run"


@pytest.mark.slow
def test_demo_run_full_grid(tmp_path, capsys):
    """Every measurement x fisher x expand/reduce x kfac/ekfac on (a copy of) the shipped demo run."""
    if not (DEMO / "model").exists():
        pytest.skip("the demo run has no trained model")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "model", "samples"):
        src = DEMO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, run / name)
    clear_cache()
    for method in ("kfac", "ekfac"):
        for fisher in ("mc", "empirical"):
            for kt in ("expand", "reduce"):
                for m in MEASUREMENTS:
                    rc, out, err = _attribute(capsys, "--run", str(run), "--query", "0,5,15", "--method", method,
                                              "--fisher", fisher, "--kfac", kt, "--measurement", m, "--top", "8", *FAST)
                    assert rc == 0, (method, fisher, kt, m, err)
                    _check_output(out, [0, 5, 15], 8, 1000)
