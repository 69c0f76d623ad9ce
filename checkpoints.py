"""Checkpoints in the wild, in and out: every layout the stages read, and Hugging Face export.

Reading: `load` (a .pth / .pth.tar, a .safetensors file, or a transformers save_pretrained
directory) -> `read_state_dict` (timm/MAE names, whatever the wrapper and prefix) ->
`infer_config` (the architecture, read from the weights) -> `load_pretrained` (maps, checks
and reports every key) or `build_encoder` (a frozen ViT / Hiera with the file's architecture).

    official MAE        {'model': sd}; *_full / mae_visualize_* add the decoder
    timm, DeiT          sd / {'model': sd}; a DeiT dist_token row is dropped
    MAE-Lite, MoCo v3   {'model': sd} under module.model. / module.base_encoder.
    TinyMIM, AMD        MAE names; VideoMAE-style encoder. / backbone., q_bias + v_bias
    Hiera               {'model_state': sd}; timm's head.norm / head.fc = norm / head.projection
    transformers        ViT / ViTMAE in 4.x or 5.x names (HF_NAMES), q, k, v fused
    this project        {'model': sd, 'model_config': ..., 'args': ...}; students under student.

Writing (`python checkpoints.py CKPT OUT_DIR`): a transformers save_pretrained directory, a decoder ->
ViTMAEForPreTraining, a head -> ViTForImageClassification, neither -> ViTModel (layer_norm_eps 1e-6,
exact gelu); what transformers would compute otherwise is refused (a mean-pooled or linear-probe
head, TinyMIM's adaptive last block, relative position bias tables, a D²-MAE decoder).
"""
import argparse
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hiera import PATCH_STRIDE, Hiera
from vit import VIT_PRESETS, VisionTransformer, interpolate_pos_embed


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model (one line for the user)."""


def disk_error(e, folder="."):
    """Why a write failed: 'no space left on the device' also when torch's writer says 'unexpected pos'."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or \
        isinstance(e, RuntimeError) and os.path.isdir(folder) and shutil.disk_usage(folder).free < 2 ** 20
    why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0]
    return "no space left on the device" if full else why


def print0(*args):  # print on rank 0 of a torchrun job only (util's print0 is not imported here)
    if os.environ.get("RANK", "0") == "0":
        print(*args, flush=True)


# ----------------------------------------------------------------------------
# Reading a file and its state_dict

# Where a state_dict sits inside a checkpoint file, tried in this order.
WRAPPER_KEYS = ("model", "module", "state_dict", "model_state")
# Key prefixes, tried in this order: the first under which patch_embed.proj.weight exists
# wins; torch.compile's _orig_mod. is removed everywhere.
PREFIXES = ("", "module.", "model.", "module.model.", "encoder.", "backbone.",
            "module.encoder.", "module.backbone.", "module.base_encoder.", "base_encoder.", "student.")
# D²-MAE's attention-only block 13 (distill_pretrain.py --method d2) and where MAE-Lite's
# pre-training decoded pixels from (mae_lite_distill_d2_exp.py: decode_idx 8).
D2_EXTRA_BLOCK, D2_DECODE_LAYER = "distill.extra_block.", 8


def load(path):
    """A checkpoint file (weights_only torch.load), a .safetensors file, or a transformers
    save_pretrained directory (read_hf_dir)."""
    path = Path(path)
    if path.is_dir():
        return read_hf_dir(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file  # installed with timm; HF hub weights use it
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return load_checkpoint(path)


def load_checkpoint(path):
    """torch.load with weights_only=True (a checkpoint from the internet cannot run code), one
    line for a missing, corrupt or code-carrying file. argparse.Namespace is allow-listed
    because MAE's own training checkpoints store one."""
    path = Path(path)
    if not path.is_file():
        why = "is a folder: give the checkpoint file in it" if path.is_dir() else "no such file"
        raise CheckpointError(f"{path}: {why}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        # torch names the Python object the pickle asks for: "Unsupported global: GLOBAL x.y"
        # (a class) or "unsupported GLOBAL posix.system whose module posix is blocked".
        blocked = re.search(r"GLOBAL\s+([\w.]+)", text)
        if blocked:
            raise CheckpointError(f"{path}: holds Python objects other than tensors ({blocked.group(1)}): "
                                  f"unpickling it would run code, so it was refused (load it with "
                                  f"weights_only=False only if you trust its source)") from None
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        detail = detail.group(1).strip() if detail else (text.strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or the file is corrupt "
                              f"({type(e).__name__}: {detail[:200]})") from None


def first_non_finite(named_tensors):
    """Name of the first floating tensor holding NaN / inf, or values so large (|w| > 1.8e19)
    that their squares overflow float32 (a LayerNorm or an MSE over them gives inf; `--lr
    1e37` leaves such weights after one step). None when all are fine."""
    for k, v in named_tensors:
        if v.is_floating_point() and not torch.isfinite(v.detach().float().square()).all():
            return k
    return None


def fingerprint(state_dict):
    """A short hash of the names, shapes and values of the tensors: other weights, another one."""
    h = hashlib.blake2b(digest_size=8)
    for k, v in sorted(state_dict.items()):
        h.update(f"{k}{tuple(v.shape)}{v.dtype}".encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_state_dict(obj, name):
    """Any known checkpoint layout (the module docstring) -> a state_dict with timm/MAE names.
    Keys outside the prefix that holds the model (a VideoMAE decoder, a teacher) keep their
    names, so `load_pretrained` reports them as unexpected."""
    sd = obj
    if isinstance(obj, dict):
        sd = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{name}: unknown layout: no state_dict of tensors at the top level "
                              f"or under {'/'.join(WRAPPER_KEYS)} (found {keys})")
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    if any(k.endswith(HF_PATCH) for k in sd):  # a transformers ViT / ViTMAE: renamed, q, k, v fused
        sd = from_hf(sd, name)
    prefix = next((p for p in PREFIXES if p + "patch_embed.proj.weight" in sd), None)
    if prefix is None:
        raise CheckpointError(f"{name}: unknown layout: no ViT patch_embed.proj.weight under any "
                              f"known prefix (first keys: {list(sd)[:4]})")
    sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    for k in [k for k in sd if k.endswith("attn.q_bias")]:  # BEiT / VideoMAE attention bias
        q, v = sd.pop(k), sd.pop(k.replace("q_bias", "v_bias"))
        sd[k.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
    if "dist_token" in sd:  # DeiT-distilled / TinyMIM*-T: rows are [cls, dist, patches...]
        sd.pop("dist_token")
        sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 2:]], dim=1)
    if family(sd) == "Hiera":  # timm's Hiera: head.norm, head.fc = official norm, head.projection
        return {re.sub(r"^head\.norm\.", "norm.", re.sub(r"^head\.fc\.", "head.projection.", k)): v
                for k, v in sd.items()}
    # MAE-Lite's official D²-MAE file (mae_tiny_distill_d2_400e.pth.tar) has a 13th block with
    # only norm1 and attn.qkv: the attention-only block of pre-training, not part of the
    # 12-block backbone. It moves where this project's d2 students keep it.
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    last = f"blocks.{depth - 1}."
    if depth >= 2 and {k for k in sd if k.startswith(last)} == \
            {f"{last}{n}.{w}" for n in ("norm1", "attn.qkv") for w in ("weight", "bias")}:
        sd = {(D2_EXTRA_BLOCK + k[len(last):].replace("attn.", "") if k.startswith(last) else k): v
              for k, v in sd.items()}
    return sd


def family(sd):
    """'Hiera' if a block changes width (official / timm Hiera: blocks.i.proj), else 'ViT'."""
    return "Hiera" if any(re.fullmatch(r"blocks\.\d+\.proj\.weight", k) for k in sd) else "ViT"


def recorded(obj, key="model_config"):
    """A dict the checkpoint records next to the weights ({} when there is none); MAE's own
    training checkpoints store their args as an argparse.Namespace."""
    rec = obj.get(key) if isinstance(obj, dict) else None
    rec = vars(rec) if isinstance(rec, argparse.Namespace) else rec
    return rec if isinstance(rec, dict) else {}


# ----------------------------------------------------------------------------
# The architecture of a checkpoint, read from its weights

# Head counts are not in the weights: a width's usual count unless the checkpoint records its
# own. ViT: vit.py's presets; Hiera: the official sizes and MAE-Lite's 46. Decoders (MAE's
# 512-wide, MAE-Lite's 96-wide): 32-dim heads.
HEADS_BY_WIDTH = {cfg["embed_dim"]: cfg["num_heads"] for cfg in VIT_PRESETS.values()}
HIERA_HEADS_BY_WIDTH = {96: 1, 46: 1, 112: 2, 144: 2, 256: 4}


def infer_config(obj, name):
    """Constructor arguments of the checkpoint's model, read from its weights, plus 'family'
    and 'heads_inferred' (num_heads is the recorded count, or the width's usual one).
    ViT: embed_dim, depth, patch_size, in_chans, img_size (pos_embed's grid), mlp_ratio,
    global_pool, num_classes, last_block_heads, rel_pos_bias. Hiera: embed_dim, in_chans,
    img_size, stages (where the width doubles), mlp_ratio, q_pool (an MAE's fusion convs, else
    recorded, else a classifier's 3), num_classes. An MAE also gives its decoder's size."""
    sd, saved = read_state_dict(obj, name), recorded(obj)
    w = sd["patch_embed.proj.weight"]
    if w.ndim != 4:  # VideoMAE / AMD video models embed tubelets with a Conv3d
        raise CheckpointError(f"{name}: patch_embed.proj.weight has shape {tuple(w.shape)}, not the "
                              f"(D, C, p, p) of an image model (a video model?)")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=0)
    needed = [*(["pos_embed"] if family(sd) == "Hiera" else []),
              *(f"blocks.{i}.mlp.fc{j}.weight" for i in range(depth) for j in (1, 2))]
    missing = next((k for k in needed if k not in sd), None)
    if missing:
        raise CheckpointError(f"{name}: has no {missing} (a partial checkpoint? found {len(sd)} tensors: "
                              f"{group(list(sd))[:160]}); the architecture cannot be read from it")
    D, C, p = w.shape[0], w.shape[1], w.shape[2]
    cfg = dict(family=family(sd), embed_dim=D, in_chans=C, heads_inferred="num_heads" not in saved,
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / sd["blocks.0.mlp.fc2.weight"].shape[0])
    if cfg["family"] == "Hiera":
        widths = [sd[f"blocks.{i}.mlp.fc2.weight"].shape[0] for i in range(depth)]
        fusion = sum(1 for k in sd if re.fullmatch(r"multi_scale_fusion_heads\.\d+\.weight", k))
        cfg.update(img_size=math.isqrt(sd["pos_embed"].shape[1]) * PATCH_STRIDE,
                   stages=[sum(1 for x in widths if x == widths[0] * 2 ** s) for s in range(4)],
                   num_heads=saved.get("num_heads") or HIERA_HEADS_BY_WIDTH.get(D, 1),
                   q_pool=fusion if "decoder_embed.weight" in sd else saved.get("q_pool", 3),
                   num_classes=sd["head.projection.weight"].shape[0] if "head.projection.weight" in sd else 0)
    else:
        grid = math.isqrt(sd["pos_embed"].shape[1] - 1) if "pos_embed" in sd else None
        if grid is not None and grid * grid != sd["pos_embed"].shape[1] - 1:
            raise CheckpointError(f"{name}: pos_embed has {sd['pos_embed'].shape[1]} rows: not a cls "
                                  f"row plus a square grid of patches")
        cfg.update(depth=depth, patch_size=p, img_size=grid * p if grid else None,
                   num_heads=saved.get("num_heads") or HEADS_BY_WIDTH.get(D, max(1, D // 64)),
                   last_block_heads=saved.get("last_block_heads"),  # TinyMIM's adaptive block
                   global_pool="avg" if "fc_norm.weight" in sd and "norm.weight" not in sd else "token",
                   num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                   rel_pos_bias=any(k.endswith("relative_position_bias_table") for k in sd))
    if "decoder_embed.weight" in sd:
        Dd = sd["decoder_embed.weight"].shape[0]
        cfg.update(decoder_embed_dim=Dd, decoder_num_heads=saved.get("decoder_num_heads") or max(1, Dd // 32),
                   decoder_depth=len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")}))
        if cfg["family"] == "ViT":  # the block whose output the decoder reads: D²-MAE's 8, else the last
            cfg["decode_layer"] = saved.get("decode_layer") or (
                D2_DECODE_LAYER if D2_EXTRA_BLOCK + "qkv.weight" in sd else depth)
    return cfg


# ----------------------------------------------------------------------------
# Loading into a model


@dataclass
class LoadReport:
    loaded: list
    missing: list  # in the model, not in the file: left as initialised
    unexpected: list  # in the file, not used by the model
    notes: list  # interpolations and dropped heads


def group(keys):
    """Readable summary of many keys: collapse block indices and count."""
    counts = {}
    for k in keys:
        g = re.sub(r"\.\d+\.", ".*.", k, count=1)
        counts[g] = counts.get(g, 0) + 1
    return ", ".join(g if n == 1 else f"{g} (x{n})" for g, n in counts.items())


def load_pretrained(model, obj, name, allow_missing=None, verbose=True, check_heads=True):
    """Load a checkpoint read by `load` into `model` (a ViT, a Hiera or an MAE), checking every
    key: position embeddings of another grid are interpolated (bicubic), a head of another size
    is dropped, keys the model lacks (a decoder, a teacher) are reported unexpected; missing keys
    outside `allow_missing` (prefixes; default the model's `head_prefixes`), a depth or shape
    mismatch, another family, or a head split other than the one the file records (unless
    check_heads=False) is a one-line CheckpointError. Returns a LoadReport (printed if verbose)."""
    sd, own = read_state_dict(obj, name), model.state_dict()
    if family(sd) != family(own):
        raise CheckpointError(f"{name}: is a {family(sd)} checkpoint, the model is a {family(own)}")
    if allow_missing is None:
        allow_missing = getattr(model, "head_prefixes", ("head.", "fc_norm."))
    prefix = model.num_prefix_tokens  # rows of pos_embed before the grid: ViT's cls, none in Hiera
    loaded, notes = {}, []
    for k, v in sd.items():
        if k not in own:
            continue
        want = own[k].shape
        if k.endswith("relative_position_index"):  # BEiT's index: fixed by the grid, not learnt
            if v.shape == want and not torch.equal(v, own[k]):
                raise CheckpointError(f"{name}: {k} is not BEiT's relative-position index for this grid")
            continue  # the model's own is used
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{name}: {k} holds NaN or infinite values; the checkpoint is unusable")
        if k.endswith("pos_embed") and v.shape != want and v.shape[-1] == want[-1]:
            old, new = math.isqrt(v.shape[1] - prefix), math.isqrt(want[1] - prefix)
            try:
                v = interpolate_pos_embed(v, new, num_prefix_tokens=prefix)
            except ValueError as e:
                raise CheckpointError(f"{name}: {k}: {e}") from None
            notes.append(f"{k} interpolated from a {old}x{old} to a {new}x{new} grid")
        if v.shape != want:
            if k.startswith("head."):
                notes.append(f"{k} {tuple(v.shape)} dropped: the model's head is {tuple(want)}")
                continue
            hint = " (patch size or width differ)" if k == "patch_embed.proj.weight" else (
                " (a relative position bias for another patch grid: tables are not interpolated, "
                "use the input size the checkpoint was trained at)" if "relative_position" in k else "")
            raise CheckpointError(f"{name}: {k} has shape {tuple(v.shape)}, the model expects {tuple(want)}{hint}")
        loaded[k] = v
    unexpected = [k for k in sd if k not in own]
    if any(k.endswith("relative_position_bias_table") for k in unexpected) and \
            not any(k.endswith("relative_position_bias_table") for k in own):
        raise CheckpointError(f"{name}: has relative position bias tables (trained with --rel_pos_bias); "
                              f"this model has none and would compute other attention (add --rel_pos_bias)")
    depth = sum(1 for k in own if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k))
    if any(k.startswith(D2_EXTRA_BLOCK) for k in unexpected):
        notes.append(f"{D2_EXTRA_BLOCK}* is D²-MAE's attention-only block {depth + 1}, used only in "
                     f"pre-training: not part of the {depth}-block backbone, not used")
    extra_blocks = sorted({int(m.group(1)) for k in unexpected if (m := re.match(r"blocks\.(\d+)\.", k))})
    if extra_blocks:
        raise CheckpointError(f"{name}: has blocks up to blocks.{extra_blocks[-1]}, the model has "
                              f"{depth} blocks (depth mismatch)")
    # Head count is invisible in the shapes (qkv is [3D, D] for any count): check it where the
    # file records it (this project's checkpoints do).
    saved, mine = recorded(obj) if check_heads else {}, getattr(model, "config", {})
    if saved and "num_heads" in saved and saved["num_heads"] != mine.get("num_heads"):
        raise CheckpointError(f"{name}: was trained with {saved['num_heads']} heads, the model has "
                              f"{mine.get('num_heads')} (pass --num_heads {saved['num_heads']})")
    if saved and "last_block_heads" in saved and saved["last_block_heads"] != mine.get("last_block_heads"):
        raise CheckpointError(f"{name}: its last block has {saved['last_block_heads'] or 'the usual'} heads "
                              f"(TinyMIM's adaptive block), the model's has {mine.get('last_block_heads') or 'the usual'}")
    missing = [k for k in own if k not in loaded and not k.endswith("relative_position_index")]
    fatal = [k for k in missing if not k.startswith(tuple(allow_missing))]
    if fatal:
        raise CheckpointError(f"{name}: missing {len(fatal)} keys the model needs, first {fatal[0]!r} ({group(fatal)})")
    model.load_state_dict(loaded, strict=False)  # every key was checked above
    report = LoadReport(list(loaded), missing, unexpected, notes)
    if verbose:
        print0(f"loaded {len(loaded)} tensors from {name}")
        for line in notes + [f"unexpected (not used by this model): {group(unexpected)}"] * bool(unexpected) + \
                [f"missing (left as initialised): {group(missing)}"] * bool(missing):
            print0(f"  {line}")
    return report


def build_encoder(obj, name, img_size, heads=None, preset=None, hiera_q_pool=2, check_heads=True):
    """The frozen encoder of a checkpoint read by `load`, with the architecture of its weights
    (infer_config) at `img_size`, loaded with every key checked. -> (model in eval mode, cfg).

    ViT: no head; pooling norm, adaptive last block and relative position tables as recorded.
    Hiera: no norm, no head, q_pool as trained (else `hiera_q_pool`). heads: instead of the
    recorded or usual count (a Hiera's first stage); preset: a vit.py preset the weights must
    match. cfg['last_output_untrained']: a relation student's last block (trained up to q/k/v)."""
    cfg = infer_config(obj, name)
    how = "recorded in the checkpoint" if not cfg["heads_inferred"] else "the width's usual count"
    if preset:
        mismatch = next((k for k in ("embed_dim", "depth", "patch_size") if k in VIT_PRESETS[preset] and
                         cfg["family"] == "ViT" and VIT_PRESETS[preset][k] != cfg[k]), None)
        if cfg["family"] != "ViT" or mismatch:
            raise CheckpointError(f"{name}: " + (f"{mismatch} is {cfg[mismatch]} in the weights, {preset} has "
                                  f"{VIT_PRESETS[preset][mismatch]}" if mismatch else f"a Hiera, not the ViT {preset}"))
        if cfg["heads_inferred"]:
            cfg["num_heads"], how = VIT_PRESETS[preset]["num_heads"], preset
    if heads and not cfg["heads_inferred"] and heads != cfg["num_heads"]:
        raise CheckpointError(f"{name}: the file records {cfg['num_heads']} heads, the head count given is {heads}: "
                              f"its attention would be split otherwise (leave the head count out)")
    if heads:
        cfg["num_heads"], how = heads, "given"
    if cfg["family"] == "Hiera":
        q_pool = cfg["q_pool"] if "decoder_embed_dim" in cfg or "q_pool" in recorded(obj) else hiera_q_pool
        model = Hiera(img_size=img_size, in_chans=cfg["in_chans"], embed_dim=cfg["embed_dim"], num_heads=cfg["num_heads"],
                      stages=cfg["stages"], q_pool=q_pool, num_classes=0, mlp_ratio=cfg["mlp_ratio"])
        model.norm = torch.nn.Identity()  # what a classifier's file has there is reported as unexpected
        cfg["q_pool"] = q_pool
        print0(f"{name}: Hiera {cfg['embed_dim']} wide, stages {cfg['stages']}, {cfg['num_heads']} heads in "
               f"stage 1 ({how}) and {model.blocks[-1].attn.num_heads} in the last block, q_pool {q_pool}")
    else:
        model = VisionTransformer(img_size=img_size, patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
                                  num_classes=0, embed_dim=cfg["embed_dim"], depth=cfg["depth"],
                                  num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], global_pool=cfg["global_pool"],
                                  last_block_heads=None if heads else cfg["last_block_heads"],
                                  rel_pos_bias=cfg["rel_pos_bias"])
        last = model.config["last_block_heads"]
        print0(f"{name}: ViT {cfg['embed_dim']} wide, {cfg['depth']} blocks, patch {cfg['patch_size']}, "
               f"{cfg['num_heads']} heads ({how}{'; pass --num_heads if it differs' * cfg['heads_inferred']})"
               + (f", last block {last} heads" if last else "") + f", trained at {cfg['img_size']} px")
    load_pretrained(model, obj, name, allow_missing=(), check_heads=check_heads and not heads)
    cfg["last_output_untrained"] = recorded(obj, "args").get("method") == "relation"
    return model.eval(), cfg


# ----------------------------------------------------------------------------
# Hugging Face transformers: ViTModel, ViTForImageClassification, ViTMAEModel, ViTMAEForPreTraining

# One table, read both ways by `hf_rename`: our name, transformers 4.x's, 5.x's (its
# save_pretrained writes 4.x's names, which both generations load: `to_hf` writes those).
# '{}' is a block index; '.weight' / '.bias' follow. HF's q, k, v are three Linears; ours are
# one attn.qkv with rows [q; k; v], each head-major as HF's view(heads, head_dim) reads them.
_HF_BLOCK = (("norm1", "layernorm_before", "layernorm_before"),
             ("attn.q", "attention.attention.query", "attention.q_proj"),
             ("attn.k", "attention.attention.key", "attention.k_proj"),
             ("attn.v", "attention.attention.value", "attention.v_proj"),
             ("attn.proj", "attention.output.dense", "attention.o_proj"),
             ("norm2", "layernorm_after", "layernorm_after"),
             ("mlp.fc1", "intermediate.dense", "mlp.fc1"),
             ("mlp.fc2", "output.dense", "mlp.fc2"))
_HF_TOP = (("cls_token", "vit.embeddings.cls_token"),
           ("pos_embed", "vit.embeddings.position_embeddings"),  # ViTMAE's sin-cos is stored too
           ("patch_embed.proj", "vit.embeddings.patch_embeddings.projection"),
           ("norm", "vit.layernorm"), ("head", "classifier"),
           ("decoder_embed", "decoder.decoder_embed"), ("mask_token", "decoder.mask_token"),
           ("decoder_pos_embed", "decoder.decoder_pos_embed"),
           ("decoder_norm", "decoder.decoder_norm"), ("decoder_pred", "decoder.decoder_pred"))
HF_NAMES = [(ours, hf, hf) for ours, hf in _HF_TOP] + [
    (f"{ours}.{{}}.{a}", f"{hf4}.{{}}.{b}", f"{hf5}.{{}}.{c}")
    for ours, hf4, hf5 in (("blocks", "vit.encoder.layer", "vit.layers"),
                           ("decoder_blocks", "decoder.decoder_layers", "decoder.decoder_layers"))
    for a, b, c in _HF_BLOCK]
HF_PATCH = "embeddings.patch_embeddings.projection.weight"  # marks a transformers ViT-like model
# config.json fields: ours <- theirs. The head counts are the ones the weights cannot show.
HF_CONFIG = (("embed_dim", "hidden_size"), ("depth", "num_hidden_layers"),
             ("num_heads", "num_attention_heads"), ("patch_size", "patch_size"),
             ("img_size", "image_size"), ("in_chans", "num_channels"),
             ("decoder_embed_dim", "decoder_hidden_size"), ("decoder_depth", "decoder_num_hidden_layers"),
             ("decoder_num_heads", "decoder_num_attention_heads"),
             ("norm_pix_loss", "norm_pix_loss"), ("mask_ratio", "mask_ratio"))
KINDS = {"mae": ("vit_mae", "ViTMAEForPreTraining"), "classifier": ("vit", "ViTForImageClassification"),
         "encoder": ("vit", "ViTModel")}


def hf_rename(key, to_hf=False):
    """One key through HF_NAMES: a transformers name (either generation) -> ours, or with
    to_hf ours -> transformers 4.x's. None when no row matches."""
    for ours, hf4, hf5 in HF_NAMES:
        for src, dst in ([(ours, hf4)] if to_hf else [(hf4, ours), (hf5, ours)]):
            pattern = re.escape(src).replace(r"\{\}", r"(?P<i>\d+)") + r"(?P<end>\.weight|\.bias)?"
            if m := re.fullmatch(pattern, key):
                return dst.replace("{}", m.groupdict().get("i") or "") + (m["end"] or "")
    return None


def from_hf(sd, name):
    """A transformers ViT / ViTMAE state_dict in either generation's names -> ours, q, k, v
    fused. Keys no row maps (ViTModel's tanh pooler) keep their names (reported unexpected);
    an unknown key inside a block means another model type and is refused."""
    prefix = next(k[:-len(HF_PATCH)] for k in sd if k.endswith(HF_PATCH))
    if prefix not in ("", "vit."):  # deit., swin., beit., ...
        raise CheckpointError(f"{name}: a Hugging Face '{prefix.rstrip('.')}' model; only ViT and "
                              f"ViTMAE (keys under vit. or bare) are read")
    out = {}
    for k, v in sd.items():
        k = ("vit." + k if not prefix else k).replace(  # ViT(MAE)Model saved alone: no 'vit.'
            "decoder.decoder_encoder.layer.", "decoder.decoder_layers.")  # 5.x writes this
        ours = hf_rename(k)
        if ours is None and re.match(r"(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers)\.\d+\.", k):
            raise CheckpointError(f"{name}: {k} is not part of a ViT block (another Hugging Face model type?)")
        out[ours or k] = v
    for key in [k for k in out if k.endswith(".attn.q.weight")]:
        base = key[:-len("q.weight")]  # blocks.3.attn.
        for end in (".weight", ".bias"):
            parts = [out.pop(f"{base}{c}{end}", None) for c in "qkv"]
            if end == ".bias" and all(p is None for p in parts):  # config qkv_bias=False
                parts = [torch.zeros_like(out[base + "qkv.weight"][:, 0])]  # the same as no bias
            elif any(p is None for p in parts):
                raise CheckpointError(f"{name}: {base}q/k/v{end}: one of the three is missing")
            out[f"{base}qkv{end}"] = torch.cat(parts)
    return out


def read_hf_dir(path):
    """A transformers save_pretrained directory (config.json + model.safetensors or
    pytorch_model.bin) of a ViT or ViTMAE -> {'model': state_dict in our names,
    'model_config': what config.json records, in our names}; a width, depth, patch or image
    size that disagrees with the weights is refused."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: a directory without config.json; give a checkpoint file "
                              f"or a Hugging Face save_pretrained directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if hf.get("model_type") not in ("vit", "vit_mae"):
        raise CheckpointError(f"{cfg_file}: model_type {hf.get('model_type')!r}; only Hugging Face "
                              f"ViT ('vit') and ViTMAE ('vit_mae') are read")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{cfg_file}: hidden_act {hf['hidden_act']!r}; the ViT here uses exact GELU ('gelu')")
    weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path}: has config.json but no model.safetensors or pytorch_model.bin")
    sd = read_state_dict(load(weights), name=str(weights))
    arch = infer_config({"model": sd}, name=str(weights))
    config = {}
    for ours, theirs in HF_CONFIG:
        if theirs in hf:
            value = hf[theirs]
            value = value[0] if isinstance(value, list) and len(set(value)) == 1 else value  # [224, 224]
            if ours in arch and "num_heads" not in ours and arch[ours] != value:
                raise CheckpointError(f"{cfg_file}: {theirs} is {value}, the weights in {weights.name} have {arch[ours]}")
            config[ours] = value
    return {"model": sd, "model_config": config}


def to_hf(sd):
    """Our state_dict -> transformers names (4.x spelling), attn.qkv cut into q, k, v.
    Returns (hf_state_dict, keys that have no transformers name)."""
    out, left = {}, []
    for k, v in sd.items():
        if m := re.fullmatch(r"(.*blocks\.\d+\.attn\.)qkv\.(weight|bias)", k):
            for c, part in zip("qkv", v.chunk(3)):  # rows [q; k; v], as from_hf fuses them
                out[hf_rename(f"{m[1]}{c}.{m[2]}", to_hf=True)] = part.clone()
        elif name := hf_rename(k, to_hf=True):
            out[name] = v.contiguous()
        else:
            left.append(k)
    return out, left


def hf_config(kind, arch, num_classes=0):
    """config.json for `kind` from our architecture dict (HF_CONFIG gives the names)."""
    model_type, cls = KINDS[kind]
    cfg = {"architectures": [cls], "model_type": model_type, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
           "intermediate_size": round(arch["mlp_ratio"] * arch["embed_dim"]), "qkv_bias": True,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02}
    cfg.update({theirs: arch[ours] for ours, theirs in HF_CONFIG if ours in arch})
    if kind == "mae":
        cfg["decoder_intermediate_size"] = round(arch["mlp_ratio"] * arch["decoder_embed_dim"])
    if kind == "classifier":  # transformers counts the classes from id2label
        labels = arch.get("class_names") or [f"LABEL_{i}" for i in range(num_classes)]
        cfg["id2label"] = {str(i): c for i, c in enumerate(labels)}
        cfg["label2id"] = {c: i for i, c in enumerate(labels)}
    return dict(sorted(cfg.items()))


def export(path, out_dir, kind="auto", num_heads=None, norm_pix_loss=None, mask_ratio=None):
    """Write checkpoint `path` as a transformers directory -> (kind, the written config dict).
    One-line errors where transformers' class would compute something else (module docstring),
    for non-finite weights, and for an output folder that is a file or already holds files."""
    obj = load(path)
    sd = read_state_dict(obj, name=str(path))
    arch = infer_config(obj, name=str(path))
    record, run = recorded(obj), recorded(obj, "args")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: {'is a file' if not out.is_dir() else 'already holds files'}; "
                              f"give a new or empty output folder")
    if mask_ratio is not None and not (math.isfinite(mask_ratio) and 0 <= mask_ratio < 1):
        raise CheckpointError(f"--mask_ratio must lie in [0, 1), got {mask_ratio}")
    if arch["family"] != "ViT":
        raise CheckpointError(f"{path}: a Hiera; transformers' ViT / ViTMAE cannot hold it")
    bad = first_non_finite(sd.items())
    if bad:
        raise CheckpointError(f"{path}: {bad} holds NaN or infinite values; not exported")
    if kind == "auto":
        kind = "mae" if "decoder_embed_dim" in arch else "classifier" if "head.weight" in sd else "encoder"
    if num_heads and not arch["heads_inferred"] and num_heads != arch["num_heads"]:
        raise CheckpointError(f"{path}: was trained with {arch['num_heads']} heads; --num_heads {num_heads} "
                              f"would split its attention otherwise (leave --num_heads out)")
    if num_heads:
        arch["num_heads"] = num_heads
    elif arch["heads_inferred"]:
        print0(f"{path}: the head count is not recorded; using {arch['num_heads']} (the width's usual "
               f"count); pass --num_heads if it was trained with another")
    refusals = [
        (arch["embed_dim"] % arch["num_heads"], f"--num_heads {arch['num_heads']} does not divide the width {arch['embed_dim']}"),
        (arch["last_block_heads"] not in (None, arch["num_heads"]),
         f"its last block has {arch['last_block_heads']} heads, the others {arch['num_heads']} (TinyMIM's "
         f"adaptive block); a transformers config has one head count for all blocks"),
        (arch["global_pool"] == "avg", "a mean-pooled model (fc_norm, no final norm); transformers' ViT classifies "
         "the cls token after the final layernorm (fine-tune with --cls_token to export a classifier)"),
        (arch["rel_pos_bias"], "has relative position bias tables (--rel_pos_bias); transformers' ViT has none"),
        (kind == "mae" and arch.get("decode_layer", arch["depth"]) != arch["depth"],
         f"its decoder reads block {arch.get('decode_layer')} of {arch['depth']} (D²-MAE); ViTMAEForPreTraining "
         f"decodes the last block's output: export the encoder with --kind encoder"),
        ("head.1.weight" in sd, "a linear-probe head (BatchNorm1d + Linear) has no counterpart in ViTForImageClassification"),
        (kind == "mae" and "decoder_embed_dim" not in arch, "--kind mae, but the checkpoint has no MAE decoder"),
        (kind == "classifier" and "head.weight" not in sd, "--kind classifier, but the checkpoint has no head")]
    why = next((w for refused, w in refusals if refused), None)
    if why:
        raise CheckpointError(f"{path}: {why}")
    if kind == "mae":
        if norm_pix_loss is None:
            norm_pix_loss = next((r["norm_pix_loss"] for r in (record, run) if isinstance(r.get("norm_pix_loss"), bool)), None)
        if norm_pix_loss is None:
            raise CheckpointError(f"{path}: norm_pix_loss is not recorded; pass --norm_pix_loss or --no-norm_pix_loss")
        arch.update(norm_pix_loss=norm_pix_loss, mask_ratio=next(
            (r for r in (mask_ratio, record.get("mask_ratio"), run.get("mask_ratio")) if r is not None), 0.75))
    else:  # only an MAE has these fields in transformers' config
        arch = {k: v for k, v in arch.items() if not k.startswith("decoder_")}
    arch["class_names"] = obj.get("class_names") if isinstance(obj, dict) else None
    keep = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.") + \
        (("decoder_", "mask_token") if kind == "mae" else ()) + (("head.",) if kind == "classifier" else ())
    tensors, left = to_hf({k: v for k, v in sd.items() if k.startswith(keep)})
    skipped = sorted({k.split(".")[0] for k in sd if not k.startswith(keep)} | set(left))
    config = hf_config(kind, arch, num_classes=arch["num_classes"])

    # Written into a temp folder beside `out`, renamed when complete: a failed export (a full
    # disk) leaves no config.json without weights. The files get the umask's permissions.
    umask = os.umask(0)
    os.umask(umask)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        try:
            from safetensors.torch import save_file  # installed with timm and transformers
            weights = "model.safetensors"
            save_file(tensors, str(tmp / weights), metadata={"format": "pt"})  # transformers checks 'format'
        except ImportError:
            weights = "pytorch_model.bin"
            torch.save(tensors, tmp / weights)
        os.chmod(tmp / weights, 0o666 & ~umask)  # safetensors writes 0600
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write {out} ({disk_error(e, out.parent)}); nothing was exported") from None
    weights = out / weights
    print0(f"wrote {KINDS[kind][1]}: {len(tensors)} tensors to {weights}, config.json "
           f"({config['hidden_size']} wide, {config['num_hidden_layers']} blocks, "
           f"{config['num_attention_heads']} heads, patch {config['patch_size']}, {config['image_size']} px)")
    if skipped:
        print0(f"  not exported: {', '.join(skipped)}")
    return kind, config


def get_args_parser():
    p = argparse.ArgumentParser("Export a checkpoint to Hugging Face transformers",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="any checkpoint load_pretrained reads")
    p.add_argument("output_dir", help="a new or empty folder: config.json + model.safetensors")
    p.add_argument("--kind", default="auto", choices=("auto", *KINDS),
                   help="auto: mae when there is a decoder, classifier when there is a head, else encoder")
    p.add_argument("--num_heads", type=int, default=None, help="when the checkpoint does not record its head count")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                   help="an MAE's target, when the checkpoint does not record it")
    p.add_argument("--mask_ratio", type=float, default=None,
                   help="an MAE's mask ratio in config.json (default: the run's, else 0.75)")
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        if args.num_heads is not None and args.num_heads < 1:
            raise CheckpointError(f"--num_heads must be at least 1, got {args.num_heads}")
        export(args.checkpoint, args.output_dir, args.kind, args.num_heads, args.norm_pix_loss, args.mask_ratio)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
