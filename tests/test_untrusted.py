"""Untrusted weight files: a pickle that would run code is refused everywhere weights are loaded."""
import os
import pickle

import pytest
import torch


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


@pytest.fixture
def evil_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Exploit()}}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return str(path)


def test_backbone_loader_refuses_a_code_running_pickle(evil_file, tmp_path):
    from medmoco.models import load_backbone_state
    from medmoco.models.backbones import create_backbone

    backbone, _ = create_backbone("resnet18", 3)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_backbone_state(backbone, evil_file)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_classifier_and_checkpoint_loaders_refuse_it(evil_file, tmp_path):
    from medmoco.engines.common import find_resume_checkpoint
    from medmoco.models import load_classifier

    with pytest.raises(ValueError, match="weights_only=True"):
        load_classifier(evil_file)
    with pytest.raises(ValueError, match="unreadable checkpoint"):
        find_resume_checkpoint(evil_file, str(tmp_path))
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
