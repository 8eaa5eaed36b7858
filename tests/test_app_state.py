"""The app's streamlit-free helpers: uploads (decompression bombs), readable LDS-page labels, the
command behind a ground truth, heatmap colour ranges, the shipped runs, and what git ignores."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from attribution.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_upload_of_a_decompression_bomb_is_a_clear_error():
    from attribution.app_state import validate_upload
    from pngs import bomb_png

    data = bomb_png(20000)
    assert len(data) < 5 * 2**20  # small enough to pass the size check: the pixels are the problem
    with pytest.raises(UserError, match=r"'bomb.png' is far too large \(400,000,000 pixels\); upload an image at "
                                        r"most 2048 px on a side"):
        validate_upload(data, "bomb.png", 1, 16)
    # over the side limit but under PIL's bomb limit: rejected from its header, before decoding
    with pytest.raises(UserError, match="'big.png' is 3000x3000 px; upload an image at most 2048 px"):
        validate_upload(bomb_png(3000), "big.png", 1, 16)
    # between PIL's warning and error limits (a DecompressionBombWarning): the same clear error
    with pytest.raises(UserError, match="far too large"):
        validate_upload(bomb_png(10000), "warn.png", 1, 16)
    x = validate_upload(bomb_png(64), "ok.png", 1, 16)  # a real, decodable image of the same kind
    assert x.shape == (1, 1, 16, 16) and float(x.max()) == -1.0


@pytest.mark.parametrize("name, label", [
    ("K-FAC mc expand (1e-8)", "K-FAC (damping 1e-8)"),
    ("EK-FAC empirical reduce (1e-4)", "EK-FAC, empirical Fisher, reduce (damping 1e-4)"),
    ("K-FAC mc expand", "K-FAC"),
    ("D-TRAK (best, rel 1)", "D-TRAK (best damping)"),
    ("TRAK (best, rel 0.1)", "TRAK (best damping)"),
    ("pixel cosine", "pixel cosine"),
    ("random", "random (control)"),
])
def test_readable_method_labels(name, label):
    from attribution.app_state import method_note, readable_method

    assert readable_method(name) == label
    assert (method_note(name) is not None) == ("best" in name)


def test_lds_command_is_the_one_that_built_the_ground_truth():
    from attribution.app_state import lds_command

    meta = {"num_subsets": 32, "num_seeds": 2, "alpha": 0.5, "subset_seed": 0, "steps": 500, "steps_rule": "explicit",
            "warmup_steps": 50, "query_set": "queries", "num_draws": 128, "measure_seed": 0, "measurement": "loss",
            "paired_seeds": True}
    assert lds_command("demo/run", meta, {"warmup_steps": 100}) == (
        "attribution lds --run demo/run --subsets 32 --seeds 2 --steps 500 --warmup-steps 50 --draws 128 "
        "--measurements loss")
    other = {**meta, "steps_rule": "alpha * run steps", "warmup_steps": 100, "alpha": 0.25, "paired_seeds": False,
             "measurement": "lt:499", "query_set": "mine"}
    assert lds_command("r", other, {"warmup_steps": 100}) == (
        "attribution lds --run r --subsets 32 --seeds 2 --alpha 0.25 --query-set mine --draws 128 "
        "--measurements lt:499 --independent-seeds")


def test_lds_command_matches_the_shipped_demo_truth():
    """The shipped demo's loss ground truth was built with 500-step models (the old page said 100)."""
    from attribution.app_state import lds_command
    from attribution.evaluation import list_ground_truth
    from attribution.runs import DEMO_RUN, Run

    rows = [r for r in list_ground_truth(Run(DEMO_RUN)) if r["measurement"] == "loss" and r["num_seeds"] == 2]
    if not rows:
        pytest.skip("the shipped demo run has no loss ground truth with 2 seeds")
    assert "--steps 500 --warmup-steps 50 --draws 128" in lds_command("demo/run", rows[0], Run(DEMO_RUN).config["train"])


def test_heat_range_spans_the_off_diagonal():
    from attribution.app_state import heat_range

    m = np.array([[1.0, 0.991, 0.995], [0.991, 1.0, 0.998], [0.995, 0.998, 1.0]])
    assert heat_range(m) == (0.991, 0.998)
    assert heat_range(m, diagonal=True) == (0.991, 1.0)
    lo, hi = heat_range(np.ones((2, 2)))
    assert lo < 1.0 < hi


def test_shipped_runs_come_first_demo_run_the_default(tmp_path, monkeypatch):
    import attribution.runs as runs
    from attribution.app_state import available_runs

    demo = tmp_path / "demo"
    for name in ("run", "cifar2", "half-made"):
        (demo / name).mkdir(parents=True)
    for name in ("run", "cifar2"):
        (demo / name / "config.json").write_text("{}")
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "config.json").write_text("{}")
    monkeypatch.setattr(runs, "DEMO_RUN", demo / "run")
    monkeypatch.delenv("ATTRIBUTION_RUN", raising=False)
    assert runs.list_runs(tmp_path / "runs") == [demo / "run", demo / "cifar2", tmp_path / "runs" / "mine"]
    monkeypatch.setenv("ATTRIBUTION_RUNS", str(tmp_path / "runs"))
    assert available_runs()[:2] == [demo / "run", demo / "cifar2"]
    shutil.rmtree(demo / "run")
    assert runs.shipped_runs() == [demo / "cifar2"]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git work tree")
@pytest.mark.parametrize("path, ignored", [
    ("demo/run/samples/upload-0123abcd.safetensors", True),
    ("demo/cifar2/samples/seed7_n8.safetensors", True),
    ("demo/run/samples/queries.safetensors", False),
    ("demo/cifar2/samples/queries.safetensors", False),
    ("demo/run/jobs/sample-abc.json", True),
    ("demo/cifar2/artifacts/grad_store/x/store.bin", True),
    ("demo/run/lds/cf-14cb24d1390d/kfac_q0_seed_0_0123456789/model/config.json", True),
    ("demo/run/lds/cf-14cb24d1390d/regen_0123456789.json", False),
    ("demo/run/lds/cf-14cb24d1390d/regen_0123456789.safetensors", False),
    ("demo/run/lds/cf-14cb24d1390d/regen_0123456789.progress_0of2.json", True),
    ("demo/cifar2/lds/cf-0123/report_0123.json", False),
])
def test_git_ignores_user_made_files_in_the_shipped_runs(path, ignored):
    """Uploads and new sample sets do not dirty the work tree; the shipped results stay tracked."""
    rc = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode
    assert (rc == 0) == ignored, path


def test_run_labels_are_unique_and_shipped_runs_keep_their_short_labels(tmp_path):
    """The run picker's URL value is its label: two runs with one name must not share it (a
    pinned copy named like a shipped run was silently swapped for the shipped one on rerun)."""
    from attribution.app_state import run_labels
    from attribution.runs import shipped_runs

    shipped = shipped_runs()
    copy_of_cifar2 = tmp_path / "copy" / "cifar2"
    mine = tmp_path / "runs" / "mine"
    other_mine = tmp_path / "elsewhere" / "mine"
    a_run = tmp_path / "pinned" / "run"
    paths = [copy_of_cifar2, *shipped, mine, other_mine, a_run]
    labels = run_labels(paths)
    assert len(set(labels)) == len(labels), labels
    by_path = dict(zip(paths, labels))
    for p in shipped:  # shared links name the shipped runs by their short labels
        assert by_path[p] == (p.name if p.name != "run" else f"{p.parent.name}/run")
    if any(p.name == "cifar2" for p in shipped):
        assert by_path[copy_of_cifar2] == f"cifar2 ({copy_of_cifar2.parent.resolve()})"
    assert by_path[mine] == f"mine ({mine.parent.resolve()})" and by_path[other_mine].startswith("mine (")
    assert by_path[a_run] == "pinned/run"
    # no clash: just the name
    assert run_labels([mine]) == ["mine"]
    # same name and same parent name in different places: told apart by their parents' full paths
    twins = [tmp_path / "a" / "x" / "r", tmp_path / "b" / "x" / "r"]
    assert run_labels(twins) == [f"r ({twins[0].parent.resolve()})", f"r ({twins[1].parent.resolve()})"]
