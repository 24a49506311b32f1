"""sha256 lists of a version's files: a changed, missing or added file is named (no MLflow needed)."""
import pytest

from medmoco.registry.integrity import IntegrityError, file_digests, sha256_json, verify_files


def _tree(root):
    (root / "code").mkdir(parents=True)
    (root / "MLmodel").write_text("flavors: {}\n")
    (root / "code" / "model.py").write_text("print('registered')\n")
    return file_digests(str(root))


def test_each_kind_of_change_is_named(tmp_path):
    recorded = _tree(tmp_path)
    assert set(recorded) == {"MLmodel", "code/model.py"}
    verify_files(str(tmp_path), recorded, "models:/m/1")  # unchanged: passes
    (tmp_path / "registered_model_meta").write_text("written by every MLflow download")
    verify_files(str(tmp_path), recorded, "models:/m/1")  # MLflow's own download note is not part of the record
    (tmp_path / "code" / "model.py").write_text("print('swapped')\n")
    with pytest.raises(IntegrityError, match="models:/m/1: file code/model.py has sha256 .* recorded"):
        verify_files(str(tmp_path), recorded, "models:/m/1")
    (tmp_path / "code" / "model.py").write_text("print('registered')\n")
    (tmp_path / "code" / "sitecustomize.py").write_text("import os\n")
    with pytest.raises(IntegrityError, match="file code/sitecustomize.py is not in the recorded sha256 list"):
        verify_files(str(tmp_path), recorded, "models:/m/1")
    (tmp_path / "code" / "sitecustomize.py").unlink()
    (tmp_path / "MLmodel").unlink()
    with pytest.raises(IntegrityError, match="file MLmodel is missing"):
        verify_files(str(tmp_path), recorded, "models:/m/1")


def test_canonical_json_digest_ignores_key_order():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})
