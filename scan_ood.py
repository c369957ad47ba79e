"""SCAN-OOD: out-of-distribution detection without class labels via SCAN pseudo-labels (Cohen, Abutbul, Hoshen).

Unlabelled multi-class anomaly detection = unsupervised clustering + supervised multi-class OOD detection.
Clustering is SCAN (Van Gansbeke et al.), rebuilt here in three stages on common.py:
  1. pretext:   SimCLR on the in-distribution training images; mine each image's k nearest neighbours.
  2. scan:      clustering heads trained so that an image and a mined neighbour get the same confident cluster,
                while the mean prediction stays spread over all clusters (SCAN loss).
  3. selflabel: fine-tune on the confident predictions (> 0.99) of the un-augmented images, strong augmentation.
Then two OOD detectors (higher score = in-distribution):
  - self-supervised (paper Sec. 3.1): kNN (k = 1, cosine) on the SCAN network's penultimate features;
  - pre-trained (paper Sec. 3.2): fine-tune an ImageNet ResNet on the pseudo-labels (Eq. 2) for 5 epochs, average
    the weights of the 5 epochs, kNN on its penultimate features; DN2 (the un-adapted features) is reported beside it.

    python scan_ood.py                                   # self-supervised variant on digits 0-5 vs 6-9, minutes on a CPU
    python scan_ood.py --labels kmeans                   # K-means pseudo-labels instead of SCAN (paper Sec. 5)
    python scan_ood.py --preset quick                    # CIFAR-10 classes 0-5 (6,000 images) vs 6-9, width 16, CPU
    python scan_ood.py --preset paper                    # CIFAR-10 vs CIFAR-100/SVHN/LSUN, SCAN's settings + ResNet-152
    python scan_ood.py --backbone resnet18 --weights random --adapt-size 64   # exercises the pre-trained path only
    python scan_ood.py --from-stage selflabel --out runs/x  # reuse the pretext and scan checkpoints of runs/x

Every run also reports the pretext-only SimCLR kNN score and the cluster accuracy (Hungarian matching, for
information: the labels are never used for training). Checkpoints: <out>/{pretext,scan,selflabel,adapt}.pt.

Measured (2-core CPU shared with other jobs, digits 0-5 vs 6-9 at 16 px, width 16, mean ± std over --seed 0/1/2;
AUROC / FPR95 in %, cluster accuracy on the training images; one run took 18-24 min under a load of ~12, about
4 min on an idle machine by estimate):
    python scan_ood.py --seed S                  SCAN features, kNN (Sec. 3.1)    AUROC 90.3 ± 4.9   FPR95 45.6 ± 13.6
                                                 pretext SimCLR, kNN (same runs)  AUROC 89.8 ± 3.3   FPR95 54.4 ± 15.2
    python scan_ood.py --seed S --labels kmeans  K-means labels, fine-tuned, kNN  AUROC 78.0 ± 3.2   FPR95 75.8 ± 4.0
    cluster accuracy: SCAN stage 59.4 ± 9.2, after self-labelling 62.4 ± 6.0, K-means 57.1 ± 9.4 (chance 16.7)
Per seed (0/1/2): SCAN 95.7/86.1/89.1, SimCLR 93.2/86.7/89.5: SCAN helps where the pretext neighbours are good
(seed 0: 64% same-class neighbours, 26% of predictions above 0.99) and not otherwise (seed 2: none above 0.99, so
no self-labelling). The K-means row fits a fresh head in 60 Adam steps at 1e-4 (its training CE ends at 1.5, log 6 =
1.8): at this budget it mostly measures the backbone drifting, not the labels. The --labels kmeans runs reused each
seed's pretext checkpoint (--from-stage scan), which is what a full run recomputes.
Pre-trained path, exercised only: no ImageNet weights can be downloaded here, so a RANDOM-weight torchvision
ResNet-18 at 32 px stood in (--seed 0 --from-stage adapt --backbone resnet18 --weights random --adapt-size 32):
DN2 97.5, fine-tuned + averaged 96.7 AUROC (random conv features already separate 8x8 digits); 4 min.
CIFAR-10 (path check, not quality): the full --preset quick did not fit the session (pretext alone ran at 465-560 s
per epoch under the load), so it ran cut short: --preset quick --epochs 2 --scan-epochs 1 --selflabel-epochs 1,
30 min: SimCLR kNN 52.7, SCAN features 53.7 AUROC vs classes 6-9; cluster accuracy 24.8 (chance 16.7).
"""
import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------
# Presets (--preset paper | quick); explicit flags override them.

PAPER = dict(
    dataset="cifar10",                  # Sec. 4: CIFAR-10, all 10 classes in-distribution
    size=32,                            # Sec. 4: CIFAR-10's 32x32 resolution
    ood=["cifar100", "svhn", "lsun_resize"],  # Tab. 2 (LSUN (FIX) is only on CSI's Google Drive: not loadable here)
    arch="resnet18",                    # Tab. 2: "SCAN Features, ResNet-18"
    width=64,                           # public code: the standard CIFAR ResNet-18
    epochs=500,                         # public code: SCAN pretext, simclr_cifar10.yml
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
    clusters=10,                        # Sec. 4.3: K = 10 for all clustering
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
    backbone="resnet152",               # Sec. 4.3 / Tab. 2 "Ours, ResNet-152"
    weights="torchvision",              # Sec. 4.3: ImageNet pre-training
    adapt_epochs=5,                     # Sec. 4.3
    adapt_lr=1e-5,                      # Sec. 4.3: Adam, cosine annealing from 1e-5 ...
    adapt_final_lr=1e-6,                # Sec. 4.3: ... to 1e-6
    adapt_size=224,                     # our choice: the ImageNet input size (paper silent)
    adapt_batch_size=64,                # our choice (paper silent)
    score="knn",                        # Sec. 3.2
    knn_k=1,                            # Sec. 4.3: k = 1 for all kNN evaluations
)

QUICK = dict(
    dataset="folder:../shared/data/cifar10",  # the README results table: real CIFAR-10 on a CPU
    size=32,                            # CIFAR-10's own size (the digits default is 16)
    id_classes="0-5",                   # README table: classes 6-9 are the OOD set
    subset=6000,                        # README table
    width=16,                           # README table
    epochs=12,                          # our choice: the pretext stage is about half the run
    batch_size=256,                     # our choice
    lr=0.4,                             # public code (SCAN pretext)
    final_lr=4e-4,                      # public code: cosine to lr x 1e-3
    weight_decay=1e-4,                  # public code
    scan_epochs=4,                      # our choice
    scan_lr=1e-3,                       # our choice: a ~100x shorter SCAN stage than SCAN's, at 10x its lr
    selflabel_epochs=3,                 # our choice
    selflabel_batch_size=500,           # our choice: 12 steps per epoch
)

PRESETS = {"paper": PAPER, "quick": QUICK}

STAGES = ("pretext", "scan", "selflabel", "adapt")


# ----------------------------------------------------------------------------------------------
# Model: a backbone with linear clustering heads (stages 2-3), or a pre-trained classifier (Sec. 3.2).

class ClusterNet(common.Encoder):
    """common.Encoder whose head is `heads` linear heads of `clusters` outputs each.
    forward(x) -> (h penultimate features, logits B x heads x clusters)."""

    def __init__(self, arch, clusters, heads=1, width=64, weights=None):
        super().__init__(arch, width=width, weights=weights)
        self.arch, self.width, self.clusters, self.heads = arch, width, clusters, heads
        self.head = nn.Linear(self.feat_dim, heads * clusters)

    def forward(self, x):
        h, logits = super().forward(x)
        return h, logits.view(len(h), self.heads, self.clusters)


def keep_head(net, head):
    """A one-head copy of a ClusterNet: same backbone, head number `head` only."""
    one = ClusterNet(net.arch, net.clusters, 1, width=net.width).to(next(net.parameters()).device)
    one.backbone.load_state_dict(net.backbone.state_dict())
    rows = slice(head * net.clusters, (head + 1) * net.clusters)
    one.head.weight.data.copy_(net.head.weight.data[rows])
    one.head.bias.data.copy_(net.head.bias.data[rows])
    return one


# ----------------------------------------------------------------------------------------------
# Stage 1: neighbours of the pretext features.

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


# ----------------------------------------------------------------------------------------------
# Stage 2: the SCAN loss.

def scan_loss(anchor_logits, neighbor_logits, entropy_weight=5.0):
    """SCAN (Van Gansbeke et al. Eq. 2; this paper Sec. 2.1 (ii)) on logits (..., B, K), any leading head dims:
        consistency = -1/B sum_i log <p(x_i), p(n_i)>,   entropy = -sum_k pbar_k log pbar_k,  pbar = mean_i p(x_i),
        total = consistency - entropy_weight * entropy        (so minimising total maximises the entropy).
    Returns (total, consistency, entropy), each of shape (...). The inner product is taken in log space
    (logsumexp of the summed log-probabilities): SCAN's log(clamp(<p, q>)) without its clamp."""
    log_p = F.log_softmax(anchor_logits.float(), -1)
    log_q = F.log_softmax(neighbor_logits.float(), -1)
    consistency = -torch.logsumexp(log_p + log_q, -1).mean(-1)
    mean_p = common.all_gather(log_p.exp().mean(-2)[None]).mean(0)   # under torchrun: pbar over the global batch
    entropy = -(mean_p * mean_p.clamp_min(1e-8).log()).sum(-1)
    return consistency - entropy_weight * entropy, consistency, entropy


@torch.no_grad()
def head_losses(logits, neighbors, entropy_weight):
    """SCAN's head selection: each head's total loss over all anchors and all their mined neighbours, on
    un-augmented images. logits N x H x K -> H losses (one loss evaluation per neighbour column)."""
    per_head = logits.transpose(0, 1)                                                # H x N x K
    cols = [scan_loss(per_head, per_head[:, neighbors[:, j]], entropy_weight)[0] for j in range(neighbors.shape[1])]
    return torch.stack(cols).mean(0)


# ----------------------------------------------------------------------------------------------
# Stage 3: self-labelling with confident predictions; also the loss of the K-means-label ablation.

def confidence_mask(weak_logits, threshold=0.99):
    """SCAN self-labelling: the samples whose softmax maximum on the un-augmented view exceeds threshold
    -> (mask B bool, predicted cluster B)."""
    conf, target = F.softmax(weak_logits.float(), -1).max(-1)
    return conf > threshold, target


def weighted_cross_entropy(logits, target, mask):
    """Cross-entropy over the masked samples, class c weighted by 1 / (its count among them) (SCAN's
    ConfidenceBasedCE: a weighted mean, so every present class weighs the same). 0 if nothing is masked."""
    counts = torch.bincount(target[mask], minlength=logits.shape[-1]).float()
    w = mask.float() / counts.clamp_min(1)[target]
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (w * ce).sum() / w.sum().clamp_min(1e-12)


def self_label_loss(weak_logits, strong_logits, threshold=0.99):
    """SCAN step (iii): cross-entropy of the strong view against the confident predictions of the weak one."""
    mask, target = confidence_mask(weak_logits, threshold)
    return weighted_cross_entropy(strong_logits, target, mask), {"confident": mask.float().mean()}


# ----------------------------------------------------------------------------------------------
# Pre-trained variant (Sec. 3.2): weight averaging over the fine-tuning epochs.

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


# ----------------------------------------------------------------------------------------------
# Scoring (higher = in-distribution): kNN (Sec. 3.1, 3.2, 4.3), Mahalanobis and MSP (Eq. 1) for Tab. 5.

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


def evaluate_net(net, data, x_train, kind, k, device, transform=None):
    """Metrics per OOD set of a one-head ClusterNet (or a common.Encoder with kind 'knn') on its features."""
    def features(imgs):
        h, out = common.embed(net, imgs.to(device), transform=transform)
        return h, (out[:, 0] if out.dim() == 3 else out)                 # one head: B x K logits
    score = make_scorer(kind, *features(x_train), k)
    return common.evaluate(lambda imgs: score(*features(imgs)), data)


# ----------------------------------------------------------------------------------------------
# Command line and the pipeline.

def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[common.arg_parser()])
    g = p.add_argument_group("scan_ood")
    g.add_argument("--from-stage", default="pretext", choices=STAGES,
                   help="start here, loading the earlier stages' checkpoints from --out")
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


def stage_args(args, **overrides):
    """A copy of args with one stage's optimiser settings, for common.train (which reads epochs, lr, ...)."""
    return argparse.Namespace(**{**vars(args), **overrides})


def main(argv=None):
    args = common.parse_args(make_parser(), PRESETS, argv)
    if args.weights and not args.backbone:
        common.fail("--weights needs --backbone (the pre-trained variant)")
    if args.from_stage == "adapt" and not args.backbone:
        common.fail("--from-stage adapt needs --backbone")
    if args.backbone and not args.weights:
        args.weights = "torchvision"
    device = common.setup(args, "scan_ood")
    t_start = time.time()
    data = common.load_data(args)
    x = data.train_x.to(device)
    labelled = bool(data.id_classes) and bool(data.train_y.min() >= 0)
    K = args.clusters or len(data.id_classes)      # Sec. 5: "we advise using the ground-truth number of clusters"
    if K < 2:
        common.fail("give --clusters K (>= 2): the data has no labels to count classes from")
    if K > len(x):
        common.fail(f"--clusters {K} is larger than the training set ({len(x)} images)")
    ckpt = lambda stage: os.path.join(args.out, f"{stage}.pt")
    start = STAGES.index(args.from_stage)

    def run_stage(stage, model, loss_fn, sargs, **kw):
        """Train a stage, or, before --from-stage, load its finished checkpoint."""
        if STAGES.index(stage) >= start:
            print(f"--- stage {stage}: {sargs.epochs} epochs, {sargs.optimizer} lr {sargs.lr}", flush=True)
            return common.train(model, loss_fn, x, sargs, ckpt(stage), **kw)
        if not os.path.exists(ckpt(stage)):
            common.fail(f"--from-stage {args.from_stage} needs {ckpt(stage)}; run the earlier stages first")
        c = torch.load(ckpt(stage), map_location=device, weights_only=False)
        common.check_config(c["config"], sargs)
        if c["epoch"] < c["config"]["epochs"]:
            common.fail(f"{ckpt(stage)} stopped at epoch {c['epoch']}/{c['config']['epochs']}; finish it with --resume")
        print(f"--- stage {stage}: loaded {ckpt(stage)}", flush=True)
        return common.load_weights(model, c["model"])

    results = {"method": "scan_ood", "config": vars(args), "variants": {}, "cluster_accuracy": {}}

    def report(name, metrics, title):
        common.print_results(metrics, title)
        results["variants"][name] = metrics

    def report_clusters(name, pred):
        if labelled:
            acc = common.cluster_accuracy(pred, data.train_y)
            results["cluster_accuracy"][name] = acc
            print(f"cluster accuracy ({name}, training images, Hungarian): {acc:.2f}%  (chance ~{100 / K:.1f}%)")

    # Stage 1: SimCLR pretext (SCAN step i), then the neighbours of the un-augmented images.
    pretext = common.Encoder(args.arch, proj_dim=128, width=args.width).to(device)  # head 512 -> 512 -> 128 at width 64
    simclr_aug = common.SimCLRAugment(args.size, scale=(args.crop_min, 1.0))
    run_stage("pretext", pretext,
              lambda net, xb, idx, ep: common.nt_xent(net(torch.cat([simclr_aug(xb), simclr_aug(xb)]))[1], args.tau),
              args)
    report("simclr_knn", evaluate_net(pretext, data, x, "knn", args.knn_k, device), "pretext SimCLR, kNN on h")
    pre_h, pre_z = common.embed(pretext, x)

    # Stages 2-3: pseudo-labels, from SCAN + self-labelling or from K-means on the pretext features.
    strong = common.StrongAugment(n_ops=4, cutout=args.size // 2)  # SCAN: Cutout 16 px on 32 px CIFAR
    net = ClusterNet(args.arch, K, 1, args.width).to(device)
    net.backbone.load_state_dict(pretext.backbone.state_dict())
    sl_args = stage_args(args, epochs=args.selflabel_epochs, batch_size=args.selflabel_batch_size,
                         lr=args.selflabel_lr, final_lr=args.selflabel_lr, optimizer="adam",
                         weight_decay=args.selflabel_weight_decay, warmup_epochs=0)
    if args.labels == "scan":
        neighbors = mine_neighbors(pre_z, args.num_neighbors)  # SCAN mines on the head's (projection) features
        if labelled:
            y = data.train_y.to(device)
            purity = (y[neighbors[:, 1:]] == y[:, None]).float().mean().item()
            print(f"mined {args.num_neighbors} neighbours per image; {100 * purity:.1f}% share the image's class")
            results["neighbor_purity"] = 100 * purity
        heads = ClusterNet(args.arch, K, args.heads, args.width).to(device)
        heads.backbone.load_state_dict(pretext.backbone.state_dict())

        def scan_step(net_, xb, idx, epoch):
            pick = torch.randint(neighbors.shape[1], (len(idx),), device=device)   # may be the anchor itself (SCAN)
            logits = net_(torch.cat([strong(xb), strong(x[neighbors[idx, pick]])]))[1]  # one pass, shared BN stats
            anchor, neighbor = logits.transpose(0, 1).chunk(2, dim=1)               # H x B x K each
            total, consistency, entropy = scan_loss(anchor, neighbor, args.entropy_weight)
            return total.sum(), {"consistency": consistency.mean(), "entropy": entropy.mean()}

        run_stage("scan", heads, scan_step,
                  stage_args(args, epochs=args.scan_epochs, batch_size=args.scan_batch_size, lr=args.scan_lr,
                             final_lr=args.scan_lr, optimizer="adam", weight_decay=args.scan_weight_decay,
                             warmup_epochs=0))
        losses = head_losses(common.embed(heads, x)[1], neighbors, args.entropy_weight)
        best = int(losses.argmin())
        print(f"head losses {[round(v, 4) for v in losses.tolist()]}: keeping head {best}")
        net = keep_head(heads, best)
        scan_logits = common.embed(net, x)[1][:, 0]
        report_clusters("scan", scan_logits.argmax(1))
        confident = confidence_mask(scan_logits, args.confidence)[0].float().mean().item()
        print(f"{100 * confident:.1f}% of the training images are predicted above --confidence {args.confidence}"
              + ("" if confident else ": nothing to self-label from, stage skipped (train SCAN longer)"))
        results["confident_after_scan"] = 100 * confident

        def selflabel_step(net_, xb, idx, epoch):
            with torch.no_grad():
                weak = net_(common.to_float(xb))[1][:, 0]
            return self_label_loss(weak, net_(strong(xb))[1][:, 0], args.confidence)

        if confident > 0:  # with none confident every step is a zero loss: Adam's weight decay alone would move the net
            run_stage("selflabel", net, selflabel_step, sl_args)
        pseudo = common.embed(net, x)[1][:, 0].argmax(1)
        report_clusters("selflabel", pseudo)
    else:
        # Sec. 5 does not say which features K-means clusters: we take the pretext backbone's (spherical, 3 restarts).
        pseudo = common.kmeans(pre_h, K, metric="cosine", seed=args.seed, n_init=3)[1]
        report_clusters("kmeans", pseudo)
        run_stage("selflabel", net,  # our choice: SCAN's self-label stage, every image kept, the same 1/frequency weights
                  lambda net_, xb, idx, ep: weighted_cross_entropy(net_(strong(xb))[1][:, 0], pseudo[idx],
                                                                   torch.ones_like(idx, dtype=torch.bool)),
                  sl_args)
        report_clusters("kmeans_finetuned", common.embed(net, x)[1][:, 0].argmax(1))
    name = "scan_features" if args.labels == "scan" else "kmeans_features"
    report(name, evaluate_net(net, data, x, args.score, args.knn_k, device),
           f"self-supervised variant ({args.labels} labels), {args.score} on penultimate features")
    main_variant = name

    # Pre-trained variant (Sec. 3.2): DN2 on the un-adapted backbone, then fine-tune on the pseudo-labels (Eq. 2).
    if args.backbone:
        arch = f"imagenet_{args.backbone}"
        resize = lambda xb: F.interpolate(common.to_float(xb), size=args.adapt_size, mode="bilinear",
                                          align_corners=False)       # 32 -> 224 px: the paper does not say how
        clf = ClusterNet(arch, K, 1, args.width, args.weights).to(device)
        report("dn2", evaluate_net(clf, data, x, "knn", args.knn_k, device, resize), f"DN2: un-adapted {arch}, kNN")
        crop = common.SimCLRAugment(args.adapt_size, scale=(0.8, 1.0), jitter=0.0, p_gray=0.0)  # our choice: crop + flip
        avg = {"average": {}, "n_averaged": 0}

        def add_snapshot():
            sd = {k: v.detach().clone() for k, v in clf.state_dict().items()}
            n = avg["n_averaged"]
            avg["average"] = sd if n == 0 else average_weights([avg["average"], sd], [n, 1])
            avg["n_averaged"] = n + 1

        adapt_args = stage_args(args, epochs=args.adapt_epochs, batch_size=args.adapt_batch_size, lr=args.adapt_lr,
                                final_lr=args.adapt_final_lr, optimizer="adam", warmup_epochs=0, arch=arch,
                                weight_decay=0.0)                              # the paper names no weight decay
        adapt_step = lambda net_, xb, idx, ep: F.cross_entropy(net_(crop(xb))[1][:, 0].float(), pseudo[idx])  # Eq. 2
        run_stage("adapt", clf, adapt_step, adapt_args, state=avg,
                  on_epoch_start=lambda epoch, net_: add_snapshot() if epoch > 0 else None)
        add_snapshot()                        # the last epoch's weights: Sec. 4.3 averages all 5 end-of-epoch models
        if not args.no_average:
            print(f"scoring the average of {avg['n_averaged']} end-of-epoch weights")
            clf.load_state_dict(avg["average"])
        report("pretrained", evaluate_net(clf, data, x, args.score, args.knn_k, device, resize),
               f"pre-trained variant ({arch}, {'last epoch' if args.no_average else 'averaged'}), {args.score}")
        main_variant = "pretrained"

    results.update(metrics=results["variants"][main_variant], main_variant=main_variant,
                   seconds=time.time() - t_start, device=str(device))
    common.save_results(os.path.join(args.out, "results.json"), results)
    print(f"done in {common.fmt_time(results['seconds'])}; results in {os.path.join(args.out, 'results.json')}")
    return results


if __name__ == "__main__":
    main()
