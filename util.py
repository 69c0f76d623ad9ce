"""Run plumbing shared by the stages, and nothing that teaches a method: one-line errors
(`run_main`), torchrun / DDP, the output folder and its checkpoints (atomic saves, weights_only
loads, exact resume), the lr schedule and parameter groups, common flags, and the loop
(`train_one_epoch`: accumulation under no_sync, autocast, a non-finite stop, a tqdm bar).
"""
import argparse
import fcntl
import hashlib
import json
import math
import os
import re
import resource
import signal
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C."""


def terminate(signum, frame):
    raise Terminated()


MODEL_FILES = ("vit.py", "hiera.py")
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")  # gloo's words


def run_main(main, parser):
    """Parse arguments and run `main(args)`, ending in one line for what the user can fix:
    a UserError or a model file's ValueError (exit 1), Ctrl-C (130) or SIGTERM (143), a peer
    process that stopped (1). Anything else is a bug and keeps its traceback."""
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, terminate)
    code = 0
    try:
        main(args)
    except BaseException as e:
        for s in (signal.SIGTERM, signal.SIGINT):  # already ending: torchrun's SIGTERM to the
            signal.signal(s, signal.SIG_IGN)  # other ranks must not cut their one line short
        for bar in list(getattr(tqdm, "_instances", ())):  # a bar left open mid-epoch would
            bar.close()  # otherwise share the message's line
        from_model = isinstance(e, ValueError) and e.__traceback__ is not None and \
            Path(traceback.extract_tb(e.__traceback__)[-1].filename).name in MODEL_FILES
        if isinstance(e, KeyboardInterrupt):
            saved = f" {last_good(args)}" if hasattr(args, "epochs") and not getattr(args, "eval", False) else ""
            print(f"{'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}.{saved}",
                  file=sys.stderr, flush=True)
            code = 143 if isinstance(e, Terminated) else 130
        elif isinstance(e, (UserError, dist.DistBackendError)) or from_model or (
                dist.is_initialized() and any(s in str(e) for s in PEER_LOST)):
            lost = isinstance(e, RuntimeError) and not from_model  # gloo: a peer process stopped
            print(f"error: lost contact with another process, which stopped (its message says why)"
                  if lost else f"error: {e}", file=sys.stderr, flush=True)
            code = 1
        elif isinstance(e, SystemExit) or not dist.is_initialized():
            raise
        else:  # a bug under torchrun: the traceback, then the same clean exit
            traceback.print_exc()
            code = 1
    finish(code)


def finish(code):
    """End the process with `code`. With a process group: destroy it, flush, and leave with
    os._exit, skipping the interpreter's teardown. torch keeps the default gloo group alive
    past destroy_process_group when torch._dynamo was imported after init (torchvision and
    torch.compile import it), and its worker threads, still releasing the last collective's
    tensors, then abort the process at teardown ("terminate called without an active
    exception", SIGABRT) on a busy machine. Everything a run writes is closed or fsynced."""
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


def dist_world():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def unwrap(model):
    """The bare module under DDP and torch.compile wrappers."""
    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def wrap_model(model, dinfo, args):
    """DDP over the processes, then --compile. compile(DDP(m)), not the reverse: the compiler
    then splits the graph at DDP's gradient buckets, so the all-reduces overlap the backward."""
    net = model
    if dinfo.world_size > 1:
        net = DistributedDataParallel(model, device_ids=[dinfo.local_rank] if dinfo.device.type == "cuda" else None)
    return torch.compile(net) if args.compile else net


def no_sync(model):
    """DDP's no_sync, also through torch.compile's wrapper: torch.compile(DDP(m)) is not a
    DistributedDataParallel, and testing the outer object would all-reduce every micro-batch."""
    inner = getattr(model, "_orig_mod", model)
    return inner.no_sync() if isinstance(inner, DistributedDataParallel) else nullcontext()


def stable_seed(*parts):
    """A 63-bit seed from a tuple of ints/strings, the same on every machine and run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# ----------------------------------------------------------------------------
# Runs: the output folder, saving, resuming

_LOCKS = {}  # output folder -> the open lock file this process holds


def prepare_output_dir(args, run=True):
    """Before any work: --output_dir must be a writable directory (checked by writing to it).
    For a training run (`run`), rank 0 also takes an exclusive lock on <output_dir>/.lock
    (flock: released when the process ends, kill -9 included), refuses a folder that holds
    another run than the one resumed, and removes temp files a killed save left."""
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"--output_dir {out}: cannot write there ({e.strerror or e})") from None
    if not run or not is_main_process():
        return out
    key = str(out.resolve())
    if key not in _LOCKS:
        lock = open(out / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            raise ConfigError(f"--output_dir {out} is in use by another run (pid {lock.read().strip() or '?'}): "
                              f"wait for it to end or choose another --output_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        _LOCKS[key] = lock
    ckpt = out / "checkpoint.pth"
    resumed = args.resume and Path(args.resume).resolve() == ckpt.resolve()
    if args.resume and not resumed and (ckpt.exists() or (out / "log.txt").exists()):
        raise ConfigError(f"--output_dir {out} holds another run ({'checkpoint.pth' if ckpt.exists() else 'log.txt'}); "
                          f"resuming {args.resume} there would overwrite it: choose an empty --output_dir, "
                          f"or --resume {ckpt} to continue that run")
    if not args.resume and (out / "log.txt").exists() and not ckpt.exists():
        raise ConfigError(f"--output_dir {out} has a log.txt but no checkpoint.pth (another run's?): "
                          f"choose another --output_dir or remove it")
    for tmp in out.glob("*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)
    return out


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
    """Write atomically: a temp file in the same folder, fsync, then rename over `path`. A
    kill at any moment leaves either the old complete file or the new one. The file gets the
    umask's permissions. A failed write (disk full: torch's writer raises RuntimeError, the
    OS an OSError) is a one-line CheckpointError, and the temp file is removed."""
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
        if isinstance(e, (OSError, RuntimeError)):
            why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0]
            raise CheckpointError(f"cannot write {path} ({why}); "
                                  f"{'the previous one is intact' if path.exists() else 'nothing was saved'}") from None
        raise


def load_checkpoint(path):
    """torch.load with weights_only=True (a checkpoint from the internet cannot run code), one
    line for a missing, corrupt or code-carrying file. argparse.Namespace is allow-listed
    because MAE's own training checkpoints store one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
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
    for k, v in state_dict.items():
        if k in own and v.shape != own[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)} (was it saved with other --model flags?)")
    missing, unexpected = [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model: {len(missing)} missing keys "
                              f"(first: {missing[:1]}), {len(unexpected)} unexpected (first: {unexpected[:1]})")
    bad = first_non_finite(state_dict.items())
    if bad:
        raise CheckpointError(f"{path}: {bad} holds NaN or infinite values; the checkpoint is unusable")
    model.load_state_dict(state_dict)


# Flags a resumed run must keep: they define the model or the method. Each stage adds its own.
FIXED_ON_RESUME = ("model", "input_size", "patch_size", "num_heads")


def check_resumed_args(args, saved, path, fixed):
    """A resumed run must not change what defines the model or the method (`fixed` flags):
    refuse with one line. Other changes (batch size, lr, epochs) are allowed and listed."""
    where = "" if args.resume else f" (found in --output_dir {args.output_dir})"
    new = plain_args(args)
    if isinstance(saved.get("global_pool"), bool) and "cls_token" not in saved:  # finetune.py's flag
        saved = {**saved, "cls_token": not saved["global_pool"]}  # before --cls_token (True = mean pool)

    def same(flag, old, now):  # paths (--teacher, --finetune) are the same when they name one file
        return old == now or (flag in ("teacher", "finetune") and bool(old) and bool(now) and
                              Path(old).exists() and Path(now).exists() and os.path.samefile(old, now))
    for flag in fixed:
        if flag in saved and flag in new and not same(flag, saved[flag], new[flag]):
            was, now = ("(not given)" if v in (None, "") else v for v in (saved[flag], new[flag]))
            raise ConfigError(f"{path}{where} was trained with --{flag} {was}, this run has "
                              f"--{flag} {now}: a resumed run must keep the flags that define "
                              f"the model and the method (use another --output_dir for a new run)")
    changed = [f"--{k} {saved[k]} -> {v}" for k, v in new.items() if k in saved and k != "resume" and saved[k] != v]
    if changed:
        print0(f"resuming {path}{where} with changed flags: {', '.join(changed)}")


def resume_checkpoint(args, model, optimizer, scaler=None, fixed=FIXED_ON_RESUME):
    """Restore a run from --resume, or from <output_dir>/checkpoint.pth when it exists (a
    requeued job continues with the same command). Returns (first epoch to run, the
    checkpoint dict or None) so a stage can restore entries of its own (an EMA, a best score)."""
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
        if ckpt["epoch"] + 1 >= args.epochs:
            print0(f"{path}: all {ckpt['epoch'] + 1} epochs are done (--epochs {args.epochs}): "
                   f"nothing to train; raise --epochs to continue")
        else:
            print0(f"resumed {path}: epoch {ckpt['epoch']} done, continuing at {ckpt['epoch'] + 1}")
        return ckpt["epoch"] + 1, ckpt
    print0(f"loaded weights only from {path} (no optimizer state / epoch): starting at epoch 0")
    return 0, ckpt


def save_training_state(args, model, optimizer, scaler, epoch, extra=None):
    """Rank 0 writes <output_dir>/checkpoint.pth (always the latest complete epoch) and,
    every --save_every epochs, a kept copy checkpoint-<epoch>.pth. `extra`: more entries
    (an EMA model, the best accuracy, class names). 'args' holds this run's flags,
    'args_history' those of every start of the run (a resumed run appends)."""
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


def end_epoch(args, model, optimizer, scaler, epoch, stats, log=None, extra=None, result=""):
    """After an epoch: save checkpoint.pth (with `extra` entries), append the train `stats` and
    `log` as one JSON line to log.txt (MAE's format, to plot), print one line."""
    save_training_state(args, model, optimizer, scaler, epoch, extra)
    if is_main_process():
        with open(Path(args.output_dir) / "log.txt", "a") as f:
            f.write(json.dumps({**{f"train_{k}": v for k, v in stats.items()}, **(log or {}), "epoch": epoch}) + "\n")
    terms = "  ".join(f"{k} {v:.4f}" for k, v in stats.items() if k not in ("lr", "img_per_s", "epoch_time_s",
                                                                           "peak_mem_mb"))
    print0(f"epoch {epoch}: {terms}  lr {stats['lr']:.2e}  {result}{stats['img_per_s']:.0f} img/s  "
           f"peak {stats['peak_mem_mb']:.0f} MB")


# ----------------------------------------------------------------------------
# Optimization


def cosine_lr(epoch, lr, min_lr, warmup_epochs, epochs):
    """lr at a fractional epoch: linear warmup from 0, then half-cosine down to min_lr."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# Tokens and position embeddings are never weight-decayed (nor are biases / norms), nor
# BEiT's relative position bias tables (timm's Beit.no_weight_decay).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token", "relative_position_bias_table")


def layer_id(name, depth):
    """MAE's layer ids for lr decay: embeddings 0, blocks.i -> i+1, everything else depth+1
    (the same names in a ViT and a Hiera)."""
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
        layer = layer_id(name, depth) if layer_decay is not None else 0
        if (layer, no_decay) not in groups:
            groups[layer, no_decay] = {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                       "lr_scale": layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0}
        groups[layer, no_decay]["params"].append(p)
        groups[layer, no_decay]["names"].append(name)
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
# Shared command-line flags (the official MAE scripts' names) and their ranges


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
    g.add_argument("--output_dir", default=output_dir, help="checkpoint.pth, log.txt and figures go here")
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
                   help="time this many optimizer steps on one batch kept on the device (no data "
                        "loading) after --benchmark_warmup steps; print img/s, TFLOP/s, MFU, memory")
    g.add_argument("--benchmark_warmup", type=int, default=10, metavar="STEPS")
    g.add_argument("--peak_tflops", type=float, default=None, help="the device's peak for MFU, e.g. "
                   "989 for an H100 / H200 SXM in bf16 (dense)")
    g.add_argument("--benchmark_data", type=int, default=0, metavar="BATCHES",
                   help="only read this many batches with the real loader and print img/s (per worker)")
    return g


def between(lo, hi, lo_ok=True, hi_ok=True):
    """A range rule (low, high, low allowed, high allowed, the rule in words); values must be finite."""
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
            if not (v is None or (math.isfinite(v) and (v > lo or lo_ok and v == lo) and (v < hi or hi_ok and v == hi))):
                raise ConfigError(f"--{flag} must {rule}, got {v}")


def check_common_args(args, ranges=None):
    """The flags every training stage has, plus a stage's own `ranges`."""
    check_ranges(args, {**FLAG_RANGES, **(ranges or {})})
    if args.warmup_epochs > args.epochs:
        raise ConfigError(f"--warmup_epochs {args.warmup_epochs} exceeds --epochs {args.epochs}")


# ----------------------------------------------------------------------------
# The training loop


def peak_memory_mb(device):
    """Peak CUDA memory allocated by tensors, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train_step(model, batch, optimizer, step_fn, args, autocast, scaler, last_micro=True):
    """Forward + backward of one micro-batch, `loss, terms = step_fn(model, batch)` under
    autocast (gradients all-reduced only on the last micro-batch of an accumulation group),
    then on that last one the optimizer step. -> (loss, terms)."""
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
    """One epoch over `loader` (batches already on the device): per iteration the lr of the
    cosine schedule, then train_step. Returns the epoch's mean loss and terms over all
    ranks, lr, throughput and peak memory. A NaN/inf loss (checked at each progress update
    and at the end) or non-finite weights raise NonFiniteLossError before anything is saved."""
    model.train(True)
    loader.sampler.set_epoch(epoch)
    # Drop path, mixup and the like draw from the global RNG: reseed it from (seed, epoch,
    # rank) so a resumed run draws what the uninterrupted one drew, without saving RNG state.
    torch.manual_seed(stable_seed(args.seed, "epoch", epoch, dist.get_rank() if dist.is_initialized() else 0))
    accum, steps = args.accum_iter, len(loader) // args.accum_iter
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
            lr = cosine_lr(epoch + i / len(loader), args.lr, args.min_lr, args.warmup_epochs, args.epochs)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
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
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{images * dist_world() / (time.time() - t0):.0f}")
    bar.close()
    elapsed = time.time() - t0
    stats = all_reduce_sum(torch.stack([*sums.values(), torch.tensor(float(count), device=device)]).to(device))
    stats = {k: (stats[j] / stats[-1]).item() for j, k in enumerate(sums)}
    if not all(math.isfinite(v) for v in stats.values()):
        raise NonFiniteLossError(f"non-finite loss in epoch {epoch} ({stats}); stopping. {last_good(args)}")
    # A finite loss does not make the updated weights usable (the last step may have sent
    # them to inf): every rank checks its own copy, so all stop together, before any save.
    bad = first_non_finite(unwrap(model).state_dict().items())
    if bad:
        raise NonFiniteLossError(f"after epoch {epoch} the weight {bad} holds NaN, inf or values "
                                 f"beyond 1.8e19 (lr too high?); not saved. {last_good(args)}")
    stats.update(lr=lr, img_per_s=images * dist_world() / elapsed, epoch_time_s=elapsed,
                 peak_mem_mb=peak_memory_mb(device))
    return stats


def count_flops(fn):
    """FLOPs of the aten ops fn() dispatches (matmuls, convolutions, attention): torch's counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(args, model, loader, optimizer, step_fn, device, autocast=nullcontext, scaler=None):
    """--benchmark STEPS: optimizer steps on the loader's first batch kept on the device (no
    data loading), timed after --benchmark_warmup steps; img/s, TFLOP/s and MFU per device
    (FLOPs of one micro-batch counted on the eager model), peak memory. --benchmark_data
    BATCHES: only the loader (and the GPU decode), img/s per worker. Both write
    benchmark.json. Returns False when neither is asked for."""
    if args.benchmark_data:
        if len(loader) < args.benchmark_data + 1:  # the first batch is not timed
            raise ConfigError(f"--benchmark_data {args.benchmark_data}: this process's loader has "
                              f"{len(loader)} batches of {args.batch_size}; give at most {len(loader) - 1}")
        it, images = iter(loader), 0
        for i in tqdm(range(args.benchmark_data + 1), desc="reading", disable=not is_main_process()):
            imgs = next(it)[0]
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
        loader.sampler.set_epoch(0)
        batch, B = next(iter(loader)), args.batch_size
        model.train(True)

        def micro_step():
            with autocast():
                loss = step_fn(unwrap(model), batch)[0]
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
                train_step(model, batch, optimizer, step_fn, args, autocast, scaler, last_micro=j + 1 == args.accum_iter)
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
