"""Layer analysis of pre-trained ViTs: layer-to-layer CKA, attention distance and entropy, and
MAE reconstructions (the analysis protocol of MAE-Lite, Wang et al., ICML 2023).

MAE-Lite's finding, to check on your own checkpoints: MAE learns a small ViT's lower layers well
but its HIGHER layers poorly, which hurts data-poor downstream tasks; distilling a large MAE
teacher's attention during pre-training repairs much of it.

Features, as MAE-Lite takes them: for each block i its LayerNorm'd input (norm1), plus the
final normalized output; per image the patch tokens (cls removed) are flattened into one
vector. A model of depth L gives L + 1 feature sets, labelled 1..L and 'out'.

Linear CKA (Kornblith et al. 2019) of X (n, p) and Y (n, q), features centred over the n images:

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)       in [0, 1]

With few images and many features it is biased towards 1; the debiased form replaces each
HSIC by the unbiased estimator of Song et al. (2012), on Gram matrices K = X X^T, L = Y Y^T
with zeroed diagonals (n >= 4; it can be negative):

    HSIC_1(K, L) = [tr(K L) + (1^T K 1)(1^T L 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K L 1] / (n(n-3))

Minibatch CKA (Nguyen et al. 2021), what the analysis runs: SUM HSIC_1 over batches for every
layer pair (X_i, Y_j), (X_i, X_i) and (Y_j, Y_j), then
CKA_ij = sum HSIC_1(K_i, L_j) / sqrt(sum HSIC_1(K_i, K_i) sum HSIC_1(L_j, L_j)).

Attention statistics, per layer and head: drop the cls token from queries and keys and
renormalize each row over the patch keys (p_qk), then average over queries and images:

    distance = sum_k p_qk * ||pos_q - pos_k||     (pixels between token centres)
    entropy  = -sum_k p_qk log p_qk               (nats)

Uniform attention on a 14x14 grid gives 7.2808 patches (116.49 px at patch 16) and ln 196 =
5.278 nats; attention.json records uniform attention's values for every block.

A Hiera is analysed as the encoder it was trained as, on the full image: 'out' is its last
block through a LayerNorm without affine parameters; its unrolled token order is invisible to
CKA (permuting columns leaves X X^T unchanged); attention is measured within what each block
attends over (a mask unit, or all tokens), each token at the pixel centre of its area.

Choices and deviations:
- --num_images of the un-augmented val split (train when there is no val/), a random subset
  drawn with --seed (ImageNet's val folders are sorted by class). MAE-Lite's tool takes the
  first ~1024 images of its eval loader in batches of 128. A last batch under 4 images (where
  HSIC_1 is undefined) joins the one before.
- float32 throughout (no autocast); Gram matrices, HSIC sums and statistics in float64.
- A mean-pooled fine-tuned checkpoint has no `norm`: its 'out' is the last block's output
  (MAE-Lite's tool passes it through a fresh fc_norm, LayerNorm (1, 0): CKA changes little).
- Distances are in pixels. MAE-Lite's tool multiplies the grid distance by 14 whatever the
  patch size: to compare with its figures, divide ours by the patch size and multiply by 14.
- The head count is not in the weights: the checkpoint's recorded one, else the width's usual
  (192 -> 3; MAE-Lite's tiny has 12: pass --num_heads 12). CKA does not depend on it.
- norm_pix_loss for reconstructions: the value recorded in the checkpoint, else the flag, else
  off for mae_visualize_* (the MAE demo's raw-pixel models) and on otherwise.
"""
import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import checkpoints
import data
import hiera
import util
from mae_pretrain import MaskedAutoencoderViT, reconstruct, save_reconstruction_figure
from util import print0

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
    """Linear CKA of features x (n, p) and y (n, q) of the same n samples (float64 scalar):
    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features, i.e. <K, L>_F / (||K|| ||L||)
    with the Gram matrices K = X X^T, L = Y Y^T. Debiased: each term is HSIC_1 of the Grams."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    K, L = x @ x.T, y @ y.T
    if debiased:
        return hsic1(K, L) / (hsic1(K, K) * hsic1(L, L)).sqrt()
    return (K * L).sum() / (K.square().sum() * L.square().sum()).sqrt()


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


def patch_distances(grid_size, patch_size):
    """(P, P) Euclidean distances in pixels between the patches of a row-major grid."""
    rows, cols = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                                torch.arange(grid_size, dtype=torch.float64), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)  # (P, 2) in patches
    return torch.cdist(pos, pos) * patch_size


def attention_distance(attn, distances):
    """Mean attention distance per head: attn (B, heads, [windows,] Q, K), rows summing to 1;
    distances ([windows,] Q, K) in px -> (heads,), the mean over images, windows and queries
    of sum_k p_qk d_qk."""
    a = attn.double()
    return (a * distances.to(a)).sum(-1).mean(dim=(0, *range(2, a.ndim - 1)))


def attention_entropy(attn):
    """Mean attention entropy in nats per head: attn (B, heads, [windows,] Q, K) -> (heads,),
    the mean over images, windows and queries of -sum_k p_qk log p_qk (0 log 0 = 0)."""
    a = attn.double()
    return -torch.special.xlogy(a, a).sum(-1).mean(dim=(0, *range(2, a.ndim - 1)))


def block_distances(model):
    """Per block, the pixel distances (windows, Q, K) between the tokens its attention relates:
    the patch grid of a ViT; for a Hiera the tokens of each window, its pooled queries and the
    keys at the previous resolution (hiera.py's token geometry)."""
    if isinstance(model, hiera.Hiera):
        return [torch.cdist(q, k) for q, k in model.token_centres()]
    return [patch_distances(model.patch_embed.grid_size, model.patch_embed.patch_size)[None]] * model.depth


class AttentionStats:
    """Running per-layer, per-head means of attention distance and entropy over images (a list
    per layer: the head count may change with depth). `uniform`: uniform attention's
    (distance px, entropy nats) per block."""

    def __init__(self, model):
        self.distances, self.images = block_distances(model), 0
        self.uniform = [(d.mean().item(), math.log(d.shape[-1])) for d in self.distances]
        self.distance, self.entropy = [0.0] * model.depth, [0.0] * model.depth

    def update(self, attns):
        """attns: per layer (B, heads, windows, Q, K) patch-only probabilities."""
        for k, (a, d) in enumerate(zip(attns, self.distances)):
            self.distance[k] = self.distance[k] + attention_distance(a, d.to(a.device)).cpu() * len(a)
            self.entropy[k] = self.entropy[k] + attention_entropy(a).cpu() * len(a)  # sums over images
        self.images += len(attns[0])

    def compute(self):
        """-> (distance_px, entropy_nats), each [layer][head] lists of floats."""
        return ([(d / self.images).tolist() for d in self.distance], [(e / self.images).tolist() for e in self.entropy])


@torch.no_grad()
def layer_features(model, imgs):
    """-> (features, attention): depth + 1 tensors (B, P*D), each block's norm1 output and the
    final output with the patch tokens flattened (cls removed); and depth tensors (B, heads,
    windows, P, P) of patch-only attention probabilities, renormalized over the patch keys."""
    layers = range(1, model.depth + 1)
    taps = model.encode(model.embed(imgs), norm1=layers, attn=layers)
    p = model.num_prefix_tokens  # a ViT's cls token; a Hiera has none, and no token-wise final norm:
    out = taps.x if p else F.layer_norm(taps.x, taps.x.shape[-1:], eps=1e-6)  # LN without affine
    features = [rearrange(t[:, p:], "b n d -> b (n d)") for t in [*(taps.norm1[k] for k in layers), out]]
    attns = []
    for k in layers:
        a = taps.attn[k][..., p:, p:]  # patch queries and keys
        a = a / a.sum(-1, keepdim=True)
        attns.append(a if a.ndim == 5 else a[:, :, None])  # (B, heads, windows, Q, K); a global block: 1 window
    return features, attns


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


def analysis_loader(args):
    """--num_images un-augmented images (val split, else train) in batches of at least 4."""
    transform = data.eval_transform(args.input_size)
    try:
        ds, _ = data.build_dataset(args, train=False, transform=transform)
        split = "val"
    except data.DataError as e:
        ds, _ = data.build_dataset(args, train=True, transform=transform)
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


def plot_attention(path, stats, names):
    """Two panels (distance, entropy): per layer, one dot per head, a line of the head mean and
    a dotted one for uniform attention, the checkpoints side by side (shifted a little along x)."""
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
            ax.plot(layers + shift, stats[name][f"uniform_{key}"], ":", lw=1, color=colour,
                    label=f"{name}, uniform" if key == keys[0][0] else None)
    for ax, (key, label) in zip(axes, keys):
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(bottom=0)  # distance and entropy from 0: local vs global at a glance
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# What an analysis writes in --output_dir (and a new analysis there replaces).
OUTPUTS = ("cka_*_vs_*.npy", "cka.png", "attention_*.npy", "attention.json", "attention.png", "reconstructions_*.png")


def build_model(path, obj, args, heads):
    """The encoder of checkpoint `path` (architecture from its weights), loaded and checked."""
    family = checkpoints.family(checkpoints.read_state_dict(obj, path))
    if family == "Hiera" and args.patch_size:
        raise util.ConfigError(f"--patch_size is for ViTs; {path} is a Hiera checkpoint (its architecture is read "
                               f"from the weights)")
    cfg = checkpoints.infer_config(obj, path)
    if args.patch_size and args.patch_size != cfg["patch_size"]:
        raise util.ConfigError(f"--patch_size {args.patch_size}: {path} has {cfg['patch_size']}-px patches")
    if args.reconstruct and "decoder_embed_dim" not in cfg:
        raise util.CheckpointError(NO_DECODER.format(path=path))
    if args.input_size is None:
        args.input_size = cfg["img_size"] or 224
        print0(f"--input_size {args.input_size} (the first checkpoint's)")
    model, cfg = checkpoints.build_encoder(obj, str(path), args.input_size, heads=heads)
    if args.reconstruct is not False and "decoder_embed_dim" in cfg and family == "Hiera":
        try:  # whole mask units must remain for the figure: checked now, not after the analysis
            hiera.check_size(args.input_size, mask_ratio_for(obj, args, 0.6))
        except ValueError as e:
            raise util.ConfigError(f"{path}: reconstructions at --input_size {args.input_size}: {e}") from None
    return model, cfg


# ----------------------------------------------------------------------------
# Reconstructions (MAE checkpoints with their decoder)

NO_DECODER = ("{path}: has no MAE decoder (an encoder-only checkpoint, like the official mae_pretrain_vit_*.pth), "
              "so it cannot reconstruct images: use the *_full.pth or mae_visualize_vit_*.pth file, an official "
              "mae_hiera_*_224 file, or a mae_pretrain.py checkpoint.pth")


def norm_pix_setting(path, obj, flag):
    """-> (norm_pix_loss, why): the checkpoint's record, else the flag, else by file name."""
    for key in ("model_config", "args"):
        rec = checkpoints.recorded(obj, key)
        if isinstance(rec.get("norm_pix_loss"), bool):
            if flag is not None and flag != rec["norm_pix_loss"]:
                print0(f"{path}: ignoring the --norm_pix_loss flag, the checkpoint records "
                       f"norm_pix_loss={rec['norm_pix_loss']}")
            return rec["norm_pix_loss"], f"recorded in the checkpoint's {key}"
    if flag is not None:
        return flag, "from the flag"
    if Path(path).name.startswith("mae_visualize"):
        return False, "not recorded; the official mae_visualize_* models predict raw pixels"
    return True, "not recorded; assuming MAE's recipe (pass --no-norm_pix_loss for raw-pixel models)"


def mask_ratio_for(obj, args, default):
    """--mask_ratio, else the ratio the checkpoint records (its run's args, or a Hugging Face
    config.json), else `default`."""
    recorded = [checkpoints.recorded(obj, k).get("mask_ratio") for k in ("args", "model_config")]
    return next(r for r in (args.mask_ratio, *recorded, default) if r is not None)


def save_reconstructions(path, name, cfg, args, out, device):
    """The figure of mae_pretrain.reconstruct for a checkpoint with its MAE decoder (a ViT's or
    an MAE-Hiera's, one masking decision per patch or per 32-px mask unit)."""
    obj = checkpoints.load(path)  # read again rather than kept through the analysis: memory
    norm_pix, why = norm_pix_setting(path, obj, args.norm_pix_loss)
    is_hiera = cfg["family"] == "Hiera"
    ratio = mask_ratio_for(obj, args, 0.6 if is_hiera else 0.75)
    arch = {k: cfg[k] for k in ("in_chans", "embed_dim", "num_heads", "mlp_ratio", "decoder_embed_dim",
                                "decoder_depth", "decoder_num_heads")}
    if is_hiera:
        mae = hiera.MaskedAutoencoderHiera(img_size=args.input_size, stages=cfg["stages"], q_pool=cfg["q_pool"],
                                           norm_pix_loss=norm_pix, **arch)
    else:  # D²-MAE's decoder reads block 8
        mae = MaskedAutoencoderViT(img_size=args.input_size, patch_size=cfg["patch_size"], depth=cfg["depth"],
                                   norm_pix_loss=norm_pix, decode_layer=cfg.get("decode_layer"), **arch)
    print0(f"{path}: decoder {cfg['decoder_embed_dim']} wide, {cfg['decoder_depth']} blocks, "
           f"{cfg['decoder_num_heads']} heads; norm_pix_loss={norm_pix} ({why}); mask ratio {ratio}")
    checkpoints.load_pretrained(mae, obj, str(path), allow_missing=(), verbose=False)
    mae = mae.to(device).eval()
    imgs = data.eval_images(args).to(device)
    torch.manual_seed(args.seed)  # the masks
    parts = reconstruct(mae, imgs, ratio)
    unit = "of the 32-px mask units" if is_hiera else "of the patches"
    targets = "norm-pix predictions de-normalized per patch" if norm_pix else "pixel targets"
    util.write_atomic(out, lambda f: save_reconstruction_figure(f, imgs, *parts, title=f"{name}: {ratio:g} {unit} "
                                                                                    f"removed, {targets}"))
    print0(f"saved {out}")


def data_scale(folder, out):
    """A data-scale study (docs/data_scale.sh) from <folder>/<student>_<images per class>_s<seed>/log.txt:
    each run's last top-1 -> a table of the mean and range over seeds, and data_scale.png."""
    runs = {}
    for log in sorted(Path(folder).glob("*_*_s*/log.txt")):
        m, lines = re.fullmatch(r"(.+)_(\d+)_s\d+", log.parent.name), log.read_text().splitlines()
        last = json.loads(lines[-1]) if m and lines else {}  # a run not evaluated yet has no test_acc1
        if "test_acc1" in last:
            runs.setdefault(m[1], {}).setdefault(int(m[2]), []).append(last["test_acc1"])
    if not runs:
        raise util.ConfigError(f"--data_scale {folder}: no <student>_<n>_s<seed>/log.txt with an evaluation")
    sizes = sorted({n for r in runs.values() for n in r})
    print0("| student | " + " | ".join(f"{n} per class" for n in sizes) + " |\n|---" + "|---" * len(sizes) + "|")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    for student, r in sorted(runs.items(), key=lambda kv: np.mean(kv[1][min(kv[1])])):
        print0(f"| {student} | " + " | ".join(f"{np.mean(r[n]):.2f} ({min(r[n]):.2f}-{max(r[n]):.2f}, {len(r[n])} "
                                              f"seeds)" if n in r else "-" for n in sizes) + " |")
        n = sorted(r)
        line, = ax.plot(n, [np.mean(r[k]) for k in n], "-o", ms=3, label=student)
        ax.fill_between(n, [min(r[k]) for k in n], [max(r[k]) for k in n], color=line.get_color(), alpha=0.2, lw=0)
    ax.set(xscale="log", xlabel="labelled images per class", ylabel="top-1 (%), mean and range over seeds")
    ax.set_xticks(sizes, [str(n) for n in sizes], minor=False)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(Path(out) / "data_scale.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# Command line


def get_args_parser():
    p = argparse.ArgumentParser("Layer CKA, attention distance/entropy and MAE reconstructions",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="*", help="one or more checkpoints in any layout checkpoints.py reads "
                   "(this project's, official MAE, timm, DeiT, MAE-Lite, TinyMIM, Hiera, Hugging Face, ...)")
    p.add_argument("--names", nargs="+", default=None,
                   help="labels for the figures and file names (default: the file names)")
    p.add_argument("--output_dir", default="runs/analysis")
    p.add_argument("--data_scale", metavar="FOLDER", help="instead: tabulate and plot a data-scale study's runs")
    g = p.add_argument_group("model (inferred from each checkpoint's weights unless given; "
                             "one value for all checkpoints or one per checkpoint)")
    g.add_argument("--num_heads", nargs="+", type=int, default=None,
                   help="head count (not visible in the weights; 0 = recorded or from the width)")
    g.add_argument("--patch_size", type=int, default=None, help="the patch size the weights must have")
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
                   help="default: the ratio the checkpoint records, else 0.75 for a ViT and 0.6 for a Hiera")
    data.add_data_args(p)
    return p


def main(args):
    if args.data_scale or not args.checkpoints:
        if bool(args.data_scale) == bool(args.checkpoints):
            raise util.ConfigError("give one or more checkpoints to analyse, or --data_scale FOLDER (not both)")
        return data_scale(args.data_scale, util.prepare_output_dir(args, run=False))
    util.check_ranges(args, {k: util.FLAG_RANGES[k] for k in (
        "mask_ratio", "input_size", "patch_size", "synthetic_samples", "num_workers")})
    for flag in ("batch_size", "num_images"):
        if getattr(args, flag) < 4:
            raise util.ConfigError(f"--{flag} {getattr(args, flag)}: HSIC_1 needs at least 4 images")
    k = len(args.checkpoints)
    names = args.names or default_names(args.checkpoints)
    if len(names) != k or len(set(names)) != k:
        raise util.ConfigError(f"--names needs {k} distinct names, got {names}")
    labels = [file_label(n) for n in names]
    if len(set(labels)) != k:  # "A B" and "A_B" would write the same files
        clash = [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if file_label(a) == file_label(b)]
        raise util.ConfigError(f"--names {clash[0][0]!r} and {clash[0][1]!r} give the same file label "
                               f"{file_label(clash[0][0])!r}: choose names that differ in letters or digits")
    heads = per_checkpoint(args.num_heads, k, "num_heads")
    if any(h is not None and h < 0 for h in heads):
        raise util.ConfigError(f"--num_heads must be positive (0: recorded or from the width), got {heads}")
    dinfo = util.init_distributed(args.device)
    if dinfo.world_size > 1:
        raise util.ConfigError("analyze.py runs in one process: start it with python, not torchrun")
    device = dinfo.device
    models, cfgs = [], []  # every checkpoint is read and checked before any image is processed
    for path, h in zip(args.checkpoints, heads):
        model, cfg = build_model(path, checkpoints.load(path), args, h or None)
        models.append(model.to(device))
        cfgs.append(cfg)
    loader = analysis_loader(args)
    out = util.prepare_output_dir(args, run=False)  # writable? checked before the analysis, not after
    pairs = [(i, j) for i in range(k) for j in range(i, k)]  # A vs A too: a model's own structure
    cka = {(i, j): MinibatchCKA(models[i].depth + 1, models[j].depth + 1) for i, j in pairs}
    attn_stats = [AttentionStats(m) for m in models]
    for imgs, _ in tqdm(loader, desc="analysing", dynamic_ncols=True):
        imgs = data.normalize(imgs.to(device, non_blocking=True))
        grams = []
        for model, stats in zip(models, attn_stats):
            features, attns = layer_features(model, imgs)
            grams.append(gram_stack(features))  # (depth + 1, B, B): all a pair needs from a model
            stats.update(attns)
            del features, attns
        for i, j in pairs:
            cka[i, j].update_grams(grams[i], grams[j])
    earlier = [f for pattern in OUTPUTS for f in out.glob(pattern)]
    if earlier:  # none of them left beside the new ones: a figure of a model not analysed now
        print0(f"{out}: replacing the {len(earlier)} files of an earlier analysis")
        for f in earlier:
            f.unlink()
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
        report[name] = dict(checkpoint=str(path), num_images=stats.images, num_heads=[len(h) for h in dist],
                            distance_px=dist, entropy_nats=ent,
                            mean_distance_px=[float(np.mean(h)) for h in dist],
                            mean_entropy_nats=[float(np.mean(h)) for h in ent],
                            uniform_distance_px=[d for d, _ in stats.uniform],
                            uniform_entropy_nats=[e for _, e in stats.uniform])
        arr = np.full((2, len(dist), max(map(len, dist))), np.nan)  # NaN where a layer has fewer heads
        for layer, (d, e) in enumerate(zip(dist, ent)):
            arr[0, layer, :len(d)], arr[1, layer, :len(e)] = d, e
        np.save(out / f"attention_{label}.npy", arr)
        for key, unit, fmt in (("mean_distance_px", "px", ".1f"), ("mean_entropy_nats", "nats", ".2f")):
            print0(f"{name}: attention {key.split('_')[1]} ({unit}) per layer, mean over heads: "
                   + " ".join(format(v, fmt) for v in report[name][key]))
    (out / "attention.json").write_text(json.dumps(dict(models=report), indent=1))
    plot_attention(out / "attention.png", report, names)
    print0(f"saved {len(pairs)} CKA matrices, cka.png, attention.json and attention.png in {out}")
    if args.reconstruct is not False:
        del models
        for path, name, label, cfg in zip(args.checkpoints, names, labels, cfgs):
            if "decoder_embed_dim" in cfg:
                save_reconstructions(path, name, cfg, args, out / f"reconstructions_{label}.png", device)


if __name__ == "__main__":
    util.run_main(main, get_args_parser())
