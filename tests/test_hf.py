"""Hugging Face transformers checkpoints in (checkpoints.load_pretrained) and out (checkpoints.py),
checked against transformers itself: the models are built from a config with random
weights, never downloaded.

Naming generations: transformers 5.x keeps its modules under 5.x names (vit.layers.N.
attention.q_proj, mlp.fc1, ...); its save_pretrained writes 4.x's names (vit.encoder.layer.N.
attention.attention.query, intermediate.dense, ...) unless save_original_format=False.
Both come from the installed transformers here. One thing 5.x writes differently from
4.x: the MAE decoder's blocks, as decoder.decoder_encoder.layer.N instead of 4.x's
decoder.decoder_layers.N; the true 4.x file (facebook/vit-mae-*) is built from 5.x's by
renaming that stack (`as_4x`), since only one transformers is installed.
"""
import json
import re
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (ViTConfig, ViTForImageClassification, ViTMAEConfig,  # noqa: E402
                          ViTMAEForPreTraining, ViTModel)

import analyze  # noqa: E402
import checkpoints  # noqa: E402
import distill_pretrain as dp  # noqa: E402
import finetune  # noqa: E402
import util  # noqa: E402
from conftest import TINY_DATA, error_line, run_script  # noqa: E402
from mae_pretrain import MaskedAutoencoderViT, mae_loss  # noqa: E402
from vit import VisionTransformer, sincos_pos_embed  # noqa: E402

# 48 wide with 4 heads and a 32-wide decoder with 2: neither is the count checkpoints.py would
# guess from the width (1 and 1), so a match shows the head counts came from config.json.
ARCH = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)
MAE_ARCH = dict(ARCH, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
HF_ARCH = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
               image_size=32, patch_size=8, layer_norm_eps=1e-6)  # eps: see the eps test
HF_MAE_ARCH = dict(HF_ARCH, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                   decoder_num_attention_heads=2, decoder_intermediate_size=128, norm_pix_loss=True)
IMGS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
NOISE = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))


def randomize(model, seed=0):
    """Every parameter random (position embeddings and mask token too: a fresh transformers
    5.x ViTMAE holds zeros there until weights are loaded), norms around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)
    return model.eval()


def hf_mae(seed=0, **cfg):
    return randomize(ViTMAEForPreTraining(ViTMAEConfig(**{**HF_MAE_ARCH, **cfg})), seed)


def as_4x(sd):
    """transformers 5.x's on-disk names -> 4.x's (they differ only in the decoder's stack)."""
    return {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v for k, v in sd.items()}


def hf_output(model):
    with torch.no_grad():
        return model(pixel_values=IMGS, noise=NOISE)


def load(model, path, **kw):
    """checkpoints.load_pretrained of the file or directory at `path`, named by its path."""
    return checkpoints.load_pretrained(model, checkpoints.load(path), str(path), **kw)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# -- reading --------------------------------------------------------------------------


def test_transformers_sincos_position_embedding_is_maes_layout_bit_for_bit():
    """transformers computes [sin_h|cos_h|sin_w|cos_w] and rotates the halves to MAE's
    column-first layout, so an MAE of ours rebuilt from its weights adds the same positions."""
    hf = ViTMAEForPreTraining(ViTMAEConfig(**HF_MAE_ARCH))
    hf.decoder.initialize_weights(num_patches=16)  # transformers' own sin-cos, 4x4 grid
    assert torch.equal(hf.decoder.decoder_pos_embed[0], sincos_pos_embed(32, 4))


def saved(layout, hf, tmp_path):
    """`hf` written the way `layout` names; returns the path checkpoints.load is given."""
    d = tmp_path / layout
    if layout == "5.x directory (save_original_format=False)":
        hf.save_pretrained(d, save_original_format=False)
        return d
    hf.save_pretrained(d)  # 4.x names, except 5.x's spelling of the decoder's stack
    if layout == "save_pretrained directory":
        return d
    if layout == "4.x directory, pytorch_model.bin":  # the older hub files are .bin
        torch.save(as_4x(load_file(d / "model.safetensors")), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
        return d
    if layout == "4.x weight file alone":
        save_file(as_4x(load_file(d / "model.safetensors")), tmp_path / "model.safetensors")
        return tmp_path / "model.safetensors"
    if layout == "5.x state_dict alone":
        torch.save(hf.state_dict(), tmp_path / "vit_mae.pth")
        return tmp_path / "vit_mae.pth"
    raise ValueError(layout)


LAYOUTS = ["save_pretrained directory", "4.x directory, pytorch_model.bin",
           "5.x directory (save_original_format=False)", "4.x weight file alone",
           "5.x state_dict alone"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_transformers_vitmae_gives_its_loss_prediction_and_mask_through_load_pretrained(
        layout, tmp_path):
    hf = hf_mae()
    path = saved(layout, hf, tmp_path)
    ours = MaskedAutoencoderViT(**MAE_ARCH, norm_pix_loss=True).eval()
    report = load(ours, path, allow_missing=(), verbose=False)
    assert report.missing == [] and report.unexpected == []
    want = hf_output(hf)
    with torch.no_grad():
        pred, target, mask = ours(IMGS, 0.75, NOISE)
        loss = mae_loss(pred, target, mask, ours.norm_pix_loss)
    assert torch.equal(mask, want.mask)
    # The same operations in the same order here: equal to float rounding (measured: 0.0).
    assert max_diff(pred, want.logits) < 1e-5
    assert loss.item() == pytest.approx(want.loss.item(), rel=1e-6)


def test_config_json_gives_the_head_counts_and_image_size(tmp_path):
    hf_mae().save_pretrained(tmp_path / "mae")
    cfg = checkpoints.infer_config(checkpoints.load(tmp_path / "mae"), str(tmp_path / "mae"))
    assert (cfg["num_heads"], cfg["heads_inferred"], cfg["decoder_num_heads"]) == (4, False, 2)
    assert (cfg["embed_dim"], cfg["depth"], cfg["patch_size"], cfg["img_size"]) == (48, 2, 8, 32)
    weights = tmp_path / "mae" / "model.safetensors"
    alone = checkpoints.infer_config(checkpoints.load(weights), str(weights))  # no config: guessed
    assert (alone["num_heads"], alone["heads_inferred"]) == (1, True)


def test_a_recorded_head_count_from_config_json_is_enforced(tmp_path):
    hf_mae().save_pretrained(tmp_path / "mae")
    with pytest.raises(util.CheckpointError, match="trained with 4 heads, the model has 2"):
        load(VisionTransformer(**{**ARCH, "num_heads": 2}, num_classes=0), tmp_path / "mae", verbose=False)


def test_a_transformers_vit_classifier_gives_its_logits_through_finetunes_eval_loader(tmp_path):
    hf = randomize(ViTForImageClassification(ViTConfig(**HF_ARCH, num_labels=8)))
    hf.save_pretrained(tmp_path / "vit")
    model = VisionTransformer(**ARCH, num_classes=8)  # as finetune.py --eval --cls_token builds it
    finetune.load_classifier(model, checkpoints.load(tmp_path / "vit"), str(tmp_path / "vit"),
                             [f"LABEL_{i}" for i in range(8)])  # config.json's id2label
    with torch.no_grad():
        assert max_diff(model.eval()(IMGS), hf(pixel_values=IMGS).logits) < 1e-5


def test_a_transformers_vit_without_qkv_bias_loads_with_a_zero_bias_and_its_logits(tmp_path):
    hf = randomize(ViTForImageClassification(ViTConfig(**HF_ARCH, num_labels=8, qkv_bias=False)))
    hf.save_pretrained(tmp_path / "vit")
    model = VisionTransformer(**ARCH, num_classes=8).eval()
    load(model, tmp_path / "vit", allow_missing=(), verbose=False)
    assert torch.equal(model.blocks[0].attn.qkv.bias, torch.zeros(3 * 48))
    with torch.no_grad():
        assert max_diff(model(IMGS), hf(pixel_values=IMGS).logits) < 1e-5


def test_a_transformers_vitmodel_loads_and_only_its_tanh_pooler_is_unused(tmp_path):
    hf = randomize(ViTModel(ViTConfig(**HF_ARCH)))  # add_pooling_layer=True: BERT's pooler
    hf.save_pretrained(tmp_path / "vit")
    ours = VisionTransformer(**ARCH, num_classes=0).eval()
    report = load(ours, tmp_path / "vit", allow_missing=(), verbose=False)
    assert sorted(report.unexpected) == ["vit.pooler.dense.bias", "vit.pooler.dense.weight"]
    with torch.no_grad():
        assert max_diff(ours.forward_features(IMGS), hf(pixel_values=IMGS).last_hidden_state) < 1e-5


def test_transformers_layer_norm_eps_1e_12_moves_the_outputs_by_less_than_1e_4(tmp_path):
    """transformers' configs say 1e-12 (facebook/vit-mae-*, google/vit-*); the weights were
    trained with 1e-6 (official MAE, JAX ViT), which the ViT here always uses."""
    hf = hf_mae(layer_norm_eps=1e-12)
    hf.save_pretrained(tmp_path / "mae")
    ours = MaskedAutoencoderViT(**MAE_ARCH, norm_pix_loss=True).eval()
    load(ours, tmp_path / "mae", allow_missing=(), verbose=False)
    with torch.no_grad():
        pred, target, mask = ours(IMGS, 0.75, NOISE)
        loss = mae_loss(pred, target, mask, ours.norm_pix_loss)
    want = hf_output(hf)
    assert max_diff(pred, want.logits) < 1e-4 and loss.item() == pytest.approx(want.loss.item(), rel=1e-5)


# -- reading: what is refused ------------------------------------------------------------


def bad_input(case, tmp_path):
    """-> the path checkpoints.load is given for each kind of bad input."""
    d = tmp_path / "hf"
    if case == "unsupported model type":
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "swin"}))
        return d
    hf_mae().save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    if case == "no weights":
        (d / "model.safetensors").unlink()
    elif case == "no config.json":
        (d / "config.json").unlink()
    elif case == "width disagrees":
        (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    elif case == "depth disagrees":
        (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    elif case == "not JSON":
        (d / "config.json").write_text("{'hidden_size': 48")
    elif case == "approximate GELU":
        (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_new"}))
    elif case == "a DeiT weight file":
        sd = {"deit." + k[4:] if k.startswith("vit.") else k: v
              for k, v in load_file(d / "model.safetensors").items()}
        save_file(sd, tmp_path / "deit.safetensors")
        return tmp_path / "deit.safetensors"
    elif case == "layer scale in a block (DINOv2-like)":
        sd = load_file(d / "model.safetensors")
        sd["vit.encoder.layer.0.layer_scale1.lambda1"] = torch.ones(48)
        save_file(sd, tmp_path / "dinov2.safetensors")
        return tmp_path / "dinov2.safetensors"
    return d


@pytest.mark.parametrize("case, where, message", [
    ("no weights", "hf", "has config.json but no model.safetensors or pytorch_model.bin"),
    ("no config.json", "hf", "a directory without config.json; give a checkpoint file"),
    ("width disagrees", "hf/config.json", "hidden_size is 64, the weights in model.safetensors have 48"),
    ("depth disagrees", "hf/config.json", "num_hidden_layers is 3, the weights in model.safetensors have 2"),
    ("not JSON", "hf/config.json", "not valid JSON"),
    ("approximate GELU", "hf/config.json", "hidden_act 'gelu_new'"),
    ("unsupported model type", "hf/config.json", "model_type 'swin'; only Hugging Face ViT"),
    ("a DeiT weight file", "deit.safetensors", "a Hugging Face 'deit' model; only ViT and ViTMAE"),
    ("layer scale in a block (DINOv2-like)", "dinov2.safetensors",
     "vit.encoder.layer.0.layer_scale1.lambda1 is not part of a ViT block"),
])
def test_bad_transformers_input_is_refused_naming_the_file_and_the_problem(tmp_path, case, where, message):
    path = bad_input(case, tmp_path)
    with pytest.raises(util.CheckpointError) as e:
        load(VisionTransformer(**ARCH, num_classes=0), path, verbose=False)
    assert str(e.value).startswith(f"{tmp_path / where}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


# -- writing ---------------------------------------------------------------------------


def our_checkpoint(tmp_path, model, **extra):
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "model_config": model.config, **extra}, path)
    return path


def test_an_exported_mae_loads_into_transformers_without_warnings_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    ours = MaskedAutoencoderViT(**MAE_ARCH, norm_pix_loss=True).eval()
    path = our_checkpoint(tmp_path, ours, args={"mask_ratio": 0.6})
    checkpoints.export(path, tmp_path / "hf")
    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    c = hf.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.image_size,
            c.decoder_num_attention_heads, c.norm_pix_loss, c.mask_ratio) == (48, 2, 4, 8, 32, 2, True, 0.6)
    with torch.no_grad():
        want = hf.eval()(pixel_values=IMGS, noise=NOISE)
        pred, target, mask = ours(IMGS, 0.6, NOISE)
        loss = mae_loss(pred, target, mask, ours.norm_pix_loss)
    assert torch.equal(mask, want.mask)
    assert max_diff(pred, want.logits) < 1e-5
    assert loss.item() == pytest.approx(want.loss.item(), rel=1e-6)


def test_ours_to_transformers_to_ours_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    src = MaskedAutoencoderViT(**MAE_ARCH, norm_pix_loss=True)
    checkpoints.export(our_checkpoint(tmp_path, src), tmp_path / "hf")
    back = MaskedAutoencoderViT(**MAE_ARCH)
    load(back, tmp_path / "hf", allow_missing=(), verbose=False)
    assert src.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in src.state_dict().items())


def test_an_exported_cls_token_classifier_gives_our_logits_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = VisionTransformer(**ARCH, num_classes=5).eval()
    torch.nn.init.normal_(ours.head.weight)
    kind, _ = checkpoints.export(our_checkpoint(tmp_path, ours), tmp_path / "hf")
    hf, info = ViTForImageClassification.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert kind == "classifier" and not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert max_diff(hf.eval()(pixel_values=IMGS).logits, ours(IMGS)) < 1e-5


def test_an_encoder_exports_as_a_vitmodel_whose_only_new_weights_are_the_pooler(tmp_path):
    torch.manual_seed(0)
    ours = VisionTransformer(**ARCH, num_classes=0).eval()
    kind, _ = checkpoints.export(our_checkpoint(tmp_path, ours), tmp_path / "hf")
    assert kind == "encoder"
    hf, info = ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, info = ViTModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    with torch.no_grad():
        assert max_diff(hf.eval()(pixel_values=IMGS).last_hidden_state, ours.forward_features(IMGS)) < 1e-5


def test_without_safetensors_the_export_is_a_pytorch_model_bin_transformers_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    torch.manual_seed(0)
    ours = VisionTransformer(**ARCH, num_classes=0).eval()
    checkpoints.export(our_checkpoint(tmp_path, ours), tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "pytorch_model.bin"]
    monkeypatch.undo()
    hf, info = ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("case, message", [
    ("mean-pooled classifier", "a mean-pooled model (fc_norm, no final norm)"),
    ("linear probe", "a linear-probe head (BatchNorm1d + Linear)"),
    ("adaptive last block", "its last block has 4 heads, the others 2 (TinyMIM's adaptive block)"),
    ("mae without decoder", "--kind mae, but the checkpoint has no MAE decoder"),
    ("norm_pix_loss unknown", "norm_pix_loss is not recorded"),
])
def test_what_transformers_cannot_represent_is_refused_with_one_line(tmp_path, case, message):
    kind = "auto"
    if case == "mean-pooled classifier":
        path = our_checkpoint(tmp_path, VisionTransformer(**ARCH, num_classes=5, global_pool="avg"))
    elif case == "linear probe":
        m = VisionTransformer(**ARCH, num_classes=5)
        m.head = torch.nn.Sequential(torch.nn.BatchNorm1d(48, affine=False), m.head)
        path = our_checkpoint(tmp_path, m)
    elif case == "adaptive last block":
        path = our_checkpoint(tmp_path, VisionTransformer(**{**ARCH, "num_heads": 2}, last_block_heads=4))
    elif case == "mae without decoder":
        path, kind = our_checkpoint(tmp_path, VisionTransformer(**ARCH, num_classes=0)), "mae"
    else:  # official MAE layout: {'model': ...}, nothing recorded
        path = tmp_path / "mae_visualize.pth"
        torch.save({"model": MaskedAutoencoderViT(**MAE_ARCH).state_dict()}, path)
    with pytest.raises(util.CheckpointError) as e:
        checkpoints.export(path, tmp_path / "hf", kind=kind)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_the_command_exits_with_one_line_on_a_refusal(tmp_path):
    path = our_checkpoint(tmp_path, VisionTransformer(**ARCH, num_classes=5, global_pool="avg"))
    proc = run_script("checkpoints.py", path, tmp_path / "hf")
    assert proc.returncode == 1
    assert proc.stderr.strip() == error_line(proc) and error_line(proc).startswith(f"error: {path}: a mean-pooled")


# -- the stages with a transformers checkpoint --------------------------------------------

# A ViT-Tiny-shaped ViTMAE (192 wide, 12 blocks) with 6 heads (3 is what the width suggests)
# and a 64-wide decoder with 4 heads (the width suggests 2), patch 8 at 32 px.
TINY_HF = dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=6, intermediate_size=768,
               image_size=32, patch_size=8, layer_norm_eps=1e-6, decoder_hidden_size=64,
               decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
               decoder_intermediate_size=256, norm_pix_loss=True)
RUN = ["--input_size", "16", "--patch_size", "8", "--synthetic_samples", "16", "--num_workers", "0",
       "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--lr", "1e-3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose much on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "vit-mae-tiny"
    randomize(ViTMAEForPreTraining(ViTMAEConfig(**TINY_HF))).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def distilled(hf_dir, tmp_path_factory):
    """One short run of each method with the transformers directory as --teacher."""
    out = {}
    for method in dp.METHODS:
        out[method] = tmp_path_factory.mktemp(method)
        dp.main(dp.get_args_parser().parse_args(
            ["--method", method, "--teacher", str(hf_dir), *RUN, "--output_dir", str(out[method])]))
    return out


def test_a_transformers_vitmae_is_a_teacher_with_its_config_heads_and_its_features(hf_dir, tmp_path):
    args = dp.get_args_parser().parse_args(["--method", "attn", "--teacher", str(hf_dir),
                                            "--input_size", "32", "--output_dir", str(tmp_path)])
    teacher = dp.build_teacher(args, 8, torch.device("cpu"))
    assert teacher.config["num_heads"] == 6
    hf = ViTMAEForPreTraining.from_pretrained(hf_dir, mask_ratio=0.0).eval()
    identity = torch.arange(16.0).expand(3, 16)  # argsort keeps every patch in its place
    with torch.no_grad():
        want = hf.vit(pixel_values=IMGS, noise=identity).last_hidden_state
        assert max_diff(teacher.forward_features(IMGS), want) < 1e-4


@pytest.mark.parametrize("method", dp.METHODS)
def test_every_distillation_method_runs_from_a_transformers_teacher(distilled, method):
    log = [json.loads(l) for l in (distilled[method] / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and all(v == v for v in log[0].values())  # one epoch, no NaN


def test_a_distilled_student_exports_to_transformers_and_computes_the_same(distilled, tmp_path):
    """MAE-Lite's student (attn: an MAE under 'student.', the head mixer under 'distill.')."""
    ckpt = distilled["attn"] / "checkpoint.pth"
    kind, config = checkpoints.export(ckpt, tmp_path / "hf")
    hf, info = ViTMAEForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert kind == "mae" and not info["missing_keys"] and not info["unexpected_keys"]
    assert (config["num_attention_heads"], config["image_size"], config["mask_ratio"]) == (3, 16, 0.75)
    ours = MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=192, depth=12, num_heads=3,
                                decoder_embed_dim=96, decoder_depth=1, decoder_num_heads=3,
                                norm_pix_loss=True).eval()
    load(ours, ckpt, verbose=False)
    imgs, noise = IMGS[:, :, :16, :16], NOISE[:, :4]
    with torch.no_grad():
        want = hf.eval()(pixel_values=imgs, noise=noise)
        pred, target, mask = ours(imgs, 0.75, noise)
        loss = mae_loss(pred, target, mask, ours.norm_pix_loss)
    assert max_diff(pred, want.logits) < 1e-5 and loss.item() == pytest.approx(want.loss.item(), rel=1e-5)


def test_a_transformers_vitmae_fine_tunes(hf_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    finetune.main(finetune.get_args_parser().parse_args(
        [*TINY_DATA, "--synthetic_samples", "32", "--patch_size", "8", "--num_heads", "6",
         "--finetune", str(hf_dir), "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "16",
         "--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0", "--output_dir", str(out)]))
    printed = capsys.readouterr().out
    # cls_token, pos_embed, patch_embed (2) and 12 blocks x 12; mean pooling leaves `norm` unused
    assert re.search(r"loaded 148 tensors from .*vit-mae-tiny", printed)
    unused = next(line for line in printed.splitlines() if "unexpected (not used" in line)
    assert "decoder_blocks.*.attn.qkv.weight" in unused and " norm.weight" in unused
    assert len(json.loads((out / "log.txt").read_text().splitlines()[-1])) > 0


def test_a_transformers_vitmae_is_analysed_with_reconstructions(hf_dir, tmp_path, capsys):
    analyze.main(analyze.get_args_parser().parse_args(
        [str(hf_dir), *TINY_DATA, "--num_images", "8", "--output_dir", str(tmp_path)]))
    printed = capsys.readouterr().out
    assert "6 heads (recorded in the checkpoint)" in printed
    assert "decoder 64 wide, 1 blocks, 4 heads; norm_pix_loss=True (recorded" in printed
    assert (tmp_path / "reconstructions_vit-mae-tiny.png").stat().st_size > 5_000
