"""Fine-tuning and linear probing: turn a pre-trained ViT into a measured classifier, with the
recipes of MAE (He et al., CVPR 2022) and MAE-Lite (Wang et al., ICML 2023).

Fine-tuning trains every weight, from the pre-trained encoder and a fresh head (trunc-normal
std 2e-5), with mean pooling + fc_norm over the patch tokens (or the cls token with
--cls_token), strong augmentation and layer-wise lr decay: blocks near the input, which
pre-training taught well, move less than those near the head.

    lr(p) = lr(step) * layer_decay ** (depth + 1 - layer_id(p))
    layer_id: patch_embed, cls_token, pos_embed -> 0;  blocks.i -> i + 1;  fc_norm, head -> depth + 1

With depth 12 and decay 0.65 the patch embedding learns at 0.65^13 = 0.4% of the head's lr.
No weight decay on biases, norms, cls_token and pos_embed. Mixed targets:

    mixup:  x = lam x_i + (1 - lam) x_j,  y = lam y_i + (1 - lam) y_j,  lam ~ Beta(a, a)
    cutmix: a box of x_j pasted into x_i, lam = 1 - box area / image area
    smoothing: y <- (1 - s) y + s / K;   loss = mean_b sum_k -y_bk log softmax(z_b)_k

Linear probing (--linprobe) measures the frozen features: only BatchNorm1d(affine=False) +
Linear on the cls token train (LARS, no augmentation beyond crop and flip).

--rel_pos_bias (MAE-Lite's "impr.+RPE"): softmax(q k^T / sqrt(d) + B) v in every block, with
BEiT's B[h, i, j] = table[index(i, j), h] (vit.py). --train_subset N: N labelled images per
class (MAE-Lite IJCV's data-scale study). A Hiera classifies the mean of its last tokens
through norm and head.projection, with q_pool 3 (its MAE was pre-trained at 2).

Where this differs from the official code (facebookresearch/mae with timm 0.3.2):
- RandAugment is torchvision's with 11 magnitude bins, so --aa rand-m9 means 9/10 of each op's
  range as in timm; but torchvision has no magnitude noise (mstd is ignored), applies every
  chosen op (timm: each with p 0.5) and has Identity instead of Invert and SolarizeAdd: a
  somewhat stronger augmentation. Color jitter applies only with --aa none, as in timm, so
  MAE-Lite's --color_jitter 0.3 is inactive in its own recipe too.
- MixUp / CutMix are torchvision's: each sample mixes with its neighbour (timm: with the
  mirrored batch); the same distribution of pairs and lam.
- Evaluation counts every image once on any number of GPUs (MAE's --dist_eval pads with
  duplicates) and reports top-min(5, classes).
- Checkpoints record the class names; a classifier meets only data with the same classes.
- From scratch the weights get MAE's init (xavier).
- --mixup 0.8 / --cutmix 1.0 default to the values MAE's recipe passes (FINETUNE.md); the
  official script's flag defaults are 0 / 0 (off).
- A TinyMIM relation student keeps its adaptive last block's head count by default; the
  official TinyMIM fine-tuning rebuilds that block with the standard count (--uniform_heads).
"""
import argparse
import math
import re
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

import checkpoints
import data
import hiera
import util
from util import print0
from vit import VIT_PRESETS, create_vit

# ----------------------------------------------------------------------------
# The classifier


def build_model(args, num_classes, last_block_heads=None):
    """The classifier; with --linprobe a frozen backbone under BatchNorm1d + Linear.
    last_block_heads: a TinyMIM relation student's adaptive last block (its checkpoint records
    it) keeps the head split its q/k/v were trained with."""
    if args.model in hiera.HIERA_PRESETS:  # mean of the last tokens -> norm -> head.projection
        model = hiera.create_hiera(args.model, img_size=args.input_size, num_heads=args.num_heads, q_pool=3,
                                   num_classes=num_classes, drop_path_rate=args.drop_path)
    else:
        model = create_vit(args.model, img_size=args.input_size, patch_size=args.patch_size,
                           num_heads=args.num_heads, num_classes=num_classes,
                           global_pool="token" if args.cls_token else "avg", drop_path_rate=args.drop_path,
                           last_block_heads=last_block_heads, rel_pos_bias=args.rel_pos_bias)
    if args.linprobe:
        # MAE's probe: BN without affine standardises the features, whose scale varies a lot
        # between pre-training methods; the names head.0 / head.1 are MAE's.
        model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), model.head)
        model.requires_grad_(False)
        model.head.requires_grad_(True)
    init_head(model, args)
    return model


def init_head(model, args):
    """MAE: trunc-normal std 2e-5 for fine-tuning (the first logits are ~0: a calm start), 0.01
    for the linear probe (MoCo v3); zero bias."""
    linear = model.head[1] if args.linprobe else getattr(model.head, "projection", model.head)  # Hiera's
    nn.init.trunc_normal_(linear.weight, std=0.01 if args.linprobe else 2e-5)
    nn.init.zeros_(linear.bias)


def load_backbone(model, obj, path, args):
    """--finetune: load what fits (every key checked), then draw a fresh head. With
    --rel_pos_bias a pre-trained encoder has no tables: they start at zero (BEiT's init)."""
    tables = tuple(k for k in model.state_dict() if k.endswith("relative_position_bias_table"))
    report = checkpoints.load_pretrained(model, obj, path, allow_missing=(
        *getattr(model, "head_prefixes", ("head.", "fc_norm.")), *tables))
    init_head(model, args)
    fresh_tables = [k for k in report.missing if k in tables]
    fresh = sorted({k.rsplit(".", 1)[0] for k in report.missing if not k.startswith("head.") and k not in tables}
                   | {"head"})
    print0(f"  freshly initialised: {', '.join(fresh)} (head: trunc-normal std {0.01 if args.linprobe else 2e-5})"
           + (f"; the relative position bias tables of {len(fresh_tables)} blocks (zeros)" if fresh_tables else ""))


def load_classifier(model, obj, path, classes):
    """--eval: the whole classifier (backbone, pooling norm and head) must be in the file, for
    the dataset's classes (by name where the file records them), pooling as the model."""
    sd = checkpoints.read_state_dict(obj, path)
    cfg = checkpoints.infer_config(obj, path)
    head = next((sd[k] for k in ("head.weight", "head.1.weight", "head.projection.weight") if k in sd), None)
    if head is None:
        raise util.CheckpointError(f"{path}: has no classification head (a pre-trained encoder?); "
                                   f"fine-tune it first: --finetune without --eval")
    check_classes(obj.get("class_names") if isinstance(obj, dict) else None, classes,
                  f"{path}: was trained on other classes than this data's")
    if ("head.1.weight" in sd) != isinstance(getattr(model.head, "0", None), nn.BatchNorm1d):  # MAE's probe
        raise util.CheckpointError(f"{path}: {'is' if 'head.1.weight' in sd else 'is not'} a linear probe "
                                   f"(BatchNorm1d + Linear head): {'add' if 'head.1.weight' in sd else 'drop'} --linprobe")
    if cfg.get("img_size") and cfg["img_size"] != model.config.get("img_size"):
        print0(f"{path}: trained at {cfg['img_size']} px, evaluated at --input_size {model.config.get('img_size')}")
    if head.shape[0] != len(classes):
        raise util.CheckpointError(f"{path}: its head has {head.shape[0]} classes, the dataset has {len(classes)}")
    if cfg["family"] == "ViT" and cfg["global_pool"] != model.global_pool:
        raise util.CheckpointError(f"{path}: was trained with {cfg['global_pool']} pooling ("
                                   f"{'norm' if cfg['global_pool'] == 'token' else 'fc_norm'}); "
                                   f"{'add' if cfg['global_pool'] == 'token' else 'drop'} --cls_token")
    if cfg["family"] == "Hiera" and cfg["q_pool"] != model.q_pool:
        raise util.CheckpointError(f"{path}: records q_pool {cfg['q_pool']}; a Hiera classifier here pools "
                                   f"{model.q_pool} times")
    checkpoints.load_pretrained(model, obj, path, allow_missing=())


def check_classes(a, b, message, names=("the checkpoint", "the data")):
    """Two class lists must name the same classes in the same order (label i means one class);
    `a` None (not recorded) passes."""
    if a is not None and list(a) != list(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        detail = (f"only in {names[0]}: {only_a[:5] or 'none'}, only in {names[1]}: {only_b[:5] or 'none'}"
                  if only_a or only_b else "the same names in another order")
        raise util.ConfigError(f"{message} ({detail})")


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as MAE's linear probe uses it (from MoCo v3): momentum SGD whose
    update of each weight matrix is rescaled by a trust ratio,

        g <- g + wd * w;   g <- g * eta * ||w|| / ||g||     (tensors with ndim > 1 only;
                                                           ratio 1 if either norm is 0)
        mu <- momentum * mu + g;   w <- w - lr * mu

    Biases and norm parameters (ndim <= 1) get plain momentum SGD without weight decay."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    g = g * torch.where((w_norm > 0) & (g_norm > 0), group["trust_coefficient"] * w_norm / g_norm, 1.0)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(g)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(model, args, device):
    """Parameter groups (no decay on 1-D params and tokens; lr_scale from layer decay), then
    AdamW (fused on CUDA), SGD or LARS."""
    groups = util.param_groups(model, args.weight_decay, layer_decay=None if args.linprobe else args.layer_decay)
    if args.optimizer == "adamw":
        return util.make_adamw(groups, args.lr, (0.9, 0.999), device)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if args.optimizer == "sgd":  # Nesterov, as timm's "sgd" that MAE-Lite's downstream recipe names
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    return LARS(groups, lr=args.lr, momentum=args.momentum)


# ----------------------------------------------------------------------------
# The loss and the training step


def soft_target_cross_entropy(logits, target):
    """logits (B, K), target (B, K) with rows summing to 1 -> mean_b sum_k -target log softmax."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def smooth_targets(target, smoothing):
    """(B, K) probabilities -> (1 - s) * target + s / K (timm's smoothing of mixed targets)."""
    return target * (1.0 - smoothing) + smoothing / target.shape[-1]


def build_mixing(args, num_classes):
    """torchvision's MixUp / CutMix (one of them per batch when both are on), or None."""
    from torchvision.transforms import v2
    mixes = [cls(alpha=a, num_classes=num_classes) for cls, a in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix))
             if a > 0]
    return None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def random_erasing(imgs, p, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3)):
    """Random erasing (Zhong et al. 2020) as timm's 'pixel' mode, per image of a normalised
    batch on the device: with probability p, a box of area fraction in `scale` and log-uniform
    aspect in `ratio` (10 tries) is filled with N(0, 1) noise. Boxes come from torch's CPU RNG
    (no device sync), the noise from the device's."""
    B, C, H, W = imgs.shape
    for b in torch.nonzero(torch.rand(B) < p).flatten().tolist():
        for _ in range(10):
            area = H * W * torch.empty(1).uniform_(*scale).item()
            aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < H and w < W:
                top, left = torch.randint(0, H - h + 1, (1,)).item(), torch.randint(0, W - w + 1, (1,)).item()
                imgs[b, :, top:top + h, left:left + w] = torch.randn(C, h, w, device=imgs.device)
                break
    return imgs


def classify_step(model, batch, *, mixing, smoothing, reprob):
    """The loss of one batch (util.train_one_epoch runs it under autocast, then backward and,
    every --accum_iter micro-batches, the optimizer step): erase, mix, then soft-target
    cross-entropy (label-smoothed CE when nothing is mixed)."""
    imgs, labels, _ = batch
    if reprob > 0:
        imgs = random_erasing(imgs, reprob)
    if mixing is None:
        return F.cross_entropy(model(imgs).float(), labels, label_smoothing=smoothing), {}
    imgs, target = mixing(imgs, labels)  # target: (B, K) mixed one-hot
    return soft_target_cross_entropy(model(imgs), smooth_targets(target, smoothing)), {}


@torch.no_grad()
def evaluate(model, loader, device, autocast=nullcontext, num_classes=1000):
    """Loss, top-1 and top-k (k = min(5, classes)) over every image of the split: each rank
    sums over its own images, then one all-reduce of (loss, correct@1, correct@k, n)."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for imgs, labels in loader:
        imgs, labels = data.normalize(imgs.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        with autocast():
            logits = model(imgs).float()  # (B, K)
        hits = logits.topk(k, dim=-1).indices == labels[:, None]  # (B, k)
        sums[:3] += torch.stack([F.cross_entropy(logits, labels, reduction="sum"), hits[:, 0].sum(),
                                 hits.any(dim=-1).sum()]).double()
        sums[3] += len(labels)  # a Python number: no host-to-device copy, no wait
    model.train(was_training)
    loss, c1, ck, n = util.all_reduce_sum(sums).tolist()
    if n == 0:
        raise util.ConfigError("the validation split is empty")
    return {"loss": loss / n, "acc1": 100 * c1 / n, "acc5": 100 * ck / n, "top_k": k,
            "correct1": int(c1), "correct5": int(ck), "images": int(n)}


# ----------------------------------------------------------------------------
# Data: augmentation, the validation loader, labelled subsets


def parse_randaugment(spec):
    """timm's 'rand-m9-mstd0.5-inc1' -> (ops per image, magnitude 0..10); 'none' -> None."""
    if spec.lower() in ("", "none"):
        return None
    if not re.fullmatch(r"rand(-[a-z]+[\d.]+)*", spec):
        raise util.ConfigError(f"--aa {spec!r}: expected rand-m<magnitude>[-n<ops>][-mstd<s>] or none")
    opts = dict(re.findall(r"-([a-z]+)([\d.]+)", spec))
    ops, magnitude = int(opts.get("n", 2)), int(float(opts.get("m", 9)))
    if not 0 <= magnitude <= 10:
        raise util.ConfigError(f"--aa {spec!r}: magnitude must lie in 0..10 (timm's scale)")
    return ops, magnitude


def train_transform(args):
    """RandomResizedCrop (bicubic) + flip + RandAugment or color jitter, as uint8 (the
    normalization and random erasing run on the device, in classify_step)."""
    from torchvision.transforms import v2
    t = [data.DecodeCropFlip(args.input_size, (args.min_crop_scale, 1.0)).crop]  # a PIL image
    ra = parse_randaugment(args.aa)
    if ra:
        # 11 bins: magnitude m is m/10 of each op's range, timm's scale. Geometric ops fill
        # with the mean pixel (124, 116, 104) as timm does.
        fill = tuple(round(255 * m) for m in data.IMAGENET_MEAN)
        t.append(v2.RandAugment(num_ops=ra[0], magnitude=ra[1], num_magnitude_bins=11,
                                interpolation=v2.InterpolationMode.BICUBIC, fill=fill))
    elif args.color_jitter:
        t.append(v2.ColorJitter(*(args.color_jitter,) * 3))
    return v2.Compose([*t, v2.PILToTensor()])


def build_val_loader(dataset, args, dinfo):
    """Rank r evaluates images r, r + W, r + 2W, ...: every image exactly once, uneven counts
    allowed (DistributedSampler would pad the last round with duplicates)."""
    return DataLoader(dataset, batch_size=args.batch_size, sampler=range(dinfo.rank, len(dataset), dinfo.world_size),
                      num_workers=args.num_workers, pin_memory=dinfo.device.type == "cuda")


def dataset_labels(dataset):
    """Every sample's label, read without decoding an image: .targets (ImageFolder, CIFAR),
    ._labels (torchvision's Flowers102, OxfordIIITPet, FGVCAircraft), ._samples (Stanford
    Cars), index % classes (the built-in data), and concatenations of these."""
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        return [y for part in dataset.datasets for y in dataset_labels(part)]
    if isinstance(dataset, data.SyntheticShapes):
        return [i % len(dataset.classes) for i in range(len(dataset))]
    for attr in ("targets", "_labels"):
        if hasattr(dataset, attr):
            return [int(y) for y in getattr(dataset, attr)]
    if hasattr(dataset, "_samples"):
        return [int(y) for _, y in dataset._samples]
    raise util.ConfigError(f"--train_subset: cannot read the labels of a {type(dataset).__name__} "
                           f"without decoding every image")


def class_balanced_subset(dataset, n, seed, classes):
    """--train_subset N: per class c, the first n_c of a permutation of its images drawn from a
    generator seeded by (seed, c), with n_c = N (a whole N >= 1) or round(N * |c|) (0 < N < 1).
    The draw depends on the labels and the seed only: the same images on any number of
    processes, and a smaller N keeps a subset of a larger one's. -> (Subset, [n_c])."""
    labels = torch.tensor(dataset_labels(dataset))
    chosen = []
    for c, name in enumerate(classes):
        members = torch.nonzero(labels == c).flatten()  # indices of class c, in dataset order
        k = int(n) if n >= 1 else max(1, round(n * len(members)))
        if k > len(members):
            raise util.ConfigError(f"--train_subset {n:g}: class {name!r} has only {len(members)} training images")
        g = torch.Generator().manual_seed(data.stable_seed(seed, "train_subset", c))
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.utils.data.Subset(dataset, torch.cat(chosen).sort().values.tolist()), [len(x) for x in chosen]


# ----------------------------------------------------------------------------
# Command line

# MAE's main_linprobe.py recipe: what --linprobe changes unless the flag is given.
LINPROBE_DEFAULTS = dict(cls_token=True, optimizer="lars", batch_size=512, epochs=90, warmup_epochs=10, blr=0.1,
                         weight_decay=0.0, min_lr=0.0, drop_path=0.0, aa="none", mixup=0.0, cutmix=0.0,
                         smoothing=0.0, reprob=0.0)


class Parser(argparse.ArgumentParser):
    """With --linprobe the defaults become LINPROBE_DEFAULTS; flags on the command line win."""

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        if ns.linprobe:
            saved = {k: self.get_default(k) for k in LINPROBE_DEFAULTS}
            self.set_defaults(**LINPROBE_DEFAULTS)
            ns = super().parse_args(args, namespace)
            self.set_defaults(**saved)
        return ns


def get_args_parser():
    p = Parser("Fine-tuning, linear probing and evaluation", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_tiny", choices=[*VIT_PRESETS, *hiera.HIERA_PRESETS],
                   help="a ViT, or a Hiera (q_pool 3; hiera_lite_tiny: MAE-Lite's 46-wide Hiera-Tiny)")
    g.add_argument("--input_size", type=int, default=224)
    g.add_argument("--patch_size", type=int, default=None, help="override the preset's patch size")
    g.add_argument("--num_heads", type=int, default=None, help="override the head count "
                   "(MAE-Lite's tiny uses 12; this project's checkpoints record theirs)")
    g.add_argument("--drop_path", type=float, default=0.1, help="stochastic depth at the last block")
    g.add_argument("--rel_pos_bias", action="store_true",
                   help="BEiT's relative position bias in every block, on top of pos_embed (MAE-Lite's "
                        "'impr.+RPE'): one zero-initialised table per block, no weight decay on it; an RPE "
                        "checkpoint is evaluated at the --input_size it was trained at (tables are not interpolated)")
    g.add_argument("--uniform_heads", action="store_true",
                   help="a TinyMIM relation student's adaptive last block gets the --num_heads split of the "
                        "other blocks (its q/k/v re-split, as the official TinyMIM fine-tuning); default: "
                        "keep the head count it was trained with")
    g.add_argument("--cls_token", action="store_true",
                   help="classify the cls token after `norm` (timm, DeiT, linear probe) instead of the mean "
                        "of the patch tokens + fc_norm (MAE's fine-tuning)")
    g.add_argument("--global_pool", action="store_false", dest="cls_token", help="the mean of the patch tokens "
                   "+ fc_norm (the default)")
    g.add_argument("--finetune", default="", help="start from this pre-trained checkpoint (any layout "
                   "checkpoints.py reads); the head is always re-initialised")
    g.add_argument("--linprobe", action="store_true", help="freeze the backbone, train BatchNorm1d + Linear "
                   "on the cls token; sets the defaults " + ", ".join(f"{k}={v}" for k, v in LINPROBE_DEFAULTS.items()))
    g.add_argument("--eval", action="store_true", help="only evaluate the classifier in --resume "
                   "(or --finetune), e.g. an official fine-tuned checkpoint")
    g = util.add_optim_args(p, batch_size=64, epochs=50, warmup_epochs=5, blr=1e-3, weight_decay=0.05, min_lr=1e-6)
    g.add_argument("--layer_decay", type=float, default=0.75,
                   help="layer-wise lr decay: 0.65 MAE ViT-B, 0.85 MAE-Lite tiny, 1 = off")
    g.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "lars"),
                   help="adamw (0.9, 0.999); sgd (Nesterov) or lars with --momentum")
    g.add_argument("--momentum", type=float, default=0.9)
    g = p.add_argument_group("augmentation and regularization")
    g.add_argument("--min_crop_scale", type=float, default=0.08, help="RandomResizedCrop scale=(min, 1)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1",
                   help="RandAugment as timm writes it (rand-m<magnitude 0..10>[-n<ops>]); none: off")
    g.add_argument("--color_jitter", type=float, default=None,
                   help="brightness/contrast/saturation strength; used only with --aa none (as timm)")
    g.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup Beta(a, a); 0: off")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix Beta(a, a); 0: off (both on: "
                   "one of the two per batch, each with probability 0.5)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g = data.add_data_args(p)
    g.add_argument("--train_subset", type=float, default=None, metavar="N",
                   help="train on N labelled images per class (a whole N >= 1) or on that fraction of each "
                        "class (0 < N < 1, e.g. 0.1); drawn per class from --seed, the same on any number of "
                        "processes, and nested (a class's 50 are the first 50 of its 200)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_freq", type=int, default=1, metavar="N",
                   help="evaluate every N epochs and after the last (many short epochs on a small "
                        "--train_subset would otherwise spend most of their time evaluating)")
    util.add_run_args(p, output_dir="runs/finetune")
    return p


# Flags a Hiera has no use for (it mean-pools into `norm`, has 4-px tokens, no cls token, no
# TinyMIM block, no relative position tables).
VIT_ONLY_FLAGS = ("linprobe", "patch_size", "cls_token", "uniform_heads", "rel_pos_bias")
# What a resumed run must keep: the classifier and what it starts from.
FIXED_ON_RESUME = (*util.FIXED_ON_RESUME, "linprobe", "cls_token", "finetune", "uniform_heads",
                   "rel_pos_bias", "train_subset", "optimizer")


def check_args(args):
    util.check_common_args(args, dict(
        smoothing=util.between(0, 1, hi_ok=False), reprob=util.between(0, 1),
        drop_path=util.between(0, 1, hi_ok=False),
        min_crop_scale=util.between(0, 1, lo_ok=False), layer_decay=util.between(0, 1, lo_ok=False),
        momentum=util.between(0, 1, hi_ok=False), mixup=util.NON_NEGATIVE, cutmix=util.NON_NEGATIVE,
        color_jitter=util.NON_NEGATIVE, train_subset=util.POSITIVE, eval_freq=util.AT_LEAST_1))
    if args.train_subset is not None and args.train_subset >= 1 and args.train_subset != int(args.train_subset):
        raise util.ConfigError(f"--train_subset {args.train_subset:g}: a whole number of images per class "
                               f"(1 or more) or a fraction of each class (below 1)")
    if args.rel_pos_bias and args.linprobe:
        raise util.ConfigError("--rel_pos_bias with --linprobe: the frozen tables would stay at zero")
    if args.model in hiera.HIERA_PRESETS:
        defaults = get_args_parser()
        flag = next((f for f in VIT_ONLY_FLAGS if getattr(args, f) != defaults.get_default(f)), None)
        if flag:
            raise util.ConfigError(f"--{flag} is for a ViT; --model {args.model} is a Hiera (mean of its "
                                   f"tokens -> norm -> head.projection)")
        try:
            hiera.check_size(args.input_size)
        except ValueError as e:
            raise util.ConfigError(f"--input_size: {e}") from None
    elif args.input_size % (patch := args.patch_size or VIT_PRESETS[args.model].get("patch_size", 16)):
        raise util.ConfigError(f"--input_size {args.input_size} is not divisible by the patch size {patch}")
    if args.eval and not (args.resume or args.finetune):
        raise util.ConfigError("--eval needs the classifier to evaluate: --resume PATH (or --finetune PATH)")
    if args.eval and args.resume and args.finetune:
        raise util.ConfigError("--eval evaluates one classifier: give --resume PATH or --finetune PATH, not both")
    if args.linprobe and args.drop_path:
        raise util.ConfigError("--linprobe trains only the head: --drop_path must be 0")
    parse_randaugment(args.aa)


def main(args):
    check_args(args)
    dinfo = util.init_distributed(args.device, args.dist_timeout)
    device = dinfo.device
    if not args.eval:
        util.prepare_output_dir(args)
    val_set, classes = data.build_dataset(args, train=False, transform=data.eval_transform(args.input_size))
    if len(classes) < 2:
        raise util.ConfigError(f"the data has {len(classes)} class ({', '.join(classes)}): a classifier needs 2 or more")
    val_loader = build_val_loader(val_set, args, dinfo)
    if not args.eval:
        train_set, train_classes = data.build_dataset(args, train=True, transform=train_transform(args))
        check_classes(train_classes, classes, "the training and validation splits have different classes",
                      ("train", "val"))
        if args.train_subset:
            full = len(train_set)
            train_set, per_class = class_balanced_subset(train_set, args.train_subset, args.seed, classes)
            each = per_class[0] if len(set(per_class)) == 1 else f"{min(per_class)}-{max(per_class)}"
            print0(f"--train_subset {args.train_subset:g}: {len(train_set)} of the {full} training images, "
                   f"{each} per class, drawn with --seed {args.seed}")
        loader = data.build_train_loader(train_set, args, dinfo)
    source = (args.resume or args.finetune) if args.eval else args.finetune
    obj = checkpoints.load(source) if source else None  # read once, before the model is built
    lbh = (checkpoints.infer_config(obj, source).get("last_block_heads")
           if obj is not None and args.model in VIT_PRESETS else None)
    if lbh and args.uniform_heads:  # the official TinyMIM fine-tuning: re-split its q/k/v
        print0(f"{source}: its last block has {lbh} heads (a TinyMIM relation student); --uniform_heads "
               f"re-splits it into the model's {args.num_heads or 'preset'} heads")
        obj = {**obj, "model_config": {**obj["model_config"], "last_block_heads": None}}
        lbh = None
    elif lbh:
        print0(f"{source}: its last block has {lbh} heads (a TinyMIM relation student), as the model's "
               f"(--uniform_heads: the --num_heads split in every block, as the official TinyMIM code)")
    elif args.uniform_heads:
        what = f"{source} has" if source else "training from scratch, the model has"
        print0(f"--uniform_heads: {what} no adaptive last block (it is for a TinyMIM relation student); "
               f"nothing to re-split")
    torch.manual_seed(args.seed)  # the same initial weights (and head) on every rank
    model = build_model(args, len(classes), last_block_heads=lbh)
    autocast, scaler = util.amp_setup(args.precision, device)
    if args.eval:
        load_classifier(model, obj, source, classes)
        stats = evaluate(model.to(device), val_loader, device, autocast, len(classes))
        print0(f"* Acc@1 {stats['acc1']:.3f} Acc@{stats['top_k']} {stats['acc5']:.3f} loss {stats['loss']:.4f} "
               f"({stats['correct1']} and {stats['correct5']} of {stats['images']} images)")
        return stats
    if args.finetune:
        load_backbone(model, obj, args.finetune, args)
    else:
        print0("no --finetune checkpoint: training from scratch")
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{args.model}{' (linear probe)' if args.linprobe else ''}: {n_params / 1e6:.3f}M trainable "
           f"parameters, {len(classes)} classes, {len(val_set)} validation images")
    util.announce(args, dinfo.world_size, len(train_set), len(loader) // args.accum_iter)
    optimizer = build_optimizer(model, args, device)
    fixed = FIXED_ON_RESUME + (("seed",) if args.train_subset else ())  # the seed drew the subset
    start_epoch, ckpt = util.resume_checkpoint(args, model, optimizer, scaler, fixed=fixed)
    if ckpt is not None:
        check_classes(ckpt.get("class_names"), classes, f"{args.resume or Path(args.output_dir) / 'checkpoint.pth'}: "
                      f"was trained on other classes than this data's")
    best = ckpt.get("best_acc1") if start_epoch > 0 else None  # the best top-1 so far (None: not evaluated)
    net = util.wrap_model(model, dinfo, args)
    step = partial(classify_step, mixing=build_mixing(args, len(classes)), smoothing=args.smoothing, reprob=args.reprob)
    if util.benchmark(args, net, loader, optimizer, step, device, autocast, scaler):
        return
    out = Path(args.output_dir)
    for epoch in range(start_epoch, args.epochs):
        stats = util.train_one_epoch(net, loader, optimizer, epoch, args, step, device, autocast, scaler)
        extra = {"class_names": list(classes)}
        log, result, new_best = {"n_parameters": n_params, "train_images": len(train_set)}, "", False
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:  # --eval_freq, and the last
            val = evaluate(model, val_loader, device, autocast, len(classes))
            log.update({f"test_{k}": val[k] for k in ("loss", "acc1", "acc5")})
            new_best, best = best is None or val["acc1"] > best, val["acc1"] if best is None else max(best, val["acc1"])
            result = (f"val loss {val['loss']:.4f}  acc1 {val['acc1']:.2f}  acc{val['top_k']} {val['acc5']:.2f}  "
                      f"best {best:.2f}  ")
        log.update({"best_acc1": best} if best is not None else {})
        with util.uninterrupted():  # the best checkpoint and checkpoint.pth change together
            if new_best and dinfo.is_main:
                util.save_checkpoint(out / "checkpoint-best.pth", {
                    "model": model.state_dict(), **extra, "epoch": epoch, "acc1": best,
                    "args": util.plain_args(args), "model_config": model.config})
            util.end_epoch(args, model, optimizer, scaler, epoch, stats, log, {"best_acc1": best, **extra},
                           result or f"not evaluated (--eval_freq {args.eval_freq})  ")


if __name__ == "__main__":
    util.run_main(main, get_args_parser())
