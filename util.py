"""Run plumbing shared by the stages, and nothing that teaches a method: one-line errors
(`run_main`), torchrun / DDP, the output folder and its checkpoints (atomic saves, exact
resume, log.txt), the lr schedule and parameter groups, common flags, and the loop
(`train_one_epoch`: accumulation under no_sync, autocast, a non-finite stop, a tqdm bar).
"""
import datetime
import errno
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from checkpoints import CheckpointError, disk_error, first_non_finite, load_checkpoint
from data import stable_seed

# ----------------------------------------------------------------------------
# Errors the user can fix: one line, exit status 1, no traceback.


class UserError(Exception):
    pass


class ConfigError(UserError):
    """A flag, an input path or the environment cannot work."""


class NonFiniteLossError(UserError):
    """The loss or the weights became NaN or infinite; nothing is saved from that epoch."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C."""


def terminate(signum, frame):
    raise Terminated()


# The ValueErrors that the modules copied alone define (DataError, CheckpointError) or raise (vit, hiera).
COPYABLE = ("vit", "hiera", "data", "checkpoints")
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")  # gloo's words
_STATE = {"ending": False, "saving": False, "args": None}  # also read by watch_signals' thread


def run_main(main, parser):
    """Run `main(args)`, ending in one line for what the user can fix: a UserError or a copyable
    module's ValueError, a full or read-only disk, a peer that stopped (exit 1), Ctrl-C (130), SIGTERM
    (143); a bug keeps its traceback. A line every torchrun rank would print alike is rank 0's."""
    args = _STATE["args"] = parser.parse_args()
    signal.signal(signal.SIGTERM, terminate)
    code = 0
    try:
        main(args)
    except BaseException as e:
        _STATE["ending"] = True
        for s in (signal.SIGTERM, signal.SIGINT):  # already ending: torchrun's SIGTERM to the
            signal.signal(s, signal.SIG_IGN)  # other ranks must not cut their one line short
        for bar in list(getattr(tqdm, "_instances", ())):  # a bar left open mid-epoch would
            bar.close()  # otherwise share the message's line
        tb = traceback.extract_tb(e.__traceback__)
        rank, world = (os.environ.get(k, "") for k in ("RANK", "WORLD_SIZE"))
        say = not (rank.isdigit() and world.isdigit() and 0 < int(rank) < int(world)) or \
            type(e).__name__ == "CorruptImageError"  # an image is one rank's own
        code, message = 1, f"error: {(str(e).splitlines() or [''])[0]}"
        if isinstance(e, KeyboardInterrupt):
            saved = f" {last_good(args)}" if hasattr(args, "epochs") and not getattr(args, "eval", False) else ""
            message = f"{'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}.{saved}"
            code = 143 if isinstance(e, Terminated) else 130
        elif dist.is_initialized() and (isinstance(e, dist.DistError) or
                                        isinstance(e, RuntimeError) and any(s in str(e) for s in PEER_LOST)):
            message = "error: lost contact with another process, which stopped (its message says why)"
        elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            message = f"error: cannot write {e.filename or 'the output'}: {disk_error(e)}"
        elif not (isinstance(e, UserError) or isinstance(e, ValueError) and (
                type(e).__module__ in COPYABLE or tb and Path(tb[-1].filename).stem in COPYABLE[:2])):
            if isinstance(e, SystemExit) or not dist.is_initialized():
                raise
            traceback.print_exc()  # a bug under torchrun: the traceback, then the same clean exit
            say = False
        if say:
            print(message, file=sys.stderr, flush=True)
    finish(code)


def finish(code):
    """Exit with `code`; with a process group: destroy it, flush, os._exit (torch keeps the gloo
    group alive past destroy_process_group, and its threads abort the teardown: SIGABRT)."""
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


def init_distributed(device="auto", timeout_min=10.0):
    """From torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (checked), or one process
    without them. device: auto / cuda / cpu; timeout_min: each wait for the other processes."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    env = {k: os.environ.get(k, "") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    rank, world, local = (int(env[k]) if env[k].isdigit() else d for k, d in (("RANK", 0), ("WORLD_SIZE", 1),
                                                                             ("LOCAL_RANK", 0)))
    unset = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if world > 1 and not env[k]]
    bad = [f"{k}={v!r} is not a whole number" for k, v in env.items() if k != "MASTER_ADDR" and v and not v.isdigit()]
    bad += [f"WORLD_SIZE is {world} but {', '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set"] * bool(unset)
    bad += [f"RANK {rank} is not below WORLD_SIZE {world}"] * (rank >= world)
    if bad:
        raise ConfigError(f"the environment says a distributed run, but {bad[0]}: start it with torchrun, "
                          f"or unset RANK and WORLD_SIZE for one process")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        watch_signals()
        try:
            dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=timeout_min))
        except dist.DistError as e:
            raise ConfigError(f"rank {rank} of {world} could not join the others at {env['MASTER_ADDR']}:"
                              f"{env['MASTER_PORT']} within --dist_timeout {timeout_min:g} min "
                              f"({(str(e).splitlines() or [''])[0]})") from None
    return DistInfo(rank, world, local, dev)


def watch_signals(grace_s=10.0):
    """Ctrl-C and SIGTERM act when the main thread runs Python, not while it waits in torch's C++
    for a peer (the rendezvous, a collective): a thread woken by the signal (set_wakeup_fd) ends
    such a process after `grace_s` (or a checkpoint being saved) with the usual line and status."""
    if os.name == "nt":  # set_wakeup_fd takes a socket there; the timeout ends the wait
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)

    def watch():
        while (num := os.read(r, 1)[0]) not in (signal.SIGINT, signal.SIGTERM):
            pass
        end = time.monotonic() + grace_s
        while time.monotonic() < end or _STATE["saving"]:
            time.sleep(0.1)
        if not _STATE["ending"]:  # the main thread never got to handle it
            print(f"{'terminated (SIGTERM)' if num == signal.SIGTERM else 'interrupted'} while waiting for "
                  f"another process. {last_good(_STATE['args'])}", file=sys.stderr, flush=True)
        os._exit(143 if num == signal.SIGTERM else 130)
    threading.Thread(target=watch, daemon=True).start()


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


# ----------------------------------------------------------------------------
# Runs: the output folder, saving, resuming

_LOCKS = {}  # output folder -> the open lock file this process holds


def prepare_output_dir(args, run=True):
    """--output_dir must be a writable folder. A training run's rank 0 also locks <output_dir>/.lock
    (flock, msvcrt on Windows: released when the process ends, kill -9 included), refuses a folder
    holding another run (any checkpoint*.pth or log.txt; --resume may roll back to a kept
    checkpoint-N.pth of the folder's own run) and removes the temp files of a killed save."""
    out = Path(args.output_dir)
    if not str(args.output_dir).strip() or out.is_file():
        raise ConfigError(f"--output_dir {out} is a file, not a folder: choose another --output_dir"
                          if str(args.output_dir).strip() else "--output_dir is empty: name the run's folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ConfigError(f"--output_dir {out}: cannot write there ({e.strerror or e})") from None
    if not run or not is_main_process():
        return out
    if str(out.resolve()) not in _LOCKS:
        lock = _LOCKS[str(out.resolve())] = open(out / ".lock", "a+")
        try:
            try:
                import fcntl
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # Windows: lock a byte past the pid, which stays readable
                import msvcrt
                lock.seek(1 << 20)
                msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            del _LOCKS[str(out.resolve())]
            lock.seek(0)
            raise ConfigError(f"--output_dir {out} is in use by another run (pid {lock.read().strip() or '?'}): "
                              f"wait for it to end or choose another --output_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
    ckpt = out / "checkpoint.pth"
    own = args.resume and Path(args.resume).parent.resolve() == out.resolve() and \
        re.fullmatch(r"checkpoint(-\d+)?\.pth", Path(args.resume).name)
    other = sorted(p.name for p in (*out.glob("checkpoint*.pth"), out / "log.txt") if p.is_file())
    if args.resume and not own and other:
        raise ConfigError(f"--output_dir {out} holds another run ({other[0]}); resuming {args.resume} there "
                          f"would overwrite it: choose an empty --output_dir, or --resume {ckpt} to continue that run")
    if not args.resume and other and not ckpt.exists():
        raise ConfigError(f"--output_dir {out} has {', '.join(other)} but no checkpoint.pth (another run's?): "
                          f"choose another --output_dir or remove them")
    for tmp in out.glob("*.pth.*.tmp"):
        tmp.unlink(missing_ok=True)
    return out


def plain_args(args):
    """argparse.Namespace -> dict of plain data (safe for weights_only loading); attributes
    starting with '_' are the run's bookkeeping, not flags."""
    def plain(v):
        return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    return {k: [plain(x) for x in v] if isinstance(v, (list, tuple)) else plain(v)
            for k, v in vars(args).items() if not k.startswith("_")}


def write_atomic(path, write, error=ConfigError, kept=False):
    """write(f) into a temp file beside `path`, fsync, rename over `path` (the umask's mode): a kill
    leaves the old file or the new one. A failed write (a full disk: torch's writer raises a
    RuntimeError, the OS an OSError) is a one-line `error` naming the file; no temp file stays."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise error(f"cannot write {path} ({disk_error(e, path.parent)})" + kept * (
                "; the previous one is intact" if path.exists() else "; nothing was saved")) from None
        raise


def save_checkpoint(path, state):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f), CheckpointError, kept=True)


def write_log(out, lines):
    """log.txt: one JSON object per finished epoch (MAE's format, to plot), written whole."""
    write_atomic(Path(out) / "log.txt", lambda f: f.write("".join(json.dumps(x) + "\n" for x in lines).encode()))


@contextmanager
def uninterrupted():
    """Ctrl-C and SIGTERM wait until the block is done: a checkpoint, its log.txt and what a
    stop message reports change together (signals already ignored stay ignored)."""
    if _STATE["saving"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, old = [], {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in (s for s, h in old.items() if h is not signal.SIG_IGN):
        signal.signal(s, lambda num, frame: pending.append(num))
    _STATE["saving"] = True
    try:
        yield
    finally:
        _STATE["saving"] = False
        for s, h in old.items():
            signal.signal(s, h)
    if pending:
        raise Terminated() if pending[0] == signal.SIGTERM else KeyboardInterrupt()


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
# Which script wrote a run's args: the first of these flags it has (a stage's own).
STAGES = (("teacher", "distill_pretrain.py"), ("layer_decay", "finetune.py"), ("decoder_depth", "mae_pretrain.py"))


def check_resumed_args(args, saved, path, fixed):
    """A resumed run must come from the same stage and keep what defines the model and the method
    (`fixed` flags): refuse in one line. Other changes are listed and apply from here on."""
    where = "" if args.resume else f" (found in --output_dir {args.output_dir})"
    new = plain_args(args)
    theirs, ours = (next((s for flag, s in STAGES if flag in a), None) for a in (saved, new))
    if theirs and theirs != ours:
        raise ConfigError(f"{path}{where} is a {theirs} run, not a {ours} one: " + (
            f"start a fine-tuning from it with --finetune {path} and a new --output_dir" if ours == "finetune.py"
            else f"continue it with {theirs}, or choose another --output_dir"))
    if isinstance(saved.get("global_pool"), bool) and "cls_token" not in saved:  # finetune.py's flag
        saved = {**saved, "cls_token": not saved["global_pool"]}  # before --cls_token (True = mean pool)

    def same(flag, old, now):  # paths (--teacher, --finetune) are the same when they name one file
        return old == now or (flag in ("teacher", "finetune") and bool(old) and bool(now) and
                              Path(old).exists() and Path(now).exists() and os.path.samefile(old, now))
    for flag in (f for f in fixed if f in saved and f in new and not same(f, saved[f], new[f])):
        was, now = ("(not given)" if v in (None, "") else v for v in (saved[flag], new[flag]))
        raise ConfigError(f"{path}{where} was trained with --{flag} {was}, this run has --{flag} {now}: a resumed "
                          f"run must keep the flags that define the model and the method (use another "
                          f"--output_dir for a new run)")
    changed = [f"--{k} {saved[k]} -> {v}" for k, v in new.items() if k in saved and k != "resume"
               and not same(k, saved[k], v)]
    if changed:
        print0(f"resuming {path}{where} with changed flags: {', '.join(changed)}")
    keys = ("lr", "min_lr", "warmup_epochs", "epochs")  # the recorded schedule, when all of it is there
    if saved.get("epochs") != args.epochs and all(isinstance(saved.get(k), (int, float)) for k in keys):
        was, now = (cosine_lr(min(args._start_epoch, saved["epochs"]), *(a[k] for k in keys)) for a in (saved, new))
        print0(f"--epochs {saved['epochs']} -> {args.epochs}: the cosine schedule is recomputed; at epoch "
               f"{args._start_epoch} the lr is {now:.3g} (the old schedule's: {was:.3g})")


def resume_checkpoint(args, model, optimizer, scaler=None, fixed=FIXED_ON_RESUME):
    """Restore a run from --resume, or from <output_dir>/checkpoint.pth when it exists (a requeued
    job continues with the same command); the optimizer keeps its moments and takes this run's
    settings (weight decay, layer-decay scales); log.txt is rewritten from the checkpoint.
    -> (first epoch to run, the checkpoint or None: a stage restores its own entries)."""
    path = args.resume or (Path(args.output_dir) / "checkpoint.pth")
    args._args_history, args._log = [], []
    if not args.resume and not Path(path).is_file():
        return 0, None
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: no 'model' entry; --resume takes a training checkpoint")
    args._start_epoch = ckpt["epoch"] + 1 if "optimizer" in ckpt and "epoch" in ckpt else 0
    if isinstance(ckpt.get("args"), dict):  # this project's checkpoint: the run's flags
        check_resumed_args(args, ckpt["args"], path, fixed)
        args._args_history = list(ckpt.get("args_history") or [ckpt["args"]])
    load_state_strict(model, ckpt["model"], path)
    if not args._start_epoch:
        print0(f"loaded weights only from {path} (no optimizer state / epoch): starting at epoch 0")
        return 0, ckpt
    ours = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: optimizer state does not fit ({e})") from None
    for group, settings in zip(optimizer.param_groups, ours):
        group.update(settings)
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    old_log = Path(args.output_dir) / "log.txt"  # a checkpoint from before its log was saved in it
    args._log = ckpt.get("log") or [x for x in map(json.loads, old_log.read_text().splitlines() if old_log.is_file()
                                                   else []) if x["epoch"] <= ckpt["epoch"]]
    if is_main_process():
        write_log(args.output_dir, args._log)
    if Path(path).resolve() == (Path(args.output_dir) / "checkpoint.pth").resolve():
        args._saved_epoch = ckpt["epoch"]  # what a stop message reports
    print0(f"{path}: all {ckpt['epoch'] + 1} epochs are done (--epochs {args.epochs}): nothing to train; raise "
           f"--epochs to continue" if ckpt["epoch"] + 1 >= args.epochs else
           f"resumed {path}: epoch {ckpt['epoch']} done, continuing at {ckpt['epoch'] + 1}")
    return ckpt["epoch"] + 1, ckpt


def last_good(args):
    """What <output_dir>/checkpoint.pth holds, for the message of a stopped run."""
    epoch = getattr(args, "_saved_epoch", None)
    if epoch is None:
        return "No checkpoint was written."
    path = Path(args.output_dir) / "checkpoint.pth"
    return f"{path} still holds the last good epoch ({epoch}): rerun the same command to continue"


def end_epoch(args, model, optimizer, scaler, epoch, stats, log=None, extra=None, result=""):
    """After an epoch, one step Ctrl-C cannot split: rank 0 writes checkpoint.pth ('args': the flags,
    'args_history': those of every start, 'log': log.txt's lines, `extra`), every --save_every
    epochs a kept copy, then log.txt with this epoch's line (the train `stats` and `log`)."""
    args._log = [*getattr(args, "_log", []), {**{f"train_{k}": v for k, v in stats.items()}, **(log or {}),
                                              "epoch": epoch}]
    with uninterrupted():
        if is_main_process():
            history, bare = getattr(args, "_args_history", []), unwrap(model)
            state = {"model": bare.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
                     "args": plain_args(args), "args_history": history + [plain_args(args)],
                     "model_config": getattr(bare, "config", None), "log": args._log, **(extra or {})}
            save_checkpoint(Path(args.output_dir) / "checkpoint.pth", state)
            if args.save_every and ((epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs):
                save_checkpoint(Path(args.output_dir) / f"checkpoint-{epoch}.pth", state)
            write_log(args.output_dir, args._log)
        args._saved_epoch = epoch
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


def announce(args, world_size, images, steps):
    """Before the first step, say what will happen: the data, the schedule, the output folder, the
    effective batch and lr = blr x effective batch / 256 unless --lr is given (MAE's rule, set in
    args); a real run's schedule on the built-in toy data (a forgotten --data_path) is named."""
    toy = args.dataset == "synthetic" or args.dataset == "auto" and not args.data_path
    eff = args.batch_size * args.accum_iter * world_size
    args.lr = args.blr * eff / 256 if args.lr is None else args.lr
    if args.lr > 1e37:  # float32's range, which the optimizer computes in
        raise ConfigError(f"the lr {args.lr:g} = --blr x {eff} / 256 is beyond 1e37: lower --blr")
    if args.min_lr > args.lr:
        raise ConfigError(f"--min_lr {args.min_lr:g} exceeds the lr {args.lr:g}: the cosine schedule "
                          f"would rise instead of decay")
    print0(f"data: the built-in synthetic data, {images} images (pass --data_path for real images)" if toy else
           f"data: {args.data_path or './data'} ({args.dataset}), {images} training images")
    print0(f"schedule: {args.epochs} epochs of {steps} steps, {args.warmup_epochs:g} of them warm-up; "
           f"checkpoint.pth and log.txt go to {args.output_dir}")
    print0(f"effective batch {eff} = {args.batch_size} per process x {args.accum_iter} "
           f"accumulation x {world_size} processes; base lr {args.blr:.3g}, lr {args.lr:.3g}")
    if toy and args.epochs >= 100:
        print0(f"note: {args.epochs} epochs is a real run's schedule, here on {images} toy images: "
               f"give --data_path (ImageNet), or fewer --epochs for a try")


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
    g.add_argument("--dist_timeout", type=float, default=10.0, metavar="MIN",
                   help="under torchrun: minutes to wait for the other processes (start, each collective)")
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
    blr=between(0, 1e37, lo_ok=False), lr=between(0, 1e37, lo_ok=False), min_lr=between(0, 1e37),
    seed=between(0, 2 ** 63 - 1), dist_timeout=between(0, 1e6, lo_ok=False), weight_decay=NON_NEGATIVE, clip_grad=POSITIVE,
    mask_ratio=between(0, 1, hi_ok=False), min_crop_scale=between(0, 1, lo_ok=False),
    benchmark=NON_NEGATIVE, benchmark_warmup=NON_NEGATIVE,
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
    """Peak CUDA memory allocated by tensors, or the process's peak RSS on CPU (0 on Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
    except ImportError:
        return 0.0
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
    (FLOPs of one micro-batch, torch's FlopCounter on the eager model), peak memory, also
    written to benchmark.json. Returns False when it is not asked for."""
    if not args.benchmark:
        return False
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
    if is_main_process():
        (Path(args.output_dir) / "benchmark.json").write_text(json.dumps(report, indent=1))
    return True
