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

Expected (ImageNet-1K top-1 after fine-tuning, PAPERS.md section 9): MAE-Tiny 78.0
(400 ep, 300 ep fine-tune), MAE ViT-B 83.6.

Where this differs from the official code (facebookresearch/mae):
- cls_token and mask_token get no weight decay (the official pre-training decays them;
  its fine-tuning does not). Documented in util.param_groups.
- Each sample's crop and mask come from an RNG seeded by (seed, epoch, index), so the
  run is the same on 1 or N GPUs and a resumed run continues exactly.
- --mask_ratio 0 is allowed: with nothing removed the loss is taken over all patches
  (the official loss divides by zero).
- --norm_pix_loss defaults to on (the paper's recipe; the official flag defaults to off).
"""
import argparse
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange, repeat
from torch.nn.parallel import DistributedDataParallel

import util
from util import print0
from vit import Block, VisionTransformer, gather_tokens, sincos_pos_embed


def get_args_parser():
    p = argparse.ArgumentParser("MAE pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="mae_vit_tiny", choices=list(MAE_PRESETS),
                   help="mae_vit_tiny has MAE-Lite's decoder (96 wide, 1 block, 3 heads)")
    g.add_argument("--input_size", type=int, default=224)
    g.add_argument("--patch_size", type=int, default=None, help="override the preset's patch size")
    g.add_argument("--num_heads", type=int, default=None,
                   help="override the encoder's head count (MAE-Lite's tiny uses 12)")
    g.add_argument("--decoder_embed_dim", type=int, default=None)
    g.add_argument("--decoder_depth", type=int, default=None)
    g.add_argument("--decoder_num_heads", type=int, default=None)
    g.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches removed")
    g.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="predict per-patch normalized pixels (the paper's recipe)")
    g.add_argument("--min_crop_scale", type=float, default=0.2,
                   help="RandomResizedCrop scale=(min, 1): 0.2 MAE, 0.08 MAE-Lite tiny")
    util.add_optim_args(p, batch_size=64, epochs=400, warmup_epochs=40, blr=1.5e-4, weight_decay=0.05)
    util.add_data_args(p)
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
    decoder_blocks.i.*, decoder_norm, decoder_pred."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, norm_pix_loss=False):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         pos_embed="sincos")
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                           decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio,
                           norm_pix_loss=norm_pix_loss)
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
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

    def pixel_target(self, imgs):
        """MAE's target [N, L, p*p*C]: the patches, each standardised with --norm_pix_loss."""
        target = patchify(imgs, self.patch_size)
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
# Reconstructions


@torch.no_grad()
def reconstruct(model, imgs, mask_ratio=0.75, noise=None):
    """-> (masked, reconstruction, reconstruction with the visible patches pasted),
    images in the input's normalization. Norm-pix predictions are de-normalized with
    each patch's own mean and variance, as MAE's visualization does."""
    _, pred, mask = model(imgs, mask_ratio, noise)
    p = model.patch_size
    if model.norm_pix_loss:
        target = patchify(imgs, p)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = unpatchify(pred.float(), p)
    removed = unpatchify(repeat(mask, "n l -> n l d", d=pred.shape[-1]), p)  # 1 = removed
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
    return torch.stack([ds[i][0] for i in idx])


# ----------------------------------------------------------------------------
# Training


# What a resumed run must keep: the model, and the loss it is trained with.
FIXED_ON_RESUME = (*util.FIXED_ON_RESUME, "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                   "norm_pix_loss", "mask_ratio")


def mae_step(model, batch, *, mask_ratio, num_patches, device):
    imgs, _, seeds = batch
    noise = util.per_sample_uniform(seeds, num_patches, device)  # the sample's own mask
    loss, _, _ = model(imgs.to(device, non_blocking=True), mask_ratio, noise)
    return loss, {}


def check_args(args):
    util.check_common_args(args)
    preset = {**MAE_PRESETS[args.model], **{k: getattr(args, k) for k in (
        "patch_size", "num_heads", "decoder_embed_dim", "decoder_num_heads") if getattr(args, k)}}
    patch = preset.get("patch_size", 16)
    if args.input_size % patch:
        raise util.ConfigError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    check_widths(preset["embed_dim"], preset["num_heads"], preset["decoder_embed_dim"],
                 preset["decoder_num_heads"], f"--model {args.model}")


def check_widths(width, heads, decoder_width, decoder_heads, model):
    """Head counts must divide the widths; the fixed sin-cos embeddings need multiples of 4."""
    if width % heads:
        raise util.ConfigError(f"--num_heads {heads} does not divide the width {width} of {model}")
    if decoder_width % decoder_heads or decoder_width % 4:
        raise util.ConfigError(f"--decoder_embed_dim {decoder_width} must be divisible by "
                               f"--decoder_num_heads {decoder_heads} and by 4 (its sin-cos position "
                               f"embedding)")


def main(args):
    check_args(args)
    dinfo = util.init_distributed(args.device)
    device = dinfo.device
    util.prepare_output_dir(args)
    dataset, _ = util.build_dataset(args, train=True,
                                    transform=util.pretrain_transform(args.input_size, args.min_crop_scale))
    loader = util.build_train_loader(dataset, args, dinfo)
    vis_imgs = figure_images(args) if dinfo.is_main else None  # fail now, not after training

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    try:
        model = create_mae(args.model, img_size=args.input_size, patch_size=args.patch_size,
                           num_heads=args.num_heads, decoder_embed_dim=args.decoder_embed_dim,
                           decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads,
                           norm_pix_loss=args.norm_pix_loss).to(device)
    except ValueError as e:
        raise util.ConfigError(str(e)) from None
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{args.model}: {n_params / 1e6:.2f}M trainable parameters, {model.num_patches} patches, "
           f"{int(model.num_patches * (1 - args.mask_ratio))} kept")
    print0(f"{len(dataset)} training images, {len(loader) // args.accum_iter} steps per epoch")

    util.effective_lr(args, dinfo.world_size)
    optimizer = util.make_adamw(util.param_groups(model, args.weight_decay), args.lr, (0.9, 0.95), device)
    autocast, scaler = util.amp_setup(args.precision, device)
    start_epoch, _ = util.resume_checkpoint(args, model, optimizer, scaler, fixed=FIXED_ON_RESUME)

    net = model
    if dinfo.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[dinfo.local_rank] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    step = partial(mae_step, mask_ratio=args.mask_ratio, num_patches=model.num_patches, device=device)

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
        noise = torch.rand(imgs.shape[0], model.num_patches, generator=torch.Generator().manual_seed(0))
        with autocast():
            parts = reconstruct(model, imgs, args.mask_ratio, noise.to(device))
        path = Path(args.output_dir) / "reconstructions.png"
        save_reconstruction_figure(path, imgs, *parts, title=f"{args.model}, mask ratio {args.mask_ratio}")
        print0(f"saved {path}")


if __name__ == "__main__":
    util.run_main(main, get_args_parser())
