"""Shared plumbing for every stage, and nothing that teaches a method.

- Distributed: torchrun's environment -> NCCL on CUDA, gloo on CPU; plain `python` runs
  with no process group. `print0` prints on rank 0.
- Errors: `UserError` and its kinds end a run with one line and exit status 1; Ctrl-C
  with one line saying which epoch checkpoint.pth holds, and status 130.
- Checkpoints: atomic saves (temp file + rename), `weights_only=True` loads, a reader
  for the formats in the wild (`read_state_dict`, Hugging Face layouts included) and
  `load_pretrained`, which maps, checks and reports every key. A resume refuses flags
  that would change the model or the method.
- Optimization: `cosine_lr` (per-iteration warmup + half-cosine) and `param_groups`
  (no weight decay on 1-D params and tokens; MAE's layer-wise lr decay).
- Data: ImageFolder / CIFAR / a built-in synthetic dataset. Every training sample is
  augmented under an RNG seeded by (seed, epoch, index), and MAE's mask noise comes
  from the same per-sample seed, so a run gives the same batches whatever the number
  of processes or workers, and a resumed run continues exactly. Workers decode, crop
  and flip in one step and send uint8; the device normalises (or, with --gpu_decode,
  decodes JPEG bytes itself).
- The training loop shared by the training stages: accumulation under no_sync,
  autocast, non-finite-loss and non-finite-weight stop, a tqdm bar, one JSON line per
  epoch in log.txt, and no host sync per step outside the progress updates. `benchmark`
  (--benchmark / --benchmark_data) measures instead of training.
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
import traceback
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
    """The loss or the weights became NaN or infinite; nothing is saved from that epoch."""


def run_main(main, parser):
    """Parse arguments and run `main(args)`. A UserError ends it with one line on stderr and
    exit status 1; Ctrl-C with one line saying what checkpoint.pth holds and status 130."""
    args = parser.parse_args()
    code = 0
    try:
        main(args)
    except (UserError, KeyboardInterrupt, dist.DistBackendError) as e:
        for bar in list(getattr(tqdm, "_instances", ())):  # a bar left open by an error raised
            bar.close()  # mid-epoch (a corrupt image) would otherwise share the message's line
        if isinstance(e, KeyboardInterrupt):
            print(f"interrupted. {last_good(args)}", file=sys.stderr, flush=True)
            code = 130
        elif isinstance(e, dist.DistBackendError):  # a peer process stopped: its own line says why
            print(f"error: lost contact with another process ({(str(e).splitlines() or [''])[0][:120]})",
                  file=sys.stderr, flush=True)
            code = 1
        else:
            print(f"error: {e}", file=sys.stderr, flush=True)
            code = 1
    except BaseException:
        if not dist.is_initialized():
            raise
        traceback.print_exc()  # a bug: the whole traceback, then the same clean exit below
        code = 1
    finish(code)


def finish(code):
    """End the process with `code`. With a process group: destroy it, flush, and leave with
    os._exit, skipping the interpreter's teardown. torch keeps the default gloo group alive
    past destroy_process_group when torch._dynamo was imported after init (torchvision and
    torch.compile import it), and its worker threads, still releasing the last collective's
    tensors, then abort the process at teardown ("terminate called without an active
    exception", SIGABRT) on a busy machine. Everything the run writes is closed or fsynced
    by then."""
    if dist.is_initialized():
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


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
    """argparse.Namespace -> dict of plain data (safe for weights_only loading). Attributes
    starting with '_' are the run's bookkeeping, not flags, and are left out."""
    ok = (str, int, float, bool, type(None))
    out = {}
    for k, v in vars(args).items():
        if k.startswith("_"):
            continue
        if isinstance(v, (list, tuple)):
            v = [x if isinstance(x, ok) else str(x) for x in v]
        out[k] = v if isinstance(v, ok + (list,)) else str(v)
    return out


def save_checkpoint(path, state):
    """Write atomically: a temp file in the same folder, fsync, then rename over `path`.
    A kill at any moment leaves either the old complete file or the new one (a stale
    temp file is removed by the next run, prepare_output_dir). The file gets the umask's
    permissions, as log.txt does. A failed write (disk full) is a one-line CheckpointError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"cannot write {path} ({e.strerror or e}); "
                                  f"{'the previous one is intact' if path.exists() else 'nothing was saved'}") from None
        raise


def prepare_output_dir(args):
    """Before any training: --output_dir must be a writable directory (checked by writing
    to it), and temp files left by a save that was killed mid-write are removed."""
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"--output_dir {out}: cannot write there ({e.strerror or e})") from None
    if is_main_process():
        for tmp in out.glob("*.pth.*.tmp"):
            tmp.unlink(missing_ok=True)
    return out


def load_checkpoint(path):
    """torch.load with weights_only=True (a checkpoint from the internet cannot run code).
    argparse.Namespace is allow-listed because MAE's own training checkpoints store one."""
    path = Path(path)
    if path.is_dir():  # a Hugging Face save_pretrained directory
        import export_hf  # the Hugging Face reader lives with the writer
        return export_hf.read_hf_dir(path)
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
        # torch names the Python object the pickle asks for: "Unsupported global: GLOBAL x.y"
        # (a class) or "unsupported GLOBAL posix.system whose module posix is blocked".
        blocked = re.search(r"GLOBAL\s+([\w.]+)", text)
        if blocked:
            raise CheckpointError(f"{path}: holds Python objects other than tensors ({blocked.group(1)}): "
                                  f"unpickling it would run code, so it was refused (load it with "
                                  f"weights_only=False only if you trust its source)") from None
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        detail = detail.group(1).strip() if detail else (text.strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or the file is corrupt "
                              f"({type(e).__name__}: {detail[:200]})") from None


def first_non_finite(named_tensors):
    """Name of the first floating tensor holding NaN / inf, or values so large (|w| > 1.8e19)
    that their squares overflow float32 (a LayerNorm or an MSE over them gives inf; `--lr
    1e37` leaves such weights after one step). None when all are fine."""
    for k, v in named_tensors:
        if v.is_floating_point() and not torch.isfinite(v.detach().float().square()).all():
            return k
    return None


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
    bad = first_non_finite(state_dict.items())
    if bad:
        raise CheckpointError(f"{path}: {bad} holds NaN or infinite values; the checkpoint is unusable")
    model.load_state_dict(state_dict)


# Flags a resumed run must keep: they define the model or the method. Each stage names
# its own; these are the ones every stage has.
FIXED_ON_RESUME = ("model", "input_size", "patch_size", "num_heads")


def same_flag(flag, old, new):
    """Flag values equal; paths (--teacher, --finetune) equal when they name the same file."""
    if old == new:
        return True
    if flag in ("teacher", "finetune") and old and new and Path(old).exists() and Path(new).exists():
        return os.path.samefile(old, new)
    return False


def check_resumed_args(args, saved, path, fixed):
    """A resumed run must not change what defines the model or the method (`fixed` flags):
    refuse with one line. Other changes (batch size, lr, epochs) are allowed and listed."""
    where = "" if args.resume else f" (found in --output_dir {args.output_dir})"
    new = plain_args(args)
    for flag in fixed:
        if flag in saved and flag in new and not same_flag(flag, saved[flag], new[flag]):
            was, now = ("(not given)" if v is None else v for v in (saved[flag], new[flag]))
            raise ConfigError(f"{path}{where} was trained with --{flag} {was}, this run has "
                              f"--{flag} {now}: a resumed run must keep the flags that define "
                              f"the model and the method (use another --output_dir for a new run)")
    changed = [f"--{k} {saved[k]} -> {v}" for k, v in new.items()
               if k in saved and k not in ("resume", "lr") and saved[k] != v]
    if changed:
        print0(f"resuming {path}{where} with changed flags: {', '.join(changed)}")


def resume_checkpoint(args, model, optimizer, scaler=None, fixed=FIXED_ON_RESUME):
    """Restore a run from --resume, or from <output_dir>/checkpoint.pth when it exists
    (a requeued job continues with the same command). The flags in `fixed` must equal the
    checkpoint's. Returns (first epoch to run, the checkpoint dict or None) so a stage can
    restore entries of its own (an EMA, a best score)."""
    path = args.resume or (Path(args.output_dir) / "checkpoint.pth")
    args._args_history = []
    if not args.resume and not Path(path).is_file():
        return 0, None
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry; --resume takes a training checkpoint")
    if isinstance(ckpt.get("args"), dict):  # this project's checkpoint: the run's flags
        check_resumed_args(args, ckpt["args"], path, fixed)
        args._args_history = list(ckpt.get("args_history") or [ckpt["args"]])
    load_state_strict(model, ckpt["model"], path)
    if "optimizer" in ckpt and "epoch" in ckpt:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from None
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if Path(path).resolve() == (Path(args.output_dir) / "checkpoint.pth").resolve():
            args._saved_epoch = ckpt["epoch"]  # what a stop message reports
        print0(f"resumed {path}: epoch {ckpt['epoch']} done, continuing at {ckpt['epoch'] + 1}")
        return ckpt["epoch"] + 1, ckpt
    print0(f"loaded weights only from {path} (no optimizer state / epoch): starting at epoch 0")
    return 0, ckpt


def save_training_state(args, model, optimizer, scaler, epoch, extra=None):
    """Rank 0 writes <output_dir>/checkpoint.pth (always the latest complete epoch) and,
    every --save_every epochs, a kept copy checkpoint-<epoch>.pth. `extra`: more entries
    for the same file (an EMA model, the best accuracy so far). 'args' holds this run's
    flags, 'args_history' those of every start of the run (a resumed run appends)."""
    if is_main_process():
        model = unwrap(model)
        history = getattr(args, "_args_history", [])
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "epoch": epoch, "args": plain_args(args), "args_history": history + [plain_args(args)],
                 "model_config": getattr(model, "config", None), **(extra or {})}
        out = Path(args.output_dir)
        save_checkpoint(out / "checkpoint.pth", state)
        every = getattr(args, "save_every", 0)
        if every and ((epoch + 1) % every == 0 or epoch + 1 == args.epochs):
            save_checkpoint(out / f"checkpoint-{epoch}.pth", state)
    args._saved_epoch = epoch


def last_good(args):
    """What <output_dir>/checkpoint.pth holds, for the message of a stopped run."""
    epoch = getattr(args, "_saved_epoch", None)
    if epoch is None:
        return "No checkpoint was written."
    path = Path(args.output_dir) / "checkpoint.pth"
    return f"{path} still holds the last good epoch ({epoch}): rerun the same command to continue"


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
    transformers ViT / ViTMAE (`export_hf.from_hf`). Keys outside the prefix (a VideoMAE decoder,
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
    import export_hf  # the Hugging Face reader
    if any(k.endswith(export_hf.HF_PATCH) for k in sd):  # a transformers ViT / ViTMAE: renamed, q, k, v fused
        sd = export_hf.from_hf(sd, name)
    prefix = next((p for p in PREFIXES if p + "patch_embed.proj.weight" in sd), None)
    if prefix is None:
        raise CheckpointError(f"{name}: unknown layout: no ViT patch_embed.proj.weight under any "
                              f"known prefix (first keys: {list(sd)[:4]})")
    sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}

    for k in [k for k in sd if k.endswith("attn.q_bias")]:  # BEiT / VideoMAE attention bias
        q, v = sd.pop(k), sd.pop(k.replace("q_bias", "v_bias"))
        sd[k.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
    sd = move_d2_extra_block(sd)
    if "dist_token" in sd:  # DeiT-distilled / TinyMIM*-T: rows are [cls, dist, patches...]
        sd.pop("dist_token")
        pe = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
    if checkpoint_family(sd) == "Hiera":  # timm's Hiera: head.norm, head.fc = official norm, head.projection
        sd = {re.sub(r"^head\.norm\.", "norm.", re.sub(r"^head\.fc\.", "head.projection.", k)): v
              for k, v in sd.items()}
    return sd


# D²-MAE's attention-only extra block (distill_pretrain.py --method d2) and where MAE-Lite's
# pre-training decoded pixels from (mae_lite_distill_d2_exp.py: decode_idx 8).
D2_EXTRA_BLOCK, D2_DECODE_LAYER = "distill.extra_block.", 8


def move_d2_extra_block(sd):
    """MAE-Lite's official D²-MAE checkpoint (mae_tiny_distill_d2_400e.pth.tar) has a 13th
    block with only norm1 and attn.qkv: the attention-only block that took the teacher's
    attention during pre-training, not part of the 12-block backbone. Its keys move to
    distill.extra_block.{norm1, qkv}.*, where this project's d2 students keep it, so a loader
    reports it as unused instead of refusing a depth mismatch."""
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    last = f"blocks.{depth - 1}."
    attention_only = {f"{last}{n}.{w}" for n in ("norm1", "attn.qkv") for w in ("weight", "bias")}
    if depth < 2 or {k for k in sd if k.startswith(last)} != attention_only:
        return sd
    return {(D2_EXTRA_BLOCK + k[len(last):].replace("attn.", "") if k.startswith(last) else k): v
            for k, v in sd.items()}


def checkpoint_family(sd):
    """'Hiera' if a block changes width (official / timm Hiera: blocks.i.proj), else 'ViT'."""
    return "Hiera" if any(re.fullmatch(r"blocks\.\d+\.proj\.weight", k) for k in sd) else "ViT"


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
    if checkpoint_family(sd) == "Hiera":
        raise CheckpointError(f"{name}: is a Hiera checkpoint, not a ViT (hiera.infer_hiera_config reads it)")
    saved = (obj.get("model_config") if isinstance(obj, dict) else None) or {}
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4:  # VideoMAE / AMD video models embed tubelets with a Conv3d
        raise CheckpointError(f"{name}: patch_embed.proj.weight has shape {tuple(w.shape)}, not the "
                              f"(D, C, p, p) of an image ViT (a video model?)")
    D, C, p, _ = w.shape
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if "blocks.0.mlp.fc1.weight" not in sd:
        raise CheckpointError(f"{name}: has no blocks.0.mlp.fc1.weight (a partial checkpoint? "
                              f"found {len(sd)} tensors: {_group(list(sd))[:160]})")
    depth = 1 + max(blocks)
    grid = math.isqrt(sd["pos_embed"].shape[1] - 1) if "pos_embed" in sd else None
    if grid is not None and grid * grid != sd["pos_embed"].shape[1] - 1:
        raise CheckpointError(f"{name}: pos_embed has {sd['pos_embed'].shape[1]} rows: not a cls "
                              f"row plus a square grid of patches")
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
                   decoder_num_heads=saved.get("decoder_num_heads") or max(1, Dd // 32),
                   # the block whose output the decoder reads: D²-MAE's 8, else the last
                   decode_layer=saved.get("decode_layer") or (
                       D2_DECODE_LAYER if D2_EXTRA_BLOCK + "qkv.weight" in sd else depth))
    return cfg


def load_pretrained(model, path, allow_missing=None, verbose=True, name=None, check_heads=True):
    """Load any known checkpoint format into `model` (a ViT or an MAE), checking every key.

    - pos_embed / decoder_pos_embed of another grid are interpolated (bicubic);
    - a head of another size is dropped (the model keeps its fresh head);
    - keys the model does not have (a decoder, a teacher, `norm` for a mean-pooled
      model) are reported as unexpected and skipped;
    - missing keys outside `allow_missing` (prefixes; default: the model's `head_prefixes`,
      else head. and fc_norm.), a depth or shape mismatch, a Hiera file for a ViT or back:
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
    family, want_family = checkpoint_family(sd), checkpoint_family(own)
    if family != want_family:
        raise CheckpointError(f"{path}: is a {family} checkpoint, the model is a {want_family}")
    if allow_missing is None:
        allow_missing = getattr(model, "head_prefixes", ("head.", "fc_norm."))
    prefix = getattr(model, "num_prefix_tokens", 1)  # rows before the grid: ViT's cls, none in Hiera
    loaded, notes = {}, []
    for k, v in sd.items():
        if k not in own:
            continue
        want = own[k].shape
        if k.endswith("relative_position_index"):  # BEiT's index: fixed by the grid, not learnt
            if v.shape == want and not torch.equal(v, own[k]):
                raise CheckpointError(f"{path}: {k} is not BEiT's relative-position index for this grid")
            continue  # the model's own is used
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{path}: {k} holds NaN or infinite values; the checkpoint is unusable")
        if k.endswith("pos_embed") and v.shape != want and v.shape[-1] == want[-1]:
            old, new = math.isqrt(v.shape[1] - prefix), math.isqrt(want[1] - prefix)
            try:
                v = interpolate_pos_embed(v, new, num_prefix_tokens=prefix)
            except ValueError as e:
                raise CheckpointError(f"{path}: {k}: {e}") from None
            notes.append(f"{k} interpolated from a {old}x{old} to a {new}x{new} grid")
        if v.shape != want:
            if k.startswith("head."):
                notes.append(f"{k} {tuple(v.shape)} dropped: the model's head is {tuple(want)}")
                continue
            hint = {"patch_embed.proj.weight": " (patch size or width differ)"}.get(k, "")
            if k.endswith("relative_position_bias_table"):
                hint = (" (a relative position bias for another patch grid: tables are not "
                        "interpolated, use the --input_size the checkpoint was trained at)")
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(want)}{hint}")
        loaded[k] = v
    unexpected = [k for k in sd if k not in own]
    if any(k.endswith("relative_position_bias_table") for k in unexpected) and \
            not any(k.endswith("relative_position_bias_table") for k in own):
        raise CheckpointError(f"{path}: has relative position bias tables (trained with --rel_pos_bias); "
                              f"this model has none and would compute other attention (add --rel_pos_bias)")
    if any(k.startswith(D2_EXTRA_BLOCK) for k in unexpected):
        depth = sum(1 for k in own if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k))
        notes.append(f"{D2_EXTRA_BLOCK}* is D²-MAE's attention-only block {depth + 1}, used only during "
                     f"pre-training: not part of the {depth}-block backbone, not used")
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
    missing = [k for k in own if k not in loaded and not k.endswith("relative_position_index")]
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


# ----------------------------------------------------------------------------
# Optimization


def cosine_lr(epoch, lr, min_lr, warmup_epochs, epochs):
    """lr at a fractional epoch: linear warmup from 0, then half-cosine down to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Tokens and position embeddings are never weight-decayed (nor are biases / norms).
# BEiT's relative position bias tables neither (timm's Beit.no_weight_decay; BEiT's
# --disable_weight_decay_on_rel_pos_bias); layer decay gives them their block's id.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token", "relative_position_bias_table")


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
    if args.min_lr > args.lr:
        raise ConfigError(f"--min_lr {args.min_lr:g} exceeds the lr {args.lr:g}: the cosine schedule "
                          f"would rise instead of decay")
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
        if device.type == "cuda":  # TF32 tensor cores for fp32 matmuls and convs (10-bit mantissa)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
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
    Returns (dataset, class names).
    """
    from torchvision import datasets
    name = args.dataset
    if name == "auto":
        name = "imagefolder" if args.data_path else "synthetic"
    if name == "synthetic":
        seed = args.seed if train else args.seed + 1
        n = args.synthetic_samples if train else max(args.synthetic_samples // 4, 8)
        ds = SyntheticShapes(n, args.input_size, seed, "train" if train else "val", transform)
        return ds, list(ds.classes)
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
            ds = image_folder(str(root), transform, open_image)
        except (OSError, RuntimeError) as e:  # empty, no class folders, unreadable
            raise ConfigError(f"--data_path {root}: {e}") from None
        if ds.skipped_links:
            print0(f"--data_path {root}: skipped {len(ds.skipped_links)} symlinked folder(s) whose "
                   f"images were already listed (a link loop?), first {ds.skipped_links[0]}")
        return ds, ds.classes
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        root = args.data_path or "./data"
        try:
            ds = cls(root, train=train, transform=transform, download=args.download)
        except RuntimeError as e:
            raise ConfigError(f"--dataset {name} under {root}: {e} (add --download to fetch it)") from None
        return ds, list(ds.classes)
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
        return ds, list(parts[0].classes)
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


def list_images_once(directory, class_to_idx, is_valid):
    """ImageFolder's listing (sorted folders, sorted names, symlinks followed: a subset can
    be a folder of links) that enters each real folder once, and never the split's root or
    another class's folder from inside a class. A link back up the tree would list the same
    images again and again: one `train/cat/loop -> ..` made 40 images 1640.
    Returns (samples [(path, class index)], the symlinked folders skipped)."""
    real = os.path.realpath
    seen = {real(directory)} | {real(os.path.join(directory, c)) for c in class_to_idx}
    samples, skipped = [], []
    for cls in sorted(class_to_idx):
        walk = []
        for root, dirs, files in os.walk(os.path.join(directory, cls), followlinks=True):
            walk.append((root, files))
            for d in list(dirs):
                if real(os.path.join(root, d)) in seen:
                    skipped.append(os.path.join(root, d))
                    dirs.remove(d)  # not entered: its images are listed elsewhere
                seen.add(real(os.path.join(root, d)))
        for root, files in sorted(walk):
            samples += [(os.path.join(root, f), class_to_idx[cls]) for f in sorted(files)
                        if is_valid(os.path.join(root, f))]
    return samples, skipped


def image_folder(root, transform, loader):
    """torchvision's ImageFolder listed by list_images_once (`skipped_links` on the dataset)."""
    from torchvision import datasets
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    class ImageFolder(datasets.ImageFolder):
        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                         allow_empty=False):
            samples, self.skipped_links = list_images_once(
                directory, class_to_idx,
                is_valid_file or (lambda f: has_file_allowed_extension(f, extensions or IMG_EXTENSIONS)))
            found = {t for _, t in samples}
            empty = sorted(c for c, i in class_to_idx.items() if i not in found)
            if empty and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
            return samples

    return ImageFolder(root, transform=transform, loader=loader)


class CorruptImageError(ConfigError):
    """An image file that cannot be decoded. A DataLoader worker's exception is re-raised
    in the main process with the worker's whole traceback as its message: keep only our
    own line, so the run still ends with one line naming the file."""

    def __init__(self, msg):
        ours = [line.split("CorruptImageError: ", 1)[1] for line in str(msg).splitlines()
                if "CorruptImageError: " in line]
        super().__init__(ours[-1] if ours else msg)


def open_image(path):
    """ImageFolder's loader, lazily: the header is read (size, format), the pixels are not,
    so the transform can ask PIL for a reduced-size JPEG decode (see DecodeCropFlip)."""
    from PIL import Image
    try:
        return Image.open(path)
    except Exception as e:
        raise corrupt_image(path, e) from None


def corrupt_image(path, e):
    detail = (str(e).splitlines() or [""])[0]
    return CorruptImageError(f"{path}: cannot read this image ({type(e).__name__}: {detail}); "
                             f"delete or replace the file")


def decode_rgb(img, min_size=None):
    """Decode a lazily opened PIL image to RGB. With min_size (w, h), a JPEG is decoded at
    the smallest of 1/1, 1/2, 1/4, 1/8 scale that is still at least that large (libjpeg
    skips the finer DCT coefficients: a 1/2-scale decode costs about a third). Returns
    (image, (sx, sy)): original pixels per decoded pixel."""
    size = img.size
    try:
        if min_size is not None and getattr(img, "format", None) == "JPEG":
            img.draft("RGB", (max(1, math.ceil(min_size[0])), max(1, math.ceil(min_size[1]))))
        rgb = img.convert("RGB")
    except Exception as e:
        raise corrupt_image(getattr(img, "filename", "") or "an image", e) from None
    return rgb, (size[0] / rgb.size[0], size[1] / rgb.size[1])


def crop_box(width, height, scale, ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop's box (left, top, w, h) for a width x height image, drawn from
    torch's global RNG (seeded per sample by SeededSamples): an area fraction in `scale`,
    a log-uniform aspect ratio in `ratio`, 10 tries, then the central crop that fits."""
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale).item()
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio.tolist()).item())
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return left, top, w, h
    w, h = width, height  # fallback: the central crop, clipped to the ratio range
    if width / height < ratio[0]:
        h = int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w = int(round(height * ratio[1]))
    return (width - w) // 2, (height - h) // 2, w, h


class DecodeCropFlip:
    """RandomResizedCrop (bicubic, antialiased) + horizontal flip as one step on a lazily
    opened image, ending in a uint8 (3, size, size) tensor (normalised later, on the device).

    The crop box is drawn from the image's header size before any pixel is decoded, so a
    JPEG whose crop is at least twice the output size is decoded at 1/2, 1/4 or 1/8 scale.
    The crop is then resized by torch's antialiased bicubic on uint8 in channels-last
    memory: 3.4x faster than PIL's resize on a 300 -> 224 crop (0.39 vs 1.34 ms), with Keys'
    a = -0.75 where PIL's bicubic has a = -0.5 (a slightly sharper kernel). `crop_box` and
    the flip draw torch's RNG in the same order in every path: the GPU decode path
    (EncodeCropFlip) and `crop` (PIL out, for RandAugment) get the same boxes."""

    def __init__(self, size, scale=(0.08, 1.0), flip=True):
        self.size, self.scale, self.flip = size, scale, flip

    def params(self, width, height):
        """(box (left, top, w, h), flip?) for an image of this size; consumes the RNG."""
        box = crop_box(width, height, self.scale)
        return box, self.flip and torch.rand(1).item() < 0.5

    def decode(self, img):
        """-> (box, flip, decoded RGB image, its box in decoded pixels (l, t, r, b) floats)."""
        from PIL import Image
        if torch.is_tensor(img):  # an already-decoded image (C, H, W)
            img = Image.fromarray(img.permute(1, 2, 0).numpy())
        (left, top, w, h), flip = self.params(*img.size)
        rgb, (sx, sy) = decode_rgb(img, (img.size[0] * self.size / w, img.size[1] * self.size / h))
        return flip, rgb, (left / sx, top / sy, (left + w) / sx, (top + h) / sy)

    def crop(self, img):
        """The crop as a PIL image (PIL's bicubic), for augmentations that run on PIL."""
        from PIL import Image
        flip, rgb, box = self.decode(img)
        out = rgb.resize((self.size, self.size), Image.BICUBIC, box=box)
        return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out

    def __call__(self, img):
        import numpy as np
        flip, rgb, (l, t, r, b) = self.decode(img)
        l, t = int(l), int(t)  # whole decoded pixels (exact unless the JPEG was decoded reduced)
        r, b = max(math.ceil(r), l + 1), max(math.ceil(b), t + 1)
        x = torch.from_numpy(np.asarray(rgb)[t:b, l:r].copy()).permute(2, 0, 1)  # (3, h, w), channels last
        x = F.interpolate(x[None], size=(self.size, self.size), mode="bicubic", antialias=True)[0]
        return x.flip(-1) if flip else x


def pil_to_uint8(img):
    """PIL RGB image -> (3, H, W) uint8 tensor (one copy)."""
    import numpy as np
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def pretrain_transform(input_size, min_scale=0.2):
    """MAE's pre-training augmentation: RandomResizedCrop(scale=(min_scale, 1), bicubic) + flip,
    as uint8 (3, input_size, input_size)."""
    return DecodeCropFlip(input_size, (min_scale, 1.0))


class EvalResizeCrop:
    """Resize the shorter side to input_size / 0.875 (256 for 224, bicubic), then a center
    crop (MAE's evaluation); a JPEG is decoded at the smallest DCT scale still large
    enough. -> uint8 (3, input_size, input_size)."""

    def __init__(self, input_size):
        self.size, self.resize = input_size, int(round(input_size / 0.875))

    def __call__(self, img):
        from PIL import Image
        if torch.is_tensor(img):
            img = Image.fromarray(img.permute(1, 2, 0).numpy())
        w, h = img.size
        s = self.resize / min(w, h)
        rgb, _ = decode_rgb(img, (w * s, h * s))
        nw, nh = max(self.resize, round(w * s)), max(self.resize, round(h * s))
        rgb = rgb.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - self.size) / 2)), int(round((nh - self.size) / 2))
        return pil_to_uint8(rgb.crop((left, top, left + self.size, top + self.size)))


def eval_transform(input_size):
    return EvalResizeCrop(input_size)


def normalize(imgs):
    """uint8 images (..., 3, H, W), on the device -> float32 with ImageNet's mean and std.
    The batch crossed the DataLoader, pinned memory and the PCIe bus as uint8: 4x fewer
    bytes than float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(3, 1, 1) * 255
    return (imgs.float() - mean) / std


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, call set_epoch) that yields
    (index, epoch), so that SeededSamples can seed each sample's randomness."""

    def __iter__(self):
        return ((i, self.epoch) for i in super().__iter__())


class SeededSamples(Dataset):
    """Wraps a dataset: sample `index` of epoch `epoch` is loaded and augmented under
    torch's RNG seeded by hash(seed, epoch, index), and its `noise` uniform numbers (MAE's
    mask noise: one per patch or mask unit) come from the same seed. Returns (img, label,
    noise (noise,)). Crops and masks then do not depend on how many processes or workers
    share the epoch, and are drawn in the worker, off the training loop's critical path."""

    def __init__(self, dataset, seed, noise=0):
        self.dataset, self.seed, self.noise = dataset, seed, noise

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        s = stable_seed(self.seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            img, label = self.dataset[index]
        return img, label, sample_noise(s, self.noise)


def sample_noise(seed, n):
    """(n,) uniform noise of one sample, from its seed alone. XOR with a constant: a stream
    distinct from the one that drew the sample's crop."""
    return torch.rand(n, generator=torch.Generator().manual_seed(int(seed) ^ 0x5DEECE66D))


@dataclass
class EncodedCrop:
    """What a worker sends for --gpu_decode: the file's JPEG bytes (1-D uint8) or, for a
    file that is not a JPEG, its decoded pixels (3, H, W) uint8; the crop box (left, top,
    w, h) in the full image; the flip; the output size."""
    data: torch.Tensor
    box: tuple
    flip: bool
    size: int


class EncodeCropFlip(DecodeCropFlip):
    """DecodeCropFlip for --gpu_decode: draws the same box and flip from the same RNG, but
    leaves decoding, cropping and resizing to `decode_crops` on the device."""

    def __call__(self, img):
        box, flip = self.params(*img.size)
        path = getattr(img, "filename", "")
        if path and img.format == "JPEG":
            data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
            img.close()
        else:  # CIFAR, the synthetic data, a PNG: already in memory or not a JPEG
            data = pil_to_uint8(decode_rgb(img)[0])
        return EncodedCrop(data, box, flip, self.size)


def decode_crops(crops, device):
    """[EncodedCrop] -> uint8 (B, 3, size, size) on `device`: nvJPEG decodes the batch on a
    GPU (torchvision.io.decode_jpeg), then each crop is resized (bicubic, antialiased) and
    flipped there. The same code runs with device='cpu' (libjpeg), which the tests use."""
    from torchvision.io import ImageReadMode, decode_jpeg
    jpegs = [c.data for c in crops if c.data.ndim == 1]
    decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else ())
    out = []
    for c in crops:
        img = next(decoded) if c.data.ndim == 1 else c.data.to(device, non_blocking=True)
        left, top, w, h = c.box
        x = F.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(c.size, c.size),
                          mode="bicubic", antialias=True, align_corners=False)
        out.append(x.flip(-1) if c.flip else x)
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


def collate(samples):
    """Stack (img, label, noise) samples; --gpu_decode's EncodedCrops stay a list."""
    imgs, labels, noise = zip(*samples)
    imgs = list(imgs) if isinstance(imgs[0], EncodedCrop) else torch.stack(imgs)
    return imgs, torch.as_tensor(labels), torch.stack(noise)


def to_device(batch, device):
    """A loader's batch -> (images normalised on the device, labels, noise). Pinned host
    memory makes the copies asynchronous: nothing here waits for the GPU."""
    imgs, labels, noise = batch
    if isinstance(imgs, list):
        imgs = decode_crops(imgs, device)
    imgs = normalize(imgs.to(device, non_blocking=True))
    return imgs, labels.to(device, non_blocking=True), noise.to(device, non_blocking=True)


def build_train_loader(dataset, args, dinfo, noise=0):
    """Shuffled, sharded over processes, equal full batches on every rank (drop_last);
    each sample carries `noise` uniform numbers drawn from its own seed."""
    sampler = EpochSampler(dataset, num_replicas=dinfo.world_size, rank=dinfo.rank,
                           shuffle=True, seed=args.seed)
    if len(sampler) < args.batch_size * args.accum_iter:
        raise ConfigError(f"the training set has {len(dataset)} images: fewer than one optimizer "
                          f"step (--batch_size {args.batch_size} x --accum_iter {args.accum_iter} "
                          f"x {dinfo.world_size} processes)")
    return DataLoader(SeededSamples(dataset, args.seed, noise), batch_size=args.batch_size,
                      sampler=sampler, num_workers=args.num_workers, drop_last=True,
                      collate_fn=collate, pin_memory=dinfo.device.type == "cuda",
                      persistent_workers=args.num_workers > 0)


# ----------------------------------------------------------------------------
# Shared command-line flags (the official MAE scripts' names)


def add_data_args(parser, gpu_decode=False):
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
    if gpu_decode:  # the stages whose augmentation is MAE's crop + flip alone
        g.add_argument("--gpu_decode", action="store_true", help="decode JPEGs on the GPU (nvJPEG): "
                       "workers send file bytes and crop boxes, the GPU decodes, crops and resizes")
    return g


def data_transform(args, transform):
    """The workers' transform: `transform` (a DecodeCropFlip), or with --gpu_decode the one
    that leaves decoding to the GPU."""
    if not getattr(args, "gpu_decode", False):
        return transform
    if not torch.cuda.is_available():
        raise ConfigError("--gpu_decode needs a CUDA device (nvJPEG); without one, leave it out")
    if type(transform) is not DecodeCropFlip:
        raise ConfigError("--gpu_decode serves the crop + flip pipeline of MAE pre-training and "
                          "the masked distillation methods; this stage augments on the CPU")
    return EncodeCropFlip(transform.size, transform.scale, transform.flip)


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
    g = parser.add_argument_group("benchmark (measure instead of training)")
    g.add_argument("--benchmark", type=int, default=0, metavar="STEPS",
                   help="time this many optimizer steps on synthetic batches kept on the device (no "
                        "data loader) after --benchmark_warmup steps; print img/s, TFLOP/s, MFU, memory")
    g.add_argument("--benchmark_warmup", type=int, default=10, metavar="STEPS")
    g.add_argument("--peak_tflops", type=float, default=None, help="the device's peak for MFU, e.g. "
                   "989 for an H100 / H200 SXM in bf16 (dense)")
    g.add_argument("--benchmark_data", type=int, default=0, metavar="BATCHES",
                   help="only read this many batches with the real loader and print img/s (per worker)")
    return g


# Ranges of the numeric flags: (low, high, low allowed, high allowed, the rule in words);
# every value must also be finite. A stage checks its own with check_common_args(args, {...}).
def between(lo, hi, lo_ok=True, hi_ok=True):
    return lo, hi, lo_ok, hi_ok, f"lie in {'[' if lo_ok else '('}{lo}, {hi}{']' if hi_ok else ')'}"


AT_LEAST_1 = (1, math.inf, True, False, "be at least 1")
POSITIVE = (0, math.inf, False, False, "be positive")
NON_NEGATIVE = (0, math.inf, True, False, "be 0 or more")
FLAG_RANGES = dict(
    batch_size=AT_LEAST_1, accum_iter=AT_LEAST_1, epochs=AT_LEAST_1, input_size=AT_LEAST_1,
    patch_size=AT_LEAST_1, num_heads=AT_LEAST_1, print_freq=AT_LEAST_1, synthetic_samples=AT_LEAST_1,
    decoder_embed_dim=AT_LEAST_1, decoder_depth=AT_LEAST_1, decoder_num_heads=AT_LEAST_1,
    num_workers=NON_NEGATIVE, save_every=NON_NEGATIVE, warmup_epochs=NON_NEGATIVE,
    blr=POSITIVE, lr=POSITIVE, min_lr=NON_NEGATIVE, weight_decay=NON_NEGATIVE, clip_grad=POSITIVE,
    mask_ratio=between(0, 1, hi_ok=False), min_crop_scale=between(0, 1, lo_ok=False),
    benchmark=NON_NEGATIVE, benchmark_warmup=NON_NEGATIVE, benchmark_data=NON_NEGATIVE,
    peak_tflops=POSITIVE)


def check_ranges(args, ranges):
    """One-line ConfigError for the first flag outside its range (None = not set)."""
    for flag, (lo, hi, lo_ok, hi_ok, rule) in ranges.items():
        value = getattr(args, flag, None)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            inside = v is None or (math.isfinite(v) and (v > lo or lo_ok and v == lo)
                                   and (v < hi or hi_ok and v == hi))
            if not inside:
                raise ConfigError(f"--{flag} must {rule}, got {v}")


def check_common_args(args, ranges=None):
    """The flags every training stage has, plus a stage's own `ranges`."""
    check_ranges(args, {**FLAG_RANGES, **(ranges or {})})
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup_epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")


# ----------------------------------------------------------------------------
# Training loop and logging


def peak_memory_mb(device):
    """Peak CUDA memory allocated by tensors, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def no_sync(model):
    """DDP's no_sync, also through torch.compile's wrapper: torch.compile(DDP(m)) is not a
    DistributedDataParallel, and testing the outer object would all-reduce every micro-batch."""
    inner = getattr(model, "_orig_mod", model)
    return inner.no_sync() if isinstance(inner, DistributedDataParallel) else nullcontext()


def train_step(model, batch, optimizer, step_fn, args, autocast, scaler, last_micro=True):
    """Forward + backward of one micro-batch (gradients all-reduced only on the last of an
    accumulation group), then on the last one the optimizer step. -> (loss, terms)."""
    with nullcontext() if last_micro else no_sync(model):
        with autocast():
            loss, terms = step_fn(model, batch)
        scaled = loss / args.accum_iter
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
    return loss, terms


def train_one_epoch(model, loader, optimizer, epoch, args, step_fn, device, autocast=nullcontext,
                    scaler=None):
    """One epoch of `loss, terms = step_fn(model, batch)` with the per-iteration lr
    schedule, accumulation (no_sync on all but the last micro-batch), optional grad
    clipping and fp16 scaling. Returns the epoch's mean loss and terms over all ranks,
    lr, throughput and peak memory. Raises NonFiniteLossError on a NaN/inf loss (checked
    at each progress update and at the end) or non-finite weights, before anything is saved."""
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
        batch = to_device(batch, device)
        loss, terms = train_step(model, batch, optimizer, step_fn, args, autocast, scaler,
                                 last_micro=(i + 1) % accum == 0)
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
                                         f"stopping. {last_good(args)}")
            rate = images * dist_world() / (time.time() - t0)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
    bar.close()
    elapsed = time.time() - t0
    stats = torch.stack([sums[k] for k in sums] + [torch.tensor(float(count), device=device)])
    stats = all_reduce_sum(stats.to(device))
    stats = {k: (stats[j] / stats[-1]).item() for j, k in enumerate(sums)}
    if not all(math.isfinite(v) for v in stats.values()):
        raise NonFiniteLossError(f"non-finite loss in epoch {epoch} ({stats}); stopping. "
                                 f"{last_good(args)}")
    # A finite loss does not make the updated weights usable (the last step may have sent
    # them to inf): every rank checks its own copy, so all stop together, before any save.
    bad = first_non_finite(unwrap(model).state_dict().items())
    if bad:
        raise NonFiniteLossError(f"after epoch {epoch} the weight {bad} holds NaN, inf or values "
                                 f"beyond 1.8e19 (lr too high?); not saved. {last_good(args)}")
    stats.update(lr=lr, img_per_s=images * dist_world() / elapsed, epoch_time_s=elapsed,
                 peak_mem_mb=peak_memory_mb(device))
    return stats


def wrap_model(model, dinfo, args):
    """DDP over the processes, then --compile. compile(DDP(m)), not the reverse: the compiler
    then splits the graph at DDP's gradient buckets, so the all-reduces overlap the backward."""
    net = model
    if dinfo.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[dinfo.local_rank] if dinfo.device.type == "cuda"
                                      else None)
    return torch.compile(net) if args.compile else net


def count_flops(fn):
    """FLOPs of the aten ops fn() dispatches (matmuls, convolutions, attention), counted once
    by torch.utils.flop_counter on the eager model."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(args, model, loader, optimizer, step_fn, device, autocast=nullcontext, scaler=None,
              num_classes=1000):
    """--benchmark STEPS: optimizer steps on a synthetic batch kept on the device (the real
    batch's shapes, random uint8 pixels, labels and noise; no data loader), timed after
    --benchmark_warmup steps. Prints and writes benchmark.json: img/s, TFLOP/s and MFU per
    device (FLOPs of one micro-batch counted by count_flops on the eager model), peak memory.
    --benchmark_data BATCHES: only the real loader (and the GPU decode), img/s per worker.
    Returns False when neither is asked for."""
    if args.benchmark_data:
        if len(loader) < args.benchmark_data + 1:  # the first batch is not timed
            raise ConfigError(f"--benchmark_data {args.benchmark_data}: this process's loader has "
                              f"{len(loader)} batches of {args.batch_size}; give at most {len(loader) - 1}")
        it, t0, images = iter(loader), None, 0
        for i in tqdm(range(args.benchmark_data + 1), desc="reading", disable=not is_main_process()):
            imgs = to_device(next(it), device)[0]
            if i == 0:  # the first batch waits for the workers to start: not counted
                sync(device)
                t0 = time.perf_counter()
            else:
                images += imgs.shape[0]
        sync(device)
        rate = images / (time.perf_counter() - t0)
        report = dict(mode="data", images=images, img_per_s=rate, num_workers=args.num_workers,
                      img_per_s_per_worker=rate / max(args.num_workers, 1),
                      gpu_decode=getattr(args, "gpu_decode", False))
        print0(f"data: {rate:.0f} img/s with {args.num_workers} workers "
               f"({report['img_per_s_per_worker']:.0f} per worker) on this process's shard")
    elif args.benchmark:
        img, _, noise = loader.dataset[(0, 0)]
        shape = (3, img.size, img.size) if isinstance(img, EncodedCrop) else tuple(img.shape)
        B = args.batch_size
        batch = (normalize(torch.randint(0, 256, (B, *shape), dtype=torch.uint8, device=device)),
                 torch.randint(0, num_classes, (B,), device=device), torch.rand(B, *noise.shape, device=device))
        model.train(True)

        def micro_step():
            with autocast():
                loss, _ = step_fn(unwrap(model), batch)
            loss.backward()
        flops = count_flops(micro_step) / B  # per image, forward + backward
        optimizer.zero_grad(set_to_none=True)
        for i in range(args.benchmark_warmup + args.benchmark):
            if i == args.benchmark_warmup:
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
            for j in range(args.accum_iter):
                train_step(model, batch, optimizer, step_fn, args, autocast, scaler,
                           last_micro=j + 1 == args.accum_iter)
        sync(device)
        rate = args.benchmark * args.accum_iter * B / (time.perf_counter() - t0)  # per device
        tflops = flops * rate / 1e12
        report = dict(mode="train", steps=args.benchmark, batch_size=B, img_per_s=rate * dist_world(),
                      img_per_s_per_device=rate, gflops_per_image=flops / 1e9, tflops_per_device=tflops,
                      mfu=tflops / args.peak_tflops if args.peak_tflops else None,
                      peak_mem_mb=peak_memory_mb(device), device=str(device))
        print0(f"benchmark: {report['img_per_s']:.0f} img/s ({rate:.0f} per device), "
               f"{flops / 1e9:.2f} GFLOP per image (forward + backward), {tflops:.1f} TFLOP/s per device"
               + (f", MFU {100 * report['mfu']:.1f}% of {args.peak_tflops:g}" if args.peak_tflops else "")
               + f", peak memory {report['peak_mem_mb']:.0f} MB")
    else:
        return False
    if is_main_process():
        (Path(args.output_dir) / "benchmark.json").write_text(json.dumps(report, indent=1))
    return True


def dist_world():
    return dist.get_world_size() if dist.is_initialized() else 1


def log_stats(output_dir, stats):
    """Append one JSON object per line to <output_dir>/log.txt (rank 0), as MAE does."""
    if is_main_process():
        with open(Path(output_dir) / "log.txt", "a") as f:
            f.write(json.dumps(stats) + "\n")
