"""mae_pretrain.py as a user runs it: learning, resuming, DDP, and refusing bad input."""
import json
import signal
import subprocess
import sys

import pytest
import torch

import data
import mae_pretrain
from conftest import ROOT, TINY_DATA, USER_ERRORS, error_line, run_script, run_torchrun, wait_for

# 16 patches of 8x8; the preset's 12-block tiny encoder, MAE-Lite's 1-block decoder.
TINY = ["mae_pretrain.py", *TINY_DATA, "--patch_size", "8", "--warmup_epochs", "1", "--blr", "1e-3"]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]


def test_a_few_epochs_lower_the_loss_and_write_log_checkpoint_and_figure(tmp_path):
    out = tmp_path / "run"
    proc = run_script(*TINY, "--batch_size", "16", "--epochs", "4", "--blr", "2e-3", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert log[-1]["train_loss"] < 0.9 * log[0]["train_loss"]
    assert {"train_lr", "train_img_per_s", "train_peak_mem_mb"} <= log[0].keys()
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["args"]["mask_ratio"] == 0.75
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert (out / "reconstructions.png").stat().st_size > 10_000


def test_resuming_from_an_epoch_boundary_reproduces_the_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = [*TINY, "--batch_size", "16", "--epochs", "2"]
    assert run_script(*common, "--output_dir", a, "--save_every", "1").returncode == 0
    proc = run_script(*common, "--output_dir", b, "--resume", a / "checkpoint-0.pth")
    assert proc.returncode == 0, proc.stderr
    assert "continuing at 1" in proc.stdout
    assert max_diff(weights(a / "checkpoint.pth"), weights(b / "checkpoint.pth")) == 0.0


def test_a_run_killed_at_any_point_leaves_a_loadable_checkpoint_and_continues(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, *TINY, "--batch_size", "8", "--epochs", "6", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (out / "log.txt").exists(), proc)  # the first epoch is done
    proc.send_signal(signal.SIGKILL)  # somewhere in epoch 1, or while it saves
    proc.wait()
    done = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"]
    assert done < 5
    again = run_script(*cmd[1:])  # the same command: picks up <output_dir>/checkpoint.pth
    assert again.returncode == 0, again.stderr
    assert f"continuing at {done + 1}" in again.stdout
    assert [r["epoch"] for r in read_log(out)][-1] == 5


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = [*TINY, "--epochs", "2", "--accum_iter", "2"]
    p1 = run_script(*common, "--batch_size", "8", "--output_dir", one)
    p2 = run_torchrun(2, *common, "--batch_size", "4", "--output_dir", two)
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-2000:]
    assert "effective batch 16 = 4 per process x 2 accumulation x 2 processes" in p2.stdout
    assert max_diff(weights(one / "checkpoint.pth"), weights(two / "checkpoint.pth")) < 1e-4
    assert [r["train_loss"] for r in read_log(one)] == pytest.approx(
        [r["train_loss"] for r in read_log(two)], rel=1e-5)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run_script(*TINY, "--batch_size", "16", "--epochs", "1", "--output_dir", out).returncode == 0
    good = (out / "checkpoint.pth").read_bytes()
    proc = run_script(*TINY, "--batch_size", "16", "--epochs", "3", "--lr", "1e30",
                      "--print_freq", "1", "--output_dir", out)
    assert proc.returncode == 1
    assert "error: loss is nan at epoch 1" in error_line(proc)
    assert "still holds the last good epoch" in error_line(proc)
    assert (out / "checkpoint.pth").read_bytes() == good


@pytest.mark.parametrize("flags, message", [
    (["--mask_ratio", "1.0"], "--mask_ratio must lie in [0, 1), got 1.0"),
    (["--mask_ratio", "-0.1"], "--mask_ratio must lie in [0, 1), got -0.1"),
    (["--input_size", "36"], "--input_size 36 is not divisible by the patch size 8"),
    (["--data_path", "/no/such/dir"], "--data_path /no/such/dir: no such directory"),
    (["--batch_size", "128"], "the training set has 64 images: fewer than one optimizer step"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_bad_values_fail_at_start_with_a_clear_message(tmp_path, flags, message):
    args = mae_pretrain.get_args_parser().parse_args(
        [*TINY[1:], "--output_dir", str(tmp_path / "run"), *flags])
    with pytest.raises(USER_ERRORS) as e:
        mae_pretrain.main(args)
    assert message in str(e.value)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_a_bad_value_exits_non_zero_with_one_line(tmp_path):
    proc = run_script(*TINY, "--mask_ratio", "1.5", "--output_dir", tmp_path / "run")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --mask_ratio must lie in [0, 1), got 1.5"


def test_an_image_folder_without_train_split_is_named(tmp_path):
    (tmp_path / "imgs" / "val" / "cat").mkdir(parents=True)
    args = mae_pretrain.get_args_parser().parse_args(
        [*TINY[1:], "--data_path", str(tmp_path / "imgs"), "--output_dir", str(tmp_path / "run")])
    with pytest.raises(data.DataError, match="no train/ folder"):
        mae_pretrain.main(args)
