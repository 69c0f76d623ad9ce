"""Hiera through the stages: MAE-Lite's attention distillation with a Hiera student and
teacher (distill_pretrain.py), fine-tuning and evaluating a Hiera (finetune.py), and the
layer analysis of Hiera checkpoints (analyze.py). 64 px images: 2x2 mask units."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import analyze
import checkpoints
import data
import distill_pretrain as dp
import finetune
import util
from conftest import MAE_HIERA_ONLY, error_line, run_script
from hiera import Hiera, MaskedAutoencoderHiera, create_hiera, random_unit_mask, reroll
from mae_pretrain import mae_loss
from vit import VisionTransformer

IMG = 64
DATA = ["--input_size", str(IMG), "--num_workers", "0"]
IMGS = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
NOISE = torch.tensor([[0.1, 0.9, 0.8, 0.2], [0.7, 0.3, 0.6, 0.4]])  # keeps units {0, 3}, {1, 3} at 0.5
# A small MAE-Hiera teacher: 32 wide, 6 blocks; its last block has 1 * 2^3 = 8 heads, as
# MAE-Hiera-Base's and the student's (the official MAE-Hiera and MAE-Lite IJCV).
TEACHER = dict(embed_dim=32, num_heads=1, stages=(1, 1, 2, 2), decoder_embed_dim=32, decoder_depth=1,
               decoder_num_heads=2)
SMALL_STUDENT = dict(embed_dim=16, num_heads=1, stages=(1, 1, 2, 2))  # also 8 heads in its last block


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the busy 2-core machine two threads fight the other processes
    (the distillation run below takes 3 s with one, 25-50 s with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save(path, obj):
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def official_teacher(tmp_path_factory):
    """A MAE-Hiera in the official file layout: {'model_state': ...}, decoder keys included."""
    torch.manual_seed(1)
    mae = MaskedAutoencoderHiera(img_size=IMG, **TEACHER).eval()
    path = tmp_path_factory.mktemp("teacher") / "mae_hiera_base_224.pth"
    return save(path, {"model_state": mae.state_dict()}), mae


def small_distiller(teacher, mask_ratio=0.5, weight=0.7):
    """A 16-wide MAE-Hiera student (its last block: 8 heads) in AttentionDistiller, distilling
    the teacher's last block: build_model's wiring at a fraction of mae_hiera_tiny's cost."""
    torch.manual_seed(0)
    student = MaskedAutoencoderHiera(img_size=IMG, **SMALL_STUDENT, decoder_embed_dim=32, decoder_depth=1,
                                     decoder_num_heads=2)
    return dp.AttentionDistiller(student, teacher.blocks[-1].attn.num_heads, teacher.depth, mask_ratio, weight)


def distill_args(*flags):
    return dp.get_args_parser().parse_args(["--method", "attn", "--model", "mae_hiera_tiny", *DATA,
                                            *map(str, flags)])


def timm_last_block_logits(model, imgs, keep, config):
    """The last block's pre-softmax logits computed from timm's Hiera (the reference of
    tests/test_hiera.py) with `model`'s encoder weights: its last block's input is caught by a
    hook, then norm1, qkv (channels (3, heads, head_dim), one window) and q k^T / sqrt(d)."""
    timm_hiera = pytest.importorskip("timm.models.hiera")
    ref = timm_hiera.Hiera(img_size=IMG, num_classes=0, q_pool=2, **config).eval()
    result = ref.load_state_dict(model.state_dict(), strict=False)  # an MAE-Hiera: its decoder is left out
    assert sorted(result.missing_keys) == ["head.norm.bias", "head.norm.weight"]
    assert {k.split(".")[0] for k in result.unexpected_keys} <= MAE_HIERA_ONLY
    blk, seen = ref.blocks[-1], {}
    handle = blk.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        ref(imgs, mask=keep)
        handle.remove()
        x = blk.norm1(seen["x"])
        B, N, _ = x.shape
        heads = blk.attn.heads
        q, k, _ = blk.attn.qkv(x).reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, heads, N, N)


# -- distillation: the teacher -----------------------------------------------------------


def test_an_official_mae_hiera_file_is_a_frozen_plain_hiera_teacher_with_its_decoder_reported(
        official_teacher, capsys):
    path, mae = official_teacher
    teacher = dp.build_teacher(distill_args("--teacher", path), 32, torch.device("cpu"))
    out = capsys.readouterr().out
    assert isinstance(teacher, Hiera) and not isinstance(teacher, MaskedAutoencoderHiera)
    assert (teacher.q_pool, teacher.depth, teacher.blocks[-1].attn.num_heads) == (2, 6, 8)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    sd = teacher.state_dict()
    assert all(torch.equal(v, mae.state_dict()[k]) for k, v in sd.items())
    unexpected = next(line for line in out.splitlines() if "unexpected" in line)
    for key in ("decoder_embed", "decoder_blocks", "decoder_pred", "mask_token", "encoder_norm",
                "multi_scale_fusion_heads"):
        assert key in unexpected


def test_a_hiera_student_with_a_vit_teacher_and_the_reverse_are_refused_in_one_line(tmp_path, official_teacher):
    vit = VisionTransformer(img_size=IMG, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    vit_path = save(tmp_path / "vit.pth", {"model": vit.state_dict()})
    proc = run_script("distill_pretrain.py", "--method", "attn", "--model", "mae_hiera_tiny", "--teacher",
                      vit_path, *DATA, "--output_dir", tmp_path / "a")
    assert proc.returncode == 1
    assert error_line(proc).endswith("vit.pth: --teacher is a ViT checkpoint and --model mae_hiera_tiny "
                                     "a Hiera: both must be ViTs or both Hieras (a Hiera pair only "
                                     "with --method attn)")
    args = dp.get_args_parser().parse_args(["--method", "attn", "--teacher", str(official_teacher[0]),
                                            *DATA, "--patch_size", "16"])
    dp.check_args(args)
    with pytest.raises(util.CheckpointError, match="--teacher is a Hiera checkpoint and --model vit_tiny a ViT"):
        dp.build_teacher(args, 16, torch.device("cpu"))


def test_a_partial_hiera_teacher_file_is_refused_naming_the_missing_tensor(official_teacher, tmp_path):
    sd = {k: v for k, v in official_teacher[1].state_dict().items() if k != "blocks.4.mlp.fc2.weight"}
    path = save(tmp_path / "partial.pth", {"model_state": sd})
    with pytest.raises(util.CheckpointError, match="partial.pth: has no blocks.4.mlp.fc2.weight"):
        dp.build_teacher(distill_args("--teacher", path), 32, torch.device("cpu"))


@pytest.mark.parametrize("flags, message", [
    (["--method", "relation"], "--method relation takes a ViT student (--model vit_*) and teacher; a Hiera "
                               "(--model mae_hiera_tiny) is distilled with --method attn only"),
    (["--method", "amd"], "--method amd takes a ViT student"),
    (["--method", "feature"], "--method feature takes a ViT student"),
    (["--patch_size", "16"], "--patch_size is for a ViT; --model mae_hiera_tiny is a Hiera"),
    (["--teacher_model", "vit_base"], "--teacher_model is for a ViT; --model mae_hiera_tiny is a Hiera"),
    (["--input_size", "80"], "--input_size / --mask_ratio: a Hiera needs an image size that is a multiple of 32 px "
                             "(whole 8x8-token mask units), got 80"),
    (["--mask_ratio", "0.8"], "--input_size / --mask_ratio: mask ratio 0.8 keeps none of the 4 mask units of a "
                              "64 px image"),
])
def test_flags_a_hiera_student_cannot_use_are_refused_naming_them(flags, message):
    args = dp.get_args_parser().parse_args(["--method", "attn", "--model", "mae_hiera_tiny", "--teacher",
                                            "t.pth", *DATA, *flags])
    with pytest.raises(util.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        dp.check_args(args)


def test_a_hiera_student_gets_mae_lites_mask_ratio_and_decoder_and_a_vit_keeps_maes():
    args = distill_args("--teacher", "t.pth")
    assert dp.check_args(args) == 4  # (64 / 32)^2 = 4 noise values per image: one per mask unit
    assert (args.mask_ratio, args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads) == \
        (0.4, 96, 1, 3)
    vit = dp.get_args_parser().parse_args(["--method", "attn", "--teacher", "t.pth", "--input_size", "32",
                                           "--patch_size", "8"])
    dp.check_args(vit)
    assert vit.mask_ratio == 0.75


def test_the_mixer_maps_the_students_8_last_block_heads_to_the_teachers_8():
    args = distill_args("--teacher", "t.pth")
    dp.check_args(args)
    with torch.device("meta"):
        teacher = create_hiera("hiera_base_224", q_pool=2, num_classes=0)  # MAE-Hiera-Base's encoder
    args.teacher_layer = 24
    model = dp.build_model(args, teacher)
    assert model.distill.mix.weight.shape == (8, 8) and model.distill.mix.bias is None  # official: Conv2d(8, 8, 1)
    assert model.student.blocks[-1].attn.num_heads == 8 and model.student.depth == 12
    args.teacher_layer = 4  # stage 2's second block: attention within mask units of 4x4 tokens
    with pytest.raises(util.CheckpointError, match="block 4 attends within mask units with 16 queries x 16 keys"):
        dp.build_model(args, teacher)
    args.teacher_layer = 6  # the first block of stage 3 pools its queries: 4 queries x 16 keys
    with pytest.raises(util.CheckpointError, match="block 6 attends within mask units with 4 queries x 16 keys"):
        dp.build_model(args, teacher)


# -- distillation: the loss ------------------------------------------------------------------


def test_the_loss_is_pixel_plus_mse_of_mixed_student_logits_to_the_teachers_on_the_same_units(official_teacher):
    path, mae_teacher = official_teacher
    teacher = dp.build_teacher(distill_args("--teacher", path), 32, torch.device("cpu"))
    model = small_distiller(teacher, mask_ratio=0.5, weight=0.7).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.distill.mix.weight)
        loss, terms = model(IMGS, NOISE, teacher)
        keep = random_unit_mask(NOISE, 0.5)
        pixel = mae_loss(*model.student(IMGS, 0.5, NOISE), model.student.norm_pix_loss)  # the MAE-Hiera's own loss
    a_s = timm_last_block_logits(model.student, IMGS, keep, SMALL_STUDENT)  # (2, 8, 8, 8): 2 units x 4
    a_t = timm_last_block_logits(mae_teacher, IMGS, keep, {k: TEACHER[k] for k in SMALL_STUDENT})
    W = model.distill.mix.weight  # (8 teacher heads, 8 student heads)
    mixed = torch.stack([sum(W[t, h] * a_s[:, h] for h in range(8)) for t in range(8)], dim=1)
    attn = ((mixed - a_t) ** 2).mean()
    assert a_s.shape == a_t.shape == (2, 8, 8, 8)
    assert terms["pixel"].item() == pytest.approx(pixel.item(), rel=1e-5)
    assert terms["attn"].item() == pytest.approx(attn.item(), rel=1e-4)
    assert loss.item() == pytest.approx(pixel.item() + 0.7 * attn.item(), rel=1e-4)


def test_one_student_pass_feeds_decoder_and_distillation_and_the_teacher_stops_at_its_block(official_teacher):
    path, _ = official_teacher
    teacher = dp.build_teacher(distill_args("--teacher", path), 32, torch.device("cpu"))
    model = small_distiller(teacher)
    calls = []
    for name, m in (("student", model.student), ("teacher", teacher)):
        real = m.encode
        m.encode = lambda *a, _real=real, _name=name, **k: calls.append((_name, k.get("stop_at"))) or _real(*a, **k)
    loss, _ = model(IMGS, NOISE, teacher)
    loss.backward()
    assert calls == [("teacher", 6), ("student", None)]
    assert "teacher" not in dict(model.named_modules()) and not any(p.grad is not None for p in teacher.parameters())
    assert model.distill.mix.weight.grad.abs().sum() > 0


# -- distillation: a whole run --------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled(official_teacher, tmp_path_factory):
    """A short mae_hiera_tiny distillation run from the official-layout teacher."""
    out = tmp_path_factory.mktemp("distill")
    args = distill_args("--teacher", official_teacher[0], "--synthetic_samples", 32, "--batch_size", 8,
                        "--epochs", 2, "--warmup_epochs", 0, "--blr", 2e-3, "--output_dir", out)
    dp.main(args)
    return out


def test_a_short_distillation_run_lowers_the_attention_loss(distilled):
    log = [json.loads(line) for line in (distilled / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[-1]["train_attn"] < 0.85 * log[0]["train_attn"]  # measured: 0.229 -> 0.163
    ckpt = torch.load(distilled / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["args"]["mask_ratio"] == 0.4 and ckpt["args"]["teacher_layer"] == 6


def test_the_distilled_checkpoint_loads_as_a_plain_hiera_backbone_and_as_a_teacher(distilled, capsys):
    ckpt = torch.load(distilled / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    clf = create_hiera("hiera_lite_tiny", img_size=IMG, num_classes=8)
    path = distilled / "checkpoint.pth"
    report = checkpoints.load_pretrained(clf, checkpoints.load(path), str(path), verbose=False)
    assert sorted(report.missing) == ["head.projection.bias", "head.projection.weight", "norm.bias", "norm.weight"]
    assert "distill.mix.weight" in report.unexpected and "decoder_pred.weight" in report.unexpected
    assert all(torch.equal(clf.state_dict()[k], ckpt["student." + k]) for k in report.loaded)
    teacher = dp.build_teacher(distill_args("--teacher", distilled / "checkpoint.pth"), 32, torch.device("cpu"))
    assert (teacher.depth, teacher.config["embed_dim"],
            teacher.blocks[-1].attn.num_heads) == (12, 46, 8)
    assert "distill.mix.weight" in capsys.readouterr().out  # reported, not silently dropped


# -- fine-tuning -------------------------------------------------------------------------------


def ft_args(*flags):
    return finetune.get_args_parser().parse_args(["--model", "hiera_lite_tiny", *DATA, *map(str, flags)])


def test_layer_decay_puts_hieras_embeddings_at_0_block_i_at_i_plus_1_and_norm_and_head_at_the_top():
    with torch.device("meta"):
        model = create_hiera("hiera_lite_tiny", num_classes=8)

    def layer(name):  # the rule written out for 12 blocks: norm and head are layer 13
        if name in ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        assert name.startswith(("norm.", "head.projection.")), name
        return 13

    groups = util.param_groups(model, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale.keys() == {n for n, _ in model.named_parameters()}
    assert all(s == 0.5 ** (13 - layer(n)) for n, s in scale.items())
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert {"blocks.3.proj.weight", "head.projection.weight"} <= decayed
    assert not decayed & {"pos_embed", "norm.weight", "blocks.3.proj.bias"}


def test_a_hiera_classifier_pools_three_times_with_drop_path_rising_to_the_flag_and_a_small_head():
    args = ft_args("--drop_path", 0.2)
    finetune.check_args(args)
    torch.manual_seed(0)
    model = finetune.build_model(args, 8)
    assert isinstance(model, Hiera) and model.q_pool == 3 and model.head.projection.out_features == 8
    assert [b.drop_path for b in model.blocks] == pytest.approx(torch.linspace(0, 0.2, 12).tolist())
    assert model.head.projection.weight.std().item() == pytest.approx(2e-5, rel=0.1)
    assert torch.all(model.head.projection.bias == 0)


@pytest.mark.parametrize("flags, message", [
    (["--patch_size", "16"], "--patch_size is for a ViT; --model hiera_lite_tiny is a Hiera"),
    (["--cls_token"], "--cls_token is for a ViT"),
    (["--linprobe"], "--linprobe is for a ViT"),
    (["--uniform_heads"], "--uniform_heads is for a ViT"),
    (["--input_size", "80"], r"--input_size: a Hiera needs an image size that is a multiple of 32 px "
                             r"\(whole 8x8-token mask units\), got 80"),
])
def test_vit_only_fine_tuning_flags_and_partial_mask_units_are_refused_for_a_hiera(flags, message):
    with pytest.raises(util.ConfigError, match=message):
        finetune.check_args(ft_args(*flags))


def test_evaluating_an_mae_hiera_file_says_it_has_no_head(official_teacher):
    with pytest.raises(util.CheckpointError, match="mae_hiera_base_224.pth: has no classification head"):
        finetune.main(ft_args("--eval", "--resume", official_teacher[0], "--synthetic_samples", 16))


@pytest.fixture(scope="module")
def finetuned(distilled, tmp_path_factory):
    """hiera_lite_tiny fine-tuned for one epoch from the distilled checkpoint."""
    out = tmp_path_factory.mktemp("finetune")
    finetune.main(ft_args("--finetune", distilled / "checkpoint.pth", "--synthetic_samples", 32, "--batch_size", 16,
                          "--epochs", 1, "--warmup_epochs", 0, "--aa", "none", "--mixup", 0, "--cutmix", 0,
                          "--reprob", 0, "--output_dir", out))
    return out


def test_eval_of_a_fine_tuned_hiera_counts_what_its_logits_say(finetuned):
    stats = finetune.main(ft_args("--eval", "--resume", finetuned / "checkpoint-best.pth", "--synthetic_samples", 32))
    ckpt = torch.load(finetuned / "checkpoint-best.pth", map_location="cpu", weights_only=True)
    assert ckpt["model_config"]["q_pool"] == 3 and "head.projection.weight" in ckpt["model"]
    model = create_hiera("hiera_lite_tiny", img_size=IMG, num_classes=8).eval()
    model.load_state_dict(ckpt["model"], strict=True)
    args = ft_args("--synthetic_samples", 32)
    val, _ = data.build_dataset(args, train=False, transform=data.eval_transform(IMG))
    imgs = data.normalize(torch.stack([val[i][0] for i in range(len(val))]))
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(imgs)
    assert (stats["images"], stats["correct1"]) == (8, int((logits.argmax(-1) == labels).sum()))
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    log = json.loads((finetuned / "log.txt").read_text().splitlines()[-1])
    assert log["test_acc1"] == pytest.approx(stats["acc1"])


# -- analysis ------------------------------------------------------------------------------------


def test_token_centres_reroll_to_the_raster_grid_of_each_blocks_resolution():
    model = Hiera(img_size=IMG, num_classes=0, q_pool=2, **SMALL_STUDENT)
    before = [0, *model.pooled]
    for k, (queries, keys) in enumerate(model.token_centres(), start=1):
        for centres, pooled in ((keys, before[k - 1]), (queries, before[k])):
            tokens = rearrange(centres, "w t c -> 1 (t w) c")  # the block's token order
            grid = reroll(tokens, pooled, mask_grid=2)[0]  # (H, W, 2) raster, by hiera.reroll
            size = 4 * 2 ** pooled  # px per token at this resolution
            n = IMG // size
            rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            want = torch.stack([rows, cols], -1).double() * size + size / 2
            assert torch.equal(grid, want), (k, pooled)


def test_uniform_attention_statistics_per_block_match_the_grid_references():
    model = Hiera(img_size=IMG, num_classes=0, q_pool=2, **SMALL_STUDENT)
    stats = analyze.AttentionStats(model)
    shapes = [(q.shape[0], q.shape[1], k.shape[1]) for q, k in model.token_centres()]
    stats.update([torch.full((3, 2, w, tq, tk), 1.0 / tk) for w, tq, tk in shapes])
    distance, entropy = stats.compute()
    # block 1: within each 32-px unit, 8x8 tokens of 4 px; block 6 (global, 2 poolings): 4x4 of 16 px
    assert distance[0] == pytest.approx([analyze.patch_distances(8, 4).mean().item()] * 2)
    assert entropy[0] == pytest.approx([math.log(64)] * 2)
    assert distance[5] == pytest.approx([analyze.patch_distances(4, 16).mean().item()] * 2)
    assert entropy[5] == pytest.approx([math.log(16)] * 2)
    assert [d for d, _ in stats.uniform] == pytest.approx([sum(h) / 2 for h in distance])


def test_linear_cka_does_not_depend_on_the_token_order():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 16, 5, generator=g), torch.randn(12, 80, generator=g)  # 12 images, 16 tokens
    shuffled = x[:, torch.randperm(16, generator=g)]  # every image's tokens in one other order
    flat = lambda t: t.flatten(1)
    assert analyze.linear_cka(flat(shuffled), y, debiased=True).item() == \
        pytest.approx(analyze.linear_cka(flat(x), y, debiased=True).item(), rel=1e-9)


def analyze_args(*flags):
    return analyze.get_args_parser().parse_args([*map(str, flags), *DATA, "--synthetic_samples", "64",
                                                 "--num_images", "8", "--batch_size", "8"])


def test_analysis_of_hiera_checkpoints_and_a_vit_writes_cka_attention_and_reconstructions(
        distilled, official_teacher, tmp_path):
    vit = VisionTransformer(img_size=IMG, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    vit_path = save(tmp_path / "vit.pth", {"model": vit.state_dict()})
    out = tmp_path / "analysis"
    analyze.main(analyze_args(distilled / "checkpoint.pth", official_teacher[0], vit_path,
                              "--names", "student", "teacher", "vit", "--output_dir", out))
    self_cka = torch.from_numpy(np.load(out / "cka_student_vs_student.npy"))
    assert self_cka.shape == (13, 13) and torch.allclose(self_cka.diagonal(), torch.ones(13, dtype=torch.float64))
    assert np.load(out / "cka_teacher_vs_vit.npy").shape == (7, 3)
    report = json.loads((out / "attention.json").read_text())["models"]
    assert report["student"]["num_heads"] == [1, 2, 2, 4, 4, 4, 4, 4, 4, 4, 8, 8]
    assert report["student"]["uniform_entropy_nats"][0] == pytest.approx(math.log(64))
    assert all(0 <= e <= u + 1e-9 for e, u in zip(report["student"]["mean_entropy_nats"],
                                                  report["student"]["uniform_entropy_nats"]))
    assert (out / "reconstructions_student.png").exists() and (out / "reconstructions_teacher.png").exists()
    assert not (out / "reconstructions_vit.png").exists()


def test_a_vit_patch_size_or_reconstructions_for_a_hiera_without_decoder_are_refused(tmp_path):
    clf = create_hiera("hiera_lite_tiny", img_size=IMG, num_classes=8)
    path = save(tmp_path / "hiera_clf.pth", {"model_state": clf.state_dict()})
    with pytest.raises(util.ConfigError, match="--patch_size is for ViTs; .*hiera_clf.pth is a Hiera"):
        analyze.main(analyze_args(path, "--patch_size", "16", "--output_dir", tmp_path / "a"))
    with pytest.raises(util.CheckpointError, match=r"hiera_clf.pth: has no MAE decoder .*so it cannot reconstruct images: .*"
                                                    r"an official mae_hiera_\*_224 file"):
        analyze.main(analyze_args(path, "--reconstruct", "--output_dir", tmp_path / "b"))
