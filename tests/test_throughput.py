"""What keeps a GPU fed and busy, checked where a CPU can show it: uint8 batches, no host
syncs in a training step (run on the meta device, where any read of a device value fails),
no all-reduce on accumulation micro-batches under torch.compile, the cheap decode paths,
and the benchmark mode's FLOP count."""
import argparse
import json
from contextlib import nullcontext
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import data
import distill_pretrain as dp
import finetune
import util
from conftest import TINY_DATA, run_script, run_torchrun
from mae_pretrain import create_mae, mae_step
from vit import DropPath, VisionTransformer, create_vit

aten = torch.ops.aten
META = torch.device("meta")
STEP_ARGS = argparse.Namespace(accum_iter=1, clip_grad=1.0)


class HostSyncs(TorchDispatchMode):
    """Counts what would make the host wait for the GPU, with the meta device standing in
    for it: reading a device value (.item(), bool(), nonzero) and copying host memory to
    the device. (On meta a read raises anyway; it is counted first, for the message.)"""

    def __init__(self):
        super().__init__()
        self.reads, self.copies = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten._local_scalar_dense.default, aten.nonzero.default) and args[0].is_meta:
            self.reads += 1
        if func is aten._to_copy.default and not args[0].is_meta and kwargs.get("device") == META:
            self.copies.append(tuple(args[0].shape))
        if func is aten.copy_.default and args[0].is_meta and not args[1].is_meta:
            self.copies.append(tuple(args[1].shape))
        return func(*args, **kwargs)


def meta_batch(B=4, size=32, noise=16):
    return (torch.empty(B, 3, size, size, device=META), torch.zeros(B, dtype=torch.long, device=META),
            torch.empty(B, noise, device=META))


def run_step(model, step, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    with HostSyncs() as syncs:
        util.train_step(model, batch, opt, step, STEP_ARGS, nullcontext, None)
    return syncs


def test_an_mae_step_makes_no_host_sync():
    syncs = run_step(create_mae("mae_vit_tiny", img_size=32, patch_size=8).to(META),
                     partial(mae_step, mask_ratio=0.75, norm_pix=True), meta_batch())
    assert (syncs.reads, syncs.copies) == (0, [])


def test_an_attention_distillation_step_makes_no_host_sync():
    teacher = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                num_classes=0).to(META).eval().requires_grad_(False)
    student = create_mae("mae_vit_tiny", img_size=32, patch_size=8)
    model = dp.AttentionDistiller(student, teacher_heads=4, teacher_layer=2, mask_ratio=0.75).to(META)
    syncs = run_step(model, partial(dp.masked_step, teacher=teacher), meta_batch())
    assert (syncs.reads, syncs.copies) == (0, [])


def test_a_fine_tuning_step_with_mixing_and_erasing_makes_no_host_sync():
    model = create_vit("vit_tiny", img_size=32, patch_size=8, num_classes=8, global_pool="avg",
                       drop_path_rate=0.1).to(META)
    mixing = finetune.build_mixing(argparse.Namespace(mixup=0.8, cutmix=1.0), 8)
    step = partial(finetune.classify_step, mixing=mixing, smoothing=0.1, reprob=1.0)
    syncs = run_step(model, step, meta_batch(noise=0))
    assert (syncs.reads, syncs.copies) == (0, [])


def test_evaluation_copies_only_images_and_labels_to_the_device_per_batch():
    model = create_vit("vit_tiny", img_size=32, patch_size=8, num_classes=8).to(META)
    loader = [(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))] * 3
    syncs = HostSyncs()
    with syncs, pytest.raises(NotImplementedError):  # the one read, of the final sums, fails on meta
        finetune.evaluate(model, loader, META, num_classes=8)
    assert syncs.copies == [(2, 3, 32, 32), (2,)] * 3 and syncs.reads == 0


def test_drop_path_allocates_one_full_size_tensor():
    drop = DropPath(0.5).train()
    x = torch.randn(8, 5, 16)
    sizes = []

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and func is not aten.bernoulli_.float:
                sizes.append(out.numel())
            return out
    with Allocations():
        y = drop(x)
    assert sizes.count(x.numel()) == 1
    kept = y.flatten(1).abs().sum(1) > 0
    assert torch.allclose(y[kept], x[kept] * 2)  # survivors scaled by 1 / keep


def test_the_teachers_matmul_weights_cast_once_give_the_same_outputs_under_autocast():
    torch.manual_seed(0)
    teacher = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                num_classes=0).eval().requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    autocast = partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)

    def run():
        casts = []

        class Casts(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is aten._to_copy.default and isinstance(args[0], torch.nn.Parameter):
                    casts.append(args[0].shape)
                return func(*args, **(kwargs or {}))
        with torch.no_grad(), autocast(), Casts():
            return teacher.encode(teacher.embed(x), attn=(2,), attn_logits=True).attn[2], casts
    before, casts_before = run()
    dp.cast_for_autocast(teacher, autocast)
    after, casts_after = run()
    assert torch.equal(before, after)
    assert len(casts_before) >= 2 * 4 * 2 and casts_after == []  # every Linear's weight and bias, per forward
    assert teacher.blocks[0].norm1.weight.dtype == torch.float32  # LayerNorm stays fp32, as autocast runs it


def test_fp32_on_a_cuda_device_turns_on_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        util.amp_setup("fp32", torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32
        util.amp_setup("fp32", torch.device("cuda"))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_compiled_ddp_does_not_all_reduce_on_accumulation_micro_batches(tmp_path):
    """Two gloo processes, --accum_iter 2, 4 micro-batches: a communication hook counts the
    all-reduces. 2 optimizer steps must mean 2 all-reduces, compiled or not (before the fix,
    torch.compile(DDP(m)) hid DDP's no_sync and every micro-batch all-reduced: 4)."""
    script = tmp_path / "count.py"
    script.write_text(f'''
import argparse, json, sys
sys.path.insert(0, {str(util.Path(util.__file__).parent)!r})
from contextlib import nullcontext
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import util
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
calls = []
def hook(state, bucket):
    calls.append(1)
    fut = torch.futures.Future()
    t = bucket.buffer()
    dist.all_reduce(t)
    fut.set_result(t / dist.get_world_size())
    return fut
counts = {{}}
for compiled in (False, True):
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, hook)
    net = torch.compile(ddp, backend="aot_eager") if compiled else ddp
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(accum_iter=2, clip_grad=None)
    calls.clear()
    for i in range(4):
        util.train_step(net, (torch.randn(4, 8),), opt, lambda m, b: (m(b[0]).square().mean(), {{}}),
                        args, nullcontext, None, last_micro=(i + 1) % 2 == 0)
    counts["compiled" if compiled else "eager"] = len(calls)
if dist.get_rank() == 0:
    print("COUNTS", json.dumps(counts), flush=True)
util.finish(0)  # the stages' own shutdown (a plain destroy_process_group can abort at teardown)
''')
    proc = run_torchrun(2, script)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = json.loads(proc.stdout.split("COUNTS ")[1])
    assert counts == {"eager": 2, "compiled": 2}


def test_the_flop_count_of_a_vit_step_is_six_times_parameters_times_tokens():
    """Forward 2 N T + backward 4 N T for N parameters over T tokens. Within 5%: the closed
    form counts the position embedding and norms as matmul weights, the counter counts
    attention's two matmuls where it has a formula for the kernel (the fused CPU kernel has
    none; flash and memory-efficient attention on a GPU do)."""
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    flops = util.count_flops(lambda: model(x).sum().backward()) / 4
    N, T = sum(p.numel() for p in model.parameters()), 65
    assert flops == pytest.approx(6 * N * T, rel=0.05)


# -- the data path ---------------------------------------------------------------------------


def write_jpegs(root, n=6, sizes=((160, 120), (120, 160)), quality=92):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        coarse = Image.fromarray((rng.random((h // 16, w // 16, 3)) * 255).astype(np.uint8))  # 16-px features
        path = root / f"{i}.jpg"
        coarse.resize((w, h), Image.BICUBIC).save(path, quality=quality)
        paths.append(path)
    return paths


def test_a_jpeg_whose_crop_is_large_is_decoded_at_a_reduced_scale(tmp_path):
    path, = write_jpegs(tmp_path, n=1, sizes=((500, 375),))
    rgb, scale = data.decode_rgb(data.open_image(path), (100, 80))  # 1/4 still gives >= 100 x 80
    assert rgb.size == (125, 94) and scale == (4.0, 375 / 94)
    # libjpeg's reduced decode is its own low-pass filter: close to a bicubic downscale
    full = data.pil_to_uint8(data.decode_rgb(data.open_image(path))[0].resize((125, 94), Image.BICUBIC))
    assert (data.pil_to_uint8(rgb).float() - full.float()).abs().mean() < 3.5


def test_batches_leave_the_loader_as_uint8_and_are_normalised_on_the_device(tmp_path):
    args = finetune.get_args_parser().parse_args([*TINY_DATA, "--batch_size", "4"])
    ds, _ = data.build_dataset(args, train=True, transform=data.pretrain_transform(32))
    dinfo = util.DistInfo()
    device_loader = data.build_train_loader(ds, args, dinfo, noise=16)
    imgs, labels, noise = next(iter(device_loader.loader))  # what crosses to the device
    assert imgs.dtype == torch.uint8 and imgs.shape == (4, 3, 32, 32) and noise.shape == (4, 16)
    x, y, n = next(iter(device_loader))  # the same first batch, normalised on the device
    assert x.device == dinfo.device and torch.equal(y, labels) and torch.equal(n, noise)
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, (imgs.float() / 255 - mean) / std, atol=1e-5)


def test_the_benchmark_mode_writes_throughput_flops_mfu_and_memory(tmp_path):
    proc = run_script("mae_pretrain.py", *TINY_DATA, "--patch_size", "8", "--batch_size", "8",
                      "--benchmark", "2", "--benchmark_warmup", "1", "--peak_tflops", "1",
                      "--output_dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert report["mode"] == "train" and report["img_per_s"] > 0 and report["peak_mem_mb"] > 0
    # MAE-Tiny at 32 px, 16 patches of 8x8, 4 kept: about 6 x 5.5M x 5 tokens in the encoder
    assert 0.1 < report["gflops_per_image"] < 1.0
    assert report["mfu"] == pytest.approx(report["tflops_per_device"] / 1.0)
    assert not (tmp_path / "checkpoint.pth").exists()  # nothing was trained or saved
