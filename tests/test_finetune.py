"""finetune.py: exact distributed evaluation, the linear probe, loading classifiers in the
wild, LARS, the mixed-target loss, learning from an MAE checkpoint, and bad input."""
import argparse
import colorsys
import io
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoints
import data
import finetune
import mae_pretrain
import util
from conftest import TINY_DATA, USER_ERRORS, error_line, run_script, run_torchrun
from vit import VisionTransformer, create_vit

# vit_tiny (the smallest preset) on 32x32 images: 16 patches of 8x8.
TINY = [*TINY_DATA, "--patch_size", "8"]


def parse(*flags):
    return finetune.get_args_parser().parse_args([*map(str, TINY), *map(str, flags)])


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    """A vit_tiny MAE encoder + decoder from a short mae_pretrain.py run (patch 8)."""
    out = tmp_path_factory.mktemp("mae")
    args = mae_pretrain.get_args_parser().parse_args(
        [*TINY, "--epochs", "2", "--warmup_epochs", "1", "--batch_size", "16", "--blr", "1.5e-3",
         "--output_dir", str(out)])
    mae_pretrain.main(args)
    return out / "checkpoint.pth"


def classifier(seed, global_pool="avg"):
    """A vit_tiny classifier for 8 classes whose logits differ clearly between images."""
    torch.manual_seed(seed)
    model = create_vit("vit_tiny", img_size=32, patch_size=8, num_classes=8,
                                global_pool=global_pool).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


# -- evaluation --------------------------------------------------------------------


def test_two_processes_count_each_of_13_images_once_and_match_a_direct_computation(tmp_path):
    """13 validation images over 2 ranks: 7 + 6, no padded duplicate (DistributedSampler
    would evaluate 14). Counts must equal argmax / top-5 computed here on the model."""
    src = classifier(0)
    path = tmp_path / "classifier.pth"
    torch.save({"model": src.state_dict()}, path)
    flags = ["--synthetic_samples", "52"]  # the synthetic val split is a quarter: 13 images
    val, _ = data.build_dataset(parse(*flags), train=False, transform=data.eval_transform(32))
    imgs = data.normalize(torch.stack([val[i][0] for i in range(len(val))]))
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = src(imgs)
    top5 = logits.topk(5, dim=-1).indices
    ref1 = int((top5[:, 0] == labels).sum())
    ref5 = int((top5 == labels[:, None]).any(dim=-1).sum())
    ref_loss = F.cross_entropy(logits, labels).item()

    one = finetune.main(parse(*flags, "--eval", "--finetune", path, "--batch_size", "4"))
    assert (one["images"], one["correct1"], one["correct5"]) == (13, ref1, ref5)
    assert one["loss"] == pytest.approx(ref_loss, rel=1e-5)

    proc = run_torchrun(2, "finetune.py", *TINY, *flags, "--eval", "--resume", path, "--batch_size", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+) \((\d+) and (\d+) of (\d+) images\)", proc.stdout)
    assert m, proc.stdout
    assert (int(m[6]), int(m[4]), int(m[5])) == (13, ref1, ref5)
    assert float(m[3]) == pytest.approx(ref_loss, abs=1e-4)


# -- loading classifiers in the wild through finetune's own path -----------------------


def mae_training_extras():
    """What MAE's main_finetune.py saves next to the model."""
    return {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "epoch": 99, "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="vit_base")}


LAYOUTS = {
    # name: (pooling, what the file holds)
    "timm": ("token", lambda sd: sd),
    "mae_lite_prefix": ("avg", lambda sd: {"model": {"module.model." + k: v for k, v in sd.items()}}),
    "mae_finetuned": ("avg", lambda sd: {"model": sd, **mae_training_extras()}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_foreign_classifier_checkpoint_gives_the_source_logits(tmp_path, layout):
    pool, wrap = LAYOUTS[layout]
    src = classifier(0, global_pool=pool)
    sd = src.state_dict()
    assert ("fc_norm.weight" in sd) == ("norm.weight" not in sd)  # fine-tuned: fc_norm, no norm
    path = tmp_path / f"{layout}.pth"
    torch.save(wrap(sd), path)
    args = parse("--eval", "--resume", path, *(["--cls_token"] if pool == "token" else []))
    torch.manual_seed(1)
    model = finetune.build_model(args, num_classes=8)
    finetune.load_classifier(model, checkpoints.load(path), str(path), list(data.SyntheticShapes.classes))
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(imgs), src(imgs))


# -- training -------------------------------------------------------------------------


def write_colour_folder(root, per_class):
    """An ImageFolder of 8 classes told apart by hue, with random brightness and pixel noise.
    (The built-in shapes need thousands of steps before a ViT beats chance on them.)"""
    g = torch.Generator().manual_seed(0)
    for split, n in per_class.items():
        for c in range(8):
            (root / split / f"class{c}").mkdir(parents=True)
            rgb = torch.tensor(colorsys.hsv_to_rgb(c / 8, 0.8, 0.8)).view(3, 1, 1)
            for i in range(n):
                img = rgb * (0.7 + 0.3 * torch.rand(1, generator=g)) + 0.15 * torch.randn(3, 32, 32, generator=g)
                Image.fromarray((img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()).save(
                    root / split / f"class{c}" / f"{i}.png")
    return root


def test_fine_tuning_an_mae_checkpoint_beats_chance_and_keeps_the_best_epoch(tmp_path, mae_checkpoint):
    """The MAE recipe as it stands (RandAugment, mixup/cutmix, smoothing, erasing, layer
    decay, warmup + cosine) on an 8-colour image folder: 3 epochs of 64 images. Chance is
    12.5%."""
    colours = write_colour_folder(tmp_path / "colours", {"train": 8, "val": 3})
    out = tmp_path / "run"
    finetune.main(parse("--finetune", mae_checkpoint, "--data_path", colours, "--epochs", "3",
                        "--warmup_epochs", "1", "--batch_size", "16", "--output_dir", out))
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert {"train_loss", "train_lr", "test_loss", "test_acc1", "test_acc5", "best_acc1",
            "train_img_per_s", "train_peak_mem_mb"} <= log[0].keys()
    best = max(r["test_acc1"] for r in log)
    assert best >= 50.0 and log[-1]["best_acc1"] == best
    again = finetune.main(parse("--eval", "--resume", out / "checkpoint-best.pth", "--data_path", colours))
    assert again["acc1"] == best and again["images"] == 24


def test_fine_tuning_an_mae_checkpoint_on_the_built_in_data_learns_the_classes(tmp_path, mae_checkpoint):
    """The built-in shapes (8 classes, chance 12.5%): 4 epochs of 256 images with the light
    recipe of the README's CPU pipeline reach ~64% on the 64 validation images."""
    out = tmp_path / "run"
    finetune.main(parse("--finetune", mae_checkpoint, "--synthetic_samples", "256", "--epochs", "4",
                        "--warmup_epochs", "1", "--batch_size", "32", "--blr", "1e-3", "--aa", "none",
                        "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--output_dir", out))
    assert max(r["test_acc1"] for r in read_log(out)) >= 40.0


def test_resuming_restores_the_weights_and_the_best_accuracy_exactly(tmp_path, mae_checkpoint):
    colours = write_colour_folder(tmp_path / "colours", {"train": 4, "val": 1})
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--finetune", mae_checkpoint, "--data_path", colours, "--epochs", "2", "--warmup_epochs", "1",
              "--batch_size", "16"]
    finetune.main(parse(*common, "--output_dir", a, "--save_every", "1"))
    finetune.main(parse(*common, "--output_dir", b, "--resume", a / "checkpoint-0.pth"))
    whole, resumed = (torch.load(d / "checkpoint.pth", map_location="cpu", weights_only=True) for d in (a, b))
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert resumed["best_acc1"] == whole["best_acc1"] == max(r["test_acc1"] for r in read_log(a))


def test_linear_probe_changes_only_the_head(tmp_path, mae_checkpoint):
    out = tmp_path / "probe"
    finetune.main(parse("--linprobe", "--finetune", mae_checkpoint, "--epochs", "1", "--warmup_epochs", "0",
                        "--batch_size", "16", "--blr", "1.0", "--output_dir", out))
    trained = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    pretrained = checkpoints.read_state_dict(checkpoints.load(mae_checkpoint), str(mae_checkpoint))
    backbone = [k for k in trained if not k.startswith("head.")]
    assert "norm.weight" in backbone and "blocks.11.mlp.fc2.weight" in backbone  # cls token + norm
    assert all(torch.equal(trained[k], pretrained[k]) for k in backbone)
    assert sorted(k for k in trained if k.startswith("head.")) == [
        "head.0.num_batches_tracked", "head.0.running_mean", "head.0.running_var",
        "head.1.bias", "head.1.weight"]
    assert trained["head.1.bias"].abs().sum() > 0  # initialised to zero: it trained
    assert trained["head.0.num_batches_tracked"] == 4  # 64 images / batch 16


def test_lars_matches_a_hand_computation_over_two_steps():
    """MAE's LARS: for matrices g <- (g + wd w) * eta ||w|| / ||g + wd w||, vectors plain;
    mu <- m mu + g; w <- w - lr mu. A zero matrix gets trust ratio 1."""
    lr, wd, m, eta = 0.5, 0.1, 0.9, 0.001
    w = torch.tensor([[1.0, -2.0, 2.0], [0.0, 4.0, -1.0]])
    b = torch.tensor([0.5, -0.5, 1.0])
    z = torch.zeros(2, 2)
    grads = [(torch.tensor([[0.3, 0.1, -0.2], [0.4, 0.0, 0.2]]), torch.tensor([1.0, 2.0, -1.0]),
              torch.tensor([[1.0, 0.0], [0.0, -1.0]])),
             (torch.tensor([[-0.1, 0.5, 0.3], [0.2, -0.2, 0.1]]), torch.tensor([0.5, 0.0, 3.0]),
              torch.tensor([[0.5, 0.5], [0.0, 0.0]]))]
    params = [torch.nn.Parameter(t.clone()) for t in (w, b, z)]
    opt = finetune.LARS([{"params": params, "lr": lr, "weight_decay": wd}], momentum=m)

    ref = [w.clone(), b.clone(), z.clone()]
    mu = [torch.zeros_like(t) for t in ref]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(step_grads):  # the rule, written out
            if ref[i].ndim > 1:
                g = g + wd * ref[i]
                wn, gn = ref[i].norm().item(), g.norm().item()
                g = g * (eta * wn / gn if wn > 0 and gn > 0 else 1.0)
            mu[i] = m * mu[i] + g
            ref[i] = ref[i] - lr * mu[i]
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)
    assert not torch.equal(params[2].detach(), z)  # the zero matrix moved with ratio 1


def test_mixed_smoothed_targets_give_timms_loss():
    """timm smooths each one-hot, then mixes: lam * CE_s(z, a) + (1 - lam) * CE_s(z, b)."""
    torch.manual_seed(0)
    logits, a, b, lam, s = torch.randn(6, 10), torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,)), 0.3, 0.1
    mixed = lam * F.one_hot(a, 10).float() + (1 - lam) * F.one_hot(b, 10).float()
    loss = finetune.soft_target_cross_entropy(logits, finetune.smooth_targets(mixed, s))
    ref = lam * F.cross_entropy(logits, a, label_smoothing=s) + (1 - lam) * F.cross_entropy(logits, b, label_smoothing=s)
    torch.testing.assert_close(loss, ref)


# -- bad input ------------------------------------------------------------------------


def save_vit(path, **kw):
    torch.manual_seed(0)
    cfg = {**dict(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=0), **kw}
    torch.save({"model": VisionTransformer(**cfg).state_dict()}, path)
    return path


def empty_folders(root):
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
    return root


@pytest.mark.parametrize("make, flags, message", [
    (lambda d: save_vit(d / "w.pth", embed_dim=64, num_heads=2), ["--finetune", "{}"],
     r"w.pth: cls_token has shape \(1, 1, 64\), the model expects \(1, 1, 192\)"),
    (lambda d: save_vit(d / "p.pth", patch_size=4), ["--finetune", "{}"],
     r"p.pth: patch_embed.proj.weight has shape .* \(patch size or width differ\)"),
    (lambda d: save_vit(d / "d.pth", depth=2), ["--finetune", "{}"],
     r"d.pth: missing 120 keys the model needs, first 'blocks.2.norm1.weight'"),
    (lambda d: save_vit(d / "c.pth", num_classes=8), ["--eval", "--resume", "{}"],
     r"c.pth: was trained with token pooling \(norm\); add --cls_token"),
    (lambda d: save_vit(d / "e.pth"), ["--eval", "--finetune", "{}"],
     r"e.pth: has no classification head \(a pre-trained encoder\?\)"),
    (lambda d: empty_folders(d / "imgs"), ["--data_path", "{}"], r"imgs/val: Couldn't find any class folder"),
    (lambda d: d, ["--dataset", "pets", "--data_path", "{}"],
     r"--dataset pets under .*: Dataset not found \(add --download to fetch it\)"),
    (lambda d: None, ["--eval"], r"--eval needs the classifier to evaluate: --resume PATH"),
    (lambda d: None, ["--aa", "rand-m15"], r"--aa 'rand-m15': magnitude must lie in 0..10"),
], ids=["width", "patch", "depth", "pooling", "no_head", "empty_folder", "missing_dataset", "eval_without_checkpoint",
        "randaugment"])
def test_bad_input_fails_at_start_with_a_message_naming_it(tmp_path, make, flags, message):
    target = make(tmp_path)
    args = parse(*[f.format(target) for f in flags], "--output_dir", tmp_path / "run")
    with pytest.raises(USER_ERRORS, match=message):
        finetune.main(args)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_an_unknown_dataset_name_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse("--dataset", "flowers")
    assert "invalid choice: 'flowers' (choose from" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["flowers102", "cars"])
def test_a_downstream_set_that_needs_scipy_says_so_when_it_is_missing(tmp_path, monkeypatch, name):
    real_find_spec = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda mod, *a: None if mod == "scipy" else real_find_spec(mod, *a))
    args = parse("--dataset", name, "--data_path", tmp_path)
    with pytest.raises(data.DataError, match=f"--dataset {name} needs scipy.*pip install scipy"):
        data.build_dataset(args, train=True)


def test_a_corrupt_image_stops_the_run_with_one_line_naming_it(tmp_path):
    """Read in a DataLoader worker process: the message must still be one line."""
    write_colour_folder(tmp_path, {"train": 1, "val": 1})
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "JPEG")
    bad = tmp_path / "train" / "class3" / "bad.jpg"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated mid-scan
    proc = run_script("finetune.py", *TINY, "--data_path", tmp_path, "--num_workers", "1",
                      "--batch_size", "3", "--epochs", "1", "--warmup_epochs", "0", "--output_dir", tmp_path / "run")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert error_line(proc).startswith(f"error: {bad}: cannot read this image (OSError: image file "
                                       f"is truncated")
    assert error_line(proc).endswith("; delete or replace the file")


def test_a_relation_students_adaptive_last_block_is_kept_for_fine_tuning(tmp_path):
    """A TinyMIM student records last_block_heads: finetune.py builds that head split."""
    torch.manual_seed(0)
    student = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                                num_classes=0, last_block_heads=6)
    path = tmp_path / "tinymim_student.pth"
    torch.save({"model": {"student." + k: v for k, v in student.state_dict().items()},
                "model_config": student.config}, path)
    out = tmp_path / "run"
    finetune.main(parse("--finetune", path, "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "16",
                        "--output_dir", out))
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model_config"]
    assert (saved["num_heads"], saved["last_block_heads"]) == (3, 6)


def test_uniform_heads_resplits_a_relation_students_last_block_keeping_its_weights(tmp_path):
    """The official TinyMIM fine-tuning: the adaptive last block's q/k/v, trained with 6
    heads, are used with the model's 3; the tensors themselves load unchanged."""
    torch.manual_seed(0)
    student = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                                num_classes=0, last_block_heads=6)
    path = tmp_path / "tinymim_student.pth"
    torch.save({"model": {"student." + k: v for k, v in student.state_dict().items()},
                "model_config": student.config}, path)
    out = tmp_path / "run"
    finetune.main(parse("--finetune", path, "--uniform_heads", "--epochs", "1", "--warmup_epochs", "0",
                        "--batch_size", "16", "--lr", "1e-12", "--min_lr", "0", "--output_dir", out))
    saved = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert (saved["model_config"]["num_heads"], saved["model_config"]["last_block_heads"]) == (3, None)
    qkv = saved["model"]["blocks.11.attn.qkv.weight"]
    assert torch.allclose(qkv, student.state_dict()["blocks.11.attn.qkv.weight"], atol=1e-6)


def test_uniform_heads_on_a_checkpoint_without_an_adaptive_block_says_so(tmp_path, mae_checkpoint, capsys):
    finetune.main(parse("--finetune", mae_checkpoint, "--uniform_heads", "--epochs", "1", "--warmup_epochs",
                        "0", "--batch_size", "16", "--output_dir", tmp_path / "run"))
    assert f"--uniform_heads: {mae_checkpoint} has no adaptive last block" in capsys.readouterr().out


# -- --train_subset and --eval_freq (the data-scale study) ------------------------------


def test_train_subset_keeps_n_images_of_each_class_the_same_for_a_seed_and_nested():
    """The built-in data (label = index % 8, 8 of each class in 64): labels are read back through
    the dataset itself, as the loader sees them."""
    ds, classes = data.build_dataset(parse("--synthetic_samples", "64"), train=True)
    sub3, counts = finetune.class_balanced_subset(ds, 3, seed=0, classes=classes)
    assert counts == [3] * 8 and len(sub3) == 24
    labels = [ds[i][1] for i in sub3.indices]
    assert sorted(labels) == sorted(list(range(8)) * 3)
    again, _ = finetune.class_balanced_subset(ds, 3, seed=0, classes=classes)
    other, _ = finetune.class_balanced_subset(ds, 3, seed=1, classes=classes)
    sub2, _ = finetune.class_balanced_subset(ds, 2, seed=0, classes=classes)
    assert again.indices == sub3.indices and other.indices != sub3.indices
    assert set(sub2.indices) < set(sub3.indices)  # nested: a smaller N keeps a subset
    quarter, counts = finetune.class_balanced_subset(ds, 0.25, seed=0, classes=classes)
    assert counts == [2] * 8 and quarter.indices == sub2.indices  # the fraction of each class


def test_train_subset_reads_an_image_folders_targets_and_refuses_more_than_a_class_has(tmp_path):
    root = write_colour_folder(tmp_path / "colours", {"train": 3, "val": 1})
    (root / "train" / "class5" / "0.png").unlink()  # class5 now has 2 images
    ds, classes = data.build_dataset(parse("--data_path", root), train=True)
    sub, counts = finetune.class_balanced_subset(ds, 2, seed=0, classes=classes)
    assert counts == [2] * 8
    assert sorted(Path(ds.samples[i][0]).parent.name for i in sub.indices) == sorted(classes * 2)
    with pytest.raises(util.ConfigError, match="--train_subset 3: class 'class5' has only 2 training images"):
        finetune.class_balanced_subset(ds, 3, seed=0, classes=classes)


def test_a_subset_run_evaluates_every_eval_freq_epochs_and_the_last_and_logs_its_size(tmp_path, capsys):
    out = tmp_path / "run"
    finetune.main(parse("--synthetic_samples", "32", "--train_subset", "1", "--eval_freq", "2", "--epochs", "3",
                        "--warmup_epochs", "0", "--batch_size", "8", "--output_dir", out))
    assert "--train_subset 1: 8 of the 32 training images, 1 per class, drawn with --seed 0" in capsys.readouterr().out
    log = read_log(out)
    assert [r["train_images"] for r in log] == [8, 8, 8]
    assert ["test_acc1" in r for r in log] == [False, True, True]  # epoch 2 of 3, then the last
    assert "best_acc1" not in log[0]
    best = max(log[1]["test_acc1"], log[2]["test_acc1"])
    assert log[2]["best_acc1"] == best
    saved = torch.load(out / "checkpoint-best.pth", map_location="cpu", weights_only=True)
    assert saved["acc1"] == best and saved["epoch"] == (1 if log[1]["test_acc1"] == best else 2)


@pytest.mark.parametrize("flags, message", [
    (["--train_subset", "2.5"], "--train_subset 2.5: a whole number of images per class"),
    (["--train_subset", "0"], "--train_subset must be positive, got 0.0"),
    (["--train_subset", "9"], "--train_subset 9: class 'disk' has only 8 training images"),
    (["--eval_freq", "0"], "--eval_freq must be at least 1, got 0"),
    (["--rel_pos_bias", "--linprobe", "--drop_path", "0"], "--rel_pos_bias with --linprobe"),
])
def test_bad_subset_eval_freq_and_rpe_flags_are_refused_with_one_line(tmp_path, flags, message):
    with pytest.raises(util.ConfigError, match=re.escape(message)):
        finetune.main(parse(*flags, "--output_dir", tmp_path / "run"))


# -- --rel_pos_bias (MAE-Lite's "impr.+RPE") --------------------------------------------


def test_rpe_tables_get_no_weight_decay_and_their_blocks_layer_decay():
    model = create_vit("vit_tiny", img_size=32, patch_size=8, num_classes=8, rel_pos_bias=True)
    groups = util.param_groups(model, weight_decay=0.05, layer_decay=0.5)
    for g in groups:
        for name in g["names"]:
            if name.endswith("relative_position_bias_table"):
                block = int(name.split(".")[1])
                assert g["weight_decay"] == 0.0
                assert g["lr_scale"] == 0.5 ** (12 + 1 - (block + 1))  # MAE's rule at layer i + 1
    assert sum(n.endswith("relative_position_bias_table") for g in groups for n in g["names"]) == 12


@pytest.fixture(scope="module")
def rpe_run(tmp_path_factory, mae_checkpoint):
    out = tmp_path_factory.mktemp("rpe")
    finetune.main(parse("--finetune", mae_checkpoint, "--rel_pos_bias", "--synthetic_samples", "32", "--epochs", "1",
                        "--warmup_epochs", "0", "--batch_size", "16", "--aa", "none", "--mixup", "0",
                        "--cutmix", "0", "--output_dir", out))
    return out


def test_an_mae_checkpoint_fine_tunes_with_fresh_zero_tables_that_then_train(rpe_run, capsys, mae_checkpoint):
    args = parse("--finetune", mae_checkpoint, "--rel_pos_bias")
    model = finetune.build_model(args, num_classes=8)
    finetune.load_backbone(model, checkpoints.load(mae_checkpoint), "mae", args)
    assert "the relative position bias tables of 12 blocks (zeros)" in capsys.readouterr().out
    assert all(torch.all(b.attn.relative_position_bias_table == 0) for b in model.blocks)
    trained = torch.load(rpe_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert trained["model_config"]["rel_pos_bias"] is True
    assert all(trained["model"][f"blocks.{i}.attn.relative_position_bias_table"].abs().sum() > 0 for i in range(12))


def test_an_rpe_classifier_evaluates_with_the_flag_and_is_refused_without_or_at_another_size(rpe_run, tmp_path):
    best = rpe_run / "checkpoint-best.pth"
    stats = finetune.main(parse("--eval", "--resume", best, "--rel_pos_bias", "--synthetic_samples", "32"))
    assert stats["acc1"] == read_log(rpe_run)[-1]["test_acc1"]
    with pytest.raises(util.CheckpointError, match="has relative position bias tables .*add --rel_pos_bias"):
        finetune.main(parse("--eval", "--resume", best))
    with pytest.raises(util.CheckpointError,
                       match="tables are not interpolated, use the input size the checkpoint was trained at"):
        finetune.main(parse("--eval", "--resume", best, "--rel_pos_bias", "--input_size", "48"))


def test_a_subset_run_refuses_to_resume_with_another_seed(tmp_path):
    """The seed drew the labelled images: another seed would continue on other images."""
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "args": {"seed": 0, "train_subset": 1.0}}, out / "checkpoint.pth")  # its flags
    with pytest.raises(util.ConfigError, match="was trained with --seed 0, this run has --seed 1"):
        finetune.main(parse("--synthetic_samples", "32", "--train_subset", "1", "--batch_size", "8",
                            "--seed", "1", "--output_dir", out))
