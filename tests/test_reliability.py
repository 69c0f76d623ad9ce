"""Nothing silently wrong after a resume, a swapped teacher or an odd dataset; one line for
every failure (a full disk, a bad environment, a peer that never comes); stages that import
without fcntl and resource (Windows)."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import analyze
import checkpoints
import data
import distill_pretrain as dp
import finetune
import mae_pretrain
import util
from conftest import ROOT, TINY_DATA, TINY_RUN, error_line, free_port, load, parse, run_torchrun, write_split
from vit import VisionTransformer


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    for split in ("train", "val"):
        write_split(root / split, ["cat", "dog"], n=4)
    return root


def ft(data_path, out, *flags):
    """A fine-tuning of 8 images in batches of 4 (2 steps per epoch) from scratch."""
    return finetune.main(parse(finetune, "--data_path", data_path, "--batch_size", "4", "--output_dir", out, *flags))


@pytest.fixture(scope="module")
def ft_run(two_classes, tmp_path_factory):
    """A 1-epoch fine-tuning: weight decay 0.05, layer decay 0.75, AdamW."""
    out = tmp_path_factory.mktemp("ft")
    ft(two_classes, out, "--epochs", "1")
    return out


def copy(run, dst):
    dst.mkdir()
    for f in run.iterdir():
        if f.is_file() and f.name != ".lock":
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


# -- silently wrong results --------------------------------------------------------------------


def test_a_resume_with_other_weight_and_layer_decay_trains_with_them(ft_run, two_classes, tmp_path):
    run = copy(ft_run, tmp_path / "run")
    ft(two_classes, run, "--epochs", "2", "--weight_decay", "0.3", "--layer_decay", "1.0")
    ckpt = load(run / "checkpoint.pth")
    groups = ckpt["optimizer"]["param_groups"]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.3}  # 1-D parameters and tokens stay at 0
    assert {g["lr_scale"] for g in groups} == {1.0}  # were 0.75 ** (13 - layer)
    assert (ckpt["args"]["weight_decay"], ckpt["args"]["layer_decay"]) == (0.3, 1.0)


def test_a_resume_with_another_optimizer_is_refused(ft_run, two_classes, tmp_path):
    run = copy(ft_run, tmp_path / "run")
    with pytest.raises(util.ConfigError, match="was trained with --optimizer adamw, this run has --optimizer lars"):
        ft(two_classes, run, "--epochs", "2", "--optimizer", "lars")


def tiny_teacher(path, seed):
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    torch.save({"model": vit.state_dict(), "model_config": vit.config}, path)
    return path


DISTILL = ["--method", "attn", "--input_size", "16", "--patch_size", "8", "--synthetic_samples", "16",
           "--num_workers", "0", "--batch_size", "8", "--warmup_epochs", "0"]


def test_a_distillation_resumed_with_other_teacher_weights_at_the_same_path_is_refused(tmp_path):
    teacher, out = tiny_teacher(tmp_path / "T.pth", 0), tmp_path / "run"
    dp.main(dp.get_args_parser().parse_args([*DISTILL, "--teacher", str(teacher), "--epochs", "1",
                                             "--output_dir", str(out)]))
    tiny_teacher(teacher, 1)  # replaced in place
    with pytest.raises(util.ConfigError, match="is not the teacher this run was distilled from"):
        dp.main(dp.get_args_parser().parse_args([*DISTILL, "--teacher", str(teacher), "--epochs", "2",
                                                 "--output_dir", str(out)]))
    assert load(out / "checkpoint.pth")["epoch"] == 0


def test_the_same_teacher_under_another_path_resumes_and_is_not_a_change(tmp_path, capsys, monkeypatch):
    teacher, out = tiny_teacher(tmp_path / "T.pth", 0), tmp_path / "run"
    dp.main(dp.get_args_parser().parse_args([*DISTILL, "--teacher", str(teacher), "--epochs", "1",
                                             "--output_dir", str(out)]))
    monkeypatch.chdir(tmp_path / "run")
    dp.main(dp.get_args_parser().parse_args([*DISTILL, "--teacher", "../T.pth", "--epochs", "2",
                                             "--output_dir", str(out)]))
    said = capsys.readouterr().out
    assert "--epochs 1 -> 2" in said and "--teacher" not in said.split("changed flags:")[1].splitlines()[0]
    assert load(out / "checkpoint.pth")["epoch"] == 1


def test_a_dataset_of_one_class_is_refused(tmp_path):
    for split in ("train", "val"):
        write_split(tmp_path / "d" / split, ["cat"], n=4)
    with pytest.raises(util.ConfigError, match=r"the data has 1 class \(cat\): a classifier needs 2 or more"):
        ft(tmp_path / "d", tmp_path / "run", "--epochs", "1")


def test_two_class_folders_that_are_one_real_folder_are_refused(tmp_path):
    write_split(tmp_path / "d" / "train", ["a", "b"], n=4)
    os.symlink(tmp_path / "d" / "train" / "a", tmp_path / "d" / "train" / "c")
    with pytest.raises(data.DataError, match="the class folders 'a' and 'c' are the same folder"):
        data.image_folder(str(tmp_path / "d" / "train"), None, data.open_image)


@pytest.mark.parametrize("mode, array", [("I", lambda a: a.astype("int32")), ("F", lambda a: a.astype("float32") / 255)])
def test_a_32_bit_image_is_refused_naming_the_file(tmp_path, mode, array):
    import numpy as np
    path = tmp_path / "x.tif"
    Image.fromarray(array(np.arange(64 * 64).reshape(64, 64) % 256)).save(path)
    assert Image.open(path).mode == mode
    with pytest.raises(data.CorruptImageError, match=f"{path}: 32-bit .* \\(PIL mode {mode}\\)"):
        data.decode_rgb(data.open_image(path))


def test_a_head_count_that_contradicts_the_checkpoint_is_refused(tmp_path):
    path = tiny_teacher(tmp_path / "T.pth", 0)  # records 2 heads
    args = analyze.get_args_parser().parse_args([str(path), *TINY_DATA, "--num_heads", "4", "--no-reconstruct",
                                                 "--output_dir", str(tmp_path / "a")])
    with pytest.raises(checkpoints.CheckpointError, match="the file records 2 heads, the head count given is 4"):
        analyze.main(args)
    with pytest.raises(checkpoints.CheckpointError, match="the file records 2 heads"):
        dp.main(dp.get_args_parser().parse_args([*DISTILL, "--teacher", str(path), "--teacher_num_heads", "4",
                                                 "--epochs", "1", "--output_dir", str(tmp_path / "d")]))


# -- lost data: one run per folder, one log line per finished epoch -----------------------------


def test_a_folder_with_only_another_runs_best_checkpoint_is_refused(ft_run, two_classes, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-best.pth").write_bytes((ft_run / "checkpoint-best.pth").read_bytes())
    with pytest.raises(util.ConfigError, match="has checkpoint-best.pth but no checkpoint.pth"):
        ft(two_classes, out, "--epochs", "1")


def test_a_signal_during_a_save_waits_for_the_save_and_its_log():
    # Ctrl-C's default handler, also when the suite runs in the background (SIGINT ignored there)
    old, done = signal.signal(signal.SIGINT, signal.default_int_handler), []
    try:
        with pytest.raises(KeyboardInterrupt):
            with util.uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("saved")  # reached: the signal waited
    finally:
        signal.signal(signal.SIGINT, old)
    assert done == ["saved"]


def test_a_log_line_lost_to_a_full_disk_is_rewritten_on_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    write_log = util.write_log
    monkeypatch.setattr(util, "write_log", lambda o, lines: util.write_atomic(Path(o) / "log.txt", full))
    with pytest.raises(util.ConfigError, match=f"cannot write {out / 'log.txt'} \\(no space left on the device\\)"):
        mae_pretrain.main(parse(mae_pretrain, "--epochs", "2", "--batch_size", "32", "--output_dir", out))
    assert load(out / "checkpoint.pth")["epoch"] == 0 and not (out / "log.txt").exists()
    monkeypatch.setattr(util, "write_log", write_log)
    mae_pretrain.main(parse(mae_pretrain, "--epochs", "2", "--batch_size", "32", "--output_dir", out))
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [0, 1]


def test_rolling_back_to_a_kept_checkpoint_continues_with_one_log_line_per_epoch(tmp_path, capsys):
    out = tmp_path / "run"
    mae_pretrain.main(parse(mae_pretrain, "--epochs", "3", "--batch_size", "32", "--save_every", "1",
                            "--output_dir", out))
    mae_pretrain.main(parse(mae_pretrain, "--epochs", "3", "--batch_size", "32", "--save_every", "1",
                            "--resume", out / "checkpoint-0.pth", "--output_dir", out))
    assert "continuing at 1" in capsys.readouterr().out
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [0, 1, 2]


# -- one line for every failure ------------------------------------------------------------------


def test_a_full_disk_under_torchs_writer_is_named_as_such(tmp_path, monkeypatch):
    def full(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:783] . unexpected pos 64 vs 0")
    monkeypatch.setattr(util.torch, "save", full)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: SimpleNamespace(total=100, used=100, free=0))
    with pytest.raises(checkpoints.CheckpointError, match=r"\(no space left on the device\); nothing was saved"):
        util.save_checkpoint(tmp_path / "checkpoint.pth", {"epoch": 0})


def test_an_export_that_fills_the_disk_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tiny_teacher(tmp_path / "T.pth", 0)
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(checkpoints.CheckpointError, match=r"\(no space left on the device\); nothing was exported"):
        checkpoints.export(path, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["T.pth"]  # neither the folder nor its temp
    monkeypatch.undo()
    checkpoints.export(path, tmp_path / "hf")  # the rerun is not refused
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]


def test_a_full_disk_at_the_reconstructions_is_one_line(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(mae_pretrain, "save_reconstruction_figure", full)
    out = tmp_path / "run"
    with pytest.raises(util.ConfigError, match=f"cannot write {out / 'reconstructions.png'} \\(no space left"):
        mae_pretrain.main(parse(mae_pretrain, "--epochs", "1", "--batch_size", "32", "--output_dir", out))


@pytest.mark.parametrize("flags, message", [
    (["--seed", "99999999999999999999"], "--seed must lie in [0, 9223372036854775807], got 99999999999999999999"),
    (["--lr", "1e38"], "--lr must lie in (0, 1e+37], got 1e+38"),
    (["--output_dir", ""], "--output_dir is empty"),
    (["--dist_timeout", "1e30"], "--dist_timeout must lie in (0, 1000000.0], got 1e+30"),  # beyond timedelta
])
def test_flags_that_would_end_in_a_traceback_are_refused(tmp_path, flags, message):
    with pytest.raises(util.ConfigError) as e:
        mae_pretrain.main(parse(mae_pretrain, "--output_dir", tmp_path / "run", *flags))
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("env, message", [
    (dict(RANK="0", WORLD_SIZE="2"), "WORLD_SIZE is 2 but MASTER_ADDR, MASTER_PORT are not set"),
    (dict(RANK="1"), "RANK 1 is not below WORLD_SIZE 1"),
    (dict(WORLD_SIZE="two"), "WORLD_SIZE='two' is not a whole number"),
])
def test_a_distributed_environment_without_torchrun_is_one_line(env, message):
    proc = subprocess.run([sys.executable, "mae_pretrain.py", *TINY_RUN, "--output_dir", "/nonexistent/run"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 1 and message in error_line(proc) and "Traceback" not in proc.stderr
    assert "start it with torchrun" in error_line(proc)


def rank0_alone(tmp_path, *flags):
    """Rank 0 of 2 with no rank 1: it hosts the rendezvous and waits there."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    return subprocess.Popen([sys.executable, "mae_pretrain.py", *TINY_RUN, "--output_dir", str(tmp_path / "run"),
                             *flags], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)), int(env["MASTER_PORT"])


def test_a_peer_that_never_comes_ends_the_rendezvous_at_dist_timeout_in_one_line(tmp_path):
    proc, _ = rank0_alone(tmp_path, "--dist_timeout", "0.05")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: rank 0 of 2 could not join the others at 127.0.0.1:")


def test_sigterm_ends_a_process_waiting_for_a_peer(tmp_path):
    import socket
    proc, port = rank0_alone(tmp_path)  # --dist_timeout 10 minutes

    def listening():  # rank 0's store is up: the process waits in torch's C++ for rank 1
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    while not listening() and proc.poll() is None:
        pass
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM) while waiting for another process")


def test_the_stages_import_without_fcntl_and_resource_as_on_windows():
    code = ("import sys; sys.modules['fcntl'] = sys.modules['resource'] = None\n"
            "import analyze, checkpoints, data, distill_pretrain, finetune, mae_pretrain, util\n"
            "import torch; print(util.peak_memory_mb(torch.device('cpu')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (0, "0.0\n"), proc.stderr


# -- weak messages, each now naming the fix ------------------------------------------------------


def test_a_pretraining_run_resumed_by_finetune_says_use_finetune(two_classes, tmp_path):
    out = tmp_path / "run"
    mae_pretrain.main(parse(mae_pretrain, "--epochs", "1", "--batch_size", "32", "--output_dir", out))
    with pytest.raises(util.ConfigError, match=f"is a mae_pretrain.py run, not a finetune.py one: start a fine-"
                                               f"tuning from it with --finetune {out / 'checkpoint.pth'}"):
        ft(two_classes, out, "--epochs", "1")


def test_a_linear_probe_evaluated_without_linprobe_says_add_it(two_classes, tmp_path):
    out = tmp_path / "probe"
    ft(two_classes, out, "--epochs", "1", "--linprobe")
    with pytest.raises(checkpoints.CheckpointError, match="is a linear probe .*: add --linprobe"):
        ft(two_classes, tmp_path / "eval", "--eval", "--resume", out / "checkpoint.pth")


def test_resume_naming_a_folder_says_give_the_file(ft_run, two_classes, tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="is a folder: give the checkpoint file in it"):
        ft(two_classes, tmp_path / "new", "--epochs", "2", "--resume", ft_run)


def test_a_new_analysis_replaces_the_files_of_an_earlier_one(tmp_path, capsys):
    out = tmp_path / "a"
    out.mkdir()
    (out / "reconstructions_old_model.png").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    path = tiny_teacher(tmp_path / "T.pth", 0)
    analyze.main(analyze.get_args_parser().parse_args([str(path), *TINY_DATA, "--no-reconstruct", "--output_dir",
                                                       str(out)]))
    assert "replacing the 1 files of an earlier analysis" in capsys.readouterr().out
    assert not (out / "reconstructions_old_model.png").exists() and (out / "notes.txt").exists()


def test_files_skipped_for_their_extension_are_counted(tmp_path, capsys):
    write_split(tmp_path / "train", ["a", "b"], n=4)
    (tmp_path / "train" / "a" / "readme.txt").write_text("x")
    args = parse(finetune, "--data_path", tmp_path)
    data.build_dataset(args, train=True)
    assert "skipped 1 file(s) whose extension is not an image's, first " in capsys.readouterr().out


def test_more_epochs_on_resume_say_where_the_lr_goes(ft_run, two_classes, tmp_path, capsys):
    run = copy(ft_run, tmp_path / "run")
    ft(two_classes, run, "--epochs", "3")
    assert "--epochs 1 -> 3: the cosine schedule is recomputed; at epoch 1 the lr is " in capsys.readouterr().out


def test_evaluating_at_another_input_size_says_so(ft_run, two_classes, tmp_path, capsys):
    ft(two_classes, tmp_path / "e", "--eval", "--resume", ft_run / "checkpoint.pth", "--input_size", "48")
    assert f"{ft_run / 'checkpoint.pth'}: trained at 32 px, evaluated at --input_size 48" in capsys.readouterr().out


def test_under_torchrun_an_error_every_rank_meets_is_printed_once(tmp_path):
    proc = run_torchrun(2, "mae_pretrain.py", *TINY_RUN, "--mask_ratio", "0.99", "--output_dir", tmp_path / "run")
    assert proc.returncode != 0
    assert proc.stderr.count("error: --mask_ratio 0.99 keeps none of the 16 patches") == 1
