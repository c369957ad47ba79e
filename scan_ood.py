"""SCAN-OOD: out-of-distribution detection without class labels via SCAN pseudo-labels (Cohen, Abutbul, Hoshen).

Unlabelled multi-class OOD detection = clustering + multi-class OOD detection. Clustering is SCAN (Van Gansbeke et
al.): (1) pretext: SimCLR, then each image's nearest neighbours; (2) scan: clustering heads trained so that an image
and a mined neighbour get the same confident cluster while the mean prediction stays spread (SCAN loss); (3)
selflabel: fine-tuning on the confident predictions. Detectors (higher = in-distribution): kNN on the SCAN network's
features (Sec. 3.1), or an ImageNet ResNet fine-tuned on the pseudo-labels with weight averaging (Sec. 3.2, Eq. 2).

    python scan_ood.py                    # self-supervised variant, digits 0-5 vs 6-9: ~21 s of CPU (one thread)
    python scan_ood.py --labels kmeans    # K-means pseudo-labels instead of SCAN (paper Sec. 5)
    python scan_ood.py --preset paper     # CIFAR-10, SCAN's settings + ImageNet ResNet-152: GPU jobs
    python scan_ood.py --arch efficientnet_lite0 --weights lite0.pth     # every stage from ImageNet weights

Result on digits, AUROC % over --seed 0-4, mean ± std (README's table: `OMP_NUM_THREADS=1 python scan_ood.py
--id-classes SPLIT --seed S`): kNN on the SCAN features 96.4 ± 2.1 with 0-5 in (94.2 ± 2.4 with the odd digits in,
92.7 ± 1.6 with 4-9 in; seed 0 again on a 2-core AMD EPYC: 97.0); its pretext SimCLR 95.2 ± 0.3; beside raw
pixels' nearest neighbour 98.5 and an untrained encoder's 82.9 ± 8.7. Timed on one thread of a 2-core AMD EPYC.

Use it in your code:

    import torch, scan_ood
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)      # unlabelled training images
    net = scan_ood.ClusterNet("resnet18", clusters=3, heads=1, width=4)  # a CIFAR ResNet-18 and one head of K = 3
    neighbors = scan_ood.mine_neighbors(x.flatten(1).float(), 5)         # in practice: of the SimCLR projections
    strong = scan_ood.StrongAugment(n_ops=4, cutout=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    for idx in torch.randperm(len(x)).split(32):                         # one epoch of the SCAN stage
        loss, parts = scan_ood.scan_step(net, x[idx], idx, x, neighbors, strong, entropy_weight=5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_h, logits = scan_ood.features(net, x)                          # penultimate features, cluster logits
    reference = scan_ood.score_reference("knn", train_h)                 # or "mahalanobis", logits.argmax(1)
    new = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    scores = scan_ood.score_features("knn", reference, *scan_ood.features(net, new))   # higher = in-distribution
    print(scores)
"""
import argparse
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import harness

# ----------------------------------------------------------------------------------------------
# Losses: SCAN (stage 2), self-labelling (stage 3, also the K-means-label ablation), Eq. 2 (cross-entropy).

# torch's binary cross-entropy, which SCAN's loss is, clamps x (1 - x) at 1e-12 in its gradient: a pair whose
# <p, q> is below 1e-12 pulls with -<p, q> / 1e-12 instead of -1, i.e. stops pulling.
LOG_BCE_EPS = math.log(1e-12)


@common.float32
def scan_loss(anchor_logits, neighbor_logits, entropy_weight=5.0):
    """SCAN (Van Gansbeke et al. Eq. 2; this paper Sec. 2.1 (ii)) on logits (..., B, K), any leading head dims:
        consistency = -1/B sum_i log <p(x_i), p(n_i)>,   entropy = -sum_k pbar_k log pbar_k,  pbar = mean_i p(x_i),
        total = consistency - entropy_weight * entropy        (so minimising total maximises the entropy).
    Returns (total, consistency, entropy), each of shape (...).

    log <p, q> is a logsumexp of the summed log-probabilities (exact where <p, q> underflows). As SCAN's code (a
    BCE of <p, q> against 1), a pair with <p, q> < 1e-12 stops pulling: its term is -(c + elu(log <p, q> - c)),
    c = log 1e-12, which is -log <p, q> above 1e-12 and has SCAN's gradient -<p, q> / 1e-12 in log <p, q> below
    (there its value stays under -c + 1 = 28.6 where SCAN's would be -log <p, q>). pbar is clamped at 1e-8 before
    the entropy, as SCAN's."""
    log_p = F.log_softmax(anchor_logits, -1)
    log_q = F.log_softmax(neighbor_logits, -1)
    log_sim = torch.logsumexp(log_p + log_q, -1)
    consistency = -(LOG_BCE_EPS + F.elu(log_sim - LOG_BCE_EPS)).mean(-1)
    mean_p = common.all_gather(log_p.exp().mean(-2)[None]).mean(0)   # under torchrun: pbar over the global batch
    mean_p = mean_p.clamp_min(1e-8)
    entropy = -(mean_p * mean_p.log()).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


@torch.no_grad()
def selection_loss(logits, neighbors, entropy_weight=1.0):
    """SCAN's model-selection criterion per head (its scan_evaluate): over every image and each of its mined
    neighbours (itself included), the mean -log <p, q> (clamped at 100, as the BCE it uses), minus entropy_weight
    (SCAN: 1) x the entropy of the mean prediction; un-augmented images. logits N x H x K -> H losses."""
    log_p = F.log_softmax(logits.float().transpose(0, 1), -1)                     # H x N x K
    log_sim = torch.stack([torch.logsumexp(log_p + log_p[:, nb], -1) for nb in neighbors.T], -1)   # H x N x (k + 1)
    mean_p = log_p.exp().mean(1).clamp_min(1e-8)
    return -log_sim.clamp_min(-100).mean((1, 2)) + entropy_weight * (mean_p * mean_p.log()).sum(-1)


def confidence_mask(weak_logits, threshold=0.99):
    """SCAN self-labelling: the samples whose softmax maximum on the un-augmented view exceeds threshold
    -> (mask B bool, predicted cluster B)."""
    conf, target = F.softmax(weak_logits.float(), -1).max(-1)
    return conf > threshold, target


@common.float32
def weighted_cross_entropy(logits, target, mask):
    """Cross-entropy over the masked samples, class c weighted by 1 / (its count among them) (SCAN's
    ConfidenceBasedCE: a weighted mean, so every present class weighs the same). 0 if nothing is masked.
    The counts are a scatter-add of the mask: no host sync."""
    counts = torch.zeros(logits.shape[-1], device=logits.device).scatter_add_(0, target, mask.float())
    w = mask.float() / counts.clamp_min(1)[target]
    ce = F.cross_entropy(logits, target, reduction="none")
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


def self_label_loss(weak_logits, strong_logits, threshold=0.99):
    """SCAN step (iii): cross-entropy of the strong view against the confident predictions of the weak one."""
    mask, target = confidence_mask(weak_logits, threshold)
    return weighted_cross_entropy(strong_logits, target, mask), {"confident": mask.float().mean()}


# ----------------------------------------------------------------------------------------------
# Strong augmentation (SCAN's "strong" transform), batched and branch-free: every sample draws its own flip,
# ops, magnitudes and Cutout box on the batch's device; every op runs on the whole batch, with identity
# parameters for the samples that drew another op, so a call makes no host sync and launches the same kernels
# whatever the batch and the draws.

class StrongAugment(nn.Module):
    """SCAN's strong augmentation (Van Gansbeke et al., its code's `Augment(4)` + `Cutout(1, 16)`) on a batch.

    horizontal flip (p 0.5) -> n_ops rounds, each applying to every image one op drawn uniformly (with
    replacement) from SCAN's 14, with a magnitude drawn uniformly from the op's range -> Cutout: one square of
    side 2 floor(L / 2), L uniform in 1..cutout, centred on a uniform pixel and clipped at the border (so empty
    for L = 1, as SCAN's).

    SCAN's ops and ranges: identity, autocontrast, equalize, rotate +-30 deg, solarize (threshold 0..256 of 255),
    color / contrast / brightness / sharpness (factor 0.05..0.95: always a degradation), shear x / y +-0.1,
    translate x / y +-10% of the side, posterize to 4..7 bits. Geometric ops map pixel centres as PIL's affine
    transform does (shear about the top-left corner, rotation about the centre), nearest pixel, black fill.
    Colour ops use PIL's formulas (ImageOps, ImageEnhance: a blend with a degenerate image), and every op ends on
    256 levels, truncated, as PIL's 8-bit images do.
    Cutout fills `cutout_fill`: SCAN's Cutout multiplies the normalised tensor by 0, which is the normalisation's
    mean colour; 0.5 (the default) is 0 after common.Encoder's (x - 0.5) / 0.5. SCAN's RandomCrop(32) is the
    identity on 32 x 32 images and is left out. Runs in float32 whatever the autocast (the sampling grid is exact).

    `ops` restricts the draw to some of OPS (tests, ablations). forward(x, generator=None): x uint8 or float in
    [0, 1], B x 3 x H x W -> float in [0, 1], same shape. One call draws torch.rand(B, 2 n_ops + 4): the ops, their
    magnitudes, the flip, the Cutout side and its centre (row, column), in that column order."""

    OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "color", "contrast", "brightness",
           "sharpness", "shear_x", "translate_x", "translate_y", "posterize", "shear_y")   # SCAN's list and order

    def __init__(self, n_ops=4, cutout=16, cutout_fill=0.5, ops=OPS):
        super().__init__()
        unknown = set(ops) - set(self.OPS)
        if unknown or not ops:
            raise ValueError(f"unknown ops {sorted(unknown)}; choose among {self.OPS}")
        self.n_ops, self.cutout, self.cutout_fill, self.ops = n_ops, cutout, cutout_fill, tuple(ops)

    def forward(self, x, generator=None):
        with torch.autocast(x.device.type, enabled=False):
            return self.augment(x, generator)

    def augment(self, x, generator=None):
        x = x.float() if x.dtype == torch.uint8 else (x * 255).round_()      # 8-bit levels 0..255, as PIL
        B, C, H, W = x.shape
        R = self.n_ops
        u = torch.rand(B, 2 * R + 4, device=x.device, generator=generator)   # every draw of the call at once
        x = torch.where(u[:, 2 * R, None, None, None] < 0.5, x.flip(3), x)
        if R:
            params = self.round_params(u[:, :R], u[:, R:2 * R], H, W)
            gy, gx = torch.meshgrid(torch.linspace(1 / H - 1, 1 - 1 / H, H, device=x.device),
                                    torch.linspace(1 / W - 1, 1 - 1 / W, W, device=x.device), indexing="ij")
            pixels = torch.stack([gx, gy, torch.ones_like(gx)], -1).view(H * W, 3)   # output pixel centres
            for r in range(R):
                x = self.one_round(x, pixels, *(p[:, r] for p in params))
        return self.apply_cutout(x.div_(255), u[:, 2 * R + 1], u[:, 2 * R + 2:])

    def round_params(self, u_op, m, H, W):
        """Every round's op as identity-or-active parameters, B x R each: the affine map (PIL's input-from-output
        matrix in grid_sample's [-1, 1] coordinates), autocontrast and equalize switches, the degenerate image's
        weights (smoothed, grey, mean grey), the blend factor, the solarize threshold, the posterize step."""
        n = len(self.ops)
        drawn = (u_op * n).floor_().clamp_(max=n - 1)
        is_op = drawn[..., None] == torch.arange(n, device=m.device)          # B x R x n one-hot, bool
        one_hot = is_op.to(m.dtype)
        on = lambda name: one_hot[..., self.ops.index(name)] if name in self.ops else torch.zeros_like(m)
        v = 0.2 * m - 0.1                                                     # shear, translate: +-0.1
        a = on("rotate") * (math.radians(30) - math.radians(60) * m)          # rotate: -(+-30 deg), as PIL
        c, s = torch.cos(a), torch.sin(a)                                     # identity: c = 1, s = 0
        shx, shy = on("shear_x") * v, on("shear_y") * v
        # PIL: x_in = c x + (s + shx) y + tx, y_in = (shy - s) x + c y + ty in pixels, rotating about the centre
        # and shearing about the top-left corner (in [-1, 1] coordinates: + shx (gy + 1)); tx = 10% of the side
        # is 0.2 in [-1, 1] coordinates.
        aspect = lambda t, r: t if r == 1 else t * r                          # square images: no kernel
        row_x = [c, aspect(s + shx, H / W), torch.add(aspect(shx, H / W), on("translate_x") * v, alpha=2)]
        row_y = [aspect(shy - s, W / H), c, torch.add(aspect(shy, W / H), on("translate_y") * v, alpha=2)]
        theta = torch.stack(row_x + row_y, -1)
        enhance = on("color") + on("contrast") + on("brightness") + on("sharpness")
        factor = torch.addcmul(torch.ones_like(m), enhance, 0.9 * m - 0.95)  # 0.05..0.95; identity 1
        thresh = 512 - on("solarize") * (512 - 256 * m)                       # invert levels >= thresh
        step = torch.exp2(on("posterize") * (4 - (4 * m).floor()))           # bits int(uniform(4, 8)); none: 1
        is_ = lambda name: is_op[..., self.ops.index(name)] if name in self.ops else torch.zeros_like(m) > 0
        return (theta.view(*m.shape, 2, 3), is_("autocontrast"), is_("equalize"), on("sharpness"), on("color"),
                on("contrast"), factor, thresh, step)

    def one_round(self, x, pixels, theta, autocontrast, equalize, w_smooth, w_grey, w_mean, factor, thresh, step):
        """One op per image on levels 0..255, every op's arithmetic on the whole batch with identity parameters
        for the images that drew another op (an identity warp, a where(), factor 1, threshold 512, step 1)."""
        B, C, H, W = x.shape
        f = lambda t: t[:, None, None, None]
        grid = (pixels @ theta.transpose(1, 2)).view(B, H, W, 2)              # geometric ops (identity: exact)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        # autocontrast and equalize per channel from the sorted levels (PIL's ImageOps); 0 / 0 is never selected
        flat = x.flatten(2)                                                   # B x C x HW
        levels = flat.sort(-1).values
        lo, hi = levels[..., :1], levels[..., -1:]
        below = torch.searchsorted(levels, flat)                              # pixels at a lower level
        eq_step = below.amax(-1, keepdim=True).div(255).floor_()              # (N - top count) // 255
        equalized = torch.div(below + torch.div(eq_step, 2, rounding_mode="floor"), eq_step, rounding_mode="floor")
        flat = torch.where(autocontrast[:, None, None] & (hi > lo), (flat - lo) * (255 / (hi - lo)),
                           torch.where(equalize[:, None, None] & (eq_step > 0), equalized, flat))
        x = flat.view(B, C, H, W)
        # color, contrast, brightness, sharpness: a blend with a degenerate 8-bit image (identity: factor 1)
        smooth = x.clone()                                                    # PIL's SMOOTH filter, border kept:
        smooth[:, :, 1:-1, 1:-1].lerp_(F.avg_pool2d(x, 3, 1), 9 / 13)          # (4 x + 3x3 sum) / 13
        grey = (x[:, 0:1] * 0.299).add_(x[:, 1:2], alpha=0.587).add_(x[:, 2:3], alpha=0.114).round_()  # "L"
        degenerate = smooth.mul_(f(w_smooth)).addcmul_(grey, f(w_grey)).addcmul_(grey.mean((2, 3), True), f(w_mean))
        x = torch.lerp(degenerate.round_(), x, f(factor))                     # exactly x where factor is 1
        x = torch.where(x >= f(thresh), 255 - x, x)                           # solarize
        # back to whole levels, truncated as PIL's blend does (+1e-3: float32 error), then posterized
        return x.clamp_(0, 255).add_(1e-3).div_(f(step), rounding_mode="floor").mul_(f(step))

    def apply_cutout(self, x, u_len, u_pos):
        """SCAN's Cutout: L uniform in 1..cutout, rows [y - L // 2, y + L // 2) clipped at the border, y a uniform
        row (columns alike); i.e. the pixels with |row + 0.5 - y| < L // 2."""
        if not self.cutout:
            return x
        H, W = x.shape[2:]
        half = u_len.mul(self.cutout / 2).add_(0.5).floor_()                 # L // 2 for L = floor(u cutout) + 1
        centre = (u_pos * H if H == W else torch.stack([u_pos[:, 0] * H, u_pos[:, 1] * W], 1)).floor_()   # B x 2
        inside = (torch.arange(0.5, max(H, W), device=x.device) - centre[:, :, None]).abs_() < half[:, None, None]
        box = inside[:, 0, :H, None] & inside[:, 1, None, :W]               # B x H x W
        return x.masked_fill_(box[:, None], self.cutout_fill)


# ----------------------------------------------------------------------------------------------
# Training step: the clustering network, neighbour mining, and the steps of the stages (scan_step,
# selflabel_step, label_step, adapt_step), with SCAN's head selection and the weight average as their state.

class ClusterNet(common.Encoder):
    """common.Encoder whose head is `heads` linear heads of `clusters` outputs each.
    forward(x) -> (h penultimate features, logits B x heads x clusters)."""

    def __init__(self, arch, clusters, heads=1, width=64, weights=None, init="pytorch", pretrained=None):
        super().__init__(arch, width=width, weights=weights, init=init, pretrained=pretrained)
        self.clusters, self.heads = clusters, heads
        self.head = nn.Linear(self.feat_dim, heads * clusters)

    def forward(self, x):
        h, logits = super().forward(x)
        return h, logits.view(len(h), self.heads, self.clusters)


def keep_head(net, head):
    """A one-head copy of a ClusterNet: the same backbone, head number `head` only."""
    one = copy.deepcopy(net)
    rows = slice(head * net.clusters, (head + 1) * net.clusters)
    one.head.weight = nn.Parameter(net.head.weight.detach()[rows].clone())
    one.head.bias = nn.Parameter(net.head.bias.detach()[rows].clone())
    one.head.out_features, one.heads = net.clusters, 1
    return one


@torch.no_grad()
def mine_neighbors(feats, k):
    """Each row's k nearest OTHER rows by cosine similarity, with the row itself prepended -> N x (k + 1) indices.

    SCAN keeps the image itself in its neighbour list (faiss returns it first); we put it in column 0
    explicitly so that exact duplicates cannot push it out. Chunked on the device via common.knn."""
    n = len(feats)
    if not 0 < k < n:
        raise ValueError(f"--num-neighbors {k} must be between 1 and the number of training images - 1 ({n - 1})")
    idx = common.knn(feats, feats, k + 1, "cosine")[1]
    own = torch.arange(n, device=idx.device)[:, None]
    is_self = idx == own
    drop = is_self.clone()
    drop[:, -1] |= ~is_self.any(1)                     # self not found among k + 1: drop the farthest instead
    return torch.cat([own, idx[~drop].view(n, k)], 1)


def scan_step(net, xb, idx, x, neighbors, aug, entropy_weight):
    """SCAN step (ii): each image and one neighbour drawn from its mined list (possibly itself, as SCAN), both
    strongly augmented, in one forward pass; the SCAN loss of every head, summed. neighbors: N x (k + 1) rows of x."""
    pick = torch.randint(neighbors.shape[1], (len(idx),), device=idx.device)
    logits = net(torch.cat([aug(xb), aug(x[neighbors[idx, pick]])]))[1]
    anchor, neighbor = logits.transpose(0, 1).chunk(2, dim=1)                   # H x B x K each
    total, consistency, entropy = scan_loss(anchor, neighbor, entropy_weight)
    return total.sum(), {"consistency": consistency.mean(), "entropy": entropy.mean()}


class SCANStep:
    """scan_step over the images x with their mined neighbours, as a step for common.train, with SCAN's model
    selection as its state: before every epoch but the first, and once more by select() after the last, every head
    is evaluated on the held-out images (selection_loss with entropy weight 1, as SCAN's); the weights and head with
    the lowest loss so far are kept (state_dict: they live in the checkpoint). best(model) -> the kept one-head net.

    SCAN selects on the CIFAR-10 test split with 5 neighbours mined among its images; ours selects on held-out
    training images (never test images), their neighbours mined among themselves."""

    def __init__(self, x, neighbors, aug, entropy_weight, held_x, held_neighbors):
        self.x, self.neighbors, self.aug, self.entropy_weight = x, neighbors, aug, entropy_weight
        self.held_x, self.held_neighbors = held_x, held_neighbors
        self.kept = {"loss": float("inf"), "head": 0, "epoch": 0, "weights": None}

    def __call__(self, net, xb, idx, epoch):
        return scan_step(net, xb, idx, self.x, self.neighbors, self.aug, self.entropy_weight)

    def update(self, model, epoch):
        if epoch > 0:
            self.select(model, epoch)

    def select(self, model, epochs_done):
        losses = selection_loss(common.embed(model, self.held_x)[1], self.held_neighbors)
        head = int(losses.argmin())
        print(f"  selection loss after epoch {epochs_done} (held-out images, entropy weight 1), per head: "
              f"{', '.join(f'{v:.4f}' for v in losses.tolist())}", flush=True)
        if float(losses[head]) < self.kept["loss"]:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.kept = {"loss": float(losses[head]), "head": head, "epoch": epochs_done, "weights": weights}

    def best(self, model):
        if self.kept["weights"] is None:          # every selection loss was NaN: the stage diverged
            raise ValueError("the SCAN stage diverged (no epoch gave a finite selection loss); try a lower --scan-lr")
        model.load_state_dict(self.kept["weights"])
        print(f"keeping head {self.kept['head']} after epoch {self.kept['epoch']} "
              f"(selection loss {self.kept['loss']:.4f})", flush=True)
        return keep_head(model, self.kept["head"])

    def state_dict(self):
        return dict(self.kept)

    def load_state_dict(self, d):
        self.kept = dict(d)


def selflabel_step(net, xb, aug, threshold):
    """SCAN step (iii): the confident predictions on the un-augmented images (no gradient, BatchNorm in training
    mode as SCAN's) are the targets of the strongly augmented view."""
    with torch.no_grad():
        weak = net(common.to_float(xb))[1][:, 0]
    return self_label_loss(weak, net(aug(xb))[1][:, 0], threshold)


def label_step(net, xb, target, aug):
    """The K-means-label ablation (Sec. 5): SCAN's self-labelling loss with every image kept, its K-means cluster
    as the target (ambiguity: the paper does not say how the K-means labels train the network)."""
    return weighted_cross_entropy(net(aug(xb))[1][:, 0], target, torch.ones_like(target, dtype=torch.bool))


def adapt_step(net, xb, target, aug):
    """Eq. 2: cross-entropy of the pre-trained classifier on the pseudo-labels, augmented images."""
    return F.cross_entropy(net(aug(xb))[1][:, 0].float(), target)


@torch.no_grad()
def average_weights(state_dicts, weights=None):
    """Weighted mean of state dicts key by key (Sec. 4.3: "we average on the model weights at the end of each of
    the 5 training epochs"); BatchNorm running statistics are averaged too, integer buffers (num_batches_tracked)
    are averaged and rounded. weights default to equal."""
    w = torch.tensor(weights if weights is not None else [1.0] * len(state_dicts), dtype=torch.float32)
    w = (w / w.sum()).tolist()
    out = {}
    for key, first in state_dicts[0].items():
        mean = sum(wi * sd[key].float() for wi, sd in zip(w, state_dicts))
        out[key] = mean.to(first.dtype) if first.is_floating_point() else mean.round().to(first.dtype)
    return out


class AdaptStep:
    """adapt_step on the pseudo-labels, with the running average of the end-of-epoch weights as its state:
    update() adds the weights that finished the previous epoch, add() the last ones after training."""

    def __init__(self, pseudo, aug):
        self.pseudo, self.aug = pseudo, aug
        self.average, self.n_averaged = None, 0

    def __call__(self, net, xb, idx, epoch):
        return adapt_step(net, xb, self.pseudo[idx], self.aug)

    def update(self, model, epoch):
        if epoch > 0:
            self.add(model)

    def add(self, model):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        n = self.n_averaged
        self.average = sd if n == 0 else average_weights([self.average, sd], [n, 1])
        self.n_averaged = n + 1

    def state_dict(self):
        return {"average": self.average, "n_averaged": self.n_averaged}

    def load_state_dict(self, d):
        self.average, self.n_averaged = d["average"], d["n_averaged"]


# ----------------------------------------------------------------------------------------------
# Scores (higher = in-distribution): kNN (Sec. 3.1, 3.2, 4.3), Mahalanobis and MSP (Eq. 1) for Tab. 5; the final
# model's scores behind build_model, score_state and score, which main and a later scorer of the run folder share.
# Every run also reports the intermediate variants (the pretext-only SimCLR kNN score; with --backbone the SCAN
# features and DN2), the cluster accuracy (Hungarian matching, for information: labels never train anything) and
# the sanity baselines. Checkpoints: <out>/{pretext,scan,selflabel,adapt}.pt; --resume loads the finished stages
# and continues the unfinished one. --weights means what it means for every script: the --arch encoder of every
# stage (pretext, SCAN, self-labelling) starts from those weights, and their kNN is the pretrained_knn baseline; the
# Sec. 3.2 classifier's are --backbone-weights.

def features(net, x, view=None):
    """(penultimate features h, logits of the first head) of uint8 images x: common.embed's float32 features;
    `view` maps a uint8 batch to the network's input. A common.Encoder (the pretext network) gives its projection
    in place of logits."""
    h, out = common.embed(net, x, transform=view)
    return h, (out[:, 0] if out.dim() == 3 else out)


def score_reference(kind, train_h, labels=None):
    """What score `kind` keeps of the training images: kNN their features; Mahalanobis the Gaussians of their
    pseudo-label clusters ("the empirical covariance matrix of each cluster", Sec. 3.2; ridge 1e-6 x the mean
    variance keeps small clusters invertible; empty clusters skipped); MSP nothing -> {name: tensor}."""
    if kind == "knn":
        return {"train_h": train_h.float()}
    if kind == "mahalanobis":
        _, labels = labels.unique(return_inverse=True)
        means, chol = common.fit_gaussians(train_h, labels, int(labels.max()) + 1, ridge=1e-6)
        return {"means": means, "chol": chol}
    if kind == "msp":
        return {}
    raise ValueError(f"unknown --ood-score '{kind}' (knn, mahalanobis, msp)")


def score_features(kind, reference, h, logits, k=1):
    """Score `kind` of features h (and logits, for MSP) against score_reference's `reference`, float32: kNN the
    cosine similarity to the k-th nearest training feature, Mahalanobis -min_c (h - mu_c)^T S_c^-1 (h - mu_c), MSP
    the softmax maximum."""
    if kind == "knn":   # ambiguity: Sec. 3.2 says "the distance"; cosine, as the paper's DN2 (after MeanShifted)
        return common.knn_scores(reference["train_h"], h, k)
    if kind == "mahalanobis":
        return -common.mahalanobis(h, reference["means"], reference["chol"]).min(1).values.float()
    if kind == "msp":
        return F.softmax(logits.float(), -1).amax(-1)
    raise ValueError(f"unknown --ood-score '{kind}' (knn, mahalanobis, msp)")


def score_net(net, data, x, kind, k, labels=None, view=None):
    """{ood set: metrics} of score `kind` on a network's features, the training images x (with their pseudo-labels
    for the Mahalanobis score) as reference: the intermediate variants, which are not the run's final model."""
    reference = score_reference(kind, features(net, x, view)[0], labels)
    score_images = lambda imgs: score_features(kind, reference, *features(net, imgs.to(x.device), view), k)
    return common.evaluate(score_images, data.test_x, data.ood)


def main_variant(s):
    """The name of the final model's score: 'pretrained' (Sec. 3.2) with --backbone, else '<labels>_features'."""
    return "pretrained" if s.backbone else f"{s.labels}_features"


def build_model(s):
    """The final model, untrained, for the run's settings s: the one-head ImageNet ResNet classifier of the
    pre-trained variant with --backbone, else the one-head ClusterNet that SCAN (or the K-means labels) trained.
    s.clusters is K as main resolves it (--clusters 0: the class count of the data)."""
    if s.clusters < 2:
        raise ValueError(f"clusters {s.clusters}: build_model needs K as the run resolved it (>= 2)")
    if s.backbone:                                     # random weights: the run's are loaded
        return ClusterNet(f"imagenet_{s.backbone}", s.clusters, 1, pretrained=True)
    return ClusterNet(s.arch, s.clusters, 1, s.width, init=s.init, pretrained=bool(getattr(s, "weights", None)))


def final_view(s):
    """The final model's input: the pre-trained network's view of the images with --backbone, else the images."""
    return adapt_views(s)[0] if s.backbone else None


def score_state(model, x, labels, s):
    """What score() needs beside the weights, from the training images x (uint8, on the model's device) and their
    pseudo-labels: the reference of --ood-score (score_reference) on the final model's features."""
    return score_reference(s.ood_score, features(model, x, final_view(s))[0], labels)


@torch.no_grad()
def score(model, state, x, s):
    """{main_variant(s): float32 scores of the uint8 images x}, higher = in-distribution: the final model's --ood-score,
    the one score the run reports for it; deterministic (no test-time augmentation)."""
    h, logits = features(model, x, final_view(s))
    return {main_variant(s): score_features(s.ood_score, state, h, logits, s.knn_k)}


def cluster_report(name, pred, data, K):
    """{name: Hungarian cluster accuracy on the training images} (printed), or {} without labels."""
    if not data.id_classes or data.train_y.min() < 0:
        return {}
    acc = common.cluster_accuracy(pred, data.train_y)
    print(f"cluster accuracy ({name}, training images, Hungarian): {acc:.2f}%  (chance ~{100 / K:.1f}%)", flush=True)
    return {name: acc}


# ----------------------------------------------------------------------------------------------
# Stages: pretext (SimCLR), scan (SCAN + head selection), self-labelling, the K-means labels, the pre-trained
# variant -> models, labels and diagnostics.

HELD_OUT_NEIGHBORS = 5                  # public code: SCAN mines 5 neighbours among its selection images
TORCHVISION_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2")


def stage_trainer(args, stage, name, views=2, **settings):
    """-> train(model, step, x) of one stage: the shared flags, the stage's own settings (from its own flags
    --<stage>-epochs, ...), its checkpoint <out>/<stage>.pt; its lines named `name`."""
    flags = {k: f"--{stage}-{k.replace('_', '-')}" for k in ("epochs", "batch_size", "lr") if k in settings}
    return harness.trainer(args, name, f"{stage}.pt", views, flags, **settings)


def adam_trainer(args, stage, name, views=2):
    """SCAN's stages 2-3: Adam at a constant learning rate, the stage's own epochs, batch and weight decay."""
    lr = getattr(args, f"{stage}_lr")
    return stage_trainer(args, stage, name, views, epochs=getattr(args, f"{stage}_epochs"), lr=lr, final_lr=lr,
                         optimizer="adam", batch_size=getattr(args, f"{stage}_batch_size"), warmup_epochs=0,
                         weight_decay=getattr(args, f"{stage}_weight_decay"))


def pretext_stage(x, args, device):
    """Stage 1 (SCAN step i): SimCLR on the training images (from --weights when given); the head 512 -> 512 -> 128
    at width 64, as SCAN's."""
    model = common.Encoder(args.arch, proj_dim=128, width=args.width, init=args.init, pretrained=bool(args.weights))
    model = harness.start_from_weights(model, args).to(device)
    aug = harness.simclr_augment(args, scale=(args.crop_min, 1.0))        # public code: SCAN's pretext augmentation
    step = lambda net, xb, idx, epoch: common.simclr_step(net, xb, aug, args.tau)
    return stage_trainer(args, "pretext", "pretext")(model, step, x)


def strong_augment(args):
    return StrongAugment(n_ops=4, cutout=args.size // 2)         # public code: Cutout 16 px on 32 px CIFAR


def split_held_out(n, fraction, seed):
    """The training images split once, seeded: (rows that train the SCAN and self-labelling stages, the held-out
    rows of SCAN's model selection), each sorted."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = max(2, round(fraction * n))
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def scan_stage(pretext, x, K, args, data):
    """Stage 2 (SCAN step ii) on the training images but the held-out ones: neighbours of the pretext projections,
    SCAN heads trained from the pretext backbone, the epoch and head of lowest held-out selection loss kept
    -> (one-head ClusterNet, the rows of x it trained on, diagnostics)."""
    fit, held = (rows.to(x.device) for rows in split_held_out(len(x), args.val_fraction, args.seed))
    z = common.embed(pretext, x)[1]                                      # public code: mined on the head's output
    neighbors = mine_neighbors(z[fit], args.num_neighbors)
    held_neighbors = mine_neighbors(z[held], min(HELD_OUT_NEIGHBORS, len(held) - 1))
    info = {}
    if data.id_classes and data.train_y.min() >= 0:
        y = data.train_y.to(x.device)[fit]
        info["neighbor_purity"] = 100 * (y[neighbors[:, 1:]] == y[:, None]).float().mean().item()
        print(f"mined {args.num_neighbors} neighbours per image; {info['neighbor_purity']:.1f}% share the image's "
              f"class")
    heads = ClusterNet(args.arch, K, args.heads, args.width, init=args.init, pretrained=bool(args.weights))
    heads = heads.to(x.device)
    heads.backbone.load_state_dict(pretext.backbone.state_dict())
    step = SCANStep(x[fit], neighbors, strong_augment(args), args.entropy_weight, x[held], held_neighbors)
    heads = adam_trainer(args, "scan", "scan")(heads, step, x[fit])
    step.select(heads, args.scan_epochs)                                 # the last epoch's weights too
    net = step.best(heads)
    info.update(selected_epoch=step.kept["epoch"], selected_head=step.kept["head"],
                cluster_accuracy=cluster_report("scan", common.embed(net, x)[1][:, 0].argmax(1), data, K))
    return net, fit, info


def self_label_stage(net, x, args):
    """Stage 3 (SCAN step iii) on the images x -> (the fine-tuned net, % confident before). Skipped when no
    prediction is confident: every step would be a zero loss, and Adam's weight decay alone would move the net."""
    confident = confidence_mask(common.embed(net, x)[1][:, 0], args.confidence)[0].float().mean().item()
    print(f"{100 * confident:.1f}% of the training images are predicted above --confidence {args.confidence}"
          + ("" if confident else ": nothing to self-label from, stage skipped (train SCAN longer)"), flush=True)
    if confident == 0 or args.selflabel_epochs == 0:
        return net, 100 * confident
    aug = strong_augment(args)
    step = lambda net_, xb, idx, epoch: selflabel_step(net_, xb, aug, args.confidence)
    return adam_trainer(args, "selflabel", "self-labelling")(net, step, x), 100 * confident


def kmeans_stage(pretext, x, K, args, data):
    """The ablation of Sec. 5: K-means labels, then SCAN's self-labelling loss on them -> (net, K-means labels,
    diagnostics). ambiguity: Sec. 5 does not say which features K-means clusters: the pretext backbone's
    (spherical, 3 restarts). The K-means labels themselves are the pseudo-labels of the scores and of the
    pre-trained variant (Sec. 5: "the labels obtained by K means clustering")."""
    labels = common.kmeans_labels(pretext, x, K, args.seed, n_init=3)
    net = ClusterNet(args.arch, K, 1, args.width, init=args.init, pretrained=bool(args.weights)).to(x.device)
    net.backbone.load_state_dict(pretext.backbone.state_dict())
    aug = strong_augment(args)
    step = lambda net_, xb, idx, epoch: label_step(net_, xb, labels[idx], aug)
    net = adam_trainer(args, "selflabel", "K-means labels", views=1)(net, step, x)
    accuracy = {**cluster_report("kmeans", labels, data, K),
                **cluster_report("kmeans_finetuned", common.embed(net, x)[1][:, 0].argmax(1), data, K)}
    return net, labels, {"cluster_accuracy": accuracy}


def backbone_weights(backbone, weights):
    """--backbone-weights -> what common.Encoder loads: a torchvision weights name (IMAGENET1K_V1, ...) becomes its
    state dict (downloaded once by torchvision); a path or 'random' pass through."""
    if weights not in TORCHVISION_WEIGHTS:
        return weights
    import torchvision
    try:
        return torchvision.models.get_model_weights(backbone)[weights].get_state_dict(progress=False)
    except Exception as e:
        raise ValueError(f"--backbone-weights {weights}: could not load torchvision's {backbone} weights "
                         f"({type(e).__name__}); give --backbone-weights PATH to a local state dict")


def adapt_views(args):
    """-> (view, training view) of the images for the pre-trained network: resized to --adapt-size (resize), or the
    central 224/256 of the side resized, MSCL's Resize(256) + CenterCrop(224) (center); training adds a crop of
    80-100% and a flip (ambiguity: the paper names no augmentation for Eq. 2)."""
    def region(xb):
        if args.adapt_crop == "resize":
            return xb
        side = xb.shape[-1]
        keep = round(side * 224 / 256)
        first = (side - keep) // 2
        return xb[..., first:first + keep, first:first + keep]
    view = lambda xb: F.interpolate(common.to_float(region(xb)), size=args.adapt_size, mode="bilinear",
                                    align_corners=False)
    crop = common.SimCLRAugment(args.adapt_size, scale=(0.8, 1.0), jitter=0.0, p_gray=0.0)
    return view, lambda xb: crop(region(xb))


@torch.no_grad()
def recompute_bn(model, x, view, batch_size):
    """BatchNorm statistics recomputed on the training images for the model's (averaged) weights: one pass,
    cumulative average (torch.optim.swa_utils.update_bn), instead of the average of the epochs' statistics."""
    torch.optim.swa_utils.update_bn((view(x[i:i + batch_size]) for i in range(0, len(x), batch_size)), model)


def adapt_stage(labels, x, K, args, data):
    """Sec. 3.2: DN2 on the un-adapted ImageNet backbone, then Eq. 2 fine-tuning on the pseudo-labels with the
    end-of-epoch weights averaged -> (the final model, {"dn2" (and "pretrained_bn" with --recompute-bn): metrics})."""
    view, train_view = adapt_views(args)
    clf = ClusterNet(f"imagenet_{args.backbone}", K, 1, weights=backbone_weights(args.backbone, args.backbone_weights))
    clf = clf.to(x.device)
    metrics = {"dn2": score_net(clf, data, x, "knn", args.knn_k, view=view)}
    if args.adapt_freeze == "layer2":   # MSCL's and PANDA's code: the stem, layer1 and layer2 keep ImageNet's weights
        for part in (clf.backbone.conv1, clf.backbone.bn1, clf.backbone.layer1, clf.backbone.layer2):
            part.requires_grad_(False)
    step = AdaptStep(labels, train_view)
    train = stage_trainer(args, "adapt", "adapt", views=1, epochs=args.adapt_epochs, batch_size=args.adapt_batch_size,
                          lr=args.adapt_lr, final_lr=args.adapt_final_lr, optimizer="adam", warmup_epochs=0,
                          weight_decay=0.0)                 # ambiguity: the paper names no weight decay
    clf = train(clf, step, x)
    step.add(clf)                          # the last epoch's weights: Sec. 4.3 averages all 5 end-of-epoch models
    if not args.no_average:
        print(f"scoring the average of {step.n_averaged} end-of-epoch weights", flush=True)
        clf.load_state_dict(step.average)
    if args.recompute_bn:                  # on a copy: the final model keeps the averaged statistics
        recomputed = copy.deepcopy(clf)
        recompute_bn(recomputed, x, view, args.adapt_batch_size)
        metrics["pretrained_bn"] = score_net(recomputed, data, x, args.ood_score, args.knn_k, labels, view)
    return clf, metrics


# ----------------------------------------------------------------------------------------------
# Deviations. SCAN's code is the official clustering code; MSCL's code is the same lab's pre-trained pipeline (no
# SCAN-OOD code is public). "-": silent or not applicable.
#   topic          paper          SCAN's code            MSCL's code      ours                    why
#   -------------  -------------  ---------------------  ---------------  ----------------------  -------------------
#   pretext init   -              kaiming-normal,        - (ImageNet      the same (--init        SCAN's code; on
#                                 fan_out, on every      weights)         torchvision) in both    digits also AUROC
#                                 conv (torchvision's                     presets and the digits  96.4 +- 2.1 against
#                                 ResNet init)                            default                 94.1 +- 2.9 with
#                                                                                                 PyTorch's (5 seeds)
#   pretext loss   -              anchors: the first     -                NT-Xent over the rows   the same expected
#   anchors                       view's B rows only                      of both views (the      loss and gradient
#                                                                         mean over 2B): the mean (the views are
#                                                                         of both orders          exchangeable); one
#                                                                                                 draw's gradient 33-
#                                                                                                 39% apart (below)
#   pretext lr     -              cosine set at each     -                cosine set every batch  the loop's schedule;
#   schedule                      epoch's start (one lr                   (common.lr_at)          at most 0.31% of the
#                                 per epoch)                                                      peak apart
#   precision      -              float32                float32          bf16 autocast on CUDA   speed; --amp off
#                                                                         while training (--amp   trains as the
#                                                                         auto; losses in         official code
#                                                                         float32); every score
#                                                                         in float32
#   strong         -              PIL per image: flip,   -                the same ops, ranges    one batched call on
#   augmentation                  4 of 14 ops (shear,                     and order, nearest      the device: no host
#                                 translate +-0.1),                       pixel, 8-bit levels     sync, ~1.9x the
#                                 Cutout side 1..16                       (PIL's to 1 level);     kernels of SimCLR's
#                                 after Normalize                         Cutout fill 0.5 = 0     augmentation
#                                 (fill: the mean                         after our
#                                 colour)                                 normalisation
#   anchor and     -              two forward passes     -                one pass of both        half the launches
#   neighbour                                                             (BatchNorm over both)
#   SCAN loss      -log <p, q>    BCE: the gradient      -                SCAN's gradient, from   exact where <p, q>
#   where <p, q>                  stops (clamp at                         log <p, q> (the value   underflows float32
#   < 1e-12                       1e-12)                                  stays <= 28.6 there)
#   model          -              lowest SCAN loss       -                the same on 10% of the  test images never
#   selection                     (entropy weight 1)                      training images, held   choose a model
#                                 over epochs x heads,                    out of stages 2-3
#                                 on the test split                       (--val-fraction)
#   heads          -              1 (CIFAR-10 config)    -                1 in the paper preset,  a short stage gains
#                                                                         3 on digits             from a choice
#   nothing        -              an error (a batch      -                no image: the stage is  weight decay alone
#   confident                     with none)                              skipped; a batch: loss  would move the net
#                                                                         0                       and no sync
#   K              10 for every   10 (CIFAR-10)          -                10 in the paper         Sec. 5 advises the
#                  data set                                               preset; digits: the     true count when
#                                                                         class count             known
#   K-means        features not   -                      -                spherical K-means on    the features SCAN
#   labels         named                                                  the pretext backbone;   starts from
#   (Sec. 5)                                                              SCAN's self-label loss
#   ImageNet       "ImageNet      -                      resnet152(       V1 pinned               the lab's code;
#   weights        pre-training"                         pretrained=      (--backbone-weights)    torchvision's
#                                                        True): V1                                default is V2
#   input of the   -              -                      Resize(256) +    paper preset: MSCL's;   the lab's code
#   ImageNet net                                         CenterCrop(224)  default: resize
#                                                                         (--adapt-crop)
#   input scaling  -              CIFAR-10 statistics    ImageNet         (x - 0.5) / 0.5; the    BatchNorm follows the
#                                 (mean 0.4914, 0.4822,  statistics       ImageNet net: ImageNet  first convolution: a
#                                 0.4465; std 0.2023,                     statistics (common.     scale and shift
#                                 0.1994, 0.2010)                         Encoder)                change only the zero-
#                                                                                                 padded border (the
#                                                                                                 stds within 1.5%)
#   frozen layers  -              -                      conv1 .. layer2  paper preset: MSCL's;   the lab's code
#                                                                         default: none
#                                                                         (--adapt-freeze)
#   fine-tuning    -              -                      -                crop 80-100% + flip,    the paper names
#                                                                         no weight decay         none
#   weight         5 end-of-      -                      -                the same, BatchNorm     --recompute-bn also
#   average        epoch weights                                          statistics averaged     scores recomputed
#                                                                         too                     ones
#   kNN distance   "the           - (no OOD score)       squared L2 of    cosine similarity to    the metric the paper
#                  distance"                             L2-normalised    the nearest (k = 1,     names (DN2, after
#                  (Sec. 3.2);                           features (2 - 2  Sec. 4.3), every kNN    MeanShifted)
#                  cosine named                          cos), summed     score
#                  only for DN2                          over the 2
#                                                        nearest
#   Mahalanobis    per-cluster    -                      -                on the pseudo-labels,   invertible for
#                  covariance                                             ridge 1e-6              small clusters
#   digits         -              -                      -                digit-safe pretext      no paper trains on
#                                                                         augmentation, 16 px,    digits
#                                                                         short stages
#
# The pretext loss, measured on the CPU (ResNet-18 width 64 at initialisation, 256 CIFAR-10 training images, SCAN's
# pretext augmentation, tau 0.1, 3 draws): SCAN's loss written out, averaged over both view orders, equals
# common.nt_xent to 1e-6 (its gradient to 5e-5 relative); the gradient of one order alone is 33-39% of its norm
# from ours. The schedules compared: lr 0.4 to 4e-4, 500 epochs of 97 steps (batch 512).


# ----------------------------------------------------------------------------------------------
# Presets: --preset NAME; explicit flags win.

PAPER = dict(
    dataset="cifar10",                  # paper: Sec. 4, CIFAR-10, all 10 classes in-distribution
    ood=["cifar100", "svhn", "lsun_resize"],  # paper: Tab. 2 (LSUN FIX exists only on CSI's Google Drive: add it
                                        # as folder:PATH)
    size=32,                            # paper: Sec. 4, CIFAR-10's 32 x 32
    arch="resnet18", width=64,          # paper: Tab. 2 "SCAN Features, ResNet-18"; public code: SCAN's CIFAR ResNet
    init="torchvision",                 # public code: SCAN's CIFAR ResNet, kaiming-normal fan_out on every conv
    epochs=500,                         # public code: SCAN's simclr_cifar10.yml
    batch_size=512,                     # public code
    optimizer="sgd",                    # public code
    lr=0.4,                             # public code
    momentum=0.9,                       # public code
    weight_decay=1e-4,                  # public code
    final_lr=4e-4,                      # public code: cosine to lr x 1e-3
    warmup_epochs=0,                    # public code
    tau=0.1,                            # public code: SimCLR temperature
    crop_min=0.2,                       # public code: crop scale (0.2, 1)
    num_neighbors=20,                   # public code: top-20 neighbours
    clusters=10,                        # paper: Sec. 4.3, K = 10 for every data set, ImageNet-30 included
    heads=1,                            # public code: num_heads 1
    entropy_weight=5.0,                 # public code: scan_cifar10.yml
    scan_epochs=50,                     # public code
    scan_batch_size=128,                # public code
    scan_lr=1e-4,                       # public code: Adam, constant
    scan_weight_decay=1e-4,             # public code
    selflabel_epochs=200,               # public code
    selflabel_batch_size=1000,          # public code
    selflabel_lr=1e-4,                  # public code: Adam, constant
    selflabel_weight_decay=1e-4,        # public code
    confidence=0.99,                    # public code: self-labelling threshold
    val_fraction=0.1,                   # ours: SCAN selects on test images (ambiguity: at --val-fraction)
    backbone="resnet152",               # paper: Sec. 4.3 / Tab. 2 "Ours, ResNet-152"
    backbone_weights="IMAGENET1K_V1",   # public code: MSCL's resnet152(pretrained=True) (ambiguity: at
                                        # --backbone-weights)
    adapt_crop="center",                # public code: MSCL's Resize(256) + CenterCrop(224) (ambiguity: --adapt-crop)
    adapt_freeze="layer2",              # public code: MSCL freezes conv1-layer2 (ambiguity: at --adapt-freeze)
    adapt_epochs=5,                     # paper: Sec. 4.3
    adapt_lr=1e-5,                      # paper: Sec. 4.3, Adam, cosine annealing from 1e-5 ...
    adapt_final_lr=1e-6,                # paper: Sec. 4.3 ... to 1e-6
    adapt_size=224,                     # public code: MSCL's 224 x 224 input
    adapt_batch_size=64,                # ours (ambiguity: the paper gives no batch size)
    ood_score="knn",                    # paper: Sec. 3.2
    knn_k=1,                            # paper: Sec. 4.3, k = 1 for every kNN evaluation
)

QUICK = dict(
    dataset="cifar10", id_classes="0-5", subset=6000, width=16,  # ours: CIFAR-10 under --data-root, a CPU setting
    size=32,                            # ours: CIFAR-10's own size (the digits default is 16)
    init="torchvision",                 # public code: SCAN's CIFAR ResNet, as the paper preset
    epochs=12,                          # ours: the pretext stage is about half the run
    batch_size=256,                     # ours
    lr=0.4,                             # public code: SCAN's pretext
    final_lr=4e-4,                      # public code: cosine to lr x 1e-3
    weight_decay=1e-4,                  # public code
    scan_epochs=4,                      # ours
    scan_lr=1e-3,                       # ours: a ~100x shorter SCAN stage than SCAN's, at 10x its lr
    selflabel_epochs=3,                 # ours
    selflabel_batch_size=500,           # ours: 12 steps per epoch
)

PRESETS = {"paper": PAPER, "quick": QUICK}


# ----------------------------------------------------------------------------------------------
# Command line: build_parser(), check_args() and, once the data is loaded, check_sizes() and n_clusters():
# every flag checked before any work.

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[harness.arg_parser()])
    g = p.add_argument_group("scan_ood")
    g.add_argument("--tau", type=float, default=0.1, help="SimCLR temperature (pretext)")
    g.add_argument("--crop-min", type=float, default=0.2, help="smallest crop scale of the pretext augmentation")
    g.add_argument("--num-neighbors", type=int, default=20, help="neighbours mined per image (SCAN: 20)")
    g.add_argument("--clusters", type=int, default=0, help="K (default: the number of in-distribution classes)")
    g.add_argument("--heads", type=int, default=1, help="clustering heads trained at once; the lowest-loss one is kept")
    g.add_argument("--entropy-weight", type=float, default=5.0, help="weight of the entropy term of the SCAN loss")
    g.add_argument("--scan-epochs", type=int, default=None, help="SCAN stage (SCAN's: 50; default: half of --epochs)")
    g.add_argument("--scan-batch-size", type=int, default=128)
    g.add_argument("--scan-lr", type=float, default=1e-4, help="Adam, constant")
    g.add_argument("--scan-weight-decay", type=float, default=1e-4)
    g.add_argument("--selflabel-epochs", type=int, default=None,
                   help="self-labelling stage (SCAN's: 200; default: a quarter of --epochs)")
    g.add_argument("--selflabel-batch-size", type=int, default=1000)
    g.add_argument("--selflabel-lr", type=float, default=1e-4, help="Adam, constant")
    g.add_argument("--selflabel-weight-decay", type=float, default=1e-4)
    g.add_argument("--confidence", type=float, default=0.99, help="self-labelling threshold on the softmax maximum")
    # ambiguity: SCAN keeps the epoch and head of lowest SCAN loss (entropy weight 1) on the CIFAR-10 test split;
    # the paper does not say how SCAN-OOD selects. Test images must not choose the model: we select on a held-out
    # part of the training images, which then train no clustering stage (they still train the pretext stage and
    # are training images for every score).
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the training images held out to select the SCAN epoch and head")
    g.add_argument("--labels", default="scan", choices=["scan", "kmeans"],
                   help="pseudo-labels from SCAN, or from K-means on the pretext features (ablation, Sec. 5)")
    g.add_argument("--backbone", default=None, choices=[a[len("imagenet_"):] for a in common.IMAGENET_ARCHS],
                   help="also run the pre-trained variant with this torchvision ResNet (paper: resnet152)")
    # ambiguity: no SCAN-OOD code is public. "ImageNet pre-training" (Sec. 4.3): the same lab's MSCL and PANDA code
    # load torchvision's pretrained=True, i.e. IMAGENET1K_V1 (torchvision's default is now V2 for ResNet-152).
    # --weights (shared by every script) is where the --arch encoder of every stage starts; this flag is the
    # --backbone classifier's alone.
    g.add_argument("--backbone-weights", default=None,
                   help=f"the --backbone's weights: {', '.join(TORCHVISION_WEIGHTS)} (torchvision's, default V1), PATH "
                        f"to a state dict, or random (testing only); --weights is the --arch encoder's start")
    # ambiguity: the paper names neither the input transform nor frozen layers; MSCL's and PANDA's code use
    # Resize(256) + CenterCrop(224) and freeze conv1 through layer2.
    g.add_argument("--adapt-crop", default="resize", choices=["resize", "center"],
                   help="resize: the whole image resized to --adapt-size; center: the central 224/256 of it (MSCL)")
    g.add_argument("--adapt-freeze", default="none", choices=["none", "layer2"],
                   help="layer2: conv1, bn1, layer1, layer2 keep their ImageNet weights (MSCL, PANDA)")
    g.add_argument("--adapt-epochs", type=int, default=5)
    g.add_argument("--adapt-batch-size", type=int, default=64)
    g.add_argument("--adapt-lr", type=float, default=1e-5, help="Adam, cosine to --adapt-final-lr")
    g.add_argument("--adapt-final-lr", type=float, default=1e-6)
    g.add_argument("--adapt-size", type=int, default=224, help="the backbone's input side")
    g.add_argument("--no-average", action="store_true", help="score the last epoch's weights, not their average")
    g.add_argument("--recompute-bn", action="store_true",
                   help="also score the averaged weights with BatchNorm statistics recomputed on the training images")
    g.add_argument("--ood-score", default="knn", choices=["knn", "mahalanobis", "msp"],
                   help="the final model's OOD score: kNN on its features, Mahalanobis to the pseudo-label "
                        "Gaussians, or the softmax maximum")
    g.add_argument("--knn-k", type=int, default=1, help="kNN score: similarity to the k-th nearest training image")
    # Defaults: digits 0-5 at 16 x 16 (the digits are 8 x 8: nothing is lost), a width-8 ResNet-18, every stage short.
    # The SCAN stage is ~100x shorter than SCAN's, so it runs at 10x SCAN's lr; self-labelling at 10x collapsed into
    # one cluster, so it keeps 1e-4. init: public code, SCAN's (torchvision's); on digits it also scores higher than
    # PyTorch's default (SCAN features, seeds 0-4: AUROC 96.4 +- 2.1 against 94.1 +- 2.9).
    p.set_defaults(size=16, width=8, init="torchvision", epochs=20, batch_size=128, lr=0.4, final_lr=4e-4,
                   weight_decay=1e-4, heads=3, scan_lr=1e-3, scan_batch_size=64, selflabel_batch_size=128)
    return p


def check_args(args):
    """Every flag of a stage that runs, before any work: pretext and self-labelling always (K-means labels train with
    the self-labelling settings), the SCAN stage with --labels scan, the pre-trained variant with --backbone. A flag
    of a stage that does not run is not checked: its default may not fit the run (--adapt-batch-size 64 on 60
    images)."""
    check = harness.check
    harness.follow_epochs(args, "scan_ood", "scan_epochs", lambda epochs: max(1, epochs // 2))
    harness.follow_epochs(args, "scan_ood", "selflabel_epochs", lambda epochs: max(1, epochs // 4))
    check(args.clusters or harness.count_classes(args.dataset), "--clusters", args.clusters,
          f"K >= 2: {args.dataset} has no class folders to count the clusters from")
    check(args.tau > 0, "--tau", args.tau, "a number > 0")
    check(0 < args.crop_min <= 1, "--crop-min", args.crop_min, "a number in (0, 1]")
    check(args.clusters == 0 or args.clusters >= 2, "--clusters", args.clusters, "0 (the class count) or >= 2")
    check(args.knn_k >= 1, "--knn-k", args.knn_k, "an integer >= 1")
    check(args.backbone_weights is None or args.backbone is not None, "--backbone-weights", args.backbone_weights,
          "--backbone too (the weights are the pre-trained variant's; --weights starts the --arch encoder)")
    stages = ["selflabel"] + ["scan"] * (args.labels == "scan") + ["adapt"] * bool(args.backbone)
    for stage in stages:
        epochs, batch = getattr(args, f"{stage}_epochs"), getattr(args, f"{stage}_batch_size")
        check(epochs >= (0 if stage == "selflabel" else 1), f"--{stage}-epochs", epochs,
              "an integer >= 0 (0: no self-labelling)" if stage == "selflabel" else "an integer >= 1")
        check(batch >= 2, f"--{stage}-batch-size", batch, "an integer >= 2")
        lr = getattr(args, f"{stage}_lr")
        check(0 < lr <= harness.FLOAT32_MAX, f"--{stage}-lr", lr,
              "a finite number > 0 (at most 3.4e38: the optimizer's float)")
        if stage != "adapt":
            wd = getattr(args, f"{stage}_weight_decay")
            check(wd >= 0, f"--{stage}-weight-decay", wd, "a number >= 0")
    if "scan" in stages:
        check(args.num_neighbors >= 1, "--num-neighbors", args.num_neighbors, "an integer >= 1")
        check(args.heads >= 1, "--heads", args.heads, "an integer >= 1")
        feat = harness.encoder_size(args.arch, args.width)[1]
        harness.check_memory(args, "--heads", args.heads, 16 * args.heads * max(args.clusters, 2) * (feat + 1),
                             f"{args.heads} heads of {max(args.clusters, 2)}+ clusters (with gradients, Adam state)")
        check(args.entropy_weight >= 0, "--entropy-weight", args.entropy_weight, "a number >= 0")
        check(0 < args.confidence < 1, "--confidence", args.confidence, "a number in (0, 1)")
        check(0 < args.val_fraction <= 0.5, "--val-fraction", args.val_fraction, "a number in (0, 0.5]")
    if "adapt" in stages:
        check(0 <= args.adapt_final_lr <= args.adapt_lr, "--adapt-final-lr", args.adapt_final_lr,
              f"a number in [0, --adapt-lr {args.adapt_lr}]")
        check(args.adapt_size >= 8, "--adapt-size", args.adapt_size, "an integer >= 8")
        check(args.backbone_weights in (None, "random", *TORCHVISION_WEIGHTS) or os.path.isfile(args.backbone_weights),
              "--backbone-weights", args.backbone_weights,
              f"{', '.join(TORCHVISION_WEIGHTS)}, random, or an existing state-dict file")
        args.backbone_weights = args.backbone_weights or "IMAGENET1K_V1"


def check_sizes(args, n):
    """The flags that count training images, against the n loaded ones, for the stages that run (as check_args):
    before any stage trains."""
    check = harness.check
    check(args.batch_size <= n, "--batch-size", args.batch_size, f"at most the {n} training images")
    check(args.knn_k <= n, "--knn-k", args.knn_k, f"at most the {n} training images")
    if args.labels == "scan":
        n_fit = n - len(split_held_out(n, args.val_fraction, args.seed)[1])       # the SCAN stages' images
        check(args.num_neighbors < n_fit, "--num-neighbors", args.num_neighbors,
              f"fewer than the {n_fit} images of the SCAN stage")
        for stage in ("scan", "selflabel"):
            size = getattr(args, f"{stage}_batch_size")
            check(size <= n_fit, f"--{stage}-batch-size", size, f"at most the {n_fit} images of the SCAN stages")
    else:
        check(args.selflabel_batch_size <= n, "--selflabel-batch-size", args.selflabel_batch_size,
              f"at most the {n} training images")
    if args.backbone:
        check(args.adapt_batch_size <= n, "--adapt-batch-size", args.adapt_batch_size,
              f"at most the {n} training images")


def n_clusters(args, data, n):
    """K: --clusters, else the number of in-distribution classes (ambiguity: Sec. 4.3 uses K = 10 for every data
    set; Sec. 5 advises the ground-truth number of classes when it is known)."""
    K = args.clusters or len(data.id_classes)
    if K < 2:
        raise ValueError(f"--clusters {args.clusters}: expected K >= 2: the {K} in-distribution class gives one "
                         f"cluster; give --clusters K")
    if K > n:
        raise ValueError(f"--clusters {K}: more than the {n} training images")
    return K


# ----------------------------------------------------------------------------------------------
# Main: pretext -> SCAN -> self-labelling (or K-means labels) -> pre-trained variant -> the final model's scores.

@harness.script_main("scan_ood", build_parser, PRESETS, check_args,
                     may_change=("ood_score", "knn_k", "no_average", "recompute_bn"))
def main(args, data, device, t_start):
    x = data.train_x.to(device)
    check_sizes(args, len(x))
    K = args.clusters = n_clusters(args, data, len(x))                   # recorded resolved: build_model reads it
    pretext = pretext_stage(x, args, device)
    metrics = {"simclr_knn": score_net(pretext, data, x, "knn", args.knn_k)}
    if args.labels == "scan":
        net, fit, info = scan_stage(pretext, x, K, args, data)
        net, info["confident_after_scan"] = self_label_stage(net, x[fit], args)
        labels = features(net, x)[1].argmax(1)                           # the pseudo-labels of every training image
        info["cluster_accuracy"].update(cluster_report("selflabel", labels, data, K))
    else:
        net, labels, info = kmeans_stage(pretext, x, K, args, data)
    if args.backbone:                      # the pre-trained classifier becomes the final model (Sec. 3.2)
        metrics[f"{args.labels}_features"] = score_net(net, data, x, args.ood_score, args.knn_k, labels)
        net, adapt_metrics = adapt_stage(labels, x, K, args, data)
        metrics.update(adapt_metrics)
    # The final model's scores through score_state and score, as a later scorer of the run folder computes them;
    # the intermediate variants above (simclr_knn, and with --backbone the SCAN features, dn2) are reported beside.
    scorer = harness.Scorer.from_args("scan_ood", args, net, score_state(net, x, labels, args))
    return harness.finish(args, "scan_ood", scorer, data, device, t_start, more_metrics=metrics,
                         main_variant=main_variant(args), **info)


if __name__ == "__main__":
    main()
