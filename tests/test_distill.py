"""distill_pretrain.py: each loss against a hand computation, the masks, the teacher, and
whole runs of every method from a teacher made by mae_pretrain.py."""
import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import data
import distill_pretrain as dp
import mae_pretrain
import util
from conftest import error_line, run_script, run_torchrun
from mae_pretrain import MaskedAutoencoderViT, mae_loss, random_masking
from vit import VisionTransformer, gather_tokens

B = 2


def qkv(heads=3, n=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, heads, n, d, generator=g) for _ in range(3))


# -- losses -----------------------------------------------------------------------


def relation_loss(student, teacher):
    return sum(dp.relation_terms(student, teacher))


def test_relation_loss_is_zero_when_the_student_has_the_teachers_relations():
    t = qkv()
    assert relation_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_relation_loss_is_positive_when_the_relations_differ():
    assert relation_loss(qkv(seed=1), qkv(seed=2)).item() > 0.01


def test_relation_loss_is_the_kl_summed_over_keys_and_averaged_over_batch_heads_queries():
    s, t = qkv(d=4, seed=1), qkv(d=6, seed=2)  # head_dim may differ: each side its own sqrt(d)

    def kl(a_s, b_s, a_t, b_t):
        rs = torch.softmax(a_s @ b_s.transpose(-1, -2) / 4 ** 0.5, -1)
        rt = torch.softmax(a_t @ b_t.transpose(-1, -2) / 6 ** 0.5, -1)
        per_query = (rt * (rt.log() - rs.log())).sum(-1)  # (B, heads, N)
        return per_query.mean()

    qk, vv = kl(s[0], s[1], t[0], t[1]), kl(s[2], s[2], t[2], t[2])
    assert [x.item() for x in dp.relation_terms(s, t)] == pytest.approx([qk.item(), vv.item()], rel=1e-5)
    assert relation_loss(s, t).item() == pytest.approx((qk + vv).item(), rel=1e-5)


def test_attention_loss_mixes_student_heads_with_a_bias_free_map_then_takes_the_mse():
    torch.manual_seed(0)
    loss = dp.AttentionDistillLoss(student_heads=3, teacher_heads=4)
    s, t = torch.randn(B, 3, 5, 5), torch.randn(B, 4, 5, 5)
    W = loss.mix.weight  # (Ht, Hs)
    mixed = torch.stack([sum(W[j, h] * s[:, h] for h in range(3)) for j in range(4)], dim=1)
    assert loss.mix.bias is None
    assert loss(s, t).item() == pytest.approx(((mixed - t) ** 2).mean().item(), rel=1e-5)


def reference_sinusoid(n, d):
    """VideoMAE's get_sinusoid_encoding_table, element by element: angle t / 10000^(2 (j // 2) / d),
    sin at even channels, cos at odd ones."""
    out = torch.zeros(n, d, dtype=torch.float64)
    for t in range(n):
        for j in range(d):
            angle = t / 10000 ** (2 * (j // 2) / d)
            out[t, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out.float()


def test_amd_generator_positions_are_the_1d_sinusoid_over_token_indices():
    align = dp.AMDAlignment(student_dim=8, teacher_dim=64, num_layers=1, grid_size=4)
    assert torch.allclose(align.pos, reference_sinusoid(16, 64), atol=1e-6)


def test_amd_direct_and_generation_losses_match_a_hand_computation():
    torch.manual_seed(0)
    align = dp.AMDAlignment(student_dim=8, teacher_dim=64, num_layers=2, grid_size=4)
    keep, extra, _ = dp.asymmetric_masking(torch.rand(B, 16, generator=torch.Generator().manual_seed(0)),
                                           0.75, 0.5)
    ns, ne = keep.shape[1], extra.shape[1]
    s = [torch.randn(B, ns, 8) for _ in range(2)]
    t = [torch.randn(B, ns + ne, 64) for _ in range(2)]
    pos = reference_sinusoid(16, 64)  # (16, 64): patch k's fixed position, AMD's 1-D table
    direct, gen = [], []
    for l in range(2):
        p = s[l] @ align.projectors[l].weight.T
        direct.append(((p - t[l][:, :ns]) ** 2).mean())
        g = align.generators[l]
        x = torch.cat([p + pos[keep], g.mask_token.expand(B, ne, 64) + pos[extra]], dim=1)
        for blk in g.blocks:
            x = blk(x)
        gen.append(((x[:, ns:] - t[l][:, ns:]) ** 2).mean())
    got = align(s, t, keep, extra)
    assert got[0].item() == pytest.approx(sum(direct).item() / 2, rel=1e-5)
    assert got[1].item() == pytest.approx(sum(gen).item() / 2, rel=1e-5)


def test_amd_generators_are_two_blocks_at_the_teacher_width_with_width_over_64_heads():
    align = dp.AMDAlignment(student_dim=8, teacher_dim=128, num_layers=2, grid_size=4)
    assert [len(g.blocks) for g in align.generators] == [2, 2]
    assert align.generators[0].blocks[0].attn.num_heads == 2
    assert all(p.bias is None and p.weight.shape == (128, 8) for p in align.projectors)


def test_amd_mask_tokens_are_saved_parameters_that_get_a_gradient():
    align = dp.AMDAlignment(student_dim=8, teacher_dim=64, num_layers=2, grid_size=4)
    assert {"generators.0.mask_token", "generators.1.mask_token"} <= align.state_dict().keys()
    keep, extra, _ = dp.asymmetric_masking(torch.rand(B, 16), 0.75, 0.5)
    _, gen = align([torch.randn(B, 4, 8)] * 2, [torch.randn(B, 8, 64)] * 2, keep, extra)
    gen.backward()
    assert all(g.mask_token.grad.abs().sum() > 0 for g in align.generators)


def test_feature_loss_is_smooth_l1_beta_2_against_a_layer_norm_without_affine():
    torch.manual_seed(0)
    loss = dp.FeatureDistillLoss(student_dim=8, teacher_dim=6)
    s, t = torch.randn(B, 5, 8), 3 * torch.randn(B, 5, 6) + 1
    mean, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    target = (t - mean) / torch.sqrt(var + 1e-6)
    diff = (s @ loss.head.weight.T + loss.head.bias - target).abs()
    expected = torch.where(diff < 2.0, 0.5 * diff ** 2 / 2.0, diff - 1.0).mean()
    assert loss(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


# -- asymmetric masks ---------------------------------------------------------------


def test_asymmetric_masks_have_the_stated_counts_and_the_student_set_inside_the_teachers():
    keep, extra, _ = dp.asymmetric_masking(torch.rand(4, 49), 0.75, 0.5)
    # AMD's generator removes int(r L) patches: 49 - 36 = 13 kept (MAE's int(L (1 - r)) gives 12)
    assert keep.shape == (4, 49 - int(0.75 * 49)) == (4, 13)
    assert extra.shape == (4, 49 - int(0.5 * 49) - 13) == (4, 12)
    for k, e in zip(keep.tolist(), extra.tolist()):
        assert len(set(k)) == 13 and len(set(e)) == 12 and not set(k) & set(e)  # disjoint
        assert all(0 <= i < 49 for i in k + e)


def test_asymmetric_masks_differ_per_sample_and_repeat_with_the_same_generator():
    keep, _, _ = dp.asymmetric_masking(torch.rand(8, 49, generator=torch.Generator().manual_seed(3)), 0.75, 0.5)
    again, _, _ = dp.asymmetric_masking(torch.rand(8, 49, generator=torch.Generator().manual_seed(3)), 0.75, 0.5)
    assert torch.equal(keep, again)
    assert len({tuple(sorted(row)) for row in keep.tolist()}) == 8


def test_the_student_keeps_what_mae_random_masking_keeps_for_the_same_noise():
    noise = torch.rand(3, 16)
    tokens = torch.arange(16.0).expand(3, 16)[..., None]
    ids_keep, mae_mask = random_masking(noise, 0.75)
    kept = gather_tokens(tokens, ids_keep)
    keep, _, mask = dp.asymmetric_masking(noise, 0.75, 0.5)
    assert torch.equal(kept[..., 0].long(), keep)
    assert torch.equal(mask, mae_mask)


# -- the methods on tiny models -------------------------------------------------------

STUDENT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_teacher(depth=3):
    torch.manual_seed(1)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4,
                             num_classes=0).eval().requires_grad_(False)


def tiny_distiller(method, teacher):
    torch.manual_seed(0)
    if method in ("attn", "amd", "d2"):
        student = MaskedAutoencoderViT(**STUDENT, decoder_embed_dim=16, decoder_depth=1,
                                       decoder_num_heads=2, norm_pix_loss=True,
                                       decode_layer=1 if method == "d2" else None)
    else:
        student = VisionTransformer(**STUDENT, num_classes=0, pos_embed="sincos", drop_path_rate=0.1,
                                    last_block_heads=4 if method == "relation" else None)
    if method == "attn":
        return dp.AttentionDistiller(student, 4, 3, 0.75)
    if method == "d2":  # pixels from block 1 of 2, attention into block 3
        return dp.DecoupledDistiller(student, 4, 3, 0.75)
    if method == "relation":
        return dp.RelationDistiller(student, 2)
    if method == "amd":
        return dp.AMDDistiller(student, 64, (1, 2), (2, 3), 0.75, 0.5)
    return dp.FeatureDistiller(student, 64, 2)


def run(model, teacher, imgs):
    if model.__class__ in (dp.AttentionDistiller, dp.AMDDistiller, dp.DecoupledDistiller):
        return model(imgs, torch.rand(imgs.shape[0], 16), teacher)
    return model(imgs, imgs.flip(-1), teacher)


@pytest.mark.parametrize("method", dp.METHODS)
def test_every_trainable_parameter_gets_a_gradient_and_the_teacher_none(method):
    """What DDP without find_unused_parameters needs."""
    teacher = tiny_teacher()
    model = tiny_distiller(method, teacher).train()
    loss, terms = run(model, teacher, torch.randn(B, 3, 32, 32))
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(p.grad is None for p in teacher.parameters())


def test_relation_freezes_exactly_what_follows_the_last_blocks_qkv():
    model = tiny_distiller("relation", tiny_teacher())
    frozen = {n.split(".weight")[0].split(".bias")[0] for n, p in model.named_parameters()
              if not p.requires_grad}
    assert frozen == {"student.pos_embed", "student.blocks.1.attn.proj", "student.blocks.1.norm2",
                      "student.blocks.1.mlp.fc1", "student.blocks.1.mlp.fc2", "student.norm"}


def test_relation_student_last_block_has_the_teachers_head_count():
    teacher = tiny_teacher()
    model = tiny_distiller("relation", teacher)
    qkv_last = model.student.encode(model.student.embed(torch.randn(1, 3, 32, 32)), qkv=(2,)).qkv[2]
    assert [b.attn.num_heads for b in model.student.blocks] == [2, 4]
    assert qkv_last[0].shape == (1, 4, 17, 32 // 4)  # head_dim = student width / teacher heads


def test_the_truncated_teacher_gives_the_relations_of_the_full_forwards_block_k():
    teacher = tiny_teacher(depth=4)
    model = tiny_distiller("relation", teacher).eval()  # reads teacher block 2 of 4
    x = torch.randn(B, 3, 32, 32)
    with torch.no_grad():
        loss, _ = model(x, x, teacher)
        full = teacher.encode(teacher.embed(x), qkv=(2,)).qkv[2]  # all four blocks run
        student = model.student.encode(model.student.embed(x), qkv=(2,)).qkv[2]
    assert loss.item() == pytest.approx(relation_loss(student, full).item(), rel=1e-6)


@pytest.mark.parametrize("method, blocks_run", [("attn", [1, 2, 3]), ("relation", [1]),
                                                ("amd", [1, 2, 3]), ("feature", [1, 2]),
                                                ("d2", [1, 2, 3])])
def test_the_teacher_never_runs_past_the_deepest_block_the_method_reads(method, blocks_run):
    teacher = tiny_teacher(depth=4)  # attn reads block 3, relation block 2's q/k/v only,
    model = tiny_distiller(method, teacher)  # amd blocks 2 and 3, feature block 2
    ran = []

    for i, blk in enumerate(teacher.blocks, start=1):
        blk.mlp.register_forward_hook(lambda *a, i=i: ran.append(f"mlp{i}"))
        blk.register_forward_hook(lambda *a, i=i: ran.append(i))
    run(model, teacher, torch.randn(1, 3, 32, 32))
    assert ran == [x for i in blocks_run for x in (f"mlp{i}", i)]


# -- whole runs: a teacher from mae_pretrain.py, then each method ---------------------

# 16x16 images in 2x2 patches of 8: a 12-block student and teacher stay cheap on a CPU.
DATA = ["--input_size", "16", "--patch_size", "8", "--synthetic_samples", "32", "--num_workers", "0"]
RUN = [*DATA, "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "0", "--lr", "1e-3"]


def parse(module, argv):
    return module.get_args_parser().parse_args([str(a) for a in argv])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose much on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A ViT-Small MAE (384 wide, 6 heads) made by mae_pretrain.py, for a ViT-Tiny student."""
    out = tmp_path_factory.mktemp("teacher")
    mae_pretrain.main(parse(mae_pretrain, [
        "--model", "mae_vit_small", "--decoder_embed_dim", "32", "--decoder_depth", "1",
        "--decoder_num_heads", "2", *DATA, "--synthetic_samples", "16", "--batch_size", "16",
        "--epochs", "1", "--warmup_epochs", "0", "--output_dir", out]))
    return out / "checkpoint.pth"


@pytest.fixture(scope="module")
def runs(teacher_ckpt, tmp_path_factory):
    out = {}
    for method in dp.METHODS:
        out[method] = tmp_path_factory.mktemp(method)
        dp.main(parse(dp, ["--method", method, "--teacher", teacher_ckpt, *RUN,
                           "--output_dir", out[method]]))
    return out


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("method, terms", [("attn", ["pixel", "attn"]), ("relation", ["qk", "vv"]),
                                           ("amd", ["pixel", "direct", "generation"]), ("feature", []),
                                           ("d2", ["pixel", "attn"])])
def test_each_method_lowers_its_distillation_loss_and_logs_each_term(runs, method, terms):
    first, last = read_log(runs[method])
    assert {f"train_{t}" for t in terms} <= first.keys()
    distill = {"attn": ["attn"], "relation": ["loss"], "amd": ["direct", "generation"],
               "feature": ["loss"], "d2": ["attn"]}[method]  # relation and feature have no pixel loss
    for t in distill:
        assert last[f"train_{t}"] < 0.9 * first[f"train_{t}"], t


def test_a_distilled_checkpoint_loads_as_a_plain_vit_backbone(runs):
    ckpt = util.load_checkpoint(runs["amd"] / "checkpoint.pth")
    backbone = VisionTransformer(img_size=16, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                                 num_classes=8)
    report = checkpoints.load_pretrained(backbone, ckpt, "amd", verbose=False)
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert any(k.startswith("distill.generators.") for k in report.unexpected)
    assert all(torch.equal(backbone.state_dict()[k], ckpt["model"]["student." + k]) for k in report.loaded)


def test_a_distilled_checkpoint_is_the_next_teacher_with_its_recorded_head_counts(runs, tmp_path):
    src = runs["relation"] / "checkpoint.pth"  # sequential distillation: S -> T
    args = parse(dp, ["--method", "relation", "--teacher", src, *RUN, "--output_dir", tmp_path])
    teacher = dp.build_teacher(args, 8, torch.device("cpu"))
    assert (teacher.config["num_heads"], teacher.config["last_block_heads"]) == (3, 6)
    weights = util.load_checkpoint(src)["model"]
    assert all(torch.equal(v, weights["student." + k]) for k, v in teacher.state_dict().items())
    args.teacher_num_heads = 3  # uniform heads, as the official TinyMIM rebuilds its teachers
    assert dp.build_teacher(args, 8, torch.device("cpu")).config["last_block_heads"] is None


def test_a_relation_students_last_block_output_is_refused_as_a_feature_target(runs, tmp_path):
    args = parse(dp, ["--method", "feature", "--teacher", runs["relation"] / "checkpoint.pth", *RUN,
                      "--output_dir", tmp_path])
    with pytest.raises(util.CheckpointError, match="trained only up to its q/k/v"):
        dp.main(args)


def test_a_relation_run_resumes_strictly_with_its_frozen_parameters(runs, teacher_ckpt, tmp_path,
                                                                    capsys):
    shutil.copytree(runs["relation"], tmp_path / "run")
    dp.main(parse(dp, ["--method", "relation", "--teacher", teacher_ckpt, *RUN, "--epochs", "3",
                       "--output_dir", tmp_path / "run"]))
    assert "continuing at 2" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(tmp_path / "run")] == [0, 1, 2]


def without_key_bias(state):
    """The k third of each qkv bias gets a zero gradient in exact arithmetic (softmax ignores a
    constant per query), so Adam turns rounding noise into lr-sized steps there: leave it out.
    Adam does the same to any weight whose gradient happens to be near zero, so a few elements
    elsewhere may differ too (155 of 13.1 million, by up to 0.56 lr, on one install), where a
    process group that did not average the gradients would move nearly all of them."""
    return {k: torch.cat([v.chunk(3)[0], v.chunk(3)[2]]) if k.endswith("qkv.bias") else v
            for k, v in state.items()}


def test_two_processes_match_one_at_the_same_global_batch(teacher_ckpt, runs, tmp_path):
    two = tmp_path / "two"
    common = ["distill_pretrain.py", "--method", "amd", "--teacher", teacher_ckpt, *RUN]
    proc = run_torchrun(2, *common, "--batch_size", "4", "--output_dir", two)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "effective batch 8 = 4 per process x 1 accumulation x 2 processes" in proc.stdout
    for a, b in zip(read_log(runs["amd"]), read_log(two)):
        for t in ("train_pixel", "train_direct", "train_generation"):
            assert a[t] == pytest.approx(b[t], rel=1e-5)
    one = without_key_bias(util.load_checkpoint(runs["amd"] / "checkpoint.pth")["model"])
    got = without_key_bias(util.load_checkpoint(two / "checkpoint.pth")["model"])
    differ = sum((one[k] - got[k]).abs().gt(1e-5).sum().item() for k in one)
    assert differ <= sum(v.numel() for v in one.values()) // 10_000  # all but a few (see above)


# -- bad input ----------------------------------------------------------------------


def bad_teacher(case, tmp_path, teacher_ckpt):
    """-> (teacher path, extra flags) for each way a teacher can fail to fit."""
    if case == "layer beyond its depth":
        return teacher_ckpt, ["--teacher_layer", "13"]
    path = tmp_path / f"{case.replace(' ', '_')}.pth"
    if case == "patch size 4 for a patch-8 student":
        torch.save({"model": VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2,
                                               num_heads=2, num_classes=0).state_dict()}, path)
    elif case == "unknown layout":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(b"not a checkpoint")
    return path, []


@pytest.mark.parametrize("case, message", [
    ("patch size 4 for a patch-8 student", "patch size 4 does not fit the student's 8"),
    ("layer beyond its depth", "has 12 blocks, cannot give block(s) [13] (--teacher_layer)"),
    ("unknown layout", "unknown layout"),
    ("corrupt file", "not a PyTorch checkpoint or the file is corrupt"),
])
def test_a_teacher_that_does_not_fit_stops_before_training_naming_file_and_reason(
        teacher_ckpt, tmp_path, case, message):
    path, flags = bad_teacher(case, tmp_path, teacher_ckpt)
    args = parse(dp, ["--method", "relation", "--teacher", path, *RUN, *flags,
                      "--output_dir", tmp_path / "run"])
    with pytest.raises(util.CheckpointError) as e:
        dp.main(args)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


@pytest.mark.parametrize("flags, message", [
    (["--method", "relation", "--teacher_mask_ratio", "0.3"],
     "--teacher_mask_ratio is for --method amd, not relation"),
    (["--method", "amd", "--teacher_mask_ratio", "0.75"],
     "--teacher_mask_ratio 0.75 must keep more of the 4 patches"),
    (["--method", "amd", "--mask_ratio", "0.5", "--teacher_mask_ratio", "0.75"],  # reversed: fewer
     "--teacher_mask_ratio 0.75 must keep more of the 4 patches than --mask_ratio 0.5"),
])
def test_flags_that_cannot_work_are_refused_at_start(tmp_path, flags, message):
    with pytest.raises(util.ConfigError) as e:
        dp.main(parse(dp, [*flags, "--teacher", tmp_path / "none.pth", *RUN]))
    assert message in str(e.value)


def test_a_corrupt_teacher_exits_non_zero_with_one_line(tmp_path):
    (tmp_path / "torn.pth").write_bytes(b"garbage")
    proc = run_script("distill_pretrain.py", "--method", "attn", "--teacher", tmp_path / "torn.pth",
                      *RUN, "--output_dir", tmp_path / "run")
    assert proc.returncode == 1
    assert error_line(proc).startswith(f"error: {tmp_path / 'torn.pth'}: not a PyTorch checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1


# -- AMD's own settings, as its code has them ---------------------------------------------


def test_amd_pixel_target_standardises_each_patch_per_channel_on_the_unnormalised_image():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 8, 8)
    got = dp.amd_pixel_target(imgs, 4)  # (2, 4, 48) in MAE's (p, q, c) order
    mean, std = torch.tensor(data.IMAGENET_MEAN), torch.tensor(data.IMAGENET_STD)
    for b in range(2):
        for row in range(2):
            for col in range(2):
                patch = imgs[b, :, 4 * row:4 * row + 4, 4 * col:4 * col + 4] * std[:, None, None] + mean[:, None, None]
                for c in range(3):
                    x = patch[c]
                    expected = (x - x.mean()) / (x.std(unbiased=True) + 1e-6)  # (4, 4)
                    assert torch.allclose(got[b, 2 * row + col, c::3], expected.flatten(), atol=1e-5)


@pytest.mark.parametrize("method, width, size", [("amd", 384, (192, 4, 3)), ("amd", 768, (384, 4, 6)),
                                                 ("amd", 192, (96, 4, 3)), ("attn", 192, (96, 1, 3))])
def test_each_method_gets_its_papers_pixel_decoder(method, width, size):
    """AMD's ViT-S / ViT-B decoders are VideoMAE's (192 x 4 x 3, 384 x 4 x 6); MAE-Lite's is 96 x 1 x 3."""
    assert dp.decoder_size(method, width) == size


# -- D²-MAE (--method d2): decoupled pixel and attention losses ---------------------------


def d2_by_hand(model, teacher, imgs, noise):
    """The D²-MAE loss from the pieces, block by block: pixel(decoder(norm(x_k))) + w * MSE of
    the head-mixed logits of the attention-only block d+1 against the teacher's last block."""
    s, extra, W = model.student, model.distill["extra_block"], model.distill["attn_loss"].mix.weight
    ids_keep, mask = random_masking(noise, 0.75)
    x = gather_tokens(s.embed(imgs), ids_keep)
    x = torch.cat([(s.cls_token + s.pos_embed[:, :1]).expand(len(x), -1, -1), x], dim=1)
    outs = []
    for blk in s.blocks:
        x = blk(x)
        outs.append(x)
    latent = F.layer_norm(outs[0], (32,), s.norm.weight, s.norm.bias, eps=1e-6)  # block k = 1
    pixel = mae_loss(s.forward_decoder(latent, ids_keep), s.patchify(imgs), mask, s.norm_pix_loss)
    h = F.layer_norm(outs[-1], (32,), extra.norm1.weight, extra.norm1.bias, eps=1e-6)
    Wq, Wk = extra.qkv.weight[:32], extra.qkv.weight[32:64]
    q = (h @ Wq.T + extra.qkv.bias[:32]).unflatten(-1, (2, 16)).transpose(1, 2)  # (B, 2 heads, n, 16)
    k = (h @ Wk.T + extra.qkv.bias[32:64]).unflatten(-1, (2, 16)).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / 16 ** 0.5
    mixed = torch.stack([sum(W[j, i] * logits[:, i] for i in range(2)) for j in range(4)], dim=1)
    ids_keep = torch.argsort(noise, dim=1)[:, :x.shape[1] - 1]
    with torch.no_grad():
        target = teacher.encode(gather_tokens(teacher.embed(imgs), ids_keep), attn=(3,),
                                attn_logits=True).attn[3]  # the full teacher forward
    return pixel, ((mixed - target) ** 2).mean()


def test_d2_loss_is_pixel_from_block_k_plus_the_extra_blocks_mixed_logits_mse():
    teacher = tiny_teacher()
    model = tiny_distiller("d2", teacher).eval()
    model.weight = 0.5
    imgs, noise = torch.randn(B, 3, 32, 32), torch.rand(B, 16)
    loss, terms = model(imgs, noise, teacher)
    pixel, attn = d2_by_hand(model, teacher, imgs, noise)
    assert terms["pixel"].item() == pytest.approx(pixel.item(), rel=1e-5)
    assert terms["attn"].item() == pytest.approx(attn.item(), rel=1e-5)
    assert loss.item() == pytest.approx((pixel + 0.5 * attn).item(), rel=1e-5)


def test_d2_pixel_loss_never_reaches_blocks_after_k_and_the_distillation_loss_does():
    teacher = tiny_teacher()
    model = tiny_distiller("d2", teacher).train()  # k = 1 of 2 blocks
    imgs, noise = torch.randn(B, 3, 32, 32), torch.rand(B, 16)
    pixel, attn = d2_by_hand(model, teacher, imgs, noise)  # independent of the module's forward
    after_k = list(model.student.blocks[1].parameters())
    up_to_k = list(model.student.blocks[0].parameters())
    from_pixel = torch.autograd.grad(pixel, after_k + up_to_k, allow_unused=True, retain_graph=True)
    from_attn = torch.autograd.grad(attn, after_k + up_to_k, allow_unused=True)
    n = len(after_k)
    assert all(g is None for g in from_pixel[:n])  # block 2 is not in the pixel loss's graph
    assert all(g is not None and g.abs().sum() > 0 for g in from_pixel[n:])
    assert all(g is not None and g.abs().sum() > 0 for g in from_attn)  # both blocks
    # and the module's own loss agrees: its pixel term's gradient at block 2 is exactly zero
    _, terms = model(imgs, noise, teacher)
    grads = torch.autograd.grad(terms["pixel"], after_k, allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in grads)


def test_d2_extra_block_uses_only_norm1_and_the_q_k_thirds_of_qkv():
    teacher = tiny_teacher()
    model = tiny_distiller("d2", teacher).train()
    loss, _ = run(model, teacher, torch.randn(B, 3, 32, 32))
    loss.backward()
    extra = model.distill["extra_block"]
    assert {n for n, _ in extra.named_parameters()} == {"norm1.weight", "norm1.bias", "qkv.weight", "qkv.bias"}
    assert torch.all(extra.qkv.weight.grad[64:] == 0) and extra.qkv.weight.grad[:64].abs().sum() > 0


def test_a_d2_checkpoint_loads_as_a_plain_vit_with_every_key_accounted_for(runs, capsys):
    ckpt = util.load_checkpoint(runs["d2"] / "checkpoint.pth")
    assert ckpt["model_config"]["depth"] == 12 and ckpt["model_config"]["decode_layer"] == 8
    backbone = VisionTransformer(img_size=16, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                                 num_classes=8, global_pool="token")
    report = checkpoints.load_pretrained(backbone, ckpt, "d2")
    saved = {k.removeprefix("student."): v for k, v in ckpt["model"].items()}
    assert sorted(report.loaded + report.unexpected) == sorted(saved)  # nothing dropped unreported
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    assert sorted(k for k in report.unexpected if k.startswith("distill.")) == [
        "distill.attn_loss.mix.weight", "distill.extra_block.norm1.bias", "distill.extra_block.norm1.weight",
        "distill.extra_block.qkv.bias", "distill.extra_block.qkv.weight"]
    assert all(k.startswith(("decoder_", "mask_token", "distill.")) for k in report.unexpected)
    assert all(torch.equal(backbone.state_dict()[k], saved[k]) for k in report.loaded)
    out = capsys.readouterr().out
    assert "D²-MAE's attention-only block 13, used only in pre-training: not part of the 12-block" in out


def test_the_official_d2_checkpoints_partial_block_13_is_read_as_the_extra_block(tmp_path, capsys):
    """MAE-Lite's mae_tiny_distill_d2_400e.pth.tar: a 13-block MAE whose block 13 has only norm1
    and attn.qkv, under module.model., next to the teacher (module.tch_model.) and the mixer."""
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                               decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    sd = {f"module.model.{k}": v for k, v in mae.state_dict().items()
          if not k.startswith("blocks.2.") or k.startswith(("blocks.2.norm1.", "blocks.2.attn.qkv."))}
    sd["module.attn_adapter.adapter11.weight"] = torch.zeros(4, 2, 1, 1)
    sd["module.tch_model.patch_embed.proj.weight"] = torch.zeros(64, 3, 8, 8)
    path = tmp_path / "mae_tiny_distill_d2_400e.pth.tar"
    torch.save({"model": sd}, path)
    cfg = checkpoints.infer_config(checkpoints.load(path), str(path))
    assert (cfg["depth"], cfg["decode_layer"]) == (2, 8)  # the official decode_idx
    backbone = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    report = checkpoints.load_pretrained(backbone, checkpoints.load(path), str(path))
    assert {"distill.extra_block.qkv.weight", "distill.extra_block.norm1.bias"} <= set(report.unexpected)
    assert torch.equal(backbone.blocks[1].attn.qkv.weight, mae.blocks[1].attn.qkv.weight)
    assert "attention-only block 3" in capsys.readouterr().out


def test_a_d2_student_reconstructs_from_its_decode_layer():
    """What analyze.py draws: MaskedAutoencoderViT(decode_layer=k) runs blocks 1..k only."""
    teacher = tiny_teacher()
    model = tiny_distiller("d2", teacher).eval()
    imgs, noise = torch.randn(B, 3, 32, 32), torch.rand(B, 16)
    with torch.no_grad():
        pred, target, mask = model.student(imgs, 0.75, noise)
        loss = mae_loss(pred, target, mask, model.student.norm_pix_loss)
        _, terms = model(imgs, noise, teacher)
    assert loss.item() == pytest.approx(terms["pixel"].item(), rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--method", "attn", "--decode_layer", "6"], "--decode_layer is for --method d2, not attn"),
    (["--method", "d2", "--decode_layer", "13"], "--decode_layer must lie in [1, 12], got 13"),
    (["--method", "d2", "--decode_layer", "0"], "--decode_layer must lie in [1, 12], got 0"),
])
def test_bad_decode_layers_are_refused_with_one_line(tmp_path, flags, message):
    with pytest.raises(util.ConfigError, match=re.escape(message)):
        dp.main(parse(dp, [*flags, "--teacher", tmp_path / "none.pth", *RUN]))


def test_a_d2_run_refuses_to_resume_with_another_decode_layer(runs, teacher_ckpt, tmp_path):
    shutil.copytree(runs["d2"], tmp_path / "run")
    with pytest.raises(util.ConfigError, match="was trained with --decode_layer 8, this run has --decode_layer 6"):
        dp.main(parse(dp, ["--method", "d2", "--teacher", teacher_ckpt, *RUN, "--epochs", "3",
                           "--decode_layer", "6", "--output_dir", tmp_path / "run"]))
