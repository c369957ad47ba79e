"""Masked Contrastive Learning (MCL) with Self-Ensemble Inference (SEI): OOD detection by class-wise Gaussians.

Cho, Seol, Lee, "Masked Contrastive Learning for Anomaly Detection", IJCAI 2021. Equation numbers are the paper's.

Training (Sec. 2): SimCLR whose temperature is a mask over pairs of views (the class-conditional mask, CCM, Eq. 3
and 11): a view repels views of other classes at 1/tau, views of its own class and rotation only at alpha << 1/tau,
and its own class at another rotation at beta in between. Stochastic positive attraction (SPA, Eq. 7-9) also pulls
each view towards one view of another image of its class, drawn at random. Every image enters the batch rotated
0/90/180/270 degrees, its rotation being the auxiliary label (Sec. 2.4), so the joint label is (class, rotation).
Inference (Sec. 3): one Gaussian per (class, rotation) on the L2-normalised projection z; a test image is seen in
its 4 rotations (and their mirror images: 8 views), each view scored by minus the squared Mahalanobis distance to
its rotation's Gaussians (Eq. 12, 15); the views are aggregated (Eq. 17-20); prediction = argmax over classes,
OOD score = the predicted class's score (Eq. 13-14). The paper uses true class labels (`--labels true`);
`--labels kmeans` replaces them with K-means clusters of a SimCLR warm-up (our unsupervised extension).

    python mcl.py                           # digits 0-5 vs 6-9, a few minutes on a CPU
    python mcl.py --labels kmeans           # no class labels: K-means pseudo-labels after a SimCLR warm-up
    python mcl.py --no-spa / --no-aux       # ablations (Table 3); --no-ccm --no-spa --no-aux = SimCLR at tau
    python mcl.py --preset quick            # CIFAR-10 classes 0-5 vs 6-9, 6,000 images, width 16, CPU
    python mcl.py --preset paper            # the paper's CIFAR-10 run (ResNet-34, 400 epochs, batch 256 x 4)

Each run evaluates every SEI size up to --sei (1, 4, 8), all three aggregations and both feature layers (LF = the
backbone's pooled feature, PH = the projection head, Table 6) from one pass over the test views, prints that grid,
and reports the configured one (--sei, --sei-agg, --feature-layer) as its result.

Measured on digits (the default: classes 0-5 in-distribution, OOD = digits 6-9 of the test split; ResNet-18 of
width 8 at 16 x 16, 10 epochs of 862 images x 4 rotations x 2 views, batch 32 images; 5-7 minutes per run on a
2-core CPU shared with other jobs). Mean ± std over --seed 0/1/2 of the AUROC against digits 6-9 and (in
brackets) the accuracy on the six classes, every SEI size and aggregation read from the same runs:

    python mcl.py ... --seed S          SEI 1      4: avg        max      w-avg      8: avg        max      w-avg
    (no flags)                  PH   69.5±9.7    81.4±6.5  74.1±11.6   79.6±7.7    74.1±8.1  73.4±11.4   75.6±8.5
                                   (76.6±3.7)                        (83.3±3.7)                        (76.9±1.4)
                                LF   89.2±4.8    94.3±1.8   92.9±2.5   94.6±1.6    78.8±5.0   91.9±2.4   90.1±2.8
                                   (92.6±2.5)                        (96.8±0.9)                        (95.4±0.4)
    --labels kmeans             PH  74.0±14.2   79.9±11.1  73.8±15.6  78.4±12.9   76.8±11.8  71.6±16.8  76.7±13.1
                                   (62.9±12.2)                        (63.0±11.2)                        (65.2±9.3)
                                LF   91.7±2.0    93.2±2.5   93.4±2.0   93.5±2.4    81.3±4.4   92.3±2.2   89.9±3.3
                                   (62.7±11.5)                        (63.7±11.8)                        (62.6±13.1)
    --no-spa                    PH   86.8±2.4    91.3±1.4   87.1±1.7   90.3±0.9    83.6±0.6   85.0±2.5   85.6±1.1
                                   (89.4±1.8)                        (93.2±2.4)                        (89.6±2.2)
                                LF   93.2±0.6    95.3±0.7   94.8±0.5   95.5±0.4    81.8±1.6   93.8±0.4   92.1±0.9
                                   (96.7±0.7)                        (97.9±0.8)                        (96.2±1.7)
    --no-aux                    PH   76.3±1.1    84.9±2.4   77.7±5.4   83.4±3.3    70.8±4.2   73.6±6.0   74.8±3.6
                                   (75.0±1.6)                        (89.1±3.1)                        (79.3±3.1)
                                LF   92.1±2.7    94.9±0.5   93.2±0.2   94.8±0.4    71.4±3.0   92.1±0.3   91.0±0.1
                                   (94.9±1.2)                        (98.7±0.2)                        (97.0±0.6)
    --no-ccm --no-spa --no-aux  PH   80.1±1.9    83.9±1.4   77.4±3.2   83.4±0.7    66.8±1.2   72.0±1.5   73.5±1.6
                                   (81.8±4.5)                        (89.4±4.9)                        (81.0±7.6)
                                LF   90.4±1.3    92.1±1.2   90.5±0.6   92.4±0.9    70.6±4.9   86.6±1.4   84.6±2.5
                                   (90.7±3.5)                        (97.6±1.7)                        (95.3±2.0)
    (--labels kmeans: SimCLR warm-up of 10 epochs, K = 6 clusters; its accuracy is Hungarian-matched.)

The paper's inference (PH, 8-way, w-avg: the default) is not the best reading on digits: mirrored digits are not
digits, so the 8-way views hurt, and the projection head (128-d from a 64-d backbone) scores worse than LF.
On these short runs SPA hurts (--no-spa is better everywhere), and MCL's LF scores are on a par with SimCLR's
once 4-way SEI is used. --no-aux gains from 4-way SEI too (unlike the paper's Table 5): the Gaussians of each
rotation are fitted on rotated training images. The paper's gains are for 400 CIFAR-10 epochs; we have not
reproduced them. K-means labels (no class labels at all) come close to true labels on LF (93.5 vs 94.6 at
4-way w-avg) although the clusters match the classes only 63% of the time.

CIFAR-10, a path check only: on this shared CPU the quick preset (5 epochs, 6,000 images) ran at about 4 images/s,
too slow to finish, so the run was cut to 1 epoch on 2,000 images with 4-way SEI:
    python mcl.py --preset quick --epochs 1 --subset 2000 --sei 4      # 8 + 5 minutes (train + evaluation)
gives near-chance OOD scores against classes 6-9 (AUROC: PH 49.3 with 4-way w-avg, LF 52.1-52.5) and accuracy
37-43% on classes 0-5 (chance: 17%). That is what one epoch buys; it says nothing about the method.

Cost: mcl_loss (forward + backward, CPU, 1 thread, on a loaded machine) takes 1.7 s for the paper's batch of 2048
views (256 images x 4 rotations x 2 views; NT-Xent: 0.4 s) against 104 s for one training step of a width-16
ResNet-18 on the same 2048 views at 32 x 32; 46 s for 8192 views (1024 images x 4 x 2; NT-Xent: 11 s).
"""
import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F

import common

PAPER = {
    "dataset": "cifar10",           # Sec. 4.1
    "size": 32,                     # CIFAR's own size
    "ood": ["svhn", "cifar100"],    # Table 1; LSUN(F) and ImageNet(F) are CSI's Google-Drive sets: add --ood folder:PATH
    "arch": "resnet34",             # Table 1 (ResNet-18 in Table 2)
    "width": 64,                    # the standard ResNet
    "proj_hidden": 2048,            # public code: head 512 -> 2048 -> 128
    "proj_dim": 128,                # public code
    "epochs": 400,                  # public code (the paper gives no epoch count)
    "batch_size": 256,              # Sec. 4: batch 1024 = 256 images x 4 rotations (public code's sampler)
    "optimizer": "sgd",             # Sec. 4
    "lr": 1.2,                      # Sec. 4: 0.3 x 1024 / 256
    "momentum": 0.9,                # Sec. 4
    "weight_decay": 1e-6,           # Sec. 4
    "nesterov": True,               # public code
    "warmup_epochs": 0,             # Sec. 4: cosine schedule without warm-up
    "final_lr": 6e-4,               # public code: cosine down to lr x 5e-4
    "tau": 0.2,                     # Sec. 4
    "alpha": 0.05,                  # Sec. 4, App. A.3
    "beta": 2.5,                    # App. A.3: 1 / (2 tau)
    "spa_weight": 1.0,              # Sec. 4: lambda
    "jitter": 0.4,                  # Sec. 4: colour strength 0.5 = SimCLR's 0.8 x 0.5 (hue 0.2 x 0.5 = jitter / 4)
    "min_crop": 0.08,               # Sec. 4: inception crop
    "labels": "true",               # Sec. 3.1 and public code: ground-truth CIFAR-10 labels
    "sei": 8,                       # Table 4: 8-way SEI
    "sei_agg": "w-avg",             # Table 4: best AUROC
    "feature_layer": "ph",          # Table 6: projection head
    "fit_fraction": 0.2,            # public code: Gaussians fitted on the first fifth of the training set
    "ridge": 1e-7,                  # public code: 1e-9 I on unit 128-d features, i.e. ~1e-7 x the mean variance
}
QUICK = {  # the README's CPU row: real CIFAR-10, reduced so that one run takes about 10 minutes on 2 cores
    "dataset": "folder:../shared/data/cifar10",
    "id_classes": "0-5",
    "size": 32,
    "subset": 6000,
    "width": 16,
    "epochs": 5,
    "batch_size": 64,               # x 4 rotations x 2 views = 512 views per step
    "lr": 0.3,                      # Sec. 4's 0.3 x batch / 256 at 256 rotated images
}
PRESETS = {"paper": PAPER, "quick": QUICK}

N_ROT = 4                       # the auxiliary task: 4-way rotation (Sec. 4, "Selecting self-supervision tasks")
SEI_SIZES = (1, 4, 8)           # plain inference, 4 rotations, 4 rotations x {upright, mirrored} (Fig. 3)
AGGREGATIONS = ("avg", "max", "w-avg")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[common.arg_parser()])
    g = parser.add_argument_group("MCL")
    g.add_argument("--tau", type=float, default=0.2, help="temperature: CCM's value for other classes (Eq. 3)")
    g.add_argument("--alpha", type=float, default=0.05, help="CCM for same class and rotation (Eq. 11)")
    g.add_argument("--beta", type=float, default=2.5, help="CCM for same class, other rotation (Eq. 11)")
    g.add_argument("--spa-weight", type=float, default=1.0, help="lambda of Eq. 10")
    g.add_argument("--no-ccm", action="store_true", help="ablation: CCM = 1/tau everywhere (NT-Xent)")
    g.add_argument("--no-spa", action="store_true", help="ablation: no stochastic positive attraction")
    g.add_argument("--no-aux", action="store_true", help="ablation: no rotations in training")
    g.add_argument("--labels", default="true", choices=["true", "kmeans"],
                   help="class labels: the data set's (paper) or K-means clusters of a SimCLR warm-up")
    g.add_argument("--clusters", type=int, default=0, help="K for --labels kmeans (default: the number of ID classes)")
    g.add_argument("--simclr-epochs", type=int, default=10, help="SimCLR warm-up before K-means (--labels kmeans)")
    g.add_argument("--jitter", type=float, default=0.4, help="colour jitter (brightness, contrast, saturation; hue / 4)")
    g.add_argument("--min-crop", type=float, default=0.08, help="smallest random-crop area")
    g.add_argument("--proj-hidden", type=int, default=None, help="hidden width of the head (default: backbone's)")
    g.add_argument("--proj-dim", type=int, default=128)
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g = parser.add_argument_group("inference")
    g.add_argument("--sei", type=int, default=8, choices=SEI_SIZES, help="test views: 1, 4 rotations, x 2 mirrors")
    g.add_argument("--sei-agg", default="w-avg", choices=AGGREGATIONS, help="Eq. 17 (avg), 18 (max), 19-20 (w-avg)")
    g.add_argument("--feature-layer", default="ph", choices=["ph", "lf"], help="projection head z or backbone h")
    g.add_argument("--fit-fraction", type=float, default=1.0, help="fraction of the training images the Gaussians see")
    g.add_argument("--ridge", type=float, default=0.01, help="covariance ridge, times the class's mean variance")
    # Defaults: a few minutes on digits with a 2-core CPU (the 8 x 8 digits lose nothing at 16 x 16).
    parser.set_defaults(size=16, width=8, epochs=10, batch_size=32, lr=0.3, weight_decay=1e-6)
    return parser


# ----------------------------------------------------------------------------------------------
# Losses. z = cat([view1, view2]) (2N x d), row i and row i + N are the two views of one (rotated) image; labels
# are per row. Cosine similarities are not clamped (the public code clamps them at 1e-7; the paper does not).

def ccm_mask(y_main, y_aux, alpha=0.05, beta=2.5, tau=0.2):
    """Class-conditional mask (Eq. 11; Eq. 3 when y_aux is constant): 2N x 2N inverse temperatures,
    alpha for same class and rotation, beta for same class and other rotation, 1/tau otherwise."""
    same_main = y_main[:, None] == y_main[None]
    same_aux = y_aux[:, None] == y_aux[None]
    mask = torch.full(same_main.shape, 1 / tau, device=y_main.device)
    mask[same_main] = beta
    mask[same_main & same_aux] = alpha
    # The partner view keeps 1/tau (public code): with Eq. 4's alpha there, the numerator's term would be missing
    # from its own denominator and p_ccm would not be a probability.
    i = torch.arange(len(mask), device=mask.device)
    mask[i, i.roll(len(mask) // 2)] = 1 / tau
    return mask


def _cosine(z):
    z = F.normalize(z.float(), dim=1)
    return z @ z.T


def ccm_loss(z, y_main, y_aux, alpha=0.05, beta=2.5, tau=0.2):
    """L_ccm (Eq. 4-6): cross-entropy over the logits sim(i, k) x CCM(i, k), own view left out, the partner view
    the target (its logit sim / tau, as in Eq. 4's numerator); the mean over all 2N views."""
    logits = _cosine(z) * ccm_mask(y_main, y_aux, alpha, beta, tau)
    logits = logits.fill_diagonal_(float("-inf"))
    partner = torch.arange(len(z), device=z.device).roll(len(z) // 2)
    return F.cross_entropy(logits, partner)


def spa_positives(same, generator=None):
    """One uniform draw per row among the True entries of the 2N x 2N mask `same` (-1 where a row has none): the
    argmax of i.i.d. uniform scores over the allowed entries is uniform over them, with no loop over rows."""
    scores = torch.rand(same.shape, device=same.device, generator=generator).masked_fill_(~same, -1.0)
    pos = scores.argmax(1)
    return torch.where(same.any(1), pos, torch.full_like(pos, -1))


def spa_loss(z, y_main, y_aux, alpha=0.05, beta=2.5, tau=0.2, generator=None):
    """(1 / 2N) sum_i l_spa(i) (Eq. 7-10): each view's positive is drawn uniformly from B_i^+, the views of other
    images with its joint label (Eq. 7); the denominator holds every view of another image, at CCM (Eq. 8).
    generator: a torch.Generator on z's device for the draw (None: the global RNG, which checkpoints carry)."""
    n2 = len(z)
    sim = _cosine(z)
    image = torch.arange(n2, device=z.device) % (n2 // 2)
    other_image = image[:, None] != image[None]
    joint_same = (y_main[:, None] == y_main[None]) & (y_aux[:, None] == y_aux[None])
    pos = spa_positives(joint_same & other_image, generator)
    has = pos >= 0
    logits = (sim * ccm_mask(y_main, y_aux, alpha, beta, tau)).masked_fill(~other_image, float("-inf"))
    # The drawn positive enters its denominator at 1/tau, like its numerator (public code); Eq. 8 as printed
    # would give it alpha there. Same reasoning as for the partner view in ccm_mask.
    is_pos = torch.zeros_like(other_image).scatter_(1, pos.clamp_min(0)[:, None], has[:, None])
    logits = torch.where(is_pos, sim / tau, logits)
    # Eq. 10 divides by 2N: a view without a positive adds 0 to the sum.
    return F.cross_entropy(logits[has], pos[has], reduction="sum") / n2


def mcl_loss(z, y_main, y_aux, alpha=0.05, beta=2.5, tau=0.2, spa_weight=1.0, generator=None):
    """L_MCL = L_ccm + lambda L_spa (Eq. 10) -> (loss, {"ccm": ..., "spa": ...}). spa_weight 0 skips SPA.
    Under torchrun, over the views of all ranks; each rank draws its own SPA positives for that global batch, so
    the gradient DDP averages is the mean over one draw per rank (as unbiased as a single draw)."""
    z, y_main, y_aux = (torch.cat([common.all_gather(half) for half in t.chunk(2)]) for t in (z, y_main, y_aux))
    ccm = ccm_loss(z, y_main, y_aux, alpha, beta, tau)
    if spa_weight == 0:
        return ccm, {"ccm": ccm.detach()}
    spa = spa_loss(z, y_main, y_aux, alpha, beta, tau, generator)
    return ccm + spa_weight * spa, {"ccm": ccm.detach(), "spa": spa.detach()}


def alpha_conditions(alpha, tau, spa_weight, n_views, n_joint_classes):
    """Appendix A's two conditions on alpha, with |B+| ~ 2N / C as in A.3; warns for each one violated and returns
    their descriptions. Eq. 24: alpha < 1 / (tau |B+|), else SPA stops attracting its positive. Eq. 31:
    alpha >= lambda / (tau (1 + lambda) (2N - 2)), else every cluster collapses onto its centroid."""
    size_pos = n_views / n_joint_classes
    attract = 1 / (tau * size_pos)
    collapse = spa_weight / (tau * (1 + spa_weight) * (n_views - 2))
    problems = []
    if not alpha < attract:
        problems.append(f"alpha {alpha:g} >= 1 / (tau |B+|) = {attract:.4g} (Eq. 24): SPA loses its attraction "
                        f"({n_views} views, {n_joint_classes} joint classes)")
    if alpha < collapse:
        problems.append(f"alpha {alpha:g} < lambda / (tau (1 + lambda) (2N - 2)) = {collapse:.4g} (Eq. 31): "
                        f"clusters may collapse onto their centroids")
    for p in problems:
        warnings.warn(p)
    return problems


# ----------------------------------------------------------------------------------------------
# Batches: every image of the batch in its 4 rotations (Sec. 2.4), all in the same batch as the public sampler.

def rotated_views(xb, aug, n_rot=N_ROT):
    """B uint8 images -> (2 x n_rot x B views, rotation of each view). Rows [r B, (r + 1) B) of each half hold
    rotation r, so row i and row i + n_rot B are two views of one rotated image. Augmenting before rotating
    keeps the flip horizontal in the upright frame, as the public code's rotation-dependent flip does."""
    k = torch.arange(n_rot, device=xb.device).repeat_interleave(len(xb))
    x = xb.repeat(n_rot, 1, 1, 1)
    views = torch.cat([common.rotate90(aug(x), k), common.rotate90(aug(x), k)])
    return views, k.repeat(2)


def sei_views(xb, n_views):
    """Test views of a batch (Sec. 3.2, Fig. 3), image-major: row b x n_views + v is view v of image b, the
    rotation v % 4 of image b, mirrored first when v >= 4."""
    x = common.to_float(xb)
    views = [common.rotate90(x.flip(3) if v >= N_ROT else x, v % N_ROT) for v in range(n_views)]
    return torch.stack(views, 1).flatten(0, 1)


# ----------------------------------------------------------------------------------------------
# Inference: class-conditional Gaussians, Mahalanobis scores, self-ensemble (Sec. 3).

def sei_aggregate(S, how):
    """S: N x V x C scores (minus squared distances) of V views -> (predicted class, its score), Eq. 13-14.
    avg: mean over views (Eq. 17); max: max over views (Eq. 18); w-avg (Eq. 19-20): weights 1/distance per view
    and class, so the aggregate is minus the harmonic mean of the distances (public code; Eq. 19's sum over
    classes of 1/S is undefined for the negative scores of Eq. 12)."""
    if how == "avg":
        agg = S.mean(1)
    elif how == "max":
        agg = S.amax(1)
    elif how == "w-avg":
        w = 1 / (-S).clamp_min(1e-12)
        agg = (w * S).sum(1) / w.sum(1)
    else:
        common.fail(f"unknown SEI aggregation '{how}' (known: {', '.join(AGGREGATIONS)})")
    score, pred = agg.max(1)
    return pred, score


@torch.no_grad()
def view_features(model, x, n_views, device, batch_size=512):
    """-> {"lf": h, "ph": z}, each N x n_views x d and L2-normalised (the public code normalises z; we do h as
    well). All views of an image go through the network in one batch."""
    h, z = common.embed(model, x, max(1, batch_size // n_views), lambda xb: sei_views(xb.to(device), n_views))
    return {"lf": F.normalize(h, dim=1).view(len(x), n_views, -1), "ph": F.normalize(z, dim=1).view(len(x), n_views, -1)}


def sei_scores(feats, gaussians):
    """feats N x V x d, gaussians[r] = (means, chol) of rotation r -> N x V x C scores: each view against the
    Gaussians of its own rotation (Eq. 15-16). Score = minus the squared distance (Eq. 12 as printed drops the
    minus sign its text and Eq. 15 state)."""
    return torch.stack([-common.mahalanobis(feats[:, v], *gaussians[v % len(gaussians)]) for v in range(feats.shape[1])], 1)


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = common.parse_args(build_parser(), PRESETS, argv)
    if not 0 < args.fit_fraction <= 1:
        common.fail(f"--fit-fraction {args.fit_fraction} must be in (0, 1]")
    device = common.setup(args, "mcl")
    t_start = time.time()
    data = common.load_data(args)
    x = data.train_x.to(device)
    ids = torch.as_tensor(data.id_classes)
    has_labels = len(ids) > 0 and bool((data.train_y >= 0).all())
    to_index = lambda y: torch.searchsorted(ids, y).to(device)                  # class ids -> 0 .. C - 1
    n_rot = 1 if args.no_aux else N_ROT
    alpha, beta = (1 / args.tau, 1 / args.tau) if args.no_ccm else (args.alpha, args.beta)
    spa_weight = 0.0 if args.no_spa else args.spa_weight
    model = common.Encoder(args.arch, args.proj_dim, args.proj_hidden, width=args.width).to(device)
    aug = common.SimCLRAugment(args.size, scale=(args.min_crop, 1.0), jitter=args.jitter)

    if args.labels == "true":
        if not has_labels:
            common.fail(f"{args.dataset} has no class labels: use --labels kmeans")
        labels, n_classes = to_index(data.train_y), len(ids)
    else:  # our extension: SimCLR warm-up, then K-means clusters of the backbone feature as the class labels
        n_classes = args.clusters or len(ids)
        if n_classes == 0 or n_classes > len(x):
            common.fail(f"--clusters {n_classes}: give 1 <= K <= {len(x)} (the data has no class count to default to)")

        def simclr_loss(net, xb, idx, epoch):
            return common.nt_xent(net(rotated_views(xb, aug, n_rot)[0])[1], args.tau)

        warm = argparse.Namespace(**{**vars(args), "epochs": args.simclr_epochs})
        common.train(model, simclr_loss, x, warm, os.path.join(args.out, "simclr.pt"))
        h = common.embed(model, x)[0]
        labels = common.kmeans(h, n_classes, metric="cosine", seed=args.seed)[1]   # cosine on h: our choice
        print(f"K-means: {n_classes} clusters of sizes {torch.bincount(labels).tolist()}", flush=True)

    n_views = 2 * n_rot * args.batch_size
    if not (args.no_ccm or args.no_spa):
        alpha_conditions(alpha, args.tau, spa_weight, n_views, n_classes * n_rot)
    state = {"labels": labels}

    def loss_fn(net, xb, idx, epoch):
        views, y_aux = rotated_views(xb, aug, n_rot)
        y_main = state["labels"][idx].repeat(2 * n_rot)
        return mcl_loss(net(views)[1], y_main, y_aux, alpha, beta, args.tau, spa_weight)

    common.train(model, loss_fn, x, args, os.path.join(args.out, "checkpoint.pt"), state=state)
    labels = state["labels"]

    # Inference: Gaussians per (class, rotation) on the upright training images' rotations, then every SEI size
    # up to --sei, every aggregation and both layers from one pass over each test set's views.
    t_eval = time.time()
    n_fit = max(1, round(args.fit_fraction * len(x)))
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:n_fit].to(device)
    fit_rot = min(args.sei, N_ROT)                                  # rotations the test views need Gaussians for
    train_feats = view_features(model, x[keep], fit_rot, device)
    gaussians = {layer: [common.fit_gaussians(f[:, r], labels[keep], n_classes, args.ridge) for r in range(fit_rot)]
                 for layer, f in train_feats.items()}
    sets = {"test": data.test_x, **data.ood}
    scores = {}
    for name, xs in sets.items():
        feats = view_features(model, xs, args.sei, device)
        scores[name] = {layer: sei_scores(f, gaussians[layer]) for layer, f in feats.items()}
    test_y = to_index(data.test_y) if has_labels else None

    grid = {}
    for layer in ("ph", "lf"):
        for n in (s for s in SEI_SIZES if s <= args.sei):
            for how in (AGGREGATIONS if n > 1 else ("avg",)):
                pred, s_id = sei_aggregate(scores["test"][layer][:, :n], how)
                metrics = {ood: common.ood_metrics(s_id, sei_aggregate(scores[ood][layer][:, :n], how)[1])
                           for ood in data.ood}
                acc = None
                if test_y is not None:
                    acc = (100 * (pred == test_y).float().mean().item() if args.labels == "true"
                           else common.cluster_accuracy(pred, test_y))
                grid[f"{layer} sei{n} {how if n > 1 else '-'}"] = {"accuracy": acc, "metrics": metrics}
    main_key = f"{args.feature_layer} sei{args.sei} {args.sei_agg if args.sei > 1 else '-'}"
    results, accuracy = grid[main_key]["metrics"], grid[main_key]["accuracy"]

    print("layer SEI agg      acc  " + "  ".join(f"{ood[:18]:>18}" for ood in data.ood) + "   (AUROC)")
    for key, r in grid.items():
        acc = f"{r['accuracy']:5.1f}" if r["accuracy"] is not None else "    -"
        print(f"{key:<16} {acc}  " + "  ".join(f"{m['auroc']:18.2f}" for m in r["metrics"].values()))
    title = (f"MCL ({'kmeans' if args.labels == 'kmeans' else 'true'} labels"
             + "".join(f", {f}" for f in ("no_ccm", "no_spa", "no_aux") if getattr(args, f))
             + f"), {main_key}" + (f", accuracy {accuracy:.2f}" if accuracy is not None else ""))
    common.print_results(results, title)
    print(f"evaluation {time.time() - t_eval:.1f}s, total {time.time() - t_start:.1f}s", flush=True)
    out = {"method": "mcl", "config": vars(args), "metrics": results, "accuracy": accuracy, "grid": grid,
           "seconds": time.time() - t_start, "device": str(device)}
    common.save_results(os.path.join(args.out, "results.json"), out)
    return out


if __name__ == "__main__":
    main()
