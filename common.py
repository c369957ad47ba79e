"""The shared module of the four OOD-detection scripts (ccl.py, mcl.py, oecl.py, scan_ood.py), in two halves.

BUILDING BLOCKS (top): tensors in, tensors out, ordinary exceptions (ValueError, ...) for bad arguments; copy any
of them into your own code without the rest. Sections: augmentation -> backbones -> shared losses -> training loop
(the step contract, checkpoints, resume) -> K-means and kNN -> Gaussians -> OOD metrics and the decision threshold.
HARNESS (below the `HARNESS` banner): what the scripts need beyond that: data specs and caches, command line and
presets, the run folder, torchrun, reporting. Nothing above the banner uses anything below it.

    python common.py        # self-check: loads digits, trains SimCLR 1 epoch on 256 images, prints the metrics

Conventions used everywhere:
- images travel as uint8 tensors N x 3 x H x W and stay on the device; augmentations return floats in [0, 1];
  the Encoder normalises its input itself, so no script can forget to.
- a contrastive batch is z = cat([view1, view2]): row i and row i + N are the two views of one image.
- OOD scores: higher = more in-distribution.
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
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Augmentation: batched, every sample its own random parameters, drawn on the batch's device.

def to_float(x):
    """uint8 [0, 255] -> float [0, 1]; floats pass through."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def rotate90(x, k):
    """Rotate a batch of square images by k * 90 degrees counter-clockwise; k an int, or a tensor with one k per
    sample. Per-sample k picks from the four rotations of the whole batch with one gather: no boolean-mask
    indexing, so no host sync on a GPU."""
    if not torch.is_tensor(k):
        return torch.rot90(x, int(k) % 4, dims=(2, 3))
    all4 = torch.stack([torch.rot90(x, r, dims=(2, 3)) for r in range(4)])           # 4 x B x C x H x W
    return all4[k % 4, torch.arange(len(x), device=x.device)]


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
    k = torch.cat([h6 + 5, h6 + 3, h6 + 1], 1).remainder_(6)    # no tensor from Python data: no host-to-device copy
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
        # every random number of the batch in one draw (one launch), then handed out column by column
        u = torch.rand(1 if same_for_batch else B, 31, device=dev, generator=generator).expand(B, 31)
        x = self.crop_flip(x, u[:, 0:10], u[:, 10:20], u[:, 20:22], u[:, 22])
        j = self.jitter
        if j > 0 and self.p_jitter > 0:
            on = (u[:, 23] < self.p_jitter).float()                      # off: factors 1 and shift 0 (identity)
            f = 1 + on[:, None] * j * (2 * u[:, 24:27] - 1)               # brightness, contrast, saturation
            x = color_jitter(x, f[:, 0], f[:, 1], f[:, 2], on * (j / 4) * (2 * u[:, 27] - 1))
        if self.p_gray > 0:
            x = torch.where((u[:, 28] < self.p_gray)[:, None, None, None], grayscale(x).expand_as(x), x)
        if self.blur:
            x = self.gaussian_blur(x, u[:, 29] < 0.5, 0.1 + 1.9 * u[:, 30])
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


# ambiguity: none of the papers trains on digits, and their CIFAR augmentation has one step that turns a digit
# into another: the horizontal flip (a mirrored 2 is a 5-like shape, a mirrored 3 an E). Measured with SimCLR on
# digits (kNN on the embedding layer, 20 epochs, seeds 0-1, odd digits in and 4-9 in), only the flip had to go:
# without colour jitter, or with crops of at least 60% or 80% of the image, training fell below its own untrained
# encoder on one split or both; with the flip removed it cleared it on both. On grey digits the jitter is a
# brightness and contrast jitter (saturation, hue and grayscale leave grey pixels as they are), which keeps the
# network from separating digits by their ink level. See the README for the table.
DIGITS_AUGMENT = dict(scale=(0.2, 1.0), flip=False, jitter=0.4, p_jitter=0.8, p_gray=0.0, blur=True)


# ----------------------------------------------------------------------------------------------
# Backbones: CIFAR ResNets (3x3 stem, no max-pool) with a width knob, torchvision ImageNet ResNets;
# the Encoder = backbone + projection head.

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
    """ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, global average pool. width 64 = standard.

    init 'pytorch' keeps PyTorch's default convolution initialisation (kaiming-uniform with a = sqrt(5): weight
    std 1 / sqrt(3 fan_in)); 'torchvision' is torchvision's ResNet initialisation (kaiming-normal, fan_out, ReLU
    gain: std sqrt(2 / fan_out), about 2.5 x larger), which most public contrastive code inherits."""

    def __init__(self, block, layers, width=64, init="pytorch"):
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
        if init == "torchvision":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif init != "pytorch":
            raise ValueError(f"--init {init}: expected pytorch or torchvision")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def build_backbone(arch, width=64, weights=None, init="pytorch"):
    """-> (network returning pooled features, feature dim). weights (torchvision archs only): None for random,
    'torchvision' for the ImageNet weights (downloaded once by torchvision), or a path to a state dict."""
    if arch in CIFAR_ARCHS:
        if weights:
            raise ValueError(f"--weights applies to the torchvision archs ({', '.join(IMAGENET_ARCHS)}), not {arch}")
        block, layers = CIFAR_ARCHS[arch]
        net = CifarResNet(block, layers, width, init)
        return net, net.out_dim
    if arch in IMAGENET_ARCHS:
        import torchvision
        name = arch[len("imagenet_"):]
        net = getattr(torchvision.models, name)(weights=None)
        if weights == "torchvision":
            try:
                net = getattr(torchvision.models, name)(weights="DEFAULT")
            except Exception as e:
                raise ValueError(f"could not load torchvision's {name} weights ({type(e).__name__}); give "
                                 f"--weights PATH to a local state dict (or --weights random, for testing only)")
        elif weights and weights != "random":
            load_weights(net, weights)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    raise ValueError(f"unknown arch '{arch}' (known: {', '.join(CIFAR_ARCHS)}, {', '.join(IMAGENET_ARCHS)})")


class Encoder(nn.Module):
    """Backbone F and MLP projection head G: forward(x) -> (h, z), h the embedding-layer feature (after global
    pooling), z the projection-layer output (not normalised). x is a float batch in [0, 1]: normalised here."""

    def __init__(self, arch="resnet18", proj_dim=128, proj_hidden=None, bn_in_head=False, width=64, weights=None,
                 init="pytorch"):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(arch, width, weights, init)
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


def load_plain(path, what="weights file", map_location="cpu"):
    """torch.load(path) with weights_only=True: tensors, dicts, lists, strings and numbers only, so that reading a
    file from elsewhere never runs code (a pickle can). ValueError naming the file when it is unreadable, or when
    it holds other Python objects (with the way to convert a trusted one)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except Exception as e:
        if "global" in str(e).lower():                  # the safe unpickler refused a Python object
            raise ValueError(f"{path} is not a plain {what}: it holds Python objects that loading would have to run, "
                             f"so it is refused; if you trust it, load it yourself (torch.load(path, "
                             f"weights_only set to False) and torch.save its state_dict()") from None
        raise ValueError(f"{path} is not a readable {what} ({type(e).__name__})") from None


def load_weights(model, source):
    """Strict load of a state dict (or checkpoint with 'model') from a path (load_plain) or dict; strips the
    'module.' prefix of DataParallel/DDP and torch.compile's '_orig_mod.'; a mismatch raises ValueError naming the
    keys."""
    sd = load_plain(source) if isinstance(source, str) else source
    if not isinstance(sd, dict):
        raise ValueError(f"{source if isinstance(source, str) else 'the weights'} holds no state dict")
    sd = sd.get("model", sd)
    sd = {k.replace("module.", "", 1).replace("_orig_mod.", "") if k.startswith(("module.", "_orig_mod.")) else k: v
          for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(sd, strict=True)
    return model


# ----------------------------------------------------------------------------------------------
# Losses shared by several methods. Each runs in float32 whatever the autocast dtype (the float32 decorator below
# switches autocast off inside): logits / tau with tau = 0.1 reach 10, and bf16's 8-bit mantissa would round
# the cosines the loss is made of.
# Under torchrun every rank gathers the views of all ranks and computes the loss of the global batch; the
# all_gather backward sums each rank's gradient and DDP averages over ranks, so G GPUs with a global batch B
# compute exactly the loss and gradients of one GPU with batch B.

def float32(loss_fn):
    """Decorator for every loss: run it in float32 whatever the surrounding autocast. A `.float()` inside an autocast
    region does not leave it (the next matmul is cast back to bf16), so the region itself is switched off here, and
    floating-point tensor arguments are cast to float32 (their gradients flow back in their own dtype)."""
    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        cast = lambda v: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
        args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)), "cpu")
        with torch.autocast(device, enabled=False):
            return loss_fn(*args, **kwargs)
    return wrapper


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


@float32
def nt_xent(z, tau=0.5):
    """SimCLR's NT-Xent: z = cat([view1, view2]) (2N x d); each view's positive is the other view of its
    image, its negatives the other 2N - 2 views; the mean over all 2N anchors."""
    z1, z2 = z.chunk(2)
    z = F.normalize(torch.cat([all_gather(z1), all_gather(z2)]), dim=1)
    n = len(z) // 2
    logits = (z @ z.T / tau).fill_diagonal_(float("-inf"))                     # never contrast a view with itself
    target = torch.arange(2 * n, device=z.device).roll(n)                      # i <-> i + N
    return F.cross_entropy(logits, target)


# ----------------------------------------------------------------------------------------------
# Training loop: optimisers, schedule, AMP, the step contract, a loop without host syncs per step,
# atomic checkpoints that know their run, exact resume.

class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al.): each parameter w with gradient g steps along
    d = (g + wd w) eta ||w|| / (||g|| + wd ||w|| + eps) (factor 1 where ||w|| or ||g|| is 0), then momentum and lr
    as plain SGD. scope 'all' adapts every parameter, as torchlars (CSI's LARS, which CCL follows); 'weights'
    gives the 1-d parameters (BatchNorm, biases) plain SGD without weight decay, as solo-learn. One fused update per
    group of tensors (torch._foreach_*): the launches per step do not grow with a Python loop over the parameters,
    and the momentum buffers are made once."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, eta=0.001, eps=1e-8, scope="all"):
        if lr < 0:
            raise ValueError(f"LARS needs lr >= 0, got {lr}")
        if scope not in ("all", "weights"):
            raise ValueError(f"LARS scope {scope!r}: expected 'all' (torchlars) or 'weights' (solo-learn)")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps))
        self.scope = scope

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            for p in params:
                if "momentum" not in self.state[p]:                 # once, on the first step
                    self.state[p]["momentum"] = torch.zeros_like(p)
            adapt = [p for p in params if self.scope == "all" or p.ndim > 1]
            d = {p: p.grad for p in params}
            if adapt:     # every layer's trust ratio in one vector: a handful of launches, whatever the depth
                w_norm = torch.stack(torch._foreach_norm(adapt))
                g_norm = torch.stack(torch._foreach_norm([p.grad for p in adapt]))
                trust = torch.where((w_norm > 0) & (g_norm > 0),
                                    g["eta"] * w_norm / (g_norm + g["weight_decay"] * w_norm + g["eps"]),
                                    torch.ones_like(w_norm))
                grads = torch._foreach_add([p.grad for p in adapt], adapt, alpha=g["weight_decay"])
                torch._foreach_mul_(grads, list(trust.unbind()))
                d.update(zip(adapt, grads))
            bufs = [self.state[p]["momentum"] for p in params]
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, [d[p] for p in params])
            torch._foreach_add_(params, bufs, alpha=-g["lr"])


def make_optimizer(params, cfg):
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov, foreach=True)
    if cfg.optimizer == "lars":
        return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, scope=cfg.lars_scope)
    if cfg.optimizer == "adam":
        # fused: one kernel, and no step counter read on the host per parameter (foreach Adam's .item())
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                fused=params[0].device.type in ("cuda", "cpu"))
    raise ValueError(f"--optimizer {cfg.optimizer}: expected sgd, lars or adam")


def lr_at(step, total, base, warmup=0, final=0.0):
    """Linear warm-up over `warmup` steps, then cosine from base to final (per step, so resume needs no state)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def autocast(amp, device):
    """bf16 autocast on CUDA by default ('auto'); off on CPU/MPS (CPU autocast is slower than fp32 for these nets)."""
    mode = amp if amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    if mode == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


@dataclasses.dataclass
class TrainConfig:
    """What common.train needs, and nothing of any method: built from the command line in one place per stage
    (TrainConfig.from_args), so a stage with its own optimiser says so explicitly with overrides."""
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    lars_scope: str = "all"
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    final_lr: float = 0.0
    amp: str = "auto"
    compile: bool = False
    grad_clip: float = float("inf")
    save_every: int = 10
    seed: int = 0
    checkpoint: str = "checkpoint.pt"
    resume: bool = False
    run: dict = dataclasses.field(default_factory=lambda: {"script": "", "settings": {}})   # filled by setup()

    @classmethod
    def from_args(cls, args, checkpoint, **overrides):
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in vars(args).items() if k in names}
        return cls(**{**values, "checkpoint": checkpoint, **overrides})


def simclr_step(net, xb, aug, tau=0.5):
    """SimCLR's training step (Eq. 1 of every paper here): two augmented views of the batch, NT-Xent on z. Both
    views come from one call of the augmentation (each sample draws its own parameters): half the launches."""
    _, z = net(aug(torch.cat([xb, xb])))             # 2B x d: row i and i + B are the views of image i
    return nt_xent(z, tau)


def write_atomic(path, write):
    """write(temporary path), then rename the file over `path`: a kill mid-write never leaves a broken file. The
    temporary file is `<path>.tmp<pid>`; a failed write removes it and raises OSError naming `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:        # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(f"cannot write {path} ({getattr(e, 'strerror', None) or e})") from e


def save_atomic(obj, path):
    """torch.save(obj, path) through write_atomic."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path, device="cpu"):
    """A checkpoint of train() (load_plain: never runs code); ValueError naming the file when it is truncated,
    empty, holds Python objects or is not a checkpoint of train()."""
    try:
        c = load_plain(path, "checkpoint", device)
    except ValueError as e:
        raise ValueError(f"{e}; move it away or start the run again with --overwrite") from None
    if not isinstance(c, dict) or not {"model", "epoch", "run"} <= set(c):
        raise ValueError(f"{path} is not a checkpoint of these scripts (no model / epoch / run entries)")
    return c


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


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["cpu"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def finite(model):
    """One device flag: every parameter and buffer of the model finite (no host sync until it is read)."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def all_ranks_agree(flag):
    """flag (a 0-d bool tensor on the device) and-ed over all ranks, read once: every rank takes the same branch."""
    flag = flag.to(torch.int32)
    if distributed():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


def resume_from(path):
    """Whether to resume from `path`: decided by rank 0 and shared, so ranks without a shared disk agree."""
    exists = torch.tensor(int(os.path.exists(path)))
    if distributed():
        exists = exists.to(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
        torch.distributed.broadcast(exists, 0)
    return bool(exists)


def train(model, step, x, cfg):
    """Train `model` on the images `x` (uint8, kept on the device) for cfg.epochs epochs; returns the model.

    step(net, xb, idx, epoch) -> loss, or (loss, {name: tensor}) for the epoch log; net is the (compiled, DDP)
    model, xb the uint8 batch, idx its rows of x (for per-image state such as cluster assignments). A step may
    have update(model, epoch), called with the plain model before every epoch (re-clustering, schedules), and
    state_dict() / load_state_dict(d), saved in the checkpoint and restored on resume.

    The loop makes no host sync of its own per step: losses are summed on the device and non-finite values
    flagged there; the flags are read once per epoch. Before every save every parameter and buffer is checked,
    so a diverged run never replaces the last good checkpoint; it stops with one line naming it. Checkpoints
    (atomic) record cfg.run, the script and settings that made the weights; resuming one of another run is
    refused. Under torchrun: DDP with SyncBatchNorm on GPUs, cfg.batch_size is the global batch, each rank takes
    its contiguous share of every batch of one shuffle common to all ranks; rank 0 alone writes checkpoints."""
    device = x.device
    opt = make_optimizer(model.parameters(), cfg)
    scaler = torch.amp.GradScaler(enabled=cfg.amp == "fp16")
    start = 0
    if cfg.resume and resume_from(cfg.checkpoint):
        c = load_checkpoint(cfg.checkpoint, device)
        compare_runs(c["run"], cfg.run, cfg.checkpoint)
        load_weights(model, c["model"])
        opt.load_state_dict(c["optimizer"])
        if hasattr(step, "load_state_dict"):
            step.load_state_dict(c["step"])
        set_rng_state(c["rng"])
        if distributed():   # the checkpoint holds rank 0's RNG: give the other ranks their own streams again
            torch.manual_seed(int(torch.randint(2 ** 62, (1,))) + rank())
        start = c["epoch"]
        if start > cfg.epochs:
            raise ValueError(f"{cfg.checkpoint} has done {start} epochs, more than the {cfg.epochs} asked for now: "
                             f"give a larger --epochs")
        print(f"resumed {cfg.checkpoint} at epoch {start} of {cfg.epochs}")
    if device.type == "cuda":   # the weights in the input's layout: no layout copy per convolution
        model = model.to(memory_format=torch.channels_last)
    net = model
    if distributed():   # global BatchNorm as the official code (SyncBatchNorm exists on GPUs only)
        sync_bn = device.type == "cuda"
        if sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=not sync_bn)
    net = torch.compile(net) if cfg.compile else net
    steps_per_epoch = len(x) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(x)} images)")
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    t_start, n_seen = time.time(), 0
    for epoch in range(start, cfg.epochs):
        model.train()
        if hasattr(step, "update"):
            step.update(model, epoch)
        t0, sums = time.time(), {}
        ok = torch.ones((), dtype=torch.bool, device=device)   # every loss and gradient of the epoch finite
        # the shuffle of an epoch depends on (seed, epoch) alone: the same on every rank, and after a resume
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).to(device)
        for it in range(steps_per_epoch):
            lr = lr_at(epoch * steps_per_epoch + it, total, cfg.lr, warmup, cfg.final_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[it * cfg.batch_size:(it + 1) * cfg.batch_size].chunk(world_size())[rank()]  # this rank's share
            with autocast(cfg.amp, device):
                out = step(net, x[idx], idx, epoch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
            ok &= torch.isfinite(loss.detach())
            if not scaler.is_enabled():   # under fp16 an inf gradient is an overflow the scaler skips, not a failure
                ok &= torch.isfinite(gnorm)
            scaler.step(opt)
            scaler.update()
            for k, v in {"loss": loss, **logs}.items():   # summed on the device: no sync per step
                sums[k] = sums.get(k, 0) + torch.as_tensor(v).detach().float()
        done = epoch + 1
        if not all_ranks_agree(ok & finite(model)):   # once per epoch, before anything is saved
            kept = f"the last good checkpoint is {cfg.checkpoint}" if os.path.exists(cfg.checkpoint) else \
                "no checkpoint was written yet"
            raise FloatingPointError(f"training diverged in epoch {done} (a non-finite loss, gradient, weight or "
                                     f"BatchNorm statistic); {kept}; try a lower --lr or --amp off")
        n_seen += steps_per_epoch * cfg.batch_size
        speed = n_seen / (time.time() - t_start)
        eta = (cfg.epochs - done) * steps_per_epoch * cfg.batch_size / speed
        logs = " ".join(f"{k} {float(v) / steps_per_epoch:.4f}" for k, v in sums.items())
        print(f"epoch {done}/{cfg.epochs} {logs} lr {lr:.4g} | {speed:.0f} img/s, "
              f"{time.time() - t0:.1f}s/epoch, eta {fmt_time(eta)}", flush=True)
        if (done % cfg.save_every == 0 or done == cfg.epochs) and rank() == 0:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "step": step.state_dict() if hasattr(step, "state_dict") else {},
                         "rng": rng_state(), "epoch": done, "run": cfg.run}, cfg.checkpoint)
    return model.to(memory_format=torch.contiguous_format)


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
    """Greedy k-means++ (as scikit-learn): each new centre is the best of n_trials candidates drawn with
    probability proportional to the squared distance to the nearest centre chosen so far.

    ambiguity (how many candidates): scikit-learn draws 2 + ln k. On 10 Gaussian blobs that seeding leaves two
    centres in one blob in 40% of the seeds (ours with 2 + ln k: 81 of 200 seeds, scikit-learn's: 80 of 200; with
    the same random draws our picks equal a literal loop). Twice as many candidates (8 for k = 10) cut that to 10%
    (21 of 200) for k more distance rows, so we draw 2 (2 + ln k)."""
    n_trials = 2 * (2 + int(math.log(k)))
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
        raise ValueError(f"K-means with k={k} needs at least k points, got {len(x)}")
    x = x.float()
    if not torch.isfinite(x).all():             # a diverged model's features: say so rather than fail inside
        raise FloatingPointError("K-means got non-finite features: the model has diverged; try a lower --lr")
    if metric == "cosine":
        x = F.normalize(x, dim=1)
    elif metric != "euclidean":
        raise ValueError(f"unknown metric '{metric}' (euclidean, cosine)")
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
        raise ValueError(f"kNN with k={k} needs at least k reference points, got {len(ref)}")
    query, ref = query.float(), ref.float()
    if metric == "cosine":
        query, ref = F.normalize(query, dim=1), F.normalize(ref, dim=1)
    elif metric != "euclidean":
        raise ValueError(f"unknown metric '{metric}' (euclidean, cosine)")
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


# ----------------------------------------------------------------------------------------------
# Class-conditional Gaussians (MCL's SEI, SCAN-OOD's Mahalanobis score).

def fit_gaussians(feats, labels, n_classes, ridge=0.01):
    """One Gaussian per class (labels 0..C-1; MCL Eq. 12, SCAN-OOD's per-cluster Mahalanobis) -> (means C x d,
    Cholesky factors C x d x d), float64. Covariance as np.cov (n - 1), plus ridge x its mean variance on the
    diagonal so that small classes stay invertible."""
    feats = feats.double()
    counts = torch.bincount(labels, minlength=n_classes)
    if counts.min() < 2:
        raise ValueError(f"class {int(counts.argmin())} has {int(counts.min())} training images; Gaussians need 2")
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
# OOD metrics, and the threshold that turns a score into a decision.

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


def threshold_at(score_id, tpr=0.95):
    """The decision threshold: the highest t that accepts (score >= t) at least a fraction `tpr` of the given
    in-distribution scores (FPR95's threshold for tpr = 0.95). An image whose score is below t is declared OOD."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr {tpr}: expected a fraction in (0, 1]")
    s = torch.as_tensor(score_id).double().flatten().sort(descending=True).values
    if len(s) == 0:
        raise ValueError("threshold_at needs at least one in-distribution score")
    return float(s[math.ceil(round(tpr * len(s), 9)) - 1])


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


def evaluate(score_fn, test, ood):
    """Metrics for every OOD set: score_fn(t) -> scores (higher = in-distribution) -> {ood set: metrics}; or
    score_fn(t) -> {score name: scores} (several scores from one pass) -> {score name: {ood set: metrics}}.
    test: the in-distribution test images or their features; ood: {name: images or features}."""
    s_id = score_fn(test)
    s_ood = {name: score_fn(x) for name, x in ood.items()}
    if isinstance(s_id, dict):
        return {k: {name: ood_metrics(s_id[k], s[k]) for name, s in s_ood.items()} for k in s_id}
    return {name: ood_metrics(s_id, s) for name, s in s_ood.items()}



# ==============================================================================================
# HARNESS: what the scripts need beyond the building blocks (data specs and caches, command line,
# presets, run folder, checkpoints on disk, torchrun, reporting). Nothing above this line uses anything below it;
# a reader copies the part above (or a piece of it) without this half.
# ==============================================================================================


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


def _decode(path):
    from PIL import Image
    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    except Exception:
        raise ValueError(f"image will not decode: {path}")


def class_folders(path):
    """The class folders of an ImageFolder tree, sorted as numbers where every name is one (2 before 10), else as
    text: the class list of a data set, fixed by its training folders."""
    names = [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
    return sorted(names, key=int) if all(n.isdigit() for n in names) else sorted(names)


def _image_files(path, classes=None):
    """[(file, class index or -1)] of an ImageFolder tree PATH/<class>/<image> (indices into `classes`, by default
    PATH's own class folders) or of a flat folder of images (-1: unlabeled)."""
    found = class_folders(path)
    classes = found if classes is None else classes
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{path} has class folders that the training folder lacks: {', '.join(unknown[:5])}; "
                         f"the classes are {', '.join(classes[:10])}{'...' if len(classes) > 10 else ''}")
    if found:
        files = [(os.path.join(path, c, f), classes.index(c)) for c in classes if c in found
                 for f in sorted(os.listdir(os.path.join(path, c))) if f.lower().endswith(IMG_EXTENSIONS)]
    else:
        files = [(os.path.join(path, f), -1) for f in sorted(os.listdir(path)) if f.lower().endswith(IMG_EXTENSIONS)]
    return files, classes


def _load_folder(path, train, size, cache_dir, need_split=False):
    """ImageFolder layout PATH/<class>/<image>, or a flat folder of images (unlabeled, y = -1). If PATH has train/
    and test/, `train` picks one, and the class list (the labels) of both is train/'s; need_split (the
    in-distribution data set) refuses a folder without them, since its test images would otherwise be its training
    images. Decoded once, then cached as a tensor file whose name is a hash of every file's path, size and
    modification time (so adding, removing or changing an image re-decodes). -> x, y, classes, names (each image's
    path inside the split folder)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data folder not found: {path}")
    classes = None
    if os.path.isdir(os.path.join(path, "train")) and os.path.isdir(os.path.join(path, "test")):
        classes = class_folders(os.path.join(path, "train"))
        path = os.path.join(path, "train" if train else "test")
    elif need_split:
        raise ValueError(f"folder:{path} has no train/ and test/ subfolders: the test images would be the training "
                         f"images; split it into {path}/train/ and {path}/test/ (class folders inside are optional)")
    files, classes = _image_files(path, classes)
    if not files:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {path}")
    names = [os.path.relpath(f, path) for f, _ in files]
    h = hashlib.sha1(f"{os.path.abspath(path)}|{size}|{classes}".encode())
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
            print(f"the cache {cache} is unreadable: decoding {path} again", flush=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # PIL's decoders release the GIL
        imgs = list(pool.map(lambda f: resize_uint8(_decode(f[0])[None], size)[0], files, chunksize=256))
    x, y = torch.stack(imgs), torch.tensor([f[1] for f in files]).long()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        save_atomic({"x": x, "y": y, "classes": classes}, cache)
    except OSError as e:                      # a read-only data root still works, only without a cache
        print(f"note: decoded {path} without caching it ({e.strerror or e})", flush=True)
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
    return f"{f}|{st.st_size}|{st.st_mtime_ns}|".encode() + hashlib.sha1(head + tail).digest()


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


def load_dataset(spec, train=True, root="data", download=True, size=32, need_split=False, names=False):
    """Load a data set by spec (see DATASET_SPECS) -> (x uint8 N x 3 x size x size, y int64 (-1 unlabeled), classes),
    and with names=True a fourth item: each image's name (its path inside a folder, else its row index).

    Images of another size are resized to `size` once, here. Decoded folders are cached under `root`; need_split:
    see _load_folder."""
    if spec.startswith("folder:") or spec in ODIN_SETS:
        folder = spec[len("folder:"):] if spec.startswith("folder:") else _load_odin(spec, root, download)
        x, y, classes, files = _load_folder(folder, train, size, os.path.join(root, "cache"), need_split)
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


def parse_classes(text):
    """'0-5' -> [0..5]; '3' -> [3]; '0-2,4-9' -> [0,1,2,4,...,9]. Anything else ends the run naming the flag."""
    ids = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not (lo.isdigit() and (hi.isdigit() if dash else True)) or (dash and int(hi) < int(lo)):
            raise ValueError(f"--id-classes {text!r}: expected class ids or ascending ranges, e.g. 0-5, 3 or 0-2,4-9")
        ids += list(range(int(lo), int(hi if dash else lo) + 1))
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


def select_classes(x, y, ids):
    """Keep the images whose label is in ids (labels are kept as they are)."""
    keep = torch.isin(y, torch.as_tensor(ids, dtype=y.dtype))
    return x[keep], y[keep]


def load_data(args):
    """The run's data from the shared flags: train/test images of the in-distribution classes and the OOD sets.

    With a proper subset of classes (the default on digits: 0-5), the test images of the other classes are an
    OOD set; with all classes in-distribution (or unlabeled data) the OOD sets are --ood (default for cifar10: svhn,
    cifar100, interp:cifar10). An OOD set whose images are mostly in-distribution images of the run is refused.
    Returns a namespace: train_x, train_y, test_x, test_y, test_names, ood {name: x}, ood_y {name: labels} (the
    held-out classes only), ood_names {name: each image's name}, classes, id_classes ([] for unlabeled data)."""
    load = lambda spec, train, split=False: load_dataset(spec, train, args.data_root, True, args.size, split, True)
    with rank0_first():   # under torchrun rank 0 downloads and decodes; the others then read its files and cache
        train_x, train_y, classes, _ = load(args.dataset, True, True)
        test_x, test_y, _, test_names = load(args.dataset, False, True)
    labeled = bool(len(train_y)) and bool(train_y.min() >= 0)
    n_classes = (len(classes) or int(train_y.max()) + 1) if labeled else 0
    if not labeled and args.id_classes:
        raise ValueError(f"{args.dataset} has no class folders or labels, so --id-classes cannot select from it")
    ids = parse_classes(args.id_classes or default_id_classes(args.dataset, n_classes)) if labeled else []
    if ids and ids[-1] >= n_classes:
        raise ValueError(f"--id-classes {format_classes(ids)} out of range: {args.dataset} has classes "
                         f"0-{n_classes - 1}")
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
    empty = [f"class {classes[c] if classes else c}" for c in ids if not (train_y == c).any()]
    if empty or not len(train_x) or not len(test_x):
        raise ValueError(f"{args.dataset}: no {'training' if empty or not len(train_x) else 'test'} images for "
                         f"{', '.join(empty) or 'the in-distribution classes'} (an empty class folder?)")
    specs = args.ood if args.ood is not None else (["svhn", "cifar100", "interp:cifar10"]
                                                   if args.dataset == "cifar10" and not ood else [])
    with rank0_first():
        for spec in specs:
            ood[spec], _, _, ood_names[spec] = load(spec, False)
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


def refuse_ood_sets_of_id_images(ood, specs, id_x, most=0.01):
    """An --ood set in which more than `most` of the images are pixel for pixel in-distribution images of the run
    (--ood digits on digits, the ID folder itself) would report AUROC ~50 for a wrong reason: ValueError naming it.
    A few identical images (public sets share some) are only reported."""
    digest = lambda img: hashlib.blake2b(img.numpy().tobytes(), digest_size=16).digest()
    id_digests = {digest(img) for img in id_x.cpu()}
    for spec in specs:
        same = sum(digest(img) in id_digests for img in ood[spec].cpu())
        if same > most * len(ood[spec]):
            raise ValueError(f"--ood {spec}: {same} of its {len(ood[spec])} images are in-distribution images of this "
                             f"run (the same pixels); give an OOD set without them")
        if same:
            print(f"note: {same} of the {len(ood[spec])} images of --ood {spec} are also in-distribution images",
                  flush=True)


def simclr_augment(args, **paper):
    """The training augmentation for the run's data, chosen here once for every script: `paper` (the method's
    SimCLRAugment arguments) on natural images and under --preset paper, DIGITS_AUGMENT on digits
    (--augment auto|paper|digits overrides)."""
    kind = args.augment
    if kind == "auto":
        kind = "digits" if args.dataset == "digits" and args.preset != "paper" else "paper"
    return SimCLRAugment(args.size, **(DIGITS_AUGMENT if kind == "digits" else paper))


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
    g.add_argument("--size", type=int, default=32, help="image side; other sizes are resized once at load time")
    g.add_argument("--subset", type=int, default=0, help="train on a random subset of N images (quick runs)")
    g.add_argument("--augment", default="auto", choices=["auto", "paper", "digits"],
                   help="training augmentation: the paper's, or one that keeps digits digits (auto: digits on the "
                        "digits data set unless --preset paper, the paper's otherwise)")
    g.add_argument("--arch", default="resnet18", help=f"{', '.join(CIFAR_ARCHS)} (CIFAR-style) or {', '.join(IMAGENET_ARCHS)}")
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
                   help="the decision threshold accepts this share of the in-distribution test images")
    g.add_argument("--score", nargs="+", action="extend", default=None, metavar="SPEC",
                   help="no training: score these images (specs as --dataset) with the finished run in --out, one "
                        "CSV per set in <out>/scored/")
    return p


# The defaults of the scripts' parsers are their digits settings (16 px, narrow networks: a CPU minute); on any
# other data these apply instead, beneath a preset and the command line: the papers' image side and ResNet width.
OTHER_DATA_DEFAULTS = {"size": 32, "width": 64}


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
    return parse_classes(args.id_classes or default_id_classes(args.dataset, n)) if n else []


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
        check(getattr(args, "sources", {}).get("tpr") != "command line", "--tpr", args.tpr,
              "no --tpr with --score: the run's thresholds apply, set on its ID test images when it trained")
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
        ids = parse_classes(text)
        check(ids[-1] < n, "--id-classes", text, f"classes of {args.dataset}: 0-{n - 1}")
        if resolve:
            args.id_classes = format_classes(ids)
    check(args.size >= 8, "--size", args.size, "an integer >= 8")
    check(args.subset >= 0, "--subset", args.subset, "an integer >= 0 (0: every training image)")
    check(args.subset == 0 or args.subset >= 2, "--subset", args.subset, "0 or at least 2 images")
    check(args.width >= 1, "--width", args.width, "an integer >= 1")
    check(args.epochs >= 1, "--epochs", args.epochs, "an integer >= 1")
    check(args.batch_size >= 2, "--batch-size", args.batch_size, "an integer >= 2 (two images to contrast)")
    check(args.lr > 0 and math.isfinite(args.lr), "--lr", args.lr, "a finite number > 0")
    check(0 <= args.final_lr <= args.lr, "--final-lr", args.final_lr, f"a number in [0, --lr {args.lr}]")
    check(args.warmup_epochs >= 0, "--warmup-epochs", args.warmup_epochs, "an integer >= 0")
    check(0 <= args.momentum < 1, "--momentum", args.momentum, "a number in [0, 1)")
    check(args.weight_decay >= 0, "--weight-decay", args.weight_decay, "a number >= 0")
    check(args.grad_clip > 0, "--grad-clip", args.grad_clip, "a number > 0 (inf: no clipping)")
    check(args.save_every >= 1, "--save-every", args.save_every, "an integer >= 1")
    check(0 <= args.seed < 2 ** 32, "--seed", args.seed, "an integer in [0, 2^32 - 1] (NumPy's seeds are 32-bit)")
    check(not (args.resume and args.overwrite), "--resume", "--overwrite", "one of the two, not both")
    get_device(args.device)                             # a device this machine does not have: now, not at first use


def get_device(name="auto"):
    """--device -> a torch.device this machine has; ValueError naming the flag for an unknown or absent one."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU that PyTorch {torch.__version__} can use; "
                         f"use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0-{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: Apple's MPS is not available on this machine; use --device cpu (or auto)")
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


def _ours_by_name(name):
    return name == "run.json" or name in RUN_FILES or name.endswith(".pt")


def remove_orphans(folder):
    """Remove the temporary files that write_atomic left behind in `folder` when its process was killed: exactly
    `<name>.tmp<pid>`, a plain file, <name> a file of these scripts (run.json, results.json, *.pt), its process gone.
    Anything else is the user's and stays (notes.tmp.txt, draft.tmpl, a folder cache.tmp); so does a live
    process's file (a concurrent run's cache write), and the file of a dead process whose PID is in use again."""
    with contextlib.suppress(OSError):                         # an unreadable or read-only folder: nothing to do
        for entry in os.scandir(folder):
            m = TEMP_FILE.fullmatch(entry.name)
            if m and _ours_by_name(m[1]) and entry.is_file(follow_symlinks=False) and not _pid_alive(int(m[2])):
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
    """Whether `path` is a results.json of these scripts (a JSON object naming its method), not a file of the user's."""
    try:
        with open(path) as f:
            return "method" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


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
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable ({getattr(e, 'strerror', None) or type(e).__name__}): restore it, or "
                         f"start afresh with --overwrite") from None
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
    if not os.path.isdir(old):
        return False
    names = list(_run_files(old)[0]) + (["run.json"] if os.path.isfile(os.path.join(old, "run.json")) else [])
    new_run_wrote = any(_run_files(out)[0])
    for name in names:
        if new_run_wrote:
            os.remove(os.path.join(old, name))
        else:
            os.replace(os.path.join(old, name), os.path.join(out, name))
    for folder in (f for f in CSV_FOLDERS if os.path.isdir(os.path.join(old, f))):
        if new_run_wrote:                                         # the old run's CSVs, and nothing of the user's
            for entry in os.scandir(os.path.join(old, folder)):
                if entry.name.endswith(".csv") and entry.is_file(follow_symlinks=False):
                    os.remove(entry.path)
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


def _take_lock(out):
    """Create out/lock holding `<pid> <start time>`; a lock of a process that is gone (or of an unrelated process
    that got its PID since) is taken over. ValueError when a live run holds it."""
    lock = os.path.join(out, "lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not os.path.isfile(lock):
                raise ValueError(f"--out {out}: {lock} is not a lock file of these scripts: move it away") from None
            try:
                with open(lock) as f:
                    pid, *start = f.read().split()
                pid = int(pid)
            except (OSError, ValueError):
                pid, start = -1, []                               # unreadable or half-written: its writer is gone
            if pid > 0 and pid != os.getpid() and _pid_alive(pid, start[0] if start else None):
                raise ValueError(f"--out {out}: another run (process {pid}) is writing there; wait for it or use another --out")
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)                                   # a dead process's lock: take it over
            continue
        except OSError as e:
            raise OSError(f"--out {out}: the folder is not writable ({e.strerror or e})") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {_process_start(os.getpid()) or ''}\n")
        return lock
    raise ValueError(f"--out {out}: another run took the folder at the same moment; use another --out")


_release = {}   # run folder -> its release, called by finish() and entry_point (and at exit, whatever happens)


def guard_run_folder(out, run, resume, overwrite):
    """Make --out safe to write, before any work. Writes out/run.json (script and settings) -> nothing.

    - One live process at a time: out/lock holds the PID and start time of its writer (taken over when that
      process is gone).
    - Temporary files of killed writes are removed by their exact name (remove_orphans); nothing else of the user's
      is ever touched: the run's own files are run.json, a results.json naming its method and the *.pt files that
      record a run of these scripts (checkpoints).
    - A run is never replaced by accident: a folder holding one is refused without --resume or --overwrite; a
      folder holding a *.pt or results.json that these scripts did not write, always (a run could write a file of
      that name). --overwrite moves the old run into out/replaced-run, which goes once the new run has written a
      checkpoint or results.json, and comes back if the new run stops before.
    - --resume needs a run to resume: at least one checkpoint of this script in out, and every checkpoint that was
      there when the run last stopped (run.json lists them); its run.json, when there, must be a valid record of
      the same script and settings (refused here, before any data is loaded; train() checks each checkpoint
      again). Only after a kill -9, which leaves no list, a deleted checkpoint of a later stage beside one of an
      earlier stage cannot be told from one never written: that stage starts afresh."""
    record = os.path.join(out, "run.json")
    if resume and not os.path.isdir(out):
        raise FileNotFoundError(f"--resume: there is no run folder {out} (check --out)")
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OSError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    lock = _take_lock(out)
    accepted = []                                                       # the run passed the checks below

    def release():                                                      # idempotent: finish, entry_point, exit
        if os.path.exists(lock):
            with contextlib.suppress(OSError, ValueError):
                restored = _settle_replaced(out)
                if accepted and not restored:             # a refused start, or the old run back: changes nothing
                    _record_checkpoints(out)
        with contextlib.suppress(OSError):
            os.remove(lock)
        with contextlib.suppress(OSError):
            if created and set(os.listdir(out)) <= {"run.json"}:      # a run that wrote nothing leaves nothing
                with contextlib.suppress(FileNotFoundError):
                    os.remove(record)
                os.rmdir(out)
    atexit.register(release)
    _release[os.path.abspath(out)] = release
    _settle_replaced(out)                                               # an --overwrite that was killed
    remove_orphans(out)
    ours, foreign = _run_files(out)
    if resume:
        own = {n: r for n, r in ours.items() if r is not None and r["script"] == run["script"]
               and recorded_run(os.path.join(out, n), checkpoint=True)}
        others = sorted({r["script"] for r in ours.values() if r is not None} - {run["script"]})
        if not own and others:
            raise ValueError(f"--resume: {out} holds a run of {', '.join(others)}.py, not of {run['script']}.py: "
                             f"check --out")
        if not own:
            raise ValueError(f"--resume: {out} holds no checkpoint of {run['script']}.py "
                             f"({', '.join(ours) or 'no run files'}), so there is nothing to resume: check --out, "
                             f"or drop --resume to start afresh")
        saved = read_record(record) if os.path.exists(record) else own[next(iter(own))]
        compare_runs(saved, run, f"the run in {out}")
        gone = sorted(set(_listed_checkpoints(saved)) - set(own))
        if gone:
            raise ValueError(f"--resume: {', '.join(gone)} of the run in {out} is gone (it was there when the run "
                             f"last stopped): restore it, or start afresh with --overwrite")
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
        os.makedirs(old, exist_ok=True)
        for name in list(ours) + (["run.json"] if os.path.exists(record) else []) + \
                [f for f in CSV_FOLDERS if os.path.isdir(os.path.join(out, f))]:
            os.replace(os.path.join(out, name), os.path.join(old, name))
    save_results(record, run)                                           # atomic JSON, as results.json
    accepted.append(True)


def data_fingerprint(x, y):
    """What the run trains on, cheaply: the number of images, their shape and a SHA-1 of the uint8 pixels and of the
    labels (about 0.2 s for 50,000 CIFAR images)."""
    digest = lambda t: hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"images": len(x), "shape": list(x.shape[1:]), "pixels": digest(x), "labels": digest(y)}


def check_data(args, data):
    """Call right after load_data: records the fingerprint of the training images in <out>/run.json, and on --resume
    refuses, in one line, images that changed since the run was trained (its checkpoints saw other images;
    continuing would mix two data sets without a word)."""
    if rank() != 0:
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
            return result
        except BrokenPipeError:
            _stdout_to_devnull()
            stop = SystemExit("error: the output pipe was closed (its reader quit), so the run stopped")
        except (ValueError, OSError, FloatingPointError) as e:
            stop = SystemExit(f"error: {e}")
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
    if "RANK" in os.environ and not distributed():
        import builtins
        import datetime
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
        if args.batch_size % world_size():
            raise ValueError(f"--batch-size {args.batch_size} (the global batch) is not divisible by {world_size()} processes")
        if rank() != 0:
            builtins.print = lambda *a, **k: None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True      # fixed shapes: let cuDNN pick its fastest convolutions once
    if args.compile and device.type != "cuda":
        # a note, not a refusal: the compiled path is correct on a CPU and worth checking there, only slow
        print(f"note: --compile on {device.type}: each epoch is much slower than without (about 250x measured on "
              f"a CPU with the digits default: compile time and CPU kernels); it pays off on a CUDA GPU", flush=True)
    seed_everything(args.seed + rank())   # each rank its own augmentation draws (train's shuffle is common to all)
    if rank() == 0:
        guard_run_folder(args.out, args.run, args.resume, args.overwrite)
    if distributed():
        torch.distributed.barrier()
    print_config(args)
    print(f"device {device}, run folder {args.out}" + (f", {world_size()} processes" if distributed() else ""), flush=True)
    return device


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (downloads, decodes, writes caches), then the other ranks read what it made."""
    if distributed() and rank() != 0:
        torch.distributed.barrier()
    yield
    if distributed() and rank() == 0:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------------------------
# Reporting: the sanity baselines, the tables, results.json.

@torch.no_grad()
def sanity_baselines(data, arch, width, device, seed=0):
    """The two bars every trained score must clear, on exactly the run's split and OOD sets -> {"pixels_knn":
    {ood set: metrics}, "random_init_knn": {...}}: the cosine similarity of each test image to its nearest
    training image in raw pixels, and the same on the embedding layer h of an untrained encoder of the run's
    architecture and width (seeded, in eval mode). One forward pass over the images; seconds on a CPU."""
    pixels = lambda x: x.flatten(1).float()
    train_px = pixels(data.train_x).to(device)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = Encoder(arch, width=width).to(device).eval()
    torch.set_rng_state(gen_state)                      # the run's own random stream is left untouched
    h = lambda x: embed(model, x.to(device))[0]
    train_h = h(data.train_x)
    return {"pixels_knn": evaluate(lambda x: knn_scores(train_px, pixels(x).to(device)), data.test_x, data.ood),
            "random_init_knn": evaluate(lambda x: knn_scores(train_h, h(x)), data.test_x, data.ood)}


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
    print("\n".join(lines), flush=True)


def save_results(path, results):
    """Write results (or any JSON record: run.json too) atomically, rank 0 only."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2, default=str)
    if rank() == 0:
        write_atomic(path, write)


def finish(args, method, scorer, data, device, t_start, report=None, more_metrics=None, **extra):
    """The end of every script, one path for every method: the run's Scorer scores the ID test images and every OOD
    set; the threshold accepting --tpr of the ID test scores is fixed; the sanity baselines (unless
    --no-baselines) and the tables of the `report` scores (default: all) are printed; a CSV per set (one row per
    image: its name, every score, the decision) goes to <out>/scores/, the Scorer to <out>/scorer.pt, and
    <out>/results.json = {method, config, settings, metrics {score: {ood set: metrics}}, thresholds, tpr,
    baselines, seconds, device, **extra}. more_metrics: metrics of other models of the run (a pipeline's earlier
    stages), reported and saved beside. Returns the results dict."""
    s_id = scorer.scores(data.test_x)
    scorer.tpr, scorer.thresholds = args.tpr, {k: threshold_at(v, args.tpr) for k, v in s_id.items()}
    s_ood = {name: scorer.scores(x) for name, x in data.ood.items()}
    metrics = {k: {name: ood_metrics(s_id[k], s[k]) for name, s in s_ood.items()} for k in s_id}
    baselines = {} if args.no_baselines else sanity_baselines(data, args.arch, args.width, device, args.seed)
    for name, m in {**(more_metrics or {}), **{k: metrics[k] for k in (report or metrics)}}.items():
        print_results(m, f"{method}, {name}: AUROC etc. in % (higher score = in-distribution)", baselines)
    folder = os.path.join(args.out, "scores")
    if rank() == 0:
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

        scorer = common.Scorer.load("runs/ccl-digits")
        scores, is_ood = scorer(x)        # x: uint8 N x 3 x H x W (resized to the run's --size); {score name: N}
        scorer.thresholds                 # {score name: t}; is_ood = score < t

    `script` names the method module that defines build_model(s) (the untrained model from the run's settings s)
    and score(model, state, x, s) -> {score name: N scores}; `state` holds the tensors those scores need
    (reference features, Gaussians, ...). The run computes its own metrics through the same scores()."""

    FILE = "scorer.pt"
    SCRIPTS = ("ccl", "mcl", "oecl", "scan_ood", "common")

    def __init__(self, script, settings, model, state, thresholds=None, tpr=0.95):
        if script not in self.SCRIPTS:
            raise ValueError(f"unknown script {script!r} (known: {', '.join(self.SCRIPTS)})")
        self.script, self.settings, self.model, self.state = script, dict(settings), model, state
        self.thresholds, self.tpr = dict(thresholds or {}), tpr

    @classmethod
    def from_args(cls, script, args, model, state):
        """The Scorer of a run that has just trained `model`: its settings are the run's resolved flags."""
        settings = {k: v for k, v in vars(args).items() if k not in ("sources", "run")}
        return cls(script, json.loads(json.dumps(settings, default=str)), model, state)

    @property
    def module(self):
        import importlib
        return sys.modules[__name__] if self.script == "common" else importlib.import_module(self.script)

    @torch.no_grad()
    def scores(self, x):
        """{score name: float32 CPU tensor of len(x) scores}, in float32 whatever the caller's autocast."""
        device = next(self.model.parameters()).device
        x = resize_uint8(torch.as_tensor(x), self.settings["size"]).to(device)
        was_training = self.model.training
        self.model.eval()
        with torch.autocast(device.type, enabled=False):
            out = self.module.score(self.model, self.state, x, SimpleNamespace(**self.settings))
        self.model.train(was_training)
        return {k: v.float().cpu() for k, v in out.items()}

    def __call__(self, x):
        """-> (scores, is_ood): {score name: N scores}, {score name: N booleans, True = OOD at the threshold}."""
        if not self.thresholds:
            raise ValueError("this scorer has no thresholds yet (the run sets them on its ID test images)")
        scores = self.scores(x)
        return scores, {k: v < self.thresholds[k] for k, v in scores.items()}

    def save(self, out):
        save_atomic({"script": self.script, "settings": self.settings, "model": self.model.state_dict(),
                     "state": self.state, "thresholds": self.thresholds, "tpr": self.tpr,
                     "run": {"script": self.script, "settings": self.settings}},       # a file of this run's
                    os.path.join(out, self.FILE))

    @classmethod
    def load(cls, out, device="cpu"):
        """The Scorer of the finished run in folder `out` (load_plain: the file never runs code)."""
        path = os.path.join(out, cls.FILE)
        if not os.path.exists(path):
            started = os.path.isdir(out) and any(n.endswith(".pt") for n in os.listdir(out))
            raise FileNotFoundError(f"{out} holds {'a run that is not finished yet' if started else 'no finished run'}"
                                    f" (no {cls.FILE}){': finish it with --resume' if started else ''}")
        c = load_plain(path, "scorer file", device)
        if not isinstance(c, dict) or not {"script", "settings", "model", "state", "thresholds"} <= set(c):
            raise ValueError(f"{path} is not a scorer file of these scripts")
        scorer = cls(c["script"], c["settings"], None, c["state"], c["thresholds"], c.get("tpr", 0.95))
        model = scorer.module.build_model(SimpleNamespace(**c["settings"]))
        scorer.model = load_weights(model, c["model"]).to(device).eval()
        return scorer


def csv_name(set_name):
    """A set's CSV file name: its name with every character but letters, digits, '.', '-' made '_'."""
    return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in set_name).strip("_") + ".csv"


def write_scores_csv(path, names, scores, thresholds):
    """One row per image: its name, every score, then ood_<score> = 1 where the score is below its threshold."""
    import csv
    keys = list(scores)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image"] + keys + [f"ood_{k}" for k in keys])
            columns = [scores[k].tolist() for k in keys]
            flags = [(scores[k] < thresholds[k]).int().tolist() for k in keys]
            for row in zip(names, *columns, *flags):
                w.writerow([row[0]] + [f"{v:.9g}" for v in row[1:1 + len(keys)]] + list(row[1 + len(keys):]))
    write_atomic(path, write)


def print_decisions(scorer, sets, where):
    """The threshold of each score and, per set, the share of its images declared OOD."""
    print(f"thresholds accepting {100 * scorer.tpr:g}% of the ID test scores ({where}): "
          + ", ".join(f"{k} {t:.6g}" for k, t in scorer.thresholds.items()), flush=True)
    for name, scores in sets.items():
        print(f"  {name}: {len(next(iter(scores.values())))} images, declared OOD: "
              + ", ".join(f"{k} {100 * float((v < scorer.thresholds[k]).float().mean()):.1f}%" for k, v in scores.items()),
              flush=True)


def score_later(args, script):
    """--score SPEC ...: the finished run of `script` in --out scores these images; writes a CSV per set,
    <out>/scored/<csv_name(spec)>, and prints a line per set; reads nothing of the training data and changes no
    other file of the run."""
    device = get_device(args.device)
    args.out = args.out or default_out(script, args.dataset)
    scorer = Scorer.load(args.out, device)
    if scorer.script != script:
        raise ValueError(f"the run in {args.out} was made by {scorer.script}.py, not {script}.py: score with "
                         f"python {scorer.script}.py --out {args.out} --score ...")
    folder = os.path.join(args.out, "scored")
    os.makedirs(folder, exist_ok=True)
    sets = {}
    for spec in args.score:
        x, _, _, names = load_dataset(spec, False, args.data_root, True, scorer.settings["size"], names=True)
        sets[spec] = scores = scorer.scores(x)
        write_scores_csv(os.path.join(folder, csv_name(spec)), names, scores, scorer.thresholds)
    print_decisions(scorer, sets, "set by the run on its ID test images")
    print(f"a CSV per set in {folder}", flush=True)
    return sets


# ----------------------------------------------------------------------------------------------
# Self-check: `python common.py`.

def build_model(s):
    """The self-check's model (the Scorer's build_model): the Encoder of the run's settings s."""
    return Encoder(s.arch, width=s.width, init=s.init)


@torch.no_grad()
def score(model, state, x, s):
    """The self-check's scores (the Scorer's score): cosine kNN to the training images on h and on z."""
    h, z = embed(model, x)
    return {"knn_h": knn_scores(state["train_h"], h), "knn_z": knn_scores(state["train_z"], z)}


@entry_point
def main(argv=None):
    """SimCLR (tau 0.5) on the run's data, scored by cosine kNN on the embedding layer h and on the projection z,
    beside the sanity baselines: a self-check of this module, and with a method's training flags that method's
    plain SimCLR setting."""
    parser = argparse.ArgumentParser(description="SimCLR self-check of the shared module", parents=[arg_parser()])
    parser.set_defaults(epochs=1, subset=256, width=8, batch_size=64)
    args = parse_args(parser, argv=argv, other_data=dict(epochs=20, subset=0))
    if args.score:
        return score_later(args, "common")
    t_start = time.time()
    device = setup(args, "common")
    data = load_data(args)
    check_data(args, data)
    model = build_model(args).to(device)
    aug = simclr_augment(args, blur=True)
    x = data.train_x.to(device)
    train(model, lambda net, xb, idx, epoch: simclr_step(net, xb, aug, tau=0.5), x,
          TrainConfig.from_args(args, checkpoint=os.path.join(args.out, "checkpoint.pt")))
    train_h, train_z = embed(model, x)
    scorer = Scorer.from_args("common", args, model, {"train_h": train_h, "train_z": train_z})
    return finish(args, "SimCLR", scorer, data, device, t_start)


if __name__ == "__main__":
    main()
