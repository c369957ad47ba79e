"""Cluster-aware Contrastive Learning (CCL) for unsupervised OOD detection (Chen, Gui, Fan, 2023, arXiv 2302.02598).

SimCLR (L_self, Eq. 2-3), then K-means on the embedding layer every few epochs and two more losses: each view
pulled to its cluster centre (Eq. 4, per-cluster temperature phi, Eq. 5) and to the views of its cluster in the
batch (Eq. 6), mixed with L_self by Eq. 7-8. A test image scores its cosine to the nearest training image times its
norm (score_cos, Eq. 9), or that over the spread of its K nearest (score_var, Eq. 10), higher = in-distribution.

    python ccl.py                  # digits 0-5 in, 6-9 out: ~13 s of CPU, one thread of a 2-core AMD EPYC
    python ccl.py --lam 0          # its SimCLR setting: the same run without the cluster losses
    python ccl.py --no-ccl | --no-cil | --cluster-layer projection | --n-aug 10    # Tables 2-3; CSI's test views
    python ccl.py --preset paper   # Sec. 4: CIFAR-10, ResNet-18, 1000 + 1000 epochs, LARS: a multi-GPU job

Result on digits, AUROC % over --seed 0-4, mean ± std (README's table: `OMP_NUM_THREADS=1 python ccl.py [--lam 0]
--id-classes SPLIT --seed S`): score_var / score_cos 93.2 ± 1.9 / 88.6 ± 5.8 with 0-5 in (87.7 / 84.0 with the odd
digits in, 84.3 / 91.3 with 4-9 in); its SimCLR setting (--lam 0) 92.2 / 85.9; beside the same runs' baselines,
raw pixels' nearest neighbour 98.5 and an untrained encoder's 82.9 ± 8.7: no learned score beats raw pixels here.

Use it in your code:

    import torch, common, ccl
    model = common.Encoder("resnet18", width=4)                           # the encoder CCL trains
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)        # unlabelled training images
    step = ccl.CCLStep(common.SimCLRAugment(16, blur=True), x, clusters=3, start=0)   # the joint stage
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(2):
        step.update(model, epoch)                                         # K-means on the features of all of x
        for idx in torch.randperm(len(x)).split(16):                      # a batch: its rows of x
            loss, terms = step(model, x[idx], idx, epoch)                 # Eq. 8 and its terms (Eq. 3, 4, 6)
            opt.zero_grad()
            loss.backward()
            opt.step()
    views = dict(layer="embedding", aug=ccl.ensemble_augment(16), n_aug=4)   # h of 4 CSI views (n_aug=0: clean)
    train_f = ccl.features(model, x, **views)
    test_f = ccl.features(model, torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), **views)
    print(ccl.score_cos(train_f, test_f), ccl.score_var(train_f, test_f, k=3))   # 8 scores each, higher = ID
"""
import argparse
import os

import torch
import torch.nn.functional as F

import common
import harness


# ----------------------------------------------------------------------------------------------
# Losses: L_self is common.nt_xent on z (Eq. 2-3). h: 2N x d features of the views, row i and i + N one image.

def concentration(h, centers, assign, alpha=10.0, mean=None):
    """Eq. 5, PCL's concentration of each cluster c: phi_c = sum_t ||h_t - c|| / (T log(T + alpha)), T its size.

    h: N x d features in the space the centres live in (we pass L2-normalised features), assign: N cluster ids.
    Returns R temperatures. A cluster with fewer than 2 members (phi 0 or 0/0) gets the largest phi of the others,
    as PCL does. With `mean`, PCL's code goes on: clip phi to its 10th-90th percentiles and scale it to that mean."""
    r = len(centers)
    size = torch.bincount(assign, minlength=r).float()
    if (size >= 2).sum() == 0:
        raise ValueError(f"every cluster has fewer than 2 members: use fewer --clusters than {r}")
    dist_sum = torch.zeros(r, device=h.device).index_add_(0, assign, (h.float() - centers[assign].float()).norm(dim=1))
    phi = dist_sum / (size * torch.log(size + alpha))
    phi = torch.where(size >= 2, phi, phi[size >= 2].max())
    if mean is None:
        return phi
    phi = phi.clamp(torch.quantile(phi, 0.1), torch.quantile(phi, 0.9))
    return mean * phi / phi.mean()


@common.float32
def cluster_center_loss(h, centers, assign, phi, form="softmax"):
    """Eq. 4: the mean over the 2N rows of -log exp(s(h_i, c_i) / phi_i) / sum_j exp(s(h_i, c_j) / phi_j).

    s = cosine similarity; each centre j carries its own temperature phi_j.
    ambiguity: Eq. 4's denominator. 'decoupled' sums over the other centres, as printed (1[c_j != c_i]); 'softmax'
    over all R centres, as PCL's ProtoNCE, Eq. 2 (whose indicator leaves out the anchor, not its positive) and Eq. 6
    (whose positives stay in the denominator) do. The decoupled loss goes below zero but is bounded within a
    clustering period: on the embedding layer (h after a ReLU) cosines lie in [0, 1], so each term is
    >= -1 / phi_i + log(R - 1); it drifts down across periods only because phi is re-estimated smaller as the
    clusters tighten. Its gradient never saturates: in the own-centre cosine it is -1 / phi_i wherever h_i lies,
    and the other centres push h_i with weights q_j / phi_j, q the softmax over them (summing to 1). The softmax
    form's weights, (1 - p_i) / phi_i and p_j / phi_j with p the softmax over all centres, vanish once h_i is nearer
    its own centre than the others by a few phi."""
    sim = F.normalize(h, dim=1) @ F.normalize(centers, dim=1).T                  # 2N x R
    logits = sim / phi[None]
    positive = logits.gather(1, assign[:, None])[:, 0]
    if form == "decoupled":
        logits = logits.scatter(1, assign[:, None], float("-inf"))               # the own centre leaves the sum
    return (torch.logsumexp(logits, dim=1) - positive).mean()


@common.float32
def cluster_instance_loss(h, assign, tau=0.5):
    """Eq. 6: SupCon (Khosla et al. 2020, Eq. 2, L_out) on the 2N views with cluster ids as labels: for each anchor,
    the mean over its positives (the other views of its cluster) of -log softmax over all other views. An anchor
    alone in its cluster contributes nothing (cannot happen when both views of an image share its id, as in
    training); the mean is over anchors that have a positive. Under torch.distributed, over the views of all ranks.
    Branch-free (no `if`, no boolean indexing): no host sync."""
    h, assign = F.normalize(common.all_gather(h), dim=1), common.all_gather(assign)
    logits = (h @ h.T / tau).fill_diagonal_(float("-inf"))                     # the anchor itself: never a term
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).nan_to_num(neginf=0.0)
    pos = (assign[:, None] == assign[None, :]).fill_diagonal_(False)
    n_pos = pos.sum(1)
    per_anchor = -(log_prob * pos).sum(1) / n_pos.clamp_min(1)
    has = (n_pos > 0).float()
    return (per_anchor * has).sum() / has.sum().clamp_min(1)


def ccl_loss(l_self, l_ccl, l_cil, lam):
    """Eq. 7-8: L = (1 - lam) L_self + lam (L_CCL + L_CIL) / 2. An ablated term (None) leaves the mean of the
    others (ambiguity: Table 2 does not say how its single-term rows are weighted)."""
    cluster_terms = [t for t in (l_ccl, l_cil) if t is not None]
    return (1 - lam) * l_self + lam * sum(cluster_terms) / len(cluster_terms)


# ----------------------------------------------------------------------------------------------
# Training step: ccl_step, the step of Eq. 8 given the clusters; CCLStep, the step with its clustering state
# (Sec. 3.3), as common.train calls it.

def ccl_step(net, xb, aug, assign, centers, phi, tau=0.5, lam=0.5, layer="embedding", form="softmax", use_ccl=True,
             use_cil=True):
    """Eq. 8 on a batch of B uint8 images xb with their cluster ids assign (B), the clusters' centres (R x d) and
    temperatures phi (R): two augmented views of each image (each its own draw), L_self on z, the cluster losses on
    h (layer 'embedding') or z -> (loss, {term: value})."""
    h, z = net(aug(torch.cat([xb, xb])))              # row i and i + B: the two views of image i
    l_self = common.nt_xent(z, tau)                                           # Eq. 2-3
    feats = h if layer == "embedding" else z
    assign = assign.repeat(2)                                                 # both views share the image's id
    l_ccl = cluster_center_loss(feats, centers, assign, phi, form) if use_ccl else None
    l_cil = cluster_instance_loss(feats, assign, tau) if use_cil else None
    logs = {name: t for name, t in (("self", l_self), ("ccl", l_ccl), ("cil", l_cil)) if t is not None}
    return ccl_loss(l_self, l_ccl, l_cil, lam), logs


def is_cluster_epoch(epoch, start, every):
    """True before the (0-based) epochs that re-run K-means: start, start + every, ... (every 0: start only)."""
    if epoch < start:
        return False
    return (epoch - start) % every == 0 if every > 0 else epoch == start


@torch.no_grad()
def cluster(encoder, x, layer, k, alpha, phi_mean, seed):
    """K-means on the features of ALL training images, un-augmented (Sec. 3.3) -> centres, assignments, phi.

    ambiguity: K-means is spherical, on L2-normalised features (Eq. 4-5 compare by cosine, Table 5 reports cosine)."""
    h, z = common.embed(encoder, x)
    feats = F.normalize(h if layer == "embedding" else z, dim=1)
    centers, assign = common.kmeans(feats, k, metric="cosine", seed=seed)
    return centers, assign, concentration(feats, centers, assign, alpha, phi_mean)


class CCLStep:
    """CCL's training step as common.train calls it, step(net, xb, idx, epoch) -> (loss, {term: value}), with its
    clustering state: SimCLR before the joint stage, ccl_step in it.

    aug: the training augmentation; x: the uint8 training images (K-means clusters all of them); start: the first
    epoch of the joint stage (epochs before it train L_self alone, Sec. 4); every: the K-means interval (0: once).
    update(encoder, epoch) re-clusters when due; state_dict() / load_state_dict() carry the clusters through a
    checkpoint. With lam 0, or both cluster losses dropped, the step is SimCLR's and never clusters."""

    def __init__(self, aug, x, tau=0.5, lam=0.5, clusters=10, layer="embedding", start=0, every=10, alpha=10.0,
                 phi="pcl", form="softmax", use_ccl=True, use_cil=True, seed=0):
        self.aug, self.x, self.tau, self.lam, self.clusters, self.layer = aug, x, tau, lam, clusters, layer
        self.start, self.every, self.alpha, self.form, self.seed = start, every, alpha, form, seed
        self.use_ccl, self.use_cil = use_ccl, use_cil
        # ambiguity: Eq. 5 is used "the same as" PCL, whose code rescales phi to mean its own temperature; ours is tau
        self.phi_mean = tau if phi == "pcl" else None
        self.clustering = lam > 0 and (use_ccl or use_cil)
        self.centers = self.assign = self.phi = None

    def update(self, encoder, epoch):
        """K-means before the epochs that are due, and before any joint epoch that has no clusters yet."""
        if not self.clustering or epoch < self.start:
            return
        if self.assign is not None and not is_cluster_epoch(epoch, self.start, self.every):
            return
        self.centers, self.assign, self.phi = cluster(encoder, self.x, self.layer, self.clusters, self.alpha,
                                                      self.phi_mean, seed=self.seed + epoch)
        sizes = torch.bincount(self.assign, minlength=self.clusters).tolist()
        print(f"epoch {epoch + 1}: K-means on the {self.layer} layer, sizes {sizes}, "
              f"phi {self.phi.min():.3f}..{self.phi.max():.3f}", flush=True)

    def __call__(self, net, xb, idx, epoch):
        if not self.clustering or epoch < self.start:
            return common.simclr_step(net, xb, self.aug, self.tau), {}   # warm-up stage: L_self alone (Sec. 4)
        return ccl_step(net, xb, self.aug, self.assign[idx], self.centers, self.phi, self.tau, self.lam, self.layer,
                        self.form, self.use_ccl, self.use_cil)

    def state_dict(self):
        return {"centers": self.centers, "assign": self.assign, "phi": self.phi}

    def load_state_dict(self, d):
        self.centers, self.assign, self.phi = d.get("centers"), d.get("assign"), d.get("phi")


def make_step(aug, x, args, start):
    """The CCLStep of the command line; start: the first epoch of the joint stage in the run it trains."""
    return CCLStep(aug, x, tau=args.tau, lam=args.lam, clusters=args.clusters, layer=args.cluster_layer, start=start,
                   every=args.cluster_every, alpha=args.alpha, phi=args.phi, form=args.ccl_form,
                   use_ccl=not args.no_ccl, use_cil=not args.no_cil, seed=args.seed)


# ----------------------------------------------------------------------------------------------
# Scores: Eq. 9-10 (Sec. 3.4) on the chosen layer, the training images as reference. Chunked by common.knn: at
# most a chunk x len(train) block of similarities exists at once.

def score_cos(train_z, test_z):
    """Eq. 9: max_m cos(z_m, z) * ||z||. ambiguity: the paper prints the norm of the training feature z_m; CSI's
    code (which Eq. 9 cites) multiplies by the norm of the un-normalised test feature z. We follow CSI."""
    return common.knn(test_z, train_z, k=1, metric="cosine")[0][:, 0] * test_z.float().norm(dim=1)


def score_var(train_z, test_z, k=10):
    """Eq. 10: score_cos / sqrt(1 / (K - 1) sum_{v in V} ||z_v - mean_V z||^2), V the K training images with the
    highest score_cos terms (the K nearest by cosine). ambiguity: Eq. 10's deviation is of the training
    projection vectors z_v (un-normalised, as written), squared norm summed over dimensions: the spread of the
    neighbourhood, not of the K similarity values."""
    cos, nearest = common.knn(test_z, train_z, k=k, metric="cosine")
    train_z = train_z.float()
    spread = torch.empty(len(test_z), device=train_z.device)
    step = common.chunk_rows(k * train_z.shape[1])                     # chunk x K x d neighbours at a time
    for i in range(0, len(test_z), step):
        spread[i:i + step] = train_z[nearest[i:i + step]].var(dim=1).sum(1).sqrt()   # var: 1 / (K - 1)
    return cos[:, 0] * test_z.float().norm(dim=1) / spread.clamp_min(1e-12)


# ambiguity: Eq. 9-10 score Z(x~), the features of augmented images, with CSI's score, and name no views. We
# follow CSI's evaluation (evals/ood_pre.py, models/classifier.py): the mean of the features of --n-aug views made
# of colour jitter, grayscale and a crop of exactly 54% of the image (--resize_factor 0.54 --resize_fix); no flip
# and no blur, unlike the training augmentation of Sec. 3.1. --n-aug 0 (the digits default) scores the clean images.
# CSI reseeds its generator before each view, so its views follow an image's position in the batch; ours follow the
# image's own pixels (common.views_per_image), so that a score depends on the image alone.
CSI_TEST_CROP_SCALE = 0.54        # public code: CSI's README, --resize_factor 0.54 --resize_fix


def ensemble_augment(size):
    """CSI's test-time views: colour jitter (brightness, contrast, saturation 0.4, hue 0.1, p 0.8), grayscale
    (p 0.2), a crop of 54% of the image resized to `size`."""
    return common.SimCLRAugment(size, scale=(CSI_TEST_CROP_SCALE, CSI_TEST_CROP_SCALE), flip=False, blur=False)


@torch.no_grad()
def features(model, x, layer="projection", aug=None, n_aug=0, batch_size=256):
    """h or z of the uint8 images x (on the model's device), float32; with an augmentation aug and n_aug > 0,
    CSI's test-time ensemble: the mean of the un-normalised features of each image's n_aug views, which follow
    from the image's pixels alone (common.views_per_image): an image's features never depend on the others."""
    pick = 0 if layer == "embedding" else 1
    if n_aug == 0:
        return common.embed(model, x, batch_size)[pick]
    views = lambda xb: common.views_per_image(xb, aug, n_aug).flatten(0, 1)  # image-major: the views of one image
    f = common.embed(model, x, max(1, batch_size // n_aug), views)[pick]
    return f.view(len(x), n_aug, -1).mean(1)


# ----------------------------------------------------------------------------------------------
# The Scorer's adapters: the run's settings s in, the functions above called. A saved run scores new images later
# through them; main() scores through them too, so the run's numbers and a later scoring are the same code.

def build_model(s):
    """The untrained encoder of run settings s (arch, width, init; weights: the input statistics of the weights the
    run started from): state_dict() of a trained one loads strictly."""
    return common.Encoder(s.arch, width=s.width, init=s.init, pretrained=bool(getattr(s, "weights", None)))


def run_features(model, x, s):
    """features() of the images x as run settings s score them (s.score_layer, s.n_aug CSI views)."""
    return features(model, x, s.score_layer, ensemble_augment(s.size) if s.n_aug else None, s.n_aug)


def score_state(model, train_x, s):
    """What score() needs beside the weights: the training images' run_features."""
    return {"train_features": run_features(model, train_x, s)}


def score(model, state, x, s):
    """Eq. 9-10 for the uint8 images x (on the model's device) -> {"score_cos": N, "score_var": N}, float32,
    higher = more in-distribution; state = {"train_features": run_features of the training images}."""
    test_f, train_f = run_features(model, x, s), state["train_features"]
    return {"score_cos": score_cos(train_f, test_f), "score_var": score_var(train_f, test_f, s.score_k)}


# ----------------------------------------------------------------------------------------------
# Stages: the warm-up stage (SimCLR), the joint stage (Eq. 8) -> the trained model. --epochs counts both; the first
# --cluster-start epochs are the warm-up stage. --schedule restart gives each stage its own learning-rate warm-up and
# cosine (the warm-up stage is saved as <out>/simclr.pt, and --simclr-weights starts the joint stage from such a
# model instead); --schedule single runs one schedule over both. Cluster centres, assignments and concentrations
# live in the checkpoint: --resume keeps them, and refuses a changed cluster setting.

def warmup_stage(model, x, aug, args):
    """Sec. 3.3 "when to cluster": SimCLR alone for --cluster-start epochs, its own schedule, saved as <out>/simclr.pt;
    with --simclr-weights that model is loaded instead."""
    if args.simclr_weights is not None:
        return common.load_weights(model, args.simclr_weights)
    if args.cluster_start == 0:
        return model
    train = harness.trainer(args, "warm-up", "simclr.pt", epochs=args.cluster_start)
    return train(model, lambda net, xb, idx, epoch: common.simclr_step(net, xb, aug, args.tau), x)


def train_ccl(model, x, aug, args):
    """Both stages -> the trained model. single: one schedule over --epochs, the step switching at --cluster-start;
    restart: the warm-up stage, then the joint stage with a learning-rate warm-up and cosine of its own."""
    if args.schedule == "single":
        train = harness.trainer(args, "warm-up + joint", "checkpoint.pt")
        return train(model, make_step(aug, x, args, start=args.cluster_start), x)
    model = warmup_stage(model, x, aug, args)
    if args.epochs == args.cluster_start:                # a SimCLR run (--lam 0) that is all warm-up stage
        return model
    train = harness.trainer(args, "joint", "checkpoint.pt", epochs=args.epochs - args.cluster_start)
    return train(model, make_step(aug, x, args, start=0), x)


# ----------------------------------------------------------------------------------------------
# Deviations. No public code exists for CCL; where the paper defers to CSI (optimiser, score) or PCL (phi), their
# code is the official one. Every choice is marked "ambiguity:" where it is resolved.
#
#     choice       | paper                 | official code           | ours                    | why
#     -------------+-----------------------+-------------------------+-------------------------+-----------------------
#     Eq. 4's sum  | the other centres,    | PCL's ProtoNCE: every   | every centre (softmax); | Eq. 2, Eq. 6 and
#                  | 1[c_j != c_i]         | centre                  | --ccl-form decoupled:   | ProtoNCE keep the
#                  |                       |                         | as printed              | positive in the sum
#     phi (Eq. 5)  | Eq. 5, "the same as"  | PCL: clipped to its     | PCL's, mean --tau;      | Eq. 5 alone gives phi
#                  | PCL                   | 10th-90th percentile,   | --phi eq5: as printed   | ~0.01-0.1: L_CCL
#                  |                       | scaled to mean tau      |                         | outweighs L_self ~9 x
#     schedule     | 1000 SimCLR + 1000    | CSI: one warm-up +      | one per stage           | Table 4: the warm-up
#                  | joint epochs, cosine  | cosine per training run | (--schedule restart);   | stage is SimCLR
#                  |                       |                         | single: one             | "trained in advance"
#     peak lr      | 0.1, "same with CSI"  | CSI: 0.1 x its warm-up  | preset 1.0              | the paper's 0.1 is
#                  |                       | multiplier 10 = 1.0     |                         | CSI's --lr_init
#     batch        | 128 (Sec. 4)          | CSI: --batch_size 128   | preset 512, the global  | ambiguity at PAPER:
#                  |                       | per process for plain   | batch (one process or   | 128 is CSI's flag for
#                  |                       | SimCLR (asserted), 4    | several); --batch-size  | plain SimCLR, as 0.1
#                  |                       | processes: 512 images a | 128: the literal        | is its lr flag; CSI's
#                  |                       | step, BatchNorm synced, | reading (4 x the steps, | lr 1.0 under LARS is
#                  |                       | negatives from all 4    | 1/4 the negatives)      | a 512 recipe
#     lr warm-up   | 50 epochs             | CSI: 10 epochs, from    | 50 epochs, linear from  | the paper's length;
#                  |                       | 0.1 x the peak          | ~0                      | common's warm-up
#     LARS scope   | (CSI's)               | torchlars: every        | every parameter (preset | CSI's. The weights
#                  |                       | parameter, BatchNorm    | --lars-scope all);      | form moves conv and
#                  |                       | weights and biases too  | weights: solo-learn's,  | linear weights
#                  |                       |                         | 1-d parameters plain    | equally, 1-d ones 0.1
#                  |                       |                         | SGD                     | to 660 x as far in a
#                  |                       |                         |                         | step, by training
#                  |                       |                         |                         | state (below)
#     K-means      | on h                  | PCL: faiss, Euclidean,  | spherical (centres      | Eq. 4-5 compare by
#                  |                       | on normalised features: | normalised every        | cosine: spherical
#                  |                       | 20 iterations, best of  | iteration), k-means++   | K-means minimises
#                  |                       | 5 starts, trained on at | seeding, up to 100      | their distance; the
#                  |                       | most 1,000 points per   | iterations (tol), 1     | seeding in place of
#                  |                       | centre, then the        | start, every training   | restarts
#                  |                       | centres normalised      | image                   |
#     Eq. 9's norm | the training          | CSI: the test feature's | CSI's                   | Eq. 9 cites CSI
#                  | feature's             |                         |                         |
#     scored layer | z (projection)        | CSI: z                  | preset z; digits        | measured on digits
#                  |                       |                         | default h               | (README)
#     lambda; K    | not stated; K = 10    | -                       | 0.5; K: one cluster per | the even mix of Eq. 8;
#                  | on CIFAR-10 (Sec. 4)  |                         | ID class (paper preset: | K as the paper's 10
#                  |                       |                         | 10)                     | for 10 classes
#     ablations    | weights not stated    | -                       | the mean of the kept    | Eq. 7's mean
#                  |                       |                         | terms                   |
#     augmentation | SimCLR's + Gaussian   | CSI: SimCLR's           | the paper's; on digits  | harness.simclr_augment
#                  | blur                  |                         | without the horizontal  | (a flipped 2 is a 5)
#                  |                       |                         | flip                    |
#     input        | not stated            | CSI: (x - 0.5) / 0.5,   | the same from scratch;  | CSI's; a pretrained
#     scaling      |                       | the network's first     | a pretrained net's own  | net sees the inputs
#                  |                       | layer                   | statistics (ImageNet's; | it was trained on
#                  |                       |                         | Lite0: (x - 127) / 128) |
#     test-time    | Z(x~): augmented      | CSI: mean z of 10       | CSI's views, drawn from | a score depends on
#     views        | images, CSI's score   | views, colour jitter,   | random numbers seeded   | the image alone: any
#                  |                       | grayscale, 54% crop;    | by a hash of each       | folder, position or
#                  |                       | per-image draws, seed   | image's pixels (common. | batch gives the same
#                  |                       | reset before each view  | views_per_image);       | score
#                  |                       | (views follow the batch | digits: none            |
#                  |                       | position)               |                         |
#     test-time    | not stated            | CSI: 54% of the area at | exactly 54% of the      | the same mean area;
#     crop         |                       | a log-uniform aspect    | area at the same aspect | a box differs by at
#                  |                       | ratio 3/4..4/3, sides   | ratio, offsets drawn    | most half a pixel a
#                  |                       | rounded to whole pixels | uniformly (any size)    | side (CSI's colour
#                  |                       | (20-27 of 32): 52.7 to  |                         | jitter differs too:
#                  |                       | 56.3% of the area, mean |                         | below)
#                  |                       | 54.0%; offsets in half  |                         |
#                  |                       | pixels                  |                         |
#     precision    | not stated            | CSI: float32            | bf16 autocast on CUDA   | speed; the losses and
#                  |                       |                         | (--amp auto; --amp off: | scoring switch autocast
#                  |                       |                         | float32); float32 on    | off, K-means runs
#                  |                       |                         | the CPU                 | outside it: float32
#
# LARS scope, measured on the CPU with common.LARS: one step of each scope from one state and gradient of L_self
# (ResNet-18 width 64, PyTorch's init, CIFAR-10 at 32 x 32, the paper's augmentation, tau 0.5); r = how far the
# weights scope moves a parameter / how far scope all moves it. At initialisation, batch 128 (512): BatchNorm weights
# r = 0.15-2.9, median 0.38 (0.12-1.4, median 0.25); the head's two biases 31-102 (35-129); BatchNorm biases 1 (zero,
# so both scopes step plainly). After 10 and 50 steps of scope all at lr 1.0, batch 128: BatchNorm weights 0.44-6.1
# and 0.26-4.4, BatchNorm biases 372-663 and 129-259, head biases 85-236 and 37-118. Conv and linear weights: 1.
#
# Colour jitter, in training and at test time, follows torchvision's formulas (common.SimCLRAugment, crop first);
# CSI's own layer jitters brightness and saturation in HSV, contrast about each channel's mean and hue by +-0.07
# turns, in an order drawn per batch, and crops last.


# ----------------------------------------------------------------------------------------------
# Presets: --preset NAME; explicit flags win.

PAPER = dict(
    dataset="cifar10",            # paper: Sec. 4, the unlabeled CIFAR-10 train set as ID
    ood=["svhn", "lsun_resize", "imagenet_resize", "cifar100", "interp:cifar10"],  # paper: Table 1 (the *_fix sets
                                  # exist only on Google Drive: add them as folder:PATH)
    size=32,                      # paper: Sec. 4, CIFAR-10's 32 x 32 (the digits default is 16)
    arch="resnet18", width=64,    # paper: Sec. 4, ResNet-18
    epochs=2000,                  # paper: Sec. 4, 1000 warm-up-stage epochs + 1000 joint epochs
    cluster_start=1000,           # paper: Sec. 4 / Table 4, the warm-up stage (L_self alone)
    schedule="restart",           # paper: Sec. 4 / Table 4 (ambiguity: resolved at --schedule)
    cluster_every=10,             # paper: Table 4, centres updated every 10 epochs
    clusters=10,                  # paper: Sec. 4 / Table 5
    cluster_layer="embedding",    # paper: Table 3
    # ambiguity: Sec. 4's "the batch size is 128" names no process count. 128 is the value CSI's code asserts for its
    # --batch_size in plain SimCLR (128 / K_shift images per process, K_shift 1), and CSI's README launches 4
    # processes ("total batch size should be 512") with BatchNorm synchronised and every process's negatives
    # gathered: 512 images a step. The paper takes its learning rate as CSI's flag (0.1, below), and that 1.0 peak
    # under LARS is CSI's for 512; we read the 128 the same way. --batch-size 128 gives the literal reading: 4 x
    # the steps, a quarter of the negatives.
    batch_size=512,               # public code: CSI, 128 per process x 4 processes (paper: Sec. 4, "128")
    # ambiguity: Sec. 4 says "learning rate 0.1 ... same with CSI"; CSI's code wraps its SGD(lr 0.1) in a warm-up
    # scheduler with multiplier 10, so its learning rate rises from 0.1 to 1.0 and anneals from 1.0; the 0.1 is
    # that base value. We follow the code: the peak is 1.0.
    lr=1.0,                       # public code: CSI, 0.1 x warm-up multiplier 10
    warmup_epochs=50,             # paper: Sec. 4, 50-epoch linear warm-up (CSI's code: 10, starting at 0.1)
    final_lr=0.0,                 # public code: CSI's CosineAnnealingLR anneals to 0
    optimizer="lars",             # public code: CSI wraps SGD in torchlars' LARS (trust coefficient 0.001)
    lars_scope="all",             # public code: torchlars adapts every parameter, BatchNorm weights and biases too
    momentum=0.9,                 # public code: CSI's SGD
    weight_decay=1e-6,            # public code: CSI's SGD
    tau=0.5,                      # public code: CSI's NT-Xent temperature; the paper gives no value
    lam=0.5,                      # ours: the paper does not state lambda of Eq. 8
    alpha=10.0,                   # public code: PCL's smoothing of Eq. 5; the paper gives no value
    phi="pcl",                    # public code: PCL's rescaling of Eq. 5 (ambiguity: resolved in CCLStep)
    ccl_form="softmax",           # public code: PCL's ProtoNCE (ambiguity: resolved at cluster_center_loss)
    n_aug=10,                     # public code: CSI's README, --ood_samples 10 --resize_factor 0.54 --resize_fix
    score_k=10,                   # ours: the paper does not state K of Eq. 10
    score_layer="projection",     # paper: Eq. 9-10 score Z, the projection layer
)

QUICK = dict(
    dataset="cifar10", id_classes="0-5", subset=6000, width=16,  # ours: CIFAR-10 under --data-root, a CPU setting
    size=32,                      # paper: CIFAR-10's own size (the digits default is 16)
    epochs=20, cluster_start=10, cluster_every=2,   # ours: half warm-up stage, 5 K-means updates in the joint stage
    clusters=6,                   # ours: the number of ID classes, as the paper's 10 for CIFAR-10 (Table 5)
)

PRESETS = {"paper": PAPER, "quick": QUICK}

PAPER_AUGMENT = dict(blur=True)   # paper: Sec. 3.1, SimCLR's crop and colour distortion, plus Gaussian blur


# ----------------------------------------------------------------------------------------------
# Command line: build_parser(), check_args() (every flag, before any work), check_sizes() (once the data is
# loaded, before training).

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[harness.arg_parser()])
    g = parser.add_argument_group("ccl")
    g.add_argument("--cluster-start", type=int, default=None,
                   help="warm-up stage: epochs trained with L_self alone before the first K-means (paper: 1000; "
                        "default: half of --epochs)")
    g.add_argument("--cluster-every", type=int, default=3,
                   help="re-run K-means every N epochs of the joint stage (paper: 10; 0 = once, never updated)")
    # ambiguity: Sec. 4 / Table 4 say "1000 epochs ... at the warm-up stage, and then for 1000 epochs" with "a 50
    # epoch warm-up, same with CSI": one schedule over both stages, or one per stage. Restart: each stage is a CSI run
    # of its own, and Table 4's warm-up is a SimCLR model "trained for 1000 epochs in advance"; one cosine over
    # 2000 epochs would start clustering from a half-annealed model and make --lam 0 a 2000-epoch SimCLR.
    g.add_argument("--schedule", default="restart", choices=["restart", "single"],
                   help="restart: each stage its own learning-rate warm-up and cosine; single: one over both stages")
    g.add_argument("--simclr-weights", default=None,
                   help="start the joint stage from this SimCLR model (a checkpoint of these scripts or a state "
                        "dict of the same encoder) instead of training the warm-up stage; needs --schedule restart")
    g.add_argument("--clusters", type=int, default=0,
                   help="K-means centres R (paper: 10 on CIFAR-10; 0: one per in-distribution class)")
    g.add_argument("--cluster-layer", default="embedding", choices=["embedding", "projection"],
                   help="where K-means runs and the cluster losses apply (Table 3)")
    g.add_argument("--lam", type=float, default=0.5, help="lambda of Eq. 8 (not stated in the paper); 0 = SimCLR")
    g.add_argument("--tau", type=float, default=0.5, help="temperature of L_self and L_CIL (CSI's 0.5)")
    g.add_argument("--alpha", type=float, default=10.0, help="smoothing of the concentration phi (Eq. 5, PCL's 10)")
    g.add_argument("--phi", default="pcl", choices=["pcl", "eq5"],
                   help="pcl: Eq. 5 clipped to its 10th-90th percentile and scaled to mean --tau, as PCL's code; "
                        "eq5: Eq. 5 as printed")
    g.add_argument("--ccl-form", default="softmax", choices=["softmax", "decoupled"],
                   help="Eq. 4's denominator: every centre (softmax, as PCL's ProtoNCE) or the other centres only "
                        "(decoupled, as printed)")
    g.add_argument("--no-ccl", action="store_true", help="drop the cluster center loss (Table 2)")
    g.add_argument("--no-cil", action="store_true", help="drop the cluster instance loss (Table 2)")
    g.add_argument("--score-layer", default="embedding", choices=["embedding", "projection"],
                   help="the features Eq. 9-10 score: z (projection, as the paper) or h (embedding)")
    g.add_argument("--score-k", type=int, default=10, help="K nearest training images in score_var (Eq. 10)")
    g.add_argument("--n-aug", type=int, default=0,
                   help="CSI's test-time ensemble: average the features of T augmented views (paper: 10; 0 = clean)")
    # Defaults: digits 0-5 at 16 x 16 (the digits are 8 x 8: nothing is lost), a small ResNet-18.
    parser.set_defaults(size=16, width=8, epochs=20, batch_size=64, lr=0.1)
    return parser


def check_args(args):
    harness.check(0 <= args.lam <= 1, "--lam", args.lam, "a number in [0, 1]")
    harness.check(args.tau > 0, "--tau", args.tau, "a number > 0")
    harness.check(args.alpha >= 0, "--alpha", args.alpha, "a number >= 0")
    if args.clusters == 0:                           # ours: one centre per in-distribution class, where known
        n = harness.count_classes(args.dataset)
        harness.check(n > 0, "--clusters", 0, f"K >= 2: {args.dataset} has no class folders to count the clusters from")
        args.clusters = len(harness.planned_id_classes(args))
        harness.check(args.clusters >= 2, "--clusters", 0, f"K >= 2: the {args.clusters} in-distribution class gives "
                     "one cluster, and Eq. 4 needs other centres")
    harness.check(args.clusters >= 2, "--clusters", args.clusters,
                 "an integer >= 2 (Eq. 4 needs other centres)")
    harness.follow_epochs(args, "ccl", "cluster_start", lambda epochs: epochs // 2)
    harness.check(args.cluster_start >= 0, "--cluster-start", args.cluster_start, "an integer >= 0")
    harness.check(args.cluster_every >= 0, "--cluster-every", args.cluster_every, "an integer >= 0 (0: K-means once)")
    harness.check(args.score_k >= 2, "--score-k", args.score_k, "an integer >= 2 (a standard deviation needs 2)")
    harness.check(args.n_aug >= 0, "--n-aug", args.n_aug, "an integer >= 0 (0: the clean images)")
    harness.check_memory(args, "--n-aug", args.n_aug, args.n_aug * (3 + args.width) * args.size ** 2 * 4,
                         f"the {args.n_aug} views of one image through the first layer")
    clustering = args.lam > 0 and not (args.no_ccl and args.no_cil)
    harness.check(args.cluster_start <= args.epochs, "--cluster-start", args.cluster_start,
                 f"at most --epochs {args.epochs} (--epochs counts both stages)")
    harness.check(not clustering or args.cluster_start < args.epochs, "--cluster-start", args.cluster_start,
                 f"fewer than --epochs {args.epochs}: no joint stage is left")
    if args.simclr_weights is not None:
        harness.check(os.path.isfile(args.simclr_weights), "--simclr-weights", args.simclr_weights, "an existing file")
        harness.check(args.schedule == "restart", "--simclr-weights", args.simclr_weights,
                     "--schedule restart (the joint stage then runs its own schedule)")


def check_sizes(args, n):
    """The flags that count training images, against the n loaded ones: before the warm-up stage trains."""
    harness.check(args.batch_size <= n, "--batch-size", args.batch_size, f"at most the {n} training images")
    harness.check(args.clusters < n, "--clusters", args.clusters, f"fewer than the {n} training images")
    harness.check(args.score_k <= n, "--score-k", args.score_k, f"at most the {n} training images")


# ----------------------------------------------------------------------------------------------
# Main: warm-up stage -> joint stage -> scores.

@harness.script_main("ccl", build_parser, PRESETS, check_args, may_change=("score_layer", "score_k", "n_aug"))
def main(args, data, device, t_start):
    x = data.train_x.to(device)
    check_sizes(args, len(x))
    model = harness.start_from_weights(build_model(args), args).to(device)
    aug = harness.simclr_augment(args, **PAPER_AUGMENT)
    model = train_ccl(model, x, aug, args).eval()
    scorer = harness.Scorer.from_args("ccl", args, model, score_state(model, x, args))
    return harness.finish(args, "ccl", scorer, data, device, t_start)


if __name__ == "__main__":
    main()
