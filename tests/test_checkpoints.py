"""Checkpoints: atomic saves, safe loads, and every layout the released checkpoints use (MAE, timm, DeiT, MAE-Lite, TinyMIM, Hiera)."""
import argparse

import pytest
import torch

import checkpoints
import util
from mae_pretrain import MaskedAutoencoderViT
from vit import VisionTransformer

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
MAE = dict(VIT, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def make_vit(seed, **kw):
    torch.manual_seed(seed)
    m = VisionTransformer(**{**VIT, "num_classes": 0, **kw}).eval()
    if isinstance(m.head, torch.nn.Linear):
        torch.nn.init.normal_(m.head.weight)  # logits that differ between models
    return m


def trained_mae(seed=0):
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(**MAE).eval()


IMGS = torch.randn(2, 3, 32, 32)


def features(model):
    with torch.no_grad():
        return model.encode(model.embed(IMGS), layers=(2,)).layers[2]


def logits(model):
    with torch.no_grad():
        return model(IMGS)


def save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


# -- this project's own checkpoints ---------------------------------------------


def test_save_is_atomic_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    util.save_checkpoint(path, {"epoch": 1})

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(util.torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        util.save_checkpoint(path, {"epoch": 2})
    assert util.load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_mae_training_checkpoints_with_an_argparse_namespace_load(tmp_path):
    path = save(tmp_path, "mae_ckpt.pth", {"model": trained_mae().state_dict(), "epoch": 3,
                                           "args": argparse.Namespace(blr=1.5e-4, model="mae")})
    assert util.load_checkpoint(path)["args"].blr == 1.5e-4


class Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = save(tmp_path, "evil.pth", {"model": {}, "x": Payload()})
    with pytest.raises(util.CheckpointError, match="evil.pth: holds Python objects"):
        util.load_checkpoint(path)


def test_corrupt_missing_and_non_checkpoint_files_name_the_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(util.CheckpointError, match="junk.pth: not a PyTorch checkpoint"):
        util.load_checkpoint(junk)
    with pytest.raises(util.CheckpointError, match="nope.pth: no such file"):
        util.load_checkpoint(tmp_path / "nope.pth")
    notes = save(tmp_path, "notes.pth", {"lr": 0.1, "epoch": 3})
    with pytest.raises(util.CheckpointError, match="notes.pth: unknown layout"):
        checkpoints.load_pretrained(make_vit(0), checkpoints.load(notes), str(notes), verbose=False)
    other = save(tmp_path, "resnet.pth", {"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(util.CheckpointError, match="resnet.pth: unknown layout: no ViT patch_embed"):
        checkpoints.load_pretrained(make_vit(0), checkpoints.load(other), str(other), verbose=False)


# -- formats in the wild -------------------------------------------------------------


def test_official_mae_encoder_only_into_a_mean_pooled_classifier(tmp_path):
    mae = trained_mae()
    enc = {k: v for k, v in mae.state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    path = save(tmp_path, "mae_pretrain_vit.pth", {"model": enc})
    model = make_vit(1, num_classes=10, global_pool="avg")
    report = checkpoints.load_pretrained(model, checkpoints.load(path), str(path), verbose=False)
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(report.unexpected) == ["norm.bias", "norm.weight"]
    assert torch.equal(features(model), features(mae))


def test_official_full_checkpoint_loads_into_the_mae_with_nothing_missing(tmp_path):
    src = trained_mae(0)
    path = save(tmp_path, "mae_visualize_vit.pth", {"model": src.state_dict()})
    dst = trained_mae(1)
    report = checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), allow_missing=(), verbose=False)
    assert report.missing == [] and report.unexpected == []
    noise = torch.rand(2, 16)
    with torch.no_grad():
        assert torch.equal(dst(IMGS, 0.75, noise)[0], src(IMGS, 0.75, noise)[0])  # the predictions


def test_timm_plain_state_dict_gives_identical_logits(tmp_path):
    src = make_vit(0, num_classes=7)
    path = save(tmp_path, "timm.pth", src.state_dict())
    dst = make_vit(1, num_classes=7)
    checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), verbose=False)
    assert torch.equal(logits(dst), logits(src))


def test_mae_lite_module_model_prefix_with_its_decoder(tmp_path):
    mae = trained_mae()
    path = save(tmp_path, "mae_tiny_400e.pth.tar",
                {"model": {"module.model." + k: v for k, v in mae.state_dict().items()}})
    model = make_vit(1)
    report = checkpoints.load_pretrained(model, checkpoints.load(path), str(path), verbose=False)
    assert any(k.startswith("decoder_blocks.") for k in report.unexpected)
    assert "mask_token" in report.unexpected
    assert torch.equal(features(model), features(mae))


def test_fine_tuned_checkpoint_with_fc_norm_and_no_norm_gives_identical_logits(tmp_path):
    src = make_vit(0, num_classes=10, global_pool="avg")
    path = save(tmp_path, "mae_finetuned_vit.pth", {"model": src.state_dict()})
    dst = make_vit(1, num_classes=10, global_pool="avg")
    report = checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), allow_missing=(), verbose=False)
    assert report.missing == [] and "norm.weight" not in report.loaded
    assert torch.equal(logits(dst), logits(src))


def test_deit_distillation_token_and_its_position_row_are_dropped(tmp_path):
    src = make_vit(0, num_classes=5)
    sd = src.state_dict()
    pe = sd["pos_embed"]
    sd["pos_embed"] = torch.cat([pe[:, :1], torch.randn(1, 1, 32), pe[:, 1:]], dim=1)  # cls, dist, patches
    sd["dist_token"], sd["head_dist.weight"] = torch.randn(1, 1, 32), torch.randn(5, 32)
    path = save(tmp_path, "deit_distilled.pth", {"model": sd})
    dst = make_vit(1, num_classes=5)
    report = checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), verbose=False)
    assert report.unexpected == ["head_dist.weight"]
    assert torch.equal(logits(dst), logits(src))


def test_videomae_style_encoder_prefix_and_separate_q_v_biases(tmp_path):
    src = make_vit(0)
    sd = {}
    for k, v in src.state_dict().items():
        if k.endswith("attn.qkv.bias"):
            v = v.clone()
            v[32:64] = 0  # those checkpoints have no k bias
            src.state_dict()[k].copy_(v)
            sd["encoder." + k.replace("qkv.bias", "q_bias")] = v[:32]
            sd["encoder." + k.replace("qkv.bias", "v_bias")] = v[64:]
        else:
            sd["encoder." + k] = v
    sd["decoder.head.weight"] = torch.zeros(3, 3)
    path = save(tmp_path, "amd_vit.pth", {"module": sd})
    dst = make_vit(1)
    report = checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), verbose=False)
    assert report.unexpected == ["decoder.head.weight"]
    assert torch.equal(features(dst), features(src))


def test_ddp_and_compile_prefixes_and_safetensors(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file
    src = make_vit(0)
    path = save(tmp_path, "ddp.pth", {"model": {"module._orig_mod." + k: v for k, v in src.state_dict().items()}})
    dst = make_vit(1)
    checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), verbose=False)
    assert torch.equal(features(dst), features(src))
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    dst2 = make_vit(2)
    checkpoints.load_pretrained(dst2, checkpoints.load(st), str(st), verbose=False)
    assert torch.equal(features(dst2), features(src))


# -- what does not fit ------------------------------------------------------------------


def test_pos_embed_of_another_grid_is_interpolated_and_a_wrong_head_dropped(tmp_path):
    src = make_vit(0, num_classes=1000)
    path = save(tmp_path, "in1k.pth", src.state_dict())
    dst = make_vit(1, num_classes=10, img_size=64)
    report = checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), verbose=False)
    assert any("pos_embed interpolated from a 4x4 to a 8x8 grid" in n for n in report.notes)
    assert any(n.startswith("head.weight (1000, 32) dropped") for n in report.notes)
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])
    with torch.no_grad():
        assert dst(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_width_depth_and_patch_mismatches_name_the_file_and_the_key(tmp_path):
    path = save(tmp_path, "base.pth", {"model": make_vit(0).state_dict()})
    with pytest.raises(util.CheckpointError, match=r"base.pth: cls_token has shape \(1, 1, 32\), the model expects \(1, 1, 64\)"):
        checkpoints.load_pretrained(make_vit(1, embed_dim=64), checkpoints.load(path), str(path), verbose=False)
    with pytest.raises(util.CheckpointError, match="base.pth: has blocks up to blocks.1, the model has 1 blocks"):
        checkpoints.load_pretrained(make_vit(1, depth=1), checkpoints.load(path), str(path), verbose=False)
    with pytest.raises(util.CheckpointError, match="base.pth: missing .* 'blocks.2.norm1.weight'"):
        checkpoints.load_pretrained(make_vit(1, depth=3), checkpoints.load(path), str(path), verbose=False)
    with pytest.raises(util.CheckpointError, match="patch_embed.proj.weight .*patch size or width"):
        checkpoints.load_pretrained(make_vit(1, patch_size=4), checkpoints.load(path), str(path), verbose=False)


def test_a_recorded_head_count_that_differs_is_refused(tmp_path):
    src = make_vit(0)
    path = save(tmp_path, "ours.pth", {"model": src.state_dict(), "model_config": src.config})
    with pytest.raises(util.CheckpointError, match="trained with 2 heads, the model has 4"):
        checkpoints.load_pretrained(make_vit(1, num_heads=4), checkpoints.load(path), str(path), verbose=False)


def test_architecture_is_inferred_from_the_weights(tmp_path):
    from mae_pretrain import MaskedAutoencoderViT
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(img_size=48, patch_size=8, embed_dim=192, depth=3, num_heads=3,
                               decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2)
    path = save(tmp_path, "mae_visualize.pth", {"model": {"module.model." + k: v for k, v in mae.state_dict().items()}})
    cfg = checkpoints.infer_config(checkpoints.load(path), str(path))
    assert {k: cfg[k] for k in ("embed_dim", "depth", "patch_size", "img_size", "num_heads",
                                "heads_inferred", "decoder_embed_dim", "decoder_depth",
                                "decoder_num_heads", "global_pool", "num_classes")} == dict(
        embed_dim=192, depth=3, patch_size=8, img_size=48, num_heads=3, heads_inferred=True,
        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, global_pool="token", num_classes=0)
    ours = save(tmp_path, "ours.pth", {"model": make_vit(0, num_classes=4, global_pool="avg").state_dict(),
                                       "model_config": {"num_heads": 2}})
    cfg = checkpoints.infer_config(checkpoints.load(ours), str(ours))
    assert (cfg["num_heads"], cfg["heads_inferred"], cfg["global_pool"], cfg["num_classes"]) == (2, False, "avg", 4)


def test_a_width_mismatch_is_named_before_a_head_count_mismatch(tmp_path):
    src = make_vit(0)
    path = save(tmp_path, "ours.pth", {"model": src.state_dict(), "model_config": src.config})
    with pytest.raises(util.CheckpointError, match="cls_token has shape"):
        checkpoints.load_pretrained(make_vit(1, embed_dim=64, num_heads=4), checkpoints.load(path), str(path),
                                    verbose=False)


def test_a_video_models_3d_patch_embedding_is_refused_by_name(tmp_path):
    sd = {"encoder.patch_embed.proj.weight": torch.zeros(32, 3, 2, 8, 8),
          "encoder.blocks.0.norm1.weight": torch.ones(32)}
    path = save(tmp_path, "videomae.pth", {"module": sd})
    with pytest.raises(util.CheckpointError, match=r"videomae.pth: patch_embed.proj.weight has shape \(32, 3, 2, 8, 8\)"):
        checkpoints.infer_config(checkpoints.load(path), str(path))


def test_a_recorded_adaptive_last_block_that_differs_is_refused(tmp_path):
    src = make_vit(0, depth=2, num_heads=2, last_block_heads=4)
    path = save(tmp_path, "student.pth", {"model": src.state_dict(), "model_config": src.config})
    assert checkpoints.infer_config(checkpoints.load(path), str(path))["last_block_heads"] == 4
    with pytest.raises(util.CheckpointError, match="its last block has 4 heads"):
        checkpoints.load_pretrained(make_vit(1), checkpoints.load(path), str(path), verbose=False)
    checkpoints.load_pretrained(make_vit(1, last_block_heads=4), checkpoints.load(path), str(path), verbose=False)
