"""analyze.py: CKA and HSIC_1 against reference values and independent formulas, the
attention statistics on attention maps whose answer is known, and the command itself."""
import argparse
import json
import math

import numpy as np
import pytest
import torch

import analyze
import checkpoints as ckpts
import data
import mae_pretrain
import util
from analyze import MinibatchCKA, attention_distance, attention_entropy, hsic1, linear_cka, patch_distances
from conftest import TINY_DATA, run_script
from vit import VisionTransformer


def kornblith_xy():
    """The reference case of MAE-Lite's CKA check: numpy seed 1337, X = randn(100, 10), Y = randn(100, 10) + X."""
    rng = np.random.RandomState(1337)  # the stream np.random.seed(1337) gives
    x = rng.randn(100, 10)
    y = rng.randn(100, 10) + x
    return torch.from_numpy(x), torch.from_numpy(y)


def reference_hsic1(K, L):
    """Song et al.'s estimator written literally with ones vectors and matrix products."""
    n = K.shape[0]
    K, L = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=K.dtype)
    value = (torch.trace(K @ L) + (one.T @ K @ one) * (one.T @ L @ one) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (one.T @ K @ L @ one))
    return value.item() / (n * (n - 3))


# -- CKA ------------------------------------------------------------------------


def test_linear_cka_matches_the_reference_values():
    x, y = kornblith_xy()
    assert linear_cka(x, y).item() == pytest.approx(0.55761, abs=5e-6)
    assert linear_cka(x, y, debiased=True).item() == pytest.approx(0.51346, abs=5e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_of_features_with_themselves_is_one(debiased):
    x, _ = kornblith_xy()
    assert linear_cka(x, x, debiased).item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(100, 10), (12, 300)])
def test_linear_cka_equals_the_centred_gram_formula(shape):
    # Kornblith et al. eq. (4) with H = I - 11^T/n: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH));
    # (12, 300) has more features than samples, where linear_cka works on Gram matrices.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = x @ torch.randn(shape[1], 7, generator=g, dtype=torch.float64) + torch.randn(shape[0], 7, generator=g,
                                                                                      dtype=torch.float64)
    n = shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1 / n
    K, L = x @ x.T, y @ y.T
    ref = torch.trace(K @ H @ L @ H) / torch.sqrt(torch.trace(K @ H @ K @ H) * torch.trace(L @ H @ L @ H))
    assert linear_cka(x, y).item() == pytest.approx(ref.item(), rel=1e-10)


@pytest.mark.parametrize("transform", ["orthogonal", "isotropic_scaling", "translation"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_orthogonal_maps_isotropic_scaling_and_translation(transform, debiased):
    x, y = kornblith_xy()
    g = torch.Generator().manual_seed(1)
    if transform == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
        x2 = x @ q
    elif transform == "isotropic_scaling":
        x2 = 3.7 * x
    else:
        x2 = x + torch.randn(10, generator=g, dtype=torch.float64) * 5
    assert linear_cka(x2, y, debiased).item() == pytest.approx(linear_cka(x, y, debiased).item(), abs=1e-10)


def test_cka_is_not_invariant_to_a_general_invertible_linear_map():
    x, y = kornblith_xy()
    A = torch.diag(torch.tensor([10.0] + [1.0] * 9, dtype=torch.float64))  # stretch one axis
    A = A + 0.3 * torch.randn(10, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.linalg.matrix_rank(A) == 10
    assert abs(linear_cka(x @ A, y).item() - linear_cka(x, y).item()) > 0.05


def test_debiased_cka_is_near_zero_for_independent_wide_features_where_biased_is_near_one():
    # 10 samples of 1000 independent features: the centred Grams are both close to
    # 1000 * H, so the biased estimate is close to 1 although X and Y are unrelated.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 1000, generator=g, dtype=torch.float64)
    y = torch.randn(10, 1000, generator=g, dtype=torch.float64)
    assert linear_cka(x, y).item() > 0.95
    assert abs(linear_cka(x, y, debiased=True).item()) < 0.1


def test_single_batch_minibatch_cka_equals_debiased_linear_cka():
    x, y = kornblith_xy()
    xs, ys = [x, y, x ** 2], [y, x + 1, torch.tanh(y)]
    acc = MinibatchCKA(3, 3)
    acc.update(xs, ys)  # uncentred Gram matrices and HSIC_1, against centred feature-space formulas
    expected = torch.tensor([[linear_cka(a, b, debiased=True).item() for b in ys] for a in xs])
    assert torch.allclose(acc.compute(), expected.double(), atol=1e-10)


def test_minibatch_cka_sums_hsic1_terms_over_batches():
    x, y = kornblith_xy()
    acc = MinibatchCKA(1, 1)
    sums = {"xy": 0.0, "xx": 0.0, "yy": 0.0}
    for part in (slice(0, 40), slice(40, 100)):  # batches of 40 and 60 images
        acc.update([x[part]], [y[part]])
        K, L = x[part] @ x[part].T, y[part] @ y[part].T
        sums["xy"] += reference_hsic1(K, L)
        sums["xx"] += reference_hsic1(K, K)
        sums["yy"] += reference_hsic1(L, L)
    expected = sums["xy"] / math.sqrt(sums["xx"] * sums["yy"])
    assert acc.compute().item() == pytest.approx(expected, rel=1e-10)
    assert expected != pytest.approx(linear_cka(x, y, debiased=True).item(), rel=1e-3)  # not the pooled value


def test_hsic1_needs_at_least_four_samples():
    K = torch.ones(3, 3)
    with pytest.raises(ValueError, match="at least 4 samples"):
        hsic1(K, K)


# -- attention statistics -----------------------------------------------------------


def test_uniform_attention_on_a_14x14_grid_gives_the_reference_distance_and_entropy():
    attn = torch.full((2, 3, 196, 196), 1 / 196)
    dist = attention_distance(attn, patch_distances(14, 16))
    assert dist.shape == (3,)
    assert dist.tolist() == pytest.approx([116.49] * 3, abs=0.005)  # 7.2808 patches x 16 px
    assert attention_distance(attn, patch_distances(14, 1)).tolist() == pytest.approx([7.2808] * 3, abs=5e-5)
    assert attention_entropy(attn).tolist() == pytest.approx([math.log(196)] * 3, abs=1e-6)


def test_one_hot_self_attention_has_zero_distance_and_zero_entropy():
    attn = torch.eye(49).expand(2, 4, 49, 49)  # every query attends only to itself
    assert attention_distance(attn, patch_distances(7, 16)).tolist() == [0.0] * 4
    assert attention_entropy(attn).tolist() == [0.0] * 4


# -- the command ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two MAE-Tiny checkpoints (12 blocks, 16 patches of 8x8) made by mae_pretrain.py:
    3 and 6 heads, one epoch each; both files are called checkpoint.pth."""
    root = tmp_path_factory.mktemp("mae")
    for name, flags in (("mae_a", ["--seed", "0"]), ("mae_b", ["--seed", "1", "--num_heads", "6"])):
        args = mae_pretrain.get_args_parser().parse_args(
            [*TINY_DATA, "--patch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "16",
             "--output_dir", str(root / name), *flags])
        mae_pretrain.main(args)
    return root / "mae_a" / "checkpoint.pth", root / "mae_b" / "checkpoint.pth"


@pytest.fixture(scope="module")
def analysis(checkpoints, tmp_path_factory):
    """One run of the command: all 16 validation images in one batch."""
    out = tmp_path_factory.mktemp("analysis")
    proc = run_script("analyze.py", *checkpoints, *TINY_DATA, "--batch_size", "16", "--output_dir", out)
    assert proc.returncode == 0, proc.stderr
    return proc, out


def test_the_command_writes_cka_matrices_attention_statistics_and_figures(analysis):
    proc, out = analysis
    for pair in ("mae_a_vs_mae_a", "mae_a_vs_mae_b", "mae_b_vs_mae_b"):
        assert np.load(out / f"cka_{pair}.npy").shape == (13, 13)  # 12 blocks + 'out'
    assert np.load(out / "attention_mae_a.npy").shape == (2, 12, 3)  # distance, entropy
    assert np.load(out / "attention_mae_b.npy").shape == (2, 12, 6)
    stats = json.loads((out / "attention.json").read_text())["models"]
    assert stats["mae_b"]["num_heads"] == [6] * 12 and stats["mae_b"]["num_images"] == 16
    for figure in ("cka.png", "attention.png", "reconstructions_mae_a.png", "reconstructions_mae_b.png"):
        assert (out / figure).stat().st_size > 10_000
    assert (out / "cka.png").stat().st_size < 150_000


def test_a_model_compared_with_itself_has_cka_one_on_the_diagonal(analysis):
    m = np.load(analysis[1] / "cka_mae_a_vs_mae_a.npy")
    assert np.allclose(np.diag(m), 1.0, atol=1e-9)
    assert np.allclose(m, m.T, atol=1e-12)


def test_the_command_compares_mae_lite_features_and_patch_attention(analysis, checkpoints):
    # Recompute what the command should have computed from vit.py's taps, independently
    # of analyze.py's feature code: norm1 of each block and the final norm, cls dropped.
    args = analyze.get_args_parser().parse_args(["x", *TINY_DATA])
    ds, _ = data.build_dataset(args, train=False, transform=data.eval_transform(32))
    imgs = data.normalize(torch.stack([ds[i][0] for i in range(len(ds))]))
    feats, dists = [], []
    for path, heads in zip(checkpoints, (3, 6)):
        model = VisionTransformer(img_size=32, patch_size=8, num_classes=0, embed_dim=192, depth=12,
                                  num_heads=heads).eval()
        ckpts.load_pretrained(model, ckpts.load(path), str(path), verbose=False)
        with torch.no_grad():
            taps = model.encode(model.embed(imgs), norm1=range(1, 13), attn=(12,))
        feats.append([taps.norm1[k][:, 1:].flatten(1) for k in range(1, 13)] + [taps.x[:, 1:].flatten(1)])
        a = taps.attn[12][:, :, 1:, 1:]
        dists.append(attention_distance(a / a.sum(-1, keepdim=True), patch_distances(4, 8)))
    expected = np.array([[linear_cka(fa, fb, debiased=True).item() for fb in feats[1]] for fa in feats[0]])
    assert np.allclose(np.load(analysis[1] / "cka_mae_a_vs_mae_b.npy"), expected, atol=1e-6)
    stats = json.loads((analysis[1] / "attention.json").read_text())["models"]
    assert stats["mae_b"]["distance_px"][11] == pytest.approx(dists[1].tolist(), rel=1e-5)


def test_a_last_batch_under_four_images_joins_the_one_before():
    args = analyze.get_args_parser().parse_args(
        ["x", *TINY_DATA, "--batch_size", "6", "--num_images", "15"])
    assert [len(b) for b in analyze.analysis_loader(args).batch_sampler] == [6, 9]


def test_batches_of_fewer_than_four_images_are_refused(checkpoints, tmp_path):
    args = analyze.get_args_parser().parse_args(
        [str(checkpoints[0]), *TINY_DATA, "--batch_size", "3", "--output_dir", str(tmp_path)])
    with pytest.raises(util.ConfigError, match="--batch_size 3: HSIC_1 needs at least 4 images"):
        analyze.main(args)


@pytest.fixture
def encoder_only(checkpoints, tmp_path):
    """The official layout of mae_pretrain_vit_*.pth: {'model': encoder}, no decoder."""
    sd = ckpts.read_state_dict(ckpts.load(checkpoints[0]), str(checkpoints[0]))
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}}, path)
    return path


def test_reconstructing_from_an_encoder_only_checkpoint_names_the_files_to_use(encoder_only, tmp_path):
    args = analyze.get_args_parser().parse_args(
        [str(encoder_only), *TINY_DATA, "--reconstruct", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(util.CheckpointError) as e:
        analyze.main(args)
    assert str(e.value).startswith(f"{encoder_only}: has no MAE decoder")
    assert "*_full.pth or mae_visualize_vit_*.pth" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_an_encoder_only_checkpoint_is_analysed_without_reconstructions(encoder_only, tmp_path):
    args = analyze.get_args_parser().parse_args(
        [str(encoder_only), *TINY_DATA, "--num_images", "8", "--output_dir", str(tmp_path)])
    analyze.main(args)
    assert np.load(tmp_path / "cka_mae_pretrain_vit_tiny_vs_mae_pretrain_vit_tiny.npy").shape == (13, 13)
    assert not list(tmp_path.glob("reconstructions_*"))


@pytest.mark.parametrize("name, record, flag, expected", [
    ("checkpoint.pth", {"model_config": {"norm_pix_loss": False}}, True, False),  # the record wins
    ("model.pth", {}, False, False),  # no record: the flag
    ("mae_visualize_vit_large.pth", {}, None, False),  # the official demo models: raw pixels
    ("mae_pretrain_vit_base_full.pth", {}, None, True),  # MAE's recipe
])
def test_norm_pix_loss_comes_from_the_record_then_the_flag_then_the_file_name(name, record, flag, expected):
    assert analyze.norm_pix_setting(name, record, flag)[0] is expected


def test_reconstructions_mask_the_ratio_the_checkpoint_records_unless_told():
    given, unset = argparse.Namespace(mask_ratio=0.9), argparse.Namespace(mask_ratio=None)
    ours, hf = {"model": {}, "args": {"mask_ratio": 0.5}}, {"model": {}, "model_config": {"mask_ratio": 0.6}}
    assert analyze.mask_ratio_for(ours, unset, 0.75) == 0.5  # a run from here records its args
    assert analyze.mask_ratio_for(hf, unset, 0.75) == 0.6  # a Hugging Face config.json
    assert analyze.mask_ratio_for({"model": {}}, unset, 0.75) == 0.75
    assert analyze.mask_ratio_for(ours, given, 0.75) == 0.9


def test_the_data_scale_table_gives_each_students_mean_and_range_over_seeds_and_draws_the_figure(tmp_path, capsys):
    top1 = {("mae", 50): [40.0, 42.0, 47.0], ("mae", 200): [55.5], ("dmae", 50): [44.0, 46.0]}
    for (student, n), values in top1.items():
        for seed, acc in enumerate(values):
            run = tmp_path / "ft" / f"{student}_{n}_s{seed}"
            run.mkdir(parents=True)
            lines = [{"epoch": 0, "train_loss": 2.0}, {"epoch": 1, "test_acc1": acc}]  # the last line counts
            (run / "log.txt").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "ft" / "notes_s1").mkdir()  # not <student>_<n>_s<seed>: skipped
    (tmp_path / "ft" / "mae_50_s9").mkdir()  # a run that has not written its log yet: skipped
    (tmp_path / "ft" / "mae_50_s9" / "log.txt").write_text("")
    args = analyze.get_args_parser().parse_args(["--data_scale", str(tmp_path / "ft"), "--output_dir", str(tmp_path)])
    analyze.main(args)
    rows = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert rows["mae"] == "| mae | 43.00 (40.00-47.00, 3 seeds) | 55.50 (55.50-55.50, 1 seeds) |"
    assert rows["dmae"] == "| dmae | 45.00 (44.00-46.00, 2 seeds) | - |"
    assert (tmp_path / "data_scale.png").stat().st_size > 10_000


def test_checkpoints_and_data_scale_together_or_neither_are_refused(tmp_path):
    for argv in ([], ["a.pth", "--data_scale", str(tmp_path)]):
        with pytest.raises(util.ConfigError, match="give one or more checkpoints to analyse, or --data_scale"):
            analyze.main(analyze.get_args_parser().parse_args([*argv, "--output_dir", str(tmp_path / "out")]))
