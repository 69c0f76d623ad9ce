"""Shared helpers: the project root on sys.path, and running the stage scripts as a user would."""
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import checkpoints  # noqa: E402  (after the project root is on sys.path)
import data  # noqa: E402
import util  # noqa: E402

# What a run reports in one line: util's own errors and the ValueErrors of the modules that can
# be copied alone (they import nothing of util's).
USER_ERRORS = (util.UserError, checkpoints.CheckpointError, data.DataError)

# A small but complete configuration for the command-line scripts: 32x32 images, 16
# patches of 8x8, the built-in synthetic data, no worker processes.
TINY_DATA = ["--input_size", "32", "--synthetic_samples", "64", "--num_workers", "0"]

# What an MAE-Hiera's state_dict holds beyond timm's Hiera encoder (whose head.norm it lacks):
# the tests that load one into timm's with strict=False check that nothing else was skipped.
MAE_HIERA_ONLY = {"decoder_blocks", "decoder_embed", "decoder_norm", "decoder_pos_embed", "decoder_pred",
                  "encoder_norm", "mask_token", "multi_scale_fusion_heads"}

# The MAE-Tiny runs the run-folder tests start and resume: no warm-up, a lr that learns fast.
TINY_RUN = [*TINY_DATA, "--patch_size", "8", "--warmup_epochs", "0", "--blr", "1e-3"]


def parse(stage, *flags):
    """A stage's parsed flags for a TINY_RUN plus `flags`, as main() receives them."""
    return stage.get_args_parser().parse_args([*map(str, TINY_RUN), *map(str, flags)])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def copy_run(src, dst):
    """A copy of the run folder `src` (its checkpoint and log) at `dst`."""
    dst.mkdir()
    for name in ("checkpoint.pth", "log.txt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def write_split(root, classes, n=8):
    """An image folder split: `n` 32x32 PNGs per class, one colour per class and image."""
    from PIL import Image
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (30 * c + 10 * i, 90, 200 - 20 * c)).save(root / name / f"{i}.png")


def run_script(*args, timeout=300):
    """Run `python <args>` from the project root; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def run_torchrun(nproc, *args, timeout=300):
    port = free_port()
    return run_script("-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                      "--master_addr=127.0.0.1", f"--master_port={port}", *args, timeout=timeout)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, proc):
    """Wait for an event (never for a duration: a busy machine only waits longer)."""
    deadline = time.monotonic() + 900
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(), "the event never came"


def error_line(proc):
    """The last non-empty stderr line (where a clean failure puts its message)."""
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""
