"""The data pipeline: ImageFolder, CIFAR, MAE-Lite's downstream sets or built-in synthetic shapes.
Every training sample is augmented under an RNG seeded by (seed, epoch, index), and its mask
noise comes from the same seed: the same batches on any number of processes or workers, and an
exact resume. Workers decode, crop and flip and send uint8; the device normalises. A corrupt
image stops the run naming the file. Imports torch, torchvision and PIL only: copy it alone.
"""
import hashlib
import importlib.util
import math
import os
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Data that cannot be used as given: one line for the user."""


def print0(*args):  # print on rank 0 of a torchrun job only
    if os.environ.get("RANK", "0") == "0":
        print(*args, flush=True)


def stable_seed(*parts):
    """A 63-bit seed from a tuple of ints/strings, the same on every machine and run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SyntheticShapes(Dataset):
    """Built-in offline data: a coloured shape on a grey textured background, 8 classes.
    The class is the shape AND a band of hues: class c's shape has hue (c + u) / 8 with u
    uniform in [-0.6, 0.6], so neighbouring bands overlap and colour alone gets a model most
    of the way (a ViT-Tiny from scratch reaches ~70% in one epoch of 2048 images) while the
    shape settles the rest. Texture, position, size and a small rotation are random.
    Deterministic by (seed, split, index). Returns (PIL image, label) like torchvision."""

    classes = ("disk", "square", "triangle", "ring", "cross", "diamond", "bar", "x")

    def __init__(self, num_samples=2048, image_size=224, seed=0, split="train", transform=None):
        self.num_samples, self.size, self.seed, self.split = num_samples, image_size, seed, split
        self.transform = transform
        ax = torch.linspace(-1, 1, image_size)
        self.yy, self.xx = torch.meshgrid(ax, ax, indexing="ij")

    def __len__(self):
        return self.num_samples

    @staticmethod
    def level(label, u, v):
        """< 1 inside the shape, in the shape's own coordinates (u, v)."""
        au, av, r = u.abs(), v.abs(), (u * u + v * v).sqrt()
        d, e = (u + v).abs() / 1.414, (u - v).abs() / 1.414  # a cross turned by 45 degrees
        return (lambda: r,  # disk
                lambda: torch.maximum(au, av) / 0.8,  # square
                lambda: torch.maximum(2 * v, 1.732 * au - v),  # triangle
                lambda: (r - 0.72).abs() / 0.28,  # ring
                lambda: torch.minimum(torch.maximum(au / 0.3, av), torch.maximum(au, av / 0.3)),  # cross
                lambda: au + av,  # diamond
                lambda: torch.maximum(au, av / 0.35),  # bar
                lambda: torch.minimum(torch.maximum(d / 0.25, e), torch.maximum(d, e / 0.25)))[label]()  # x

    @staticmethod
    def hsv(h, s, v):
        """One colour from hue, saturation, value in [0, 1] -> (3, 1, 1) RGB."""
        k = (torch.tensor([5.0, 3.0, 1.0]) + h * 6) % 6
        return (v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)).view(3, 1, 1)

    def __getitem__(self, index):
        from PIL import Image
        g = torch.Generator().manual_seed(stable_seed(self.seed, self.split, index))
        rand = partial(torch.rand, generator=g)
        label = index % len(self.classes)
        x, y, S = self.xx, self.yy, self.size
        # Background: two greyish colours blended by an oriented grating and smooth blobs.
        theta, freq, phase = rand(3) * torch.tensor([math.pi, 6.0, 2 * math.pi])
        grating = 0.5 + 0.5 * torch.sin((2 + freq) * math.pi * (x * theta.cos() + y * theta.sin()) + phase)
        blobs = F.interpolate(rand(1, 1, 4, 4), size=(S, S), mode="bilinear", align_corners=False)[0, 0]
        t = 0.25 + 0.5 * (0.6 * grating + 0.4 * blobs)
        c1 = (0.25 + 0.5 * rand(1)) + 0.15 * (rand(3, 1, 1) - 0.5)
        c2 = (0.25 + 0.5 * rand(1)) + 0.15 * (rand(3, 1, 1) - 0.5)
        img = c1 * (1 - t) + c2 * t  # (3, S, S)
        # The shape: random centre, size and a rotation of +-20 degrees (a square never
        # turns into a diamond), a ~1 px soft edge, a hue from the class's band.
        cx, cy = (rand(2) - 0.5) * 0.7
        size = 0.4 + 0.3 * rand(1)
        ang = (rand(1) - 0.5) * (math.pi / 4.5)
        u = ((x - cx) * ang.cos() + (y - cy) * ang.sin()) / size
        v = (-(x - cx) * ang.sin() + (y - cy) * ang.cos()) / size
        alpha = ((1 - self.level(label, u, v)) * size * S / 4 + 0.5).clamp(0, 1)
        hue, sat, val = rand(3).tolist()
        fg = self.hsv((label + (hue - 0.5) * 1.2) / len(self.classes) % 1.0, 0.7 + 0.3 * sat, 0.75 + 0.25 * val)
        img = img * (1 - alpha) + fg * alpha + 0.03 * torch.randn(3, S, S, generator=g)
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        img = Image.fromarray(arr)
        return (self.transform(img) if self.transform else img), label


def build_dataset(args, train, transform=None):
    """The train or val split named by --dataset / --data_path -> (dataset, class names). 'auto':
    an ImageFolder root if --data_path is given (train/ and val/, one folder per class), else
    the built-in data; 'cifar10' / 'cifar100' / DOWNSTREAM: torchvision's, under --data_path
    (./data), fetched only with --download. A corrupt image stops the run naming the file (it is
    not skipped: every run must see the same images, and evaluation must count each one)."""
    from torchvision import datasets
    name = args.dataset
    if name == "auto":
        name = "imagefolder" if args.data_path else "synthetic"
    if name == "synthetic":
        if args.data_path:
            raise DataError(f"--dataset synthetic makes its own images: --data_path {args.data_path} "
                            f"would be ignored (leave one of the two out)")
        seed = args.seed if train else args.seed + 1
        n = args.synthetic_samples if train else max(args.synthetic_samples // 4, 8)
        ds = SyntheticShapes(n, args.input_size, seed, "train" if train else "val", transform)
        return ds, list(ds.classes)
    if name == "imagefolder":
        if not args.data_path:
            raise DataError("--dataset imagefolder needs --data_path")
        root = Path(args.data_path) / ("train" if train else "val")
        if not Path(args.data_path).is_dir():
            raise DataError(f"--data_path {args.data_path}: no such directory")
        if not root.is_dir():
            raise DataError(f"--data_path {args.data_path}: no {root.name}/ folder (expected the "
                            f"ImageNet layout: {root.name}/<class>/<image>)")
        try:
            ds = image_folder(str(root), transform, open_image)
        except (OSError, RuntimeError) as e:  # empty, no class folders, unreadable
            raise DataError(f"--data_path {root}: {e}") from None
        if ds.skipped_links:
            print0(f"--data_path {root}: skipped {len(ds.skipped_links)} symlinked folder(s) whose "
                   f"images were already listed (a link loop?), first {ds.skipped_links[0]}")
        if ds.not_images:
            print0(f"--data_path {root}: skipped {len(ds.not_images)} file(s) whose extension is not an "
                   f"image's, first {ds.not_images[0]}")
        return ds, ds.classes
    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        root = args.data_path or "./data"
        try:
            ds = cls(root, train=train, transform=transform, download=args.download)
        except RuntimeError as e:
            raise DataError(f"--dataset {name} under {root}: {e} (add --download to fetch it)") from None
        return ds, list(ds.classes)
    if name in DOWNSTREAM:
        cls_name, train_splits, test_split, needs_scipy = DOWNSTREAM[name]
        cls = getattr(datasets, cls_name)
        root = args.data_path or "./data"
        if needs_scipy and importlib.util.find_spec("scipy") is None:
            raise DataError(f"--dataset {name} needs scipy (torchvision reads its labels from "
                            f".mat files): python -m pip install scipy")
        hint = (" (add --download to fetch it)" if name != "cars" else
                f"; torchvision can no longer download Stanford Cars (its URL is gone): place it "
                f"under {root}/stanford_cars (devkit/, cars_train/, cars_test/, "
                f"cars_test_annos_withlabels.mat) and run without --download")
        try:
            parts = [cls(root, split=s, transform=transform, download=args.download)
                     for s in (train_splits if train else (test_split,))]
        except (RuntimeError, ValueError) as e:  # not found / StanfordCars' download refused
            detail = str(e).split(" You can use download=True")[0].rstrip(".")
            raise DataError(f"--dataset {name} under {root}: {detail}"
                            f"{hint if name == 'cars' or not args.download else ''}") from None
        ds = parts[0] if len(parts) == 1 else torch.utils.data.ConcatDataset(parts)
        return ds, list(parts[0].classes)
    raise DataError(f"unknown --dataset {name!r}; choose from auto, imagefolder, synthetic, "
                    f"cifar10, cifar100, {', '.join(DOWNSTREAM)}")


# Downstream sets (MAE-Lite's transfer study): torchvision class, the splits trained on, the split
# evaluated on, whether scipy reads the labels (.mat). Flowers102 trains on train+val, as MAE-Lite.
DOWNSTREAM = {
    "flowers102": ("Flowers102", ("train", "val"), "test", True),  # 102 classes
    "pets": ("OxfordIIITPet", ("trainval",), "test", False),  # 37 breeds, 3680 / 3669
    "aircraft": ("FGVCAircraft", ("trainval",), "test", False),  # 100 variants, 6667 / 3333
    "cars": ("StanfordCars", ("train",), "test", True),  # 196 classes, 8144 / 8041
}


def list_images_once(directory, class_to_idx, is_valid):
    """ImageFolder's listing (sorted, symlinks followed: a subset can be a folder of links) that
    enters each real folder once (a `train/cat/loop -> ..` made 40 images 1640) and refuses two
    class folders that are one (`train/c -> a`: two labels for its images). -> (samples [(path,
    class index)], the symlinked folders skipped, the files skipped as not images)."""
    real = os.path.realpath
    folders = {}
    for c in sorted(class_to_idx):
        other = folders.setdefault(real(os.path.join(directory, c)), c)
        if other != c:
            raise DataError(f"{directory}: the class folders {other!r} and {c!r} are the same folder "
                            f"({real(os.path.join(directory, c))}): its images would get two labels")
    seen = {real(directory)} | set(folders)
    samples, skipped, not_images = [], [], []
    for cls in sorted(class_to_idx):
        walk = []
        for root, dirs, files in os.walk(os.path.join(directory, cls), followlinks=True):
            walk.append((root, files))
            for d in list(dirs):
                if real(os.path.join(root, d)) in seen:
                    skipped.append(os.path.join(root, d))
                    dirs.remove(d)  # not entered: its images are listed elsewhere
                seen.add(real(os.path.join(root, d)))
        for root, files in sorted(walk):
            paths = [os.path.join(root, f) for f in sorted(files)]
            samples += [(p, class_to_idx[cls]) for p in paths if is_valid(p)]
            not_images += [p for p in paths if not is_valid(p)]
    return samples, skipped, not_images


def image_folder(root, transform, loader):
    """torchvision's ImageFolder listed by list_images_once (`skipped_links` on the dataset)."""
    from torchvision import datasets
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    class ImageFolder(datasets.ImageFolder):
        def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None,
                         allow_empty=False):
            samples, self.skipped_links, self.not_images = list_images_once(
                directory, class_to_idx,
                is_valid_file or (lambda f: has_file_allowed_extension(f, extensions or IMG_EXTENSIONS)))
            found = {t for _, t in samples}
            empty = sorted(c for c, i in class_to_idx.items() if i not in found)
            if empty and not allow_empty:
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
            return samples

    return ImageFolder(root, transform=transform, loader=loader)


class CorruptImageError(DataError):
    """An image file that cannot be decoded. A DataLoader worker's exception is re-raised
    in the main process with the worker's whole traceback as its message: keep only our
    own line, so the run still ends with one line naming the file."""

    def __init__(self, msg):
        ours = [line.split("CorruptImageError: ", 1)[1] for line in str(msg).splitlines()
                if "CorruptImageError: " in line]
        super().__init__(ours[-1] if ours else msg)


def open_image(path):
    """ImageFolder's loader, lazily: the header is read (size, format), the pixels are not,
    so the transform can ask PIL for a reduced-size JPEG decode (see DecodeCropFlip)."""
    from PIL import Image
    try:
        return Image.open(path)
    except Exception as e:
        raise corrupt_image(path, e) from None


def corrupt_image(path, e):
    detail = (str(e).splitlines() or [""])[0]
    return CorruptImageError(f"{path}: cannot read this image ({type(e).__name__}: {detail}); "
                             f"delete or replace the file")


def decode_rgb(img, min_size=None):
    """Decode a lazily opened PIL image to RGB. With min_size (w, h), a JPEG is decoded at
    the smallest of 1/1, 1/2, 1/4, 1/8 scale that is still at least that large (libjpeg
    skips the finer DCT coefficients: a 1/2-scale decode costs about a third). Returns
    (image, (sx, sy)): original pixels per decoded pixel."""
    size = img.size
    if img.mode in ("I", "F"):  # PIL's RGB conversion clips these at 255: all white or black
        kind = "integer" if img.mode == "I" else "float"
        raise CorruptImageError(f"{getattr(img, 'filename', '') or 'an image'}: 32-bit {kind} pixels (PIL mode "
                                f"{img.mode}) have no fixed range to scale to 8 bits; save it with 8 or 16 bits")
    try:
        if min_size is not None and getattr(img, "format", None) == "JPEG":
            img.draft("RGB", (max(1, math.ceil(min_size[0])), max(1, math.ceil(min_size[1]))))
        if img.mode.startswith("I;16"):  # 16-bit grey: PIL's RGB conversion clips it at 255 (white)
            from PIL import Image
            import numpy as np
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        rgb = img.convert("RGB")
    except Exception as e:
        raise corrupt_image(getattr(img, "filename", "") or "an image", e) from None
    return rgb, (size[0] / rgb.size[0], size[1] / rgb.size[1])


class DecodeCropFlip:
    """RandomResizedCrop + horizontal flip as one step on a lazily opened image -> uint8
    (3, size, size). The box is drawn from the header's size before any pixel is decoded, so
    a JPEG whose crop is at least twice the output is decoded at 1/2, 1/4 or 1/8 scale; the
    crop is resized by torch's antialiased bicubic (Keys a = -0.75; PIL's a = -0.5), 3.4x
    faster than PIL's. Both paths (this, `crop` for RandAugment) draw the same boxes."""

    def __init__(self, size, scale=(0.08, 1.0), flip=True):
        self.size, self.scale, self.flip = size, scale, flip

    def params(self, img):
        """(box (left, top, w, h), flip?) from the header's size, torch's RNG: torchvision's
        RandomResizedCrop.get_params (aspect 3/4..4/3, 10 tries, then the central crop)."""
        from torchvision.transforms import RandomResizedCrop
        top, left, h, w = RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))
        return (left, top, w, h), self.flip and torch.rand(1).item() < 0.5

    def decode(self, img):
        """-> (box, flip, decoded RGB image, its box in decoded pixels (l, t, r, b) floats)."""
        from PIL import Image
        if torch.is_tensor(img):  # an already-decoded image (C, H, W)
            img = Image.fromarray(img.permute(1, 2, 0).numpy())
        (left, top, w, h), flip = self.params(img)
        rgb, (sx, sy) = decode_rgb(img, (img.size[0] * self.size / w, img.size[1] * self.size / h))
        return flip, rgb, (left / sx, top / sy, (left + w) / sx, (top + h) / sy)

    def crop(self, img):
        """The crop as a PIL image (PIL's bicubic), for augmentations that run on PIL."""
        from PIL import Image
        flip, rgb, box = self.decode(img)
        out = rgb.resize((self.size, self.size), Image.BICUBIC, box=box)
        return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out

    def __call__(self, img):
        import numpy as np
        flip, rgb, (l, t, r, b) = self.decode(img)
        l, t = int(l), int(t)  # whole decoded pixels (exact unless the JPEG was decoded reduced)
        r, b = max(math.ceil(r), l + 1), max(math.ceil(b), t + 1)
        x = torch.from_numpy(np.asarray(rgb)[t:b, l:r].copy()).permute(2, 0, 1)  # (3, h, w), channels last
        x = F.interpolate(x[None], size=(self.size, self.size), mode="bicubic", antialias=True)[0]
        return x.flip(-1) if flip else x


def pil_to_uint8(img):
    """PIL RGB image -> (3, H, W) uint8 tensor (one copy)."""
    import numpy as np
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def pretrain_transform(input_size, min_scale=0.2):
    """MAE's pre-training augmentation: RandomResizedCrop(scale=(min_scale, 1), bicubic) + flip,
    as uint8 (3, input_size, input_size)."""
    return DecodeCropFlip(input_size, (min_scale, 1.0))


class EvalResizeCrop:
    """Resize the shorter side to input_size / 0.875 (256 for 224, bicubic), then a center
    crop (MAE's evaluation); a JPEG is decoded at the smallest DCT scale still large
    enough. -> uint8 (3, input_size, input_size)."""

    def __init__(self, input_size):
        self.size, self.resize = input_size, int(round(input_size / 0.875))

    def __call__(self, img):
        from PIL import Image
        if torch.is_tensor(img):
            img = Image.fromarray(img.permute(1, 2, 0).numpy())
        w, h = img.size
        s = self.resize / min(w, h)
        rgb, _ = decode_rgb(img, (w * s, h * s))
        nw, nh = max(self.resize, round(w * s)), max(self.resize, round(h * s))
        rgb = rgb.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - self.size) / 2)), int(round((nh - self.size) / 2))
        return pil_to_uint8(rgb.crop((left, top, left + self.size, top + self.size)))


eval_transform = EvalResizeCrop


def normalize(imgs):
    """uint8 images (..., 3, H, W) on the device (they crossed the bus as uint8: 4x fewer bytes)
    -> float32 with ImageNet's mean and std."""
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(3, 1, 1) * 255
    return (imgs.float() - mean) / std


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, call set_epoch) that yields
    (index, epoch), so that SeededSamples can seed each sample's randomness."""

    def __iter__(self):
        return ((i, self.epoch) for i in super().__iter__())


class SeededSamples(Dataset):
    """Sample `index` of epoch `epoch` loaded and augmented under torch's RNG seeded by
    hash(seed, epoch, index), with `noise` uniform numbers (MAE's mask noise) from the same
    seed -> (img, label, noise (noise,)), drawn in the worker, off the critical path."""

    def __init__(self, dataset, seed, noise=0):
        self.dataset, self.seed, self.noise = dataset, seed, noise

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        s = stable_seed(self.seed, epoch, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            img, label = self.dataset[index]
        return img, label, sample_noise(s, self.noise)


def sample_noise(seed, n):
    """(n,) uniform noise of one sample, from its seed alone. XOR with a constant: a stream
    distinct from the one that drew the sample's crop."""
    return torch.rand(n, generator=torch.Generator().manual_seed(int(seed) ^ 0x5DEECE66D))


def to_device(batch, device):
    """A loader's batch -> (images normalised on the device, labels, noise). Pinned host
    memory makes the copies asynchronous: nothing here waits for the GPU."""
    imgs, labels, noise = batch
    imgs = normalize(imgs.to(device, non_blocking=True))
    return imgs, labels.to(device, non_blocking=True), noise.to(device, non_blocking=True)


class DeviceLoader:
    """A DataLoader whose batches arrive on the device as (normalised images, labels, noise)."""

    def __init__(self, loader, device):
        self.loader, self.device, self.sampler = loader, device, loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return (to_device(batch, self.device) for batch in self.loader)


def build_train_loader(dataset, args, dinfo, noise=0):
    """Shuffled, sharded over processes, equal full batches on every rank (drop_last), on the
    device; each sample carries `noise` uniform numbers drawn from its own seed."""
    sampler = EpochSampler(dataset, num_replicas=dinfo.world_size, rank=dinfo.rank,
                           shuffle=True, seed=args.seed)
    if len(sampler) < args.batch_size * args.accum_iter:
        raise DataError(f"the training set has {len(dataset)} images: fewer than one optimizer "
                        f"step (--batch_size {args.batch_size} x --accum_iter {args.accum_iter} "
                        f"x {dinfo.world_size} processes)")
    return DeviceLoader(DataLoader(SeededSamples(dataset, args.seed, noise), batch_size=args.batch_size,
                                   sampler=sampler, num_workers=args.num_workers, drop_last=True,
                                   pin_memory=dinfo.device.type == "cuda",
                                   persistent_workers=args.num_workers > 0), dinfo.device)


def eval_images(args, n=8):
    """n un-augmented images (the val split, else the train split) for figures, normalised."""
    try:
        ds, _ = build_dataset(args, train=False, transform=eval_transform(args.input_size))
    except DataError:
        ds, _ = build_dataset(args, train=True, transform=eval_transform(args.input_size))
    idx = torch.linspace(0, len(ds) - 1, min(n, len(ds))).long().tolist()
    return normalize(torch.stack([ds[i][0] for i in idx]))


# ----------------------------------------------------------------------------
# Flags


def add_data_args(parser):
    g = parser.add_argument_group("data")
    g.add_argument("--data_path", default="", help="ImageFolder root with train/ and val/ "
                   "(ImageNet layout), or where CIFAR is stored; empty: the built-in synthetic data")
    g.add_argument("--dataset", default="auto", choices=("auto", "imagefolder", "synthetic",
                                                         "cifar10", "cifar100", *DOWNSTREAM),
                   help="auto: imagefolder when --data_path is set, else synthetic; "
                   "flowers102/pets/aircraft/cars: torchvision's, under --data_path (./data)")
    g.add_argument("--download", action="store_true", help="let torchvision fetch CIFAR, "
                   "Flowers102, Pets or Aircraft (Stanford Cars can no longer be downloaded)")
    g.add_argument("--synthetic_samples", type=int, default=2048,
                   help="training images of the synthetic dataset (val: a quarter)")
    g.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1))
    return g
