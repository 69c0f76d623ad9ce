"""The Vision Transformer backbone shared by every stage (Dosovitskiy et al. 2021).

Depends on torch and einops only: copy this file alone. A plain pre-norm ViT whose
state_dict has exactly timm's names and shapes, so the checkpoints in the wild (official
MAE, timm, DeiT, MAE-Lite, TinyMIM) load into it and what it saves loads into timm:

    cls_token [1,1,D]   pos_embed [1,1+N,D]   patch_embed.proj [D,C,p,p]
    blocks.i.{norm1, attn.qkv [3D,D], attn.proj, norm2, mlp.fc1 [4D,D], mlp.fc2}
    norm (cls-token pooling) or fc_norm (mean pooling, then there is no norm)   head

Numerics follow timm/MAE: LayerNorm eps 1e-6, exact GELU, scale head_dim^-0.5, and the
fused qkv projection laid out as (three, heads, head_dim). rel_pos_bias=True adds BEiT's
relative position bias to every block (MAE-Lite's "impr.+RPE" fine-tuning), with BEiT's
names: blocks.i.attn.relative_position_bias_table [(2G-1)^2 + 3, heads] (zero-initialised)
and the fixed buffer blocks.i.attn.relative_position_index [1+G*G, 1+G*G].

Public hooks for MAE, distillation and analysis (no other file reaches inside a block):

    tokens = vit.embed(imgs, keep=ids_keep)      # (B, n, D) kept patch tokens + pos_embed
    taps = vit.encode(tokens, layers=(6, 12), attn=(12,), attn_logits=True,
                      qkv=(18,), norm1=range(1, 13), stop_at=18)
    taps.x          # final normalized tokens (B, 1+n, D); None if stopped early
    taps.layers[6]  # output of block 6 (1-based), before any final norm
    taps.attn[12]   # (B, heads, 1+n, 1+n) pre-softmax logits or probabilities
    taps.qkv[18]    # (q, k, v), each (B, heads, 1+n, head_dim)
    taps.norm1[3]   # block 3's LayerNorm'd input (what MAE-Lite's CKA compares)

Layers are numbered 1..depth as in the papers ("block 18 of 24"). Only blocks named in
`attn` materialise the attention matrix; every other block runs
F.scaled_dot_product_attention (flash / memory-efficient kernels on a GPU). With
`stop_at=k` nothing after block k runs, and if block k is needed only for its q/k/v or
norm1 (TinyMIM's teacher), its attention and MLP are skipped too.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

# ----------------------------------------------------------------------------
# Position embeddings and token selection


def sincos_pos_embed(dim, grid_size, cls_token=True):
    """Fixed 2-D sin-cos position embedding, exactly as MAE computes it.

    For patch token k = row * W + col, channels [0, D/2) encode the COLUMN and [D/2, D) the
    ROW; each half is [sin(pos * w), cos(pos * w)] with w_j = 10000^(-j / (D/4)), j < D/4,
    computed in float64. The cls row is zero. (MAE's code names these halves emb_h/emb_w
    the other way round; the layout here is what its released checkpoints hold.)
    Returns (1 + H*W, D) float32, or (H*W, D) without the cls row.
    """
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    if dim % 4:
        raise ValueError(f"a sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64),
                                torch.arange(gw, dtype=torch.float64), indexing="ij")

    def encode_1d(pos):  # (H, W) -> (H*W, D/2)
        angles = pos.flatten()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode_1d(cols), encode_1d(rows)], dim=1)  # (H*W, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def interpolate_pos_embed(pos_embed, new_grid, num_prefix_tokens=1):
    """Resize a [1, prefix + H*W, D] position embedding to a new patch grid (an int or (H, W)).
    Only the grid part is resized (bicubic, align_corners=False, as MAE and DeiT do)."""
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"pos_embed grid of {grid.shape[1]} tokens is not square")
    if (old, old) == (new_h, new_w):
        return pos_embed
    grid = rearrange(grid, "1 (h w) d -> 1 d h w", h=old)
    grid = F.interpolate(grid.float(), size=(new_h, new_w), mode="bicubic", align_corners=False)
    grid = rearrange(grid, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def gather_tokens(x, ids):
    """Select tokens per sample: x (B, N, D), ids (B, n) -> (B, n, D)."""
    return torch.gather(x, 1, repeat(ids, "b n -> b n d", d=x.shape[-1]))


def relative_position_index(grid_size):
    """BEiT's relative-position index for a cls token + a G x G patch grid, (1+G*G, 1+G*G) long.

    Query patch (r, c) and key patch (r', c'), row-major as the tokens: their offset
    (r - r', c - c') in [-(G-1), G-1]^2 gets the entry (r - r' + G-1) * (2G-1) + (c - c' + G-1)
    of a table of (2G-1)^2 offsets. Three more entries for the cls token, as BEiT orders them:
    (2G-1)^2 for the cls query (row 0), +1 for the cls key (column 0), +2 for cls to cls.
    """
    G = grid_size
    rows, cols = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    r, c = rows.flatten(), cols.flatten()  # (G*G,) each token's row and column
    offset = (r[:, None] - r[None, :] + G - 1) * (2 * G - 1) + (c[:, None] - c[None, :] + G - 1)
    n = (2 * G - 1) ** 2
    index = torch.empty(1 + G * G, 1 + G * G, dtype=torch.long)
    index[1:, 1:] = offset  # (G*G, G*G): query patch x key patch
    index[0, :], index[:, 0], index[0, 0] = n, n + 1, n + 2  # cls query, cls key, cls to cls
    return index


def init_weights(module):
    """MAE's init for one module (use as model.apply(init_weights)): xavier-uniform Linear
    (qkv as one matrix), zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------
# Layers


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens, row-major over the grid."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"input size {img_size} is not divisible by patch size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, imgs):  # (B, C, H, W) -> (B, N, D)
        if imgs.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected {self.img_size}x{self.img_size} images, got "
                             f"{tuple(imgs.shape[-2:])}; build the model with that img_size")
        return rearrange(self.proj(imgs), "b d h w -> b (h w) d")


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability p."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)
        return x * mask.div_(keep)  # scale the (B, 1, 1) mask, not x: one full-size tensor, not two


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection laid out (three, heads, head_dim).

    rel_pos_grid=G adds BEiT's relative position bias for a cls token + G x G patches to the
    logits: softmax(q k^T / sqrt(d) + B) v with B[h, i, j] = table[index[i, j], h]; the table
    starts at zero, so a fresh one changes nothing.
    """

    def __init__(self, dim, num_heads, qkv_bias=True, rel_pos_grid=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_grid = rel_pos_grid
        if rel_pos_grid:  # persistent, as BEiT and MAE-Lite save it (a loader checks a file's)
            self.register_buffer("relative_position_index", relative_position_index(rel_pos_grid))
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * rel_pos_grid - 1) ** 2 + 3, num_heads))

    def rel_pos_bias(self):
        """The relative position bias B (heads, 1+G*G, 1+G*G), or None without the option."""
        if not self.rel_pos_grid:
            return None
        return rearrange(self.relative_position_bias_table[self.relative_position_index], "n m h -> h n m")

    def qkv_heads(self, x):
        """x (B, N, D) -> q, k, v, each (B, heads, N, head_dim)."""
        return rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads).unbind(0)

    def attend(self, x, attn_kind=None):
        """-> (output, (q, k, v), attn); attn is None unless attn_kind is 'logits'
        (q k^T * scale) or 'probs' (their softmax), which leaves the fused kernel."""
        q, k, v = self.qkv_heads(x)
        bias = self.rel_pos_bias()  # (h, N, N) or None
        if bias is not None:
            if bias.shape[-1] != q.shape[-2]:
                raise ValueError(f"the relative position bias is defined on all {bias.shape[-1]} tokens "
                                 f"of the grid, got {q.shape[-2]} (a masked input?)")
            bias = bias.to(q.dtype)  # the float mask must match q under autocast
        if attn_kind is None:  # the bias enters as the kernel's additive float mask
            out, attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias), None
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)
            if bias is not None:
                logits = logits + bias  # what the softmax sees: the tapped logits include it
            probs = logits.softmax(dim=-1)
            out = probs @ v
            attn = logits if attn_kind == "logits" else probs
        return self.proj(rearrange(out, "b h n d -> b n (h d)")), (q, k, v), attn

    def forward(self, x):
        return self.attend(x)[0]


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm and MAE
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, rel_pos_grid=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, rel_pos_grid)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, attn_kind=None, taps=None):
        """x (B, N, D) -> x; a dict `taps` gets this block's 'norm1', 'qkv' and 'attn'."""
        h = self.norm1(x)
        a, qkv, attn = self.attn.attend(h, attn_kind)
        if taps is not None:
            taps.update(norm1=h, qkv=qkv, attn=attn)
        x = x + self.drop_path(a)
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------
# The model


@dataclass
class Taps:
    """What `VisionTransformer.encode` returns; keys are 1-based layer numbers."""
    x: torch.Tensor = None  # final normalized tokens (B, 1+n, D), None if stopped early
    layers: dict = field(default_factory=dict)  # k -> output of block k, (B, 1+n, D)
    attn: dict = field(default_factory=dict)  # k -> (B, heads, 1+n, 1+n)
    qkv: dict = field(default_factory=dict)  # k -> (q, k, v), each (B, heads, 1+n, head_dim)
    norm1: dict = field(default_factory=dict)  # k -> block k's LayerNorm'd input (B, 1+n, D)


class VisionTransformer(nn.Module):
    """ViT with a cls token, timm's parameter names and the MAE initialisation.

    global_pool: 'token' (norm, then the cls token) or 'avg' (mean of the patch tokens, then
    fc_norm; no `norm`). pos_embed: 'learnable' (trunc-normal 0.02) or 'sincos' (fixed, MAE; in
    the state_dict as MAE stores it). last_block_heads: TinyMIM's adaptive last block.
    num_classes=0: no head. rel_pos_bias: a zero-initialised BEiT table per block (full grid only).
    """

    num_prefix_tokens = 1  # the cls token: rows of pos_embed before the patch grid

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, global_pool="token",
                 drop_path_rate=0.0, pos_embed="learnable", last_block_heads=None, rel_pos_bias=False):
        super().__init__()
        if global_pool not in ("token", "avg") or pos_embed not in ("learnable", "sincos"):
            raise ValueError(f"global_pool must be 'token' or 'avg' and pos_embed 'learnable' or "
                             f"'sincos', got {global_pool!r}, {pos_embed!r}")
        # Plain-data constructor arguments: saved with checkpoints so a model can be rebuilt.
        self.config = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                           global_pool=global_pool, drop_path_rate=drop_path_rate,
                           pos_embed=pos_embed, last_block_heads=last_block_heads,
                           rel_pos_bias=rel_pos_bias)
        self.global_pool, self.depth, self.embed_dim = global_pool, depth, embed_dim
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim),
                                      requires_grad=(pos_embed == "learnable"))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # linear stochastic-depth ramp
        heads = [num_heads] * (depth - 1) + [last_block_heads or num_heads]
        grid = self.patch_embed.grid_size if rel_pos_bias else None
        self.blocks = nn.ModuleList(
            Block(embed_dim, h, mlp_ratio, qkv_bias, r, rel_pos_grid=grid) for h, r in zip(heads, rates))
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(init_weights)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv as a (D, C*p*p) matrix
        # its bias keeps Conv2d's default uniform(+-1/sqrt(C*p*p)) init, as MAE leaves it
        nn.init.normal_(self.cls_token, std=0.02)
        with torch.no_grad():
            if pos_embed == "sincos":
                self.pos_embed.copy_(sincos_pos_embed(embed_dim, self.patch_embed.grid_size)[None])
            else:
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if num_classes > 0:  # the MAE fine-tuning head init
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    # -- the encoder, in pieces that MAE, distillation and analysis call ------------

    def embed(self, imgs, keep=None):
        """Images (B, C, H, W) -> patch tokens with their position embedding (B, N, D), or
        only the kept ones (B, n, D) for keep (B, n) patch indices (MAE's masking)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        return x if keep is None else gather_tokens(x, keep)

    def encode(self, x, *, layers=(), attn=(), attn_logits=False, qkv=(), norm1=(), stop_at=None):
        """Prepend the cls token to patch tokens x (B, n, D) from `embed` and run the blocks,
        collecting the taps asked for (1-based layers; see the module docstring)."""
        last = stop_at if stop_at is not None else self.depth
        asked = set(layers) | set(attn) | set(qkv) | set(norm1)
        if not 1 <= last <= self.depth or any(not 1 <= k <= last for k in asked):
            raise ValueError(f"layers must lie in 1..{last} (model depth {self.depth}), "
                             f"got stop_at={stop_at}, taps at {sorted(asked)}")
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1+n, D)
        taps = Taps()
        for k, blk in enumerate(self.blocks[:last], start=1):
            if k == stop_at and k not in layers and k not in attn:
                # Only its norm1 / q, k, v are needed (TinyMIM's relations): skip attention and MLP.
                h = blk.norm1(x)
                if k in norm1:
                    taps.norm1[k] = h
                if k in qkv:
                    taps.qkv[k] = blk.attn.qkv_heads(h)
                return taps
            t = {}
            x = blk(x, ("logits" if attn_logits else "probs") if k in attn else None, t)
            for name, want in (("layers", layers), ("attn", attn), ("qkv", qkv), ("norm1", norm1)):
                if k in want:
                    getattr(taps, name)[k] = x if name == "layers" else t[name]
        if last == self.depth:
            taps.x = self.norm(x)
        return taps

    def attention_layout(self, k):
        """What block k's attention logits pair up over (distillation checks it)."""
        return f"globally over the cls token and {self.num_patches} patch tokens"

    def forward_features(self, imgs):
        """Images -> final normalized tokens (B, 1+N, D), cls first (timm's convention)."""
        return self.encode(self.embed(imgs)).x

    def forward_head(self, x, pre_logits=False):
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, imgs):
        return self.forward_head(self.forward_features(imgs))


# ----------------------------------------------------------------------------
# Presets (width / depth / heads). Override anything: create_vit("vit_tiny", num_heads=12) is
# MAE-Lite's tiny, num_heads=6 TinyMIM's.

VIT_PRESETS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}


def create_vit(name, **overrides):
    """A preset by name with keyword overrides (None values are ignored)."""
    if name not in VIT_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(VIT_PRESETS)}")
    return VisionTransformer(**{**VIT_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})

