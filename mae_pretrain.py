"""MAE pre-training: "Masked Autoencoders Are Scalable Vision Learners" (He et al., CVPR 2022),
with the lightweight settings of MAE-Lite (Wang et al., ICML 2023).

The method in three lines: cut the image into patches and keep a random 25%; a ViT
encodes only the kept patches; a small decoder sees the encoded tokens plus a shared
mask token at every removed position and predicts the removed patches' pixels.

    ids_shuffle = argsort(noise)          keep ids_shuffle[:int(L * (1 - mask_ratio))]
    loss = sum_p mask_p * mean_j (pred_pj - target_pj)^2 / sum_p mask_p     (removed patches only)
    target_p = (x_p - mean(x_p)) / sqrt(var(x_p) + 1e-6)     with --norm_pix_loss (the recipe)

75% of the tokens never enter the encoder: with ViT-B at 224 it runs on 49 + 1 tokens
instead of 197, about 4x less encoder compute than a forward pass on the full image.

On a Hiera (--model mae_hiera_*; MaskedAutoencoderHiera below) the unit of masking is a
mask unit of 32x32 px (8x8 tokens after the stride-4 embedding): the encoder runs on the
kept units, its stages are fused (multi-scale fusion) and a decoder predicts the removed
units' pixels in 16x16 patches. MAE-Lite's Hiera-Tiny: --model mae_hiera_tiny --mask_ratio 0.4.

Commands (the built-in synthetic data is used when --data_path is not given):
    # a few minutes on a laptop CPU
    python mae_pretrain.py --input_size 32 --patch_size 4 --epochs 10 --output_dir runs/mae_quick
    # MAE-Lite ViT-Tiny (12 heads), ImageNet, 400 epochs, batch 4096 = 512 x 8 GPUs
    torchrun --nproc_per_node=8 mae_pretrain.py --model mae_vit_tiny --num_heads 12 \\
        --data_path /data/imagenet --batch_size 512 --epochs 400 --warmup_epochs 40 \\
        --blr 1.5e-4 --min_crop_scale 0.08
    # MAE ViT-B, 800 epochs, batch 4096 = 64 x 8 GPUs x 8 accumulation
    torchrun --nproc_per_node=8 mae_pretrain.py --model mae_vit_base --data_path /data/imagenet \\
        --batch_size 64 --accum_iter 8 --epochs 800 --warmup_epochs 40 --blr 1.5e-4
    # MAE-Lite's Hiera-Tiny (46 wide), 40% of the 32-px mask units removed, batch 4096 = 512 x 8
    torchrun --nproc_per_node=8 mae_pretrain.py --model mae_hiera_tiny --mask_ratio 0.4 \\
        --data_path /data/imagenet --batch_size 512 --epochs 400 --warmup_epochs 40 \\
        --blr 1.5e-4 --min_crop_scale 0.08
    # throughput only: 50 optimizer steps on synthetic device batches, MFU against a peak
    python mae_pretrain.py --model mae_vit_base --batch_size 256 --benchmark 50 --peak_tflops 989

Expected (ImageNet-1K top-1 after fine-tuning, PAPERS.md section 9): MAE-Tiny 78.0
(400 ep, 300 ep fine-tune), MAE ViT-B 83.6, MAE-Hiera-Tiny 78.5 (IJCV).

Where this differs from the official code (facebookresearch/mae):
- cls_token and mask_token get no weight decay (the official pre-training decays them;
  its fine-tuning does not). Documented in util.param_groups.
- Each sample's crop and mask come from an RNG seeded by (seed, epoch, index), so the
  run is the same on 1 or N GPUs and a resumed run continues exactly.
- --mask_ratio 0 is allowed: with nothing removed the loss is taken over all patches
  (the official loss divides by zero).
- --norm_pix_loss defaults to on (the paper's recipe; the official flag defaults to off).
- The crop is resized with torch's antialiased bicubic on uint8 (Keys a = -0.75; the
  official PIL bicubic has a = -0.5), and a JPEG whose crop is at least twice the output
  is decoded at 1/2, 1/4 or 1/8 scale by libjpeg first (util.DecodeCropFlip): the same
  augmentation up to the interpolation kernel, 1.7x cheaper per image (README).
"""
import argparse
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange, repeat

import util
from util import print0
from hiera import Hiera, HieraBlock
from vit import Block, VisionTransformer, gather_tokens, sincos_pos_embed


def get_args_parser():
    p = argparse.ArgumentParser("MAE pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mae_vit_tiny", choices=[*MAE_PRESETS, *MAE_HIERA_PRESETS],
                   help="mae_vit_tiny and mae_hiera_tiny have MAE-Lite's decoder (96 wide, 1 block, "
                        "3 heads); mae_hiera_tiny is its 46-wide Hiera-Tiny")
    g.add_argument("--input_size", type=int, default=224, help="a multiple of 32 for a Hiera")
    g.add_argument("--patch_size", type=int, default=None, help="override the preset's patch size (ViT)")
    g.add_argument("--num_heads", type=int, default=None,
                   help="override the encoder's (first stage's) head count (MAE-Lite's tiny ViT: 12)")
    g.add_argument("--decoder_embed_dim", type=int, default=None)
    g.add_argument("--decoder_depth", type=int, default=None)
    g.add_argument("--decoder_num_heads", type=int, default=None)
    g.add_argument("--mask_ratio", type=float, default=None, help="fraction of patches (ViT) or mask "
                   "units (Hiera) removed; default 0.75 ViT, 0.6 Hiera (MAE-Lite's Hiera: 0.4)")
    g.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="predict per-patch normalized pixels (the paper's recipe)")
    g.add_argument("--min_crop_scale", type=float, default=0.2,
                   help="RandomResizedCrop scale=(min, 1): 0.2 MAE, 0.08 MAE-Lite tiny")
    util.add_optim_args(p, batch_size=64, epochs=400, warmup_epochs=40, blr=1.5e-4, weight_decay=0.05)
    util.add_data_args(p, gpu_decode=True)
    util.add_run_args(p, output_dir="runs/mae")
    return p


# ----------------------------------------------------------------------------
# Masking and patches (module-level: the reference pieces other code compares against)


def random_masking(x, mask_ratio, noise=None, len_keep=None):
    """Per-sample random masking by argsort of uniform noise (small noise = kept).

    x: [N, L, D] tokens; noise: optional [N, L] (fixes the mask, for comparisons).
    Returns x_masked [N, len_keep, D], mask [N, L] (1 = removed, 0 = kept, in the
    original order) and ids_restore [N, L] (inverse permutation). len_keep defaults to
    MAE's int(L * (1 - mask_ratio)); AMD's count differs (distill_pretrain.amd_keep_counts).
    """
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio)) if len_keep is None else len_keep
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_masked = gather_tokens(x, ids_shuffle[:, :len_keep])
    mask = torch.ones(N, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original patch order
    return x_masked, mask, ids_restore


def patchify(imgs, p):
    """[N, C, H, W] -> [N, L, p*p*C], channels fastest within a patch (MAE's order)."""
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)


def unpatchify(x, p):
    """[N, L, p*p*C] -> [N, C, H, W] for a square grid."""
    h = int(x.shape[1] ** 0.5)
    assert h * h == x.shape[1], f"{x.shape[1]} patches do not form a square grid"
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, p=p, q=p)


# ----------------------------------------------------------------------------
# The model: a ViT encoder (vit.py, same parameter names) plus MAE's decoder


class MaskedAutoencoderViT(VisionTransformer):
    """MAE with the official parameter names: the encoder's are vit.py's (so official
    _full / visualize checkpoints load strictly and the encoder loads into a plain
    ViT), plus decoder_embed, mask_token, decoder_pos_embed (fixed sin-cos),
    decoder_blocks.i.*, decoder_norm, decoder_pred.

    decode_layer: the block whose output, through `norm`, the decoder reads (default: the
    last). D²-MAE (distill_pretrain.py --method d2) decodes block 8's; recorded in the config
    so its reconstructions are drawn from the block it was trained on."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_pix_loss=False, decode_layer=None):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         pos_embed="sincos")
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                           decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                           norm_pix_loss=norm_pix_loss, decode_layer=decode_layer)
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        self.decode_layer = depth if decode_layer is None else decode_layer
        if not 1 <= self.decode_layer <= depth:
            raise ValueError(f"decode_layer {decode_layer} is not a block of the {depth}-block encoder")
        n = self.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + n, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        # The encoder was initialised by VisionTransformer (MAE's scheme); now the decoder.
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(self.init_module)
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            self.decoder_pos_embed.copy_(sincos_pos_embed(decoder_embed_dim, self.patch_embed.grid_size)[None])

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.embed(imgs)  # [N, L, D], position embedding added BEFORE masking
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        if self.decode_layer < self.depth:  # D²-MAE: block k's output, the blocks after it not run
            k = self.decode_layer
            return self.norm(self.encode(x, layers=(k,), stop_at=k).layers[k]), mask, ids_restore
        return self.encode(x).x, mask, ids_restore  # cls prepended inside; [N, 1 + len_keep, D]

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)  # [N, 1 + len_keep, Dd]
        n_masked = ids_restore.shape[1] + 1 - x.shape[1]
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(x.shape[0], n_masked, -1)], dim=1)
        x_ = torch.gather(x_, 1, repeat(ids_restore, "n l -> n l d", d=x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # [N, 1 + L, Dd]
        for blk in self.decoder_blocks:
            x, _ = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [N, L, p*p*C], cls dropped

    def forward_loss(self, imgs, pred, mask, target=None):
        """Per-patch MSE averaged over removed patches (over all if none is removed).
        target: [N, L, p*p*C] to use instead of MAE's (norm-)pixel patches of imgs."""
        if target is None:
            target = self.pixel_target(imgs)
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L]
        removed = mask.sum()
        return torch.where(removed > 0, (loss * mask).sum() / removed.clamp(min=1), loss.mean())

    def to_patches(self, imgs):
        return patchify(imgs, self.patch_size)

    def from_patches(self, x):
        return unpatchify(x, self.patch_size)

    def pixel_target(self, imgs):
        """MAE's target [N, L, p*p*C]: the patches, each standardised with --norm_pix_loss."""
        target = self.to_patches(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default and MAE
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


# Encoder width/depth/heads as vit.py's presets; decoders: MAE-Lite's for tiny, MAE's otherwise.
MAE_PRESETS = {
    "mae_vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=96,
                         decoder_depth=1, decoder_num_heads=3),
    "mae_vit_small": dict(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=512,
                          decoder_depth=8, decoder_num_heads=16),
    "mae_vit_base": dict(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512,
                         decoder_depth=8, decoder_num_heads=16),
    "mae_vit_large": dict(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512,
                          decoder_depth=8, decoder_num_heads=16),
    "mae_vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14,
                         decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16),
}


def create_mae(name, **overrides):
    """A preset by name with keyword overrides (None values are ignored)."""
    if name not in MAE_PRESETS:
        raise ValueError(f"unknown MAE model {name!r}; choose from {', '.join(MAE_PRESETS)}")
    return MaskedAutoencoderViT(**{**MAE_PRESETS[name], **{k: v for k, v in overrides.items()
                                                           if v is not None}})


def mae_vit_tiny(**kw):
    return create_mae("mae_vit_tiny", **kw)


def mae_vit_small(**kw):
    return create_mae("mae_vit_small", **kw)


def mae_vit_base(**kw):
    return create_mae("mae_vit_base", **kw)


def mae_vit_large(**kw):
    return create_mae("mae_vit_large", **kw)


def mae_vit_huge(**kw):
    return create_mae("mae_vit_huge", **kw)


# ----------------------------------------------------------------------------
# MAE on Hiera (Ryali et al., ICML 2023), MAE-Lite's hierarchical student (IJCV 2025)
#
# The same idea at another grain: one decision per MASK UNIT (8x8 tokens = 32x32 px), the
# encoder runs on the kept units only, and the decoder predicts pred_stride = 4 * 2^q_pool px
# patches (16 px at q_pool 2: 2x2 per unit). Before decoding, the stage outputs at each
# unit's resolution are fused (multi-scale fusion): per kept unit at q_pool 2,
#     latent = encoder_norm(conv4x4/4(stage1 8x8) + conv2x2/2(stage2 4x4) + stage4 2x2)
# MAE-Lite's student keeps 60% (mask ratio 0.4: 29 of 49 units, 20 removed, 80 prediction
# tokens per image); the official Hiera default removes 60% (19 kept).


def random_unit_mask(batch_size, num_units, mask_ratio, noise=None, device=None):
    """Hiera's masking, one decision per mask unit, the way random_masking decides per patch:
    argsort of uniform noise, the int(U * (1 - mask_ratio)) smallest kept.
    noise: optional [B, U]. Returns keep [B, U] bool, True = KEEP (the official Hiera
    convention, the reverse of MAE's mask)."""
    if noise is None:
        noise = torch.rand(batch_size, num_units, device=device)
    ids_keep = torch.argsort(noise, dim=1)[:, :int(num_units * (1 - mask_ratio))]
    return torch.zeros(noise.shape, dtype=torch.bool, device=noise.device).scatter_(1, ids_keep, True)


def patchify_hiera(imgs, s):
    """[B, C, H, W] -> [B, L, C*s*s]: s x s patches in raster order, each vector ordered
    (C, py, px), channel SLOWEST (official Hiera's label; MAE's patchify is (py, px, C))."""
    return rearrange(imgs, "b c (h py) (w px) -> b (h w) (c py px)", py=s, px=s)


def unpatchify_hiera(x, s):
    """[B, L, C*s*s] -> [B, C, H, W] for a square grid (the inverse of patchify_hiera)."""
    h = int(x.shape[1] ** 0.5)
    return rearrange(x, "b (h w) (c py px) -> b c (h py) (w px)", h=h, py=s, px=s)


class MaskedAutoencoderHiera(Hiera):
    """MAE with a Hiera encoder and the official MaskedAutoencoderHiera's parameter names:
    the encoder's are hiera.py's (pos_embed, patch_embed, blocks; no norm / head), plus
    encoder_norm, multi_scale_fusion_heads.{0..q_pool-1} (convs; the last stage's head is an
    Identity), decoder_embed, mask_token, decoder_pos_embed (learned, raster over the
    (img / pred_stride)^2 grid), decoder_blocks.i.* (global-attention Hiera blocks: plain
    ViT blocks), decoder_norm, decoder_pred.

    forward(imgs, mask_ratio, noise) -> (loss, pred [B, L, C*s*s], mask [B, L]), like
    MaskedAutoencoderViT: pred for all L = (img / s)^2 patches of s = pred_stride px in raster
    order, vectors in patchify_hiera's (C, py, px) order; mask 1 where the patch's unit was
    removed. The per-unit keep mask is random_unit_mask(B, num_mask_units, mask_ratio, noise).
    Loss: per-patch MSE averaged over removed patches, target normalized per patch
    ((x - mean) / sqrt(var_unbiased + 1e-6)) when norm_pix_loss (always, officially).

    Where this differs from the official code (facebookresearch/hiera, hiera_mae.py):
    - forward returns (loss, pred of every patch, removed-patch mask) as MaskedAutoencoderViT,
      not (loss, pred[masked], label[masked], keep mask); the loss is the same number.
    - mask_ratio 0 takes the loss over all patches (the official mean of nothing is NaN).
    - norm_pix_loss can be turned off (the official label is always normalized).
    """

    def __init__(self, img_size=224, in_chans=3, embed_dim=96, num_heads=1, stages=(2, 3, 16, 3),
                 q_pool=2, mlp_ratio=4.0, decoder_embed_dim=512, decoder_depth=8,
                 decoder_num_heads=16, norm_pix_loss=True, drop_path_rate=0.0):
        super().__init__(img_size=img_size, in_chans=in_chans, embed_dim=embed_dim,
                         num_heads=num_heads, stages=stages, q_pool=q_pool, num_classes=0,
                         mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate)
        self.config = dict(img_size=img_size, in_chans=in_chans, embed_dim=embed_dim,
                           num_heads=num_heads, stages=list(stages), q_pool=q_pool,
                           mlp_ratio=mlp_ratio, decoder_embed_dim=decoder_embed_dim,
                           decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
                           norm_pix_loss=norm_pix_loss, drop_path_rate=drop_path_rate)
        self.norm_pix_loss = norm_pix_loss
        self.norm = nn.Identity()  # no classifier (the official deletes norm and head)
        C = self.num_features
        self.encoder_norm = nn.LayerNorm(C, eps=1e-6)
        # Fusion: stages 1..q_pool (their units are 8, 4, ... tokens wide) are brought to the
        # last stage's unit size (8 / 2^q_pool) and width by a conv with kernel = stride;
        # the stages after the last pooling already have it.
        self.fusion_stages = (*range(1, q_pool + 1), 4)
        self.final_unit_size = 8 // 2 ** q_pool  # tokens per unit side at the end: 2 at q_pool 2
        self.multi_scale_fusion_heads = nn.ModuleList(
            [nn.Conv2d(embed_dim * 2 ** (s - 1), C, kernel_size=2 ** (q_pool - s + 1),
                       stride=2 ** (q_pool - s + 1)) for s in range(1, q_pool + 1)] + [nn.Identity()])

        self.pred_stride = 4 * 2 ** q_pool  # px per predicted patch: 16 at q_pool 2
        self.pred_grid = self.mask_grid * self.final_unit_size  # 14 at 224 px
        self.decoder_embed = nn.Linear(C, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.pred_grid ** 2, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            HieraBlock(decoder_embed_dim, decoder_embed_dim, decoder_num_heads, mlp_ratio)
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.pred_stride ** 2 * in_chans)
        # The official MAE init, over the whole model (encoder included): xavier Linear, zero
        # bias, LayerNorm (1, 0); the patch conv as a (C0, 3*7*7) matrix. pos_embed keeps
        # Hiera's trunc-normal, the conv biases and fusion convs PyTorch's default.
        self.apply(VisionTransformer.init_module)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def forward_encoder(self, imgs, mask, **taps):
        """keep mask [B, U] -> (fused latent [B, k, r, r, C_last], the encoder's Taps).
        Keyword taps (attn=, attn_logits=, layers=, norm1=) are collected in the same pass,
        for distillation: forward_encoder(imgs, keep, attn=(12,), attn_logits=True)."""
        stages = sorted(set(self.fusion_stages) | set(taps.pop("stages", ())))
        t = self.encode(self.embed(imgs, mask), mask, stages=stages, **taps)
        x = 0.0
        for s, head in zip(self.fusion_stages, self.multi_scale_fusion_heads):
            y = rearrange(t.stages[s], "b k y x c -> (b k) c y x")  # each kept unit as an image
            x = x + rearrange(head(y), "(b k) c y x -> b k y x c", b=imgs.shape[0])
        return self.encoder_norm(x), t

    def forward_decoder(self, x, mask):
        """latent [B, k, r, r, C_last], keep mask [B, U] -> pred [B, L, C*s*s] (raster)."""
        x = self.decoder_embed(x)  # [B, k, r, r, Dd]
        full = x.new_zeros(*mask.shape, *x.shape[2:])  # [B, U, r, r, Dd]
        full[mask] = rearrange(x, "b k y x d -> (b k) y x d")  # kept units, ascending per image
        full = torch.where(rearrange(mask, "b u -> b u 1 1 1"), full, self.mask_token.to(x.dtype))
        x = rearrange(full, "b (gy gx) y x d -> b (gy y gx x) d", gy=self.mask_grid)
        x = x + self.decoder_pos_embed  # [B, L, Dd]
        for blk in self.decoder_blocks:
            x, _ = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def removed_patches(self, mask):
        """keep mask [B, U] -> [B, L] float, 1 where the predicted patch's unit was removed."""
        r = self.final_unit_size
        return repeat((~mask).float(), "b (gy gx) -> b (gy y gx x)", gy=self.mask_grid, y=r, x=r)

    def to_patches(self, imgs):
        return patchify_hiera(imgs, self.pred_stride)

    def from_patches(self, x):
        return unpatchify_hiera(x, self.pred_stride)

    def forward_loss(self, imgs, pred, mask):
        """Per-patch MSE averaged over removed patches (over all if none is removed)."""
        target = self.to_patches(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as torch's default and Hiera
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [B, L]
        removed = mask.sum()
        return torch.where(removed > 0, (loss * mask).sum() / removed.clamp(min=1), loss.mean())

    def forward(self, imgs, mask_ratio=0.6, noise=None):
        keep = random_unit_mask(imgs.shape[0], self.num_mask_units, mask_ratio, noise, imgs.device)
        latent, _ = self.forward_encoder(imgs, keep)
        pred = self.forward_decoder(latent, keep)
        mask = self.removed_patches(keep)
        return self.forward_loss(imgs, pred, mask), pred, mask


# Encoders as hiera.py's presets (q_pool 2). mae_hiera_tiny is MAE-Lite's student with its
# 96 x 1 x 3 decoder; the others are the official models (decoder 512 x 8 x 16).
MAE_HIERA_PRESETS = {
    "mae_hiera_tiny": dict(embed_dim=46, num_heads=1, stages=(1, 2, 7, 2), decoder_embed_dim=96,
                           decoder_depth=1, decoder_num_heads=3),
    "mae_hiera_base": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
    "mae_hiera_tiny_224": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
    "mae_hiera_small_224": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
    "mae_hiera_base_224": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
}


def create_mae_hiera(name, **overrides):
    """A preset by name with keyword overrides (None values are ignored)."""
    if name not in MAE_HIERA_PRESETS:
        raise util.ConfigError(f"unknown MAE-Hiera model {name!r}; choose from {', '.join(MAE_HIERA_PRESETS)}")
    return MaskedAutoencoderHiera(**{**MAE_HIERA_PRESETS[name], **{k: v for k, v in overrides.items()
                                                                   if v is not None}})


def mae_hiera_tiny(**kw):
    return create_mae_hiera("mae_hiera_tiny", **kw)


def mae_hiera_base(**kw):
    return create_mae_hiera("mae_hiera_base", **kw)


# ----------------------------------------------------------------------------
# Reconstructions


@torch.no_grad()
def reconstruct(model, imgs, mask_ratio=0.75, noise=None):
    """-> (masked, reconstruction, reconstruction with the visible patches pasted), images
    in the input's normalization, for an MAE on a ViT or a Hiera. Norm-pix predictions are
    de-normalized with each patch's own mean and variance, as MAE's visualization does."""
    _, pred, mask = model(imgs, mask_ratio, noise)
    if model.norm_pix_loss:
        target = model.to_patches(imgs)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = model.from_patches(pred.float())
    removed = model.from_patches(repeat(mask, "n l -> n l d", d=pred.shape[-1]))  # 1 = removed
    masked = imgs * (1 - removed)
    return masked, recon, masked + recon * removed


def save_reconstruction_figure(path, imgs, masked, recon, pasted, title=None):
    """A grid: one row per image; original | masked | reconstruction | + visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mean = torch.tensor(util.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(util.IMAGENET_STD).view(1, 3, 1, 1)
    cols = {"original": imgs, "masked": masked, "reconstruction": recon, "+ visible": pasted}
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n), squeeze=False)
    for c, (name, x) in enumerate(cols.items()):
        x = (x.detach().float().cpu() * std + mean).clamp(0, 1)
        for r in range(n):
            axes[r, c].imshow(x[r].permute(1, 2, 0).numpy())
            axes[r, c].axis("off")
        axes[0, c].set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_images(args, n=8):
    """n images for the reconstruction figure: the val split, else the train split, un-augmented."""
    try:
        ds, _ = util.build_dataset(args, train=False, transform=util.eval_transform(args.input_size))
    except util.ConfigError:
        ds, _ = util.build_dataset(args, train=True, transform=util.eval_transform(args.input_size))
    idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).long().tolist()
    return util.normalize(torch.stack([ds[i][0] for i in idx]))


# ----------------------------------------------------------------------------
# Training


# What a resumed run must keep: the model, and the loss it is trained with.
FIXED_ON_RESUME = (*util.FIXED_ON_RESUME, "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                   "norm_pix_loss", "mask_ratio")


def mae_step(model, batch, *, mask_ratio):
    imgs, _, noise = batch  # on the device; noise: each sample's own, drawn in the data worker
    loss, _, _ = model(imgs, mask_ratio, noise)
    return loss, {}


def check_args(args):
    """Refuse what cannot work; fill in the model's own mask ratio (recorded with the args)."""
    hiera = args.model in MAE_HIERA_PRESETS
    args.mask_ratio = args.mask_ratio if args.mask_ratio is not None else 0.6 if hiera else 0.75
    util.check_common_args(args)
    preset = {**(MAE_HIERA_PRESETS if hiera else MAE_PRESETS)[args.model], **{
        k: getattr(args, k) for k in ("num_heads", "decoder_embed_dim", "decoder_num_heads") if getattr(args, k)}}
    preset.setdefault("decoder_embed_dim", 512)  # MaskedAutoencoderHiera's defaults
    preset.setdefault("decoder_num_heads", 16)
    if hiera:
        if args.patch_size:
            raise util.ConfigError(f"--patch_size is for a ViT; {args.model} embeds 4x4 px per token "
                                   f"and predicts 16x16 px patches")
        if args.input_size % 32:
            raise util.ConfigError(f"--input_size {args.input_size}: a Hiera needs a multiple of 32 "
                                   f"(whole 32x32 px mask units)")
        units = (args.input_size // 32) ** 2
        if int(units * (1 - args.mask_ratio)) < 1:
            raise util.ConfigError(f"--mask_ratio {args.mask_ratio} keeps none of the {units} mask units of "
                                   f"a {args.input_size} px image: lower it or raise --input_size")
    elif args.input_size % (args.patch_size or preset.get("patch_size", 16)):
        raise util.ConfigError(f"--input_size {args.input_size} is not divisible by the patch size "
                               f"{args.patch_size or preset.get('patch_size', 16)}")
    check_widths(preset["embed_dim"], preset["num_heads"], preset["decoder_embed_dim"],
                 preset["decoder_num_heads"], f"--model {args.model}", sincos=not hiera)


def check_widths(width, heads, decoder_width, decoder_heads, model, sincos=True):
    """Head counts must divide the widths; the ViT decoder's fixed sin-cos embedding needs a
    multiple of 4 (a Hiera's decoder positions are learned: sincos=False)."""
    if width % heads:
        raise util.ConfigError(f"--num_heads {heads} does not divide the width {width} of {model}")
    if decoder_width % decoder_heads:
        raise util.ConfigError(f"--decoder_embed_dim {decoder_width} is not divisible by "
                               f"--decoder_num_heads {decoder_heads}")
    if sincos and decoder_width % 4:
        raise util.ConfigError(f"--decoder_embed_dim {decoder_width} must be divisible by 4 (its "
                               f"sin-cos position embedding)")


def build_mae(args):
    """The MAE of --model (a ViT or a Hiera) -> (model, masking units per image)."""
    common = dict(img_size=args.input_size, num_heads=args.num_heads, decoder_embed_dim=args.decoder_embed_dim,
                  decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads,
                  norm_pix_loss=args.norm_pix_loss)
    try:
        if args.model in MAE_HIERA_PRESETS:
            model = create_mae_hiera(args.model, **common)
            return model, model.num_mask_units
        model = create_mae(args.model, patch_size=args.patch_size, **common)
        return model, model.num_patches
    except ValueError as e:
        raise util.ConfigError(str(e)) from None


def main(args):
    check_args(args)
    dinfo = util.init_distributed(args.device)
    device = dinfo.device
    util.prepare_output_dir(args)
    transform = util.data_transform(args, util.pretrain_transform(args.input_size, args.min_crop_scale))
    dataset, _ = util.build_dataset(args, train=True, transform=transform)
    vis_imgs = figure_images(args) if dinfo.is_main else None  # fail now, not after training

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model, units = build_mae(args)
    model.to(device)
    loader = util.build_train_loader(dataset, args, dinfo, noise=units)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{args.model}: {n_params / 1e6:.2f}M trainable parameters, {units} "
           f"{'mask units' if args.model in MAE_HIERA_PRESETS else 'patches'}, "
           f"{int(units * (1 - args.mask_ratio))} kept")
    print0(f"{len(dataset)} training images, {len(loader) // args.accum_iter} steps per epoch")

    util.effective_lr(args, dinfo.world_size)
    optimizer = util.make_adamw(util.param_groups(model, args.weight_decay), args.lr, (0.9, 0.95), device)
    autocast, scaler = util.amp_setup(args.precision, device)
    start_epoch, _ = util.resume_checkpoint(args, model, optimizer, scaler, fixed=FIXED_ON_RESUME)
    net = util.wrap_model(model, dinfo, args)
    step = partial(mae_step, mask_ratio=args.mask_ratio)
    if util.benchmark(args, net, loader, optimizer, step, device, autocast, scaler):
        return

    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = util.train_one_epoch(net, loader, optimizer, epoch, args, step, device, autocast, scaler)
        util.save_training_state(args, model, optimizer, scaler, epoch)
        util.log_stats(args.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
        print0(f"epoch {epoch}: loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  "
               f"{stats['img_per_s']:.0f} img/s  peak {stats['peak_mem_mb']:.0f} MB")

    if dinfo.is_main:
        model.eval()
        imgs = vis_imgs.to(device)
        noise = torch.rand(imgs.shape[0], units, generator=torch.Generator().manual_seed(0))
        with autocast():
            parts = reconstruct(model, imgs, args.mask_ratio, noise.to(device))
        path = Path(args.output_dir) / "reconstructions.png"
        save_reconstruction_figure(path, imgs, *parts, title=f"{args.model}, mask ratio {args.mask_ratio}")
        print0(f"saved {path}")


if __name__ == "__main__":
    util.run_main(main, get_args_parser())
