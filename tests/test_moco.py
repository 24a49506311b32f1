"""MoCo against the paper's pseudo-code, queue mechanics, split BN, export/load, views."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medmoco.models import SplitBatchNorm2d, build_moco, check_queue_batch, export_backbone, load_backbone_state
from medmoco.models.backbones import create_backbone
from medmoco.models.export import read_weights, strip_prefixes
from medmoco.transforms.views import AugmentConfig, BatchViewAugment, TwoViews, monai_view_transform


def tiny_moco(K=32, m=0.9, T=0.2, mlp=True, bn_splits=1):
    torch.manual_seed(0)
    return build_moco("resnet18", in_channels=3, dim=16, K=K, m=m, T=T, mlp=mlp, bn_splits=bn_splits)


def test_forward_equals_the_papers_pseudo_code():
    model = tiny_moco()
    reference = copy.deepcopy(model)
    x_q, x_k = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    ptr0, queue0 = int(model.queue_ptr), model.queue.clone()
    logits, labels = model(x_q, x_k)
    # Pseudo-code (He et al. 2019, Algorithm 1), on a copy of the same weights.
    f_q, f_k = reference.encoder_q, reference.encoder_k
    with torch.no_grad():
        for p_q, p_k in zip(f_q.parameters(), f_k.parameters()):
            p_k.copy_(0.9 * p_k + 0.1 * p_q)
        k = F.normalize(f_k(x_k), dim=1)
    q = F.normalize(f_q(x_q), dim=1)
    l_pos = torch.bmm(q.view(8, 1, -1), k.view(8, -1, 1)).view(8, 1)
    l_neg = torch.mm(q, queue0)
    expected = torch.cat([l_pos, l_neg], dim=1) / 0.2
    assert logits.shape == (8, 1 + 32)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(model.queue[:, ptr0 : ptr0 + 8], k.T, rtol=1e-4, atol=1e-5)  # BN sums in shuffled order
    assert torch.equal(model.queue[:, 8:], queue0[:, 8:])
    assert int(model.queue_ptr) == 8


def test_momentum_update_is_exact_and_on_parameters_only():
    model = tiny_moco(m=0.75)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
    before_q = [p.clone() for p in model.encoder_q.parameters()]
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    buffers_k = [b.clone() for b in model.encoder_k.buffers()]
    model._momentum_update_key_encoder()
    for q, k0, k in zip(before_q, before_k, model.encoder_k.parameters()):
        assert torch.equal(k, k0 * 0.75 + q * 0.25)
        assert not k.requires_grad
    for b0, b in zip(buffers_k, model.encoder_k.buffers()):
        assert torch.equal(b0, b)


def test_queue_is_fifo_and_the_pointer_wraps():
    model = tiny_moco(K=8)
    batches = [F.normalize(torch.randn(4, 16), dim=1) for _ in range(3)]
    for i, keys in enumerate(batches):
        model._dequeue_and_enqueue(keys)
        assert int(model.queue_ptr) == [4, 0, 4][i]
    assert torch.equal(model.queue[:, 0:4], batches[2].T)
    assert torch.equal(model.queue[:, 4:8], batches[1].T)
    with pytest.raises(ValueError, match="not divisible"):
        model._dequeue_and_enqueue(torch.randn(3, 16))


def test_queue_batch_check_names_the_settings():
    check_queue_batch(65536, 256)
    with pytest.raises(ValueError, match=r"moco.K=65536 must be a multiple of the global batch 96"):
        check_queue_batch(65536, 96)


def test_split_bn_normalises_each_split_separately():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, num_splits=2).train()
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    out = bn(x)
    for s in range(2):  # split s holds samples s, s+2, s+4, ... (as in the official CIFAR demo)
        part = x[s::2]
        ref = F.batch_norm(part, None, None, training=True, eps=bn.eps)
        torch.testing.assert_close(out[s::2], ref, rtol=1e-4, atol=1e-5)
    # running statistics: the mean over splits of each split's statistics
    means = torch.stack([x[s::2].mean(dim=(0, 2, 3)) for s in range(2)]).mean(0)
    torch.testing.assert_close(bn.running_mean, 0.1 * means, rtol=1e-4, atol=1e-6)


def test_split_bn_is_used_when_asked():
    model = tiny_moco(bn_splits=4)
    kinds = {type(m).__name__ for m in model.encoder_q.modules()}
    assert "SplitBatchNorm2d" in kinds
    logits, _ = model(torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_backbones_by_name(arch):
    backbone, features = create_backbone(arch, in_channels=9)
    out = backbone(torch.rand(2, 9, 64, 64))
    assert out.shape == (2, features)
    if arch == "resnext50_32x4d":
        assert any(getattr(m, "groups", 1) == 32 for m in backbone.modules())


def test_export_and_load_strip_prefixes_and_check_keys(tmp_path):
    model = tiny_moco()
    path = export_backbone(model, str(tmp_path / "backbone.pt"), "resnet18", 3, 512, meta={"note": "x"})
    payload = read_weights(path)
    assert payload["format"] == "medmoco-backbone/1" and payload["arch"] == "resnet18"
    fresh, _ = create_backbone("resnet18", 3)
    missing, unexpected = load_backbone_state(fresh, path)
    assert missing == [] and unexpected == []
    for (name, a), b in zip(model.encoder_q.backbone.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    ddp_state = {f"module.{k}": v for k, v in model.state_dict().items()}  # a DDP MoCo checkpoint
    stripped = strip_prefixes(ddp_state)
    assert set(stripped) == set(model.encoder_q.backbone.state_dict())
    fresh2, _ = create_backbone("resnet18", 3)
    load_backbone_state(fresh2, {"state_dict": ddp_state})
    with pytest.raises(ValueError, match="lack"):
        load_backbone_state(create_backbone("resnet18", 3)[0], {"state_dict": {"conv1.weight": torch.zeros(1)}})


def test_weights_loading_refuses_code_in_pickles(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Evil()}, handle)
    with pytest.raises(ValueError, match="weights_only"):
        read_weights(str(path))


def test_monai_views_are_two_independent_calls_and_reproducible():
    aug = AugmentConfig()
    views = TwoViews(monai_view_transform(aug, 48))
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8))
    views.set_random_state(7)
    a = views(image)
    assert a["view1"].shape == (3, 48, 48) and a["view1"].dtype == torch.float32
    assert not torch.equal(a["view1"], a["view2"])
    views.set_random_state(7)
    b = views(image)
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])


def test_device_views_on_cpu_are_batched_seeded_and_distinct():
    aug = BatchViewAugment(AugmentConfig(), 48)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (6, 3, 64, 64), dtype=np.uint8))
    g = torch.Generator().manual_seed(3)
    v1, v2 = aug(images, g), aug(images, g)
    assert v1.shape == (6, 3, 48, 48) and v1.dtype == torch.float32
    assert not torch.allclose(v1, v2)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(aug(images, g), v1)
    # with every augmentation off but the crop at full scale, the view is the resized image
    plain = BatchViewAugment(AugmentConfig(crop_scale=[1.0, 1.0], flip_prob=0, intensity_prob=0, gamma_prob=0,
                                           blur_prob=0, noise_prob=0), 64)
    out = plain(images, torch.Generator().manual_seed(0))
    # aspect is random in [3/4, 4/3]: compare the centre row where both axes are covered
    assert out.min() >= 0 and out.max() <= 1
