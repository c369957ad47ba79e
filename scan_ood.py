"""SCAN-OOD: out-of-distribution detection without class labels via SCAN pseudo-labels (Cohen, Abutbul, Hoshen).

Unlabelled multi-class anomaly detection = unsupervised clustering + supervised multi-class OOD detection.
Clustering is SCAN (Van Gansbeke et al.) in three stages: (1) pretext: SimCLR on the in-distribution training images,
then each image's nearest neighbours; (2) scan: clustering heads trained so that an image and a mined neighbour get
the same confident cluster while the mean prediction stays spread over all clusters (SCAN loss); (3) selflabel:
fine-tuning on the confident predictions (> 0.99) of the un-augmented images, with strong augmentation. Two OOD
detectors follow (higher score = in-distribution): the self-supervised one (Sec. 3.1), kNN (k = 1, cosine) on the
SCAN network's penultimate features; and the pre-trained one (Sec. 3.2), an ImageNet ResNet fine-tuned on the
pseudo-labels (Eq. 2) for 5 epochs, its end-of-epoch weights averaged, kNN on its penultimate features (DN2, the
un-adapted features, is reported beside it).

    python scan_ood.py                                   # self-supervised variant, digits 0-5 in, 6-9 out
    python scan_ood.py --labels kmeans                   # K-means pseudo-labels instead of SCAN (paper Sec. 5)
    python scan_ood.py --preset quick --data-root DIR    # CIFAR-10 (torchvision's files under DIR), classes 0-5 vs 6-9
    python scan_ood.py --preset paper                    # CIFAR-10 vs CIFAR-100/SVHN/LSUN, SCAN's settings + ResNet-152
    python scan_ood.py --backbone resnet18 --weights random --adapt-size 64   # exercises the pre-trained path only

Every run also reports the pretext-only SimCLR kNN score and the cluster accuracy (Hungarian matching, for
information: labels never train anything). Checkpoints: <out>/{pretext,scan,selflabel,adapt}.pt; --resume loads
the finished stages and continues the unfinished one.
"""
import argparse
import copy
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------
# Presets: --preset NAME; explicit flags win.

PAPER = dict(
    dataset="cifar10",                  # paper: Sec. 4, CIFAR-10, all 10 classes in-distribution
    ood=["cifar100", "svhn", "lsun_resize"],  # paper: Tab. 2 (LSUN FIX exists only on CSI's Google Drive: add it
                                        # as folder:PATH)
    size=32,                            # paper: Sec. 4, CIFAR-10's 32 x 32
    arch="resnet18", width=64,          # paper: Tab. 2 "SCAN Features, ResNet-18"; public code: SCAN's CIFAR ResNet
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
    backbone="resnet152",               # paper: Sec. 4.3 / Tab. 2 "Ours, ResNet-152"
    weights="torchvision",              # paper: Sec. 4.3, ImageNet pre-training
    adapt_epochs=5,                     # paper: Sec. 4.3
    adapt_lr=1e-5,                      # paper: Sec. 4.3, Adam, cosine annealing from 1e-5 ...
    adapt_final_lr=1e-6,                # paper: Sec. 4.3 ... to 1e-6
    adapt_size=224,                     # ours: the ImageNet input size (the paper is silent)
    adapt_batch_size=64,                # ours: the paper is silent
    score="knn",                        # paper: Sec. 3.2
    knn_k=1,                            # paper: Sec. 4.3, k = 1 for every kNN evaluation
)

QUICK = dict(
    dataset="cifar10", id_classes="0-5", subset=6000, width=16,  # ours: CIFAR-10 under --data-root, a CPU setting
    size=32,                            # ours: CIFAR-10's own size (the digits default is 16)
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
# Command line: build_parser() and check_args(), every flag checked before any work.

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[common.arg_parser()])
    g = p.add_argument_group("scan_ood")
    g.add_argument("--tau", type=float, default=0.1, help="SimCLR temperature (pretext)")
    g.add_argument("--crop-min", type=float, default=0.2, help="smallest crop scale of the pretext augmentation")
    g.add_argument("--num-neighbors", type=int, default=20, help="neighbours mined per image (SCAN: 20)")
    g.add_argument("--clusters", type=int, default=0, help="K (default: the number of in-distribution classes)")
    g.add_argument("--heads", type=int, default=1, help="clustering heads trained at once; the lowest-loss one is kept")
    g.add_argument("--entropy-weight", type=float, default=5.0, help="weight of the entropy term of the SCAN loss")
    g.add_argument("--scan-epochs", type=int, default=50)
    g.add_argument("--scan-batch-size", type=int, default=128)
    g.add_argument("--scan-lr", type=float, default=1e-4, help="Adam, constant")
    g.add_argument("--scan-weight-decay", type=float, default=1e-4)
    g.add_argument("--selflabel-epochs", type=int, default=200)
    g.add_argument("--selflabel-batch-size", type=int, default=1000)
    g.add_argument("--selflabel-lr", type=float, default=1e-4, help="Adam, constant")
    g.add_argument("--selflabel-weight-decay", type=float, default=1e-4)
    g.add_argument("--confidence", type=float, default=0.99, help="self-labelling threshold on the softmax maximum")
    g.add_argument("--labels", default="scan", choices=["scan", "kmeans"],
                   help="pseudo-labels from SCAN, or from K-means on the pretext features (ablation, Sec. 5)")
    g.add_argument("--backbone", default=None, choices=[a[len("imagenet_"):] for a in common.IMAGENET_ARCHS],
                   help="also run the pre-trained variant with this torchvision ResNet (paper: resnet152)")
    g.add_argument("--weights", default=None,
                   help="backbone weights: torchvision (default), PATH to a state dict, or random (testing only)")
    g.add_argument("--adapt-epochs", type=int, default=5)
    g.add_argument("--adapt-batch-size", type=int, default=64)
    g.add_argument("--adapt-lr", type=float, default=1e-5, help="Adam, cosine to --adapt-final-lr")
    g.add_argument("--adapt-final-lr", type=float, default=1e-6)
    g.add_argument("--adapt-size", type=int, default=224, help="images are resized to this side for the backbone")
    g.add_argument("--no-average", action="store_true", help="score the last epoch's weights, not their average")
    g.add_argument("--score", default="knn", choices=["knn", "mahalanobis", "msp"])
    g.add_argument("--knn-k", type=int, default=1, help="kNN score: similarity to the k-th nearest training image")
    # Defaults: a few-minute run on digits (862 training images of classes 0-5). Its SCAN stage is ~100x shorter than
    # SCAN's, so it runs at 10x SCAN's lr; self-labelling at 10x collapsed into one cluster (seed 0), so it keeps 1e-4.
    # Digits are 8x8 images: 16 px loses nothing and costs a quarter of 32 px.
    p.set_defaults(size=16, epochs=30, batch_size=128, lr=0.4, final_lr=4e-4, weight_decay=1e-4, heads=3,
                   scan_epochs=20, scan_lr=1e-3, scan_batch_size=64, selflabel_epochs=10, selflabel_batch_size=128)
    return p


def check_args(args):
    check, positive = common.check, lambda v: v > 0
    check(args.tau > 0, "--tau", args.tau, "a number > 0")
    check(0 < args.crop_min <= 1, "--crop-min", args.crop_min, "a number in (0, 1]")
    check(args.num_neighbors >= 1, "--num-neighbors", args.num_neighbors, "an integer >= 1")
    check(args.clusters == 0 or args.clusters >= 2, "--clusters", args.clusters, "0 (the class count) or >= 2")
    check(args.heads >= 1, "--heads", args.heads, "an integer >= 1")
    check(args.entropy_weight >= 0, "--entropy-weight", args.entropy_weight, "a number >= 0")
    for stage in ("scan", "selflabel", "adapt"):
        epochs, batch = getattr(args, f"{stage}_epochs"), getattr(args, f"{stage}_batch_size")
        check(epochs >= (0 if stage == "selflabel" else 1), f"--{stage}-epochs", epochs,
              "an integer >= 0 (0: no self-labelling)" if stage == "selflabel" else "an integer >= 1")
        check(batch >= 2, f"--{stage}-batch-size", batch, "an integer >= 2")
        check(positive(getattr(args, f"{stage}_lr")), f"--{stage}-lr", getattr(args, f"{stage}_lr"), "a number > 0")
    for stage in ("scan", "selflabel"):
        wd = getattr(args, f"{stage}_weight_decay")
        check(wd >= 0, f"--{stage}-weight-decay", wd, "a number >= 0")
    check(0 < args.confidence < 1, "--confidence", args.confidence, "a number in (0, 1)")
    check(0 <= args.adapt_final_lr <= args.adapt_lr, "--adapt-final-lr", args.adapt_final_lr,
          f"a number in [0, --adapt-lr {args.adapt_lr}]")
    check(args.adapt_size >= 8, "--adapt-size", args.adapt_size, "an integer >= 8")
    check(args.knn_k >= 1, "--knn-k", args.knn_k, "an integer >= 1")
    check(args.weights is None or args.backbone is not None, "--weights", args.weights,
          "--backbone too (the weights are the pre-trained variant's)")
    check(args.weights in (None, "torchvision", "random") or os.path.isfile(args.weights), "--weights",
          args.weights, "torchvision, random, or an existing state-dict file")
    if args.backbone and not args.weights:
        args.weights = "torchvision"


# ----------------------------------------------------------------------------------------------
# Losses: SCAN (stage 2), self-labelling (stage 3, also the K-means-label ablation), Eq. 2 (cross-entropy).

@common.float32
def scan_loss(anchor_logits, neighbor_logits, entropy_weight=5.0):
    """SCAN (Van Gansbeke et al. Eq. 2; this paper Sec. 2.1 (ii)) on logits (..., B, K), any leading head dims:
        consistency = -1/B sum_i log <p(x_i), p(n_i)>,   entropy = -sum_k pbar_k log pbar_k,  pbar = mean_i p(x_i),
        total = consistency - entropy_weight * entropy        (so minimising total maximises the entropy).
    Returns (total, consistency, entropy), each of shape (...). The inner product is taken in log space
    (logsumexp of the summed log-probabilities): SCAN's log(clamp(<p, q>)) without its clamp."""
    log_p = F.log_softmax(anchor_logits, -1)
    log_q = F.log_softmax(neighbor_logits, -1)
    consistency = -torch.logsumexp(log_p + log_q, -1).mean(-1)
    mean_p = common.all_gather(log_p.exp().mean(-2)[None]).mean(0)   # under torchrun: pbar over the global batch
    entropy = -(mean_p * mean_p.clamp_min(1e-8).log()).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


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
# Training step: the clustering network, neighbour mining, and the steps of the stages (scan_step,
# selflabel_step, label_step, adapt_step), with SCAN's head selection and the weight average as their state.

class ClusterNet(common.Encoder):
    """common.Encoder whose head is `heads` linear heads of `clusters` outputs each.
    forward(x) -> (h penultimate features, logits B x heads x clusters)."""

    def __init__(self, arch, clusters, heads=1, width=64, weights=None, init="pytorch"):
        super().__init__(arch, width=width, weights=weights, init=init)
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
        common.fail(f"--num-neighbors {k} must be between 1 and the number of training images - 1 ({n - 1})")
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


@torch.no_grad()
def head_losses(logits, neighbors, entropy_weight):
    """SCAN's head selection: each head's total loss over all anchors and all their mined neighbours, on
    un-augmented images. logits N x H x K -> H losses (one loss evaluation per neighbour column)."""
    per_head = logits.transpose(0, 1)                                                # H x N x K
    cols = [scan_loss(per_head, per_head[:, neighbors[:, j]], entropy_weight)[0] for j in range(neighbors.shape[1])]
    return torch.stack(cols).mean(0)


class SCANStep:
    """scan_step over the images x with their mined neighbours, as a step for common.train."""

    def __init__(self, x, neighbors, aug, entropy_weight):
        self.x, self.neighbors, self.aug, self.entropy_weight = x, neighbors, aug, entropy_weight

    def __call__(self, net, xb, idx, epoch):
        return scan_step(net, xb, idx, self.x, self.neighbors, self.aug, self.entropy_weight)


def selflabel_step(net, xb, aug, threshold):
    """SCAN step (iii): the confident predictions on the un-augmented images (no gradient, BatchNorm in training
    mode as SCAN's) are the targets of the strongly augmented view."""
    with torch.no_grad():
        weak = net(common.to_float(xb))[1][:, 0]
    return self_label_loss(weak, net(aug(xb))[1][:, 0], threshold)


def label_step(net, xb, target, aug):
    """The K-means-label ablation (Sec. 5): SCAN's self-labelling loss with every image kept, its K-means cluster
    as the target (ours: the paper does not say how the K-means labels train the network)."""
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
# Scores (higher = in-distribution): kNN (Sec. 3.1, 3.2, 4.3), Mahalanobis and MSP (Eq. 1) for Tab. 5.

def mahalanobis_scorer(train_h, labels, ridge=1e-6):
    """Per-cluster Gaussians on the training features ("the empirical covariance matrix of each cluster", Sec. 3.2)
    -> score(h) = -min_c (h - mu_c)^T S_c^-1 (h - mu_c); ridge x mean variance keeps small clusters invertible.
    Empty clusters are skipped."""
    _, labels = labels.unique(return_inverse=True)
    means, chol = common.fit_gaussians(train_h, labels, int(labels.max()) + 1, ridge)
    return lambda h: -common.mahalanobis(h, means, chol).min(1).values.float()


def make_scorer(kind, train_h, train_logits, k=1):
    """-> score(h, logits) for one of --score knn | mahalanobis | msp; pseudo-labels = argmax of train_logits."""
    if kind == "knn":
        return lambda h, logits: common.knn_scores(train_h, h, k)
    if kind == "mahalanobis":
        maha = mahalanobis_scorer(train_h, train_logits.argmax(-1))
        return lambda h, logits: maha(h)
    if kind == "msp":
        return lambda h, logits: F.softmax(logits.float(), -1).amax(-1)
    common.fail(f"unknown --score '{kind}' (knn, mahalanobis, msp)")


def score_net(net, data, x, kind, k, device, transform=None):
    """{ood set: metrics} of a one-head ClusterNet (or a common.Encoder with kind 'knn') on its features."""
    def features(imgs):
        h, out = common.embed(net, imgs.to(device), transform=transform)
        return h, (out[:, 0] if out.dim() == 3 else out)                 # one head: B x K logits
    score = make_scorer(kind, *features(x), k)
    return common.evaluate(lambda imgs: score(*features(imgs)), data.test_x, data.ood)


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

def stage_config(args, stage, **settings):
    """The TrainConfig of one stage: the shared flags, the stage's own optimiser settings, its checkpoint."""
    return common.TrainConfig.from_args(args, os.path.join(args.out, f"{stage}.pt"), **settings)


def adam_config(args, stage):
    """SCAN's stages 2-3: Adam at a constant learning rate, the stage's own epochs, batch and weight decay."""
    lr = getattr(args, f"{stage}_lr")
    return stage_config(args, stage, epochs=getattr(args, f"{stage}_epochs"), lr=lr, final_lr=lr, optimizer="adam",
                        batch_size=getattr(args, f"{stage}_batch_size"), warmup_epochs=0,
                        weight_decay=getattr(args, f"{stage}_weight_decay"))


def pretext_stage(x, args, device):
    """Stage 1 (SCAN step i): SimCLR on the training images; the head 512 -> 512 -> 128 at width 64, as SCAN's."""
    model = common.Encoder(args.arch, proj_dim=128, width=args.width, init=args.init).to(device)
    aug = common.simclr_augment(args, scale=(args.crop_min, 1.0))        # public code: SCAN's pretext augmentation
    step = lambda net, xb, idx, epoch: common.simclr_step(net, xb, aug, args.tau)
    return common.train(model, step, x, stage_config(args, "pretext"))


def strong_augment(args):
    return common.StrongAugment(n_ops=4, cutout=args.size // 2)         # public code: Cutout 16 px on 32 px CIFAR


def scan_stage(pretext, x, K, args, device, data):
    """Stage 2 (SCAN step ii): neighbours of the pretext projections, SCAN heads trained from the pretext backbone;
    the lowest-loss head kept -> (one-head ClusterNet, diagnostics)."""
    neighbors = mine_neighbors(common.embed(pretext, x)[1], args.num_neighbors)   # public code: on the head's output
    info = {}
    if data.id_classes and data.train_y.min() >= 0:
        y = data.train_y.to(device)
        info["neighbor_purity"] = 100 * (y[neighbors[:, 1:]] == y[:, None]).float().mean().item()
        print(f"mined {args.num_neighbors} neighbours per image; {info['neighbor_purity']:.1f}% share the image's class")
    heads = ClusterNet(args.arch, K, args.heads, args.width, init=args.init).to(device)
    heads.backbone.load_state_dict(pretext.backbone.state_dict())
    step = SCANStep(x, neighbors, strong_augment(args), args.entropy_weight)
    heads = common.train(heads, step, x, adam_config(args, "scan"))
    losses = head_losses(common.embed(heads, x)[1], neighbors, args.entropy_weight)
    best = int(losses.argmin())
    print(f"head losses {[round(v, 4) for v in losses.tolist()]}: keeping head {best}")
    return keep_head(heads, best), info


def self_label_stage(net, x, args):
    """Stage 3 (SCAN step iii) -> the fine-tuned net. Skipped when no prediction is confident: every step would be
    a zero loss, and Adam's weight decay alone would move the net."""
    confident = confidence_mask(common.embed(net, x)[1][:, 0], args.confidence)[0].float().mean().item()
    print(f"{100 * confident:.1f}% of the training images are predicted above --confidence {args.confidence}"
          + ("" if confident else ": nothing to self-label from, stage skipped (train SCAN longer)"), flush=True)
    if confident == 0 or args.selflabel_epochs == 0:
        return net, {"confident_after_scan": 100 * confident}
    aug = strong_augment(args)
    step = lambda net_, xb, idx, epoch: selflabel_step(net_, xb, aug, args.confidence)
    return common.train(net, step, x, adam_config(args, "selflabel")), {"confident_after_scan": 100 * confident}


def kmeans_stage(pretext, x, K, args, device):
    """The ablation of Sec. 5: K-means labels, then SCAN's self-labelling loss on them -> (net, K-means labels).
    ambiguity: Sec. 5 does not say which features K-means clusters: the pretext backbone's (spherical, 3 restarts)."""
    labels = common.kmeans(common.embed(pretext, x)[0], K, metric="cosine", seed=args.seed, n_init=3)[1]
    net = ClusterNet(args.arch, K, 1, args.width, init=args.init).to(device)
    net.backbone.load_state_dict(pretext.backbone.state_dict())
    aug = strong_augment(args)
    step = lambda net_, xb, idx, epoch: label_step(net_, xb, labels[idx], aug)
    cfg = adam_config(args, "selflabel")
    return common.train(net, step, x, cfg), labels


def adapt_stage(pseudo, x, K, args, device, data):
    """Sec. 3.2: DN2 on the un-adapted ImageNet backbone, then Eq. 2 fine-tuning on the pseudo-labels with the
    end-of-epoch weights averaged -> {"dn2": metrics, "pretrained": metrics}."""
    arch = f"imagenet_{args.backbone}"
    resize = lambda xb: F.interpolate(common.to_float(xb), size=args.adapt_size, mode="bilinear",
                                      align_corners=False)            # ambiguity: 32 -> 224 px, the paper is silent
    clf = ClusterNet(arch, K, 1, args.width, args.weights).to(device)
    metrics = {"dn2": score_net(clf, data, x, "knn", args.knn_k, device, resize)}
    crop = common.SimCLRAugment(args.adapt_size, scale=(0.8, 1.0), jitter=0.0, p_gray=0.0)   # ours: crop + flip
    step = AdaptStep(pseudo, crop)
    cfg = stage_config(args, "adapt", epochs=args.adapt_epochs, batch_size=args.adapt_batch_size, lr=args.adapt_lr,
                       final_lr=args.adapt_final_lr, optimizer="adam", warmup_epochs=0,
                       weight_decay=0.0)                                 # ours: the paper names no weight decay
    clf = common.train(clf, step, x, cfg)
    step.add(clf)                          # the last epoch's weights: Sec. 4.3 averages all 5 end-of-epoch models
    if not args.no_average:
        print(f"scoring the average of {step.n_averaged} end-of-epoch weights")
        clf.load_state_dict(step.average)
    metrics["pretrained"] = score_net(clf, data, x, args.score, args.knn_k, device, resize)
    return metrics


def n_clusters(args, data, n):
    """K: --clusters, else the number of in-distribution classes (ambiguity: Sec. 4.3 uses K = 10 for every data
    set; Sec. 5 advises the ground-truth number of classes when it is known)."""
    K = args.clusters or len(data.id_classes)
    if K < 2:
        common.fail("--clusters: give K >= 2; the data has no labels to count classes from")
    if K > n:
        common.fail(f"--clusters {K}: more than the {n} training images")
    return K


# ----------------------------------------------------------------------------------------------
# Main: pretext -> SCAN -> self-labelling (or K-means labels) -> scores -> pre-trained variant.

def main(argv=None):
    args = common.parse_args(build_parser(), PRESETS, argv)
    check_args(args)
    t_start = time.time()
    device = common.setup(args, "scan_ood", may_change=("score", "knn_k", "no_average"))
    data = common.load_data(args)
    x = data.train_x.to(device)
    K = n_clusters(args, data, len(x))
    pretext = pretext_stage(x, args, device)
    metrics = {"simclr_knn": score_net(pretext, data, x, "knn", args.knn_k, device)}
    if args.labels == "scan":
        net, info = scan_stage(pretext, x, K, args, device, data)
        info["cluster_accuracy"] = cluster_report("scan", common.embed(net, x)[1][:, 0].argmax(1), data, K)
        net, confident = self_label_stage(net, x, args)
        info.update(confident)
    else:
        net, labels = kmeans_stage(pretext, x, K, args, device)
        info = {"cluster_accuracy": cluster_report("kmeans", labels, data, K)}
    pseudo = common.embed(net, x)[1][:, 0].argmax(1)
    info["cluster_accuracy"].update(cluster_report("selflabel" if args.labels == "scan" else "kmeans_finetuned",
                                                   pseudo, data, K))
    main_variant = f"{args.labels}_features"
    metrics[main_variant] = score_net(net, data, x, args.score, args.knn_k, device)
    if args.backbone:
        metrics.update(adapt_stage(pseudo, x, K, args, device, data))
        main_variant = "pretrained"
    return common.finish(args, "scan_ood", metrics, data, device, t_start, main_variant=main_variant, **info)


if __name__ == "__main__":
    main()
