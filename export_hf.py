"""Hugging Face transformers ViT / ViTMAE checkpoints, both directions.

Reading (from_hf, read_hf_dir; util.load_pretrained calls them, so every stage takes a
transformers checkpoint or save_pretrained directory wherever it takes a checkpoint) and
writing (export, this file's command): one name table, HF_NAMES, serves both.

Writing, the other direction of util.load_pretrained: a colleague who uses transformers gets your
MAE, your distilled student or your fine-tuned classifier as a save_pretrained directory,

    python export_hf.py runs/dmae_tiny/checkpoint.pth hf/dmae_tiny

    from transformers import ViTMAEForPreTraining
    model = ViTMAEForPreTraining.from_pretrained("hf/dmae_tiny")   # no missing or unused weights

It writes config.json (width, depth, heads, patch and image size; for an MAE also the
decoder, norm_pix_loss and mask_ratio) and model.safetensors (pytorch_model.bin when
safetensors is not installed). transformers itself is not needed to run this.

What the checkpoint holds picks the class (--kind overrides):
    decoder (mae_pretrain.py, an attn / amd student)  -> ViTMAEForPreTraining   --kind mae
    a head (finetune.py with --cls_token)               -> ViTForImageClassification  --kind classifier
    neither (a relation / feature student, an encoder)  -> ViTModel   --kind encoder
ViTModel adds a tanh pooler that no MAE or timm ViT has: load it with
ViTModel.from_pretrained(out, add_pooling_layer=False).

Names come from HF_NAMES, the table the loader reads, written in transformers 4.x's
spelling (what 5.x's save_pretrained writes too; both generations load it); attn.qkv is
cut into query, key and value. config.json says layer_norm_eps 1e-6 (this ViT's, and
MAE's and timm's; transformers defaults to 1e-12) and hidden_act gelu (exact), so
transformers computes what this code computes.

Refused with one line, because transformers' classes would compute something else:
- a mean-pooled classifier (fc_norm, finetune.py's default): ViTForImageClassification
  classifies the cls token after the final layernorm;
- a linear-probe head (BatchNorm1d + Linear);
- a TinyMIM relation student whose last block has another head count: a transformers
  config has one head count for all blocks;
- a model with relative position bias tables (finetune.py --rel_pos_bias): transformers'
  ViT has no such bias;
- a D²-MAE student (distill_pretrain.py --method d2) as an MAE: its decoder reads block 8,
  ViTMAEForPreTraining decodes the last block (its encoder exports with --kind encoder).
"""
import argparse
import json
import re
from pathlib import Path

import torch

import util
from util import print0

KINDS = {"mae": ("vit_mae", "ViTMAEForPreTraining"),
         "classifier": ("vit", "ViTForImageClassification"),
         "encoder": ("vit", "ViTModel")}
ENCODER = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")  # what every kind exports
DECODER = ("decoder_", "mask_token")


# ----------------------------------------------------------------------------
# Reading: util.read_state_dict and util.load_checkpoint call from_hf and read_hf_dir

# Hugging Face transformers: ViTModel, ViTForImageClassification, ViTMAEModel and
# ViTMAEForPreTraining. One table, read both ways by `hf_rename`: our name, transformers
# 4.x's, 5.x's (its modules; its save_pretrained writes 4.x's names, which both
# generations load, so `to_hf` writes those). '{}' is a block index; a row names a
# module, '.weight' / '.bias' follow. HF's q, k, v are three Linears; ours are one
# attn.qkv with rows [q; k; v], each head-major as HF's view(heads, head_dim) reads them.
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
             ("decoder_embed_dim", "decoder_hidden_size"),
             ("decoder_depth", "decoder_num_hidden_layers"),
             ("decoder_num_heads", "decoder_num_attention_heads"),
             ("norm_pix_loss", "norm_pix_loss"), ("mask_ratio", "mask_ratio"))


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
    """A transformers ViT / ViTMAE state_dict in either generation's names -> ours, with
    q, k, v fused. Keys no row maps (ViTModel's tanh pooler) keep their names, so
    `load_pretrained` reports them as unexpected; an unknown key inside a block means
    another model type and is refused."""
    prefix = next(k[:-len(HF_PATCH)] for k in sd if k.endswith(HF_PATCH))
    if prefix not in ("", "vit."):  # deit., swin., beit., ...
        raise util.CheckpointError(f"{name}: a Hugging Face '{prefix.rstrip('.')}' model; only ViT and "
                                   f"ViTMAE (keys under vit. or bare) are read")
    out = {}
    for k, v in sd.items():
        k = ("vit." + k if not prefix else k).replace(  # ViT(MAE)Model saved alone: no 'vit.'
            "decoder.decoder_encoder.layer.", "decoder.decoder_layers.")  # 5.x writes this
        ours = hf_rename(k)
        in_block = re.match(r"(vit\.encoder\.layer|vit\.layers|decoder\.decoder_layers)\.\d+\.", k)
        if ours is None and in_block:
            raise util.CheckpointError(f"{name}: {k} is not part of a ViT block (another Hugging Face "
                                       f"model type?)")
        out[ours or k] = v
    for key in [k for k in out if k.endswith(".attn.q.weight")]:
        base = key[:-len("q.weight")]  # blocks.3.attn.
        for end in (".weight", ".bias"):
            parts = [out.pop(f"{base}{c}{end}", None) for c in "qkv"]
            if end == ".bias" and all(p is None for p in parts):  # config qkv_bias=False
                parts = [torch.zeros_like(out[base + "qkv.weight"][:, 0])]  # the same as no bias
            elif any(p is None for p in parts):
                raise util.CheckpointError(f"{name}: {base}q/k/v{end}: one of the three is missing")
            out[f"{base}qkv{end}"] = torch.cat(parts)
    return out


def read_hf_dir(path):
    """A transformers save_pretrained directory (config.json + model.safetensors or
    pytorch_model.bin) of a ViT or ViTMAE -> {'model': state_dict in our names,
    'model_config': what config.json records, in our names}. The head counts then come
    from config.json; a width, depth, patch or image size that disagrees with the
    weights is refused."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise util.CheckpointError(f"{path}: a directory without config.json; give a checkpoint file "
                                   f"or a Hugging Face save_pretrained directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise util.CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if hf.get("model_type") not in ("vit", "vit_mae"):
        raise util.CheckpointError(f"{cfg_file}: model_type {hf.get('model_type')!r}; only Hugging Face "
                                   f"ViT ('vit') and ViTMAE ('vit_mae') are read")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise util.CheckpointError(f"{cfg_file}: hidden_act {hf['hidden_act']!r}; the ViT here uses "
                                   f"exact GELU ('gelu')")
    weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin")
                    if (path / f).is_file()), None)
    if weights is None:
        raise util.CheckpointError(f"{path}: has config.json but no model.safetensors or "
                                   f"pytorch_model.bin")
    sd = util.read_state_dict(util.load_checkpoint(weights), name=str(weights))
    arch = util.infer_vit_config({"model": sd}, name=str(weights))
    config = {}
    for ours, theirs in HF_CONFIG:
        if theirs not in hf:
            continue
        value = hf[theirs]
        value = value[0] if isinstance(value, list) and len(set(value)) == 1 else value  # [224, 224]
        if ours in arch and "num_heads" not in ours and arch[ours] != value:
            raise util.CheckpointError(f"{cfg_file}: {theirs} is {value}, the weights in {weights.name} "
                                       f"have {arch[ours]}")
        config[ours] = value
    return {"model": sd, "model_config": config}


# ----------------------------------------------------------------------------
# Writing

def get_args_parser():
    p = argparse.ArgumentParser("Export to Hugging Face transformers",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="any checkpoint util.load_pretrained reads")
    p.add_argument("output_dir", help="written: config.json + model.safetensors")
    p.add_argument("--kind", default="auto", choices=("auto", *KINDS),
                   help="auto: mae when there is a decoder, classifier when there is a head, "
                   "else encoder")
    p.add_argument("--num_heads", type=int, default=None,
                   help="when the checkpoint does not record its head count")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=None,
                   help="an MAE's target, when the checkpoint does not record it")
    p.add_argument("--mask_ratio", type=float, default=None,
                   help="an MAE's mask ratio in config.json (default: the run's, else 0.75)")
    return p


# ----------------------------------------------------------------------------
# Names and config


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
    cfg = {"architectures": [cls], "model_type": model_type,
           "intermediate_size": round(arch["mlp_ratio"] * arch["embed_dim"]),
           "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "initializer_range": 0.02}
    cfg.update({theirs: arch[ours] for ours, theirs in HF_CONFIG if ours in arch})
    if kind == "mae":
        cfg["decoder_intermediate_size"] = round(arch["mlp_ratio"] * arch["decoder_embed_dim"])
    if kind == "classifier":  # transformers counts the classes from id2label
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_classes)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(num_classes)}
    return dict(sorted(cfg.items()))


# ----------------------------------------------------------------------------
# Export


def export(path, out_dir, kind="auto", num_heads=None, norm_pix_loss=None, mask_ratio=None):
    """Write checkpoint `path` (any layout util reads) as a transformers directory.
    Returns (kind, the written config dict). CheckpointError when transformers' class
    would compute something else (see the module docstring)."""
    obj = util.load_checkpoint(path)
    sd = util.read_state_dict(obj, name=str(path))
    arch = util.infer_vit_config(obj, name=str(path))
    record = (obj.get("model_config") if isinstance(obj, dict) else None) or {}
    run = obj.get("args") if isinstance(obj, dict) else None
    run = vars(run) if isinstance(run, argparse.Namespace) else run or {}  # MAE's own checkpoints
    if kind == "auto":
        kind = ("mae" if "decoder_embed_dim" in arch else
                "classifier" if "head.weight" in sd else "encoder")
    if num_heads:
        arch["num_heads"] = num_heads
    elif arch["heads_inferred"]:
        print0(f"{path}: the head count is not recorded; using {arch['num_heads']} (the width's "
               f"usual count); pass --num_heads if it was trained with another")
    if arch["embed_dim"] % arch["num_heads"]:
        raise util.ConfigError(f"--num_heads {arch['num_heads']} does not divide the width "
                               f"{arch['embed_dim']}")
    if arch["last_block_heads"] not in (None, arch["num_heads"]):
        raise util.CheckpointError(
            f"{path}: its last block has {arch['last_block_heads']} heads, the others "
            f"{arch['num_heads']} (TinyMIM's adaptive block); a transformers config has one head "
            f"count for all blocks")
    if arch["global_pool"] == "avg":
        raise util.CheckpointError(
            f"{path}: a mean-pooled model (fc_norm, no final norm); transformers' ViT classifies "
            f"the cls token after the final layernorm and would compute other logits "
            f"(fine-tune with --cls_token to export a classifier)")
    if any(k.endswith("relative_position_bias_table") for k in sd):
        raise util.CheckpointError(f"{path}: has relative position bias tables (--rel_pos_bias); "
                                   f"transformers' ViT has no relative position bias")
    if kind == "mae" and arch.get("decode_layer", arch["depth"]) != arch["depth"]:
        raise util.CheckpointError(
            f"{path}: its decoder reads block {arch['decode_layer']} of {arch['depth']} (D²-MAE); "
            f"ViTMAEForPreTraining decodes the last block's output: export the encoder with --kind encoder")
    if "head.1.weight" in sd:
        raise util.CheckpointError(f"{path}: a linear-probe head (BatchNorm1d + Linear) has no "
                                   f"counterpart in ViTForImageClassification")
    if kind == "mae" and "decoder_embed_dim" not in arch:
        raise util.CheckpointError(f"{path}: --kind mae, but the checkpoint has no MAE decoder")
    if kind == "classifier" and "head.weight" not in sd:
        raise util.CheckpointError(f"{path}: --kind classifier, but the checkpoint has no head")

    if kind == "mae":
        if norm_pix_loss is None:
            norm_pix_loss = next((r["norm_pix_loss"] for r in (record, run)
                                  if isinstance(r.get("norm_pix_loss"), bool)), None)
        if norm_pix_loss is None:
            raise util.CheckpointError(f"{path}: norm_pix_loss is not recorded; pass "
                                       f"--norm_pix_loss or --no-norm_pix_loss")
        arch.update(norm_pix_loss=norm_pix_loss,
                    mask_ratio=next((r for r in (mask_ratio, record.get("mask_ratio"), run.get("mask_ratio"))
                                     if r is not None), 0.75))
    else:  # only an MAE has these fields in transformers' config
        arch = {k: v for k, v in arch.items() if not k.startswith("decoder_")}
    keep = ENCODER + (DECODER if kind == "mae" else ()) + (("head.",) if kind == "classifier" else ())
    tensors, left = to_hf({k: v for k, v in sd.items() if k.startswith(keep)})
    skipped = sorted({k.split(".")[0] for k in sd if not k.startswith(keep)} | set(left))
    config = hf_config(kind, arch, num_classes=arch["num_classes"])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    try:
        from safetensors.torch import save_file  # installed with timm and transformers
        weights = out / "model.safetensors"
        save_file(tensors, str(weights), metadata={"format": "pt"})  # transformers checks 'format'
    except ImportError:
        weights = out / "pytorch_model.bin"
        torch.save(tensors, weights)
    print0(f"wrote {KINDS[kind][1]}: {len(tensors)} tensors to {weights}, config.json "
           f"({config['hidden_size']} wide, {config['num_hidden_layers']} blocks, "
           f"{config['num_attention_heads']} heads, patch {config['patch_size']}, "
           f"{config['image_size']} px)")
    if skipped:
        print0(f"  not exported: {', '.join(skipped)}")
    return kind, config


def main(args):
    export(args.checkpoint, args.output_dir, args.kind, args.num_heads, args.norm_pix_loss,
           args.mask_ratio)


if __name__ == "__main__":
    util.run_main(main, get_args_parser())
