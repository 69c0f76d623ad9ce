"""Distillation during pre-training: a lightweight ViT learns from a frozen, bigger MIM teacher.

Four methods and one baseline, one flag apart (--method). The teacher is any ViT checkpoint
util can read (official MAE, timm, Hugging Face, this project's MAE and distilled students);
with --method attn, the student and the teacher may both be MAE-Hieras instead (see Hiera below).

attn -- MAE-Lite's D-MAE (Wang et al., ICML 2023). The student is an MAE (mask 0.75, norm-pix
    loss, a 96-wide 1-block decoder); the teacher encodes the SAME kept tokens. The student's
    last-layer attention logits, mixed from Hs to Ht heads by a learned 1x1 map W, regress the
    teacher's:   A = q k^T / sqrt(d)  (B, H, 1+n, 1+n)
                 loss = pixel + w * mean_{b,t,i,j} (sum_h W[t,h] A_s[b,h,i,j] - A_t[b,t,i,j])^2
relation -- TinyMIM (Ren et al., CVPR 2023). Both see the full image (colour jitter on the
    student's view only); no pixel loss. From the student's last block and the teacher's block k
    (18 of a 24-block teacher), per head, with each side's own head_dim d:
                 R_qk = softmax(Q K^T / sqrt(d)),   R_vv = softmax(V V^T / sqrt(d))
                 loss = KL(R_qk^T || R_qk^S) + KL(R_vv^T || R_vv^S)   (sum over keys; mean over
                        batch, heads, queries)
    The student's last block has the teacher's head count (head_dim = Ds / Ht), so heads pair
    up one to one. Only that block's q, k, v are used: its attn.proj, norm2, mlp and the final
    norm would get no gradient, so they are frozen (requires_grad False) and DDP needs no
    find_unused_parameters. They stay at their initial values; fine-tuning trains them.
amd -- AMD (Zhao et al., CVPR 2024). One permutation per sample: the student keeps the first
    25% of the patches, the teacher the first 50% (a superset: it sees the "extra" 25% too).
    Student blocks {d/2, d} align to teacher blocks {D/2, D}, each with a bias-free projector P_l:
                 direct_l = MSE(P_l s_l, t_l[visible])
                 gen_l    = MSE(G_l([P_l s_l + pos ; m_l + pos])[extra], t_l[extra])
                 loss = pixel + w * (mean_l direct_l + mean_l gen_l)
    s_l, t_l: raw block outputs (no norm, as the official code); G_l: 2 blocks at the
    teacher's width; m_l: a learned mask token; pos: AMD's fixed 1-D sinusoid table over the
    raster patch index (VideoMAE's `get_sinusoid_encoding_table`, not MAE's 2-D grid sin-cos).
feature -- TinyMIM's feature-distillation baseline: smooth-L1 (beta 2) between Linear(student
    output) and the teacher's block-k output through a LayerNorm without affine parameters.
d2 -- D²-MAE, MAE-Lite's decoupled distillation (Gao et al., IJCV 2025). attn asks the student's
    top blocks for two things at once: pixels for the decoder and the teacher's attention. d2
    separates them. The student (an MAE, as attn) gets one extra block during pre-training,
    block d+1, cut after its attention logits (norm1 and qkv only); the decoder reads block k
    (--decode_layer, 8 of 12) through the encoder's final norm. x_j: output of student block j.
                 pixel = MAE loss of decoder(norm(x_k))
                 A_s   = q k^T / sqrt(d) of norm1(x_d) in block d+1        (B, Hs, 1+n, 1+n)
                 loss  = pixel + w * mean_{b,t,i,j} (sum_h W[t,h] A_s[b,h,i,j] - A_t[b,t,i,j])^2
    Blocks k+1..d still run, but the pixel loss never reaches them: they learn only through the
    extra block's distillation loss (which reaches blocks 1..k too). Afterwards only blocks 1..d
    are used: the extra block is saved under 'distill.extra_block.' and reported as not used
    when the file is loaded as a backbone. The encoder's `norm` is the one block k's output went
    through: mean-pooling fine-tuning (fc_norm, finetune.py's default) never uses it, but
    anything that reads the encoder's final output (forward_features, --cls_token pooling,
    analyze.py's 'out' layer, a dense-task backbone's last norm) applies it to block d's output,
    which it never saw in pre-training: take the block-d output before `norm` there, or let
    fine-tuning retrain it.

attn on Hiera -- MAE-Lite's hierarchical student (IJCV 2025; HIERA.md section 5): --model
    mae_hiera_tiny (46 wide, stages 1-2-7-2, q_pool 2, decoder 96 x 1 x 3) and a MAE-Hiera
    teacher (the official mae_hiera_base_224.pth, or a mae_pretrain.py --model mae_hiera_*
    checkpoint). One keep mask per image over MASK UNITS (32x32 px; mask ratio 0.4 by default:
    29 of 49 kept at 224 px); the teacher encodes the same kept units. Both last blocks (12 of
    12, 24 of 24) attend globally with 8 heads over the 4 tokens left of each kept unit, in the
    same unrolled order, so the logits pair up entry by entry:
                 A = q k^T / sqrt(d)  (B, 8, 4k, 4k): (B, 8, 116, 116) at 224 px
                 loss = pixel + w * mean (sum_h W[t,h] A_s[b,h,i,j] - A_t[b,t,i,j])^2
    The student's logits are tapped in the encoder pass whose fused stages feed the decoder.
    Only --method attn takes a Hiera (student or teacher); the other methods are ViT-only.

Everything that trains is one module saved under 'model': the student under 'student.' (so
the file loads as a plain ViT backbone for fine-tuning and as the next teacher, B -> S -> T,
through util.load_pretrained) and the method's own parts under 'distill.' (dropped, and
reported as unexpected, when loaded as a backbone). The teacher is an argument of forward,
never a submodule: it is not saved, not trained and not wrapped in DDP. It runs in eval mode
under no_grad and the student's autocast (bf16 on CUDA), stops after the deepest block the
method reads, and only a block whose attention is read leaves the fused attention kernel.

Commands (the built-in synthetic data is used when --data_path is not given):
    # a ViT-Small MAE teacher, then a ViT-Tiny student with each method (CPU, minutes)
    python mae_pretrain.py --model mae_vit_small --decoder_embed_dim 128 --decoder_depth 2 \\
        --decoder_num_heads 4 --input_size 32 --patch_size 4 --synthetic_samples 512 \\
        --batch_size 64 --epochs 4 --warmup_epochs 1 --blr 1.5e-3 --output_dir runs/teacher_small
    python distill_pretrain.py --method relation --teacher runs/teacher_small/checkpoint.pth \\
        --input_size 32 --patch_size 4 --synthetic_samples 512 --batch_size 64 --epochs 4 \\
        --warmup_epochs 1 --blr 1.5e-3 --output_dir runs/distill_relation   # or attn / amd / feature
    # one GPU: D-MAE-Tiny from the official MAE-Base, batch 4096 = 256 x 16 accumulation
    python distill_pretrain.py --method attn --teacher mae_pretrain_vit_base.pth --model vit_tiny \\
        --num_heads 12 --data_path /data/imagenet --batch_size 256 --accum_iter 16 --epochs 400 \\
        --warmup_epochs 40 --min_crop_scale 0.08
    # 8 GPUs: TinyMIM-B from MAE-L (block 18 of 24), 300 epochs, batch 4096 = 512 x 8
    torchrun --nproc_per_node=8 distill_pretrain.py --method relation \\
        --teacher mae_pretrain_vit_large.pth --model vit_base --data_path /data/imagenet \\
        --batch_size 512 --epochs 300 --warmup_epochs 15 --blr 1.5e-4
    # 8 GPUs: D²-MAE-Tiny from the official MAE-Base (pixels from block 8, attention into block 13)
    torchrun --nproc_per_node=8 distill_pretrain.py --method d2 --teacher mae_pretrain_vit_base.pth \\
        --model vit_tiny --num_heads 12 --data_path /data/imagenet --batch_size 512 --epochs 400 \\
        --warmup_epochs 40 --blr 1.5e-4 --min_crop_scale 0.08
    # 8 GPUs: MAE-Lite's Hiera-Tiny from the official MAE-Hiera-Base, 400 epochs, batch 4096
    torchrun --nproc_per_node=8 distill_pretrain.py --method attn --teacher mae_hiera_base_224.pth \\
        --model mae_hiera_tiny --data_path /data/imagenet --batch_size 512 --epochs 400 \\
        --warmup_epochs 40 --min_crop_scale 0.08
    # 8 GPUs: AMD ViT-S from MAE-B (grad clip 0.02 from AMD's video recipe)
    torchrun --nproc_per_node=8 distill_pretrain.py --method amd --teacher mae_pretrain_vit_base.pth \\
        --model vit_small --data_path /data/imagenet --batch_size 512 --clip_grad 0.02

Expected (ImageNet-1K top-1 after fine-tuning, PAPERS.md section 9): D-MAE-Tiny 78.4 (MAE-Tiny
78.0); D²-MAE-Tiny 78.7 (300 epochs), 79.4 (1000 epochs with finetune.py --rel_pos_bias);
TinyMIM T / S / B 75.8 / 83.0 / 85.0 (their MAE baselines 71.6 / 80.6 / 83.6); AMD ViT-S /
ViT-B 82.1 / 84.6; Hiera-Tiny (6.5M) 78.9 distilled, 78.5 by MAE alone (IJCV).

Where this differs from the official code:
- TinyMIM: log_softmax on both sides (the official .log() of a softmax underflows in fp16);
  vit.py's linear drop-path ramp 0 -> 0.1 (the official gives every block but the last 0.1);
  a teacher that is itself a relation student keeps its recorded last-block head count (the
  official rebuilds it with uniform heads, as --teacher_num_heads N does here). Its last block
  was trained only up to q/k/v, so amd / feature at that block are refused.
- AMD: images, not video. Image mask ratios are not in the released code: the defaults 0.75 /
  0.5 are our choice (video: 0.90 / 0.75). The cls token is not aligned (the video ViTs have
  none). The generators' mask tokens are registered parameters (the official list is never
  trained or saved), and the generator has no final norm (the official one is never used).
  Layers are averaged, as the code does (the paper sums).
- MAE-Lite: the head mixer is a Linear(Hs, Ht) applied by einsum, the same map as the
  official Conv2d(Hs, Ht, 1) with the same default init. --teacher_layer picks the teacher's
  block for a teacher of another depth (the official takes the same index).
- D²-MAE (mae_lite_distill_d2_exp.py): the same model and loss; the official builds a 13-block
  MAE and deletes block 13's attn.proj, norm2 and mlp, here the extra block is its own module
  (AttentionOnlyBlock) outside the student, so the saved student is a plain d-block MAE. Its
  qkv keeps the official [3D, D] layout, but only q and k are computed (the official computes
  v and drops it: the v rows get no gradient either way). The official teacher runs all its
  blocks; here it stops after the block it gives (the same logits). --decode_layer and
  --teacher_layer generalise the official fixed 8 and 12. util reads the official D²-MAE
  checkpoint's partial block 13 as this extra block.
- MAE-Lite on Hiera: the teacher is a plain Hiera built from the weights (no decoder, fusion
  heads or encoder_norm; they are reported as unexpected) rather than the MAE model with its
  decoder deleted; the head mixer is the einsum above (official: Conv2d(8, 8, 1) on the
  squeezed logits). The official code distils the same block pair; --teacher_layer may pick
  another teacher block if it attends globally over the same tokens.
- Crops, colour jitter and masks come from each sample's own seed (util), so a run is the same
  on 1 or N GPUs and a resumed run continues exactly.
"""
import argparse
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import hiera
import util
from mae_pretrain import (MAE_HIERA_PRESETS, MaskedAutoencoderViT, check_widths, create_mae_hiera,
                          random_masking, random_unit_mask)
from util import print0
from vit import VIT_PRESETS, Block, VisionTransformer, gather_tokens

METHODS = ("attn", "relation", "amd", "feature", "d2")
# Flags that only some methods read: giving one to another method is an error, not a no-op.
METHOD_FLAGS = {"mask_ratio": ("attn", "amd", "d2"), "norm_pix_loss": ("attn", "amd", "d2"),
                "decoder_embed_dim": ("attn", "amd", "d2"), "decoder_depth": ("attn", "amd", "d2"),
                "decoder_num_heads": ("attn", "amd", "d2"), "distill_weight": ("attn", "amd", "d2"),
                "drop_path": ("relation", "feature"), "color_jitter": ("relation", "feature"),
                "teacher_layer": ("attn", "relation", "feature", "d2"), "student_layers": ("amd",),
                "teacher_layers": ("amd",), "teacher_mask_ratio": ("amd",), "decode_layer": ("d2",)}


def get_args_parser():
    p = argparse.ArgumentParser("Distillation during pre-training",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("student")
    g.add_argument("--method", required=True, choices=METHODS,
                   help="attn: MAE-Lite, relation: TinyMIM, amd: AMD, feature: TinyMIM's baseline, "
                        "d2: MAE-Lite's decoupled D²-MAE")
    g.add_argument("--model", default="vit_tiny", choices=[*VIT_PRESETS, *MAE_HIERA_PRESETS],
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
                   help="d2: the student block whose output (through the encoder's final norm) the "
                        "pixel decoder reads; the blocks after it learn only from the distillation "
                        "(MAE-Lite: 8 of 12)")
    g.add_argument("--drop_path", type=float, default=0.1,
                   help="the student's stochastic depth (relation, feature); the teacher has none")
    g.add_argument("--min_crop_scale", type=float, default=0.2,
                   help="RandomResizedCrop scale=(min, 1): 0.2 MAE/TinyMIM, 0.08 MAE-Lite tiny")
    g.add_argument("--color_jitter", type=float, default=0.4,
                   help="brightness/contrast/saturation jitter of the student's view (relation, feature)")
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", required=True, help="checkpoint: any format util reads")
    g.add_argument("--teacher_model", default=None, choices=list(VIT_PRESETS),
                   help="the teacher's preset: its width and depth must match the weights, its head "
                        "count is used unless the checkpoint records one (default: all from the weights)")
    g.add_argument("--teacher_num_heads", type=int, default=None,
                   help="the teacher's head count in every block (a Hiera: in its first stage; they "
                        "double per stage) (not visible in the weights; default: as the checkpoint "
                        "records it, else the width's usual count)")
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
    util.add_optim_args(p, batch_size=64, epochs=300, warmup_epochs=15, blr=1.5e-4, weight_decay=0.05)
    util.add_data_args(p, gpu_decode=True)
    util.add_run_args(p, output_dir="runs/distill")
    return p


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


def relation_loss(student, teacher):
    """TinyMIM's relation distillation loss: Q-K KL + V-V KL (see relation_terms) -> scalar."""
    qk, vv = relation_terms(student, teacher)
    return qk + vv


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
    position, both with AMD's fixed 1-D sinusoid positions, and predict the teacher's features there.

    visible (B, ns, D), pos_visible (B, ns, D), pos_extra (B, ne, D) -> (B, ne, D)
    """

    def __init__(self, dim, depth=2, mlp_ratio=4.0):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # registered: trained and saved
        self.blocks = nn.ModuleList(Block(dim, max(1, dim // 64), mlp_ratio) for _ in range(depth))
        self.blocks.apply(VisionTransformer.init_module)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible, pos_visible, pos_extra):
        x = torch.cat([visible + pos_visible, self.mask_token + pos_extra], dim=1)  # (B, ns+ne, D)
        for blk in self.blocks:
            x, _ = blk(x)
        return x[:, visible.shape[1]:]


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

    def __init__(self, student_dim, teacher_dim, num_layers, grid_size, generator_depth=2,
                 mlp_ratio=4.0):
        super().__init__()
        self.projectors = nn.ModuleList(nn.Linear(student_dim, teacher_dim, bias=False)
                                        for _ in range(num_layers))
        self.projectors.apply(VisionTransformer.init_module)
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
    """TinyMIM's feature-distillation baseline.

    student (B, N, Ds) final normalized tokens; teacher (B, N, Dt) block-k output.
        loss = smooth_l1_beta2(Linear(student), LayerNorm_no_affine(teacher))
    """

    def __init__(self, student_dim, teacher_dim):
        super().__init__()
        self.head = nn.Linear(student_dim, teacher_dim)
        VisionTransformer.init_module(self.head)

    def forward(self, student, teacher):
        target = F.layer_norm(teacher.float(), teacher.shape[-1:], eps=1e-6)
        return F.smooth_l1_loss(self.head(student).float(), target, beta=2.0)


class AttentionOnlyBlock(nn.Module):
    """D²-MAE's extra block: a pre-norm ViT block cut after its attention logits.

    x (B, N, D) -> A = q k^T / sqrt(d)   (B, heads, N, N), with q, k from qkv(norm1(x)).
    A block's norm1 and fused qkv (the official keeps exactly these of block 13), nothing
    else: no softmax, attn.proj, norm2, MLP or output. qkv keeps the official [3D, D] layout
    (three, heads, head_dim), but only its q and k thirds are computed; the v third is never
    used (no gradient reaches it).
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.apply(VisionTransformer.init_module)  # MAE's init, qkv as one matrix

    def forward(self, x):
        D = x.shape[-1]
        qk = F.linear(self.norm1(x), self.qkv.weight[:2 * D], self.qkv.bias[:2 * D])  # (B, N, 2D)
        q, k = rearrange(qk, "b n (two h d) -> two b h n d", two=2, h=self.num_heads)
        return (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N)


def amd_keep_counts(num_patches, student_ratio, teacher_ratio):
    """AMD's visible counts: L - int(r L) (its mask generator removes int(r L) patches),
    which can be one more than MAE's int(L (1 - r)): 20 vs 19 of 196 at r = 0.9."""
    return num_patches - int(student_ratio * num_patches), num_patches - int(teacher_ratio * num_patches)


def asymmetric_masking(batch_size, num_patches, student_ratio, teacher_ratio, generator=None,
                       noise=None):
    """AMD's masks: one random permutation per sample (argsort of uniform noise, small first,
    as MAE's random_masking) cut twice. The student keeps ns patches, the teacher nt > ns
    (amd_keep_counts): the student's and then the extra ones.

    noise: optional (B, L), each row the sample's own (util.sample_noise, drawn in the data
    worker); else drawn with `generator`.
    Returns (student_keep (B, ns), teacher_extra (B, nt - ns)), disjoint patch indices.
    """
    if noise is None:
        noise = torch.rand(batch_size, num_patches, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ns, nt = amd_keep_counts(num_patches, student_ratio, teacher_ratio)
    return ids_shuffle[:, :ns], ids_shuffle[:, ns:nt]


def sinusoid_table(n, dim):
    """The 1-D sinusoid table of VideoMAE / AMD over token indices 0..n-1, (n, dim) float32:
    angle[t, j] = t / 10000^(2 floor(j/2) / dim); sin at even j, cos at odd j."""
    t = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None]
    angle = t / 10000 ** (2 * (j // 2) / dim)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos()).float()


def amd_pixel_target(imgs, patch_size, normalize=True):
    """AMD's (VideoMAE's) pixel target: the image back in [0, 1] (its mean/std normalization
    undone), cut into patches [B, L, p*p*C] in MAE's (p, q, c) order; with `normalize`,
    each patch standardised per CHANNEL: (x - mean) / (std_unbiased + 1e-6) over its p*p
    pixels (MAE's norm-pix: over all p*p*C values, sqrt(var + 1e-6))."""
    mean = imgs.new_tensor(util.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = imgs.new_tensor(util.IMAGENET_STD).view(1, 3, 1, 1)
    x = rearrange(imgs.float() * std + mean, "b c (h p) (w q) -> b (h w) (p q) c", p=patch_size, q=patch_size)
    if normalize:
        x = (x - x.mean(dim=-2, keepdim=True)) / (x.var(dim=-2, keepdim=True).sqrt() + 1e-6)
    return rearrange(x, "b l pq c -> b l (pq c)")


# ----------------------------------------------------------------------------
# The teacher


def heads_at(vit, layer):
    """Head count of block `layer` (1-based): the adaptive last block may differ."""
    cfg = vit.config
    return cfg["last_block_heads"] if layer == vit.depth and cfg["last_block_heads"] else cfg["num_heads"]


def build_teacher(args, student_patch, device):
    """The frozen teacher: a plain ViT with the checkpoint's architecture at the student's
    --input_size (util.load_pretrained interpolates pos_embed), every key checked."""
    path = args.teacher
    obj = util.load_checkpoint(path)  # one-line CheckpointError: missing, corrupt, unsafe
    family = util.checkpoint_family(util.read_state_dict(obj, name=path))  # ... or an unknown layout
    student = "Hiera" if args.model in MAE_HIERA_PRESETS else "ViT"
    if family != student:
        raise util.CheckpointError(
            f"{path}: --teacher is a {family} checkpoint and --model {args.model} a {student}: "
            f"both must be ViTs or both Hieras (a Hiera pair only with --method attn)")
    if family == "Hiera":
        return build_hiera_teacher(args, obj, device)
    cfg = util.infer_vit_config(obj, name=path)
    saved = (obj.get("model_config") if isinstance(obj, dict) else None) or {}
    heads, source = cfg["num_heads"], ("recorded in the checkpoint" if not cfg["heads_inferred"]
                                       else "the width's usual count; --teacher_num_heads to change")
    if args.teacher_model:
        preset = VIT_PRESETS[args.teacher_model]
        for key in ("embed_dim", "depth", "patch_size"):
            if key in preset and preset[key] != cfg[key]:
                raise util.CheckpointError(f"{path}: {key} is {cfg[key]} in the weights, "
                                           f"--teacher_model {args.teacher_model} has {preset[key]}")
        if cfg["heads_inferred"]:
            heads, source = preset["num_heads"], f"--teacher_model {args.teacher_model}"
    if args.teacher_num_heads:
        heads, source = args.teacher_num_heads, "--teacher_num_heads"
    p = cfg["patch_size"]
    if p != student_patch:  # the two must cut the image into the same tokens
        raise util.CheckpointError(
            f"{path}: patch size {p} does not fit the student's {student_patch}: at --input_size "
            f"{args.input_size} they give different token grids (teacher and student must see "
            f"the same patches)")
    try:
        teacher = VisionTransformer(img_size=args.input_size, patch_size=p, in_chans=cfg["in_chans"],
                                    num_classes=0, embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                                    num_heads=heads, mlp_ratio=cfg["mlp_ratio"],
                                    global_pool=cfg["global_pool"],
                                    last_block_heads=None if args.teacher_num_heads
                                    else saved.get("last_block_heads"))
    except ValueError as e:
        raise util.CheckpointError(f"{path}: {e}") from None
    print0(f"teacher {path} ({args.teacher_model or 'read from the weights'}): width "
           f"{cfg['embed_dim']}, {cfg['depth']} blocks, patch {p}, "
           f"{heads} heads ({source})" + (f", last block {teacher.config['last_block_heads']} heads"
                                          if teacher.config["last_block_heads"] else ""))
    util.load_pretrained(teacher, obj, allow_missing=(), name=path,
                         check_heads=not args.teacher_num_heads)  # an explicit split wins
    # A relation student trained its last block only up to q, k, v (its proj, MLP, norm are at init).
    run_args = obj.get("args") if isinstance(obj, dict) else None
    teacher.last_output_untrained = isinstance(run_args, dict) and run_args.get("method") == "relation"
    return teacher.to(device).eval().requires_grad_(False)


def build_hiera_teacher(args, obj, device):
    """The frozen Hiera teacher: a plain Hiera encoder with the checkpoint's architecture
    (hiera.infer_hiera_config) at the student's --input_size, no `norm` and no head (it stops
    at a block). An MAE checkpoint's encoder_norm, fusion heads, mask_token and decoder are
    reported as unexpected. q_pool is the checkpoint's (2 for an MAE; a recorded or inferred
    classifier's 3 leaves 1 token per unit in the last stage, and build_model refuses it);
    where nothing tells, the MAE models' 2, as the student."""
    path = args.teacher
    cfg = hiera.infer_hiera_config(obj, name=path)
    saved = (obj.get("model_config") if isinstance(obj, dict) else None) or {}
    q_pool = cfg["q_pool"] if "decoder_embed_dim" in cfg or "q_pool" in saved else 2
    heads, source = cfg["num_heads"], ("recorded in the checkpoint" if not cfg["heads_inferred"]
                                       else "the width's usual count; --teacher_num_heads to change")
    if args.teacher_num_heads:
        heads, source = args.teacher_num_heads, "--teacher_num_heads"
    try:
        teacher = hiera.Hiera(img_size=args.input_size, in_chans=cfg["in_chans"], embed_dim=cfg["embed_dim"],
                              num_heads=heads, stages=cfg["stages"], q_pool=q_pool, num_classes=0,
                              mlp_ratio=cfg["mlp_ratio"])
    except util.ConfigError as e:
        raise util.CheckpointError(f"{path}: {e}") from None
    teacher.norm = nn.Identity()  # what a classifier's file has there is reported as unexpected
    print0(f"teacher {path} (Hiera, read from the weights): width {cfg['embed_dim']}, stages "
           f"{cfg['stages']} ({teacher.depth} blocks), heads {heads} in stage 1 ({source}) and "
           f"{teacher.blocks[-1].attn.num_heads} in the last block, q_pool {q_pool}")
    util.load_pretrained(teacher, obj, allow_missing=(), name=path, check_heads=not args.teacher_num_heads)
    return teacher.to(device).eval().requires_grad_(False)


def cast_for_autocast(teacher, autocast):
    """Store the frozen teacher's matmul weights (Linear, Conv) in autocast's dtype once.
    Autocast caches its casts only for leaf tensors that require grad, so a frozen fp32
    teacher would be re-cast on every forward: a full read and write of its weights per
    step. The values are the same (autocast rounds the same way); LayerNorm parameters stay
    fp32, as autocast runs LayerNorm in fp32."""
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
        raise util.CheckpointError(f"{args.teacher}: has {D} blocks, cannot give block(s) {needed}")
    reads_output = args.method in ("amd", "feature")  # attn, relation read only its q, k, v
    if reads_output and D in needed and getattr(teacher, "last_output_untrained", False):
        raise util.CheckpointError(f"{args.teacher}: a relation student, whose last block was trained "
                                   f"only up to its q/k/v: its output is no target; pick a block < {D}")


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
    """MAE-Lite D-MAE: MAE pixel loss + w * attention-logit loss, student's last block vs
    teacher block k."""

    def __init__(self, student, teacher_heads, teacher_layer, mask_ratio, weight=1.0):
        super().__init__(student, AttentionDistillLoss(student.config["num_heads"], teacher_heads))
        self.teacher_layer, self.mask_ratio, self.weight = teacher_layer, mask_ratio, weight

    def forward(self, imgs, noise, teacher):
        s, k, d = self.student, self.teacher_layer, self.student.depth
        x, mask, ids_restore = random_masking(s.embed(imgs), self.mask_ratio, noise)
        ids_keep = ids_restore.argsort(dim=1)[:, :x.shape[1]]  # ids_shuffle's kept part
        with torch.no_grad():  # the teacher encodes the same kept tokens
            t = teacher.encode(gather_tokens(teacher.embed(imgs), ids_keep), attn=(k,),
                               attn_logits=True, stop_at=k).attn[k]  # (B, Ht, 1+n, 1+n)
        taps = s.encode(x, attn=(d,), attn_logits=True)
        pixel = s.forward_loss(imgs, s.forward_decoder(taps.x, ids_restore), mask)
        attn = self.distill(taps.attn[d], t)
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
        keep, extra = asymmetric_masking(*noise.shape, self.mask_ratio, self.teacher_mask_ratio,
                                         noise=noise)
        with torch.no_grad():  # the teacher sees [student-visible ; extra] (+ cls, dropped below)
            taps = teacher.encode(gather_tokens(teacher.embed(imgs), torch.cat([keep, extra], 1)),
                                  layers=self.teacher_layers, stop_at=max(self.teacher_layers))
            t = [taps.layers[k][:, 1:] for k in self.teacher_layers]  # (B, ns + ne, Dt)
        x, mask, ids_restore = random_masking(s.embed(imgs), self.mask_ratio, noise,
                                              len_keep=keep.shape[1])  # keeps `keep`
        taps = s.encode(x, layers=self.student_layers)
        target = amd_pixel_target(imgs, s.patch_size, s.norm_pix_loss)
        pixel = s.forward_loss(imgs, s.forward_decoder(taps.x, ids_restore), mask, target)
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


class DecoupledDistiller(Distiller):
    """MAE-Lite's D²-MAE: MAE pixel loss from block k's output + w * attention-logit loss
    between an attention-only block d+1 and teacher block t (the same kept tokens).
    'distill.' holds that block (extra_block) and the head mixer (attn_loss)."""

    def __init__(self, student, teacher_heads, teacher_layer, mask_ratio, weight=1.0):
        heads = student.config["num_heads"]
        super().__init__(student, nn.ModuleDict(dict(
            extra_block=AttentionOnlyBlock(student.embed_dim, heads),
            attn_loss=AttentionDistillLoss(heads, teacher_heads))))
        self.teacher_layer, self.mask_ratio, self.weight = teacher_layer, mask_ratio, weight
        self.decode_layer = student.decode_layer  # k: recorded in the student's config

    def forward(self, imgs, noise, teacher):
        s, t, k, d = self.student, self.teacher_layer, self.decode_layer, self.student.depth
        x, mask, ids_restore = random_masking(s.embed(imgs), self.mask_ratio, noise)
        ids_keep = ids_restore.argsort(dim=1)[:, :x.shape[1]]  # ids_shuffle's kept part
        with torch.no_grad():  # the teacher encodes the same kept tokens
            target = teacher.encode(gather_tokens(teacher.embed(imgs), ids_keep), attn=(t,),
                                    attn_logits=True, stop_at=t).attn[t]  # (B, Ht, 1+n, 1+n)
        taps = s.encode(x, layers=(k, d))  # blocks 1..d once; x_k and x_d, (B, 1+n, D) each
        latent = s.norm(taps.layers[k])  # the decoder reads block k: blocks k+1..d get no pixel gradient
        pixel = s.forward_loss(imgs, s.forward_decoder(latent, ids_restore), mask)
        logits = self.distill["extra_block"](taps.layers[d])  # block d+1: (B, Hs, 1+n, 1+n)
        attn = self.distill["attn_loss"](logits, target)
        return pixel + self.weight * attn, {"pixel": pixel, "attn": attn}


class HieraAttentionDistiller(Distiller):
    """MAE-Lite (IJCV) on Hiera: MAE-Hiera pixel loss + w * attention-logit loss between the
    student's last block and teacher block k (its last by default), both global attention.

    The keep mask is per mask unit (random_unit_mask, True = keep). The teacher embeds the
    same image with the same units removed (zeroed before its conv, as the student's), so
    both blocks see 4 tokens per kept unit (q_pool 2) in the same unrolled order:
        A_s (B, Hs, 4k, 4k), A_t (B, Ht, 4k, 4k)      (k kept units; 116 tokens at 224 px, 0.4)
        loss = pixel + w * MSE(W A_s, A_t)             W (Ht, Hs): AttentionDistillLoss
    The student's logits are tapped in the same encoder pass whose stages feed the decoder."""

    def __init__(self, student, teacher_heads, teacher_layer, mask_ratio, weight=1.0):
        super().__init__(student, AttentionDistillLoss(student.blocks[-1].attn.num_heads, teacher_heads))
        self.teacher_layer, self.mask_ratio, self.weight = teacher_layer, mask_ratio, weight

    def forward(self, imgs, noise, teacher):
        s, k, d = self.student, self.teacher_layer, self.student.depth
        keep = random_unit_mask(imgs.shape[0], s.num_mask_units, self.mask_ratio, noise)  # (B, U)
        with torch.no_grad():  # the teacher encodes the same kept units
            t = teacher.encode(teacher.embed(imgs, keep), keep, attn=(k,), attn_logits=True,
                               stop_at=k).attn[k]  # (B, Ht, 4k, 4k)
        latent, taps = s.forward_encoder(imgs, keep, attn=(d,), attn_logits=True)
        pixel = s.forward_loss(imgs, s.forward_decoder(latent, keep), s.removed_patches(keep))
        attn = self.distill(taps.attn[d], t)
        return pixel + self.weight * attn, {"pixel": pixel, "attn": attn}


def hiera_attention_shape(model, k):
    """Block k (1-based) of a Hiera -> (heads, queries, keys per mask unit, global attention?):
    the shape of its attention logits per kept unit. A q-pooling block has 4x fewer queries
    than keys; blocks before the lag ends attend within each unit."""
    blk, pooled = model.blocks[k - 1], [0, *model.pooled]  # poolings done before block k: pooled[k - 1]
    tokens = hiera.MU * hiera.MU
    return (blk.attn.num_heads, tokens // 4 ** pooled[k], tokens // 4 ** pooled[k - 1],
            not blk.attn.use_mask_unit_attn)


def build_hiera_student(args, teacher):
    """The MAE-Hiera student of --model in its HieraAttentionDistiller; teacher block
    --teacher_layer must attend globally over the tokens of the student's last block."""
    student = create_mae_hiera(args.model, img_size=args.input_size, num_heads=args.num_heads,
                               decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                               decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss)
    k = args.teacher_layer
    (hs, qs, ks, gs), (ht, qt, kt, gt) = hiera_attention_shape(student, student.depth), \
        hiera_attention_shape(teacher, k)
    if not (gs and gt and (qs, ks) == (qt, kt)):
        raise util.CheckpointError(
            f"{args.teacher}: its block {k} attends {'globally' if gt else 'within mask units'} with "
            f"{qt} queries x {kt} keys per mask unit; the student's last block {'globally' if gs else 'within units'} "
            f"with {qs} x {ks}: the logits do not pair up (an MAE-Hiera teacher, q_pool 2, at a "
            f"block after the first of stage 3)")
    print0(f"attention distillation: student block {student.depth} ({hs} heads) -> head mixer "
           f"{hs} -> {ht} -> teacher block {k} ({ht} heads), {qs} tokens per kept unit")
    return HieraAttentionDistiller(student, ht, k, args.mask_ratio, args.distill_weight)


def decoder_size(method, width):
    """The student's pixel decoder (width, blocks, heads) as each paper's code builds it:
    MAE-Lite's 96 x 1 x 3 for attn and d2; for amd VideoMAE's (AMD's base): ViT-S 192 x 4 x 3, ViT-B
    384 x 4 x 6, i.e. half the student's width, 4 blocks, 64-dim heads; widths with no
    official decoder (ViT-Tiny: 96) take 32-dim heads, MAE-Lite's decoder head size."""
    if method != "amd":
        return 96, 1, 3
    dim = width // 2
    return dim, 4, dim // 64 if dim % 64 == 0 else max(1, dim // 32)


def build_model(args, teacher):
    """The student for --method (an MAE for attn/amd/d2, a plain ViT otherwise) in its
    Distiller. Call resolve_layers first."""
    if args.model in MAE_HIERA_PRESETS:
        return build_hiera_student(args, teacher)
    preset = VIT_PRESETS[args.model]
    arch = dict(img_size=args.input_size, patch_size=args.patch_size or preset.get("patch_size", 16),
                embed_dim=preset["embed_dim"], depth=preset["depth"],
                num_heads=args.num_heads or preset["num_heads"])
    try:
        if args.method in ("attn", "amd", "d2"):
            student = MaskedAutoencoderViT(**arch, decoder_embed_dim=args.decoder_embed_dim,
                                           decoder_depth=args.decoder_depth,
                                           decoder_num_heads=args.decoder_num_heads,
                                           norm_pix_loss=args.norm_pix_loss,
                                           decode_layer=args.decode_layer if args.method == "d2" else None)
        else:  # TinyMIM's student: fixed sin-cos positions, the adaptive last block for relation
            last_heads = heads_at(teacher, args.teacher_layer) if args.method == "relation" else None
            student = VisionTransformer(**arch, num_classes=0, drop_path_rate=args.drop_path,
                                        pos_embed="sincos", last_block_heads=last_heads)
    except ValueError as e:
        raise util.ConfigError(f"student {args.model}: {e}") from None
    if args.method == "attn":
        return AttentionDistiller(student, heads_at(teacher, args.teacher_layer), args.teacher_layer,
                                  args.mask_ratio, args.distill_weight)
    if args.method == "relation":
        return RelationDistiller(student, args.teacher_layer)
    if args.method == "d2":
        return DecoupledDistiller(student, heads_at(teacher, args.teacher_layer), args.teacher_layer,
                                  args.mask_ratio, args.distill_weight)
    if args.method == "amd":
        return AMDDistiller(student, teacher.embed_dim, args.student_layers, args.teacher_layers,
                            args.mask_ratio, args.teacher_mask_ratio, args.distill_weight)
    return FeatureDistiller(student, teacher.embed_dim, args.teacher_layer)


# ----------------------------------------------------------------------------
# Data


class TwoViews:
    """TinyMIM's input: one crop + flip shared by both views, colour jitter on the student's
    only. Image -> (2, C, H, W) uint8 [student view, teacher view]."""

    def __init__(self, input_size, min_scale=0.2, jitter=0.4):
        from torchvision.transforms import v2
        self.common = util.DecodeCropFlip(input_size, (min_scale, 1.0))
        self.jitter = v2.ColorJitter(jitter, jitter, jitter)

    def __call__(self, img):
        img = self.common(img)
        return torch.stack([self.jitter(img), img])


# ----------------------------------------------------------------------------
# Training


# What a resumed run must keep: the student, the teacher and what the method reads of them.
FIXED_ON_RESUME = (*util.FIXED_ON_RESUME, "method", "teacher", "teacher_model", "teacher_num_heads",
                   "teacher_layer", "student_layers", "teacher_layers", "decoder_embed_dim",
                   "decoder_depth", "decoder_num_heads", "norm_pix_loss", "mask_ratio",
                   "teacher_mask_ratio", "decode_layer", "distill_weight")


def masked_step(model, batch, *, teacher):
    """attn, amd, d2: one image per sample, masked by its own noise (drawn in the data worker)."""
    imgs, _, noise = batch
    return model(imgs, noise, teacher)


def two_view_step(model, batch, *, teacher):
    """relation, feature: (B, 2, C, H, W) -> the student's and the teacher's view."""
    views = batch[0]
    return model(views[:, 0], views[:, 1], teacher)


def check_args(args):
    util.check_common_args(args, dict(
        teacher_mask_ratio=util.between(0, 1, hi_ok=False), distill_weight=util.NON_NEGATIVE,
        drop_path=util.between(0, 1, hi_ok=False), color_jitter=util.NON_NEGATIVE,
        teacher_num_heads=util.AT_LEAST_1, teacher_layer=util.AT_LEAST_1,
        student_layers=util.AT_LEAST_1, teacher_layers=util.AT_LEAST_1))  # --decode_layer: below, against the depth
    defaults = get_args_parser()
    for flag, methods in METHOD_FLAGS.items():
        if args.method not in methods and getattr(args, flag) != defaults.get_default(flag):
            raise util.ConfigError(f"--{flag} is for --method {'/'.join(methods)}, not {args.method}")
    if args.model in MAE_HIERA_PRESETS:
        return check_hiera_args(args)
    if args.mask_ratio is None and args.method in METHOD_FLAGS["mask_ratio"]:
        args.mask_ratio = 0.75  # MAE's
    preset = VIT_PRESETS[args.model]
    if args.method == "d2":
        util.check_ranges(args, dict(decode_layer=util.between(1, preset["depth"])))
    patch = args.patch_size or preset.get("patch_size", 16)
    if args.input_size % patch:
        raise util.ConfigError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    L = (args.input_size // patch) ** 2
    if args.method == "amd" and \
            (keeps := amd_keep_counts(L, args.mask_ratio, args.teacher_mask_ratio))[1] <= keeps[0]:
        raise util.ConfigError(f"--teacher_mask_ratio {args.teacher_mask_ratio} must keep more of the "
                               f"{L} patches than --mask_ratio {args.mask_ratio}")
    if args.method in ("attn", "amd", "d2"):  # the defaults are recorded with the run's args
        default = decoder_size(args.method, preset["embed_dim"])
        for i, flag in enumerate(("decoder_embed_dim", "decoder_depth", "decoder_num_heads")):
            setattr(args, flag, getattr(args, flag) or default[i])
        check_widths(preset["embed_dim"], args.num_heads or preset["num_heads"], args.decoder_embed_dim,
                     args.decoder_num_heads, f"--model {args.model}")
    return patch


def check_hiera_args(args):
    """A Hiera student: MAE-Lite's attention distillation only, no ViT flags, whole mask
    units; fills in mask ratio 0.4 and the 96 x 1 x 3 decoder (recorded with the run's args).
    Returns 32, the masking unit's side in px: (input_size / 32)^2 noise values per image."""
    if args.method != "attn":
        raise util.ConfigError(f"--method {args.method} takes a ViT student (--model vit_*) and teacher; "
                               f"a Hiera (--model {args.model}) is distilled with --method attn only")
    for flag, why in (("patch_size", "a Hiera embeds 4x4 px per token and masks 32x32 px units"),
                      ("teacher_model", "a Hiera teacher's architecture is read from its weights")):
        if getattr(args, flag) is not None:
            raise util.ConfigError(f"--{flag} is for a ViT; --model {args.model} is a Hiera: {why}")
    if args.input_size % 32:
        raise util.ConfigError(f"--input_size {args.input_size}: a Hiera needs a multiple of 32 "
                               f"(whole 32x32 px mask units)")
    if args.mask_ratio is None:
        args.mask_ratio = 0.4  # MAE-Lite's Hiera (the official Hiera MAE: 0.6)
    units = (args.input_size // 32) ** 2
    if int(units * (1 - args.mask_ratio)) < 1:
        raise util.ConfigError(f"--mask_ratio {args.mask_ratio} keeps none of the {units} mask units at "
                               f"--input_size {args.input_size}")
    preset = MAE_HIERA_PRESETS[args.model]
    for i, flag in enumerate(("decoder_embed_dim", "decoder_depth", "decoder_num_heads")):
        setattr(args, flag, getattr(args, flag) or decoder_size("attn", preset["embed_dim"])[i])
    check_widths(preset["embed_dim"], args.num_heads or preset["num_heads"], args.decoder_embed_dim,
                 args.decoder_num_heads, f"--model {args.model}", sincos=False)
    return 32


def main(args):
    patch = check_args(args)
    dinfo = util.init_distributed(args.device)
    device = dinfo.device
    util.prepare_output_dir(args)
    two_views = args.method in ("relation", "feature")
    transform = (TwoViews(args.input_size, args.min_crop_scale, args.color_jitter) if two_views
                 else util.pretrain_transform(args.input_size, args.min_crop_scale))
    dataset, _ = util.build_dataset(args, train=True, transform=util.data_transform(args, transform))
    loader = util.build_train_loader(dataset, args, dinfo, noise=0 if two_views else (args.input_size // patch) ** 2)

    teacher = build_teacher(args, patch, device)  # a teacher that does not fit stops here
    resolve_layers(args, sum(MAE_HIERA_PRESETS[args.model]["stages"]) if args.model in MAE_HIERA_PRESETS
                   else VIT_PRESETS[args.model]["depth"], teacher)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(args, teacher).to(device)
    n_params = sum(p.numel() for p in model.student.parameters() if p.requires_grad)
    n_extra = sum(p.numel() for p in model.parameters() if p.requires_grad) - n_params
    layers = args.teacher_layers if args.method == "amd" else [args.teacher_layer]
    print0(f"{args.method}: student {args.model} ({n_params / 1e6:.2f}M trainable + "
           f"{n_extra / 1e6:.2f}M in the method's parts), teacher block(s) {layers}"
           + (f" <- student block(s) {args.student_layers}" if args.method == "amd" else "")
           + (f" <- attention-only block {VIT_PRESETS[args.model]['depth'] + 1}; pixels decoded from "
              f"block {args.decode_layer}" if args.method == "d2" else ""))
    print0(f"{len(dataset)} training images, {len(loader) // args.accum_iter} steps per epoch")

    util.effective_lr(args, dinfo.world_size)
    optimizer = util.make_adamw(util.param_groups(model, args.weight_decay), args.lr, (0.9, 0.95), device)
    autocast, scaler = util.amp_setup(args.precision, device)
    cast_for_autocast(teacher, autocast)
    start_epoch, _ = util.resume_checkpoint(args, model, optimizer, scaler, fixed=FIXED_ON_RESUME)
    net = util.wrap_model(model, dinfo, args)  # the teacher stays outside DDP: an argument of forward
    step = partial(two_view_step if two_views else masked_step, teacher=teacher)
    if util.benchmark(args, net, loader, optimizer, step, device, autocast, scaler):
        return

    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = util.train_one_epoch(net, loader, optimizer, epoch, args, step, device, autocast, scaler)
        util.save_training_state(args, model, optimizer, scaler, epoch)
        util.log_stats(args.output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
        terms = "  ".join(f"{k} {v:.4f}" for k, v in stats.items()
                          if k not in ("lr", "img_per_s", "epoch_time_s", "peak_mem_mb"))
        print0(f"epoch {epoch}: {terms}  lr {stats['lr']:.2e}  {stats['img_per_s']:.0f} img/s  "
               f"peak {stats['peak_mem_mb']:.0f} MB")


if __name__ == "__main__":
    util.run_main(main, get_args_parser())
