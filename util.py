"""Shared plumbing for every stage, and nothing that teaches a method.

- Distributed: torchrun's environment -> NCCL on CUDA, gloo on CPU; plain `python` runs
  with no process group. `print0` prints on rank 0.
- Errors: `UserError` and its kinds end a run with one line and exit status 1.
- Checkpoints: atomic saves (temp file + rename), `weights_only=True` loads, a reader
  for the formats in the wild (`read_state_dict`) and `load_pretrained`, which maps,
  checks and reports every key.
- Optimization: `cosine_lr` (per-iteration warmup + half-cosine) and `param_groups`
  (no weight decay on 1-D params and tokens; MAE's layer-wise lr decay).
- Data: ImageFolder / CIFAR / a built-in synthetic dataset. Every training sample is
  augmented under an RNG seeded by (seed, epoch, index), and MAE's mask noise comes
  from the same per-sample seed, so a run gives the same batches whatever the number
  of processes or workers, and a resumed run continues exactly.
- The training loop shared by the pre-training stages: accumulation under no_sync,
  autocast, non-finite-loss stop, a tqdm bar, one JSON line per epoch in log.txt.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from vit import VIT_PRESETS, interpolate_pos_embed

# ----------------------------------------------------------------------------
# Errors the user can fix: one line, exit status 1, no traceback.


class UserError(Exception):
    pass


class ConfigError(UserError):
    """A flag or input path that cannot work."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; nothing is saved from that epoch."""


def run_main(main, parser):
    """Parse arguments and run `main(args)`; a UserError ends it with one line on stderr."""
    args = parser.parse_args()
    try:
        main(args)
    except UserError as e:
        for bar in list(getattr(tqdm, "_instances", ())):  # a bar left open by an error raised
            bar.close()  # mid-epoch (a corrupt image) would otherwise share the message's line
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------
# Distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device="auto"):
    """Set up from torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or a single process without them.
    device: 'auto' (CUDA if available), 'cuda' or 'cpu'."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def unwrap(model):
    """The bare module under DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def stable_seed(*parts):
    """A 63-bit seed from a tuple of ints/strings, the same on every machine and run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------
# Checkpoints: saving and resuming this project's own runs


def plain_args(args):
    """argparse.Namespace -> dict of plain data (safe for weights_only loading)."""
    ok = (str, int, float, bool, type(None))
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (list, tuple)):
            v = [x if isinstance(x, ok) else str(x) for x in v]
        out[k] = v if isinstance(v, ok + (list,)) else str(v)
    return out


def save_checkpoint(path, state):
    """Write atomically: a temp file in the same folder, fsync, then rename over `path`.
    A kill at any moment leaves either the old complete file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path):
    """torch.load with weights_only=True (a checkpoint from the internet cannot run code).
    argparse.Namespace is allow-listed because MAE's own training checkpoints store one."""
    path = Path(path)
    if path.is_dir():  # a Hugging Face save_pretrained directory (see read_hf_dir)
        return read_hf_dir(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # installed with timm; HF hub weights use it
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        detail = detail.group(1).strip() if detail else (text.strip().splitlines() or [""])[0]
        if "Unsupported global" in text:
            raise CheckpointError(f"{path}: holds Python objects other than tensors and plain "
                                  f"data; refusing to unpickle it ({detail})") from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or the file is corrupt "
                              f"({type(e).__name__}: {detail[:200]})") from None


def load_state_strict(model, state_dict, path):
    """load_state_dict(strict=True) with a one-line error naming the first bad key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    for k, v in state_dict.items():
        if k in own and v.shape != own[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)} (was it saved with other --model flags?)")
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model: {len(missing)} missing keys "
                              f"(first: {missing[:1]}), {len(unexpected)} unexpected "
                              f"(first: {unexpected[:1]})")
    model.load_state_dict(state_dict)


def resume_checkpoint(args, model, optimizer, scaler=None):
    """Restore a run from --resume, or from <output_dir>/checkpoint.pth when it exists
    (a requeued job continues with the same command). Returns (first epoch to run, the
    checkpoint dict or None) so a stage can restore entries of its own (an EMA, a best score)."""
    path = args.resume or (Path(args.output_dir) / "checkpoint.pth")
    if not args.resume and not Path(path).is_file():
        return 0, None
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry; --resume takes a training checkpoint")
    load_state_strict(model, ckpt["model"], path)
    if "optimizer" in ckpt and "epoch" in ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        print0(f"resumed {path}: epoch {ckpt['epoch']} done, continuing at {ckpt['epoch'] + 1}")
        return ckpt["epoch"] + 1, ckpt
    print0(f"loaded weights only from {path} (no optimizer state / epoch): starting at epoch 0")
    return 0, ckpt


def save_training_state(args, model, optimizer, scaler, epoch, extra=None):
    """Rank 0 writes <output_dir>/checkpoint.pth (always the latest complete epoch) and,
    every --save_every epochs, a kept copy checkpoint-<epoch>.pth. `extra`: more entries
    for the same file (an EMA model, the best accuracy so far)."""
    if not is_main_process():
        return
    model = unwrap(model)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "epoch": epoch, "args": plain_args(args),
             "model_config": getattr(model, "config", None), **(extra or {})}
    out = Path(args.output_dir)
    save_checkpoint(out / "checkpoint.pth", state)
    every = getattr(args, "save_every", 0)
    if every and ((epoch + 1) % every == 0 or epoch + 1 == args.epochs):
        save_checkpoint(out / f"checkpoint-{epoch}.pth", state)


# ----------------------------------------------------------------------------
# Checkpoints in the wild -> this project's names (PAPERS.md section 8)

# Where a state_dict sits inside a checkpoint file, tried in this order.
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")
# Key prefixes, tried in this order: the first under which patch_embed.proj.weight
# exists wins. MAE-Lite: module.model.; MoCo v3: module.base_encoder.; AMD/VideoMAE:
# encoder. or backbone.; DDP: module.; this project's distilled students: student.;
# torch.compile's _orig_mod. is removed everywhere.
PREFIXES = ("", "module.", "model.", "module.model.", "encoder.", "backbone.",
            "module.encoder.", "module.backbone.", "module.base_encoder.", "base_encoder.", "student.")


def read_state_dict(path_or_obj, name=None):
    """Any known checkpoint layout -> a state_dict with timm/MAE names.

    Unwraps {'model'|'module'|'state_dict'|'model_state': ...}, strips the prefix
    that holds the ViT, maps BEiT/VideoMAE's q_bias/v_bias to qkv.bias and drops a
    DeiT/TinyMIM distillation token (its pos_embed row and dist_token), and renames a
    transformers ViT / ViTMAE (`from_hf`). Keys outside the prefix (a VideoMAE decoder,
    a teacher) are kept under their own names, so `load_pretrained` reports them as
    unexpected.
    """
    name = name or str(path_or_obj)
    obj = load_checkpoint(path_or_obj) if isinstance(path_or_obj, (str, Path)) else path_or_obj
    sd = obj
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                sd = obj[key]
                break
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{name}: unknown layout: no state_dict of tensors at the top level "
                              f"or under {'/'.join(WRAPPER_KEYS)} (found {keys})")
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    if any(k.endswith(HF_PATCH) for k in sd):  # Hugging Face transformers, see from_hf
        sd = from_hf(sd, name)
    prefix = next((p for p in PREFIXES if p + "patch_embed.proj.weight" in sd), None)
    if prefix is None:
        raise CheckpointError(f"{name}: unknown layout: no ViT patch_embed.proj.weight under any "
                              f"known prefix (first keys: {list(sd)[:4]})")
    sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}

    for k in [k for k in sd if k.endswith("attn.q_bias")]:  # BEiT / VideoMAE attention bias
        q, v = sd.pop(k), sd.pop(k.replace("q_bias", "v_bias"))
        sd[k.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
    if "dist_token" in sd:  # DeiT-distilled / TinyMIM*-T: rows are [cls, dist, patches...]
        sd.pop("dist_token")
        pe = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
    return sd


@dataclass
class LoadReport:
    loaded: list
    missing: list  # in the model, not in the file: left as initialised
    unexpected: list  # in the file, not used by the model
    notes: list  # interpolations and dropped heads


def _group(keys):
    """Readable summary of many keys: collapse block indices and count."""
    counts = {}
    for k in keys:
        g = re.sub(r"\.\d+\.", ".*.", k, count=1)
        counts[g] = counts.get(g, 0) + 1
    return ", ".join(g if n == 1 else f"{g} (x{n})" for g, n in counts.items())


# Head count is not in the weights: a width's usual count (vit.py's presets) unless the
# checkpoint records its own. Decoders: MAE's 512-wide and MAE-Lite's 96-wide both use
# 32-dim heads.
HEADS_BY_WIDTH = {cfg["embed_dim"]: cfg["num_heads"] for cfg in VIT_PRESETS.values()}


def infer_vit_config(path_or_obj, name=None):
    """Architecture of a checkpoint in any known layout, read from its weights:
    embed_dim, depth, patch_size, in_chans, img_size (from pos_embed's grid), mlp_ratio,
    global_pool, num_classes, and the decoder's size when it has one. num_heads (and
    decoder_num_heads) come from the checkpoint's recorded config when it has one, else
    from the width; the returned 'heads_inferred' says which."""
    name = name or str(path_or_obj)
    obj = load_checkpoint(path_or_obj) if isinstance(path_or_obj, (str, Path)) else path_or_obj
    sd = read_state_dict(obj, name=name)
    saved = (obj.get("model_config") if isinstance(obj, dict) else None) or {}
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4:  # VideoMAE / AMD video models embed tubelets with a Conv3d
        raise CheckpointError(f"{name}: patch_embed.proj.weight has shape {tuple(w.shape)}, not the "
                              f"(D, C, p, p) of an image ViT (a video model?)")
    D, C, p, _ = w.shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1) if "pos_embed" in sd else None
    cfg = dict(embed_dim=D, depth=depth, patch_size=p, in_chans=C,
               img_size=grid * p if grid else None,
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
               num_heads=saved.get("num_heads") or HEADS_BY_WIDTH.get(D, max(1, D // 64)),
               heads_inferred="num_heads" not in saved,
               last_block_heads=saved.get("last_block_heads"),  # TinyMIM's adaptive block
               global_pool="avg" if "fc_norm.weight" in sd and "norm.weight" not in sd else "token",
               num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0)
    if "decoder_embed.weight" in sd:
        Dd = sd["decoder_embed.weight"].shape[0]
        cfg.update(decoder_embed_dim=Dd,
                   decoder_depth=len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")}),
                   decoder_num_heads=saved.get("decoder_num_heads") or max(1, Dd // 32))
    return cfg


def load_pretrained(model, path, allow_missing=("head.", "fc_norm."), verbose=True, name=None,
                    check_heads=True):
    """Load any known checkpoint format into `model` (a ViT or an MAE), checking every key.

    - pos_embed / decoder_pos_embed of another grid are interpolated (bicubic);
    - a head of another size is dropped (the model keeps its fresh head);
    - keys the model does not have (a decoder, a teacher, `norm` for a mean-pooled
      model) are reported as unexpected and skipped;
    - missing keys outside `allow_missing` (prefixes), a depth or shape mismatch:
      CheckpointError naming the file and the key; so is a head split other than the one
      the file records (num_heads, last_block_heads), unless check_heads=False (a user
      who asked for another split on purpose).
    `path` may also be a checkpoint already read with load_checkpoint (then `name` names
    it in messages). Returns a LoadReport; prints it when verbose.
    """
    obj = load_checkpoint(path) if isinstance(path, (str, Path)) else path
    path = name or path
    sd = read_state_dict(obj, name=path)
    own = model.state_dict()
    loaded, notes = {}, []
    for k, v in sd.items():
        if k not in own:
            continue
        want = own[k].shape
        if k.endswith("pos_embed") and v.shape != want and v.shape[-1] == want[-1]:
            old, new = math.isqrt(v.shape[1] - 1), math.isqrt(want[1] - 1)
            v = interpolate_pos_embed(v, new)
            notes.append(f"{k} interpolated from a {old}x{old} to a {new}x{new} grid")
        if v.shape != want:
            if k.startswith("head."):
                notes.append(f"{k} {tuple(v.shape)} dropped: the model's head is {tuple(want)}")
                continue
            hint = {"patch_embed.proj.weight": " (patch size or width differ)"}.get(k, "")
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(want)}{hint}")
        loaded[k] = v
    unexpected = [k for k in sd if k not in own]
    extra_blocks = sorted({int(m.group(1)) for k in unexpected
                           if (m := re.match(r"blocks\.(\d+)\.", k))})
    if extra_blocks:
        depth = sum(1 for k in own if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k))
        raise CheckpointError(f"{path}: has blocks up to blocks.{extra_blocks[-1]}, the model has "
                              f"{depth} blocks (depth mismatch)")
    # Head count is invisible in the shapes (qkv is [3D, D] for any count): check it
    # where the file records it (this project's checkpoints do).
    saved = obj.get("model_config") if isinstance(obj, dict) and check_heads else None
    mine = getattr(model, "config", None)
    if saved and mine and saved.get("num_heads") != mine.get("num_heads"):
        raise CheckpointError(f"{path}: was trained with {saved.get('num_heads')} heads, the model "
                              f"has {mine.get('num_heads')} (pass --num_heads {saved.get('num_heads')})")
    if saved and mine and "last_block_heads" in saved and \
            saved["last_block_heads"] != mine.get("last_block_heads"):
        raise CheckpointError(f"{path}: its last block has {saved['last_block_heads'] or 'the usual'} "
                              f"heads (TinyMIM's adaptive block), the model's has "
                              f"{mine.get('last_block_heads') or 'the usual'}")
    missing = [k for k in own if k not in loaded]
    fatal = [k for k in missing if not k.startswith(tuple(allow_missing))]
    if fatal:
        raise CheckpointError(f"{path}: missing {len(fatal)} keys the model needs, first "
                              f"{fatal[0]!r} ({_group(fatal)})")
    model.load_state_dict(loaded, strict=False)  # every key was checked above
    report = LoadReport(list(loaded), missing, unexpected, notes)
    if verbose:
        print0(f"loaded {len(loaded)} tensors from {path}")
        for n in notes:
            print0(f"  {n}")
        if unexpected:
            print0(f"  unexpected (not used by this model): {_group(unexpected)}")
        if missing:
            print0(f"  missing (left as initialised): {_group(missing)}")
    return report


# Hugging Face transformers: ViTModel, ViTForImageClassification, ViTMAEModel and
# ViTMAEForPreTraining. One table, read both ways by `hf_rename`: our name, transformers
# 4.x's, 5.x's (its modules; its save_pretrained writes 4.x's names, which both
# generations load, so export_hf.py writes those). '{}' is a block index; a row names a
# module, '.weight' / '.bias' follow. HF's q, k, v are three Linears; ours are one
# attn.qkv with rows [q; k; v], each head-major as HF's view(heads, head_dim) reads them.
_HF_BLOCK = (("norm1", "layernorm_before", "layernorm_before"),
             ("attn.q", "attention.attention.query", "attention.q_proj"),
             ("attn.k", "attention.attention.key", "attention.k_proj"),
             ("attn.v", "attention.attention.value", "attention.v_proj"),
             ("attn.proj", "attention.output.dense", "attention.o_proj"),
             ("norm2", "layernorm_after", "layernorm_after"),
             ("mlp.fc1", "intermediate.dense", "mlp.fc1"),
             ("mlp.fc2", "output.dense", "mlp.fc2"))
_HF_TOP = (("cls_token", "vit.embeddings.cls_token"),
           ("pos_embed", "vit.embeddings.position_embeddings"),  # ViTMAE's sin-cos is stored too
           ("patch_embed.proj", "vit.embeddings.patch_embeddings.projection"),
           ("norm", "vit.layernorm"), ("head", "classifier"),
           ("decoder_embed", "decoder.decoder_embed"), ("mask_token", "decoder.mask_token"),
           ("decoder_pos_embed", "decoder.decoder_pos_embed"),
           ("decoder_norm", "decoder.decoder_norm"), ("decoder_pred", "decoder.decoder_pred"))
HF_NAMES = [(ours, hf, hf) for ours, hf in _HF_TOP] + [
    (f"{ours}.{{}}.{a}", f"{hf4}.{{}}.{b}", f"{hf5}.{{}}.{c}")
    for ours, hf4, hf5 in (("blocks", "vit.encoder.layer", "vit.layers"),
                           ("decoder_blocks", "decoder.decoder_layers", "decoder.decoder_layers"))
    for a, b, c in _HF_BLOCK]
HF_PATCH = "embeddings.patch_embeddings.projection.weight"  # marks a transformers ViT-like model
# config.json fields: ours <- theirs. The head counts are the ones the weights cannot show.
HF_CONFIG = (("embed_dim", "hidden_size"), ("depth", "num_hidden_layers"),
             ("num_heads", "num_attention_heads"), ("patch_size", "patch_size"),
             ("img_size", "image_size"), ("in_chans", "num_channels"),
             ("decoder_embed_dim", "decoder_hidden_size"),
             ("decoder_depth", "decoder_num_hidden_layers"),
             ("decoder_num_heads", "decoder_num_attention_heads"),
             ("norm_pix_loss", "norm_pix_loss"), ("mask_ratio", "mask_ratio"))


def hf_rename(key, to_hf=False):
    """One key through HF_NAMES: a transformers name (either generation) -> ours, or with
    to_hf ours -> transformers 4.x's. None when no row matches."""
    for ours, hf4, hf5 in HF_NAMES:
        for src, dst in ([(ours, hf4)] if to_hf else [(hf4, ours), (hf5, ours)]):
            pattern = re.escape(src).replace(r"\{\}", r"(?P<i>\d+)") + r"(?P<end>\.weight|\.bias)?"
            if m := re.fullmatch(pattern, key):
                return dst.replace("{}", m.groupdict().get("i") or "") + (m["end"] or "")
    return None


def from_hf(sd, name):
    """A transformers ViT / ViTMAE state_dict in either generation's names -> ours, with
    q, k, v fused. Keys no row maps (ViTModel's tanh pooler) keep their names, so
    `load_pretrained` reports them as unexpected; an unknown key inside a block means
    another model type and is refused."""
    prefix = next(k[:-len(HF_PATCH)] for k in sd if k.endswith(HF_PATCH))
    if prefix not in ("", "vit."):  # deit., swin., beit., ...
        raise CheckpointError(f"{name}: a Hugging Face '{prefix.rstrip('.')}' model; only ViT and "
                              f"ViTMAE (keys under vit. or bare) are read")
    out = {}
    for k, v in sd.items():
        k = ("vit." + k if not prefix else k).replace(  # ViT(MAE)Model saved alone: no 'vit.'
            "decoder.decoder_encoder.layer.", "decoder.decoder_layers.")  # 5.x writes this
        ours = hf_rename(k)
        in_block = re.match(r"(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers)\.\d+\.", k)
        if ours is None and in_block:
            raise CheckpointError(f"{name}: {k} is not part of a ViT block (another Hugging Face "
                                  f"model type?)")
        out[ours or k] = v
    for key in [k for k in out if k.endswith(".attn.q.weight")]:
        base = key[:-len("q.weight")]  # blocks.3.attn.
        for end in (".weight", ".bias"):
            parts = [out.pop(f"{base}{c}{end}", None) for c in "qkv"]
            if end == ".bias" and all(p is None for p in parts):  # config qkv_bias=False
                parts = [torch.zeros_like(out[base + "qkv.weight"][:, 0])]  # the same as no bias
            elif any(p is None for p in parts):
                raise CheckpointError(f"{name}: {base}q/k/v{end}: one of the three is missing")
            out[f"{base}qkv{end}"] = torch.cat(parts)
    return out


def read_hf_dir(path):
    """A transformers save_pretrained directory (config.json + model.safetensors or
    pytorch_model.bin) of a ViT or ViTMAE -> {'model': state_dict in our names,
    'model_config': what config.json records, in our names}. The head counts then come
    from config.json; a width, depth, patch or image size that disagrees with the
    weights is refused."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: a directory without config.json; give a checkpoint file "
                              f"or a Hugging Face save_pretrained directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if hf.get("model_type") not in ("vit", "vit_mae"):
        raise CheckpointError(f"{cfg_file}: model_type {hf.get('model_type')!r}; only Hugging Face "
                              f"ViT ('vit') and ViTMAE ('vit_mae') are read")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{cfg_file}: hidden_act {hf['hidden_act']!r}; the ViT here uses "
                              f"exact GELU ('gelu')")
    weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin")
                    if (path / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: has config.json but no model.safetensors or "
                              f"pytorch_model.bin")
    sd = read_state_dict(load_checkpoint(weights), name=str(weights))
    arch = infer_vit_config({"model": sd}, name=str(weights))
    config = {}
    for ours, theirs in HF_CONFIG:
        if theirs not in hf:
            continue
        value = hf[theirs]
        value = value[0] if isinstance(value, list) and len(set(value)) == 1 else value  # [224, 224]
        if ours in arch and "num_heads" not in ours and arch[ours] != value:
            raise CheckpointError(f"{cfg_file}: {theirs} is {value}, the weights in {weights.name} "
                                  f"have {arch[ours]}")
        config[ours] = value
    return {"model": sd, "model_config": config}


# ----------------------------------------------------------------------------
# Optimization


def cosine_lr(epoch, lr, min_lr, warmup_epochs, epochs):
    """lr at a fractional epoch: linear warmup from 0, then half-cosine down to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Tokens and position embeddings are never weight-decayed (nor are biases / norms).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token")


def vit_layer_id(name, depth):
    """MAE's layer ids for lr decay: embeddings 0, blocks.i -> i+1, everything else depth+1."""
    if name.split(".")[0] in ("cls_token", "pos_embed", "patch_embed", "mask_token"):
        return 0
    m = re.match(r"blocks\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else depth + 1


def param_groups(model, weight_decay, layer_decay=None):
    """AdamW parameter groups. No weight decay on 1-D parameters (biases, norms) and on
    tokens / position embeddings. With layer_decay, each group carries
    lr_scale = layer_decay ** (depth + 1 - layer_id) (MAE's fine-tuning recipe)."""
    depth = len(model.blocks) if layer_decay is not None else 0
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES
        layer = vit_layer_id(name, depth) if layer_decay is not None else 0
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "names": [], "lr_scale": scale,
                           "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


def make_adamw(groups, lr, betas, device):
    """AdamW; the fused CUDA kernel when on GPU."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def effective_lr(args, world_size):
    """lr = blr * effective batch / 256 unless --lr is given (MAE's scaling rule)."""
    eff = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff / 256
    print0(f"effective batch {eff} = {args.batch_size} per process x {args.accum_iter} "
           f"accumulation x {world_size} processes; base lr {args.blr:.3g}, lr {args.lr:.3g}")
    return args.lr


def amp_setup(precision, device):
    """-> (autocast context factory, GradScaler or None). 'auto': bf16 on CUDA, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if precision == "fp32":
        return nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


# ----------------------------------------------------------------------------
# Data

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SyntheticShapes(Dataset):
    """Built-in offline data: a coloured shape on a grey textured background, 8 classes.
    The class is the shape AND a band of hues: class c's shape has hue (c + u) / 8 with u
    uniform in [-0.6, 0.6], so neighbouring bands overlap and colour alone gets a model most
    of the way (a ViT-Tiny from scratch reaches ~70% in one epoch of 2048 images) while the
    shape settles the rest. Texture, position, size and a small rotation are random.
    Deterministic by (seed, split, index). Returns (PIL image, label) like torchvision."""

    classes = ("disk", "square", "triangle", "ring", "cross", "diamond", "bar", "x")

    def __init__(self, num_samples=2048, image_size=224, seed=0, split="train", transform=None):
        self.num_samples, self.size, self.seed, self.split = num_samples, image_size, seed, split
        self.transform = transform
        ax = torch.linspace(-1, 1, image_size)
        self.yy, self.xx = torch.meshgrid(ax, ax, indexing="ij")

    def __len__(self):
        return self.num_samples

    @staticmethod
    def level(label, u, v):
        """< 1 inside the shape, in the shape's own coordinates (u, v)."""
        au, av = u.abs(), v.abs()
        if label == 0:
            return (u * u + v * v).sqrt()
        if label == 1:
            return torch.maximum(au, av) / 0.8
        if label == 2:
            return torch.maximum(2 * v, 1.732 * au - v)
        if label == 3:
            return ((u * u + v * v).sqrt() - 0.72).abs() / 0.28
        if label == 4:
            return torch.minimum(torch.maximum(au / 0.3, av), torch.maximum(au, av / 0.3))
        if label == 5:
            return au + av
        if label == 6:
            return torch.maximum(au, av / 0.35)
        d, e = (u + v).abs() / 1.414, (u - v).abs() / 1.414  # the cross turned by 45 degrees
        return torch.minimum(torch.maximum(d / 0.25, e), torch.maximum(d, e / 0.25))

    @staticmethod
    def hsv(h, s, v):
        """One colour from hue, saturation, value in [0, 1] -> (3, 1, 1) RGB."""
        k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6) % 6
        return (v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)).view(3, 1, 1)

    def __getitem__(self, index):
        from PIL import Image
        g = torch.Generator().manual_seed(stable_seed(self.seed, self.split, index))
        rand = partial(torch.rand, generator=g)
        label = index % len(self.classes)
        x, y, S = self.xx, self.yy, self.size
        # Background: two greyish colours blended by an oriented grating and smooth blobs.
        theta, freq, phase = rand(3) * torch.tensor([math.pi, 6.0, 2 * math.pi])
        grating = 0.5 + 0.5 * torch.sin((2 + freq) * math.pi * (x * theta.cos() + y * theta.sin()) + phase)
        blobs = F.interpolate(rand(1, 1, 4, 4), size=(S, S), mode="bilinear", align_corners=False)[0, 0]
        t = 0.25 + 0.5 * (0.6 * grating + 0.4 * blobs)
        c1 = (0.25 + 0.5 * rand(1)) + 0.15 * (rand(3, 1, 1) - 0.5)
        c2 = (0.25 + 0.5 * rand(1)) + 0.15 * (rand(3, 1, 1) - 0.5)
        img = c1 * (1 - t) + c2 * t  # (3, S, S)
        # The shape: random centre, size and a rotation of +-20 degrees (a square never
        # turns into a diamond), a ~1 px soft edge, a hue from the class's band.
        cx, cy = (rand(2) - 0.5) * 0.7
        size = 0.4 + 0.3 * rand(1)
        ang = (rand(1) - 0.5) * (math.pi / 4.5)
        u = ((x - cx) * ang.cos() + (y - cy) * ang.sin()) / size
        v = (-(x - cx) * ang.sin() + (y - cy) * ang.cos()) / size
        alpha = ((1 - self.level(label, u, v)) * size * S / 4 + 0.5).clamp(0, 1)
        hue, sat, val = rand(3).tolist()
        fg = self.hsv((label + (hue - 0.5) * 1.2) / len(self.classes) % 1.0, 0.7 + 0.3 * sat, 0.75 + 0.25 * val)
        img = img * (1 - alpha) + fg * alpha + 0.03 * torch.randn(3, S, S, generator=g)
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        img = Image.fromarray(arr)
        return (self.transform(img) if self.transform else img), label


def build_dataset(args, train, transform=None):
    """The dataset named by --dataset / --data_path for the train or val split.

    'auto': an ImageFolder root if --data_path is given (ImageNet layout: train/ and
    val/ with one folder per class), else the built-in synthetic data.
    'cifar10' / 'cifar100' and the downstream sets of DOWNSTREAM: torchvision's, stored
    under --data_path (default ./data), fetched only with --download. A corrupt image in
    an ImageFolder stops the run with CorruptImageError naming the file (it is not
    skipped: every run must see the same images, and evaluation must count each one).
    Returns (dataset, num_classes).
    """
    from torchvision import datasets
    name = args.dataset
    if name == "auto":
        name = "imagefolder" if args.data_path else "synthetic"
    if name == "synthetic":
        seed = args.seed if train else args.seed + 1
        n = args.synthetic_samples if train else max(args.synthetic_samples // 4, 8)
        ds = SyntheticShapes(n, args.input_size, seed, "train" if train else "val", transform)
        return ds, len(ds.classes)
    if name == "imagefolder":
        if not args.data_path:
            raise ConfigError("--dataset imagefolder needs --data_path")
        root = Path(args.data_path) / ("train" if train else "val")
        if not Path(args.data_path).is_dir():
            raise ConfigError(f"--data_path {args.data_path}: no such directory")
        if not root.is_dir():
            raise ConfigError(f"--data_path {args.data_path}: no {root.name}/ folder (expected the "
                              f"ImageNet layout: {root.name}/<class>/<image>)")
        try:
            ds = datasets.ImageFolder(str(root), transform=transform, loader=read_rgb_image)
        except (OSError, RuntimeError) as e:  # empty, no class folders, unreadable
            raise ConfigError(f"--data_path {root}: {e}") from None
        return ds, len(ds.classes)
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        root = args.data_path or "./data"
        try:
            ds = cls(root, train=train, transform=transform, download=args.download)
        except RuntimeError as e:
            raise ConfigError(f"--dataset {name} under {root}: {e} (add --download to fetch it)") from None
        return ds, len(ds.classes)
    if name in DOWNSTREAM:
        cls_name, train_splits, test_split, needs_scipy = DOWNSTREAM[name]
        cls = getattr(datasets, cls_name)
        root = args.data_path or "./data"
        if needs_scipy and importlib.util.find_spec("scipy") is None:
            raise ConfigError(f"--dataset {name} needs scipy (torchvision reads its labels from "
                              f".mat files): python -m pip install scipy")
        hint = (" (add --download to fetch it)" if name != "cars" else
                f"; torchvision can no longer download Stanford Cars (its URL is gone): place it "
                f"under {root}/stanford_cars (devkit/, cars_train/, cars_test/, "
                f"cars_test_annos_withlabels.mat) and run without --download")
        try:
            parts = [cls(root, split=s, transform=transform, download=args.download)
                     for s in (train_splits if train else (test_split,))]
        except (RuntimeError, ValueError) as e:  # not found / StanfordCars' download refused
            detail = str(e).split(" You can use download=True")[0].rstrip(".")
            raise ConfigError(f"--dataset {name} under {root}: {detail}"
                              f"{hint if name == 'cars' or not args.download else ''}") from None
        ds = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
        return ds, len(parts[0].classes)
    raise ConfigError(f"unknown --dataset {name!r}; choose from auto, imagefolder, synthetic, "
                      f"cifar10, cifar100, {', '.join(DOWNSTREAM)}")


# Downstream classification sets (MAE-Lite's transfer study): torchvision class, the
# splits trained on, the split evaluated on, whether torchvision needs scipy to read the
# labels (.mat files). Flowers102 trains on train+val (1020 + 1020
# images) and tests on its 6149 test images, as MAE-Lite and most transfer studies do.
DOWNSTREAM = {
    "flowers102": ("Flowers102", ("train", "val"), "test", True),  # 102 classes
    "pets": ("OxfordIIITPet", ("trainval",), "test", False),  # 37 breeds, 3680 / 3669
    "aircraft": ("FGVCAircraft", ("trainval",), "test", False),  # 100 variants, 6667 / 3333
    "cars": ("StanfordCars", ("train",), "test", True),  # 196 classes, 8144 / 8041
}


class CorruptImageError(ConfigError):
    """An image file that cannot be decoded. A DataLoader worker's exception is re-raised
    in the main process with the worker's whole traceback as its message: keep only our
    own line, so the run still ends with one line naming the file."""

    def __init__(self, msg):
        ours = [line.split("CorruptImageError: ", 1)[1] for line in str(msg).splitlines()
                if "CorruptImageError: " in line]
        super().__init__(ours[-1] if ours else msg)


def read_rgb_image(path):
    """ImageFolder's loader (PIL, RGB) that fails with one line naming a corrupt file."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        detail = (str(e).splitlines() or [""])[0]
        raise CorruptImageError(f"{path}: cannot read this image ({type(e).__name__}: {detail}); "
                                f"delete or replace the file") from None


def pretrain_transform(input_size, min_scale=0.2):
    """MAE's pre-training augmentation: RandomResizedCrop(scale=(min_scale, 1), bicubic) + flip."""
    from torchvision.transforms import v2
    return v2.Compose([
        v2.RandomResizedCrop(input_size, scale=(min_scale, 1.0),
                             interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(input_size):
    """Resize to input_size / 0.875 (256 for 224), then a center crop (MAE's evaluation)."""
    from torchvision.transforms import v2
    return v2.Compose([
        v2.Resize(int(round(input_size / 0.875)), interpolation=v2.InterpolationMode.BICUBIC,
                  antialias=True),
        v2.CenterCrop(input_size),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, call set_epoch) that yields
    (index, epoch), so that SeededSamples can seed each sample's randomness."""

    def __iter__(self):
        return ((i, self.epoch) for i in super().__iter__())


class SeededSamples(Dataset):
    """Wraps a dataset: sample `index` of epoch `epoch` is loaded and augmented under
    torch's RNG seeded by hash(seed, epoch, index). Returns (img, label, sample_seed);
    the same seed drives MAE's mask noise (`per_sample_uniform`). Crops and masks then
    do not depend on how many processes or workers share the epoch."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        s = stable_seed(self.seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            img, label = self.dataset[index]
        return img, label, s


def per_sample_uniform(seeds, n, device):
    """(B,) sample seeds -> (B, n) uniform noise; row b depends on seeds[b] alone."""
    g = torch.Generator()
    # XOR with a constant: a stream distinct from the one that drew the sample's crop.
    rows = [torch.rand(n, generator=g.manual_seed(int(s) ^ 0x5DEECE66D)) for s in seeds.tolist()]
    return torch.stack(rows).to(device, non_blocking=True)


def build_train_loader(dataset, args, dinfo):
    """Shuffled, sharded over processes, equal full batches on every rank (drop_last)."""
    sampler = EpochSampler(dataset, num_replicas=dinfo.world_size, rank=dinfo.rank,
                           shuffle=True, seed=args.seed)
    if len(sampler) < args.batch_size * args.accum_iter:
        raise ConfigError(f"the training set has {len(dataset)} images: fewer than one optimizer "
                          f"step (--batch_size {args.batch_size} x --accum_iter {args.accum_iter} "
                          f"x {dinfo.world_size} processes)")
    return DataLoader(SeededSamples(dataset, args.seed), batch_size=args.batch_size,
                      sampler=sampler, num_workers=args.num_workers, drop_last=True,
                      pin_memory=dinfo.device.type == "cuda",
                      persistent_workers=args.num_workers > 0)


# ----------------------------------------------------------------------------
# Shared command-line flags (the official MAE scripts' names)


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default="", help="ImageFolder root with train/ and val/ "
                   "(ImageNet layout), or where CIFAR is stored; empty: the built-in synthetic data")
    g.add_argument("--dataset", default="auto", choices=("auto", "imagefolder", "synthetic",
                                                         "cifar10", "cifar100", *DOWNSTREAM),
                   help="auto: imagefolder when --data_path is set, else synthetic; "
                   "flowers102/pets/aircraft/cars: torchvision's, under --data_path (./data)")
    g.add_argument("--download", action="store_true", help="let torchvision fetch CIFAR, "
                   "Flowers102, Pets or Aircraft (Stanford Cars can no longer be downloaded)")
    g.add_argument("--synthetic_samples", type=int, default=2048,
                   help="training images of the synthetic dataset (val: a quarter)")
    g.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    return g


def add_optim_args(parser, *, batch_size, epochs, warmup_epochs, blr, weight_decay, min_lr=0.0):
    g = parser.add_argument_group("optimization")
    g.add_argument("--batch_size", type=int, default=batch_size,
                   help="per process; effective batch = batch_size x accum_iter x processes")
    g.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--warmup_epochs", type=float, default=warmup_epochs)
    g.add_argument("--blr", type=float, default=blr, help="base lr: lr = blr x effective batch / 256")
    g.add_argument("--lr", type=float, default=None, help="absolute lr (overrides --blr)")
    g.add_argument("--min_lr", type=float, default=min_lr, help="floor of the cosine schedule")
    g.add_argument("--weight_decay", type=float, default=weight_decay)
    g.add_argument("--clip_grad", type=float, default=None, help="max grad norm (default: none)")
    return g


def add_run_args(parser, output_dir):
    g = parser.add_argument_group("run")
    g.add_argument("--output_dir", default=output_dir,
                   help="checkpoint.pth, log.txt and figures go here")
    g.add_argument("--resume", default="", help="checkpoint to continue from (default: "
                   "<output_dir>/checkpoint.pth if it exists)")
    g.add_argument("--save_every", type=int, default=0,
                   help="also keep checkpoint-<epoch>.pth every N epochs (0: only the latest)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 adds a GradScaler")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--print_freq", type=int, default=20,
                   help="steps between progress-bar updates (each one syncs with the GPU)")
    return g


def check_common_args(args):
    for flag in ("batch_size", "accum_iter", "epochs", "input_size"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup_epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")


# ----------------------------------------------------------------------------
# Training loop and logging


def peak_memory_mb(device):
    """Peak CUDA memory allocated by tensors, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_one_epoch(model, loader, optimizer, epoch, args, step_fn, device, autocast=nullcontext,
                    scaler=None):
    """One epoch of `loss, terms = step_fn(model, batch)` with the per-iteration lr
    schedule, accumulation (no_sync on all but the last micro-batch), optional grad
    clipping and fp16 scaling. Returns the epoch's mean loss and terms over all ranks,
    lr, throughput and peak memory. Raises NonFiniteLossError on a NaN/inf loss
    (checked at each progress update and at the end) before anything is saved."""
    model.train(True)
    # Drop path, mixup and the like draw from the global RNG: reseed it from (seed, epoch,
    # rank) so a resumed run draws what the uninterrupted one drew, without saving RNG state.
    torch.manual_seed(stable_seed(args.seed, "epoch", epoch, dist.get_rank() if dist.is_initialized() else 0))
    accum = args.accum_iter
    steps = len(loader) // accum
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sums, count, images, t0 = {}, 0, 0, time.time()
    bar = tqdm(total=steps * accum, desc=f"epoch {epoch}", disable=not is_main_process(),
               dynamic_ncols=True, leave=False)
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(loader):
        if i >= steps * accum:
            break  # a trailing partial accumulation group is skipped
        if i % accum == 0:
            lr = cosine_lr(epoch + i / len(loader), args.lr, args.min_lr, args.warmup_epochs,
                           args.epochs)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
        last_micro = (i + 1) % accum == 0
        sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last_micro \
            else nullcontext()
        with sync:
            with autocast():
                loss, terms = step_fn(model, batch)
            scaled = loss / accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if last_micro:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for k, v in {"loss": loss, **terms}.items():  # running sums stay on the device
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        count += 1
        images += batch[0].shape[0]
        bar.update(1)
        if (i + 1) % args.print_freq == 0 or i + 1 == steps * accum:
            # All ranks check the same global mean, so they stop together (a rank that
            # stopped alone would leave the others blocked in the next all-reduce).
            mean_loss = (all_reduce_sum(sums["loss"].clone()) / (count * dist_world())).item()
            if not math.isfinite(mean_loss):
                bar.close()
                raise NonFiniteLossError(f"loss is {mean_loss} at epoch {epoch}, step {i + 1}; "
                                         f"stopping. {_last_good(args)}")
            rate = images * dist_world() / (time.time() - t0)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
    bar.close()
    elapsed = time.time() - t0
    stats = torch.stack([sums[k] for k in sums] + [torch.tensor(float(count), device=device)])
    stats = all_reduce_sum(stats.to(device))
    stats = {k: (stats[j] / stats[-1]).item() for j, k in enumerate(sums)}
    if not all(math.isfinite(v) for v in stats.values()):
        raise NonFiniteLossError(f"non-finite loss in epoch {epoch} ({stats}); stopping. "
                                 f"{_last_good(args)}")
    stats.update(lr=lr, img_per_s=images * dist_world() / elapsed, epoch_time_s=elapsed,
                 peak_mem_mb=peak_memory_mb(device))
    return stats


def _last_good(args):
    path = Path(args.output_dir) / "checkpoint.pth"
    return (f"{path} still holds the last good epoch" if path.is_file()
            else "No checkpoint was written.")


def dist_world():
    return dist.get_world_size() if dist.is_initialized() else 1


def log_stats(output_dir, stats):
    """Append one JSON object per line to <output_dir>/log.txt (rank 0), as MAE does."""
    if is_main_process():
        with open(Path(output_dir) / "log.txt", "a") as f:
            f.write(json.dumps(stats) + "\n")
