"""Hiera (Ryali et al., ICML 2023) and MAE on Hiera: MAE-Lite's hierarchical student (IJCV 2025).

Depends on torch and einops only: copy this file alone. A plain pre-norm transformer made
hierarchical by two cheap tricks: pooling the queries (max over 2x2 tokens) at the first
block of stages 2..q_pool+1, and attention inside "mask units" (8x8 tokens = 32x32 px) in
the early, high-resolution blocks.

    imgs (B,3,224,224) --conv 7x7 /4--> 56x56 tokens + pos_embed --unroll--> (B, 3136, C0)
    stage 1..4: dims C0, 2C0, 4C0, 8C0; heads h, 2h, 4h, 8h; tokens 3136 -> 784 -> 196 -> 49
    logits = head.projection(norm(mean over tokens))

Unroll. Tokens are reordered once so that every later step is a reshape. With token row
h = 8*my + 4*s3y + 2*s2y + s1y (my: mask-unit row, s1: finest 2x2 offset), likewise w:

    b (my s3y s2y s1y mx s3x s2x s1x) c -> b (s1y s1x s2y s2x s3y s3x my mx) c

q-pooling is a max over the outermost 4 = (s1y s1x), then (s2y s2x), then (s3y s3x); the
mask unit (my mx) is innermost, so token = t * units + u, windowed attention is
`b (t u) c -> b u t c`, and dropping mask units (MAE) drops values of u. Block outputs are
therefore NOT in raster order; `encode(..., stages=...)` returns spatial maps ("reroll").

The one-block lag: a block uses mask-unit attention when the block BEFORE it lies in stage 1
or 2 (the official code reads the flag before advancing the stage), so the first block of
stage 3 still attends within mask units while it pools their queries from 4 tokens to 1.

Public hooks, as vit.py's (layers 1-based): `embed(imgs, keep)` with keep bool
(B, num_mask_units), True = KEEP (the official convention, the reverse of MAE's mask), and
`encode(x, keep, layers=, attn=, attn_logits=, norm1=, stages=, stop_at=)` whose
taps.attn[k] is (B, heads, units, Tq, Tk) for a mask-unit block, (B, heads, Nq, Nk) for a
global one, and taps.stages[s] is (B, H, W, C) without a mask, (B, k, My, Mx, C) per kept unit.

MAE on Hiera (MaskedAutoencoderHiera): one masking decision per mask unit; the encoder runs
on the kept units; the outputs of stages 1..q_pool and 4 are fused per kept unit,

    latent = encoder_norm(conv 4x4 /4 (stage 1, 8x8) + conv 2x2 /2 (stage 2, 4x4) + stage 4 (2x2))

and a decoder of global blocks predicts pred_stride = 4 * 2^q_pool px patches (16 px at
q_pool 2: 2x2 per unit), each vector ordered (C, py, px) as the official label. The pixel
loss is mae_pretrain.mae_loss, the one a ViT MAE uses. MAE-Lite's student: embed 46, stages
(1, 2, 7, 2), q_pool 2, mask ratio 0.4 (29 of 49 units kept), decoder 96 x 1 x 3.

State-dict names are the official checkpoints' (blocks.i.{norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2, proj}, norm, head.projection; MAE: encoder_norm, multi_scale_fusion_heads.i,
mask_token, decoder_*); timm's head.norm / head.fc are the same tensors.

Where this differs from the official code (facebookresearch/hiera):
- forward returns logits in eval mode too (the official Head applies a softmax in eval).
- Only the 2-D image model with 4 stages, 2x2 q-stride and 8x8-token mask units (every
  released image model); no video, sep_pos_embed or abs-win position embedding.
- MaskedAutoencoderHiera.forward returns (pred of every patch, target, removed-patch mask)
  as MaskedAutoencoderViT, not (loss, pred[masked], label[masked], keep); mask ratio 0 takes
  the loss over all patches (the official mean of nothing is NaN); norm_pix_loss can be off.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

PATCH_STRIDE = 4  # the 7x7 conv's stride: one token per 4x4 px
MU = 8  # a mask unit is 8x8 tokens = 32x32 px
Q_STRIDE = 4  # q-pooling takes the max over 2x2 tokens
MASK_UNIT_ATTN = (True, True, False, False)  # per stage (read with the one-block lag)


def check_size(img_size, mask_ratio=None):
    """A Hiera needs whole 32x32 px mask units, and an MAE-Hiera at least one kept unit."""
    if img_size % (PATCH_STRIDE * MU):
        raise ValueError(f"a Hiera needs an image size that is a multiple of 32 px (whole 8x8-token "
                         f"mask units), got {img_size}")
    units = (img_size // (PATCH_STRIDE * MU)) ** 2
    if mask_ratio is not None and int(units * (1 - mask_ratio)) < 1:
        raise ValueError(f"mask ratio {mask_ratio} keeps none of the {units} mask units of a {img_size} "
                         f"px image: lower it or raise the image size")


# ----------------------------------------------------------------------------
# Token order


def unroll(x, mask_grid):
    """Raster tokens (B, H*W, C), H = W = 8 * mask_grid -> the module docstring's unrolled order."""
    return rearrange(x, "b (my s3y s2y s1y mx s3x s2x s1x) c -> b (s1y s1x s2y s2x s3y s3x my mx) c",
                     my=mask_grid, mx=mask_grid, s1y=2, s1x=2, s2y=2, s2x=2, s3y=2, s3x=2)


def reroll(x, pooled, mask_grid=None):
    """Unrolled tokens (B, N, C) after `pooled` q-poolings -> spatial order: the 3 - pooled
    unroll levels not yet consumed are put back, finest first, each outside those placed.
    Returns (B, units, My, Mx, C) per mask unit (My = 8 / 2**pooled), or with `mask_grid`
    (mask units per side, all present) the raster map (B, H, W, C)."""
    x = rearrange(x, "b n c -> b n 1 1 c")  # (B, N, My=1, Mx=1, C)
    for _ in range(3 - pooled):
        x = rearrange(x, "b (sy sx n) my mx c -> b n (sy my) (sx mx) c", sy=2, sx=2)
    if mask_grid is None:
        return x
    return rearrange(x, "b (gy gx) my mx c -> b (gy my) (gx mx) c", gy=mask_grid)


# ----------------------------------------------------------------------------
# Layers


class MaskUnitAttention(nn.Module):
    """Attention within each mask unit (window) or over all tokens, with q-pooling.

    qkv: Linear(dim, 3 * dim_out), channels laid out (three, heads, head_dim); head_dim =
    dim_out / heads. Tokens are t * windows + w (unrolled order), so a window is a reshape.
    With q_stride 4 the queries are max-pooled over the outermost 4 of each window's tokens
    (a 2x2 max-pool in space); keys and values keep the input's resolution.
    """

    def __init__(self, dim, dim_out, num_heads, q_stride=1, window_size=0, use_mask_unit_attn=False):
        super().__init__()
        self.num_heads, self.q_stride = num_heads, q_stride
        self.window_size = window_size  # tokens per mask unit AFTER this block's pooling
        self.use_mask_unit_attn = use_mask_unit_attn
        self.scale = (dim_out // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def attend(self, x, attn_kind=None):
        """x (B, N, dim) -> (output (B, N / q_stride, dim_out), attn or None); attn_kind
        'logits' ((q * scale) k^T) or 'probs' (their softmax) leaves the fused kernel."""
        windows = x.shape[1] // (self.q_stride * self.window_size) if self.use_mask_unit_attn else 1
        q, k, v = rearrange(self.qkv(x), "b (t w) (three h d) -> three b h w t d",
                            three=3, h=self.num_heads, w=windows)
        if self.q_stride > 1:
            q = reduce(q, "b h w (s t) d -> b h w t d", "max", s=self.q_stride)
        if attn_kind is None:  # (heads, windows) as one batch axis: 4-D for the fused kernels
            q, k, v = (rearrange(a, "b h w t d -> b (h w) t d").contiguous() for a in (q, k, v))
            out = rearrange(F.scaled_dot_product_attention(q, k, v), "b (h w) t d -> b h w t d",
                            h=self.num_heads)
            attn = None
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, w, Tq, Tk)
            probs = logits.softmax(dim=-1)
            out = probs @ v
            attn = logits if attn_kind == "logits" else probs
            if not self.use_mask_unit_attn:
                attn = attn[:, :, 0]  # one window: (B, h, Nq, Nk)
        return self.proj(rearrange(out, "b h w t d -> b (t w) (h d)")), attn

    def forward(self, x):
        return self.attend(x)[0]


class HieraBlock(nn.Module):
    """Pre-norm block; at a stage transition (dim != dim_out) the residual is
    max-pool(proj(norm1(x))): it comes from the NORMED input, as the official code."""

    def __init__(self, dim, dim_out, num_heads, mlp_ratio=4.0, drop_path=0.0, q_stride=1,
                 window_size=0, use_mask_unit_attn=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.attn = MaskUnitAttention(dim, dim_out, num_heads, q_stride, window_size, use_mask_unit_attn)
        self.drop_path = drop_path  # one rate for both branches, as the official
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        hidden = int(dim_out * mlp_ratio)  # fc1 -> exact GELU -> fc2
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim_out, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, dim_out)))

    def residual(self, y):
        """Stochastic depth: the branch dropped for a whole sample with probability drop_path."""
        if self.drop_path == 0.0 or not self.training:
            return y
        keep = y.new_empty(y.shape[0], 1, 1).bernoulli_(1.0 - self.drop_path)
        return y * keep.div_(1.0 - self.drop_path)

    def forward(self, x, attn_kind=None, taps=None):
        """x (B, N, dim) -> (B, N / q_stride, dim_out); a dict `taps` gets 'norm1' and 'attn'."""
        h = self.norm1(x)
        if self.proj is not None:
            x = reduce(self.proj(h), "b (s n) c -> b n c", "max", s=self.attn.q_stride)
        a, attn = self.attn.attend(h, attn_kind)
        if taps is not None:
            taps.update(norm1=h, attn=attn)
        x = x + self.residual(a)
        return x + self.residual(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------
# The model


@dataclass
class Taps:
    """What `Hiera.encode` returns; keys are 1-based block (or stage) numbers."""
    x: torch.Tensor = None  # last block's output (B, n, C_last), None if stopped early
    layers: dict = field(default_factory=dict)  # k -> output of block k
    attn: dict = field(default_factory=dict)  # k -> attention logits or probabilities
    norm1: dict = field(default_factory=dict)  # k -> block k's LayerNorm'd input
    stages: dict = field(default_factory=dict)  # s -> stage s's output, rerolled


class Hiera(nn.Module):
    """Hiera for images whose side is a multiple of 32 (a whole number of mask units).

    stages: blocks per stage (4 stages); q_pool: how many stage transitions pool (3 for
    classification, 2 for MAE); dim and heads double at each transition. num_classes=0
    keeps `norm` but no head. Init as the official: trunc-normal(0.02) weights and
    pos_embed, Linear biases 0.02, LayerNorm (1, 0.02), the head scaled by 0.001.
    """

    num_prefix_tokens = 0  # no cls token: pos_embed is the (img/4)^2 grid only
    head_prefixes = ("norm.", "head.")  # the classifier: a pre-trained encoder need not have it

    def __init__(self, img_size=224, in_chans=3, embed_dim=96, num_heads=1, stages=(2, 3, 16, 3),
                 q_pool=3, num_classes=1000, mlp_ratio=4.0, drop_path_rate=0.0, head_dropout=0.0):
        super().__init__()
        check_size(img_size)
        if len(stages) != 4 or not 0 <= q_pool <= 3:
            raise ValueError(f"Hiera here has 4 stages and 0..3 q-pooling stages, got "
                             f"stages={tuple(stages)}, q_pool={q_pool}")
        if embed_dim % num_heads:  # dims and heads double together: every stage divides alike
            raise ValueError(f"width {embed_dim} is not divisible by {num_heads} heads")
        self.config = dict(img_size=img_size, in_chans=in_chans, embed_dim=embed_dim,
                           num_heads=num_heads, stages=list(stages), q_pool=q_pool,
                           num_classes=num_classes, mlp_ratio=mlp_ratio,
                           drop_path_rate=drop_path_rate, head_dropout=head_dropout)
        self.img_size, self.q_pool, self.num_classes = img_size, q_pool, num_classes
        self.token_grid = img_size // PATCH_STRIDE  # 56 at 224 px
        self.mask_grid = self.token_grid // MU  # 7 at 224 px
        self.num_mask_units = self.mask_grid ** 2  # 49 at 224 px
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=PATCH_STRIDE, padding=3)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.token_grid ** 2, embed_dim))

        depth = sum(stages)
        self.stage_ends = [sum(stages[:i + 1]) - 1 for i in range(4)]  # 0-based: tiny [0, 2, 9, 11]
        pool_blocks = [e + 1 for e in self.stage_ends[:q_pool]]  # first blocks of stages 2..q_pool+1
        stage_of = [sum(i > e for e in self.stage_ends) for i in range(depth)]
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: meta-safe
        dim, heads, window = embed_dim, num_heads, MU * MU
        self.blocks = nn.ModuleList()
        for i in range(depth):
            dim_out = dim
            if i > 0 and stage_of[i] > stage_of[i - 1]:  # first block of stages 2, 3, 4
                dim_out, heads = 2 * dim, 2 * heads
            q_stride = Q_STRIDE if i in pool_blocks else 1
            window //= q_stride  # tokens per mask unit after this block: 64, 16, 4, 1
            mu_attn = MASK_UNIT_ATTN[stage_of[max(i - 1, 0)]]  # the one-block lag
            self.blocks.append(HieraBlock(dim, dim_out, heads, mlp_ratio, rates[i], q_stride, window, mu_attn))
            dim = dim_out
        # poolings done up to and including block i: how far its output is from raster order
        self.pooled = [sum(p <= i for p in pool_blocks) for i in range(depth)]
        self.depth, self.num_features = depth, dim
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Sequential(OrderedDict(
            dropout=nn.Dropout(head_dropout),
            projection=nn.Linear(dim, num_classes))) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):  # the conv's bias keeps PyTorch's default, as official
                    nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 0.02)
        if num_classes > 0:
            with torch.no_grad():  # 0.001: the initial logits are nearly uniform
                self.head.projection.weight.mul_(0.001)
                self.head.projection.bias.mul_(0.001)

    # -- the encoder, in pieces that MAE, distillation and analysis call ----------

    def embed(self, imgs, keep=None):
        """Images (B, C, H, W) -> unrolled tokens with pos_embed (B, 64 * units, C0).

        keep (B, num_mask_units) bool, True = keep: the removed units are zeroed in the
        image BEFORE the conv (its 7x7 window would otherwise see 3 px into a removed unit)
        and their tokens dropped; every row must keep the same number of units."""
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got "
                             f"{tuple(imgs.shape[-2:])}; build the model with that img_size")
        g = self.mask_grid
        if keep is not None:
            if keep.shape != (imgs.shape[0], g * g) or keep.dtype != torch.bool:
                raise ValueError(f"keep must be bool ({imgs.shape[0]}, {g * g}), True = keep "
                                 f"(one per mask unit), got {keep.dtype} {tuple(keep.shape)}")
            kept = keep.sum(1)
            if (kept != kept[0]).any():
                raise ValueError("every image must keep the same number of mask units")
            px = PATCH_STRIDE * MU
            imgs = imgs * repeat(keep, "b (gy gx) -> b 1 (gy py) (gx px)", gy=g, py=px, px=px)
        x = rearrange(self.patch_embed.proj(imgs), "b c h w -> b (h w) c") + self.pos_embed
        x = unroll(x, g)  # (B, 64 * units, C0)
        if keep is not None:
            x = rearrange(x, "b (t u) c -> b u t c", u=g * g)[keep]  # (B * k, 64, C0)
            x = rearrange(x, "(b k) t c -> b (t k) c", b=imgs.shape[0])
        return x

    def encode(self, x, keep=None, *, layers=(), attn=(), attn_logits=False, norm1=(), stages=(),
               stop_at=None):
        """Run the blocks on unrolled tokens from `embed`, collecting the taps asked for
        (1-based blocks; stages 1..4). `keep` is the one given to `embed`: it only decides
        how stage maps are rerolled (per kept unit, or the full raster map)."""
        last = stop_at if stop_at is not None else self.depth
        asked = set(layers) | set(attn) | set(norm1)
        if not 1 <= last <= self.depth or any(not 1 <= k <= last for k in asked) or \
                any(not 1 <= s <= 4 for s in stages) or \
                (stages and self.stage_ends[max(stages) - 1] >= last):  # a stage asked for ends later
            raise ValueError(f"blocks must lie in 1..{last} (depth {self.depth}) and stages in 1..4 "
                             f"ending by then; got stop_at={stop_at}, taps at {sorted(asked)}, "
                             f"stages {sorted(stages)}")
        ends = {e + 1: s for s, e in enumerate(self.stage_ends, start=1)}  # last block -> stage
        taps = Taps()
        for k, blk in enumerate(self.blocks[:last], start=1):
            t = {}
            x = blk(x, ("logits" if attn_logits else "probs") if k in attn else None, t)
            for name, want in (("layers", layers), ("attn", attn), ("norm1", norm1)):
                if k in want:
                    getattr(taps, name)[k] = x if name == "layers" else t[name]
            if ends.get(k) in stages:
                taps.stages[ends[k]] = reroll(x, self.pooled[k - 1], None if keep is not None else self.mask_grid)
        if last == self.depth:
            taps.x = x
        return taps

    def attention_layout(self, k):
        """What block k's attention logits pair up over (distillation checks it): a q-pooling
        block has 4x fewer queries than keys; blocks before the lag ends attend within units."""
        pooled = [0, *self.pooled]  # poolings done before block k: pooled[k - 1]
        attn = self.blocks[k - 1].attn
        where = "within mask units" if attn.use_mask_unit_attn else "globally"
        return (f"{where} with {MU * MU // 4 ** pooled[k]} queries x {MU * MU // 4 ** pooled[k - 1]} "
                f"keys per mask unit")

    def token_centres(self):
        """Per block (queries (windows, Tq, 2), keys (windows, Tk, 2)): pixel centres (y, x)
        laid out as its attention is. Each token's centre goes through the model's own
        reordering: unroll, then at every q-pooling the mean of the 4 pooled tokens."""
        n, s = self.token_grid, PATCH_STRIDE
        rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        pos = torch.stack([rows, cols], -1).double() * s + s / 2  # (n, n, 2) px
        pos = unroll(rearrange(pos, "h w c -> 1 (h w) c"), self.mask_grid)[0]  # (N, 2), unrolled
        centres = []
        for blk in self.blocks:
            a = blk.attn
            windows = pos.shape[0] // (a.q_stride * a.window_size) if a.use_mask_unit_attn else 1
            keys = rearrange(pos, "(t w) c -> w t c", w=windows)
            queries = reduce(keys, "w (s t) c -> w t c", "mean", s=a.q_stride)
            centres.append((queries, keys))
            pos = rearrange(queries, "w t c -> (t w) c")  # the block's output order
        return centres

    def forward_features(self, imgs, keep=None):
        """Images -> the last block's tokens (B, n, C_last) (timm's convention)."""
        return self.encode(self.embed(imgs, keep), keep).x

    def forward_head(self, x, pre_logits=False):
        x = self.norm(x.mean(dim=1))  # mean over tokens, then LayerNorm
        return x if pre_logits else self.head(x)

    def forward(self, imgs):
        """Logits (B, num_classes), in train and eval mode alike."""
        return self.forward_head(self.forward_features(imgs))


# ----------------------------------------------------------------------------
# MAE on Hiera


def random_unit_mask(noise, mask_ratio):
    """One decision per mask unit, as MAE decides per patch: argsort of uniform noise (B, U),
    the int(U * (1 - mask_ratio)) smallest kept. -> keep (B, U) bool, True = KEEP."""
    ids_keep = torch.argsort(noise, dim=1)[:, :int(noise.shape[1] * (1 - mask_ratio))]
    return torch.zeros(noise.shape, dtype=torch.bool, device=noise.device).scatter_(1, ids_keep, True)


def patchify_hiera(imgs, s):
    """[B, C, H, W] -> [B, L, C*s*s]: s x s patches in raster order, each vector ordered
    (C, py, px), channel SLOWEST (official Hiera's label; MAE's patchify is (py, px, C))."""
    return rearrange(imgs, "b c (h py) (w px) -> b (h w) (c py px)", py=s, px=s)


def unpatchify_hiera(x, s):
    """[B, L, C*s*s] -> [B, C, H, W] for a square grid (the inverse of patchify_hiera)."""
    return rearrange(x, "b (h w) (c py px) -> b c (h py) (w px)", h=math.isqrt(x.shape[1]), py=s, px=s)


class MaskedAutoencoderHiera(Hiera):
    """MAE with a Hiera encoder and the official MaskedAutoencoderHiera's parameter names
    (module docstring). forward(imgs, mask_ratio, noise) -> (pred [B, L, C*s*s], target
    [B, L, C*s*s], mask [B, L]) for all L = (img / s)^2 patches of s = pred_stride px in
    raster order, as MaskedAutoencoderViT; mask is 1 where the patch's unit was removed."""

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
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(f"decoder width {decoder_embed_dim} is not divisible by {decoder_num_heads} heads")
        self.norm_pix_loss = norm_pix_loss
        self.norm = nn.Identity()  # no classifier (the official deletes norm and head)
        C = self.num_features
        self.encoder_norm = nn.LayerNorm(C, eps=1e-6)
        # Fusion: stages 1..q_pool (their units are 8, 4, ... tokens wide) are brought to the
        # last stage's unit size (8 / 2^q_pool) and width by a conv with kernel = stride.
        self.fusion_stages = (*range(1, q_pool + 1), 4)
        self.final_unit_size = MU // 2 ** q_pool  # tokens per unit side at the end: 2 at q_pool 2
        self.multi_scale_fusion_heads = nn.ModuleList(
            [nn.Conv2d(embed_dim * 2 ** (s - 1), C, kernel_size=2 ** (q_pool - s + 1),
                       stride=2 ** (q_pool - s + 1)) for s in range(1, q_pool + 1)] + [nn.Identity()])

        self.pred_stride = PATCH_STRIDE * 2 ** q_pool  # px per predicted patch: 16 at q_pool 2
        self.pred_grid = self.mask_grid * self.final_unit_size  # 14 at 224 px
        self.decoder_embed = nn.Linear(C, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.pred_grid ** 2, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(  # global attention: plain ViT blocks
            HieraBlock(decoder_embed_dim, decoder_embed_dim, decoder_num_heads, mlp_ratio)
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.pred_stride ** 2 * in_chans)
        # The official MAE init over the whole model, encoder included: xavier Linear, zero
        # bias, LayerNorm (1, 0), the patch conv as a (C0, 3*7*7) matrix; pos_embed keeps
        # Hiera's trunc-normal, the conv biases and fusion convs PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def masking(self, noise, mask_ratio):
        """noise [B, U] -> (keep [B, U] bool, True = kept unit; mask [B, L] float, 1 where
        the predicted patch's unit was removed)."""
        keep, r = random_unit_mask(noise, mask_ratio), self.final_unit_size
        return keep, repeat((~keep).float(), "b (gy gx) -> b (gy y gx x)", gy=self.mask_grid, y=r, x=r)

    def forward_encoder(self, imgs, keep, **taps):
        """keep [B, U] -> (fused latent [B, k, r, r, C_last], the encoder's Taps). Keyword taps
        (attn=, attn_logits=, layers=, norm1=) are collected in the same pass."""
        stages = sorted(set(self.fusion_stages) | set(taps.pop("stages", ())))
        t = self.encode(self.embed(imgs, keep), keep, stages=stages, **taps)
        x = 0.0
        for s, head in zip(self.fusion_stages, self.multi_scale_fusion_heads):
            y = rearrange(t.stages[s], "b k y x c -> (b k) c y x")  # each kept unit as an image
            x = x + rearrange(head(y), "(b k) c y x -> b k y x c", b=imgs.shape[0])
        return self.encoder_norm(x), t

    def forward_decoder(self, x, keep):
        """latent [B, k, r, r, C_last], keep [B, U] -> pred [B, L, C*s*s] (raster order)."""
        x = self.decoder_embed(x)  # [B, k, r, r, Dd]
        full = x.new_zeros(*keep.shape, *x.shape[2:])  # [B, U, r, r, Dd]
        full[keep] = rearrange(x, "b k y x d -> (b k) y x d")  # kept units, ascending per image
        full = torch.where(rearrange(keep, "b u -> b u 1 1 1"), full, self.mask_token.to(x.dtype))
        x = rearrange(full, "b (gy gx) y x d -> b (gy y gx x) d", gy=self.mask_grid)
        x = x + self.decoder_pos_embed  # [B, L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def patchify(self, imgs):
        return patchify_hiera(imgs, self.pred_stride)

    def unpatchify(self, x):
        return unpatchify_hiera(x, self.pred_stride)

    def forward(self, imgs, mask_ratio=0.6, noise=None):
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.num_mask_units, device=imgs.device)
        keep, mask = self.masking(noise, mask_ratio)
        latent, _ = self.forward_encoder(imgs, keep)
        return self.forward_decoder(latent, keep), self.patchify(imgs), mask


# ----------------------------------------------------------------------------
# Presets: the official models (facebookresearch/hiera) and MAE-Lite's student. A
# classifier pools 3 times; MAE pre-trains at q_pool 2 (MAE_HIERA_PRESETS).

HIERA_PRESETS = {
    "hiera_tiny_224": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
    "hiera_small_224": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
    "hiera_base_224": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
    "hiera_lite_tiny": dict(embed_dim=46, num_heads=1, stages=(1, 2, 7, 2)),  # dims 46..368, heads 1..8
}
# mae_hiera_tiny is MAE-Lite's student with its 96 x 1 x 3 decoder; the others the official (512 x 8 x 16).
MAE_HIERA_PRESETS = {
    "mae_hiera_tiny": dict(HIERA_PRESETS["hiera_lite_tiny"], decoder_embed_dim=96, decoder_depth=1,
                           decoder_num_heads=3),
    "mae_hiera_base": HIERA_PRESETS["hiera_base_224"],
    **{"mae_" + k: v for k, v in HIERA_PRESETS.items() if k.endswith("_224")},
}


def create_hiera(name, **overrides):
    """A preset of HIERA_PRESETS (a Hiera) or MAE_HIERA_PRESETS (a MaskedAutoencoderHiera)
    by name, with keyword overrides (None values are ignored)."""
    presets = MAE_HIERA_PRESETS if name in MAE_HIERA_PRESETS else HIERA_PRESETS
    if name not in presets:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join([*HIERA_PRESETS, *MAE_HIERA_PRESETS])}")
    cls = MaskedAutoencoderHiera if presets is MAE_HIERA_PRESETS else Hiera
    return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})

