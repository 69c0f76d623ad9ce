"""Layer analysis of pre-trained ViTs: layer-to-layer CKA, attention distance and entropy,
and MAE reconstructions (the analysis protocol of MAE-Lite, Wang et al., ICML 2023).

MAE-Lite's finding, which this file lets you check on your own checkpoints: MAE
pre-training learns a small ViT's lower layers well but its HIGHER layers poorly (seen in
layer-to-layer CKA against other models and in the attention statistics), which hurts
data-poor downstream tasks; distilling a large MAE teacher's attention into the student
during pre-training (distill_pretrain.py) repairs much of it.

Features, as MAE-Lite takes them: for each block i its LayerNorm'd input (norm1), plus the
final normalized output; per image the patch tokens (cls removed) are flattened into one
vector. A model of depth L gives L + 1 feature sets, labelled 1..L and 'out'.

Linear CKA (Kornblith et al. 2019) of X (n, p) and Y (n, q), features centred over the n images:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)       in [0, 1]

invariant to orthogonal maps, isotropic scaling and translation, not to general linear
maps. With few images and many features it is biased towards 1; the debiased form
replaces each HSIC by the unbiased estimator of Song et al. (2012), on Gram matrices
K = X X^T and L = Y Y^T with their diagonals set to zero:

    HSIC_1(K, L) = [tr(K L) + (1^T K 1)(1^T L 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K L 1] / (n(n-3))

which needs n >= 4 and can be negative. Minibatch CKA (Nguyen et al. 2021), what the
analysis runs: SUM HSIC_1 over batches for every layer pair (X_i, Y_j), (X_i, X_i) and
(Y_j, Y_j), then CKA_ij = sum HSIC_1(K_i, L_j) / sqrt(sum HSIC_1(K_i, K_i) sum HSIC_1(L_j, L_j)).
Memory is a few n x n Gram matrices per layer, whatever the number of images.

Attention statistics, per layer and head: drop the cls token from queries and keys and
renormalize each row over the P patch keys (p_qk), then average over queries and images:

    distance = sum_k p_qk * ||pos_q - pos_k|| * patch_size     (pixels; pos on the patch grid)
    entropy  = -sum_k p_qk log p_qk                             (nats)

Uniform attention on a 14x14 grid gives 7.2808 patches (116.49 px at patch 16) and
ln 196 = 5.278 nats. That entropy is the largest possible; the distance is a reference,
not a bound (a head that looks at far patches exceeds it).

Commands (the built-in synthetic data is used when --data_path is not given):
    # the README's example: two mae_pretrain.py checkpoints at 32x32 (CPU, about a minute)
    python analyze.py runs/mae_tiny/checkpoint.pth runs/mae_small/checkpoint.pth \\
        --names MAE-Tiny MAE-Small --output_dir runs/analysis
    # MAE-Lite's comparison on ImageNet val: MAE student, distilled student, MAE-Base teacher
    python analyze.py runs/mae_tiny/checkpoint.pth runs/dmae_tiny/checkpoint.pth \\
        mae_pretrain_vit_base.pth --names MAE-Tiny D-MAE-Tiny MAE-Base \\
        --data_path /data/imagenet --output_dir runs/analysis
    # Hiera checkpoints (MAE-Hiera, distilled), here next to a ViT at 224 px (README: Hiera)
    python analyze.py mae_hiera_base_224.pth runs/dmae_hiera_tiny/checkpoint.pth \\
        mae_pretrain_vit_base.pth --names MAE-Hiera-Base D-MAE-Hiera-Tiny MAE-Base \\
        --data_path /data/imagenet --output_dir runs/analysis_hiera
    # reconstructions from the official visualization model (it has the decoder)
    python analyze.py mae_visualize_vit_large.pth --data_path /data/imagenet --output_dir runs/vis

Outputs in --output_dir: cka_<A>_vs_<B>.npy for every pair (A vs A included), rows A's
layers, columns B's; cka.png, one heatmap per pair; attention.json and attention_<A>.npy
(2, layers, heads: distance, entropy); attention.png; reconstructions_<A>.png for each
checkpoint that has an MAE decoder.

Reading the figures. CKA heatmap: layer 1 at the bottom-left, colour 0 (unrelated) to 1
(the same up to rotation and scale). Within one model a bright block over the top layers
means they compute nearly the same thing (they add little); across two models a bright
diagonal means layer i of one matches layer i of the other. Attention plot: one dot per
head, a line for the mean over heads; distance rising with depth and spread over heads
means global attention, and low entropy means each query looks at few patches.

Choices and deviations:
- The images: --num_images of the un-augmented val split (train when there is no val/),
  a random subset drawn with --seed (ImageNet's val folders are sorted by class, so the
  first 1024 would cover 20 classes). MAE-Lite's tool takes the first ~1024 images of its
  eval loader in batches of 128.
- Batches are all --batch_size images except the last; a last batch of fewer than 4 (where
  HSIC_1 is undefined) is merged into the one before instead of being dropped.
- Everything runs in float32 (no autocast); Gram matrices, HSIC sums and the attention
  statistics are accumulated in float64.
- A mean-pooled fine-tuned checkpoint has no `norm`: its 'out' is the last block's output
  (MAE-Lite's tool passes it through a freshly initialised fc_norm instead: a LayerNorm with
  weight 1 and bias 0, which changes CKA little but not nothing).
- Distances are in pixels (patch-grid distance x patch size). MAE-Lite's tool multiplies
  the grid distance by 14 whatever the patch size: to compare with its figures, divide ours
  by the patch size and multiply by 14 (at patch 16 that is x 0.875).
- The head count is not in the weights: it comes from the checkpoint's recorded config,
  else from the width (192 -> 3, as DeiT; MAE-Lite's tiny has 12: pass --num_heads 12).
  The MAE decoder's head count likewise, else decoder width // 32 (MAE 512 -> 16, MAE-Lite
  96 -> 3). CKA does not depend on it; the attention statistics do.
- norm_pix_loss for reconstructions: the value recorded in the checkpoint, else the flag,
  else off for mae_visualize_* (the MAE demo: "trained with pixels as targets for
  visualization") and on otherwise (the paper's recipe, PRETRAIN.md).

Hiera checkpoints (hiera.py: official MAE-Hiera or classifier files, timm's, this project's
MAE-Hiera, distilled and fine-tuned ones) are analysed alongside ViTs, as the encoder they
were trained as (q_pool 2 for an MAE-Hiera or a distilled student, a classifier's 3), on the
full image (no mask), at an --input_size that is a multiple of 32:
- Features: each block's norm1 output, flattened over tokens and channels, plus 'out': the
  last block's output through a LayerNorm WITHOUT affine parameters (an MAE-Hiera has no
  token-wise final norm: its encoder_norm comes after the fusion, a classifier's norm after
  the pooling). The tokens are in Hiera's unrolled order, not raster: linear CKA does not
  depend on it, as a fixed permutation of the feature columns leaves every Gram matrix X X^T
  unchanged. Blocks of a Hiera and of a ViT compare like any two layers (features per image).
- Attention, defined per block over what that block attends to: within each mask unit (its
  window) for the mask-unit blocks, over all tokens for the global ones. Each token sits at the
  pixel centre of its area (4, 8, 16 or 32 px wide as the map is pooled); a pooled query at
  the centre of its 2x2 block, its keys at the previous resolution. For probabilities p_qk
  over the keys of the query's window:
      distance = sum_k p_qk ||c_q - c_k||  (px),   entropy = -sum_k p_qk log p_qk  (nats)
  averaged over queries, windows and images. Uniform attention differs from block to block
  (its entropy is ln of the keys per window: ln 64 = 4.16 in stage 1's units, ln 196 = 5.28 in
  a 224-px global block at q_pool 3); attention.json records it per block and attention.png
  draws it as a dotted line. A mask-unit block's distance is bounded by its 32-px unit's
  diagonal (token centres at most 28 sqrt(2) = 40 px apart).
- Reconstructions from a checkpoint with its MAE-Hiera decoder (mae_pretrain.reconstruct), at
  --mask_ratio, else the ratio the checkpoint records, else the official Hiera's 0.6.
"""
import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import util
from hiera import PATCH_STRIDE, Hiera, infer_hiera_config, unroll
from util import print0
from vit import VIT_PRESETS, VisionTransformer


def get_args_parser():
    p = argparse.ArgumentParser("Layer CKA, attention distance/entropy and MAE reconstructions",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="one or more checkpoints in any layout util "
                   "reads (this project's, official MAE, timm, DeiT, MAE-Lite, TinyMIM, ...)")
    p.add_argument("--names", nargs="+", default=None,
                   help="labels for the figures and file names (default: the file names)")
    p.add_argument("--output_dir", default="runs/analysis")
    g = p.add_argument_group("model (inferred from each checkpoint's weights unless given; "
                             "one value for all checkpoints or one per checkpoint)")
    g.add_argument("--model", nargs="+", default=None, choices=list(VIT_PRESETS),
                   help="build this vit.py preset instead of the inferred architecture")
    g.add_argument("--num_heads", nargs="+", type=int, default=None,
                   help="head count (not visible in the weights; 0 = recorded or from the width)")
    g.add_argument("--patch_size", type=int, default=None, help="override the patch size")
    g.add_argument("--input_size", type=int, default=None,
                   help="image size (default: the first checkpoint's; position embeddings of "
                        "other grids are interpolated)")
    g = p.add_argument_group("analysis")
    g.add_argument("--batch_size", type=int, default=64,
                   help="images per HSIC_1 term (at least 4); memory grows with it")
    g.add_argument("--num_images", type=int, default=1024, help="images analysed (MAE-Lite: 1024)")
    g.add_argument("--seed", type=int, default=0, help="picks the image subset and the masks")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g = p.add_argument_group("reconstructions")
    g.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=None,
                   help="default: for every checkpoint with an MAE decoder; --reconstruct "
                        "requires one in each, --no-reconstruct skips them")
    g.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the decoder predicts per-patch normalized pixels, when the "
                        "checkpoint does not record it (see the module docstring)")
    g.add_argument("--mask_ratio", type=float, default=None,
                   help="default: the ratio the checkpoint records, else 0.75 for a ViT and 0.6 "
                        "for a Hiera")
    util.add_data_args(p)
    return p


# ----------------------------------------------------------------------------
# CKA


def hsic1(K, L):
    """Unbiased HSIC estimator (Song et al. 2012) of Gram matrices K, L (..., n, n), n >= 4.

    HSIC_1 = [tr(K L) + (1^T K 1)(1^T L 1)/((n-1)(n-2)) - 2/(n-2) 1^T K L 1] / (n(n-3)),
    K and L with zeroed diagonals. Leading dimensions broadcast: K (a, 1, n, n) with
    L (1, b, n, n) gives all a x b pairs. Returns float64 (...)."""
    n = K.shape[-1]
    if n < 4:
        raise ValueError(f"HSIC_1 needs at least 4 samples, got {n}")
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=K.device)
    K, L = K.double() * off_diagonal, L.double() * off_diagonal
    Kr, Lr = K.sum(-1), L.sum(-1)  # K 1 and L 1, (..., n)
    trace_KL = (K * L).sum((-2, -1))  # tr(K L) = sum_ij K_ij L_ji, L symmetric
    KL = (Kr * Lr).sum(-1)  # 1^T K L 1 = (K 1) . (L 1), K symmetric
    return (trace_KL + Kr.sum(-1) * Lr.sum(-1) / ((n - 1) * (n - 2)) - 2 / (n - 2) * KL) / (n * (n - 3))


def linear_cka(x, y, debiased=False):
    """Linear CKA of features x (n, p) and y (n, q) of the same n samples (float64 scalar).

    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features. Debiased: each of the
    three terms becomes n(n-3) HSIC_1 of the linear Gram matrices, which for centred
    features is (r_x, r_y: the rows' squared norms, the Grams' diagonals)
        ||Y^T X||_F^2 - n/(n-2) r_x . r_y + sum(r_x) sum(r_y) / ((n-1)(n-2))
    (the common factor 1/(n(n-3)) cancels). When features outnumber samples, the terms
    are computed from the n x n Gram matrices instead: ||Y^T X||_F^2 = <X X^T, Y Y^T>_F."""
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    n, p, q = x.shape[0], x.shape[1], y.shape[1]
    if p * q <= n * n:  # the (q, p) cross-covariance is the smaller matrix
        xy, xx, yy = (y.T @ x).square().sum(), (x.T @ x).square().sum(), (y.T @ y).square().sum()
    else:
        K, L = x @ x.T, y @ y.T
        xy, xx, yy = (K * L).sum(), K.square().sum(), L.square().sum()
    if debiased:
        if n < 4:
            raise ValueError(f"debiased CKA needs at least 4 samples, got {n}")
        rx, ry = x.square().sum(1), y.square().sum(1)

        def unbiased(dot, r1, r2):
            return dot - n / (n - 2) * (r1 @ r2) + r1.sum() * r2.sum() / ((n - 1) * (n - 2))
        xy, xx, yy = unbiased(xy, rx, ry), unbiased(xx, rx, rx), unbiased(yy, ry, ry)
    return xy / (xx * yy).sqrt()


def gram_stack(features):
    """[(n, features_i)] -> (len, n, n) float64 linear Gram matrices, one layer at a time."""
    return torch.stack([f.double() @ f.double().T for f in features])


class MinibatchCKA:
    """Minibatch linear CKA between every layer of X and every layer of Y: HSIC_1 terms
    are SUMMED over batches and the ratio is formed once at the end (Nguyen et al. 2021).

        acc = MinibatchCKA(len(xs), len(ys))
        for batch: acc.update(xs, ys)    # lists of (n, features) tensors, n >= 4
        cka = acc.compute()              # (len(xs), len(ys)) float64
    """

    def __init__(self, num_x_layers, num_y_layers):
        self.xy = torch.zeros(num_x_layers, num_y_layers, dtype=torch.float64)
        self.xx = torch.zeros(num_x_layers, dtype=torch.float64)
        self.yy = torch.zeros(num_y_layers, dtype=torch.float64)

    def update(self, xs, ys):
        self.update_grams(gram_stack(xs), gram_stack(ys))

    def update_grams(self, K, L):
        """K (x_layers, n, n), L (y_layers, n, n): Gram matrices of one batch."""
        self.xy += hsic1(K[:, None], L[None]).cpu()
        self.xx += hsic1(K, K).cpu()
        self.yy += hsic1(L, L).cpu()

    def compute(self):
        return self.xy / torch.outer(self.xx, self.yy).sqrt()


# ----------------------------------------------------------------------------
# Attention statistics


def patch_attention(probs):
    """Attention probabilities (B, heads, 1+P, 1+P), cls first -> (B, heads, P, P):
    the cls query and key dropped, each row renormalized over the P patch keys."""
    a = probs[:, :, 1:, 1:]
    return a / a.sum(-1, keepdim=True)


def patch_distances(grid_size, patch_size, device=None):
    """(P, P) Euclidean distances in pixels between the patches of a row-major grid."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64, device=device),
                                torch.arange(gw, dtype=torch.float64, device=device), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (P, 2) in patches
    return torch.cdist(pos, pos) * patch_size


def attention_distance(attn, grid_size, patch_size):
    """Mean attention distance in pixels per head: attn (B, heads, P, P), patch keys only,
    rows summing to 1 -> (heads,) = mean over images and queries of sum_k p_qk d_qk."""
    d = patch_distances(grid_size, patch_size, attn.device)
    B, _, P, _ = attn.shape
    return torch.einsum("bhqk,qk->h", attn.double(), d) / (B * P)


def attention_entropy(attn):
    """Mean attention entropy in nats per head: attn (B, heads, P, P) -> (heads,)
    = mean over images and queries of -sum_k p_qk log p_qk (0 log 0 = 0)."""
    return -torch.special.xlogy(attn.double(), attn.double()).sum(-1).mean((0, 2))


class AttentionStats:
    """Running per-layer, per-head means of attention distance and entropy over images.
    A list per layer, as the head count may change with depth (TinyMIM's last block)."""

    def __init__(self, depth, grid_size, patch_size):
        self.grid_size, self.patch_size, self.images = grid_size, patch_size, 0
        self.distance, self.entropy = [0.0] * depth, [0.0] * depth

    def update(self, attns):
        """attns: per layer (B, heads, P, P) patch-only probabilities."""
        for k, a in enumerate(attns):
            dist = attention_distance(a, self.grid_size, self.patch_size).cpu()
            self.distance[k] = self.distance[k] + dist * len(a)  # sums over images
            self.entropy[k] = self.entropy[k] + attention_entropy(a).cpu() * len(a)
        self.images += len(attns[0])

    def compute(self):
        """-> (distance_px, entropy_nats), each [layer][head] lists of floats."""
        return ([(d / self.images).tolist() for d in self.distance],
                [(e / self.images).tolist() for e in self.entropy])


# ----------------------------------------------------------------------------
# Features, through vit.py's public taps


@torch.no_grad()
def layer_features(model, imgs):
    """-> (features, attention): depth + 1 tensors (B, P*D), each block's norm1 output and
    the final normalized output with the cls token removed and the patch tokens flattened;
    and depth tensors (B, heads, P, P) of patch-only attention probabilities."""
    if isinstance(model, Hiera):
        return hiera_layer_features(model, imgs)
    layers = range(1, model.depth + 1)
    taps = model.encode(model.embed(imgs), norm1=layers, attn=layers)
    tokens = [taps.norm1[k] for k in layers] + [taps.x]  # each (B, 1+P, D)
    features = [rearrange(t[:, 1:], "b p d -> b (p d)") for t in tokens]
    return features, [patch_attention(taps.attn[k]) for k in layers]


# ----------------------------------------------------------------------------
# Hiera: features, attention over each block's windows, the encoder of a checkpoint


@torch.no_grad()
def hiera_layer_features(model, imgs):
    """A Hiera's (features, attention), as layer_features: depth + 1 tensors (B, n*C), each
    block's norm1 output and the last block's output LayerNorm'd without affine parameters,
    tokens in the unrolled order (CKA does not see the order); and per block the attention
    probabilities (B, heads, windows, Tq, Tk), one window for a global block."""
    layers = range(1, model.depth + 1)
    taps = model.encode(model.embed(imgs), norm1=layers, attn=layers)
    out = F.layer_norm(taps.x, taps.x.shape[-1:], eps=1e-6)  # (B, n, C_last)
    features = [rearrange(t, "b n c -> b (n c)") for t in [*(taps.norm1[k] for k in layers), out]]
    attns = [a if a.ndim == 5 else a[:, :, None] for a in (taps.attn[k] for k in layers)]
    return features, attns


def hiera_token_centres(model):
    """Per block, the pixel centres (y, x) of its queries (windows, Tq, 2) and keys (windows,
    Tk, 2), laid out as its attention is. Each token's centre goes through the model's own
    reordering: unroll, then at every q-pooling the mean of the 4 tokens the max pools (the
    centre of the 2x2 block); keys are a block's input tokens, queries its pooled ones."""
    n, s = model.token_grid, PATCH_STRIDE
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    pos = torch.stack([rows, cols], -1).double() * s + s / 2  # (n, n, 2) px
    pos = unroll(rearrange(pos, "h w c -> 1 (h w) c"), model.mask_grid)[0]  # (N, 2), unrolled order
    centres = []
    for blk in model.blocks:
        a = blk.attn
        windows = pos.shape[0] // (a.q_stride * a.window_size) if a.use_mask_unit_attn else 1
        keys = rearrange(pos, "(t w) c -> w t c", w=windows)
        queries = reduce(keys, "w (s t) c -> w t c", "mean", s=a.q_stride)
        centres.append((queries, keys))
        pos = rearrange(queries, "w t c -> (t w) c")  # the block's output order
    return centres


class HieraAttentionStats(AttentionStats):
    """AttentionStats for a Hiera: distance between pixel centres within the window each block
    attends over (the module docstring); `uniform` holds uniform attention's (distance px,
    entropy nats) per block."""

    def __init__(self, model):
        super().__init__(model.depth, grid_size=None, patch_size=None)
        self.distances = [torch.cdist(q, k) for q, k in hiera_token_centres(model)]  # (windows, Tq, Tk)
        self.uniform = [(d.mean().item(), math.log(d.shape[-1])) for d in self.distances]

    def update(self, attns):
        """attns: per block (B, heads, windows, Tq, Tk) probabilities."""
        for k, (a, d) in enumerate(zip(attns, self.distances)):
            a = a.double()
            B, _, W, Q, _ = a.shape
            dist = torch.einsum("bhwqk,wqk->h", a, d.to(a.device)) / (B * W * Q)
            ent = -torch.special.xlogy(a, a).sum(-1).mean((0, 2, 3))
            self.distance[k] = self.distance[k] + dist.cpu() * B  # sums over images
            self.entropy[k] = self.entropy[k] + ent.cpu() * B
        self.images += len(attns[0])


NO_HIERA_DECODER = ("{path}: has no MAE-Hiera decoder, so it cannot reconstruct images: use the "
                    "official mae_hiera_*_224 file or a mae_pretrain.py --model mae_hiera_* checkpoint")


def build_hiera(path, obj, args, model_name, heads):
    """The encoder of Hiera checkpoint `path` (architecture from its weights), loaded and
    checked: q_pool as it was trained (2 for an MAE-Hiera or a distilled student, else the
    recorded one or a classifier's 3); no norm and no head (a classifier's are reported unused)."""
    if model_name:
        raise util.ConfigError(f"--model names a ViT preset; {path} is a Hiera checkpoint (its "
                               f"architecture is read from the weights): leave --model out")
    if args.patch_size:
        raise util.ConfigError(f"--patch_size is for ViTs; {path} is a Hiera (4-px tokens, 32-px mask units)")
    cfg = dict(infer_hiera_config(obj, name=path), family="Hiera")
    if heads:
        cfg.update(num_heads=heads, heads_inferred=False)
    if args.reconstruct and "decoder_embed_dim" not in cfg:
        raise util.CheckpointError(NO_HIERA_DECODER.format(path=path))
    if args.input_size is None:
        args.input_size = cfg["img_size"]
        print0(f"--input_size {args.input_size} (the first checkpoint's)")
    model = Hiera(img_size=args.input_size, in_chans=cfg["in_chans"], embed_dim=cfg["embed_dim"],
                  num_heads=cfg["num_heads"], stages=cfg["stages"], q_pool=cfg["q_pool"], num_classes=0,
                  mlp_ratio=cfg["mlp_ratio"])
    model.norm = nn.Identity()  # 'out' is normalised without the checkpoint's affine parameters
    how = "from the width: pass --num_heads if it differs" if cfg["heads_inferred"] else "given or recorded"
    print0(f"{path}: Hiera {cfg['embed_dim']} wide, stages {cfg['stages']}, heads {cfg['num_heads']} in "
           f"stage 1 ({how}), q_pool {cfg['q_pool']}, trained at {cfg['img_size']} px")
    util.load_pretrained(model, obj, allow_missing=(), name=str(path))
    return model.eval(), cfg


def mask_ratio_for(obj, args, default):
    """--mask_ratio, else the ratio the checkpoint records (its run's args, or a Hugging Face
    config.json), else `default`."""
    recorded = [r.get("mask_ratio") for r in (obj.get(k) for k in ("args", "model_config"))
                if isinstance(r, dict)] if isinstance(obj, dict) else []
    return next(r for r in (args.mask_ratio, *recorded, default) if r is not None)


def save_hiera_reconstructions(path, name, cfg, args, out, device):
    """Reconstructions of an MAE-Hiera checkpoint (its decoder), one mask decision per unit."""
    from mae_pretrain import MaskedAutoencoderHiera, figure_images, reconstruct, save_reconstruction_figure
    obj = util.load_checkpoint(path)
    norm_pix, why = norm_pix_setting(path, obj, args.norm_pix_loss)
    ratio = mask_ratio_for(obj, args, 0.6)
    mae = MaskedAutoencoderHiera(
        img_size=args.input_size, in_chans=cfg["in_chans"], embed_dim=cfg["embed_dim"],
        num_heads=cfg["num_heads"], stages=cfg["stages"], q_pool=cfg["q_pool"], mlp_ratio=cfg["mlp_ratio"],
        decoder_embed_dim=cfg["decoder_embed_dim"], decoder_depth=cfg["decoder_depth"],
        decoder_num_heads=cfg["decoder_num_heads"], norm_pix_loss=norm_pix)
    print0(f"{path}: decoder {cfg['decoder_embed_dim']} wide, {cfg['decoder_depth']} blocks, "
           f"{cfg['decoder_num_heads']} heads; norm_pix_loss={norm_pix} ({why}); mask ratio {ratio}")
    util.load_pretrained(mae, obj, allow_missing=(), name=str(path), verbose=False)
    mae = mae.to(device).eval()
    imgs = figure_images(args).to(device)
    noise = torch.rand(imgs.shape[0], mae.num_mask_units, generator=torch.Generator().manual_seed(args.seed))
    parts = reconstruct(mae, imgs, ratio, noise.to(device))
    save_reconstruction_figure(out, imgs, *parts, title=f"{name}: {ratio:g} of the 32-px mask units removed")
    print0(f"saved {out}")


# ----------------------------------------------------------------------------
# Checkpoints, names and images


def per_checkpoint(values, n, flag):
    """A flag given once (for all) or once per checkpoint -> a list of n values (None: not given)."""
    if values is None:
        return [None] * n
    if len(values) not in (1, n):
        raise util.ConfigError(f"--{flag} takes one value or one per checkpoint ({n}), got {len(values)}")
    return values * n if len(values) == 1 else list(values)


def default_names(paths):
    """File names; parent folders when they clash (runs/mae_tiny/checkpoint.pth -> mae_tiny)."""
    for names in ([Path(p).stem for p in paths], [Path(p).resolve().parent.name for p in paths]):
        if len(set(names)) == len(names):
            return names
    return [f"{Path(p).stem}_{i}" for i, p in enumerate(paths)]


def file_label(name):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def build_vit(path, obj, cfg, args, model_name, heads):
    """The encoder of checkpoint `path` as a plain ViT (no head), weights loaded and checked."""
    saved = (obj.get("model_config") if isinstance(obj, dict) else None) or {}
    cfg = dict(cfg)
    if model_name:
        cfg.update(VIT_PRESETS[model_name], heads_inferred=False)
    if args.patch_size:
        cfg["patch_size"] = args.patch_size
    if heads:
        cfg.update(num_heads=heads, heads_inferred=False)
    try:
        model = VisionTransformer(
            img_size=args.input_size, patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
            num_classes=0, embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
            mlp_ratio=cfg["mlp_ratio"], global_pool=cfg["global_pool"],
            last_block_heads=saved.get("last_block_heads"))
    except ValueError as e:
        raise util.ConfigError(f"{path}: {e}") from None
    how = ("from the width: pass --num_heads if it was trained with another count"
           if cfg["heads_inferred"] else "given or recorded")
    print0(f"{path}: ViT {cfg['embed_dim']} wide, {cfg['depth']} blocks, {cfg['num_heads']} heads "
           f"({how}), patch {cfg['patch_size']}, trained at {cfg['img_size']} px")
    util.load_pretrained(model, obj, name=str(path))
    return model.eval(), cfg


def analysis_loader(args):
    """--num_images un-augmented images (val split, else train) in batches of at least 4."""
    transform = util.eval_transform(args.input_size)
    try:
        ds, _ = util.build_dataset(args, train=False, transform=transform)
        split = "val"
    except util.ConfigError as e:
        ds, _ = util.build_dataset(args, train=True, transform=transform)
        split = "train"
        print0(f"no val split ({e}): using the train split")
    n = min(args.num_images, len(ds))
    if n < 4:
        raise util.ConfigError(f"the {split} split has {len(ds)} images; HSIC_1 needs at least 4")
    g = torch.Generator().manual_seed(args.seed)
    idx = sorted(torch.randperm(len(ds), generator=g)[:n].tolist())  # all of them when n = len(ds)
    batches = [list(range(i, min(i + args.batch_size, n))) for i in range(0, n, args.batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 4:  # HSIC_1 is undefined below 4 images
        tail = batches.pop()
        batches[-1] += tail
    print0(f"{n} images of the {split} split ({len(ds)} in all), {len(batches)} batches")
    return DataLoader(Subset(ds, idx), batch_sampler=batches, num_workers=args.num_workers)


# ----------------------------------------------------------------------------
# Figures (matplotlib, Agg backend: no display needed)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def layer_ticks(ax, depth, axis):
    labels = [str(k) for k in range(1, depth + 1)] + ["out"]
    step = math.ceil((depth + 1) / 7)  # at most 7 labels: 1, 3, ..., 11, out for depth 12
    ticks = [i for i in range(depth + 1) if i % step == 0 or i == depth]
    getattr(ax, f"set_{axis}ticks")(ticks)
    getattr(ax, f"set_{axis}ticklabels")([labels[i] for i in ticks], fontsize=7)


def plot_cka(path, cka, names):
    """One heatmap per pair (i <= j): rows (y) model i's layers, columns (x) model j's."""
    plt = pyplot()
    pairs = sorted(cka)
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.8, 2.9 * rows), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(pairs):]:
        ax.axis("off")
    for ax, (i, j) in zip(axes.flat, pairs):
        m = cka[i, j]
        im = ax.imshow(m, origin="lower", vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        layer_ticks(ax, m.shape[1] - 1, "x")
        layer_ticks(ax, m.shape[0] - 1, "y")
        ax.set_xlabel(f"{names[j]} layer", fontsize=8)
        ax.set_ylabel(f"{names[i]} layer", fontsize=8)
        ax.set_title(f"{names[i]} vs {names[j]}", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, label="linear CKA (debiased, minibatch)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_attention(path, stats, names, uniform=None):
    """Two panels (distance, entropy): per layer, one dot per head and a line of the head
    mean, the checkpoints side by side (shifted a little along x)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    keys = (("distance_px", "mean attention distance (px)"), ("entropy_nats", "attention entropy (nats)"))
    for m, name in enumerate(names):
        colour, shift = f"C{m}", (m - (len(names) - 1) / 2) * 0.6 / len(names)
        for ax, (key, _) in zip(axes, keys):
            values = stats[name][key]  # [layer][head]
            layers = np.arange(1, len(values) + 1)
            for layer, heads in zip(layers, values):
                ax.scatter(np.full(len(heads), layer + shift), heads, s=9, color=colour, alpha=0.45, lw=0)
            ax.plot(layers + shift, [np.mean(h) for h in values], "-o", ms=3, color=colour, label=name)
            if f"uniform_{key}" in stats[name]:  # a Hiera: uniform attention over each block's window
                ax.plot(layers + shift, stats[name][f"uniform_{key}"], ":", lw=1, color=colour,
                        label=f"{name}, uniform" if key == keys[0][0] else None)
    for ax, (key, label) in zip(axes, keys):
        if uniform:
            ax.axhline(uniform[key], ls="--", lw=0.8, color="gray", label="uniform attention")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(bottom=0)  # distance and entropy from 0: local vs global at a glance
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Reconstructions (MAE checkpoints with their decoder)


NO_DECODER = ("{path}: has no MAE decoder (an encoder-only checkpoint, like the official "
              "mae_pretrain_vit_*.pth), so it cannot reconstruct images: use the *_full.pth or "
              "mae_visualize_vit_*.pth file, or a mae_pretrain.py checkpoint.pth")


def norm_pix_setting(path, obj, flag):
    """-> (norm_pix_loss, why): the checkpoint's record, else the flag, else by file name."""
    for key in ("model_config", "args"):
        rec = obj.get(key) if isinstance(obj, dict) else None
        rec = vars(rec) if isinstance(rec, argparse.Namespace) else rec  # MAE's own checkpoints
        if isinstance(rec, dict) and isinstance(rec.get("norm_pix_loss"), bool):
            if flag is not None and flag != rec["norm_pix_loss"]:
                print0(f"{path}: ignoring the --norm_pix_loss flag, the checkpoint records "
                       f"norm_pix_loss={rec['norm_pix_loss']}")
            return rec["norm_pix_loss"], f"recorded in the checkpoint's {key}"
    if flag is not None:
        return flag, "from the flag"
    if Path(path).name.startswith("mae_visualize"):
        return False, "not recorded; the official mae_visualize_* models predict raw pixels"
    return True, "not recorded; assuming MAE's recipe (pass --no-norm_pix_loss for raw-pixel models)"


def save_reconstructions(path, name, cfg, args, out, device):
    if cfg.get("family") == "Hiera":
        return save_hiera_reconstructions(path, name, cfg, args, out, device)
    from mae_pretrain import MaskedAutoencoderViT, figure_images, reconstruct, save_reconstruction_figure
    obj = util.load_checkpoint(path)  # read again rather than kept through the analysis: memory
    norm_pix, why = norm_pix_setting(path, obj, args.norm_pix_loss)
    print0(f"{path}: decoder {cfg['decoder_embed_dim']} wide, {cfg['decoder_depth']} blocks, "
           f"{cfg['decoder_num_heads']} heads; norm_pix_loss={norm_pix} ({why})")
    mae = MaskedAutoencoderViT(
        img_size=args.input_size, patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
        embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"],
        decoder_embed_dim=cfg["decoder_embed_dim"], decoder_depth=cfg["decoder_depth"],
        decoder_num_heads=cfg["decoder_num_heads"], mlp_ratio=cfg["mlp_ratio"], norm_pix_loss=norm_pix,
        decode_layer=cfg.get("decode_layer"))  # D²-MAE's decoder reads block 8
    util.load_pretrained(mae, obj, allow_missing=(), name=str(path), verbose=False)
    mae = mae.to(device).eval()
    imgs = figure_images(args).to(device)
    noise = torch.rand(imgs.shape[0], mae.num_patches, generator=torch.Generator().manual_seed(args.seed))
    ratio = mask_ratio_for(obj, args, 0.75)
    parts = reconstruct(mae, imgs, ratio, noise.to(device))
    targets = "norm-pix predictions de-normalized per patch" if norm_pix else "pixel targets"
    save_reconstruction_figure(out, imgs, *parts, title=f"{name}: mask ratio {ratio}, {targets}")
    print0(f"saved {out}")


# ----------------------------------------------------------------------------
# main


def main(args):
    if args.batch_size < 4:
        raise util.ConfigError(f"--batch_size {args.batch_size}: HSIC_1 needs at least 4 images per batch")
    if args.num_images < 4:
        raise util.ConfigError(f"--num_images {args.num_images}: HSIC_1 needs at least 4 images")
    util.check_ranges(args, {k: util.FLAG_RANGES[k] for k in (
        "mask_ratio", "input_size", "patch_size", "synthetic_samples", "num_workers")})
    k = len(args.checkpoints)
    names = args.names or default_names(args.checkpoints)
    if len(names) != k or len(set(names)) != k:
        raise util.ConfigError(f"--names needs {k} distinct names, got {names}")
    labels = [file_label(n) for n in names]
    if len(set(labels)) != k:  # "A B" and "A_B" would write the same files
        clash = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if file_label(a) == file_label(b)]
        raise util.ConfigError(f"--names {clash[0][0]!r} and {clash[0][1]!r} give the same file label "
                               f"{file_label(clash[0][0])!r}: choose names that differ in letters or digits")
    model_names = per_checkpoint(args.model, k, "model")
    heads = per_checkpoint(args.num_heads, k, "num_heads")
    if any(h is not None and h < 0 for h in heads):
        raise util.ConfigError(f"--num_heads must be positive (0: recorded or from the width), got {heads}")
    dinfo = util.init_distributed(args.device)
    if dinfo.world_size > 1:
        raise util.ConfigError("analyze.py runs in one process: start it with python, not torchrun")
    device = dinfo.device

    models, cfgs = [], []  # every checkpoint is read and checked before any image is processed
    for path, model_name, h in zip(args.checkpoints, model_names, heads):
        obj = util.load_checkpoint(path)
        if util.checkpoint_family(util.read_state_dict(obj, name=path)) == "Hiera":
            model, cfg = build_hiera(path, obj, args, model_name, h)
            models.append(model.to(device))
            cfgs.append(cfg)
            continue
        cfg = util.infer_vit_config(obj, name=path)
        if args.reconstruct and "decoder_embed_dim" not in cfg:
            raise util.CheckpointError(NO_DECODER.format(path=path))
        if args.input_size is None:
            args.input_size = cfg["img_size"] or 224
            print0(f"--input_size {args.input_size} (the first checkpoint's)")
        model, cfg = build_vit(path, obj, cfg, args, model_name, h)
        models.append(model.to(device))
        cfgs.append(cfg)
    loader = analysis_loader(args)
    out = util.prepare_output_dir(args)  # writable? checked before the analysis, not after

    pairs = [(i, j) for i in range(k) for j in range(i, k)]  # A vs A too: a model's own structure
    cka = {(i, j): MinibatchCKA(models[i].depth + 1, models[j].depth + 1) for i, j in pairs}
    attn_stats = [HieraAttentionStats(m) if isinstance(m, Hiera) else
                  AttentionStats(m.depth, m.patch_embed.grid_size, m.patch_embed.patch_size) for m in models]
    for imgs, _ in tqdm(loader, desc="analysing", dynamic_ncols=True):
        imgs = util.normalize(imgs.to(device, non_blocking=True))
        grams = []
        for model, stats in zip(models, attn_stats):
            features, attns = layer_features(model, imgs)
            grams.append(gram_stack(features))  # (depth + 1, B, B): all a pair needs from a model
            stats.update(attns)
            del features, attns
        for i, j in pairs:
            cka[i, j].update_grams(grams[i], grams[j])

    results = {pair: acc.compute().numpy() for pair, acc in cka.items()}
    for (i, j), m in results.items():
        np.save(out / f"cka_{labels[i]}_vs_{labels[j]}.npy", m)
        if i != j and m.shape[0] == m.shape[1]:
            print0(f"CKA {names[i]} vs {names[j]}, layer i vs layer i (1..{m.shape[0] - 1}, out): "
                   + " ".join(f"{v:.2f}" for v in np.diag(m)))
    plot_cka(out / "cka.png", results, names)

    report = {}
    for name, label, path, stats in zip(names, labels, args.checkpoints, attn_stats):
        dist, ent = stats.compute()
        report[name] = dict(checkpoint=str(path), num_images=stats.images, grid_size=stats.grid_size,
                            patch_size=stats.patch_size, num_heads=[len(h) for h in dist],
                            distance_px=dist, entropy_nats=ent,
                            mean_distance_px=[float(np.mean(h)) for h in dist],
                            mean_entropy_nats=[float(np.mean(h)) for h in ent])
        arr = np.full((2, len(dist), max(map(len, dist))), np.nan)  # NaN where a layer has fewer heads
        for layer, (d, e) in enumerate(zip(dist, ent)):
            arr[0, layer, :len(d)], arr[1, layer, :len(e)] = d, e
        if isinstance(stats, HieraAttentionStats):  # uniform attention differs per block
            report[name].update(uniform_distance_px=[d for d, _ in stats.uniform],
                                uniform_entropy_nats=[e for _, e in stats.uniform])
        np.save(out / f"attention_{label}.npy", arr)
        for key, unit, fmt in (("mean_distance_px", "px", ".1f"), ("mean_entropy_nats", "nats", ".2f")):
            print0(f"{name}: attention {key.split('_')[1]} ({unit}) per layer, mean over heads: "
                   + " ".join(format(v, fmt) for v in report[name][key]))
    uniform = None
    if len({(s.grid_size, s.patch_size) for s in attn_stats}) == 1 and attn_stats[0].grid_size:  # one grid
        grid, patch = attn_stats[0].grid_size, attn_stats[0].patch_size
        uniform = dict(distance_px=patch_distances(grid, patch).mean().item(),
                       entropy_nats=math.log(grid * grid))
    (out / "attention.json").write_text(json.dumps(dict(models=report, uniform_attention=uniform), indent=1))
    plot_attention(out / "attention.png", report, names, uniform)
    print0(f"saved {len(pairs)} CKA matrices, cka.png, attention.json and attention.png in {out}")

    if args.reconstruct is not False:
        del models
        for path, name, label, cfg in zip(args.checkpoints, names, labels, cfgs):
            if "decoder_embed_dim" in cfg:
                save_reconstructions(path, name, cfg, args, out / f"reconstructions_{label}.png", device)


if __name__ == "__main__":
    util.run_main(main, get_args_parser())
