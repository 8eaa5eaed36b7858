"""The CLI: train, sample, info; bad input is one line on stderr with exit code 2."""

import json

from attribution.cli import main


def test_train_sample_info(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--limit", "8", "--resolution", "8", "--preset", "micro", "--steps", "2",
                 "--batch-size", "4", "--out", str(out)]) == 0
    assert main(["sample", "--run", str(out), "-n", "2", "--seed", "1", "--trajectory", "--name", "q"]) == 0
    capsys.readouterr()
    assert main(["info", "--run", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trained"] and info["samples"] == ["q"]
    assert info["config"]["dataset"]["limit"] == 8


def test_bad_input_is_one_line(tmp_path, capsys):
    cases = [
        ["sample", "--run", str(tmp_path / "missing")],
        ["train", "--dataset", "npz", "--data-path", str(tmp_path / "x.npz"), "--out", str(tmp_path / "r")],
        ["train", "--classes", "a,b", "--out", str(tmp_path / "r2")],
        ["train", "--steps", "0", "--out", str(tmp_path / "r3")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err


def test_help_explains_options(capsys):
    import pytest

    for cmd in ("train", "sample"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "--seed" in text and "default" in text
