"""mae_pretrain.py's model: masking, patches, loss, and the official parameter names."""
import pytest
import torch
from einops import repeat

from mae_pretrain import MaskedAutoencoderViT, create_mae, mae_loss, patchify, random_masking, unpatchify
from vit import VisionTransformer, gather_tokens

MAE_CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def small_mae(**kw):
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**{**MAE_CFG, **kw})


# -- masking ------------------------------------------------------------------


def test_random_masking_keeps_int_L_times_one_minus_ratio_and_mask_marks_the_rest():
    x = torch.randn(5, 49, 4)
    ids_keep, mask = random_masking(torch.rand(5, 49), 0.75)
    x_masked = gather_tokens(x, ids_keep)
    assert x_masked.shape == (5, int(49 * 0.25), 4) == (5, 12, 4)
    assert torch.all(mask.sum(1) == 49 - 12)
    assert set(mask.unique().tolist()) == {0.0, 1.0}


def test_kept_tokens_are_those_with_the_smallest_noise_and_mask_partitions_them():
    x = torch.arange(2 * 8, dtype=torch.float32).view(2, 8, 1).expand(2, 8, 3)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.6],
                          [0.05, 0.95, 0.15, 0.85, 0.25, 0.75, 0.35, 0.65]])
    ids_keep, mask = random_masking(noise, 0.5)
    x_masked = gather_tokens(x, ids_keep)
    kept0 = [1, 5, 3, 2]  # the 4 smallest noises, in ascending order of noise
    assert x_masked[0, :, 0].tolist() == [float(i) for i in kept0]
    assert torch.equal(mask[0], torch.tensor([1., 0, 0, 0, 1, 0, 1, 1]))
    assert torch.equal(mask[1], torch.tensor([0., 1, 0, 1, 0, 1, 0, 1]))


def test_decoder_scatter_is_the_official_ids_restore_unshuffle():
    """random_masking no longer returns ids_restore: the kept ids are the head of the official
    shuffle, and forward_decoder's scatter puts every token where the official unshuffle (the
    inverse permutation ids_restore) does."""
    model = small_mae().eval()
    noise = torch.rand(3, 16)
    ids_keep, _ = random_masking(noise, 0.6)
    ids_shuffle = noise.argsort(1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # the official code's
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(16).expand(3, 16))
    assert torch.equal(ids_keep, ids_shuffle[:, :ids_keep.shape[1]])
    latent = torch.randn(3, 1 + ids_keep.shape[1], 32)
    with torch.no_grad():
        x = model.decoder_embed(latent)  # the official forward_decoder, step by step
        x_ = torch.cat([x[:, 1:], model.mask_token.expand(3, 16 + 1 - x.shape[1], -1)], dim=1)
        x_ = torch.gather(x_, 1, repeat(ids_restore, "n l -> n l d", d=x.shape[-1]))
        x = torch.cat([x[:, :1], x_], dim=1) + model.decoder_pos_embed
        for blk in model.decoder_blocks:
            x = blk(x)
        official = model.decoder_pred(model.decoder_norm(x))[:, 1:]
        assert torch.allclose(model.forward_decoder(latent, ids_keep), official, atol=1e-6)


def test_same_noise_gives_the_same_mask_and_loss_other_noise_does_not():
    model, imgs = small_mae().eval(), torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        (l1, m1), (l2, m2), (l3, m3) = (
            (mae_loss(pred, target, mask, model.norm_pix_loss), mask)
            for pred, target, mask in (model(imgs, 0.75, n) for n in (noise, noise.clone(), torch.rand(2, 16))))
    assert torch.equal(m1, m2) and l1 == l2
    assert not torch.equal(m1, m3) and l1 != l3


# -- patches --------------------------------------------------------------------


def test_patchify_unpatchify_round_trip():
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(imgs, 8), 8), imgs)


def test_patchify_order_is_row_major_patches_and_channel_fastest():
    imgs = torch.randn(1, 3, 16, 16)
    x = patchify(imgs, 4)  # 4x4 grid of 4x4 patches
    row, col, i, j, c = 2, 1, 3, 0, 2  # patch (2,1), pixel (3,0) in it, channel 2
    assert x[0, row * 4 + col, (i * 4 + j) * 3 + c] == imgs[0, c, row * 4 + i, col * 4 + j]


# -- loss -----------------------------------------------------------------------


def test_loss_counts_only_removed_patches():
    model, imgs = small_mae(), torch.randn(2, 3, 32, 32)
    target = patchify(imgs, 8)
    mask = (torch.rand(2, 16) < 0.75).float()
    pred = torch.randn(2, 16, 192)
    base = mae_loss(pred, target, mask, model.norm_pix_loss)
    kept = pred + (1 - mask)[..., None] * 100.0  # change only the visible patches
    assert mae_loss(kept, target, mask, model.norm_pix_loss) == pytest.approx(base.item())
    manual = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert base.item() == pytest.approx(manual.item(), rel=1e-6)


def test_norm_pix_target_is_each_patch_standardised_with_unbiased_variance():
    model, imgs = small_mae(norm_pix_loss=True), torch.rand(2, 3, 32, 32) * 5
    t = patchify(imgs, 8)
    n = t.shape[-1]
    mean = t.sum(-1, keepdim=True) / n
    var = ((t - mean) ** 2).sum(-1, keepdim=True) / (n - 1)
    target = (t - mean) / torch.sqrt(var + 1e-6)
    mask = torch.ones(2, 16)
    assert mae_loss(target, t, mask, model.norm_pix_loss).item() == pytest.approx(0.0, abs=1e-8)
    assert mae_loss(t, t, mask, model.norm_pix_loss).item() > 1.0  # raw pixels are not the target


def test_mask_ratio_zero_takes_the_loss_over_all_patches():
    model, imgs = small_mae().eval(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pred, target, mask = model(imgs, 0.0)
        loss = mae_loss(pred, target, mask, model.norm_pix_loss)
    assert mask.sum() == 0
    assert loss.item() == pytest.approx(((pred - patchify(imgs, 8)) ** 2).mean().item(), rel=1e-5)


# -- parameter names --------------------------------------------------------------


def official_mae_keys(D, depth, Dd, dec_depth, p, N, C=3):
    """facebookresearch/mae's MaskedAutoencoderViT state_dict, written out by hand."""
    keys = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + N, D),
            "patch_embed.proj.weight": (D, C, p, p), "patch_embed.proj.bias": (D,),
            "norm.weight": (D,), "norm.bias": (D,),
            "decoder_embed.weight": (Dd, D), "decoder_embed.bias": (Dd,),
            "mask_token": (1, 1, Dd), "decoder_pos_embed": (1, 1 + N, Dd),
            "decoder_norm.weight": (Dd,), "decoder_norm.bias": (Dd,),
            "decoder_pred.weight": (p * p * C, Dd), "decoder_pred.bias": (p * p * C,)}
    for prefix, width, n in (("blocks", D, depth), ("decoder_blocks", Dd, dec_depth)):
        for i in range(n):
            b = f"{prefix}.{i}."
            keys.update({b + "norm1.weight": (width,), b + "norm1.bias": (width,),
                         b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                         b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                         b + "norm2.weight": (width,), b + "norm2.bias": (width,),
                         b + "mlp.fc1.weight": (4 * width, width), b + "mlp.fc1.bias": (4 * width,),
                         b + "mlp.fc2.weight": (width, 4 * width), b + "mlp.fc2.bias": (width,)})
    return keys


def test_mae_state_dict_has_the_official_names_and_shapes():
    got = {k: tuple(v.shape) for k, v in small_mae().state_dict().items()}
    assert got == official_mae_keys(32, 2, 16, 1, 8, 16)


def test_mae_vit_tiny_has_mae_lites_decoder():
    m = create_mae("mae_vit_tiny", img_size=32, patch_size=4, depth=1)
    assert m.decoder_embed.out_features == 96 and len(m.decoder_blocks) == 1
    assert m.decoder_blocks[0].attn.num_heads == 3


def test_encoder_part_loads_strictly_into_a_plain_vit_with_the_same_features():
    mae = small_mae().eval()
    encoder = {k: v for k, v in mae.state_dict().items()
               if not k.startswith(("decoder", "mask_token"))}
    plain = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=0).eval()
    plain.load_state_dict(encoder, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain.forward_features(x), mae.forward_features(x))
