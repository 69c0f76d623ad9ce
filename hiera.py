"""Hiera: a hierarchical ViT without the bells and whistles (Ryali et al., ICML 2023).

A plain pre-norm transformer made hierarchical by two cheap tricks: pooling the queries
(max over 2x2 tokens) at the first block of stages 2..q_pool+1, and attention inside
"mask units" (8x8 tokens = 32x32 px) in the early, high-resolution blocks. It is what
MAE-Lite's IJCV version pre-trains as its hierarchical student (embed 46, about 6.3M).

    imgs (B,3,224,224) --conv 7x7 /4--> 56x56 tokens + pos_embed --unroll--> (B, 3136, C0)
    stage 1..4: dims C0, 2C0, 4C0, 8C0; heads h, 2h, 4h, 8h; tokens 3136 -> 784 -> 196 -> 49
    logits = head.projection(norm(mean over tokens))

Unroll. Tokens are reordered once so that every later step is a reshape. With token row
h = 8*my + 4*s3y + 2*s2y + s1y (my: mask-unit row, s1: finest 2x2 offset), likewise w:

    b (my s3y s2y s1y mx s3x s2x s1x) c -> b (s1y s1x s2y s2x s3y s3x my mx) c

- q-pooling is a max over the outermost 4 = (s1y s1x), then (s2y s2x), then (s3y s3x);
- the mask unit (my mx) is the innermost axis, so token = t * units + u and windowed
  attention is `b (t u) c -> b u t c`;
- dropping mask units (MAE) drops values of u: the kept tokens stay in this order.
Block outputs are therefore NOT in raster order (except after 3 poolings); `encode(...,
stages=...)` returns spatial maps ("reroll").

The one-block lag: a block uses mask-unit attention when the block BEFORE it lies in
stage 1 or 2 (the official code reads the flag before advancing the stage). The first
block of stage 3 still attends within mask units: it pools its queries from 4 tokens per
unit to 1 while its keys are still stage 2's, so global attention starts one block later.

Public hooks (as vit.py; layers are 1-based, no other file reaches inside a block):

    x = hiera.embed(imgs, mask=keep)      # (B, 64k, C0) unrolled tokens of the kept units
    taps = hiera.encode(x, mask=keep, layers=(12,), attn=(12,), attn_logits=True,
                        norm1=range(1, 13), stages=(1, 2, 4), stop_at=None)
    taps.x          # last block's output (B, n, C_last), unrolled order, no norm
    taps.layers[k]  # output of block k (B, n_k, C_k), unrolled order
    taps.attn[k]    # global block: (B, heads, Nq, Nk); mask-unit block: (B, heads, units,
                    #   Tq, Tk) with the window axis third, tokens t of unit u as above
    taps.norm1[k]   # block k's LayerNorm'd input (B, n_{k-1}, C_{k-1}), for CKA
    taps.stages[s]  # stage s's output rerolled: (B, H, W, C) raster without a mask,
                    #   (B, k, My, Mx, C) per kept mask unit with one (what MAE fuses)

`mask` is bool (B, num_mask_units), True = KEEP (the official convention, the reverse of
MAE's); every row keeps the same number of units. Only blocks in `attn` leave
F.scaled_dot_product_attention.

State-dict names are the official checkpoints' (pos_embed, patch_embed.proj,
blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, proj}, norm,
head.projection); timm's head.norm / head.fc are the same tensors (util maps them).

Where this differs from the official code (facebookresearch/hiera):
- forward returns logits in eval mode too (the official Head applies a softmax in eval).
- Only the 2-D image model with 4 stages, 2x2 q-stride and 8x8-token mask units (every
  released image model); no video, sep_pos_embed or abs-win position embedding.
"""
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

import util
from vit import DropPath, Mlp

PATCH_STRIDE = 4  # the 7x7 conv's stride: one token per 4x4 px
MU = 8  # a mask unit is 8x8 tokens = 32x32 px
Q_STRIDE = 4  # q-pooling takes the max over 2x2 tokens
MASK_UNIT_ATTN = (True, True, False, False)  # per stage (read with the one-block lag)


# ----------------------------------------------------------------------------
# Token order


def unroll(x, mask_grid):
    """Raster tokens (B, H*W, C), H = W = 8 * mask_grid -> the module docstring's unrolled order."""
    return rearrange(x, "b (my s3y s2y s1y mx s3x s2x s1x) c -> b (s1y s1x s2y s2x s3y s3x my mx) c",
                     my=mask_grid, mx=mask_grid, s1y=2, s1x=2, s2y=2, s2x=2, s3y=2, s3x=2)


def reroll(x, pooled, mask_grid=None):
    """Unrolled tokens (B, N, C) after `pooled` q-poolings -> spatial order.

    The 3 - pooled unroll levels not yet consumed are put back one at a time, finest first:
    each level is 2x2 and coarser than those already placed, so it goes outside them.
    Returns (B, units, My, Mx, C) per mask unit (My = 8 / 2**pooled), or with `mask_grid`
    (mask units per side, all of them present) the raster map (B, H, W, C).
    """
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

    def forward(self, x, attn_kind=None):
        """x (B, N, dim) -> (output (B, N / q_stride, dim_out), attn or None); attn_kind
        'logits' ((q * scale) k^T) or 'probs' (their softmax) leaves the fused path."""
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


class HieraBlock(nn.Module):
    """Pre-norm block; at a stage transition (dim != dim_out) the residual is
    max-pool(proj(norm1(x))): it comes from the NORMED input, as the official code."""

    def __init__(self, dim, dim_out, num_heads, mlp_ratio=4.0, drop_path=0.0, q_stride=1,
                 window_size=0, use_mask_unit_attn=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.attn = MaskUnitAttention(dim, dim_out, num_heads, q_stride, window_size,
                                      use_mask_unit_attn)
        self.drop_path = DropPath(drop_path)  # one rate for both branches, as the official
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))

    def forward(self, x, attn_kind=None):
        """Returns (x, taps) with taps = {'norm1', 'attn'} of this block."""
        h = self.norm1(x)
        if self.proj is not None:
            x = reduce(self.proj(h), "b (s n) c -> b n c", "max", s=self.attn.q_stride)
        a, attn = self.attn(h, attn_kind)
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, {"norm1": h, "attn": attn}


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

    num_prefix_tokens = 0  # no cls token: pos_embed is the (img/4)^2 grid only (util reads this)
    head_prefixes = ("norm.", "head.")  # the classifier: a pre-trained encoder need not have it

    def __init__(self, img_size=224, in_chans=3, embed_dim=96, num_heads=1, stages=(2, 3, 16, 3),
                 q_pool=3, num_classes=1000, mlp_ratio=4.0, drop_path_rate=0.0, head_dropout=0.0):
        super().__init__()
        if img_size % (PATCH_STRIDE * MU):
            raise util.ConfigError(f"Hiera needs an image size that is a multiple of 32 px (whole "
                                   f"8x8-token mask units), got {img_size}")
        if len(stages) != 4 or not 0 <= q_pool <= 3:
            raise util.ConfigError(f"Hiera here has 4 stages and 0..3 q-pooling stages, got "
                                   f"stages={tuple(stages)}, q_pool={q_pool}")
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
            self.blocks.append(HieraBlock(dim, dim_out, heads, mlp_ratio, rates[i], q_stride,
                                          window, mu_attn))
            dim = dim_out
        # poolings done up to and including block i: how far its output is from raster order
        self.pooled = [sum(p <= i for p in pool_blocks) for i in range(depth)]
        self.depth, self.num_features = depth, dim
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Sequential(OrderedDict(
            dropout=nn.Dropout(head_dropout),
            projection=nn.Linear(dim, num_classes))) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self):
        def init(m):
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):  # the conv's bias keeps PyTorch's default, as official
                    nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.constant_(m.bias, 0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init)
        if self.num_classes > 0:
            with torch.no_grad():  # 0.001: the initial logits are nearly uniform
                self.head.projection.weight.mul_(0.001)
                self.head.projection.bias.mul_(0.001)

    # -- the encoder, in pieces that MAE, distillation and analysis can call ------

    def embed(self, imgs, mask=None):
        """Images (B, C, H, W) -> unrolled tokens with pos_embed (B, 64 * units, C0).

        mask (B, num_mask_units) bool, True = keep: the removed units are zeroed in the
        image BEFORE the conv (its 7x7 window would otherwise see 3 px into a removed unit)
        and their tokens dropped; every row must keep the same number of units."""
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise util.ConfigError(f"expected {self.img_size}x{self.img_size} images, got "
                                   f"{tuple(imgs.shape[-2:])}; build the model with that img_size")
        g = self.mask_grid
        if mask is not None:
            if mask.shape != (imgs.shape[0], g * g) or mask.dtype != torch.bool:
                raise util.ConfigError(f"mask must be bool ({imgs.shape[0]}, {g * g}), True = keep "
                                       f"(one per mask unit), got {mask.dtype} {tuple(mask.shape)}")
            kept = mask.sum(1)
            if (kept != kept[0]).any():
                raise util.ConfigError("every image must keep the same number of mask units")
            px = PATCH_STRIDE * MU
            imgs = imgs * repeat(mask, "b (gy gx) -> b 1 (gy py) (gx px)", gy=g, py=px, px=px)
        x = rearrange(self.patch_embed.proj(imgs), "b c h w -> b (h w) c") + self.pos_embed
        x = unroll(x, g)  # (B, 64 * units, C0)
        if mask is not None:
            x = rearrange(x, "b (t u) c -> b u t c", u=g * g)[mask]  # (B * k, 64, C0)
            x = rearrange(x, "(b k) t c -> b (t k) c", b=imgs.shape[0])
        return x

    def encode(self, x, mask=None, *, layers=(), attn=(), attn_logits=False, norm1=(), stages=(),
               stop_at=None):
        """Run the blocks on unrolled tokens from `embed`, collecting the taps asked for
        (1-based blocks; stages 1..4). `mask` is the one given to `embed`: it only decides
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
            kind = ("logits" if attn_logits else "probs") if k in attn else None
            x, t = blk(x, attn_kind=kind)
            if k in layers:
                taps.layers[k] = x
            if k in attn:
                taps.attn[k] = t["attn"]
            if k in norm1:
                taps.norm1[k] = t["norm1"]
            s = ends.get(k)
            if s in stages:
                taps.stages[s] = reroll(x, self.pooled[k - 1], None if mask is not None else self.mask_grid)
        if last == self.depth:
            taps.x = x
        return taps

    def forward_features(self, imgs, mask=None):
        """Images -> the last block's tokens (B, n, C_last) (timm's convention)."""
        return self.encode(self.embed(imgs, mask), mask).x

    def forward_head(self, x, pre_logits=False):
        x = self.norm(x.mean(dim=1))  # mean over tokens, then LayerNorm
        return x if pre_logits else self.head(x)

    def forward(self, imgs):
        """Logits (B, num_classes), in train and eval mode alike."""
        return self.forward_head(self.forward_features(imgs))


# ----------------------------------------------------------------------------
# Presets: the official models (facebookresearch/hiera) and MAE-Lite's student.

HIERA_PRESETS = {
    "hiera_tiny_224": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2)),
    "hiera_small_224": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2)),
    "hiera_base_224": dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3)),
    # MAE-Lite (IJCV): dims 46/92/184/368, heads 1/2/4/8 (head_dim 46); q_pool 3 to
    # fine-tune, 2 in MAE pre-training (mae_pretrain.mae_hiera_tiny).
    "hiera_lite_tiny": dict(embed_dim=46, num_heads=1, stages=(1, 2, 7, 2)),
}


def create_hiera(name, **overrides):
    """A preset by name with keyword overrides (img_size, q_pool, num_classes,
    drop_path_rate, ...; None values are ignored)."""
    if name not in HIERA_PRESETS:
        raise util.ConfigError(f"unknown model {name!r}; choose from {', '.join(HIERA_PRESETS)}")
    return Hiera(**{**HIERA_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def hiera_tiny_224(**kw):
    return create_hiera("hiera_tiny_224", **kw)


def hiera_small_224(**kw):
    return create_hiera("hiera_small_224", **kw)


def hiera_base_224(**kw):
    return create_hiera("hiera_base_224", **kw)


def hiera_lite_tiny(**kw):
    return create_hiera("hiera_lite_tiny", **kw)


# ----------------------------------------------------------------------------
# The architecture of a checkpoint, read from its weights

HEADS_BY_WIDTH = {96: 1, 46: 1, 112: 2, 144: 2, 256: 4}  # the official sizes and MAE-Lite's


def infer_hiera_config(path_or_obj, name=None):
    """Hiera / MAE-Hiera constructor arguments from a checkpoint in any util-readable layout.

    From the weights: embed_dim, in_chans, img_size (pos_embed's grid), stages (where the
    block width doubles), mlp_ratio, num_classes, and for an MAE checkpoint q_pool (one
    fusion conv per pooling stage) and the decoder's size. Not in the weights: the initial
    head count (the recorded model_config's, else the official count for that width; see
    'heads_inferred') and a classifier's q_pool (recorded, else the official 3)."""
    name = name or str(path_or_obj)
    obj = util.load_checkpoint(path_or_obj) if isinstance(path_or_obj, (str, Path)) else path_or_obj
    sd = util.read_state_dict(obj, name=name)
    if util.checkpoint_family(sd) != "Hiera":
        raise util.CheckpointError(f"{name}: is a ViT checkpoint, not a Hiera (no block changes width)")
    saved = (obj.get("model_config") if isinstance(obj, dict) else None) or {}
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    needed = ["pos_embed", *(f"blocks.{i}.mlp.fc{j}.weight" for i in range(depth) for j in (1, 2))]
    if any(k not in sd for k in needed):  # what the architecture is read from
        raise util.CheckpointError(f"{name}: has no {next(k for k in needed if k not in sd)} (a partial "
                                   f"checkpoint?); the architecture cannot be read from it")
    widths = [sd[f"blocks.{i}.mlp.fc2.weight"].shape[0] for i in range(depth)]
    stages = [sum(1 for w in widths if w == widths[0] * 2 ** s) for s in range(4)]
    D, C = sd["patch_embed.proj.weight"].shape[:2]
    cfg = dict(embed_dim=D, in_chans=C, img_size=math.isqrt(sd["pos_embed"].shape[1]) * PATCH_STRIDE,
               stages=stages, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / widths[0],
               num_heads=saved.get("num_heads") or HEADS_BY_WIDTH.get(D, 1),
               heads_inferred="num_heads" not in saved,
               q_pool=saved.get("q_pool", 3),
               num_classes=sd["head.projection.weight"].shape[0] if "head.projection.weight" in sd else 0)
    if "decoder_embed.weight" in sd:
        Dd = sd["decoder_embed.weight"].shape[0]
        cfg.update(q_pool=sum(1 for k in sd if re.fullmatch(r"multi_scale_fusion_heads\.\d+\.weight", k)),
                   decoder_embed_dim=Dd,
                   decoder_depth=len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")}),
                   decoder_num_heads=saved.get("decoder_num_heads") or max(1, Dd // 32))
        del cfg["num_classes"]
    return cfg
