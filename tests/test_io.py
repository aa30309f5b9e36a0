"""Atomic outputs: a failure leaves the previous file (or nothing) and no temporaries behind."""

import os

import pytest

from elmm.io import atomic_dir, atomic_path, read_json, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"mrr": 0.5})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("interrupted")
    assert read_json(target) == {"mrr": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "weights").write_text("v2-partial")
            raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_outputs_get_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_read_json_names_the_file_and_line(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(ValueError, match=r"x\.json:3: not valid JSON"):
        read_json(bad)
    with pytest.raises(FileNotFoundError, match="run the stage that produces it"):
        read_json(tmp_path / "missing.json")


def test_files_written_by_safetensors_and_save_pretrained_are_readable(tmp_path):
    """Safetensors and `save_pretrained` create their files 0600 whatever the umask; outputs written
    through atomic_dir / atomic_path must still come out with the umask's permissions."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "weights.safetensors"))
            (tmp / "sub").mkdir(mode=0o700)
            LlamaModel(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                   num_attention_heads=2)).save_pretrained(tmp / "sub")
        with atomic_path(tmp_path / "single.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    files = [tmp_path / "model/weights.safetensors", tmp_path / "model/sub/model.safetensors",
             tmp_path / "model/sub/config.json", tmp_path / "single.safetensors"]
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o644, (f, oct(f.stat().st_mode & 0o777))
    for d in (tmp_path / "model", tmp_path / "model/sub"):
        assert d.stat().st_mode & 0o777 == 0o755, d

