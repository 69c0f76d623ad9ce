"""hiera.py and MAE on Hiera: timm's Hiera as the reference, the facts of Ryali et al. 2023 and its official code, checkpoints."""
import functools

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import hiera
import util
from conftest import MAE_HIERA_ONLY
from hiera import (Hiera, MaskedAutoencoderHiera, create_hiera, patchify_hiera, random_unit_mask,
                   reroll, unroll)
from mae_pretrain import mae_loss, reconstruct
from vit import VisionTransformer

IMG = 64  # 16x16 tokens, 2x2 mask units: the smallest image Hiera takes
TINY = dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2))  # hiera_tiny_224
STUDENT = dict(embed_dim=46, num_heads=1, stages=(1, 2, 7, 2))  # MAE-Lite's Hiera-Tiny
CONFIGS = {"tiny_q3": dict(TINY, q_pool=3), "student_q2": dict(STUDENT, q_pool=2),
           "student_q3": dict(STUDENT, q_pool=3)}


def to_timm(sd):
    """The official checkpoints' norm / head.projection are timm's head.norm / head.fc."""
    rename = {"norm.": "head.norm.", "head.projection.": "head.fc."}
    return {next((new + k[len(old):] for old, new in rename.items() if k.startswith(old)), k): v
            for k, v in sd.items()}


@functools.lru_cache(maxsize=None)
def pair(name):
    """(ours, timm's Hiera) with the same weights, eval mode; built once per config."""
    timm_hiera = pytest.importorskip("timm.models.hiera")
    torch.manual_seed(0)
    ours = Hiera(img_size=IMG, num_classes=10, **CONFIGS[name]).eval()
    torch.nn.init.normal_(ours.head.projection.weight)  # x0.001 init would make logits ~0
    ref = timm_hiera.Hiera(img_size=IMG, num_classes=10, **CONFIGS[name]).eval()
    ref.load_state_dict(to_timm(ours.state_dict()), strict=True)
    return ours, ref


def keep_two_of_four():
    return torch.tensor([[True, False, False, True], [False, True, True, False]])


IMGS = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


# -- against timm's Hiera ----------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_timms_hiera_with_the_same_weights(name):
    ours, ref = pair(name)
    with torch.no_grad():
        torch.testing.assert_close(ours(IMGS), ref(IMGS), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
def test_with_a_mask_the_kept_tokens_equal_timms_unpooled_output(name):
    ours, ref = pair(name)
    keep = keep_two_of_four()
    with torch.no_grad():
        got = ours.forward_features(IMGS, keep)
        torch.testing.assert_close(got, ref(IMGS, mask=keep), rtol=1e-5, atol=1e-5)
    tokens_per_unit = 4 if CONFIGS[name]["q_pool"] == 2 else 1  # 8x8 -> 2x2 or 1x1
    assert got.shape == (2, 2 * tokens_per_unit, 8 * CONFIGS[name]["embed_dim"])


@pytest.mark.parametrize("masked", [False, True])
def test_stage_taps_equal_timms_rerolled_intermediates(masked):
    ours, ref = pair("student_q2")
    keep = keep_two_of_four() if masked else None
    with torch.no_grad():
        taps = ours.encode(ours.embed(IMGS, keep), keep, stages=(1, 2, 3, 4))
        _, stage_maps = ref.forward_features(IMGS, mask=keep, return_intermediates=True)
    for s, want in enumerate(stage_maps, start=1):
        torch.testing.assert_close(taps.stages[s], want, rtol=1e-5, atol=1e-5)
    # without a mask (B, H, W, C) raster; with one (B, kept units, My, Mx, C); q_pool 2: 4x4 at the end
    assert taps.stages[4].shape == ((2, 2, 2, 2, 368) if masked else (2, 4, 4, 368))


# -- architecture facts (Hiera paper and official code) ------------------------------------


def test_blocks_follow_the_official_table_including_the_one_block_lag():
    with torch.device("meta"):
        m = create_hiera("hiera_tiny_224")
    got = [(b.norm1.normalized_shape[0], b.norm2.normalized_shape[0], b.attn.num_heads,
            b.attn.q_stride, b.attn.window_size, b.attn.use_mask_unit_attn) for b in m.blocks]
    table = [(96, 96, 1, 1, 64, True), (96, 192, 2, 4, 16, True), (192, 192, 2, 1, 16, True),
             (192, 384, 4, 4, 4, True)] + [(384, 384, 4, 1, 4, False)] * 6 + \
            [(384, 768, 8, 4, 1, False), (768, 768, 8, 1, 1, False)]
    assert got == table
    assert [i for i, b in enumerate(m.blocks) if b.proj is not None] == [1, 3, 10]
    with torch.device("meta"):
        q2 = create_hiera("hiera_tiny_224", q_pool=2)
    assert (q2.blocks[10].attn.q_stride, q2.blocks[10].attn.window_size) == (1, 4)


@pytest.mark.parametrize("name, overrides, count", [
    ("hiera_tiny_224", {}, 27_910_216), ("hiera_tiny_224", {"num_classes": 0}, 27_141_216),
    ("hiera_base_224", {}, 51_524_968), ("hiera_lite_tiny", {}, 6_694_966),
    ("hiera_lite_tiny", {"num_classes": 0, "q_pool": 2}, 6_325_966)])
def test_parameter_counts_of_the_presets(name, overrides, count):
    with torch.device("meta"):  # counts only: no memory, no init cost
        m = create_hiera(name, **overrides)
    assert sum(p.numel() for p in m.parameters()) == count


def test_state_dict_has_the_official_names():
    with torch.device("meta"):
        sd = create_hiera("hiera_lite_tiny").state_dict()
    assert {k for k in sd if not k.startswith("blocks.")} == {
        "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
        "head.projection.weight", "head.projection.bias"}
    assert {k[len("blocks.1."):] for k in sd if k.startswith("blocks.1.")} == {
        f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2", "proj")
        for p in ("weight", "bias")}
    assert sd["pos_embed"].shape == (1, 56 * 56, 46) and sd["blocks.1.attn.qkv.weight"].shape == (3 * 92, 46)
    assert sd["head.projection.weight"].shape == (1000, 368)


def test_init_is_the_officials():
    torch.manual_seed(0)
    m = Hiera(img_size=IMG, num_classes=10, **STUDENT)
    assert torch.all(m.blocks[0].attn.qkv.bias == 0.02) and torch.all(m.norm.bias == 0.02)
    assert torch.all(m.blocks[0].norm1.weight == 1.0)
    assert m.blocks[4].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.head.projection.weight.std().item() == pytest.approx(0.02e-3, rel=0.05)
    torch.testing.assert_close(m.head.projection.bias.detach(), torch.full((10,), 0.02e-3))


def test_unroll_puts_token_h_w_where_the_formula_says_and_reroll_inverts_it():
    g = 3  # mask units per side: a 24x24 token grid
    x = torch.arange(24 * 24).view(1, -1, 1)
    u = unroll(x, g)[0, :, 0]
    for h in range(24):
        for w in range(24):
            my, s3y, s2y, s1y = h // 8, h // 4 % 2, h // 2 % 2, h % 2
            mx, s3x, s2x, s1x = w // 8, w // 4 % 2, w // 2 % 2, w % 2
            pos = (((((s1y * 2 + s1x) * 2 + s2y) * 2 + s2x) * 2 + s3y) * 2 + s3x) * g * g + my * g + mx
            assert u[pos] == h * 24 + w
    assert torch.equal(reroll(unroll(x, g), 0, mask_grid=g).flatten(), x.flatten())
    per_unit = reroll(unroll(x, g), 0)  # (1, 9, 8, 8, 1): unit 4 = the centre 8x8 block
    assert torch.equal(per_unit[0, 4, :, :, 0], x.view(24, 24)[8:16, 8:16])


def test_removed_units_are_zeroed_before_the_conv_so_nothing_leaks():
    ours, _ = pair("student_q2")
    keep = keep_two_of_four()
    other = IMGS.clone()
    other[0, :, :32, 32:] = 5.0  # unit 1 of image 0 is removed: change it
    with torch.no_grad():
        a, b = ours.embed(IMGS, keep), ours.embed(other, keep)
    assert a.shape == (2, 2 * 64, 46) and torch.equal(a, b)


# -- public taps ---------------------------------------------------------------------


def test_attention_logits_are_q_scale_k_and_taps_leave_the_output_unchanged():
    ours, _ = pair("student_q2")
    with torch.no_grad():
        x = ours.embed(IMGS)
        fused = ours.encode(x).x
        taps = ours.encode(x, attn=(1, 4, 12), attn_logits=True, norm1=(12,))
        probs = ours.encode(x, attn=(12,))
    torch.testing.assert_close(taps.x, fused, rtol=1e-5, atol=1e-5)
    assert taps.attn[1].shape == (2, 1, 4, 64, 64)  # mask-unit attention: (B, heads, units, Tq, Tk)
    assert taps.attn[4].shape == (2, 4, 4, 4, 16)  # pooled queries: 16 tokens per unit -> 4
    assert taps.attn[12].shape == (2, 8, 16, 16)  # global: (B, heads, Nq, Nk)
    blk = ours.blocks[11]
    q, k, _ = blk.attn.qkv(taps.norm1[12]).view(2, 16, 3, 8, 46).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(taps.attn[12], q @ k.transpose(-2, -1) / 46 ** 0.5)
    torch.testing.assert_close(probs.attn[12], taps.attn[12].softmax(-1))


def test_only_blocks_asked_for_attention_leave_the_fused_kernel(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(hiera.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, _ = pair("student_q2")
    with torch.no_grad():
        ours.encode(ours.embed(IMGS), attn=(2, 12))
    assert len(calls) == 10


def test_layer_taps_and_stop_at():
    ours, _ = pair("student_q2")
    with torch.no_grad():
        x = ours.embed(IMGS)
        full = ours.encode(x, layers=(3, 12), norm1=(4,))
        cut = ours.encode(x, layers=(3,), stop_at=3)
    assert torch.equal(full.layers[12], full.x) and cut.x is None
    assert torch.equal(cut.layers[3], full.layers[3])
    torch.testing.assert_close(full.norm1[4], ours.blocks[3].norm1(full.layers[3]))
    with pytest.raises(ValueError, match="1..3"):
        ours.encode(x, layers=(4,), stop_at=3)


def test_bad_sizes_and_masks_fail_with_one_line():
    with pytest.raises(ValueError, match="multiple of 32 px.*got 100"):
        Hiera(img_size=100, **STUDENT)
    ours, _ = pair("student_q2")
    with pytest.raises(ValueError, match="expected 64x64 images"):
        ours(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="keep must be bool"):
        ours.embed(IMGS, keep_two_of_four().float())
    with pytest.raises(ValueError, match="same number of mask units"):
        ours.embed(IMGS, torch.tensor([[True, True, True, False], [True, False, False, False]]))


# -- MAE on Hiera ---------------------------------------------------------------------


def small_mae(seed=0, **kw):
    torch.manual_seed(seed)
    return MaskedAutoencoderHiera(**{"img_size": IMG, **STUDENT, "decoder_embed_dim": 32,
                                     "decoder_depth": 1, "decoder_num_heads": 2, **kw}).eval()


def test_unit_mask_keeps_the_int_U_times_one_minus_ratio_smallest_noises():
    noise = torch.rand(3, 49)
    for ratio, n_keep in ((0.4, 29), (0.6, 19)):  # the official MAE-Hiera's mask-unit counts at 224 px
        keep = random_unit_mask(noise, ratio)
        assert keep.dtype == torch.bool and keep.sum(1).tolist() == [n_keep] * 3
        for b in range(3):
            smallest = sorted(range(49), key=lambda u: noise[b, u].item())[:n_keep]
            assert set(keep[b].nonzero().flatten().tolist()) == set(smallest)


def test_forward_mask_marks_the_patches_of_removed_units_in_raster_order():
    mae = small_mae()  # 64 px, q_pool 2: 16 px patches, a 4x4 grid, 2x2 patches per unit
    noise = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.7, 0.3, 0.6, 0.4]])
    with torch.no_grad():
        pred, _, mask = mae(IMGS, 0.5, noise)
    keep = random_unit_mask(noise, 0.5)
    assert keep.tolist() == [[True, False, False, True], [False, True, False, True]]
    assert pred.shape == (2, 16, 3 * 16 * 16)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                unit = (i // 2) * 2 + j // 2
                assert mask[b, i * 4 + j] == float(not keep[b, unit])


def test_target_is_each_16px_patch_ordered_channel_row_column():
    imgs = torch.randn(1, 3, IMG, IMG)
    t = patchify_hiera(imgs, 16)
    for (i, j, c, py, px) in ((1, 2, 2, 3, 5), (3, 0, 0, 15, 1), (0, 3, 1, 7, 14)):
        assert t[0, i * 4 + j, (c * 16 + py) * 16 + px] == imgs[0, c, i * 16 + py, j * 16 + px]
    # the official label: NHWC unfolded twice, (C, py, px) per patch (hiera_mae.py)
    label = imgs.permute(0, 2, 3, 1).unfold(1, 16, 16).unfold(2, 16, 16).flatten(1, 2).flatten(2)
    assert torch.equal(t, label)


def test_loss_ignores_predictions_at_kept_units_and_norm_pix_is_unbiased():
    mae = small_mae()
    imgs = torch.rand(2, 3, IMG, IMG) * 5
    keep, mask = mae.masking(torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.9, 0.1, 0.2, 0.8]]), 0.5)
    assert torch.equal(keep, keep_two_of_four())
    pred = torch.randn(2, 16, 768)
    base = mae_loss(pred, mae.patchify(imgs), mask, mae.norm_pix_loss)
    changed = pred + (1 - mask)[..., None] * 100.0  # only the kept units' predictions move
    assert mae_loss(changed, mae.patchify(imgs), mask, mae.norm_pix_loss).item() == pytest.approx(base.item())
    t = patchify_hiera(imgs, 16)
    n = t.shape[-1]
    mean = t.sum(-1, keepdim=True) / n
    target = (t - mean) / torch.sqrt(((t - mean) ** 2).sum(-1, keepdim=True) / (n - 1) + 1e-6)
    manual = ((pred - target) ** 2).mean(-1)[mask.bool()].mean()  # the official: mean over masked rows
    assert base.item() == pytest.approx(manual.item(), rel=1e-6)



def test_encoder_latent_is_the_fusion_of_timms_rerolled_stages():
    timm_hiera = pytest.importorskip("timm.models.hiera")
    mae = small_mae()
    ref = timm_hiera.Hiera(img_size=IMG, num_classes=0, q_pool=2, **STUDENT).eval()
    result = ref.load_state_dict(mae.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["head.norm.bias", "head.norm.weight"]
    assert {k.split(".")[0] for k in result.unexpected_keys} == MAE_HIERA_ONLY  # nothing of the encoder skipped
    keep = keep_two_of_four()
    with torch.no_grad():
        latent, _ = mae.forward_encoder(IMGS, keep)
        _, st = ref.forward_features(IMGS, mask=keep, return_intermediates=True)
        fused = st[3]  # (B, k, 2, 2, 368): the last stage needs nothing
        for s, conv in ((0, mae.multi_scale_fusion_heads[0]), (1, mae.multi_scale_fusion_heads[1])):
            y = st[s].flatten(0, 1).permute(0, 3, 1, 2)  # (B*k, C, My, Mx)
            y = F.conv2d(y, conv.weight, conv.bias, stride=conv.stride)
            fused = fused + y.permute(0, 2, 3, 1).reshape(fused.shape)
        want = F.layer_norm(fused, (368,), mae.encoder_norm.weight, mae.encoder_norm.bias, 1e-6)
    assert latent.shape == (2, 2, 2, 2, 368)
    torch.testing.assert_close(latent, want, rtol=1e-5, atol=1e-5)


def test_decoder_puts_each_kept_units_latent_and_mask_tokens_in_raster_order():
    mae = small_mae(decoder_depth=0)
    mae.decoder_norm, mae.decoder_pred = torch.nn.Identity(), torch.nn.Identity()
    keep = keep_two_of_four()
    latent = torch.randn(2, 2, 2, 2, 368)
    with torch.no_grad():
        mae.decoder_pos_embed.zero_()
        out = mae.forward_decoder(latent, keep)  # (B, 16, 32): decoder_embed'd tokens, raster
        emb = mae.decoder_embed(latent)
    for b in range(2):
        kept = keep[b].nonzero().flatten().tolist()
        for i in range(4):
            for j in range(4):
                unit, y, x = (i // 2) * 2 + j // 2, i % 2, j % 2
                want = emb[b, kept.index(unit), y, x] if unit in kept else mae.mask_token[0, 0]
                assert torch.equal(out[b, i * 4 + j], want)


def test_every_parameter_gets_a_gradient():
    mae = small_mae().train()
    loss = mae_loss(*mae(IMGS, 0.5), mae.norm_pix_loss)
    loss.backward()
    assert [n for n, p in mae.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_mae_student_preset_size_and_names():
    with torch.device("meta"):
        student = create_hiera("mae_hiera_tiny")
        base = create_hiera("mae_hiera_base")
    assert sum(p.numel() for p in student.parameters()) == 6_973_838  # MAE-Lite IJCV's Hiera-Tiny student
    assert (student.q_pool, student.pred_stride, len(student.decoder_blocks)) == (2, 16, 1)
    assert student.decoder_blocks[0].attn.num_heads == 3 and student.decoder_embed.out_features == 96
    assert (base.decoder_embed.out_features, len(base.decoder_blocks)) == (512, 8)
    sd = student.state_dict()
    assert "norm.weight" not in sd and not any(k.startswith("head.") for k in sd)
    assert sd["multi_scale_fusion_heads.0.weight"].shape == (368, 46, 4, 4)
    assert sd["multi_scale_fusion_heads.1.weight"].shape == (368, 92, 2, 2)
    assert sd["decoder_pos_embed"].shape == (1, 196, 96) and sd["decoder_pred.weight"].shape == (768, 96)


def test_reconstruction_pastes_the_visible_units():
    mae = small_mae()
    noise = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.7, 0.3, 0.6, 0.4]])
    masked, recon, pasted = reconstruct(mae, IMGS, 0.5, noise)
    assert masked.shape == recon.shape == pasted.shape == IMGS.shape
    assert torch.equal(pasted[0, :, :32, :32], IMGS[0, :, :32, :32])  # unit 0 of image 0: kept
    assert torch.all(masked[0, :, :32, 32:] == 0)  # unit 1: removed
    assert torch.equal(pasted[0, :, :32, 32:], recon[0, :, :32, 32:])


# -- checkpoints ----------------------------------------------------------------------------


def save(tmp_path, name, obj):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


def test_an_official_mae_hiera_checkpoint_loads_into_the_mae_and_into_a_classifier(tmp_path):
    src = small_mae()
    path = save(tmp_path, "mae_hiera_base_224.pth", {"model_state": src.state_dict()})
    dst = small_mae(seed=1)
    report = checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), verbose=False)
    assert report.missing == [] and report.unexpected == []
    noise = torch.rand(2, 4)
    with torch.no_grad():
        assert torch.equal(dst(IMGS, 0.5, noise)[0], src(IMGS, 0.5, noise)[0])  # the predictions

    clf = Hiera(img_size=IMG, num_classes=10, q_pool=3, **STUDENT)
    report = checkpoints.load_pretrained(clf, checkpoints.load(path), str(path), verbose=False)
    assert sorted(report.missing) == ["head.projection.bias", "head.projection.weight",
                                      "norm.bias", "norm.weight"]
    assert {k.split(".")[0] for k in report.unexpected} == {
        "encoder_norm", "multi_scale_fusion_heads", "mask_token", "decoder_embed",
        "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred"}
    assert len(report.loaded) + len(report.unexpected) == len(src.state_dict())
    with torch.no_grad():
        a = clf.encode(clf.embed(IMGS), layers=(3,)).layers[3]
        b = src.encode(src.embed(IMGS), layers=(3,)).layers[3]
    assert torch.equal(a, b)


def test_timm_names_map_to_the_official_and_give_the_same_logits(tmp_path):
    src, ref = pair("student_q3")
    path = save(tmp_path, "hiera_timm.pth", ref.state_dict())  # head.norm / head.fc
    dst = Hiera(img_size=IMG, num_classes=10, q_pool=3, **STUDENT).eval()
    report = checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), allow_missing=(), verbose=False)
    assert report.missing == [] and report.unexpected == []
    with torch.no_grad():
        assert torch.equal(dst(IMGS), src(IMGS))


def test_pos_embed_of_another_image_size_is_interpolated_without_a_cls_row(tmp_path):
    src, _ = pair("student_q3")
    path = save(tmp_path, "hiera_64.pth", {"model_state": src.state_dict()})
    dst = Hiera(img_size=96, num_classes=10, q_pool=3, **STUDENT)
    report = checkpoints.load_pretrained(dst, checkpoints.load(path), str(path), verbose=False)
    assert "pos_embed interpolated from a 16x16 to a 24x24 grid" in report.notes
    with torch.no_grad():
        assert dst(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_a_hiera_file_for_a_vit_or_a_vit_file_for_a_hiera_fails_in_one_line(tmp_path):
    src, _ = pair("student_q3")
    hiera_path = save(tmp_path, "hiera.pth", {"model_state": src.state_dict()})
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    vit_path = save(tmp_path, "vit.pth", {"model": vit.state_dict()})
    with pytest.raises(util.CheckpointError, match="hiera.pth: is a Hiera checkpoint, the model is a ViT"):
        checkpoints.load_pretrained(vit, checkpoints.load(hiera_path), str(hiera_path), verbose=False)
    # one infer_config for both families now: it names the file's family instead of refusing it
    assert checkpoints.infer_config(checkpoints.load(hiera_path), str(hiera_path))["family"] == "Hiera"
    with pytest.raises(util.CheckpointError, match="vit.pth: is a ViT checkpoint, the model is a Hiera"):
        checkpoints.load_pretrained(Hiera(img_size=IMG, **STUDENT), checkpoints.load(vit_path), str(vit_path),
                                    verbose=False)
    assert checkpoints.infer_config(checkpoints.load(vit_path), str(vit_path))["family"] == "ViT"


def test_architecture_is_inferred_from_hiera_weights(tmp_path):
    src, _ = pair("tiny_q3")
    path = save(tmp_path, "clf.pth", {"model_state": src.state_dict()})
    clf = checkpoints.infer_config(checkpoints.load(path), str(path))
    assert {k: clf[k] for k in ("family", "embed_dim", "img_size", "stages", "num_heads", "q_pool",
                                "num_classes")} == \
        dict(family="Hiera", embed_dim=96, img_size=64, stages=[1, 2, 7, 2], num_heads=1, q_pool=3, num_classes=10)
    model = small_mae()
    path = save(tmp_path, "mae.pth", {"model": model.state_dict(), "model_config": model.config})
    mae = checkpoints.infer_config(checkpoints.load(path), str(path))
    assert {k: mae[k] for k in ("family", "embed_dim", "stages", "q_pool", "decoder_embed_dim", "decoder_depth",
                                "decoder_num_heads", "heads_inferred")} == \
        dict(family="Hiera", embed_dim=46, stages=[1, 2, 7, 2], q_pool=2, decoder_embed_dim=32, decoder_depth=1,
             decoder_num_heads=2, heads_inferred=False)
    assert "decode_layer" not in mae  # only a ViT MAE reads its decoder from a chosen block


@pytest.mark.parametrize("flags, message", [
    (["--input_size", "32"], "--input_size / --mask_ratio: mask ratio 0.6 keeps none of the 1 mask units of a "
                             "32 px image"),
    (["--input_size", "64", "--mask_ratio", "0.9"], "mask ratio 0.9 keeps none of the 4 mask units"),
])
def test_an_mae_hiera_that_would_keep_no_mask_unit_is_refused_at_start(flags, message):
    import mae_pretrain
    args = mae_pretrain.get_args_parser().parse_args(["--model", "mae_hiera_tiny", *flags])
    with pytest.raises(util.ConfigError, match=message):
        mae_pretrain.check_args(args)


def test_an_mae_hiera_decoder_needs_no_multiple_of_4_its_positions_are_learned():
    import mae_pretrain
    args = mae_pretrain.get_args_parser().parse_args(
        ["--model", "mae_hiera_tiny", "--input_size", "64", "--decoder_embed_dim", "90", "--decoder_num_heads", "3"])
    mae_pretrain.check_args(args)  # a ViT's sin-cos decoder positions would refuse 90
    vit = mae_pretrain.get_args_parser().parse_args(["--input_size", "32", "--decoder_embed_dim", "90",
                                                     "--decoder_num_heads", "3"])
    with pytest.raises(util.ConfigError, match="90 must be divisible by 4"):
        mae_pretrain.check_args(vit)
