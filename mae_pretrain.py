"""MAE pre-training: "Masked Autoencoders Are Scalable Vision Learners" (He et al., CVPR 2022),
with the lightweight settings of MAE-Lite (Wang et al., ICML 2023).

The method in three lines: cut the image into patches and keep a random 25%; a ViT encodes
only the kept patches; a small decoder sees the encoded tokens plus a shared mask token at
every removed position and predicts the removed patches' pixels.

    ids_keep = argsort(noise)[:int(L * (1 - mask_ratio))]          noise ~ U[0, 1), per patch
    latent   = encoder(patches[ids_keep] + pos)                    (N, 1 + len_keep, D)
    pred     = decoder(scatter(latent, ids_keep, mask_token) + pos) (N, L, p*p*C)
    target_p = (x_p - mean(x_p)) / sqrt(var(x_p) + 1e-6)           norm_pix_loss, var unbiased
    loss     = sum_p mask_p * mean_j (pred_pj - target_pj)^2 / sum_p mask_p   (removed patches only)

75% of the tokens never enter the encoder: with ViT-B at 224 it runs on 49 + 1 tokens instead
of 197, about 4x less encoder compute than a forward pass on the full image. A Hiera
(--model mae_hiera_*) masks whole 32x32 px units instead (hiera.py); its loss is the same.

Where this differs from the official code (facebookresearch/mae):
- random_masking works on the noise and returns the kept ids; the decoder scatters the kept
  tokens among the mask tokens (the official unshuffles with ids_restore: the same tensor).
- The model returns (pred, target patches, mask) and `mae_loss` takes the loss; the official
  forward returns (loss, pred, mask).
- cls_token and mask_token get no weight decay (the official pre-training decays them).
- Each sample's crop and mask come from an RNG seeded by (seed, epoch, index) (data.py), so a
  run is the same on 1 or N GPUs and a resumed run continues exactly.
- --mask_ratio 0 takes the loss over all patches (the official divides by zero).
- --norm_pix_loss defaults to on (the paper's recipe; the official flag defaults to off).
- The crop is resized with torch's antialiased bicubic on uint8 (Keys a = -0.75; PIL's has
  a = -0.5), and a JPEG whose crop is at least twice the output is decoded at 1/2, 1/4 or 1/8
  scale by libjpeg first: the same augmentation up to the kernel, 1.7x cheaper per image.
"""
import argparse
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange, repeat

import data
import hiera
import util
from util import print0
from vit import Block, VisionTransformer, init_weights, sincos_pos_embed

# ----------------------------------------------------------------------------
# Masking, patches and the loss


def random_masking(noise, mask_ratio, len_keep=None):
    """Per-sample random masking by argsort of uniform noise [N, L] (small noise = kept).
    Returns ids_keep [N, len_keep] (kept patches, in ascending order of noise) and mask
    [N, L] (1 = removed, 0 = kept, in the original patch order). len_keep defaults to MAE's
    int(L * (1 - mask_ratio)); AMD's count differs (distill_pretrain.amd_keep_counts)."""
    N, L = noise.shape
    len_keep = int(L * (1 - mask_ratio)) if len_keep is None else len_keep
    ids_keep = torch.argsort(noise, dim=1)[:, :len_keep]
    return ids_keep, torch.ones_like(noise).scatter_(1, ids_keep, 0.0)


def patchify(imgs, p):
    """[N, C, H, W] -> [N, L, p*p*C], channels fastest within a patch (MAE's order)."""
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)


def unpatchify(x, p):
    """[N, L, p*p*C] -> [N, C, H, W] for a square grid."""
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=round(x.shape[1] ** 0.5), p=p, q=p)


def mae_loss(pred, target, mask, norm_pix=True):
    """MAE's loss: pred, target [N, L, P] (target: the raw patches), mask [N, L] (1 = removed).
    With norm_pix each target patch is standardised over its P values, (t - mean) /
    sqrt(var + 1e-6), var unbiased. Per-patch MSE averaged over the removed patches (over all
    of them when none is removed). A Hiera's MAE uses it as it is."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L]
    removed = mask.sum()
    return torch.where(removed > 0, (loss * mask).sum() / removed.clamp(min=1), loss.mean())


# ----------------------------------------------------------------------------
# The model: a ViT encoder (vit.py, same parameter names) plus MAE's decoder


class MaskedAutoencoderViT(VisionTransformer):
    """MAE with the official parameter names: the encoder's are vit.py's (so official _full /
    visualize checkpoints load strictly and the encoder loads into a plain ViT), plus
    decoder_embed, mask_token, decoder_pos_embed (fixed sin-cos), decoder_blocks.i.*,
    decoder_norm, decoder_pred.

    decode_layer: the block whose output, through `norm`, the decoder reads (default: the
    last). D²-MAE (distill_pretrain.py --method d2) decodes block 8's; it lives here, recorded in
    the config, so that analyze.py rebuilds any MAE student with this one class."""

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
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        # The encoder was initialised by VisionTransformer (MAE's scheme); now the decoder.
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        with torch.no_grad():
            self.decoder_pos_embed.copy_(sincos_pos_embed(decoder_embed_dim, self.patch_embed.grid_size)[None])

    def masking(self, noise, mask_ratio):
        """noise [N, L] -> (ids_keep [N, len_keep], mask [N, L] 1 = removed): random_masking."""
        return random_masking(noise, mask_ratio)

    def forward_encoder(self, imgs, ids_keep, **taps):
        """-> (latent [N, 1 + len_keep, D], the encoder's Taps). The position embedding is added
        BEFORE masking; keyword taps (attn=, layers=, ...) are collected in the same pass."""
        x = self.embed(imgs, ids_keep)  # [N, len_keep, D]
        if self.decode_layer < self.depth:  # D²-MAE: block k's output, the blocks after it not run
            k = self.decode_layer
            t = self.encode(x, layers=(k,), stop_at=k, **taps)
            return self.norm(t.layers[k]), t
        t = self.encode(x, **taps)  # the cls token is prepended inside
        return t.x, t

    def forward_decoder(self, x, ids_keep):
        """latent [N, 1 + len_keep, D] -> pred [N, L, p*p*C] (the cls output dropped)."""
        x = self.decoder_embed(x)  # [N, 1 + len_keep, Dd]
        N, L, Dd = x.shape[0], self.num_patches, x.shape[-1]
        full = self.mask_token.expand(N, L, Dd).scatter(  # each kept token back at its position
            1, repeat(ids_keep, "n k -> n k d", d=Dd), x[:, 1:].to(self.mask_token.dtype))
        x = torch.cat([x[:, :1].to(full.dtype), full], dim=1) + self.decoder_pos_embed  # [N, 1 + L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def patchify(self, imgs):
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """-> (pred [N, L, p*p*C], target: the patches of imgs [N, L, p*p*C], mask [N, L])."""
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.num_patches, device=imgs.device)
        ids_keep, mask = self.masking(noise, mask_ratio)
        latent, _ = self.forward_encoder(imgs, ids_keep)
        return self.forward_decoder(latent, ids_keep), self.patchify(imgs), mask


# Encoder width/depth/heads as vit.py's presets; decoders: MAE-Lite's for tiny, MAE's otherwise.
MAE_PRESETS = {
    "mae_vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=96,
                         decoder_depth=1, decoder_num_heads=3),
    "mae_vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "mae_vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}


def create_mae(name, **overrides):
    """A preset by name (a ViT, or a Hiera: hiera.MAE_HIERA_PRESETS) with keyword overrides
    (None values are ignored)."""
    if name in hiera.MAE_HIERA_PRESETS:
        return hiera.create_hiera(name, **overrides)
    if name not in MAE_PRESETS:
        raise ValueError(f"unknown MAE model {name!r}; choose from {', '.join(MAE_PRESETS)}")
    return MaskedAutoencoderViT(**{**MAE_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


# ----------------------------------------------------------------------------
# Training. mae_step is the loss of one batch; util.train_one_epoch (the same for every
# stage) runs it as
#     for i, batch in enumerate(loader):              # batch: (imgs, labels, noise)
#         if i % accum_iter == 0: set every group's lr to cosine_lr(epoch + i / len(loader))
#         with autocast(): loss, terms = mae_step(model, batch, ...)
#         (loss / accum_iter).backward()             # DDP all-reduces on the last micro-batch
#         if (i + 1) % accum_iter == 0: clip (--clip_grad), optimizer.step(), zero_grad()


def mae_step(model, batch, *, mask_ratio, norm_pix):
    imgs, _, noise = batch  # on the device; noise: each sample's own, drawn in the data worker
    pred, target, mask = model(imgs, mask_ratio, noise)
    return mae_loss(pred, target, mask, norm_pix), {}


# ----------------------------------------------------------------------------
# Reconstructions


@torch.no_grad()
def reconstruct(model, imgs, mask_ratio=0.75, noise=None):
    """-> (masked, reconstruction, reconstruction with the visible patches pasted), images in
    the input's normalization, for an MAE on a ViT or a Hiera. Norm-pix predictions are
    de-normalized with each patch's own mean and variance, as MAE's visualization does."""
    pred, target, mask = model(imgs, mask_ratio, noise)
    if model.norm_pix_loss:
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = model.unpatchify(pred.float())
    removed = model.unpatchify(repeat(mask, "n l -> n l d", d=pred.shape[-1]))  # 1 = removed
    masked = imgs * (1 - removed)
    return masked, recon, masked + recon * removed


def save_reconstruction_figure(path, imgs, masked, recon, pasted, title=None):
    """A PNG grid at `path` (a file name or an open file): one row per image; original |
    masked | reconstruction | + visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, 4, figsize=(8, 2 * n), squeeze=False)
    for c, (name, x) in enumerate({"original": imgs, "masked": masked, "reconstruction": recon,
                                   "+ visible": pasted}.items()):
        x = (x.detach().float().cpu() * std + mean).clamp(0, 1)
        for r in range(n):
            axes[r, c].imshow(x[r].permute(1, 2, 0).numpy())
            axes[r, c].axis("off")
        axes[0, c].set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------
# Command line


def get_args_parser():
    p = argparse.ArgumentParser("MAE pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mae_vit_tiny", choices=[*MAE_PRESETS, *hiera.MAE_HIERA_PRESETS],
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
    data.add_data_args(p)
    util.add_run_args(p, output_dir="runs/mae")
    return p


# What a resumed run must keep: the model, and the loss it is trained with.
FIXED_ON_RESUME = (*util.FIXED_ON_RESUME, "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                   "norm_pix_loss", "mask_ratio")


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


def check_masking(args, patch):
    """Whole patches (a ViT) or mask units (a Hiera, patch None) in --input_size, and at least
    one of them kept at --mask_ratio. Returns the masking units per image."""
    if patch is None:
        try:
            hiera.check_size(args.input_size, args.mask_ratio)
        except ValueError as e:
            raise util.ConfigError(f"--input_size / --mask_ratio: {e}") from None
        return (args.input_size // 32) ** 2
    if args.input_size % patch:
        raise util.ConfigError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    L = (args.input_size // patch) ** 2
    if args.mask_ratio is not None and int(L * (1 - args.mask_ratio)) < 1:
        raise util.ConfigError(f"--mask_ratio {args.mask_ratio} keeps none of the {L} patches: lower it")
    return L


def check_args(args):
    """Refuse what cannot work; fill in the model's own mask ratio (recorded with the args).
    Returns the masking units (patches or mask units) per image."""
    is_hiera = args.model in hiera.MAE_HIERA_PRESETS
    if args.mask_ratio is None:
        args.mask_ratio = 0.6 if is_hiera else 0.75
    util.check_common_args(args)
    preset = {"decoder_embed_dim": 512, "decoder_num_heads": 16,
              **(hiera.MAE_HIERA_PRESETS if is_hiera else MAE_PRESETS)[args.model],
              **{k: getattr(args, k) for k in ("num_heads", "decoder_embed_dim", "decoder_num_heads") if getattr(args, k)}}
    if is_hiera and args.patch_size:
        raise util.ConfigError(f"--patch_size is for a ViT; {args.model} embeds 4x4 px per token and "
                               f"predicts 16x16 px patches")
    check_widths(preset["embed_dim"], preset["num_heads"], preset["decoder_embed_dim"],
                 preset["decoder_num_heads"], f"--model {args.model}", sincos=not is_hiera)
    return check_masking(args, None if is_hiera else args.patch_size or preset.get("patch_size", 16))


def main(args):
    units = check_args(args)
    dinfo = util.init_distributed(args.device, args.dist_timeout)
    device = dinfo.device
    util.prepare_output_dir(args)
    transform = data.pretrain_transform(args.input_size, args.min_crop_scale)
    dataset, _ = data.build_dataset(args, train=True, transform=transform)
    vis_imgs = data.eval_images(args) if dinfo.is_main else None  # fail now, not after training
    loader = data.build_train_loader(dataset, args, dinfo, noise=units)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = create_mae(args.model, img_size=args.input_size, patch_size=args.patch_size, num_heads=args.num_heads,
                       decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                       decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss).to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{args.model}: {n_params / 1e6:.2f}M trainable parameters, {units} "
           f"{'mask units' if isinstance(model, hiera.Hiera) else 'patches'}, {int(units * (1 - args.mask_ratio))} kept")
    util.announce(args, dinfo.world_size, len(dataset), len(loader) // args.accum_iter)
    optimizer = util.make_adamw(util.param_groups(model, args.weight_decay), args.lr, (0.9, 0.95), device)
    autocast, scaler = util.amp_setup(args.precision, device)
    start_epoch, _ = util.resume_checkpoint(args, model, optimizer, scaler, fixed=FIXED_ON_RESUME)
    net = util.wrap_model(model, dinfo, args)
    step = partial(mae_step, mask_ratio=args.mask_ratio, norm_pix=args.norm_pix_loss)
    if util.benchmark(args, net, loader, optimizer, step, device, autocast, scaler):
        return
    for epoch in range(start_epoch, args.epochs):
        stats = util.train_one_epoch(net, loader, optimizer, epoch, args, step, device, autocast, scaler)
        util.end_epoch(args, model, optimizer, scaler, epoch, stats)
    if dinfo.is_main:
        model.eval()
        imgs = vis_imgs.to(device)
        noise = torch.rand(imgs.shape[0], units, generator=torch.Generator().manual_seed(0))
        with autocast():
            parts = reconstruct(model, imgs, args.mask_ratio, noise.to(device))
        path = Path(args.output_dir) / "reconstructions.png"
        util.write_atomic(path, lambda f: save_reconstruction_figure(f, imgs, *parts,
                                                                     title=f"{args.model}, mask ratio {args.mask_ratio}"))
        print0(f"saved {path}")


if __name__ == "__main__":
    util.run_main(main, get_args_parser())
