"""Export a checkpoint from here as a Hugging Face transformers model directory.

The other direction of util.load_pretrained: a colleague who uses transformers gets your
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

Names come from util.HF_NAMES, the table the loader reads, written in transformers 4.x's
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
            for c, part in zip("qkv", v.chunk(3)):  # rows [q; k; v], as util.from_hf fuses them
                out[util.hf_rename(f"{m[1]}{c}.{m[2]}", to_hf=True)] = part.clone()
        elif name := util.hf_rename(k, to_hf=True):
            out[name] = v.contiguous()
        else:
            left.append(k)
    return out, left


def hf_config(kind, arch, num_classes=0):
    """config.json for `kind` from our architecture dict (util.HF_CONFIG gives the names)."""
    model_type, cls = KINDS[kind]
    cfg = {"architectures": [cls], "model_type": model_type,
           "intermediate_size": round(arch["mlp_ratio"] * arch["embed_dim"]),
           "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True,
           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "initializer_range": 0.02}
    cfg.update({theirs: arch[ours] for ours, theirs in util.HF_CONFIG if ours in arch})
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
                    mask_ratio=mask_ratio if mask_ratio is not None else run.get("mask_ratio", 0.75))
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
