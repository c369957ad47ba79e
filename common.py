"""Shared foundation of the four unsupervised OOD-detection scripts (ccl.py, mcl.py, oecl.py, scan_ood.py).

Sections, top to bottom: data sets -> batched augmentation -> backbones -> shared losses ->
training loop -> K-means and kNN -> OOD metrics -> command line. Nothing runs at import time.

    python common.py        # self-check: loads digits, augments a batch, trains 1 epoch, prints metrics

Conventions used everywhere:
- images travel as uint8 tensors N x 3 x H x W and stay on the device; augmentations return floats in [0, 1];
  the Encoder normalises its input itself, so no script can forget to.
- a contrastive batch is z = cat([view1, view2]): row i and row i + N are the two views of one image.
- OOD scores: higher = more in-distribution.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def fail(msg):
    """End the run with one clear line (no traceback): for bad user input, not for bugs."""
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------------------------
# Data sets: every loader returns (x uint8 N x 3 x H x W, y int64 with -1 = unlabeled, class names)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The ODIN OOD sets (Liang et al.), the tarballs every OOD paper uses; md5 as published by pytorch-ood.
ODIN_SETS = {
    "lsun_resize": ("https://www.dropbox.com/s/raw/moqh2wh8696c3yl/LSUN_resize.tar.gz",
                    "278b7b31c8cb7e804a1465a8ce03a2dc", "LSUN_resize/LSUN_resize"),
    "lsun_crop": ("https://www.dropbox.com/s/raw/fhtsw1m3qxlwj6h/LSUN.tar.gz",
                  "458a0a0ab8e5f1cb4516d7400568e460", "LSUN/test"),
    "imagenet_resize": ("https://www.dropbox.com/s/raw/kp3my3412u5k9rl/Imagenet_resize.tar.gz",
                        "0f9ff11d45babf2eff5fe12281d1ac31", "Imagenet_resize/Imagenet_resize"),
    "imagenet_crop": ("https://www.dropbox.com/s/raw/avgm2u562itwpkl/Imagenet.tar.gz",
                      "7c0827e4246c3718a5ee076e999e52e5", "Imagenet/test"),
}
TORCHVISION_SETS = ("cifar10", "cifar100", "svhn")
DATASET_SPECS = "digits, cifar10, cifar100, svhn, folder:PATH, npy:PATH, interp:SPEC, " + ", ".join(ODIN_SETS)


def resize_uint8(x, size, chunk=4096):
    """Resize uint8 N x 3 x H x W images to size x size (antialiased bilinear), chunked to bound memory."""
    if x.shape[-2:] == (size, size):
        return x
    out = torch.empty(len(x), 3, size, size, dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        xf = x[i:i + chunk].float()
        xf = F.interpolate(xf, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i:i + chunk] = xf.round().clamp(0, 255).to(torch.uint8)
    return out


def _load_digits(train):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] * (255.0 / 16.0)           # N x 1 x 8 x 8, 0..255
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    perm = torch.from_numpy(np.random.RandomState(0).permutation(len(x)))    # fixed 80/20 split
    n_train = int(0.8 * len(x))
    idx = perm[:n_train] if train else perm[n_train:]
    return x[idx], y[idx], [str(c) for c in range(10)]


def _load_torchvision(name, train, root, download):
    import torchvision.datasets as tvd
    try:
        if name == "svhn":
            ds = tvd.SVHN(root, split="train" if train else "test", download=download)
            x, y, classes = torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long(), [str(c) for c in range(10)]
        else:
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=train, download=download)
            x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            y, classes = torch.tensor(ds.targets).long(), list(ds.classes)
    except Exception as e:  # no network, bad checksum, missing files: say where the files go instead
        fail(f"could not load {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             f"put torchvision's {name} files under '{root}' or use folder:PATH")
    return x, y, classes


def _decode(path):
    from PIL import Image
    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    except Exception:
        fail(f"image will not decode: {path}")


def _load_folder(path, train, size, cache_dir):
    """ImageFolder layout PATH/<class>/<image>, or a flat folder of images (unlabeled, y = -1).
    If PATH has train/ and test/, `train` picks one. Decoded once, then cached as a tensor file."""
    if not os.path.isdir(path):
        fail(f"data folder not found: {path}")
    split = os.path.join(path, "train" if train else "test")
    if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
        path = split
    key = hashlib.sha1(f"{os.path.abspath(path)}|{size}".encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"folder-{key}.pt")
    if os.path.exists(cache):
        d = torch.load(cache)
        return d["x"], d["y"], d["classes"]
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
    if classes:
        files = [(os.path.join(path, c, f), i) for i, c in enumerate(classes)
                 for f in sorted(os.listdir(os.path.join(path, c))) if f.lower().endswith(IMG_EXTENSIONS)]
    else:
        files = [(os.path.join(path, f), -1) for f in sorted(os.listdir(path)) if f.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        fail(f"no images ({', '.join(IMG_EXTENSIONS)}) under {path}")
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL's decoders release the GIL
        imgs = list(pool.map(lambda f: resize_uint8(_decode(f[0])[None], size)[0], files, chunksize=256))
    x, y = torch.stack(imgs), torch.tensor([f[1] for f in files]).long()
    save_atomic({"x": x, "y": y, "classes": classes}, cache)
    return x, y, classes


def _load_npy(path):
    if not os.path.isfile(path):
        fail(f"npy file not found: {path}")
    a = np.load(path, mmap_mode="r")
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        fail(f"{path}: expected a uint8 N x H x W x 3 array, got {a.dtype} {tuple(a.shape)}")
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous(), torch.full((len(a),), -1), []


def _load_odin(name, root, download):
    from torchvision.datasets.utils import download_and_extract_archive
    url, md5, sub = ODIN_SETS[name]
    folder = os.path.join(root, sub)
    if not os.path.isdir(folder):
        if not download:
            fail(f"{name} not found at {folder}")
        try:
            download_and_extract_archive(url, root, md5=md5)
        except Exception as e:
            fail(f"could not download {name} ({type(e).__name__}); fetch {url} (md5 {md5}) and extract it in '{root}'")
    return folder


def load_dataset(spec, train=True, root="data", download=True, size=32):
    """Load a data set by spec (see DATASET_SPECS) -> (x uint8 N x 3 x size x size, y int64 (-1 unlabeled), classes).

    Images of another size are resized to `size` once, here. Decoded folders are cached under `root`."""
    if spec == "digits":
        x, y, classes = _load_digits(train)
    elif spec in TORCHVISION_SETS:
        x, y, classes = _load_torchvision(spec, train, root, download)
    elif spec.startswith("folder:"):
        return _load_folder(spec[len("folder:"):], train, size, os.path.join(root, "cache"))
    elif spec.startswith("npy:"):
        x, y, classes = _load_npy(spec[len("npy:"):])
    elif spec.startswith("interp:"):
        # CSI's Interp: CSI averages each test batch of 100 with the previous batch and drops the first,
        # i.e. image i with image i - 100 (9,900 images for CIFAR-10). "Previous" is taken in that sense.
        x, _, _ = load_dataset(spec[len("interp:"):], False, root, download, size)
        x = ((x[100:].float() + x[:-100].float()) / 2).round().to(torch.uint8)
        return x, torch.full((len(x),), -1), []
    elif spec in ODIN_SETS:
        return _load_folder(_load_odin(spec, root, download), train, size, os.path.join(root, "cache"))
    else:
        fail(f"unknown data set '{spec}' (known: {DATASET_SPECS})")
    return resize_uint8(x, size), y, classes


def parse_classes(text):
    """'0-5' -> [0..5]; '3' -> [3]; '0-2,4-9' -> [0,1,2,4,...,9]."""
    ids = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            ids += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            fail(f"bad --id-classes '{text}' (expected e.g. 0-5, 3 or 0-2,4-9)")
    return sorted(set(ids))


def format_classes(ids):
    """[0, 1, 2, 4, 5] -> '0-2,4-5' (the inverse of parse_classes)."""
    runs, ids = [], sorted(ids)
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def select_classes(x, y, ids):
    """Keep the images whose label is in ids (labels are kept as they are)."""
    keep = torch.isin(y, torch.as_tensor(ids, dtype=y.dtype))
    return x[keep], y[keep]


def load_data(args):
    """The run's data from the shared flags: train/test images of the in-distribution classes and the OOD sets.

    With a proper subset of classes (the default on digits: 0-5), the test images of the other classes are an
    OOD set; with all classes in-distribution the OOD sets are --ood (default for cifar10: svhn, cifar100,
    interp:cifar10). Returns a namespace: train_x, train_y, test_x, test_y, ood {name: x}, ood_y {name: labels}
    (the held-out classes only), classes, id_classes."""
    load = lambda spec, train: load_dataset(spec, train, args.data_root, True, args.size)
    train_x, train_y, classes = load(args.dataset, True)
    test_x, test_y, _ = load(args.dataset, False)
    n_classes = len(classes) if classes else int(train_y.max()) + 1
    id_text = args.id_classes or ("0-5" if args.dataset == "digits" else f"0-{n_classes - 1}")
    ids = parse_classes(id_text)
    if train_y.min() < 0:
        if args.id_classes:
            fail(f"{args.dataset} has no labels, so --id-classes cannot select from it")
        ids = []
    elif ids[0] < 0 or ids[-1] >= n_classes:
        fail(f"--id-classes {id_text} out of range: {args.dataset} has classes 0-{n_classes - 1}")
    ood, ood_y = {}, {}   # ood_y: labels of the held-out classes (per-class results); other sets have none
    if ids and len(ids) < n_classes:
        rest = [c for c in range(n_classes) if c not in ids]
        held_out = f"classes {format_classes(rest)}"
        ood[held_out], ood_y[held_out] = select_classes(test_x, test_y, rest)
        train_x, train_y = select_classes(train_x, train_y, ids)
        test_x, test_y = select_classes(test_x, test_y, ids)
    specs = args.ood if args.ood is not None else (["svhn", "cifar100", "interp:cifar10"]
                                                   if args.dataset == "cifar10" and not ood else [])
    for spec in specs:
        ood[spec] = load(spec, False)[0]
    if not ood:
        fail(f"no OOD set: all classes of {args.dataset} are in-distribution; give --ood SPEC [SPEC ...]")
    if args.subset and args.subset < len(train_x):
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))[:args.subset]
        train_x, train_y = train_x[keep], train_y[keep]
    return SimpleNamespace(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, ood=ood, ood_y=ood_y,
                           classes=classes, id_classes=ids)


# ----------------------------------------------------------------------------------------------
# Batched augmentation: every sample gets its own random parameters, drawn on the batch's device.

def to_float(x):
    """uint8 [0, 255] -> float [0, 1]; floats pass through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def rotate90(x, k):
    """Rotate a batch by k * 90 degrees counter-clockwise; k an int, or a tensor with one k per sample."""
    if not torch.is_tensor(k):
        return torch.rot90(x, int(k) % 4, dims=(2, 3))
    out = x.clone()
    for r in range(1, 4):  # four masked whole-batch rotations, not a loop over samples
        sel = (k % 4) == r
        out[sel] = torch.rot90(x[sel], r, dims=(2, 3))
    return out


def grayscale(x):
    """ITU-R 601 luma with torchvision's rounding (0.2989, 0.587, 0.114), B x 1 x H x W."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def adjust_hue(x, shift):
    """Rotate the HSV hue of RGB x in [0, 1] by `shift` turns (one per sample), without building an HSV tensor:
    with V = max, C = max - min and h6 the hue in sixths of a turn, channel n (R, G, B: n = 5, 3, 1) is
    V - C clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6: the closed form of HSV -> RGB (torchvision's adjust_hue)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    delta = maxc - minc
    num = torch.where(maxc == r, g - b, torch.where(maxc == g, 2 * delta + b - r, 4 * delta + r - g))
    h6 = num / delta.clamp_min(1e-8) + 6 * shift[:, None, None, None]
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h6).remainder_(6)
    return maxc - delta * torch.minimum(k, 4 - k).clamp_(0, 1)


def color_jitter(x, brightness, contrast, saturation, hue):
    """Per-sample colour jitter with torchvision's formulas (adjust_brightness, _contrast, _saturation, _hue),
    in that order; each argument holds one factor per sample (hue: a shift in turns, in [-0.5, 0.5])."""
    f = lambda v: v[:, None, None, None]
    x = (x * f(brightness)).clamp_(0, 1)                          # a new tensor: in place from here on
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    x = x.sub_(mean).mul_(f(contrast)).add_(mean).clamp_(0, 1)
    gray = grayscale(x)
    x = x.sub_(gray).mul_(f(saturation)).add_(gray).clamp_(0, 1)
    return adjust_hue(x, hue).clamp_(0, 1)


class SimCLRAugment(nn.Module):
    """SimCLR augmentation on a whole batch, per-sample random parameters, no PIL, no loop over samples.

    random resized crop (torchvision's sampling: scale, log-uniform ratio 3/4..4/3, 10 tries, else whole image)
    -> horizontal flip (p 0.5) -> colour jitter with probability p_jitter (brightness, contrast, saturation =
    jitter, hue = jitter / 4, applied in that fixed order; torchvision shuffles the order per call)
    -> grayscale (p_gray) -> optional Gaussian blur (p 0.5, sigma 0.1..2, kernel ~ size / 10 as in SimCLR).

    forward(x, generator=None, same_for_batch=False): x uint8 or float in [0, 1], any device; returns float
    B x 3 x size x size in [0, 1]. same_for_batch draws one parameter set for the whole batch (CSI's test-time
    ensemble applies identical augmentations to every test image); to repeat that set across batches, pass a
    generator seeded afresh for each batch."""

    def __init__(self, size=32, scale=(0.08, 1.0), jitter=0.4, p_jitter=0.8, p_gray=0.2, blur=False, flip=True):
        super().__init__()
        self.size, self.scale, self.jitter, self.p_jitter, self.p_gray = size, scale, jitter, p_jitter, p_gray
        self.blur, self.flip = blur, flip

    def forward(self, x, generator=None, same_for_batch=False):
        x = to_float(x)
        B, dev = len(x), x.device
        n = 1 if same_for_batch else B
        rand = lambda *shape: torch.rand(n, *shape, device=dev, generator=generator).expand(B, *shape)
        x = self.crop_flip(x, rand(10), rand(10), rand(2), rand())
        j = self.jitter
        if j > 0 and self.p_jitter > 0:
            on = (rand() < self.p_jitter).float()                        # off: factors 1 and shift 0 (identity)
            factor = lambda: 1 + on * j * (2 * rand() - 1)
            x = color_jitter(x, factor(), factor(), factor(), on * (j / 4) * (2 * rand() - 1))
        if self.p_gray > 0:
            x = torch.where((rand() < self.p_gray)[:, None, None, None], grayscale(x).expand_as(x), x)
        if self.blur:
            x = self.gaussian_blur(x, rand() < 0.5, 0.1 + 1.9 * rand())
        return x.clamp_(0, 1)                                                # float rounding can reach 1 + 1e-7

    def crop_flip(self, x, u_scale, u_ratio, u_pos, u_flip):
        """Crop boxes as fractions of the image side, sampled as torchvision's RandomResizedCrop, then one
        grid_sample for crop + resize + flip of the whole batch."""
        lo, hi = self.scale
        area = lo + (hi - lo) * u_scale                                             # B x 10 tries
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u_ratio
        w, h = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()
        ok = (w <= 1) & (h <= 1)
        first = ok.float().argmax(1, keepdim=True)                                  # first valid try
        w = torch.where(ok.any(1), w.gather(1, first)[:, 0], torch.ones_like(w[:, 0]))
        h = torch.where(ok.any(1), h.gather(1, first)[:, 0], torch.ones_like(h[:, 0]))
        cx, cy = (1 - w) * (2 * u_pos[:, 0] - 1), (1 - h) * (2 * u_pos[:, 1] - 1)   # centre in [-1, 1] coords
        sx = torch.where(u_flip < 0.5, -w, w) if self.flip else w
        s = self.size           # output pixel centres in [-1, 1] (align_corners=False), scaled and shifted per sample
        base = (torch.arange(s, device=x.device, dtype=x.dtype) * 2 + 1) / s - 1
        gx = (sx[:, None] * base + cx[:, None])[:, None, :].expand(-1, s, -1)
        gy = (h[:, None] * base + cy[:, None])[:, :, None].expand(-1, -1, s)
        grid = torch.stack([gx, gy], -1)                                            # B x s x s x (x, y)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def gaussian_blur(self, x, on, sigma):
        k = max(3, (self.size // 10) | 1)                                           # odd kernel, ~10% of the side
        t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
        kern = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
        kern = kern / kern.sum(1, keepdim=True)                                     # B x k
        B, C, H, W = x.shape
        w = kern.repeat_interleave(C, 0)                                            # one kernel per channel
        y = F.conv2d(F.pad(x.reshape(1, B * C, H, W), (k // 2,) * 4, mode="reflect"), w[:, None, None, :], groups=B * C)
        y = F.conv2d(y, w[:, None, :, None], groups=B * C).reshape(B, C, H, W)
        return torch.where(on[:, None, None, None], y, x)


# ----------------------------------------------------------------------------------------------
# Strong augmentation (SCAN's "strong" transform), batched: every sample draws its own flip, ops,
# magnitudes and Cutout box on the batch's device.

class StrongAugment(nn.Module):
    """Horizontal flip (p 0.5) -> n_ops ops drawn uniformly with replacement from 14 RandAugment-style ops, each
    with a uniform random magnitude (SCAN draws magnitudes at random, not a fixed M) -> Cutout: one square of
    side `cutout` at a uniform centre, clipped at the border (so up to cutout x cutout pixels).

    Magnitude ranges follow the RandAugment lists of FixMatch/SCAN: rotate +-30 deg, shear +-0.3, translate
    +-30% of the side, posterize 4..8 bits, solarize threshold 0..1, colour/contrast/brightness/sharpness factor
    0.05..0.95. Pixels uncovered by geometric ops and Cutout are filled with `fill` (0.5 grey: 0 after the
    Encoder's normalisation, as SCAN's Cutout applied after Normalize).

    forward(x, generator=None): x uint8 or float in [0, 1], B x 3 x H x W -> float in [0, 1], same shape."""

    OPS = ("identity", "autocontrast", "equalize", "rotate", "posterize", "solarize", "color", "contrast",
           "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
    GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

    def __init__(self, n_ops=4, cutout=16, fill=0.5):
        super().__init__()
        self.n_ops, self.cutout, self.fill = n_ops, cutout, fill

    def forward(self, x, generator=None):
        x = x.float().div(255) if x.dtype == torch.uint8 else x.float().clone()
        B, dev = len(x), x.device
        flip = torch.rand(B, device=dev, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        ops = torch.randint(len(self.OPS), (B, self.n_ops), device=dev, generator=generator)
        mags = torch.rand(B, self.n_ops, device=dev, generator=generator)
        for r in range(self.n_ops):
            x = self.apply_ops(x, ops[:, r], mags[:, r])
        return self.apply_cutout(x, torch.rand(B, 2, device=dev, generator=generator))

    def apply_ops(self, x, op, m):
        """One round: each sample gets op[i] with magnitude m[i] in [0, 1]; a masked call per op type."""
        for name in self.OPS[1:]:
            if name in self.GEOMETRIC:
                continue
            idx = (op == self.OPS.index(name)).nonzero()[:, 0]
            if len(idx):
                x[idx] = getattr(self, name)(x[idx], m[idx, None, None, None]).clamp(0, 1)
        geo = torch.isin(op, torch.tensor([self.OPS.index(n) for n in self.GEOMETRIC], device=x.device))
        idx = geo.nonzero()[:, 0]
        if len(idx):
            x[idx] = self.affine(x[idx], op[idx], m[idx])
        return x

    # Colour ops: m is B x 1 x 1 x 1 in [0, 1]; "enhance" ops blend with a degenerate image like PIL.ImageEnhance.
    @staticmethod
    def blend(degenerate, x, m):
        return degenerate + (0.05 + 0.9 * m) * (x - degenerate)

    def autocontrast(self, x, m):
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)

    def equalize(self, x, m):
        """PIL.ImageOps.equalize per channel: lut[i] = (pixels below level i + step // 2) // step, with
        step = (pixels - pixels at the top level) // 255; identity where step is 0."""
        B, C, H, W = x.shape
        q = (x * 255).round().long().view(B, C, H * W)
        hist = torch.zeros(B, C, 256, device=x.device).scatter_add_(2, q, torch.ones_like(q, dtype=torch.float))
        top = 255 - (hist.flip(2) > 0).float().argmax(2, keepdim=True)               # highest level present
        step = torch.div(hist.sum(2, keepdim=True) - hist.gather(2, top), 255, rounding_mode="floor")
        below = hist.cumsum(2) - hist
        lut = torch.div(below + torch.div(step, 2, rounding_mode="floor"), step.clamp_min(1), rounding_mode="floor")
        out = lut.clamp(max=255).gather(2, q).view(B, C, H, W) / 255
        return torch.where(step.view(B, C, 1, 1) > 0, out, x)

    def posterize(self, x, m):
        keep = 2.0 ** (8 - (4 + (4 * m).round()))                                      # 4..8 bits kept
        return torch.floor((x * 255).round() / keep) * keep / 255

    def solarize(self, x, m):
        return torch.where(x < m, x, 1 - x)

    def color(self, x, m):
        return self.blend(grayscale(x), x, m)

    def contrast(self, x, m):
        return self.blend(grayscale(x).mean((1, 2, 3), keepdim=True), x, m)

    def brightness(self, x, m):
        return self.blend(torch.zeros_like(x), x, m)

    def sharpness(self, x, m):
        """PIL's SMOOTH filter (3x3, centre weight 5, total 13) as the degenerate image; border pixels kept."""
        k = torch.ones(3, 3, device=x.device)
        k[1, 1] = 5
        k = (k / 13).expand(3, 1, 3, 3)
        smooth = x.clone()
        smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, k, groups=3)
        return self.blend(smooth, x, m)

    def affine(self, x, op, m):
        """rotate / shear / translate of every selected sample in one grid_sample (about the image centre)."""
        v = 2 * m - 1                                                                 # signed magnitude in [-1, 1]
        is_ = lambda name: (op == self.OPS.index(name)).float()
        angle = is_("rotate") * v * math.radians(30)
        cos, sin = angle.cos(), angle.sin()
        theta = torch.zeros(len(x), 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + is_("shear_x") * 0.3 * v
        theta[:, 1, 0], theta[:, 1, 1] = sin + is_("shear_y") * 0.3 * v, cos
        theta[:, 0, 2], theta[:, 1, 2] = is_("translate_x") * 0.6 * v, is_("translate_y") * 0.6 * v  # 30% of 2
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x - self.fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + self.fill

    def apply_cutout(self, x, u):
        B, _, H, W = x.shape
        cy, cx = (u[:, 0] * H).long(), (u[:, 1] * W).long()
        rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
        half = self.cutout // 2
        in_rows = (rows[None] >= cy[:, None] - half) & (rows[None] < cy[:, None] + half)
        in_cols = (cols[None] >= cx[:, None] - half) & (cols[None] < cx[:, None] + half)
        return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], self.fill)


# ----------------------------------------------------------------------------------------------
# Backbones: CIFAR ResNets (3x3 stem, no max-pool) with a width knob, torchvision ImageNet ResNets.

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, c, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != c:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, c, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 4 * c:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * c, 1, stride, bias=False), nn.BatchNorm2d(4 * c))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


CIFAR_ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
               "resnet50": (Bottleneck, [3, 4, 6, 3])}
IMAGENET_ARCHS = ("imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50", "imagenet_resnet101",
                  "imagenet_resnet152")


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, global average pool. width 64 = standard."""

    def __init__(self, block, layers, width=64):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        stages, cin = [], width
        for i, n in enumerate(layers):
            c = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = cin

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def build_backbone(arch, width=64, weights=None):
    """-> (network returning pooled features, feature dim). weights (torchvision archs only): None for random,
    'torchvision' for the ImageNet weights (downloaded once by torchvision), or a path to a state dict."""
    if arch in CIFAR_ARCHS:
        if weights:
            fail(f"--weights applies to the torchvision archs ({', '.join(IMAGENET_ARCHS)}), not {arch}")
        block, layers = CIFAR_ARCHS[arch]
        net = CifarResNet(block, layers, width)
        return net, net.out_dim
    if arch in IMAGENET_ARCHS:
        import torchvision
        name = arch[len("imagenet_"):]
        net = getattr(torchvision.models, name)(weights=None)
        if weights == "torchvision":
            try:
                net = getattr(torchvision.models, name)(weights="DEFAULT")
            except Exception as e:
                fail(f"could not load torchvision's {name} weights ({type(e).__name__}); give --weights PATH "
                     f"to a local state dict (or --weights random, for testing only)")
        elif weights and weights != "random":
            load_weights(net, weights)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    fail(f"unknown arch '{arch}' (known: {', '.join(CIFAR_ARCHS)}, {', '.join(IMAGENET_ARCHS)})")


class Encoder(nn.Module):
    """Backbone F and MLP projection head G: forward(x) -> (h, z), h the embedding-layer feature (after global
    pooling), z the projection-layer output (not normalised). x is a float batch in [0, 1]: normalised here."""

    def __init__(self, arch="resnet18", proj_dim=128, proj_hidden=None, bn_in_head=False, width=64, weights=None):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(arch, width, weights)
        hidden = proj_hidden or self.feat_dim
        layers = [nn.Linear(self.feat_dim, hidden)] + ([nn.BatchNorm1d(hidden)] if bn_in_head else [])
        self.head = nn.Sequential(*layers, nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))
        imagenet = arch in IMAGENET_ARCHS  # pretrained torchvision nets expect ImageNet statistics; ours (x-.5)/.5
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if imagenet else ((0.5,) * 3, (0.5,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x):
        return (x - self.mean) / self.std

    def forward(self, x):
        x = self.normalize(to_float(x))
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.backbone(x)
        return h, self.head(h)


def load_weights(model, source):
    """Strict load of a state dict (or checkpoint with 'model') from a path or dict; strips the 'module.' prefix
    of DataParallel/DDP and torch.compile's '_orig_mod.'; a mismatch ends the run naming the keys."""
    sd = torch.load(source, map_location="cpu", weights_only=False) if isinstance(source, str) else source
    sd = sd.get("model", sd)
    sd = {k.replace("module.", "", 1).replace("_orig_mod.", "") if k.startswith(("module.", "_orig_mod.")) else k: v
          for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        fail(f"weights do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(sd, strict=True)
    return model


# ----------------------------------------------------------------------------------------------
# Losses shared by several methods. Computed in float32 whatever the autocast dtype: logits / tau with
# tau = 0.1 reach 10, and exp of that overflows nothing in fp32 while log-sum-exp keeps it stable.
# Under torchrun every rank gathers the views of all ranks and computes the loss of the global batch; the
# all_gather backward sums each rank's gradient and DDP averages over ranks, so G GPUs with a global batch B
# compute exactly the loss and gradients of one GPU with batch B.

def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank():
    return torch.distributed.get_rank() if distributed() else 0


def world_size():
    return torch.distributed.get_world_size() if distributed() else 1


def all_gather(x):
    """Concatenate x across ranks, rank order, with gradients flowing back to each rank (the backward sums the
    gradients of every rank's loss); identity without torch.distributed. Works for label tensors too."""
    if not distributed():
        return x
    import torch.distributed.nn.functional as distnn
    return torch.cat(distnn.all_gather(x.contiguous()), 0)


def broadcast(x, src=0):
    """Rank src's tensor on every rank (in place); identity without torch.distributed."""
    if distributed():
        torch.distributed.broadcast(x, src)
    return x


def nt_xent(z, tau=0.5):
    """SimCLR's NT-Xent: z = cat([view1, view2]) (2N x d); each view's positive is the other view of its
    image, its negatives the other 2N - 2 views; the mean over all 2N anchors."""
    z1, z2 = z.float().chunk(2)
    z = F.normalize(torch.cat([all_gather(z1), all_gather(z2)]), dim=1)
    n = len(z) // 2
    logits = z @ z.T / tau
    logits.fill_diagonal_(float("-inf"))                                       # never contrast a view with itself
    target = torch.arange(2 * n, device=z.device).roll(n)                      # i <-> i + N
    return F.cross_entropy(logits, target)


def supcon(z, labels, tau=0.1):
    """Supervised contrastive loss (Khosla et al., L_out): for each anchor, the mean over its positives (same
    label, not itself) of -log softmax over all other views. Anchors without a positive contribute nothing;
    the mean is over anchors that have one (0 if none do). Under torch.distributed, over the views of all ranks."""
    z, labels = F.normalize(all_gather(z.float()), dim=1), all_gather(labels)
    logits = z @ z.T / tau
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    per_anchor = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)
    has = n_pos > 0
    return per_anchor[has].mean() if has.any() else z.sum() * 0


# ----------------------------------------------------------------------------------------------
# Training loop: optimisers, schedule, AMP, checkpoints that carry the config, exact --resume.

class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al.): lr_layer = lr * eta * ||w|| / (||g|| + wd ||w||).
    Like solo-learn (and unlike CSI's torchlars), 1-d parameters (BatchNorm, biases) skip weight decay and the
    trust ratio."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d * trust
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def make_optimizer(params, args):
    params = [p for p in params if p.requires_grad]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                               nesterov=getattr(args, "nesterov", False))
    if args.optimizer == "lars":
        return LARS(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    fail(f"unknown optimizer '{args.optimizer}' (sgd, lars, adam)")


def lr_at(step, total, base, warmup=0, final=0.0):
    """Linear warm-up over `warmup` steps, then cosine from base to final (per step, so resume needs no state)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def get_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(args, device):
    """bf16 autocast on CUDA by default; off on CPU/MPS (CPU autocast is slower than fp32 for these nets)."""
    mode = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    if mode == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a kill mid-write never leaves a broken file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# The flags that define what a checkpoint is; resuming or evaluating under other values is refused.
IDENTITY_KEYS = ("dataset", "id_classes", "subset", "size", "arch", "width", "seed")


def check_config(saved, args, keys=IDENTITY_KEYS):
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(args, k)!r}"
            for k in keys if k in saved and hasattr(args, k) and saved[k] != getattr(args, k)]
    if diff:
        fail("checkpoint was made with another configuration (" + "; ".join(diff) + ")")


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["cpu"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def train(model, loss_fn, x, args, ckpt, state=None, on_epoch_start=None, keys=IDENTITY_KEYS):
    """Train `model` on the images `x` (uint8, kept on the device) for args.epochs epochs.

    loss_fn(net, xb, idx, epoch) -> loss or (loss, {name: float}); net is the (compiled) model, xb the uint8
    batch, idx its indices into x (for per-image state such as cluster assignments).
    state: dict of extra tensors (cluster centres, ...) saved with every checkpoint and restored on resume.
    on_epoch_start(epoch, model): called before each epoch with the plain model (re-clustering, schedules).
    Uses args: epochs, batch_size, lr, optimizer, momentum, weight_decay, warmup_epochs, final_lr, amp,
    compile, grad_clip, save_every, resume, seed. Checkpoint at `ckpt` every args.save_every epochs and at
    the end (atomic); with args.resume training continues from it exactly (weights, optimizer, RNG, epoch).
    Under torchrun: DDP with SyncBatchNorm on GPUs, args.batch_size is the global batch and each rank takes its
    contiguous share of every batch of one shuffle common to all ranks; rank 0 alone writes checkpoints.
    Returns the trained model (a run that had already finished only loads its weights)."""
    device = x.device
    state = {} if state is None else state
    opt = make_optimizer(model.parameters(), args)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    start = 0
    config = dict(vars(args))
    if args.resume and os.path.exists(ckpt):
        c = torch.load(ckpt, map_location=device, weights_only=False)
        check_config(c["config"], args, keys)
        load_weights(model, c["model"])
        opt.load_state_dict(c["optimizer"])
        state.update(c["state"])
        set_rng_state(c["rng"])
        if distributed():   # the checkpoint holds rank 0's RNG: give the other ranks their own streams again
            torch.manual_seed(int(torch.randint(2 ** 62, (1,))) + rank())
        start = c["epoch"]
        print(f"resumed {ckpt} at epoch {start}/{args.epochs}")
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt}, starting from scratch")
    net = model
    if distributed():   # global BatchNorm as the official code (SyncBatchNorm exists on GPUs only)
        if device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    net = torch.compile(net) if args.compile else net
    steps_per_epoch = len(x) // args.batch_size
    if steps_per_epoch == 0:
        fail(f"--batch-size {args.batch_size} is larger than the training set ({len(x)} images)")
    total, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch
    t_start, n_seen = time.time(), 0

    def save(epoch):
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
                     "rng": rng_state(), "epoch": epoch, "config": config}, ckpt)

    for epoch in range(start, args.epochs):
        model.train()
        if on_epoch_start:
            on_epoch_start(epoch, model)
        t0, sums = time.time(), {}
        first_bad = torch.tensor(-1, device=device)   # first step of the epoch with a non-finite loss or gradient
        # the shuffle of an epoch depends on (seed, epoch) alone: the same on every rank, and after a resume
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch)).to(device)
        for it in range(steps_per_epoch):
            step = epoch * steps_per_epoch + it
            lr = lr_at(step, total, args.lr, warmup, args.final_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[it * args.batch_size:(it + 1) * args.batch_size].chunk(world_size())[rank()]  # this rank's share
            with autocast(args, device):
                out = loss_fn(net, x[idx], idx, epoch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            ok = torch.isfinite(loss.detach())
            if not scaler.is_enabled():   # under fp16 an inf gradient is an overflow the scaler skips, not a failure
                ok &= torch.isfinite(gnorm)
            first_bad = torch.where(ok | (first_bad >= 0), first_bad, it)   # on the device: no sync per step
            scaler.step(opt)
            scaler.update()
            for k, v in {"loss": loss, **logs}.items():   # summed on the device: no sync per step
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v).detach().float()
        if first_bad >= 0:   # checked once per epoch, before anything is saved: the last checkpoint stays good
            kept = f"last good checkpoint {ckpt}" if os.path.exists(ckpt) else "no checkpoint written yet"
            fail(f"non-finite loss or gradient at epoch {epoch + 1} step {int(first_bad)}; {kept}; "
                 f"try a lower --lr or --amp off")
        n_seen += steps_per_epoch * args.batch_size
        done = epoch + 1
        speed = n_seen / (time.time() - t_start)
        eta = (args.epochs - done) * steps_per_epoch * args.batch_size / speed
        logs = " ".join(f"{k} {float(v) / steps_per_epoch:.4f}" for k, v in sums.items())
        print(f"epoch {done}/{args.epochs} {logs} lr {lr:.4g} | {speed:.0f} img/s, "
              f"{time.time() - t0:.1f}s/epoch, eta {fmt_time(eta)}", flush=True)
        if (done % args.save_every == 0 or done == args.epochs) and rank() == 0:
            save(done)
    return model


@torch.no_grad()
def embed(model, x, batch_size=256, transform=None):
    """Run `model` over uint8 images x in eval mode, batch by batch; `transform` (e.g. an augmentation) maps
    each uint8 batch to floats first. Returns the concatenated outputs (a tuple if the model returns one)."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        xb = transform(xb) if transform is not None else to_float(xb)
        out = model(xb)
        outs.append(tuple(o.float() for o in out) if isinstance(out, tuple) else out.float())
    model.train(was_training)
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(o) for o in zip(*outs))
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------
# K-means and nearest neighbours: chunked matrix products on the tensor's device, never an N x N matrix.

def chunk_rows(n_cols, budget=2 ** 25):
    """Rows per chunk so that a chunk x n_cols float32 block stays around 128 MiB."""
    return max(1, budget // max(1, n_cols))


def _nearest(x, c, x_sq=None):
    """For each row of x: (index of the nearest centre, its squared euclidean distance), chunked over x."""
    c_sq = (c * c).sum(1)
    idx = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist = torch.empty(len(x), device=x.device)
    step = chunk_rows(len(c))
    for i in range(0, len(x), step):
        xb = x[i:i + step]
        xb_sq = (xb * xb).sum(1) if x_sq is None else x_sq[i:i + step]
        d = torch.addmm(c_sq[None], xb, c.T, alpha=-2).add_(xb_sq[:, None])   # |x|^2 - 2 x.c + |c|^2
        dist[i:i + step], idx[i:i + step] = d.min(1)
    return idx, dist.clamp_min_(0)


def _kmeans_pp(x, k, gen, x_sq):
    """Greedy k-means++ (as scikit-learn): each new centre is the best of 2 + log(k) candidates drawn with
    probability proportional to the squared distance to the nearest centre chosen so far."""
    n_trials = 2 + int(math.log(k))
    centers = x[torch.randint(len(x), (1,), generator=gen, device=x.device)]
    d2 = _nearest(x, centers, x_sq)[1]
    for _ in range(1, k):
        cand = torch.multinomial(d2 + 1e-12, n_trials, replacement=True, generator=gen)
        cand_d2 = (x_sq[cand][:, None] + x_sq[None]).addmm_(x[cand], x.T, alpha=-2).clamp_min_(0)  # n_trials x N
        cand_d2 = torch.minimum(d2[None], cand_d2)
        best = cand_d2.sum(1).argmin()
        d2 = cand_d2[best]
        centers = torch.cat([centers, x[cand[best]][None]])
    return centers


def kmeans(x, k, iters=100, n_init=1, metric="euclidean", seed=0, tol=1e-4):
    """Lloyd's K-means with k-means++ initialisation on x's device -> (centers k x d, assign N).

    metric 'cosine' = spherical K-means: rows and centres L2-normalised each step. tol as scikit-learn:
    stop when the squared centre shift is below tol x mean feature variance. Empty clusters are re-seeded
    with the points farthest from their centres. n_init restarts keep the lowest inertia. Under torchrun the
    result of rank 0 is broadcast, so every rank trains with the same clusters."""
    if k > len(x):
        fail(f"K-means with k={k} needs at least k points, got {len(x)}")
    x = x.float()
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    elif metric != "euclidean":
        fail(f"unknown metric '{metric}' (euclidean, cosine)")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x_sq = (x * x).sum(1)
    tol = tol * (x - x.mean(0)).pow_(2).mean()        # scikit-learn's tolerance scale (biased variance)
    best = None
    for _ in range(n_init):
        c = _kmeans_pp(x, k, gen, x_sq)
        for _ in range(iters):
            assign, dist = _nearest(x, c, x_sq)
            counts = torch.bincount(assign, minlength=k)
            new = torch.zeros_like(c).index_add_(0, assign, x) / counts.clamp_min(1)[:, None]
            empty = (counts == 0).nonzero()[:, 0]
            if len(empty):
                new[empty] = x[dist.topk(len(empty)).indices]
            if metric == "cosine":
                new = F.normalize(new, dim=1)
            shift = (new - c).pow(2).sum()
            c = new
            if shift <= tol:
                break
        assign, dist = _nearest(x, c, x_sq)
        inertia = dist.sum()
        if best is None or inertia < best[0]:
            best = (inertia, c, assign)
    return broadcast(best[1]), broadcast(best[2])   # under torchrun every rank uses rank 0's clustering


def knn(query, ref, k=1, metric="cosine"):
    """k nearest rows of ref for each row of query -> (values, indices), both len(query) x k, best first.
    values: cosine similarities (metric 'cosine') or negative euclidean distances ('euclidean'), so that larger
    is always nearer. Chunked over the queries: at most a chunk x len(ref) block exists at once."""
    if k > len(ref):
        fail(f"kNN with k={k} needs at least k reference points, got {len(ref)}")
    query, ref = query.float(), ref.float()
    if metric == "cosine":
        query, ref = F.normalize(query, dim=1), F.normalize(ref, dim=1)
    elif metric != "euclidean":
        fail(f"unknown metric '{metric}' (euclidean, cosine)")
    ref_sq = (ref * ref).sum(1)
    vals, idxs = [], []
    step = chunk_rows(len(ref))
    for i in range(0, len(query), step):
        s = query[i:i + step] @ ref.T
        if metric == "euclidean":   # -|q - r| ranks like 2 q.r - |r|^2; the |q|^2 term is added back below
            s = s.mul_(2).sub_(ref_sq[None])
        v, j = s.topk(k, dim=1)
        if metric == "euclidean":
            v = -(((query[i:i + step] ** 2).sum(1, keepdim=True) - v).clamp_min(0).sqrt())
        vals.append(v)
        idxs.append(j)
    return broadcast(torch.cat(vals)), broadcast(torch.cat(idxs))   # identical on every rank under torchrun


def knn_scores(train, test, k=1, metric="cosine"):
    """kNN OOD score (higher = more in-distribution): the similarity of each test feature to its k-th nearest
    training feature (k = 1: the nearest; cosine similarity, or negative euclidean distance)."""
    return knn(test, train, k, metric)[0][:, -1]


# Class-conditional Gaussians (MCL's SEI, SCAN-OOD's Mahalanobis score)

def fit_gaussians(feats, labels, n_classes, ridge=0.01):
    """One Gaussian per class (labels 0..C-1; MCL Eq. 12, SCAN-OOD's per-cluster Mahalanobis) -> (means C x d,
    Cholesky factors C x d x d), float64. Covariance as np.cov (n - 1), plus ridge x its mean variance on the
    diagonal so that small classes stay invertible."""
    feats = feats.double()
    counts = torch.bincount(labels, minlength=n_classes)
    if counts.min() < 2:
        fail(f"class {int(counts.argmin())} has {int(counts.min())} training images; Gaussians need 2")
    means = torch.zeros(n_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    means.index_add_(0, labels, feats).div_(counts[:, None])
    centred = feats - means[labels]
    covs = torch.stack([centred[labels == c].T @ centred[labels == c] / (counts[c] - 1) for c in range(n_classes)])
    eye = torch.eye(feats.shape[1], dtype=feats.dtype, device=feats.device)
    covs = covs + ridge * covs.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * eye
    return means, torch.linalg.cholesky(covs)


def mahalanobis(feats, means, chol):
    """Squared Mahalanobis distance of every row of feats to every Gaussian -> N x C (float64): |L^-1 (x - mu)|^2
    with Sigma = L L^T, one batched triangular solve per chunk of rows (no inverse is formed)."""
    C, d = means.shape
    step = max(1, 2 ** 22 // (C * d))
    out = []
    for i in range(0, len(feats), step):
        diff = feats[i:i + step].double()[None] - means[:, None]                  # C x n x d
        white = torch.linalg.solve_triangular(chol, diff.transpose(1, 2), upper=False)
        out.append(white.pow(2).sum(1).T)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# OOD metrics

def ood_metrics(score_id, score_ood):
    """AUROC, FPR95, AUPR-In, AUPR-Out in percent. Convention: higher score = more in-distribution.

    - AUROC: area under the ROC curve with in-distribution as the positive class.
    - FPR95: the fraction of OOD samples accepted (score >= threshold) at the first threshold, scanning from
      the highest score down, at which at least 95% of the in-distribution samples are accepted.
    - AUPR-In: average precision with in-distribution positive and the score as is.
    - AUPR-Out: average precision with OOD positive and the score negated."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    s_id = torch.as_tensor(score_id).double().cpu().numpy()
    s_ood = torch.as_tensor(score_ood).double().cpu().numpy()
    s = np.concatenate([s_id, s_ood])
    y = np.concatenate([np.ones(len(s_id)), np.zeros(len(s_ood))])
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"auroc": 100 * roc_auc_score(y, s),
            "fpr95": 100 * fpr[np.searchsorted(tpr, 0.95, side="left")],
            "aupr_in": 100 * average_precision_score(y, s),
            "aupr_out": 100 * average_precision_score(1 - y, -s)}


def cluster_accuracy(pred, labels):
    """Hungarian-matched accuracy in % (SCAN's metric, for information: labels never train anything): clusters
    mapped one-to-one onto classes so that the most images agree; works for as many or more clusters than classes."""
    from scipy.optimize import linear_sum_assignment
    _, p = np.unique(torch.as_tensor(pred).cpu().numpy(), return_inverse=True)
    _, t = np.unique(torch.as_tensor(labels).cpu().numpy(), return_inverse=True)
    counts = np.zeros((p.max() + 1, t.max() + 1))
    np.add.at(counts, (p, t), 1)
    rows, cols = linear_sum_assignment(-counts)
    return 100.0 * counts[rows, cols].sum() / len(p)


def evaluate(score_fn, data):
    """Metrics for every OOD set of `data` (from load_data) -> {ood set: metrics}. score_fn(x) -> scores, higher
    = ID; or -> {score name: scores} (several scores from one pass) -> {score name: {ood set: metrics}}. Only
    data.test_x and data.ood are read, so `data` may hold features computed once per set instead of images."""
    s_id = score_fn(data.test_x)
    s_ood = {ood: score_fn(x) for ood, x in data.ood.items()}
    if isinstance(s_id, dict):
        return {k: {ood: ood_metrics(s_id[k], s[k]) for ood, s in s_ood.items()} for k in s_id}
    return {ood: ood_metrics(s_id, s) for ood, s in s_ood.items()}


def print_results(results, title=""):
    """results {ood set: metrics} -> an aligned table, with the mean row when there are several sets."""
    cols = ["auroc", "fpr95", "aupr_in", "aupr_out"]
    rows = dict(results)
    if len(rows) > 1:
        rows["mean"] = {c: float(np.mean([r[c] for r in results.values()])) for c in cols}
    w = max(10, *(len(n) for n in rows))
    lines = [title] if title else []
    lines.append(f"{'OOD set':<{w}} " + " ".join(f"{c:>8}" for c in cols))
    lines += [f"{n:<{w}} " + " ".join(f"{r[c]:8.2f}" for c in cols) for n, r in rows.items()]
    print("\n".join(lines), flush=True)


def save_results(path, results):
    """Write results (method, config, metrics per OOD set, seconds, device, ...) as JSON, atomically (rank 0)."""
    if rank() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Command line: one parent parser for every script, and presets (--preset paper|quick).

def arg_parser():
    """The flags every script shares; a script adds its own and sets its defaults with set_defaults."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("shared")
    g.add_argument("--preset", default=None, help="a named configuration of the script (paper, quick); flags override it")
    g.add_argument("--dataset", default="digits", help=f"in-distribution data ({DATASET_SPECS})")
    g.add_argument("--id-classes", default=None,
                   help="in-distribution classes, e.g. 0-5, 3, 0-2,4-9 (default: 0-5 on digits, all otherwise)")
    g.add_argument("--ood", nargs="+", default=None, help="OOD sets (specs as --dataset); the held-out classes are always one")
    g.add_argument("--data-root", default="data", help="where data sets are downloaded and decoded folders cached")
    g.add_argument("--size", type=int, default=32, help="image side; other sizes are resized once at load time")
    g.add_argument("--subset", type=int, default=0, help="train on a random subset of N images (quick runs)")
    g.add_argument("--arch", default="resnet18", help=f"{', '.join(CIFAR_ARCHS)} (CIFAR-style) or {', '.join(IMAGENET_ARCHS)}")
    g.add_argument("--width", type=int, default=16, help="CIFAR ResNet width (64 = standard; 16 for quick CPU runs)")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--final-lr", type=float, default=0.0, help="cosine schedule ends here")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear learning-rate warm-up")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "lars", "adam"])
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--grad-clip", type=float, default=float("inf"), help="clip the gradient norm (always checked for NaN)")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="auto: bf16 on CUDA, off on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="run folder (checkpoint, results.json); default runs/<script>-<dataset>")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every N epochs (and at the end)")
    return p


def parse_args(parser, presets=None, argv=None):
    """Parse with `--preset NAME` applied beneath the command line: preset values replace the defaults, flags
    given explicitly win. Prints the resolved configuration with where each value came from; args.sources
    records it ({key: 'default' | 'preset NAME' | 'command line'})."""
    presets = presets or {}
    argv = sys.argv[1:] if argv is None else argv
    name = parser.parse_known_args(argv)[0].preset
    if name is not None and name not in presets:
        fail(f"unknown --preset '{name}' (known: {', '.join(presets) or 'none'})")
    preset = presets.get(name, {})
    known = {a.dest for a in parser._actions}
    unknown = [k for k in preset if k not in known]
    if unknown:
        raise ValueError(f"preset {name} names unknown arguments: {unknown}")  # a bug in the script, not user input
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    # Which flags were typed: parse again with every default suppressed, then put the defaults back.
    saved = [(a, a.default) for a in parser._actions], dict(parser._defaults)
    for a in parser._actions:
        a.default = argparse.SUPPRESS
    parser._defaults.clear()
    try:
        typed = set(vars(parser.parse_known_args(argv)[0]))
    finally:
        for a, d in saved[0]:
            a.default = d
        parser._defaults.update(saved[1])
    args.sources = {k: "command line" if k in typed else (f"preset {name}" if k in preset else "default")
                    for k in vars(args) if k != "sources"}
    return args


def print_config(args):
    print("configuration (value  <- source):")
    for k, v in vars(args).items():
        if k != "sources":
            print(f"  {k:<18} {v!s:<24} <- {args.sources.get(k, 'default')}")


def setup(args, script):
    """The start of every script's main(): process group under torchrun, seed, device, run folder, config
    printout -> device. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) this joins the process group (nccl on
    CUDA, gloo on CPU), puts each rank on its own GPU and silences print on every rank but 0."""
    device = get_device(args.device)
    if "RANK" in os.environ and not distributed():
        import builtins
        import datetime
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
        if args.batch_size % world_size():
            fail(f"--batch-size {args.batch_size} (the global batch) is not divisible by {world_size()} processes")
        if rank() != 0:
            builtins.print = lambda *a, **k: None
    seed_everything(args.seed + rank())   # each rank its own augmentation draws (train's shuffle is common to all)
    args.out = args.out or os.path.join("runs", f"{script}-{args.dataset.replace(':', '_').replace('/', '_')}")
    os.makedirs(args.out, exist_ok=True)
    print_config(args)
    print(f"device {device}, run folder {args.out}" + (f", {world_size()} processes" if distributed() else ""), flush=True)
    return device


if __name__ == "__main__":
    # Self-check on the embedded data: load, augment, one short SimCLR epoch, kNN score, metrics.
    parser = argparse.ArgumentParser(parents=[arg_parser()])
    parser.set_defaults(epochs=1, subset=256)
    args = parse_args(parser)
    device = setup(args, "common")
    data = load_data(args)
    print(f"train {tuple(data.train_x.shape)}, test {tuple(data.test_x.shape)}, OOD {[(k, len(v)) for k, v in data.ood.items()]}")
    model = Encoder(args.arch, width=args.width).to(device)
    aug = SimCLRAugment(args.size)
    x = data.train_x.to(device)
    train(model, lambda net, xb, idx, ep: nt_xent(net(torch.cat([aug(xb), aug(xb)]))[1]), x, args,
          os.path.join(args.out, "checkpoint.pt"))
    train_h = embed(model, x)[0]
    results = evaluate(lambda t: knn_scores(train_h, embed(model, t.to(device))[0]), data)
    print_results(results, "SimCLR, 1 epoch, kNN on h")
