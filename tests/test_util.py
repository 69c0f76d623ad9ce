"""util.py: lr schedule, parameter groups; data.py: data determinism."""
import math

import pytest
import torch

import data
import util
from vit import VisionTransformer


def test_cosine_lr_warms_up_linearly_then_follows_a_half_cosine_to_min_lr():
    f = lambda e: util.cosine_lr(e, lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert f(0) == 0.0 and f(1) == pytest.approx(0.5) and f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # = 0.55
    assert f(10) == pytest.approx(0.1)


def names_by(groups, pred):
    return {n for g in groups if pred(g) for n in g["names"]}


def test_no_weight_decay_on_biases_norms_tokens_and_position_embeddings():
    from mae_pretrain import MaskedAutoencoderViT
    model = MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                 decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=2)
    model.pos_embed.requires_grad_(True)  # even when trained, position embeddings are not decayed
    groups = util.param_groups(model, weight_decay=0.05)
    decayed = names_by(groups, lambda g: g["weight_decay"] == 0.05)
    assert decayed == {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                       "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "decoder_embed.weight",
                       "decoder_blocks.0.attn.qkv.weight", "decoder_blocks.0.attn.proj.weight",
                       "decoder_blocks.0.mlp.fc1.weight", "decoder_blocks.0.mlp.fc2.weight",
                       "decoder_pred.weight"}
    undecayed = names_by(groups, lambda g: g["weight_decay"] == 0.0)
    assert {"cls_token", "mask_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias"} <= undecayed
    assert "decoder_pos_embed" not in undecayed | decayed  # frozen: not optimized at all


def test_layer_decay_scales_follow_the_mae_mapping():
    """MAE: patch_embed/cls_token/pos_embed -> layer 0, blocks.i -> i+1, the rest -> depth+1;
    scale = decay ** (depth + 1 - layer). Depth 2, decay 0.5: 0.125, 0.25, 0.5, 1."""
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2,
                              num_classes=3, global_pool="avg")
    groups = util.param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    expected = {"cls_token": 0.125, "pos_embed": 0.125, "patch_embed.proj.weight": 0.125,
                "patch_embed.proj.bias": 0.125, "blocks.0.attn.qkv.weight": 0.25,
                "blocks.0.norm1.bias": 0.25, "blocks.1.mlp.fc2.weight": 0.5,
                "fc_norm.weight": 1.0, "head.weight": 1.0, "head.bias": 1.0}
    assert {n: scale[n] for n in expected} == expected
    assert set(scale) == {n for n, _ in model.named_parameters()}


def test_synthetic_data_is_deterministic_by_seed_and_class_balanced():
    a = data.SyntheticShapes(16, 32, seed=3)
    b = data.SyntheticShapes(16, 32, seed=3)
    c = data.SyntheticShapes(16, 32, seed=4)
    from torchvision.transforms.functional import pil_to_tensor
    img = lambda ds, i: pil_to_tensor(ds[i][0])
    assert torch.equal(img(a, 5), img(b, 5))
    assert not torch.equal(img(a, 5), img(c, 5))
    assert [a[i][1] for i in range(16)] == [i % 8 for i in range(16)]


def test_seeded_samples_repeat_per_epoch_and_index_and_differ_across_epochs():
    ds = data.SeededSamples(data.SyntheticShapes(8, 32, transform=data.pretrain_transform(32)), seed=0,
                            noise=10)
    x1, _, s1 = ds[(3, 0)]  # s: the sample's mask noise, drawn from its seed
    torch.rand(5)  # the global RNG state must not matter
    x2, _, s2 = ds[(3, 0)]
    x3, _, s3 = ds[(3, 1)]
    assert torch.equal(s1, s2) and torch.equal(x1, x2)
    assert not torch.equal(s1, s3) and not torch.equal(x1, x3)


def test_the_global_batch_is_the_same_split_over_two_ranks():
    """Rank r's batch b holds global positions r, r+2, ... of the 1-process batch b."""
    ds = list(range(40))
    one = data.EpochSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=7)
    two = [data.EpochSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=7) for r in (0, 1)]
    for s in [one, *two]:
        s.set_epoch(3)
    full = [i for i, _ in one]
    r0, r1 = ([i for i, _ in s] for s in two)
    assert sorted(full[:8]) == sorted(r0[:4] + r1[:4])
    assert all(e == 3 for _, e in one)
