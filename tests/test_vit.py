"""vit.py: timm's names and numerics, MAE's sin-cos embedding, the public taps."""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import vit
from conftest import ROOT
from vit import VisionTransformer, interpolate_pos_embed, sincos_pos_embed

CFG = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


def small_vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(**{**CFG, **kw}).eval()


def expected_vit_keys(D, depth, C, p, N, num_classes, pool):
    """The names and shapes of timm's ViT / the MAE checkpoints, written out by hand."""
    keys = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + N, D),
            "patch_embed.proj.weight": (D, C, p, p), "patch_embed.proj.bias": (D,)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,),
                     b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                     b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                     b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                     b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                     b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,)})
    norm = "norm" if pool == "token" else "fc_norm"
    keys.update({f"{norm}.weight": (D,), f"{norm}.bias": (D,),
                 "head.weight": (num_classes, D), "head.bias": (num_classes,)})
    return keys


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_state_dict_names_and_shapes_match_the_hand_written_list(pool):
    model = small_vit(global_pool=pool)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected_vit_keys(48, 3, 3, 8, 16, 5, pool)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_timm_vit_loads_our_weights_strictly_and_gives_the_same_logits(pool):
    timm = pytest.importorskip("timm")
    ours = small_vit(global_pool=pool, drop_path_rate=0.1)
    torch.nn.init.normal_(ours.head.weight)  # the 2e-5 init would make every logit tiny
    ref = timm.models.vision_transformer.VisionTransformer(**CFG, global_pool=pool).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-4


def test_our_vit_loads_timm_weights_strictly_and_gives_the_same_logits():
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    ref = timm.models.vision_transformer.VisionTransformer(**CFG, global_pool="avg").eval()
    ours = small_vit(global_pool="avg")
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-4


def reference_sincos(D, G):
    """MAE's 2-D sin-cos embedding, element by element: token 1 + row*G + col; channels
    [0, D/2) from the column, [D/2, D) from the row; [sin | cos] of pos * 10000^(-j/(D/4))."""
    out = torch.zeros(1 + G * G, D, dtype=torch.float64)
    for row in range(G):
        for col in range(G):
            for half, pos in ((0, col), (1, row)):
                for j in range(D // 4):
                    w = 10000 ** (-j / (D / 4))
                    out[1 + row * G + col, half * D // 2 + j] = math.sin(pos * w)
                    out[1 + row * G + col, half * D // 2 + D // 4 + j] = math.cos(pos * w)
    return out


def test_sincos_matches_the_element_by_element_definition():
    got = sincos_pos_embed(16, 4).double()
    assert torch.allclose(got, reference_sincos(16, 4), atol=1e-6)


def test_sincos_puts_the_column_half_first_and_a_zero_cls_row():
    emb = sincos_pos_embed(16, 4)
    assert torch.all(emb[0] == 0)
    row0_col1 = emb[1 + 1]  # row 0, column 1
    assert row0_col1[0] == pytest.approx(math.sin(1.0), abs=1e-6)  # column half: pos 1
    assert row0_col1[4] == pytest.approx(math.cos(1.0), abs=1e-6)
    assert row0_col1[8] == pytest.approx(0.0, abs=1e-6)  # row half: pos 0
    assert row0_col1[12] == pytest.approx(1.0, abs=1e-6)


def test_sincos_model_keeps_a_fixed_embedding():
    model = small_vit(pos_embed="sincos")
    assert not model.pos_embed.requires_grad
    assert torch.allclose(model.pos_embed[0], sincos_pos_embed(48, 4))


def test_interpolate_pos_embed_keeps_cls_row_and_resizes_the_grid():
    pe = torch.randn(1, 1 + 16, 8)
    out = interpolate_pos_embed(pe, 6)
    assert out.shape == (1, 1 + 36, 8)
    assert torch.equal(out[:, 0], pe[:, 0])
    assert interpolate_pos_embed(pe, 4) is pe
    const = torch.full((1, 1 + 16, 8), 0.7)
    assert torch.allclose(interpolate_pos_embed(const, 7), torch.full((1, 50, 8), 0.7), atol=1e-5)


def test_encode_taps_give_block_outputs_norm1_and_final_norm():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        taps = model.encode(model.embed(x), layers=(1, 2, 3), norm1=(1, 2, 3))
        assert torch.allclose(taps.norm1[2], model.blocks[1].norm1(taps.layers[1]))
        assert torch.allclose(taps.x, model.norm(taps.layers[3]))
        assert torch.allclose(taps.x, model.forward_features(x))


def test_the_blocks_run_as_a_plain_sequential_like_the_encoder():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), model.embed(x)], 1)
        assert torch.equal(torch.nn.Sequential(*model.blocks)(tokens),
                           model.encode(model.embed(x), layers=(3,)).layers[3])


def test_the_model_files_work_copied_alone_into_another_project(tmp_path):
    for name in ("vit.py", "hiera.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    code = ("import torch, vit, hiera\n"
            "print(tuple(vit.create_vit('vit_tiny', img_size=32, patch_size=8)(torch.zeros(1, 3, 32, 32)).shape),"
            " tuple(hiera.create_hiera('hiera_lite_tiny', img_size=64)(torch.zeros(1, 3, 64, 64)).shape))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the folder, torch and einops
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == "(1, 1000) (1, 1000)", proc.stderr[-2000:]


def test_attention_taps_are_softmax_of_logits_and_leave_the_output_unchanged():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.embed(x)
        fused = model.encode(tokens).x
        logits = model.encode(tokens, attn=(1, 2, 3), attn_logits=True)
        probs = model.encode(tokens, attn=(2,))
    assert logits.attn[2].shape == (2, 3, 17, 17)
    assert torch.allclose(probs.attn[2], logits.attn[2].softmax(-1), atol=1e-6)
    assert torch.allclose(logits.x, fused, atol=1e-5)  # explicit and fused paths agree


def test_qkv_tap_is_the_fused_projection_split_three_heads_dim():
    model = small_vit()
    with torch.no_grad():
        taps = model.encode(model.embed(torch.randn(2, 3, 32, 32)), qkv=(2,), norm1=(2,))
        W = model.blocks[1].attn.qkv(taps.norm1[2])  # (B, N, 3D) with layout (three, heads, dim)
        q, k, v = taps.qkv[2]
    assert q.shape == (2, 3, 17, 16)
    head1_k = W[..., 48 + 16:48 + 32]  # second chunk = k, second head
    assert torch.equal(k[:, 1], head1_k)


def test_only_blocks_asked_for_attention_leave_the_fused_kernel(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(vit.F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = small_vit()
    with torch.no_grad():
        model.encode(model.embed(torch.randn(1, 3, 32, 32)), attn=(2,))
    assert len(calls) == 2  # blocks 1 and 3


def test_stop_at_returns_the_same_layer_output_as_the_full_forward():
    model = small_vit()
    tokens = model.embed(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        full = model.encode(tokens, layers=(2,), qkv=(2,))
        cut = model.encode(tokens, layers=(2,), stop_at=2)
        qkv_only = model.encode(tokens, qkv=(2,), stop_at=2)
    assert cut.x is None and torch.equal(cut.layers[2], full.layers[2])
    assert qkv_only.layers == {} and all(torch.equal(a, b) for a, b in zip(qkv_only.qkv[2], full.qkv[2]))


def test_stop_at_with_only_qkv_skips_the_rest_of_the_block(monkeypatch):
    model = small_vit()
    ran = []
    model.blocks[1].mlp.register_forward_hook(lambda *a: ran.append("mlp"))
    model.blocks[2].register_forward_hook(lambda *a: ran.append("block3"))
    with torch.no_grad():
        model.encode(model.embed(torch.randn(1, 3, 32, 32)), qkv=(2,), stop_at=2)
    assert ran == []


def test_taps_outside_the_depth_are_refused():
    model = small_vit()
    with pytest.raises(ValueError, match="1..3"):
        model.encode(model.embed(torch.randn(1, 3, 32, 32)), layers=(4,))


def test_drop_path_ramps_linearly_and_drops_whole_samples():
    model = small_vit(drop_path_rate=0.2)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])
    dp = vit.DropPath(0.5).train()
    torch.manual_seed(0)
    out = dp(torch.ones(64, 5, 3))
    per_sample = out.flatten(1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # kept samples scaled by 1/keep
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert torch.equal(dp.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def test_presets_and_overrides():
    tiny = vit.create_vit("vit_tiny", num_heads=12, num_classes=0)
    assert (tiny.embed_dim, tiny.depth, tiny.blocks[0].attn.num_heads) == (192, 12, 12)
    assert vit.create_vit("vit_huge", num_classes=0, img_size=28, depth=1).patch_embed.patch_size == 14
    adaptive = vit.create_vit("vit_tiny", num_classes=0, last_block_heads=6)
    assert [b.attn.num_heads for b in adaptive.blocks][-2:] == [3, 6]
    with pytest.raises(ValueError, match="not divisible"):
        vit.create_vit("vit_tiny", img_size=30, patch_size=4)


def test_patch_embedding_bias_keeps_conv2ds_default_init_as_mae():
    """MAE re-initialises only the patch embedding's weight (xavier on the (D, C*p*p) view)."""
    model = small_vit()
    bias, fan_in = model.patch_embed.proj.bias, 3 * 8 * 8
    assert bias.abs().max() <= fan_in ** -0.5 and bias.abs().min() > 0
    bound = math.sqrt(6 / (fan_in + 48))  # xavier-uniform of a (48, 192) matrix
    assert model.patch_embed.proj.weight.abs().max() <= bound


# -- BEiT's relative position bias (--rel_pos_bias) -----------------------------------


def reference_rel_pos_index(G):
    """BEiT's index written out pair by pair: patch tokens 1 + row*G + col; offsets shifted to
    start at 0, row offset times (2G - 1) plus column offset; then cls query (2G-1)^2, cls key
    (2G-1)^2 + 1, cls-cls (2G-1)^2 + 2."""
    n = (2 * G - 1) ** 2
    out = torch.zeros(1 + G * G, 1 + G * G, dtype=torch.long)
    for i in range(1 + G * G):
        for j in range(1 + G * G):
            if i == 0 and j == 0:
                out[i, j] = n + 2
            elif i == 0:
                out[i, j] = n
            elif j == 0:
                out[i, j] = n + 1
            else:
                (ri, ci), (rj, cj) = divmod(i - 1, G), divmod(j - 1, G)
                out[i, j] = (ri - rj + G - 1) * (2 * G - 1) + (ci - cj + G - 1)
    return out


@pytest.mark.parametrize("G", [1, 2, 3])
def test_relative_position_index_matches_beits_pair_by_pair_construction(G):
    assert torch.equal(vit.relative_position_index(G), reference_rel_pos_index(G))


def test_rel_pos_bias_adds_a_zero_table_per_block_under_beits_names():
    model = small_vit(rel_pos_bias=True)
    sd = model.state_dict()
    for i in range(3):  # one table per block, (2G-1)^2 + 3 = 52 rows for the 4x4 grid, one column per head
        assert sd[f"blocks.{i}.attn.relative_position_bias_table"].shape == (52, 3)
        assert torch.all(sd[f"blocks.{i}.attn.relative_position_bias_table"] == 0)
        assert torch.equal(sd[f"blocks.{i}.attn.relative_position_index"], reference_rel_pos_index(4))
    tables = [model.blocks[i].attn.relative_position_bias_table for i in range(3)]
    assert len({t.data_ptr() for t in tables}) == 3  # not shared
    assert model.pos_embed.requires_grad  # the absolute position embedding is kept
    plain = {k for k in small_vit().state_dict()}
    assert set(sd) - plain == {f"blocks.{i}.attn.relative_position_{n}" for i in range(3)
                               for n in ("bias_table", "index")}


def randomise_tables(model):
    torch.manual_seed(5)
    for blk in model.blocks:
        torch.nn.init.normal_(blk.attn.relative_position_bias_table, std=1.0)
    return model


def test_rel_pos_logits_equal_timms_beit_with_the_same_weights():
    """timm's Beit (abs pos + a table per block, q_bias/v_bias, no k bias, no layer scale):
    ours with a zero k bias computes the same classifier."""
    timm = pytest.importorskip("timm")
    ours = randomise_tables(small_vit(rel_pos_bias=True, global_pool="avg"))
    torch.nn.init.normal_(ours.head.weight)
    D = CFG["embed_dim"]
    with torch.no_grad():
        for blk in ours.blocks:
            blk.attn.qkv.bias[D:2 * D] = 0  # Beit's k has no bias
            torch.nn.init.normal_(blk.attn.qkv.bias[:D], std=0.5)
    ref = timm.models.beit.Beit(**CFG, global_pool="avg", use_abs_pos_emb=True, use_rel_pos_bias=True,
                                init_values=None).eval()
    sd = {}
    for k, v in ours.state_dict().items():
        if k.endswith("relative_position_index"):
            continue  # timm's buffer is not persistent
        if k.endswith("attn.qkv.bias"):
            sd[k.replace("qkv.bias", "q_bias")], sd[k.replace("qkv.bias", "v_bias")] = v[:D], v[2 * D:]
        else:
            sd[k] = v
    ref.load_state_dict(sd, strict=True)
    assert torch.equal(ref.blocks[1].attn.relative_position_index, ours.blocks[1].attn.relative_position_index)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-4
        assert (ours(x) - small_vit(global_pool="avg").eval()(x)).abs().max() > 1e-2  # the tables matter


def test_rel_pos_fused_and_explicit_paths_agree_and_the_tapped_logits_include_the_bias():
    model = randomise_tables(small_vit(rel_pos_bias=True))
    tokens = model.embed(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        fused = model.encode(tokens, layers=(1,))
        tapped = model.encode(tokens, layers=(1,), attn=(1, 2, 3), attn_logits=True)
        blk = model.blocks[0]
        q, k, v = blk.attn.qkv_heads(blk.norm1(torch.cat([model.cls_token + model.pos_embed[:, :1]
                                                          .expand(2, -1, -1)[:, :1], tokens], 1)))
        table, index = blk.attn.relative_position_bias_table, blk.attn.relative_position_index
        bias = torch.stack([table[index, h] for h in range(3)])  # (h, N, N), read entry by entry
        by_hand = q @ k.transpose(-1, -2) / (CFG["embed_dim"] // 3) ** 0.5 + bias
    assert torch.allclose(tapped.attn[1], by_hand, atol=1e-5)
    assert torch.allclose(tapped.layers[1], fused.layers[1], atol=1e-5)
    assert torch.allclose(tapped.x, fused.x, atol=1e-5)


def test_rel_pos_refuses_a_masked_token_subset():
    model = small_vit(rel_pos_bias=True)
    with pytest.raises(ValueError, match="defined on all 17 tokens of the grid, got 5"):
        model.encode(model.embed(torch.randn(1, 3, 32, 32))[:, :4])
