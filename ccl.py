"""Cluster-aware Contrastive Learning (CCL) for unsupervised OOD detection (Chen, Gui, Fan, 2023, arXiv 2302.02598).

SimCLR, plus K-means on the embedding layer: after a warm-up stage of plain SimCLR, the training images are
clustered every few epochs, and two extra losses pull each augmented view towards its cluster centre (cluster
center loss, Eq. 4, global) and towards the other views of its cluster in the batch (cluster instance loss, Eq. 6,
local). A test image is scored by its cosine similarity to the nearest training image in the projection space
(CSI's score, Eq. 9), optionally divided by the spread of its K nearest training images (Eq. 10).

    python ccl.py                                   # digits 0-5 vs 6-9, a few minutes on a CPU
    python ccl.py --lam 0                           # the same run without the cluster losses (= SimCLR)
    python ccl.py --no-ccl | --no-cil | --cluster-layer projection     # the ablations of Tables 2-3
    python ccl.py --preset quick                    # CIFAR-10 classes 0-5 vs 6-9, 6,000 images, CPU path check
    python ccl.py --preset paper                    # Sec. 4: ResNet-18, 1000 + 1000 epochs, CIFAR-10 vs Table 1's sets

Schedule: --epochs is the whole run (one cosine learning-rate schedule); the first --cluster-start epochs are the
warm-up stage (L_self alone), the rest the joint stage (Eq. 8). The paper's 1000 + 1000 is --epochs 2000
--cluster-start 1000. Cluster centres, assignments and concentrations live in the checkpoint: --resume keeps them.

No public code exists for CCL (see reference-code-notes.md): every choice the paper leaves open is marked
"ambiguity" where it is resolved; CSI's public code settles the shared parts (tau, optimiser, score, ensemble).

Measured: digits, ID 0-5 (320 training images), OOD = digits 6-9, AUROC %, mean ± sample std over --seed 0/1/2;
--size 16 because the digits are 8 x 8 (nothing lost, a quarter of the cost); 1-2 min a run on a shared 2-core CPU.

    python ccl.py --size 16 --subset 320 --seed S ...     score_cos      score_var
    (CCL, the defaults)                                    84.1 ±  2.9    82.6 ± 6.1
    --lam 0            (SimCLR, the same scoring)          78.8 ±  9.2    88.6 ± 2.7
    --no-ccl           (L_self + L_CIL)                    79.5 ±  7.4    85.9 ± 3.5
    --no-cil           (L_self + L_CCL)                    82.9 ±  1.8    81.5 ± 2.9
    --cluster-layer projection                             70.2 ± 17.8    80.6 ± 6.9

Re-run at the final common.py (the epoch shuffle is now a function of (seed, epoch)), 1 thread: CCL 75.1 ± 8.3 /
77.5 ± 10.9, --lam 0 75.4 ± 6.0 / 80.4 ± 10.8: with another data order the gap below vanishes, so on digits at
this budget CCL and SimCLR are indistinguishable. In the table above, the cluster center loss raised score_cos and steadied it across seeds; score_var, which already uses the
neighbourhood, does best on plain SimCLR here; clustering the projection layer is worst (as in Table 3). Three
seeds of 320 images: differences of a few points are within the noise. CSI's ensemble, --n-aug 10 (seed 0 only):
86.1 / 92.6 against 87.3 / 86.8 without, for 10 passes over every set.

CIFAR-10, path check only: the full --preset quick (20 epochs) needs ~2 h on this CPU when shared by five agents,
so we ran `python ccl.py --preset quick --epochs 6 --cluster-start 3 --cluster-every 1` (31 min): AUROC 49.5
(score_cos) / 51.0 (score_var) against classes 6-9; the same with --lam 0 (SimCLR): 48.6 / 52.2. Chance for
both after 6 CPU epochs: no quality signal.
"""
import argparse
import os
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------
# Presets (--preset NAME; explicit flags win)

PAPER = dict(
    dataset="cifar10",            # Sec. 4: unlabeled CIFAR-10 train set as ID
    ood=["svhn", "lsun_resize", "imagenet_resize", "cifar100", "interp:cifar10"],  # Table 1 (the *_fix sets
                                  # exist only on Google Drive: add them as folder:PATH)
    arch="resnet18", width=64,    # Sec. 4: ResNet-18
    epochs=2000,                  # Sec. 4: 1000 warm-up epochs + 1000 joint epochs
    cluster_start=1000,           # Sec. 4 / Table 4: the warm-up stage, L_self alone
    cluster_every=10,             # Table 4: centres updated every 10 epochs
    clusters=10,                  # Sec. 4 / Table 5: 10 centres
    cluster_layer="embedding",    # Table 3
    batch_size=128,               # Sec. 4
    lr=0.1,                       # Sec. 4
    warmup_epochs=50,             # Sec. 4: 50-epoch linear warm-up, then cosine annealing
    optimizer="lars",             # public code: Sec. 4 follows CSI, whose SGD (momentum 0.9) is wrapped in LARS
    weight_decay=1e-6,            # public code (CSI)
    tau=0.5,                      # public code (CSI's NT-Xent temperature); the paper gives no value
    lam=0.5,                      # our choice: the paper does not state lambda of Eq. 8
    alpha=10.0,                   # public code (PCL's smoothing of Eq. 5); the paper gives no value
    n_aug=10,                     # public code (CSI's README: --ood_samples 10 --resize_factor 0.54 --resize_fix)
    score_k=10,                   # our choice: the paper does not state K of Eq. 10
)

QUICK = dict(
    dataset="folder:../shared/data/cifar10", id_classes="0-5", subset=6000, width=16,  # the README's CPU setting
    epochs=20, cluster_start=10, cluster_every=2,   # our choice: half warm-up, 5 K-means updates in the joint stage
    clusters=6,                   # our choice: the number of ID classes, as the paper's 10 for CIFAR-10 (Table 5)
)

PRESETS = {"paper": PAPER, "quick": QUICK}

CSI_TEST_CROP_SCALE = 0.54        # CSI's --resize_factor 0.54 --resize_fix: each test-time crop covers 54% of the image


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[common.arg_parser()])
    g = parser.add_argument_group("ccl")
    # ambiguity (issue 3 calls it --warmup-epochs): that name is common's learning-rate warm-up, so the stage is
    # --cluster-start
    g.add_argument("--cluster-start", type=int, default=10,
                   help="warm-up stage: epochs trained with L_self alone before the first K-means (paper: 1000)")
    g.add_argument("--cluster-every", type=int, default=3,
                   help="re-run K-means every N epochs of the joint stage (paper: 10; 0 = once, never updated)")
    g.add_argument("--clusters", type=int, default=6, help="K-means centres R (paper: 10 on CIFAR-10)")
    g.add_argument("--cluster-layer", default="embedding", choices=["embedding", "projection"],
                   help="where K-means runs and the cluster losses apply (Table 3)")
    g.add_argument("--lam", type=float, default=0.5, help="lambda of Eq. 8 (not stated in the paper); 0 = SimCLR")
    g.add_argument("--tau", type=float, default=0.5, help="temperature of L_self and L_CIL (CSI's 0.5)")
    g.add_argument("--alpha", type=float, default=10.0, help="smoothing of the concentration phi (Eq. 5)")
    g.add_argument("--phi-mean", type=float, default=0.0,
                   help="PCL's rescaling of phi: clip to its 10th-90th percentile, scale to this mean (0: Eq. 5 as is)")
    g.add_argument("--no-ccl", action="store_true", help="drop the cluster center loss (Table 2)")
    g.add_argument("--no-cil", action="store_true", help="drop the cluster instance loss (Table 2)")
    g.add_argument("--score-k", type=int, default=10, help="K nearest training images in score_var (Eq. 10)")
    g.add_argument("--n-aug", type=int, default=0,
                   help="CSI's test-time ensemble: average z over T augmented views (paper: 10; 0 = clean images)")
    # Defaults: digits 0-5 (860 training images) at 32 x 32, a few minutes on a 2-core CPU.
    parser.set_defaults(epochs=20, batch_size=64, lr=0.1, width=8)
    return parser


# ----------------------------------------------------------------------------------------------
# Losses. L_self is common.nt_xent on z (Eq. 2-3). h: 2N x d features of the views, row i and i + N one image.

def concentration(h, centers, assign, alpha=10.0, mean=None):
    """Eq. 5, PCL's concentration of each cluster c: phi_c = sum_t ||h_t - c|| / (T log(T + alpha)), T its size.

    h: N x d features in the space the centres live in (we pass L2-normalised features), assign: N cluster ids.
    Returns R temperatures. A cluster with fewer than 2 members (phi 0 or 0/0) gets the largest phi of the others,
    as PCL does. With `mean`, PCL's code goes on: clip phi to its 10th-90th percentiles and scale it to that mean."""
    r = len(centers)
    size = torch.bincount(assign, minlength=r).float()
    if (size >= 2).sum() == 0:
        common.fail(f"every cluster has fewer than 2 members: use fewer --clusters than {r}")
    dist_sum = torch.zeros(r, device=h.device).index_add_(0, assign, (h.float() - centers[assign].float()).norm(dim=1))
    phi = dist_sum / (size * torch.log(size + alpha))
    phi = torch.where(size >= 2, phi, phi[size >= 2].max())
    if mean is None:
        return phi
    phi = phi.clamp(torch.quantile(phi, 0.1), torch.quantile(phi, 0.9))
    return mean * phi / phi.mean()


def cluster_center_loss(h, centers, assign, phi):
    """Eq. 4: -log exp(s(h_i, c_i) / phi_i) / sum_{j: c_j != c_i} exp(s(h_i, c_j) / phi_j), mean over the rows.

    s = cosine similarity; each centre carries its own temperature phi_j. The denominator runs over the OTHER
    centres, as printed and as the text says ("removing the cluster center to which h_i belongs"): the decoupled
    form (Yeh et al., DCL), which can go below zero. We keep it; it is not a typo for the softmax."""
    sim = F.normalize(h.float(), dim=1) @ F.normalize(centers.float(), dim=1).T     # 2N x R
    logits = sim / phi[None]
    own = F.one_hot(assign, len(centers)).bool()
    positive = logits.gather(1, assign[:, None])[:, 0]
    return (torch.logsumexp(logits.masked_fill(own, float("-inf")), dim=1) - positive).mean()


def cluster_instance_loss(h, assign, tau=0.5):
    """Eq. 6: SupCon on the 2N views with cluster ids as labels: the views of the same cluster are positives,
    all other views the denominator. A view alone in its cluster contributes nothing (cannot happen when both
    views of an image share its id, as in training)."""
    return common.supcon(h, assign, tau)


def ccl_loss(l_self, l_ccl, l_cil, lam):
    """Eq. 7-8: L = (1 - lam) L_self + lam (L_CCL + L_CIL) / 2. An ablated term (None) leaves the mean of the
    others (ambiguity, Table 2: how the single-term rows are weighted is not stated)."""
    cluster_terms = [t for t in (l_ccl, l_cil) if t is not None]
    return (1 - lam) * l_self + lam * sum(cluster_terms) / len(cluster_terms)


# ----------------------------------------------------------------------------------------------
# Schedule: warm-up stage, then K-means every --cluster-every epochs (Sec. 3.3, Table 4).

def is_cluster_epoch(epoch, start, every):
    """True before the (0-based) epochs that re-run K-means: start, start + every, ... (every 0: start only)."""
    if epoch < start:
        return False
    return (epoch - start) % every == 0 if every > 0 else epoch == start


@torch.no_grad()
def cluster(net, x, layer, k, alpha, phi_mean, seed):
    """K-means on the features of ALL training images, un-augmented (Sec. 3.3) -> state for the cluster losses.

    ambiguity (Eq. 4-5 compare by cosine, Table 5 reports cosine): K-means is spherical, on L2-normalised features."""
    h, z = common.embed(net, x)
    feats = F.normalize(h if layer == "embedding" else z, dim=1)
    centers, assign = common.kmeans(feats, k, metric="cosine", seed=seed)
    # ambiguity (Eq. 5 vs PCL's code): phi as printed by default; PCL's rescaling only with --phi-mean (digits seed 0,
    # score_cos / score_var: 70.5 / 80.5 as printed, 63.7 / 79.0 rescaled to mean 0.5)
    return {"centers": centers, "assign": assign, "phi": concentration(feats, centers, assign, alpha, phi_mean or None)}


# ----------------------------------------------------------------------------------------------
# Scoring (Sec. 3.4), on the projection layer z, the training images as reference. Chunked by common.knn: at most
# a chunk x len(train) block of similarities exists at once.

def score_cos(train_z, test_z):
    """Eq. 9: max_m cos(z_m, z) * ||z||. ambiguity: the paper prints the norm of the training feature z_m; CSI's
    code (which Eq. 9 cites) multiplies by the norm of the un-normalised test feature z. We follow CSI."""
    return common.knn(test_z, train_z, k=1, metric="cosine")[0][:, 0] * test_z.float().norm(dim=1)


def score_var(train_z, test_z, k=10):
    """Eq. 10: score_cos / sqrt(1 / (K - 1) sum_{v in V} ||z_v - mean_V z||^2), V the K training images with the
    highest score_cos terms (the K nearest by cosine). ambiguity (Eq. 10): the deviation is of the training
    projection vectors z_v (un-normalised, as written), squared norm summed over dimensions: the spread of the
    neighbourhood, not of the K similarity values."""
    cos, nearest = common.knn(test_z, train_z, k=k, metric="cosine")
    train_z = train_z.float()
    spread = torch.empty(len(test_z), device=train_z.device)
    step = common.chunk_rows(k * train_z.shape[1])                     # chunk x K x d neighbours at a time
    for i in range(0, len(test_z), step):
        spread[i:i + step] = train_z[nearest[i:i + step]].var(dim=1).sum(1).sqrt()   # var: 1 / (K - 1)
    return cos[:, 0] * test_z.float().norm(dim=1) / spread.clamp_min(1e-12)


@torch.no_grad()
def projections(model, x, n_aug, size, blur):
    """z of the images x (on the model's device); with n_aug > 0, CSI's test-time ensemble: the mean z over n_aug
    augmented views, view t drawn from seed t with one parameter set for every image, so the training images, the
    ID test images and every OOD set see the same n_aug augmentations (crop area fixed at 54%)."""
    if n_aug == 0:
        return common.embed(model, x)[1]
    aug = common.SimCLRAugment(size, scale=(CSI_TEST_CROP_SCALE, CSI_TEST_CROP_SCALE), blur=blur)
    total = 0
    for t in range(n_aug):
        view = lambda xb: aug(xb, generator=torch.Generator(xb.device).manual_seed(t), same_for_batch=True)
        total = total + common.embed(model, x, transform=view)[1]
    return total / n_aug


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = common.parse_args(build_parser(), PRESETS, argv)
    if not 0 <= args.lam <= 1:
        common.fail(f"--lam must lie in [0, 1], got {args.lam}")
    if args.clusters < 2:
        common.fail(f"--clusters must be at least 2 (Eq. 4 needs other centres), got {args.clusters}")
    if args.cluster_start < 0 or args.cluster_every < 0 or args.n_aug < 0:
        common.fail("--cluster-start, --cluster-every and --n-aug must be >= 0")
    if args.score_k < 2:
        common.fail(f"--score-k must be at least 2 (a standard deviation needs 2 samples), got {args.score_k}")
    clustering = args.lam > 0 and not (args.no_ccl and args.no_cil)
    if clustering and args.cluster_start >= args.epochs:
        common.fail(f"--cluster-start {args.cluster_start} leaves no joint stage in --epochs {args.epochs}")
    t_start = time.time()
    device = common.setup(args, "ccl")
    data = common.load_data(args)
    x = data.train_x.to(device)
    if args.score_k > len(x):
        common.fail(f"--score-k {args.score_k} is larger than the training set ({len(x)} images)")
    model = common.Encoder(args.arch, width=args.width).to(device)
    aug = common.SimCLRAugment(args.size, blur=True)       # Sec. 3.1: crop, colour distortion, Gaussian blur
    state = {}                                             # centers, assign, phi: saved with every checkpoint

    def on_epoch_start(epoch, encoder):
        # "assign" missing in the joint stage: resumed from a checkpoint of a run without clustering
        due = is_cluster_epoch(epoch, args.cluster_start, args.cluster_every) or "assign" not in state
        if clustering and epoch >= args.cluster_start and due:
            state.update(cluster(encoder, x, args.cluster_layer, args.clusters, args.alpha, args.phi_mean,
                                 seed=args.seed + epoch))
            sizes = torch.bincount(state["assign"], minlength=args.clusters).tolist()
            print(f"epoch {epoch + 1}: K-means on the {args.cluster_layer} layer, sizes {sizes}, "
                  f"phi {state['phi'].min():.3f}..{state['phi'].max():.3f}", flush=True)

    def loss_fn(net, xb, idx, epoch):
        h, z = net(torch.cat([aug(xb), aug(xb)]))
        l_self = common.nt_xent(z, args.tau)                                     # Eq. 2-3
        if not clustering or epoch < args.cluster_start:
            return l_self                                   # warm-up stage: L_self alone, weight 1 (Sec. 4)
        feats = h if args.cluster_layer == "embedding" else z
        assign = state["assign"][idx].repeat(2)                                  # both views share the image's id
        terms = {}
        if not args.no_ccl:
            terms["ccl"] = cluster_center_loss(feats, state["centers"], assign, state["phi"])
        if not args.no_cil:
            terms["cil"] = cluster_instance_loss(feats, assign, args.tau)
        return ccl_loss(l_self, terms.get("ccl"), terms.get("cil"), args.lam), {"self": l_self, **terms}

    # ambiguity (Sec. 4): one cosine schedule (with its --warmup-epochs) over both stages, not restarted at the joint
    # stage; --epochs counts both stages.
    common.train(model, loss_fn, x, args, os.path.join(args.out, "checkpoint.pt"), state=state,
                 on_epoch_start=on_epoch_start)

    # Features once per set (the ensemble costs n_aug passes); common.evaluate then scores features, not images.
    feats = lambda imgs: projections(model, imgs.to(device), args.n_aug, args.size, blur=True)
    train_z = feats(x)
    test = SimpleNamespace(test_x=feats(data.test_x), ood={name: feats(v) for name, v in data.ood.items()})
    metrics = {"score_cos": common.evaluate(lambda z: score_cos(train_z, z), test),
               "score_var": common.evaluate(lambda z: score_var(train_z, z, args.score_k), test)}
    what = "CCL" if clustering else "SimCLR (no cluster loss)"
    for name, m in metrics.items():
        common.print_results(m, f"{what}, {name}, AUROC etc. in % (higher score = in-distribution)")
    results = {"method": "ccl", "config": vars(args), "metrics": metrics,
               "seconds": time.time() - t_start, "device": str(device)}
    common.save_results(os.path.join(args.out, "results.json"), results)
    return results


if __name__ == "__main__":
    main()
