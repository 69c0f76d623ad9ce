"""Distillation during pre-training: a lightweight ViT learns from a frozen, bigger MIM teacher.

Four methods and one baseline, one flag apart (--method, default attn). The teacher is any
checkpoint checkpoints.py reads (official MAE, timm, Hugging Face, this project's MAE and
distilled students). x_j: output of student block j; d, D: student and teacher depths.

attn -- MAE-Lite's D-MAE (Wang et al., ICML 2023). The student is an MAE (mask 0.75, norm-pix
    loss, a 96-wide 1-block decoder); the teacher encodes the SAME kept tokens. The student's
    last-layer attention logits, mixed from Hs to Ht heads by a learned 1x1 map W, regress the
    teacher's (block k, the last by default):
        A = q k^T / sqrt(d_head)     (B, H, 1+n, 1+n)
        loss = pixel + w * mean_{b,t,i,j} (sum_h W[t,h] A_s[b,h,i,j] - A_t[b,t,i,j])^2
    On Hiera (MAE-Lite IJCV: --model mae_hiera_tiny and an MAE-Hiera teacher) the same code
    runs over mask units: both last blocks attend globally with 8 heads over the 4 tokens left
    of each kept unit, in the same unrolled order: A (B, 8, 4k, 4k), 116 tokens at 224 px.
d2 -- D²-MAE, MAE-Lite's decoupled distillation (IJCV 2025). attn asks the top blocks for two
    things at once, pixels and the teacher's attention; d2 separates them. The decoder reads
    block k (--decode_layer, 8 of 12) through the encoder's norm; an extra attention-only block
    d+1 (norm1 and qkv) takes the teacher's attention:
        loss = MAE(decoder(norm(x_k))) + w * mean (W A_s - A_t)^2,  A_s from norm1(x_d) in block d+1
    Blocks k+1..d learn only from the distillation loss. Only blocks 1..d are kept afterwards
    (the extra block is saved under 'distill.extra_block.'). Anything that reads the encoder's
    final output applies `norm` to x_d, which it never saw in pre-training: fine-tune with
    mean pooling (fc_norm, finetune.py's default) or let fine-tuning retrain it.
relation -- TinyMIM (Ren et al., CVPR 2023). Both see the full image (colour jitter on the
    student's view only); no pixel loss. From the student's last block and teacher block k
    (18 of a 24-block teacher), per head, with each side's own head_dim d:
        R_qk = softmax(Q K^T / sqrt(d)),   R_vv = softmax(V V^T / sqrt(d))
        loss = KL(R_qk^T || R_qk^S) + KL(R_vv^T || R_vv^S)   (sum over keys; mean over B, heads, queries)
    The student's last block has the teacher's head count (head_dim = Ds / Ht). Only its q, k, v
    are used: its attn.proj, norm2, mlp and the final norm are frozen at init.
amd -- AMD (Zhao et al., CVPR 2024). One permutation per sample: the student keeps the first
    25% of the patches, the teacher the first 50% (a superset: it sees the "extra" 25% too).
    Student blocks {d/2, d} align to teacher blocks {D/2, D}, each with a bias-free projector P_l:
        direct_l = MSE(P_l s_l, t_l[visible])
        gen_l    = MSE(G_l([P_l s_l + pos ; m_l + pos])[extra], t_l[extra])
        loss     = pixel + w * (mean_l direct_l + mean_l gen_l)
    s_l, t_l: raw block outputs; G_l: 2 blocks at the teacher's width; m_l: a learned mask
    token; pos: AMD's fixed 1-D sinusoid table over the raster patch index (VideoMAE's).
feature -- TinyMIM's feature-distillation baseline: smooth-L1 (beta 2) between Linear(student
    output) and the teacher's block-k output through a LayerNorm without affine parameters.

Everything that trains is one module saved under 'model': the student under 'student.' (so the
file loads as a plain backbone for fine-tuning and as the next teacher, B -> S -> T) and the
method's own parts under 'distill.' (reported unused when loaded as a backbone). The teacher is
an argument of forward, never a submodule: not saved, not trained, not wrapped in DDP. It runs
in eval mode under no_grad and the student's autocast, stops after the deepest block the method
reads, and only a block whose attention is read leaves the fused attention kernel.

Where this differs from the official code:
- TinyMIM: log_softmax on both sides (the official .log() of a softmax underflows in fp16);
  vit.py's linear drop-path ramp 0 -> 0.1 (the official gives every block but the last 0.1); a
  teacher that is itself a relation student keeps its recorded last-block head count (the
  official rebuilds it with uniform heads, as --teacher_num_heads N does here). Its last block
  was trained only up to q/k/v, so amd / feature at that block are refused.
- AMD: images, not video. Image mask ratios are not in the released code: the defaults 0.75 /
  0.5 are our choice (video: 0.90 / 0.75). The cls token is not aligned (the video ViTs have
  none). The generators' mask tokens are registered parameters (the official list is never
  trained or saved), and the generator has no final norm (the official one is never used).
  Layers are averaged, as the code does (the paper sums).
- MAE-Lite: the head mixer is a Linear(Hs, Ht) applied by einsum, the same map as the official
  Conv2d(Hs, Ht, 1) with the same default init. --teacher_layer picks the teacher's block for a
  teacher of another depth (the official takes the same index). On Hiera the teacher is a plain
  Hiera built from the weights (its MAE parts reported unused), not the MAE with its decoder
  deleted.
- D²-MAE: the official builds a 13-block MAE and deletes block 13's attn.proj, norm2 and mlp;
  here the extra block is its own module (AttentionOnlyBlock) outside the student, which stays
  a plain d-block MAE. Only q and k of its qkv are computed (the official computes v and drops
  it: no gradient reaches it either way). The official teacher runs all its blocks; here it
  stops after the block it gives. --decode_layer and --teacher_layer generalise the fixed 8, 12.
- Crops, colour jitter and masks come from each sample's own seed (data.py), so a run is the
  same on 1 or N GPUs and a resumed run continues exactly.
"""
import argparse
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import checkpoints
import data
import hiera
import util
from mae_pretrain import MaskedAutoencoderViT, check_masking, check_widths, mae_loss, random_masking
from util import print0
from vit import VIT_PRESETS, Block, VisionTransformer, init_weights

# ----------------------------------------------------------------------------
# Losses (each copyable on its own)


def relation_terms(student, teacher):
    """TinyMIM's Q-K and V-V relation losses.

    student, teacher: (q, k, v) tuples, each tensor (B, heads, N, head_dim); B, heads and N
    must match, head_dim may differ. R = softmax(A B^T / sqrt(head_dim)) over keys, per head.
    Returns (KL(R_qk^t || R_qk^s), KL(R_vv^t || R_vv^s)), each summed over keys and averaged
    over batch x heads x queries. log_softmax on both sides: no log of an underflowed 0.
    """
    (sq, sk, sv), (tq, tk, tv) = student, teacher
    if sq.shape[:3] != tq.shape[:3]:
        raise ValueError(f"student and teacher q must agree in (B, heads, N): "
                         f"{tuple(sq.shape[:3])} vs {tuple(tq.shape[:3])}")

    def log_relation(a, b):  # (B, h, N, d), (B, h, N, d) -> (B, h, N, N) log-probabilities
        return F.log_softmax(a @ b.transpose(-2, -1) * a.shape[-1] ** -0.5, dim=-1)

    def kl(log_s, log_t):  # sum_j p_t (log p_t - log p_s), then the mean over (B, h, N)
        return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1).mean()

    return (kl(log_relation(sq, sk), log_relation(tq, tk)),
            kl(log_relation(sv, sv), log_relation(tv, tv)))


class AttentionDistillLoss(nn.Module):
    """MAE-Lite's attention distillation with a learned mixing over heads.

    student: (B, Hs, N, N) pre-softmax logits q k^T / sqrt(d); teacher: (B, Ht, N, N).
        loss = mean_{b,t,i,j} (sum_h W[t, h] * student[b, h, i, j] - teacher[b, t, i, j])^2
    W (Ht, Hs) has no bias: a 1x1 convolution over the head axis.
    """

    def __init__(self, student_heads, teacher_heads):
        super().__init__()
        self.mix = nn.Linear(student_heads, teacher_heads, bias=False)

    def forward(self, student, teacher):
        mixed = torch.einsum("b h n m, t h -> b t n m", student, self.mix.weight)
        return F.mse_loss(mixed, teacher)


class FeatureGenerator(nn.Module):
    """AMD's generator for one aligned layer: `depth` ViT blocks at the teacher's width D
    (D/64 heads) that see the projected student tokens and a mask token at each extra
    position, both with AMD's fixed 1-D sinusoid positions, and predict the teacher's
    features there. visible (B, ns, D), pos_visible (B, ns, D), pos_extra (B, ne, D) -> (B, ne, D)
    """

    def __init__(self, dim, depth=2, mlp_ratio=4.0):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # registered: trained and saved
        self.blocks = nn.Sequential(*(Block(dim, max(1, dim // 64), mlp_ratio) for _ in range(depth)))
        self.blocks.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible, pos_visible, pos_extra):
        x = torch.cat([visible + pos_visible, self.mask_token + pos_extra], dim=1)  # (B, ns+ne, D)
        return self.blocks(x)[:, visible.shape[1]:]


class AMDAlignment(nn.Module):
    """AMD's multi-layer alignment: per aligned layer l, a bias-free projector P_l (Ds -> Dt)
    shared by a direct and a generation loss, and a FeatureGenerator G_l.

    student: list of (B, ns, Ds) student block outputs at the student-visible patches
    teacher: list of (B, ns + ne, Dt) teacher block outputs at [student-visible ; extra]
    ids_visible (B, ns), ids_extra (B, ne): patch indices (their sinusoid-table positions)
        direct = mean_l MSE(P_l s_l, t_l[:, :ns])
        gen    = mean_l MSE(G_l(P_l s_l, pos[ids_visible], pos[ids_extra]), t_l[:, ns:])
    Returns (direct, gen).
    """

    def __init__(self, student_dim, teacher_dim, num_layers, grid_size, generator_depth=2, mlp_ratio=4.0):
        super().__init__()
        self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=False) for _ in range(num_layers))
        self.projectors.apply(init_weights)
        self.generators = nn.ModuleList(FeatureGenerator(teacher_dim, generator_depth, mlp_ratio)
                                        for _ in range(num_layers))
        self.register_buffer("pos", sinusoid_table(grid_size ** 2, teacher_dim),
                             persistent=False)  # (L, Dt), fixed: AMD's 1-D table over token indices

    def forward(self, student, teacher, ids_visible, ids_extra):
        ns = ids_visible.shape[1]
        direct, gen = [], []
        for s, t, proj, generator in zip(student, teacher, self.projectors, self.generators):
            s = proj(s)  # (B, ns, Dt)
            direct.append(F.mse_loss(s, t[:, :ns]))
            pred = generator(s, self.pos[ids_visible], self.pos[ids_extra])  # (B, ne, Dt)
            gen.append(F.mse_loss(pred, t[:, ns:]))
        return torch.stack(direct).mean(), torch.stack(gen).mean()


class FeatureDistillLoss(nn.Module):
    """TinyMIM's feature-distillation baseline. student (B, N, Ds) final normalized tokens;
    teacher (B, N, Dt) block-k output. loss = smooth_l1_beta2(Linear(student), LN_no_affine(teacher))"""

    def __init__(self, student_dim, teacher_dim):
        super().__init__()
        self.head = nn.Linear(student_dim, teacher_dim)
        init_weights(self.head)

    def forward(self, student, teacher):
        target = F.layer_norm(teacher.float(), teacher.shape[-1:], eps=1e-6)
        return F.smooth_l1_loss(self.head(student).float(), target, beta=2.0)


class AttentionOnlyBlock(nn.Module):
    """D²-MAE's extra block: a pre-norm ViT block cut after its attention logits.

    x (B, N, D) -> A = q k^T / sqrt(d)   (B, heads, N, N), with q, k from qkv(norm1(x)).
    A block's norm1 and fused qkv (the official keeps exactly these of block 13), nothing else.
    qkv keeps the official [3D, D] layout (three, heads, head_dim), but only its q and k thirds
    are computed; the v third is never used (no gradient reaches it).
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.apply(init_weights)  # MAE's init, qkv as one matrix

    def forward(self, x):
        D = x.shape[-1]
        qk = F.linear(self.norm1(x), self.qkv.weight[:2 * D], self.qkv.bias[:2 * D])  # (B, N, 2D)
        q, k = rearrange(qk, "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        return (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)


# ----------------------------------------------------------------------------
# AMD's masks and targets


def amd_keep_counts(num_patches, student_ratio, teacher_ratio):
    """AMD's visible counts: L - int(r L) (its mask generator removes int(r L) patches),
    which can be one more than MAE's int(L (1 - r)): 20 vs 19 of 196 at r = 0.9."""
    return num_patches - int(student_ratio * num_patches), num_patches - int(teacher_ratio * num_patches)


def asymmetric_masking(noise, student_ratio, teacher_ratio):
    """AMD's masks: one random permutation per sample (argsort of its uniform noise (B, L),
    small first, as MAE's random_masking) cut twice. The student keeps ns patches, the teacher
    nt > ns (amd_keep_counts): the student's and then the extra ones.
    Returns (student_keep (B, ns), teacher_extra (B, nt - ns), mask (B, L) 1 = hidden from the student)."""
    ns, nt = amd_keep_counts(noise.shape[1], student_ratio, teacher_ratio)
    ids_keep, mask = random_masking(noise, student_ratio, len_keep=ns)
    return ids_keep, noise.argsort(dim=1)[:, ns:nt], mask


def sinusoid_table(n, dim):
    """The 1-D sinusoid table of VideoMAE / AMD over token indices 0..n-1, (n, dim) float32:
    angle[t, j] = t / 10000^(2 floor(j/2) / dim); sin at even j, cos at odd j."""
    t = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None]
    angle = t / 10000 ** (2 * (j // 2) / dim)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()


def amd_pixel_target(imgs, patch_size, normalize=True):
    """AMD's (VideoMAE's) pixel target: the image back in [0, 1] (its mean/std normalization
    undone), cut into patches [B, L, p*p*C] in MAE's (p, q, c) order; with `normalize`, each
    patch standardised per CHANNEL: (x - mean) / (std_unbiased + 1e-6) over its p*p pixels
    (MAE's norm-pix: over all p*p*C values, sqrt(var + 1e-6))."""
    mean = imgs.new_tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = imgs.new_tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    x = rearrange(imgs.float() * std + mean, "b c (h p) (w q) -> b (h w) (p q) c", p=patch_size, q=patch_size)
    if normalize:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, keepdim=True).sqrt() + 1e-6)
    return rearrange(x, "b l pq c -> b l (pq c)")


# ----------------------------------------------------------------------------
# The methods: the student plus the method's trainable parts, in one module


class Distiller(nn.Module):
    """The student (saved as 'student.*') and the method's own trainable parts ('distill.*').
    The teacher is passed to forward: never a submodule, so never saved, trained or in DDP."""

    def __init__(self, student, distill=None):
        super().__init__()
        self.student, self.distill = student, distill
        self.config = student.config  # saved as model_config: head counts are checked on load


class AttentionDistiller(Distiller):
    """MAE-Lite D-MAE: MAE pixel loss + w * attention-logit loss, the student's last block vs
    teacher block k on the same kept tokens. The student is an MAE on a ViT or on a Hiera."""

    def __init__(self, student, teacher_heads, teacher_layer, mask_ratio, weight=1.0):
        super().__init__(student, AttentionDistillLoss(student.blocks[-1].attn.num_heads, teacher_heads))
        self.teacher_layer, self.mask_ratio, self.weight = teacher_layer, mask_ratio, weight

    def forward(self, imgs, noise, teacher):
        s, k, d = self.student, self.teacher_layer, self.student.depth
        keep, mask = s.masking(noise, self.mask_ratio)  # kept patches (ViT) or mask units (Hiera)
        with torch.no_grad():  # the teacher encodes the same kept tokens
            t = teacher.encode(teacher.embed(imgs, keep), attn=(k,), attn_logits=True, stop_at=k).attn[k]
        latent, taps = s.forward_encoder(imgs, keep, attn=(d,), attn_logits=True)
        pixel = mae_loss(s.forward_decoder(latent, keep), s.patchify(imgs), mask, s.norm_pix_loss)
        attn = self.distill(taps.attn[d], t)
        return pixel + self.weight * attn, {"pixel": pixel, "attn": attn}


class DecoupledDistiller(Distiller):
    """MAE-Lite's D²-MAE: MAE pixel loss from block k's output + w * attention-logit loss
    between an attention-only block d+1 and teacher block t (the same kept tokens).
    'distill.' holds that block (extra_block) and the head mixer (attn_loss)."""

    def __init__(self, student, teacher_heads, teacher_layer, mask_ratio, weight=1.0):
        heads = student.config["num_heads"]
        super().__init__(student, nn.ModuleDict(dict(extra_block=AttentionOnlyBlock(student.embed_dim, heads),
                                                     attn_loss=AttentionDistillLoss(heads, teacher_heads))))
        self.teacher_layer, self.mask_ratio, self.weight = teacher_layer, mask_ratio, weight

    def forward(self, imgs, noise, teacher):
        s, t, k, d = self.student, self.teacher_layer, self.student.decode_layer, self.student.depth
        keep, mask = s.masking(noise, self.mask_ratio)
        with torch.no_grad():  # the teacher encodes the same kept tokens
            target = teacher.encode(teacher.embed(imgs, keep), attn=(t,), attn_logits=True, stop_at=t).attn[t]
        taps = s.encode(s.embed(imgs, keep), layers=(k, d))  # blocks 1..d once; x_k and x_d, (B, 1+n, D)
        latent = s.norm(taps.layers[k])  # the decoder reads block k: blocks k+1..d get no pixel gradient
        pixel = mae_loss(s.forward_decoder(latent, keep), s.patchify(imgs), mask, s.norm_pix_loss)
        attn = self.distill["attn_loss"](self.distill["extra_block"](taps.layers[d]), target)
        return pixel + self.weight * attn, {"pixel": pixel, "attn": attn}


class RelationDistiller(Distiller):
    """TinyMIM: Q-K + V-V relation KL between the student's last block and teacher block k."""

    def __init__(self, student, teacher_layer):
        super().__init__(student)
        self.teacher_layer = teacher_layer
        last = student.blocks[-1]  # only its q, k, v are used: no gradient reaches the rest
        for m in (last.attn.proj, last.norm2, last.mlp, student.norm):
            m.requires_grad_(False)

    def forward(self, student_view, teacher_view, teacher):
        s, k, d = self.student, self.teacher_layer, self.student.depth
        with torch.no_grad():
            t = teacher.encode(teacher.embed(teacher_view), qkv=(k,), stop_at=k).qkv[k]
        qkv = s.encode(s.embed(student_view), qkv=(d,), stop_at=d).qkv[d]  # skips block d's rest
        qk, vv = relation_terms(qkv, t)
        return qk + vv, {"qk": qk, "vv": vv}


class AMDDistiller(Distiller):
    """AMD: MAE pixel loss + w * (direct + generation alignment), asymmetric masks."""

    def __init__(self, student, teacher_dim, student_layers, teacher_layers, mask_ratio,
                 teacher_mask_ratio, weight=1.0):
        super().__init__(student, AMDAlignment(student.embed_dim, teacher_dim, len(student_layers),
                                               student.patch_embed.grid_size))
        self.student_layers, self.teacher_layers = tuple(student_layers), tuple(teacher_layers)
        self.mask_ratio, self.teacher_mask_ratio, self.weight = mask_ratio, teacher_mask_ratio, weight

    def forward(self, imgs, noise, teacher):
        s = self.student
        keep, extra, mask = asymmetric_masking(noise, self.mask_ratio, self.teacher_mask_ratio)
        with torch.no_grad():  # the teacher sees [student-visible ; extra] (+ cls, dropped below)
            taps = teacher.encode(teacher.embed(imgs, torch.cat([keep, extra], 1)),
                                  layers=self.teacher_layers, stop_at=max(self.teacher_layers))
            t = [taps.layers[k][:, 1:] for k in self.teacher_layers]  # (B, ns + ne, Dt)
        latent, taps = s.forward_encoder(imgs, keep, layers=self.student_layers)
        target = amd_pixel_target(imgs, s.patch_size, s.norm_pix_loss)  # normalised already
        pixel = mae_loss(s.forward_decoder(latent, keep), target, mask, norm_pix=False)
        direct, gen = self.distill([taps.layers[k][:, 1:] for k in self.student_layers], t, keep, extra)
        return pixel + self.weight * (direct + gen), {"pixel": pixel, "direct": direct, "generation": gen}


class FeatureDistiller(Distiller):
    """TinyMIM's baseline: smooth-L1 between Linear(student output) and LN(teacher block k)."""

    def __init__(self, student, teacher_dim, teacher_layer):
        super().__init__(student, FeatureDistillLoss(student.embed_dim, teacher_dim))
        self.teacher_layer = teacher_layer

    def forward(self, student_view, teacher_view, teacher):
        s, k = self.student, self.teacher_layer
        with torch.no_grad():
            t = teacher.encode(teacher.embed(teacher_view), layers=(k,), stop_at=k).layers[k]
        return self.distill(s.encode(s.embed(student_view)).x, t), {}


# ----------------------------------------------------------------------------
# Training: the loss of one batch, run by util.train_one_epoch as mae_pretrain.mae_step is
# (autocast, (loss / accum_iter).backward(), every accum_iter micro-batches optimizer.step())


def masked_step(model, batch, *, teacher):
    """attn, amd, d2: one image per sample, masked by its own noise (drawn in the data worker)."""
    imgs, _, noise = batch
    return model(imgs, noise, teacher)


def two_view_step(model, batch, *, teacher):
    """relation, feature: (B, 2, C, H, W) -> the student's and the teacher's view."""
    views = batch[0]
    return model(views[:, 0], views[:, 1], teacher)


class TwoViews:
    """TinyMIM's input: one crop + flip shared by both views, colour jitter on the student's
    only. Image -> (2, C, H, W) uint8 [student view, teacher view]."""

    def __init__(self, input_size, min_scale=0.2, jitter=0.4):
        from torchvision.transforms import v2
        self.common = data.DecodeCropFlip(input_size, (min_scale, 1.0))
        self.jitter = v2.ColorJitter(jitter, jitter, jitter)

    def __call__(self, img):
        img = self.common(img)
        return torch.stack([self.jitter(img), img])


# ----------------------------------------------------------------------------
# The teacher and the student


def heads_at(model, layer):
    """Head count of block `layer` (1-based): the adaptive last block, a Hiera stage may differ."""
    return model.blocks[layer - 1].attn.num_heads


def student_patch(args):
    """The student's patch size, None for a Hiera (4x4 px tokens, 32x32 px mask units)."""
    return None if args.model in hiera.MAE_HIERA_PRESETS else args.patch_size or VIT_PRESETS[args.model].get("patch_size", 16)


def build_teacher(args, student_patch, device):
    """The frozen teacher: the checkpoint's architecture at the student's --input_size
    (checkpoints.build_encoder; pos_embed interpolated, every key checked)."""
    obj = checkpoints.load(args.teacher)  # one line: missing, corrupt, unsafe, unknown layout
    family = checkpoints.family(checkpoints.read_state_dict(obj, args.teacher))
    student = "Hiera" if args.model in hiera.MAE_HIERA_PRESETS else "ViT"
    if family != student:
        raise util.CheckpointError(f"{args.teacher}: --teacher is a {family} checkpoint and --model {args.model} "
                                   f"a {student}: both must be ViTs or both Hieras (a Hiera pair only with --method attn)")
    teacher, cfg = checkpoints.build_encoder(obj, args.teacher, args.input_size, heads=args.teacher_num_heads,
                                             preset=args.teacher_model)
    if family == "ViT" and cfg["patch_size"] != student_patch:  # the two must cut the same tokens
        raise util.CheckpointError(f"{args.teacher}: patch size {cfg['patch_size']} does not fit the student's "
                                   f"{student_patch}: teacher and student must see the same patches")
    teacher.last_output_untrained = cfg["last_output_untrained"]
    return teacher.to(device).requires_grad_(False)


def cast_for_autocast(teacher, autocast):
    """Store the frozen teacher's matmul weights (Linear, Conv) in autocast's dtype once.
    Autocast caches its casts only for leaf tensors that require grad, so a frozen fp32
    teacher would be re-cast on every forward: a full read and write of its weights per step.
    The values are the same (autocast rounds the same way); LayerNorm stays fp32."""
    dtype = getattr(autocast, "keywords", {}).get("dtype")
    if dtype is not None:
        for m in teacher.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.to(dtype)


def resolve_layers(args, student_depth, teacher):
    """Fill in the default layers (saved with the run's args) and check them, before training."""
    D, d = teacher.depth, student_depth
    if args.method == "amd":
        args.student_layers = args.student_layers or sorted({max(d // 2, 1), d})
        args.teacher_layers = args.teacher_layers or sorted({max(D // 2, 1), D})
        if len(args.student_layers) != len(args.teacher_layers):
            raise util.ConfigError(f"--student_layers {args.student_layers} and --teacher_layers "
                                   f"{args.teacher_layers} must pair up one to one")
        if not all(1 <= k <= d for k in args.student_layers):
            raise util.ConfigError(f"--student_layers {args.student_layers}: the student has {d} blocks")
        needed = args.teacher_layers
    else:
        if args.teacher_layer is None:
            args.teacher_layer = 18 if args.method == "relation" and D == 24 else D
        needed = [args.teacher_layer]
    if not all(1 <= k <= D for k in needed):
        flag = "--teacher_layers" if args.method == "amd" else "--teacher_layer"
        raise util.CheckpointError(f"{args.teacher}: has {D} blocks, cannot give block(s) {needed} ({flag})")
    if args.method in ("amd", "feature") and D in needed and teacher.last_output_untrained:
        raise util.CheckpointError(f"{args.teacher}: a relation student, whose last block was trained only "
                                   f"up to its q/k/v: its output is no target; pick --teacher_layer(s) below {D}")


def decoder_size(method, width):
    """The student's pixel decoder (width, blocks, heads) as each paper's code builds it:
    MAE-Lite's 96 x 1 x 3 for attn and d2; for amd VideoMAE's (AMD's base): ViT-S 192 x 4 x 3,
    ViT-B 384 x 4 x 6, i.e. half the student's width, 4 blocks, 64-dim heads; widths with no
    official decoder (ViT-Tiny: 96) take 32-dim heads, MAE-Lite's decoder head size."""
    if method != "amd":
        return 96, 1, 3
    dim = width // 2
    return dim, 4, dim // 64 if dim % 64 == 0 else max(1, dim // 32)


def build_model(args, teacher):
    """The student for --method (an MAE for attn/amd/d2, a plain ViT otherwise) in its
    Distiller. Call resolve_layers first."""
    k, decoder = args.teacher_layer, dict(decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                                          decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss)
    if args.model in hiera.MAE_HIERA_PRESETS:
        student = hiera.create_hiera(args.model, img_size=args.input_size, num_heads=args.num_heads, **decoder)
    else:
        arch = {**VIT_PRESETS[args.model], "img_size": args.input_size, "patch_size": student_patch(args),
                **({"num_heads": args.num_heads} if args.num_heads else {})}
        if args.method in ("attn", "amd", "d2"):
            student = MaskedAutoencoderViT(**arch, **decoder, decode_layer=args.decode_layer if args.method == "d2" else None)
        else:  # TinyMIM's student: fixed sin-cos positions, the adaptive last block for relation
            student = VisionTransformer(**arch, num_classes=0, drop_path_rate=args.drop_path, pos_embed="sincos",
                                        last_block_heads=heads_at(teacher, k) if args.method == "relation" else None)
    if args.method in ("attn", "d2"):  # the logits must pair up entry by entry
        s_layout, t_layout = student.attention_layout(student.depth), teacher.attention_layout(k)
        if s_layout != t_layout:
            raise util.CheckpointError(f"{args.teacher}: its block {k} attends {t_layout}; the student's last "
                                       f"block {s_layout}: the logits do not pair up (an MAE-Hiera teacher, "
                                       f"q_pool 2, at a block after the first of stage 3)")
        print0(f"attention distillation: student block {student.depth} ({heads_at(student, student.depth)} heads) "
               f"-> head mixer -> teacher block {k} ({heads_at(teacher, k)} heads)")
    if args.method == "attn":
        return AttentionDistiller(student, heads_at(teacher, k), k, args.mask_ratio, args.distill_weight)
    if args.method == "d2":
        return DecoupledDistiller(student, heads_at(teacher, k), k, args.mask_ratio, args.distill_weight)
    if args.method == "relation":
        return RelationDistiller(student, k)
    if args.method == "amd":
        return AMDDistiller(student, teacher.embed_dim, args.student_layers, args.teacher_layers,
                            args.mask_ratio, args.teacher_mask_ratio, args.distill_weight)
    return FeatureDistiller(student, teacher.embed_dim, k)


# ----------------------------------------------------------------------------
# Command line

METHODS = ("attn", "relation", "amd", "feature", "d2")
# Each paper's schedule and crop, where a flag is not given: MAE-Lite's (400 epochs, 40 warmup,
# crop scale 0.08) for attn and d2; TinyMIM's (300, 15, 0.2) for relation, feature and amd. With
# other --epochs and no --warmup_epochs the warmup keeps the paper's fraction.
METHOD_DEFAULTS = {m: dict(epochs=400, warmup_epochs=40, min_crop_scale=0.08) if m in ("attn", "d2") else
                   dict(epochs=300, warmup_epochs=15, min_crop_scale=0.2) for m in METHODS}
# Flags that only some methods read: giving one to another method is an error, not a no-op.
METHOD_FLAGS = {**dict.fromkeys(("mask_ratio", "norm_pix_loss", "decoder_embed_dim", "decoder_depth",
                                  "decoder_num_heads", "distill_weight"), ("attn", "amd", "d2")),
                **dict.fromkeys(("drop_path", "color_jitter"), ("relation", "feature")),
                **dict.fromkeys(("student_layers", "teacher_layers", "teacher_mask_ratio"), ("amd",)),
                "teacher_layer": ("attn", "relation", "feature", "d2"), "decode_layer": ("d2",)}


def get_args_parser():
    p = argparse.ArgumentParser("Distillation during pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("student")
    g.add_argument("--method", default="attn", choices=METHODS,
                   help="attn: MAE-Lite's D-MAE, relation: TinyMIM, amd: AMD, feature: TinyMIM's baseline, "
                        "d2: MAE-Lite's decoupled D²-MAE; each runs its paper's schedule (--epochs, "
                        "--warmup_epochs, --min_crop_scale) unless given: 400/40/0.08 for attn and d2, 300/15/0.2 otherwise")
    g.add_argument("--model", default="vit_tiny", choices=[*VIT_PRESETS, *hiera.MAE_HIERA_PRESETS],
                   help="the student: a ViT, or an MAE-Hiera for --method attn (mae_hiera_tiny: "
                        "MAE-Lite's 46-wide Hiera-Tiny)")
    g.add_argument("--input_size", type=int, default=224)
    g.add_argument("--patch_size", type=int, default=None, help="override the preset's patch size")
    g.add_argument("--num_heads", type=int, default=None,
                   help="override the student's head count (MAE-Lite's tiny: 12, TinyMIM's: 6; a Hiera: its "
                        "first stage's, doubling per stage)")
    g.add_argument("--mask_ratio", type=float, default=None,
                   help="the student's (attn, amd, d2); default 0.75 of the patches for a ViT, 0.4 of "
                        "the mask units for a Hiera (MAE-Lite's Hiera recipe)")
    g.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="normalized-pixel MAE loss (attn, amd, d2)")
    g.add_argument("--decoder_embed_dim", type=int, default=None,
                   help="the student's pixel decoder (attn, amd, d2); default: each paper's, see decoder_size")
    g.add_argument("--decoder_depth", type=int, default=None, help="(attn, amd, d2)")
    g.add_argument("--decoder_num_heads", type=int, default=None, help="(attn, amd, d2)")
    g.add_argument("--decode_layer", type=int, default=8,
                   help="d2: the student block whose output (through the encoder's final norm) the pixel "
                        "decoder reads; the blocks after it learn only from the distillation (MAE-Lite: 8 of 12)")
    g.add_argument("--drop_path", type=float, default=0.1,
                   help="the student's stochastic depth (relation, feature); the teacher has none")
    g.add_argument("--min_crop_scale", type=float, default=None,
                   help="RandomResizedCrop scale=(min, 1); default 0.08 for attn and d2 (MAE-Lite), 0.2 otherwise")
    g.add_argument("--color_jitter", type=float, default=0.4,
                   help="brightness/contrast/saturation jitter of the student's view (relation, feature)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", required=True, help="checkpoint: any format checkpoints.py reads")
    g.add_argument("--teacher_model", default=None, choices=list(VIT_PRESETS),
                   help="the teacher's preset: its width and depth must match the weights, its head "
                        "count is used unless the checkpoint records one (default: all from the weights)")
    g.add_argument("--teacher_num_heads", type=int, default=None,
                   help="the teacher's head count in every block (a Hiera: in its first stage; they double "
                        "per stage); default: as the checkpoint records it, else the width's usual count")
    g.add_argument("--teacher_layer", type=int, default=None,
                   help="1-based teacher block to distil (default: the last; 18 of 24 for relation)")
    g.add_argument("--student_layers", type=int, nargs="+", default=None,
                   help="student blocks to align (amd; default: d/2 and d)")
    g.add_argument("--teacher_layers", type=int, nargs="+", default=None,
                   help="teacher blocks they align to (amd; default: D/2 and D)")
    g.add_argument("--teacher_mask_ratio", type=float, default=0.5,
                   help="the teacher's mask ratio, below --mask_ratio (amd)")
    g.add_argument("--distill_weight", type=float, default=1.0,
                   help="weight of the distillation loss added to the pixel loss (attn, amd, d2)")
    util.add_optim_args(p, batch_size=64, epochs=None, warmup_epochs=None, blr=1.5e-4, weight_decay=0.05)
    data.add_data_args(p)
    util.add_run_args(p, output_dir="runs/distill")
    return p


# What a resumed run must keep: the student, the teacher and what the method reads of them.
# The teacher is checked by its weights (a fingerprint), not its path, which may change.
FIXED_ON_RESUME = (*util.FIXED_ON_RESUME, "method", "teacher_model", "teacher_num_heads",
                   "teacher_layer", "student_layers", "teacher_layers", "decoder_embed_dim",
                   "decoder_depth", "decoder_num_heads", "norm_pix_loss", "mask_ratio",
                   "teacher_mask_ratio", "decode_layer", "distill_weight")


def check_args(args):
    """Refuse what cannot work and fill in each method's defaults (recorded with the run's
    args). Returns the noise values per image: patches (ViT) or mask units (Hiera)."""
    paper = METHOD_DEFAULTS[args.method]
    args.epochs = paper["epochs"] if args.epochs is None else args.epochs
    if args.warmup_epochs is None:  # the paper's fraction of the epochs given
        args.warmup_epochs = paper["warmup_epochs"] * args.epochs / paper["epochs"]
    args.min_crop_scale = paper["min_crop_scale"] if args.min_crop_scale is None else args.min_crop_scale
    util.check_common_args(args, dict(
        teacher_mask_ratio=util.between(0, 1, hi_ok=False), distill_weight=util.NON_NEGATIVE,
        drop_path=util.between(0, 1, hi_ok=False), color_jitter=util.NON_NEGATIVE,
        teacher_num_heads=util.AT_LEAST_1, teacher_layer=util.AT_LEAST_1,
        student_layers=util.AT_LEAST_1, teacher_layers=util.AT_LEAST_1))
    defaults = get_args_parser()
    for flag, methods in METHOD_FLAGS.items():
        if args.method not in methods and getattr(args, flag) != defaults.get_default(flag):
            raise util.ConfigError(f"--{flag} is for --method {'/'.join(methods)}, not {args.method}")
    is_hiera = args.model in hiera.MAE_HIERA_PRESETS
    preset = (hiera.MAE_HIERA_PRESETS if is_hiera else VIT_PRESETS)[args.model]
    if is_hiera:
        if args.method != "attn":
            raise util.ConfigError(f"--method {args.method} takes a ViT student (--model vit_*) and teacher; a "
                                   f"Hiera (--model {args.model}) is distilled with --method attn only")
        for flag in ("patch_size", "teacher_model"):
            if getattr(args, flag) is not None:
                raise util.ConfigError(f"--{flag} is for a ViT; --model {args.model} is a Hiera (4x4 px tokens, "
                                       f"32x32 px mask units, its architecture read from the weights)")
    if args.mask_ratio is None and args.method in METHOD_FLAGS["mask_ratio"]:
        args.mask_ratio = 0.4 if is_hiera else 0.75  # MAE-Lite's Hiera; MAE's
    if args.method == "d2":
        util.check_ranges(args, dict(decode_layer=util.between(1, preset["depth"])))
    units = check_masking(args, student_patch(args))
    if args.method == "amd" and (keeps := amd_keep_counts(units, args.mask_ratio, args.teacher_mask_ratio))[1] <= keeps[0]:
        raise util.ConfigError(f"--teacher_mask_ratio {args.teacher_mask_ratio} must keep more of the "
                               f"{units} patches than --mask_ratio {args.mask_ratio}")
    if args.method in ("attn", "amd", "d2"):  # the defaults are recorded with the run's args
        for flag, default in zip(("decoder_embed_dim", "decoder_depth", "decoder_num_heads"),
                                 decoder_size(args.method, preset["embed_dim"])):
            setattr(args, flag, getattr(args, flag) or default)
        check_widths(preset["embed_dim"], args.num_heads or preset["num_heads"], args.decoder_embed_dim,
                     args.decoder_num_heads, f"--model {args.model}", sincos=not is_hiera)
    return units if args.method in METHOD_FLAGS["mask_ratio"] else 0


def main(args):
    noise = check_args(args)
    dinfo = util.init_distributed(args.device, args.dist_timeout)
    device = dinfo.device
    util.prepare_output_dir(args)
    two_views = args.method in ("relation", "feature")
    transform = (TwoViews(args.input_size, args.min_crop_scale, args.color_jitter) if two_views
                 else data.pretrain_transform(args.input_size, args.min_crop_scale))
    dataset, _ = data.build_dataset(args, train=True, transform=transform)
    loader = data.build_train_loader(dataset, args, dinfo, noise=noise)
    teacher = build_teacher(args, student_patch(args), device)  # a teacher that does not fit stops here
    teacher_id = checkpoints.fingerprint(teacher.state_dict())
    student_depth = sum(hiera.MAE_HIERA_PRESETS[args.model]["stages"]) if args.model in hiera.MAE_HIERA_PRESETS \
        else VIT_PRESETS[args.model]["depth"]
    resolve_layers(args, student_depth, teacher)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args, teacher).to(device)
    n_params = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
    n_extra = sum(p.numel() for p in model.parameters() if p.requires_grad) - n_params
    layers = args.teacher_layers if args.method == "amd" else [args.teacher_layer]
    print0(f"--method {args.method}: student {args.model} ({n_params / 1e6:.2f}M trainable + {n_extra / 1e6:.2f}M "
           f"in the method's parts), teacher block(s) {layers}"
           + (f" <- student block(s) {args.student_layers}" if args.method == "amd" else "")
           + (f" <- attention-only block {student_depth + 1}; pixels decoded from block {args.decode_layer}"
              if args.method == "d2" else ""))
    util.announce(args, dinfo.world_size, len(dataset), len(loader) // args.accum_iter)
    optimizer = util.make_adamw(util.param_groups(model, args.weight_decay), args.lr, (0.9, 0.95), device)
    autocast, scaler = util.amp_setup(args.precision, device)
    cast_for_autocast(teacher, autocast)
    start_epoch, ckpt = util.resume_checkpoint(args, model, optimizer, scaler, fixed=FIXED_ON_RESUME)
    if ckpt is not None and ckpt.get("teacher_fingerprint", teacher_id) != teacher_id:
        raise util.ConfigError(f"--teacher {args.teacher} is not the teacher this run was distilled from (other weights: "
                               f"fingerprint {teacher_id}, not {ckpt['teacher_fingerprint']}): resume with that one")
    net = util.wrap_model(model, dinfo, args)  # the teacher stays outside DDP: an argument of forward
    step = partial(two_view_step if two_views else masked_step, teacher=teacher)
    if util.benchmark(args, net, loader, optimizer, step, device, autocast, scaler):
        return
    for epoch in range(start_epoch, args.epochs):
        stats = util.train_one_epoch(net, loader, optimizer, epoch, args, step, device, autocast, scaler)
        util.end_epoch(args, model, optimizer, scaler, epoch, stats, extra={"teacher_fingerprint": teacher_id})


if __name__ == "__main__":
    util.run_main(main, get_args_parser())
