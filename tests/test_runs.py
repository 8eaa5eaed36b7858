"""Run directories: atomic writes, config hashing, mismatched / corrupt artifacts."""

import json

import pytest
import torch

from attribution.errors import UserError
from attribution.runs import Run, config_hash, load_tensors, open_run, read_json, save_tensors, write_json


def test_config_hash_is_order_independent():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_tensors_roundtrip_and_corruption(tmp_path):
    p = tmp_path / "x.safetensors"
    save_tensors(p, {"a": torch.arange(6.0).view(2, 3)}, {"note": "hi"})
    tensors, meta = load_tensors(p)
    torch.testing.assert_close(tensors["a"], torch.arange(6.0).view(2, 3))
    assert meta == {"note": "hi"}
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left behind
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(UserError, match="corrupt"):
        load_tensors(p)
    with pytest.raises(UserError, match="missing artifact"):
        load_tensors(tmp_path / "nope.safetensors")


def test_json_corrupt(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    (tmp_path / "a.json").write_text("{broken")
    with pytest.raises(UserError, match="corrupt"):
        read_json(tmp_path / "a.json")


def test_open_run_errors(tmp_path):
    with pytest.raises(UserError, match="no run directory"):
        open_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run directory"):
        open_run(tmp_path / "empty")
    write_json(tmp_path / "untrained" / "config.json", {})
    with pytest.raises(UserError, match="no trained model"):
        open_run(tmp_path / "untrained").load_unet()


def test_corrupt_checkpoint_gives_user_error(micro_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(micro_run.path, copy)
    weights = next((copy / "model").glob("*.safetensors"))
    weights.write_bytes(b"garbage")
    with pytest.raises(UserError, match="could not load the checkpoint"):
        Run(copy).load_unet()


def test_artifact_dir_keyed_by_model_and_args(micro_run):
    a = micro_run.artifact_dir("demo", {"draws": 4})
    b = micro_run.artifact_dir("demo", {"draws": 4})
    c = micro_run.artifact_dir("demo", {"draws": 8})
    assert a == b != c
    assert json.loads((a / "args.json").read_text())["model"] == micro_run.model_fingerprint()


def test_samples_from_another_model_are_refused(micro_run, tmp_path):
    import shutil

    copy = Run(tmp_path / "copy")
    shutil.copytree(micro_run.path, copy.path)
    tensors, meta = copy.load_samples("queries")
    save_tensors(copy.path / "samples" / "other.safetensors", tensors, {**meta, "model": "0" * 12})
    with pytest.raises(UserError, match="different model"):
        copy.load_samples("other")
    with pytest.raises(UserError, match="no sample set"):
        copy.load_samples("nope")
