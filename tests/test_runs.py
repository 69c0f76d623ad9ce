"""No lost runs: one run per output folder, class names that travel with a classifier,
16-bit images, export checks, the one-line ends of a run (SIGTERM, a stopped peer), and the
design card's command, `distill_pretrain.py --teacher mae_base.pth`, as written."""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import analyze
import checkpoints
import data
import distill_pretrain
import finetune
import hiera
import mae_pretrain
import util
from conftest import (ROOT, TINY_DATA, TINY_RUN, copy_run, error_line, load, parse, run_script,
                      run_torchrun, wait_for, write_split)
from vit import VisionTransformer


def mae_args(*flags):
    return parse(mae_pretrain, *flags)


def ft_args(*flags):
    return parse(finetune, *flags)


@pytest.fixture(scope="module")
def run_b(tmp_path_factory):
    """A 2-epoch MAE-Tiny run in its own folder."""
    out = tmp_path_factory.mktemp("b")
    mae_pretrain.main(mae_args("--epochs", "2", "--batch_size", "16", "--output_dir", out))
    return out


# -- one run per output folder ----------------------------------------------------------------


def test_resuming_one_run_into_a_folder_holding_another_is_refused_and_the_folder_kept(run_b, tmp_path):
    a, b = copy_run(run_b, tmp_path / "a"), copy_run(run_b, tmp_path / "b")
    before = (b / "checkpoint.pth").read_bytes(), (b / "log.txt").read_text()
    with pytest.raises(util.ConfigError, match=f"--output_dir {b} holds another run \\(checkpoint.pth\\); "
                                               f"resuming {a / 'checkpoint.pth'} there would overwrite it"):
        mae_pretrain.main(mae_args("--epochs", "3", "--batch_size", "16", "--resume", a / "checkpoint.pth",
                                   "--output_dir", b))
    assert ((b / "checkpoint.pth").read_bytes(), (b / "log.txt").read_text()) == before


def test_a_second_run_in_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    util.prepare_output_dir(mae_args("--output_dir", out))  # this test's process now holds the folder
    proc = run_script("mae_pretrain.py", *TINY_RUN, "--epochs", "1", "--output_dir", out)
    assert proc.returncode == 1
    assert error_line(proc) == (f"error: --output_dir {out} is in use by another run (pid {os.getpid()}): "
                                f"wait for it to end or choose another --output_dir")
    assert not (out / "log.txt").exists()


def test_the_lock_of_a_run_killed_with_sigkill_does_not_block_the_next(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "mae_pretrain.py", *TINY_RUN, "--epochs", "50", "--batch_size", "8", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = out / ".lock"
    wait_for(lambda: lock.exists() and lock.read_text().strip() == str(proc.pid), proc)
    proc.kill()
    proc.wait()
    again = run_script("mae_pretrain.py", *TINY_RUN, "--epochs", "1", "--batch_size", "16", "--output_dir", out)
    assert again.returncode == 0, again.stderr[-1000:]
    assert lock.read_text().strip() != str(proc.pid)


# -- classifiers and their classes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cat_dog(tmp_path_factory):
    """A 1-epoch classifier of {cat, dog}, and a data folder of {bird, cat}."""
    root = tmp_path_factory.mktemp("classes")
    for split in ("train", "val"):
        write_split(root / "cat_dog" / split, ["cat", "dog"])
        write_split(root / "bird_cat" / split, ["bird", "cat"])
    out = root / "run"
    finetune.main(ft_args("--data_path", root / "cat_dog", "--epochs", "1", "--batch_size", "8",
                          "--output_dir", out))
    return out, root / "bird_cat"


def test_a_classifier_records_its_class_names(cat_dog):
    run, _ = cat_dog
    assert load(run / "checkpoint.pth")["class_names"] == ["cat", "dog"]
    assert load(run / "checkpoint-best.pth")["class_names"] == ["cat", "dog"]


def test_evaluating_a_classifier_on_data_with_other_classes_is_refused(cat_dog):
    run, other = cat_dog
    with pytest.raises(util.ConfigError) as e:
        finetune.main(ft_args("--eval", "--resume", run / "checkpoint-best.pth", "--data_path", other))
    assert str(e.value) == (f"{run / 'checkpoint-best.pth'}: was trained on other classes than this data's "
                            f"(only in the checkpoint: ['dog'], only in the data: ['bird'])")


def test_resuming_a_fine_tuning_on_data_with_other_classes_is_refused(cat_dog, tmp_path):
    run, other = cat_dog
    copy = copy_run(run, tmp_path / "run")
    with pytest.raises(util.ConfigError, match="was trained on other classes than this data's"):
        finetune.main(ft_args("--data_path", other, "--epochs", "2", "--batch_size", "8", "--output_dir", copy))
    assert load(copy / "checkpoint.pth")["epoch"] == 0


def test_a_16_bit_grey_png_keeps_its_grey_levels(tmp_path):
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)  # 0, 64, 128, 255 in 8 bits
    Image.fromarray(levels).save(tmp_path / "g16.png")
    img = data.open_image(tmp_path / "g16.png")
    assert img.mode == "I;16"
    rgb, _ = data.decode_rgb(img)
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 64, 128, 255]  # PIL's own RGB: [0, 255, 255, 255]


# -- export ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "enc.pth"
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0)
    torch.save({"model": vit.state_dict(), "model_config": vit.config}, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("heads", "was trained with 3 heads; --num_heads 6 would split its attention otherwise"),
    ("file", "is a file; give a new or empty output folder"),
    ("full", "already holds files; give a new or empty output folder"),
    ("ratio", "--mask_ratio must lie in [0, 1), got nan"),
    ("nan", "blocks.0.attn.qkv.weight holds NaN or infinite values; not exported"),
])
def test_an_export_that_would_write_something_wrong_is_refused(encoder, tmp_path, case, message):
    out, path, kw = tmp_path / "hf", encoder, {}
    if case == "heads":
        kw = dict(num_heads=6)
    elif case == "file":
        out.write_text("x")
    elif case == "full":
        out.mkdir()
        (out / "config.json").write_text("{}")
    elif case == "ratio":
        kw = dict(mask_ratio=math.nan)
    else:
        sd = load(encoder)
        sd["model"]["blocks.0.attn.qkv.weight"][0, 0] = math.nan
        path = tmp_path / "nan.pth"
        torch.save(sd, path)
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.export(path, out, **kw)
    assert message in str(e.value)
    assert case in ("file", "full") or not out.exists()


def test_exported_files_follow_the_umask(encoder, tmp_path):
    old = os.umask(0o022)
    try:
        checkpoints.export(encoder, tmp_path / "hf", num_heads=3)  # the recorded count: accepted
    finally:
        os.umask(old)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "hf").iterdir()} == \
        {"config.json": 0o644, "model.safetensors": 0o644}


# -- checks with one line ------------------------------------------------------------------------


def test_a_full_disk_reported_by_torchs_writer_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    util.save_checkpoint(path, {"epoch": 0})
    before = path.read_bytes()

    def full(obj, f):  # what torch.save raises when the disk fills mid-write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . unexpected pos 64 vs 0")
    monkeypatch.setattr(util.torch, "save", full)
    with pytest.raises(util.CheckpointError) as e:
        util.save_checkpoint(path, {"epoch": 1})
    assert str(e.value) == (f"cannot write {path} ([enforce fail at inline_container.cc:783] . unexpected pos "
                            f"64 vs 0); the previous one is intact")
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("script, flags, message", [
    ("mae_pretrain.py", ["--mask_ratio", "0.99"], "--mask_ratio 0.99 keeps none of the 4 patches"),
    ("mae_pretrain.py", ["--dataset", "synthetic", "--data_path", "somewhere"],
     "--dataset synthetic makes its own images: --data_path somewhere would be ignored"),
    ("finetune.py", ["--eval", "--resume", "a.pth", "--finetune", "b.pth"],
     "--eval evaluates one classifier: give --resume PATH or --finetune PATH, not both"),
    ("finetune.py", ["--model", "hiera_lite_tiny", "--num_heads", "5"], "width 46 is not divisible by 5 heads"),
])
def test_more_bad_input_ends_in_one_line(tmp_path, script, flags, message):
    proc = run_script(script, *TINY_DATA, *flags, "--output_dir", tmp_path / "run")
    assert proc.returncode == 1, proc.stderr[-1000:]
    assert message in error_line(proc) and "Traceback" not in proc.stderr


def test_a_hiera_analysis_that_would_reconstruct_from_no_mask_unit_is_refused_before_the_analysis(tmp_path):
    mae = hiera.create_hiera("mae_hiera_tiny", img_size=64)
    path = tmp_path / "mae_hiera.pth"
    torch.save({"model": mae.state_dict(), "model_config": mae.config}, path)
    args = analyze.get_args_parser().parse_args([str(path), *TINY_DATA, "--mask_ratio", "0.9",
                                                 "--output_dir", str(tmp_path / "out")])
    with pytest.raises(util.ConfigError, match="reconstructions at --input_size 32: mask ratio 0.9 keeps none "
                                               "of the 1 mask units"):
        analyze.main(args)
    assert not (tmp_path / "out").exists()


def test_a_resume_lists_an_explicit_lr_and_says_when_nothing_is_left_to_train(run_b, tmp_path, capsys):
    run = copy_run(run_b, tmp_path / "run")
    capsys.readouterr()
    mae_pretrain.main(mae_args("--epochs", "1", "--batch_size", "16", "--lr", "5e-4", "--output_dir", run))
    out = capsys.readouterr().out
    assert "--lr 6.25e-05 -> 0.0005" in out
    assert f"{run / 'checkpoint.pth'}: all 2 epochs are done (--epochs 1): nothing to train" in out
    assert load(run / "checkpoint.pth")["epoch"] == 1


def test_a_resume_names_the_flag_given_and_an_empty_value_as_not_given(cat_dog, tmp_path):
    run, _ = cat_dog
    copy = copy_run(run, tmp_path / "run")
    data_path = load(run / "checkpoint.pth")["args"]["data_path"]
    for flags, message in ((["--cls_token"], "was trained with --cls_token False, this run has --cls_token True"),
                           (["--finetune", copy / "checkpoint.pth"], "was trained with --finetune (not given), "
                                                                     f"this run has --finetune {copy / 'checkpoint.pth'}")):
        with pytest.raises(util.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            finetune.main(ft_args("--data_path", data_path, "--epochs", "2", "--batch_size", "8",
                                  "--output_dir", copy, *flags))


def test_a_fine_tuning_checkpoint_from_before_cls_token_resumes_and_keeps_its_pooling(cat_dog, tmp_path):
    """Checkpoints written before --cls_token recorded the pooling as args['global_pool'] (True = mean)."""
    run, _ = cat_dog
    ckpt = load(run / "checkpoint.pth")
    old_args = {k: v for k, v in ckpt["args"].items() if k != "cls_token"}
    (tmp_path / "run").mkdir()
    util.save_checkpoint(tmp_path / "run" / "checkpoint.pth", {**ckpt, "args": {**old_args, "global_pool": True}})
    flags = ("--data_path", ckpt["args"]["data_path"], "--batch_size", "8", "--output_dir", tmp_path / "run")
    with pytest.raises(util.ConfigError, match="was trained with --cls_token False, this run has --cls_token True"):
        finetune.main(ft_args(*flags, "--epochs", "2", "--cls_token"))
    finetune.main(ft_args(*flags, "--epochs", "2"))
    assert load(tmp_path / "run" / "checkpoint.pth")["epoch"] == 1


@pytest.fixture
def signals():
    """util.run_main installs its SIGTERM handler and ignores both signals while it ends: put
    this process's handlers back afterwards."""
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in old.items():
        signal.signal(s, handler)


def test_an_interrupted_analysis_says_only_that(monkeypatch, capsys, signals):
    monkeypatch.setattr(sys, "argv", ["analyze.py", "x.pth"])

    def interrupted(args):
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        util.run_main(interrupted, analyze.get_args_parser())
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted.\n"


def test_a_sigterm_while_a_run_ends_does_not_interrupt_its_one_line(monkeypatch, capsys, signals):
    """torchrun sends SIGTERM to every other rank as soon as one fails: a rank already ending
    on its own error (a lost peer, say) must still end with its one line."""
    class Bar:  # an open progress bar: closing it is the first thing the end does
        def close(self):
            os.kill(os.getpid(), signal.SIGTERM)

    def lost(args):
        raise util.UserError("a peer stopped")
    monkeypatch.setattr(sys, "argv", ["mae_pretrain.py"])
    monkeypatch.setattr(util.tqdm, "_instances", [Bar()], raising=False)
    with pytest.raises(SystemExit) as e:
        util.run_main(lost, mae_pretrain.get_args_parser())
    assert e.value.code == 1 and capsys.readouterr().err == "error: a peer stopped\n"


def test_sigterm_ends_a_run_like_ctrl_c_naming_the_last_good_epoch_with_status_143(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "mae_pretrain.py", *TINY_RUN, "--batch_size", "8", "--epochs", "50", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "log.txt").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in err
    epoch = load(out / "checkpoint.pth")["epoch"]
    assert err.strip().splitlines()[-1] == (f"terminated (SIGTERM). {out / 'checkpoint.pth'} still holds the last "
                                            f"good epoch ({epoch}): rerun the same command to continue")


def test_a_corrupt_image_on_one_rank_ends_every_rank_in_one_line_without_tracebacks(tmp_path):
    root = tmp_path / "data"
    write_split(root / "train", ["a", "b"])
    dataset, _ = data.build_dataset(mae_args("--data_path", root), train=True)
    sampler = data.EpochSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=0)
    sampler.set_epoch(0)
    bad = dataset.samples[next(iter(sampler))[0]][0]  # the first image rank 1 reads
    open(bad, "wb").write(b"not an image")
    proc = run_torchrun(2, "mae_pretrain.py", *TINY_RUN, "--data_path", root, "--batch_size", "4", "--epochs", "1",
                        "--output_dir", tmp_path / "run")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "terminated", "interrupted"))]
    assert sum(bad in line for line in ours) == 1 and len(ours) <= 2, proc.stderr[-3000:]
    # the one traceback left is torchrun's own summary of a failed child
    assert proc.stderr.count("Traceback (most recent call last)") <= 1 and "gloo" not in proc.stderr.lower(), \
        proc.stderr


# -- the design card's command -------------------------------------------------------------------


def test_the_cards_command_needs_only_the_teacher_and_runs_mae_lites_d_mae(tmp_path):
    """distill_pretrain.py --teacher mae_base.pth: the official encoder-only layout ({'model':
    encoder}, no recorded config). The data flags only make it small."""
    teacher = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=0)
    path = tmp_path / "mae_base.pth"
    torch.save({"model": teacher.state_dict()}, path)
    proc = run_script("distill_pretrain.py", "--teacher", path, *TINY_DATA, "--patch_size", "8", "--epochs", "1",
                      "--batch_size", "16", "--output_dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--method attn: student vit_tiny" in proc.stdout
    args = load(tmp_path / "run" / "checkpoint.pth")["args"]
    # MAE-Lite's recipe: crop scale 0.08, mask 0.75, warmup 40 of 400 epochs (here 0.1 of 1)
    assert (args["method"], args["warmup_epochs"], args["min_crop_scale"], args["mask_ratio"]) == ("attn", 0.1, 0.08, 0.75)
    assert {"train_pixel", "train_attn"} <= json.loads((tmp_path / "run" / "log.txt").read_text()).keys()
    before_training = proc.stdout.split("epoch 0:")[0]  # the first lines say what will happen
    for line in ("data: the built-in synthetic data, 64 images (pass --data_path for real images)",
                 f"schedule: 1 epochs of 4 steps, 0.1 of them warm-up; checkpoint.pth and log.txt go to {tmp_path / 'run'}",
                 "effective batch 16 = 16 per process x 1 accumulation x 1 processes", "--method attn: student vit_tiny"):
        assert line in before_training, line


def test_a_real_runs_schedule_on_the_built_in_data_says_so_before_training(capsys):
    args = parse(distill_pretrain, "--teacher", "t.pth")  # no --epochs, no --data_path
    distill_pretrain.check_args(args)  # MAE-Lite's 400 epochs
    util.announce(args, 1, 64, 4)
    assert ("note: 400 epochs is a real run's schedule, here on 64 toy images: give --data_path (ImageNet), "
            "or fewer --epochs for a try") in capsys.readouterr().out
