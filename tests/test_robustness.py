"""Nothing silently wrong: what a resumed run may change, weights that are never saved
non-finite, bad flags and files refused with one line, interrupts, and the run folder."""
import errno
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import analyze
import data
import finetune
import mae_pretrain
import util
from conftest import ROOT, TINY_DATA, TINY_RUN, copy_run, load, parse, run_script, wait_for
from vit import VisionTransformer


def mae_args(*flags):
    return parse(mae_pretrain, *flags)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A 1-epoch MAE-Tiny run (3 heads, batch 16) in its own folder."""
    out = tmp_path_factory.mktemp("run")
    mae_pretrain.main(mae_args("--epochs", "1", "--batch_size", "16", "--output_dir", out))
    return out


# -- resuming ---------------------------------------------------------------------------


def test_a_resume_that_changes_the_head_count_is_refused_naming_flag_values_and_file(one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path / "run")
    with pytest.raises(util.ConfigError) as e:
        mae_pretrain.main(mae_args("--epochs", "2", "--batch_size", "16", "--num_heads", "6",
                                   "--output_dir", run))
    msg = str(e.value)
    assert msg.startswith(f"{run / 'checkpoint.pth'} (found in --output_dir {run}) was trained with "
                          f"--num_heads (not given), this run has --num_heads 6")
    assert load(run / "checkpoint.pth")["epoch"] == 0  # untouched


@pytest.mark.parametrize("flags, flag", [(["--decoder_depth", "2"], "decoder_depth"),
                                         (["--no-norm_pix_loss"], "norm_pix_loss"),
                                         (["--model", "mae_vit_small"], "model")])
def test_a_resume_that_changes_the_model_or_the_loss_is_refused(one_epoch, tmp_path, flags, flag):
    run = copy_run(one_epoch, tmp_path / "run")
    with pytest.raises(util.ConfigError, match=f"was trained with --{flag} "):
        mae_pretrain.main(mae_args("--epochs", "2", "--batch_size", "16", *flags, "--output_dir", run))


def test_a_resume_with_another_batch_size_lists_the_change_and_keeps_the_history(one_epoch, tmp_path, capsys):
    run = copy_run(one_epoch, tmp_path / "run")
    mae_pretrain.main(mae_args("--epochs", "2", "--batch_size", "32", "--output_dir", run))
    out = capsys.readouterr().out
    assert "with changed flags: --batch_size 16 -> 32, --epochs 1 -> 2" in out
    ckpt = load(run / "checkpoint.pth")
    assert [a["batch_size"] for a in ckpt["args_history"]] == [16, 32]
    assert ckpt["args"]["batch_size"] == 32 and ckpt["epoch"] == 1


# -- never save non-finite weights ------------------------------------------------------


def test_weights_sent_beyond_float32_by_one_step_are_not_saved(tmp_path):
    """--lr 1e37: the one step of epoch 0 is taken with a finite loss, and leaves weights
    whose squares overflow; the run stops before writing anything."""
    out = tmp_path / "run"
    with pytest.raises(util.NonFiniteLossError) as e:
        mae_pretrain.main(mae_args("--epochs", "2", "--batch_size", "64", "--lr", "1e37",
                                   "--output_dir", out))
    assert "after epoch 0 the weight" in str(e.value) and "No checkpoint was written" in str(e.value)
    assert not (out / "checkpoint.pth").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must lie in (0, 1e+37], got -1.0"),
    (["--lr", "inf"], "--lr must lie in (0, 1e+37], got inf"),
    (["--blr", "-1"], "--blr must lie in (0, 1e+37], got -1.0"),
    (["--min_lr", "nan"], "--min_lr must lie in [0, 1e+37], got nan"),
    (["--clip_grad", "-1"], "--clip_grad must be positive, got -1.0"),
    (["--weight_decay", "-1"], "--weight_decay must be 0 or more, got -1.0"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be 0 or more, got -1.0"),
    (["--print_freq", "0"], "--print_freq must be at least 1, got 0"),
    (["--num_workers", "-1"], "--num_workers must be 0 or more, got -1"),
    (["--patch_size", "-4"], "--patch_size must be at least 1, got -4"),
    (["--synthetic_samples", "-5"], "--synthetic_samples must be at least 1, got -5"),
    (["--save_every", "-2"], "--save_every must be 0 or more, got -2"),
    (["--min_crop_scale", "0"], "--min_crop_scale must lie in (0, 1], got 0.0"),
    (["--decoder_embed_dim", "90"], "--decoder_embed_dim 90 must be divisible by 4 (its sin-cos position embedding)"),
    (["--decoder_embed_dim", "100"], "--decoder_embed_dim 100 is not divisible by --decoder_num_heads 3"),
    (["--num_heads", "5"], "--num_heads 5 does not divide the width 192 of --model mae_vit_tiny"),
])
def test_a_numeric_flag_out_of_range_is_refused_naming_it(tmp_path, flags, message):
    with pytest.raises(util.ConfigError) as e:
        mae_pretrain.main(mae_args(*flags, "--output_dir", tmp_path / "run"))
    assert str(e.value).startswith(message)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_a_bad_flag_on_the_command_line_is_one_line_and_status_1(tmp_path):
    proc = run_script("mae_pretrain.py", *TINY_RUN, "--lr", "-1", "--output_dir", tmp_path / "run")
    assert (proc.returncode, proc.stderr) == (1, "error: --lr must lie in (0, 1e+37], got -1.0\n")


# -- data and names -----------------------------------------------------------------------


def write_folder(root, classes, n=2):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / c / f"{i}.png")


def test_train_and_val_with_other_class_names_are_refused_listing_the_difference(tmp_path):
    write_folder(tmp_path / "data" / "train", ["cat", "dog"])
    write_folder(tmp_path / "data" / "val", ["bird", "cat"])
    args = parse(finetune, "--data_path", tmp_path / "data", "--output_dir", tmp_path / "run")
    with pytest.raises(util.ConfigError) as e:
        finetune.main(args)
    assert str(e.value) == ("the training and validation splits have different classes (only in "
                            "train: ['dog'], only in val: ['bird'])")


def test_a_symlink_loop_inside_an_image_folder_counts_each_image_once(tmp_path, capsys):
    write_folder(tmp_path / "data" / "train", ["cat", "dog"], n=20)
    (tmp_path / "data" / "train" / "cat" / "loop").symlink_to("..")
    args = mae_args("--data_path", tmp_path / "data")
    ds, classes = data.build_dataset(args, train=True)
    assert len(ds) == 40 and classes == ["cat", "dog"]
    assert [t for _, t in ds.samples].count(0) == 20  # dog's images are not filed under cat
    assert "skipped 1 symlinked folder(s)" in capsys.readouterr().out


def test_a_folder_of_links_to_images_still_loads(tmp_path):
    """The README's subsets are folders of links to the images of another folder."""
    write_folder(tmp_path / "full" / "train", ["a", "b"], n=3)
    for c in ("a", "b"):
        (tmp_path / "sub" / "train" / c).mkdir(parents=True)
        (tmp_path / "sub" / "train" / c / "0.png").symlink_to(tmp_path / "full" / "train" / c / "0.png")
    ds, _ = data.build_dataset(mae_args("--data_path", tmp_path / "sub"), train=True)
    assert len(ds) == 2


def test_analysis_names_whose_file_labels_collide_are_refused(tmp_path):
    args = analyze.get_args_parser().parse_args(["a.pth", "b.pth", "--names", "A B", "A_B"])
    with pytest.raises(util.ConfigError, match="'A B' and 'A_B' give the same file label 'A_B'"):
        analyze.main(args)


# -- checkpoints that cannot be used --------------------------------------------------------


def vit_state(**kw):
    torch.manual_seed(0)
    cfg = {**dict(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=0), **kw}
    return VisionTransformer(**cfg).state_dict()


@pytest.mark.parametrize("case, message", [
    ("only patch_embed", "has no blocks.0.mlp.fc1.weight (a partial checkpoint?"),
    ("no MLP", "has no blocks.0.mlp.fc1.weight (a partial checkpoint?"),
    ("pos_embed of 20 rows", "pos_embed has 20 rows: not a cls row plus a square grid of patches"),
    ("NaN weight", "blocks.3.attn.qkv.weight holds NaN or infinite values"),
])
def test_an_unusable_checkpoint_is_one_line_naming_file_and_key(tmp_path, case, message):
    sd = vit_state()
    if case == "only patch_embed":
        sd = {k: v for k, v in sd.items() if k.startswith("patch_embed")}
    elif case == "no MLP":
        sd = {k: v for k, v in sd.items() if ".mlp." not in k}
    elif case == "pos_embed of 20 rows":
        sd["pos_embed"] = torch.randn(1, 20, 192)
    else:
        sd["blocks.3.attn.qkv.weight"][0, 0] = math.nan
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    ft = parse(finetune, "--finetune", path, "--epochs", "1", "--output_dir", tmp_path)
    an = analyze.get_args_parser().parse_args([str(path), *TINY_DATA, "--output_dir", str(tmp_path)])
    for stage, args in ((finetune, ft), (analyze, an)):
        with pytest.raises(util.CheckpointError) as e:
            stage.main(args)
        assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


def test_a_pickle_that_would_run_a_shell_command_is_refused_as_such(tmp_path):
    class Shell:
        def __reduce__(self):
            return (os.system, ("echo this would run",))
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": Shell()}, path)
    with pytest.raises(util.CheckpointError) as e:
        util.load_checkpoint(path)
    assert str(e.value) == (f"{path}: holds Python objects other than tensors (posix.system): "
                            f"unpickling it would run code, so it was refused (load it with "
                            f"weights_only=False only if you trust its source)")


# -- the run folder ---------------------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    proc = run_script("mae_pretrain.py", *TINY_RUN, "--output_dir", tmp_path / "taken")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: --output_dir {tmp_path / 'taken'} is a file, not a folder: choose another --output_dir"


def test_an_output_dir_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch):
    """Root ignores read-only modes, so the failed write is simulated."""
    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(util.tempfile, "TemporaryFile", refuse)
    with pytest.raises(util.ConfigError, match="cannot write there \\(Permission denied\\)"):
        mae_pretrain.main(mae_args("--output_dir", tmp_path / "run"))
    assert not (tmp_path / "run" / "log.txt").exists()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    util.save_checkpoint(path, {"epoch": 0})
    before = path.read_bytes()

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(util.torch, "save", full)
    with pytest.raises(util.CheckpointError) as e:
        util.save_checkpoint(path, {"epoch": 1})
    assert str(e.value) == f"cannot write {path} (no space left on the device); the previous one is intact"
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_checkpoints_follow_the_umask_like_the_log(tmp_path):
    old = os.umask(0o022)
    try:
        util.save_checkpoint(tmp_path / "checkpoint.pth", {"epoch": 0})
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint.pth").stat().st_mode & 0o777 == 0o644


def test_temp_files_left_by_a_killed_save_are_removed_by_the_next_run(tmp_path):
    stale = tmp_path / "checkpoint.pth.1234.abcd.tmp"
    stale.write_bytes(b"x" * 100)
    (tmp_path / "notes.tmp").write_text("not ours")
    util.prepare_output_dir(mae_args("--output_dir", tmp_path))
    assert not stale.exists() and (tmp_path / "notes.tmp").exists()


def test_ctrl_c_ends_with_one_line_saying_what_the_checkpoint_holds_and_status_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, *TINY_RUN, "--batch_size", "8", "--epochs", "50", "--output_dir", str(out)]
    cmd.insert(1, "mae_pretrain.py")
    # Ctrl-C's default action, even when this suite runs in the background (where the shell
    # starts it with SIGINT ignored, and a child keeps what it inherits)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: (out / "log.txt").exists(), proc)  # the first epoch is done
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    epoch = load(out / "checkpoint.pth")["epoch"]
    assert "Traceback" not in err  # the progress bars share stderr; the last line is ours
    assert err.strip().splitlines()[-1] == (f"interrupted. {out / 'checkpoint.pth'} still holds the last "
                                            f"good epoch ({epoch}): rerun the same command to continue")
