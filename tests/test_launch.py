"""Launching without torchrun: the training scripts need only the environment a launcher
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as torchrun sets it on
every node of a multi-node job. Here two processes are started by hand as two nodes of
one process each (both LOCAL_RANK 0), over gloo on the CPU.

What a CPU cannot run is the GPU choice itself: that each process takes cuda:LOCAL_RANK
(not cuda:RANK, which does not exist on a second node) is checked on init_distributed
with CUDA faked, not on GPUs."""
import json
import os
import subprocess
import sys

import pytest
import torch

import util
from conftest import ROOT, TINY_DATA, free_port

# One epoch of two optimizer steps at a global batch of 16 (2 processes x 4 x 2 accumulation).
TINY = ["mae_pretrain.py", *TINY_DATA, "--synthetic_samples", "32", "--patch_size", "8",
        "--warmup_epochs", "0", "--blr", "1e-3", "--epochs", "1", "--accum_iter", "2"]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def launch(rank, world, port, *flags):
    """A process as a launcher starts it: the rendezvous in the environment, one thread
    (tiny models lose much from intra-op threads on a busy 2-core machine)."""
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *TINY, *map(str, flags)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_hand_launched_nodes_form_the_group_and_match_one_process(tmp_path):
    out, ref = tmp_path / "two_nodes", tmp_path / "one"
    port = free_port()
    procs = [launch(rank, 2, port, "--batch_size", 4, "--output_dir", out) for rank in (0, 1)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=300) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], err0[-2000:] + err1[-2000:]
    assert "effective batch 16 = 4 per process x 2 accumulation x 2 processes" in out0
    assert out1 == ""  # only rank 0 prints, logs and saves on the shared output_dir
    assert len((out / "log.txt").read_text().splitlines()) == 1
    one = launch(0, 1, port, "--batch_size", 8, "--output_dir", ref)  # WORLD_SIZE 1: no group
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err[-2000:]
    a, b = weights(ref / "checkpoint.pth"), weights(out / "checkpoint.pth")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    losses = [json.loads(line)["train_loss"] for line in (out / "log.txt").read_text().splitlines()]
    assert losses == pytest.approx([json.loads(line)["train_loss"] for line in
                                    (ref / "log.txt").read_text().splitlines()], rel=1e-5)


def test_with_cuda_each_process_takes_the_gpu_of_its_local_rank_and_nccl(monkeypatch):
    """Rank 11 of 16 is the fourth process on the second of two 8-GPU nodes: cuda:3."""
    calls = []
    monkeypatch.setattr(util.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(util.torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(util.dist, "init_process_group", lambda backend, **kw: calls.append(("group", backend)))
    monkeypatch.setattr(util, "watch_signals", lambda: None)  # no thread left behind in the test process
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "11")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_RANK", "3")
    info = util.init_distributed("auto")
    assert (info.rank, info.world_size, info.local_rank, info.device) == (11, 16, 3, torch.device("cuda", 3))
    assert calls == [("set_device", 3), ("group", "nccl")]
    calls.clear()
    assert util.init_distributed("cpu").device == torch.device("cpu") and calls == [("group", "gloo")]
