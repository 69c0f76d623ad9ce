"""Shared helpers: the project root on sys.path, and running the stage scripts as a user would."""
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A small but complete configuration for the command-line scripts: 32x32 images, 16
# patches of 8x8, the built-in synthetic data, no worker processes.
TINY_DATA = ["--input_size", "32", "--synthetic_samples", "64", "--num_workers", "0"]

# What an MAE-Hiera's state_dict holds beyond timm's Hiera encoder (whose head.norm it lacks):
# the tests that load one into timm's with strict=False check that nothing else was skipped.
MAE_HIERA_ONLY = {"decoder_blocks", "decoder_embed", "decoder_norm", "decoder_pos_embed", "decoder_pred",
                  "encoder_norm", "mask_token", "multi_scale_fusion_heads"}


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


def error_line(proc):
    """The last non-empty stderr line (where a clean failure puts its message)."""
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""
