"""Masked Contrastive Learning (MCL) with Self-Ensemble Inference (SEI): OOD detection by class-wise Gaussians
(Cho, Seol, Lee, "Masked Contrastive Learning for Anomaly Detection", IJCAI 2021; the paper's equation numbers).

Training is SimCLR whose temperature is a mask over pairs of views (CCM, Eq. 3, 11): other classes repel at 1/tau,
the own class and rotation only at alpha << 1/tau, the own class at another rotation at beta; stochastic positive
attraction (SPA, Eq. 7-9) pulls each view to a random image of its class and rotation; every image enters rotated
0/90/180/270 degrees, the rotation an auxiliary label. Inference fits a Gaussian per (class, rotation) and scores
an image by the Mahalanobis distances of its 4 rotations (x 2 mirrors), aggregated (Eq. 12-20), higher = ID.

    python mcl.py                             # digits 0-5 vs 6-9: ~21 s of CPU, one thread of a 2-core AMD EPYC
    python mcl.py --no-ccm --no-spa --no-aux  # its SimCLR setting: NT-Xent at tau, the same inference
    python mcl.py --labels kmeans             # no class labels: K-means pseudo-labels after a SimCLR warm-up
    python mcl.py --preset paper              # CIFAR-10, ResNet-34, 400 epochs, batch 256 x 4: a GPU job

Result on digits, AUROC % over --seed 0-4, mean ± std (README's table: `OMP_NUM_THREADS=1 python mcl.py
--id-classes SPLIT --seed S`, one thread of a 2-core AMD EPYC): the embedding layer h, 4 rotations, w-avg 95.7 ± 1.4
with 0-5 in (97.3 ± 1.1 with the odd digits in, 91.7 ± 3.1 with 4-9 in); its SimCLR setting 95.9 ± 0.7; beside raw
pixels' nearest neighbour 98.5 and an untrained encoder's 82.9 ± 8.7.

Use it in your code:

    import torch, common, mcl
    model = common.Encoder("resnet18", proj_dim=8, width=4)               # backbone h, projection z
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)          # 8 images of classes 0 and 1
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        loss, logs = mcl.mcl_step(model, x, y, common.SimCLRAugment(16))   # 4 rotations x 2 views, Eq. 10
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = mcl.score_state(model, x, y, n_classes=2)                     # Gaussians per (class, rotation)
    readings = mcl.sei_readings(model, state["gaussians"], x, max_views=4)   # {reading: (class, score)}
    pred, score = readings["lf sei4 w-avg"]                               # h, 4 rotations, Eq. 19-20
    print(loss.item(), pred, score)                                       # higher score = in-distribution
"""
import argparse
import math
import warnings

import torch
import torch.nn.functional as F

import common
import harness

# ----------------------------------------------------------------------------------------------
# Sizes: MCL's rotations, SEI's view counts, aggregations and feature layers.

N_ROT = 4                       # paper: Sec. 4, the auxiliary task is 4-way rotation
SEI_SIZES = (1, 4, 8)           # paper: Fig. 3, plain inference, 4 rotations, 4 rotations x {upright, mirrored}
AGGREGATIONS = ("avg", "max", "w-avg")
LAYERS = ("ph", "lf")


# ----------------------------------------------------------------------------------------------
# Losses: z = cat([view1, view2]) (2N x d), rows i and i + N are the two views of one (rotated) image; labels are
# per row. Each loss runs in float32 whatever the autocast (common.float32); cosines are not clamped.


def ccm_mask(y_main, y_aux, alpha=0.05, beta=2.5, tau=0.2):
    """Class-conditional mask (Eq. 11; Eq. 3 when y_aux is constant): 2N x 2N inverse temperatures, alpha for
    same class and rotation, beta for same class and other rotation, 1/tau otherwise and for the partner view."""
    same_main = y_main[:, None] == y_main[None]
    same_aux = y_aux[:, None] == y_aux[None]
    mask = torch.where(same_main, torch.where(same_aux, alpha, beta), 1 / tau)
    # ambiguity: (Eq. 4) the partner view keeps 1/tau (public code); with alpha there, the numerator's term would
    # be missing from its own denominator and p_ccm would not be a probability.
    return torch.where(partner_views(len(y_main), y_main.device), 1 / tau, mask)


def partner_views(n2, device):
    """2N x 2N bool: True at (i, i + N) and (i + N, i), the other view of the same image."""
    i = torch.arange(n2, device=device)
    return i[:, None] == i.roll(n2 // 2)[None]


def cosine(z):
    z = F.normalize(z, dim=1)
    return z @ z.T


def ccm_term(logits):
    """L_ccm (Eq. 4-6) from the logits sim x CCM: cross-entropy with the own view left out, the partner view the
    target (its logit sim / tau, as in Eq. 4's numerator); the mean over all 2N views."""
    n2 = len(logits)
    logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=logits.device), float("-inf"))
    return F.cross_entropy(logits, torch.arange(n2, device=logits.device).roll(n2 // 2))


def spa_positives(same, generator=None):
    """One uniform draw per row among the True entries of the square mask `same` (-1 where a row has none): the
    argmax of i.i.d. uniform scores over the allowed entries is uniform over them, with no loop over rows."""
    scores = torch.rand(same.shape, device=same.device, generator=generator).masked_fill_(~same, -1.0)
    return torch.where(same.any(1), scores.argmax(1), -1)


def spa_term(logits, sim, y_main, y_aux, tau, generator=None):
    """(1 / 2N) sum_i l_spa(i) (Eq. 7-10) from the logits sim x CCM. Each rotated image draws one other image with
    its joint label (Eq. 7's set, image by image), shared by its two views: view 1 attracts that image's view 1,
    view 2 its view 2. The denominator holds every view of another image at CCM (Eq. 8), the positive at 1/tau,
    and the partner view with logit 0.
    ambiguity: (Eq. 9, App. A) one draw per rotated image and step, shared by its views, as the official code;
    Eq. 9 draws per view from both views of every other image, and App. A writes the mean over that set.
    ambiguity: (Eq. 8) the drawn positive enters its denominator at 1/tau, like its numerator (official code);
    Eq. 8 as printed gives it alpha there. Same reasoning as for the partner view in ccm_mask.
    ambiguity: (Eq. 8) the partner view, which Eq. 8 leaves out, stays in the denominator with logit 0 (a
    constant 1, no gradient), as the official code's zero mask entry there."""
    n2, n = len(logits), len(logits) // 2
    own = torch.eye(n2, dtype=torch.bool, device=sim.device)
    joint_same = (y_main[:n, None] == y_main[None, :n]) & (y_aux[:n, None] == y_aux[None, :n])
    image = spa_positives(joint_same & ~own[:n, :n], generator)                   # N: the drawn image or -1
    pos = torch.cat([image, torch.where(image >= 0, image + n, -1)])             # view v of i -> view v of it
    is_pos = torch.zeros_like(own).scatter_(1, pos.clamp_min(0)[:, None], (pos >= 0)[:, None])
    logits = torch.where(is_pos, sim / tau, logits).masked_fill(partner_views(n2, sim.device), 0.0)
    # Eq. 10 divides by 2N: a view without a positive (target -1, ignored) adds 0 to the sum.
    return F.cross_entropy(logits.masked_fill(own, float("-inf")), pos, ignore_index=-1, reduction="sum") / n2


@common.float32
def ccm_loss(z, y_main, y_aux, alpha=0.05, beta=2.5, tau=0.2):
    """L_ccm (Eq. 4-6) of the views z."""
    return ccm_term(cosine(z) * ccm_mask(y_main, y_aux, alpha, beta, tau))


@common.float32
def spa_loss(z, y_main, y_aux, alpha=0.05, beta=2.5, tau=0.2, generator=None):
    """L_spa (Eq. 7-10) of the views z. generator: a torch.Generator on z's device for the draw (None: the global
    RNG, which checkpoints carry)."""
    sim = cosine(z)
    return spa_term(sim * ccm_mask(y_main, y_aux, alpha, beta, tau), sim, y_main, y_aux, tau, generator)


@common.float32
def mcl_loss(z, y_main, y_aux, alpha=0.05, beta=2.5, tau=0.2, spa_weight=1.0, generator=None):
    """L_MCL = L_ccm + lambda L_spa (Eq. 10) -> (loss, {"ccm": ..., "spa": ...}), the cosines and the mask computed
    once for both. spa_weight 0 skips SPA. Under torchrun, over the views of all ranks; each rank draws its own SPA
    positives for that global batch, so the gradient DDP averages is the mean over one draw per rank (as unbiased
    as a single draw)."""
    z, y_main, y_aux = (torch.cat([common.all_gather(half) for half in t.chunk(2)]) for t in (z, y_main, y_aux))
    sim = cosine(z)
    logits = sim * ccm_mask(y_main, y_aux, alpha, beta, tau)
    ccm = ccm_term(logits)
    if spa_weight == 0:
        return ccm, {"ccm": ccm.detach()}
    spa = spa_term(logits, sim, y_main, y_aux, tau, generator)
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
# Training step: every image of the batch in its 4 rotations (Sec. 2.4), all in one batch as the public sampler.


def rotated_views(xb, aug, n_rot=N_ROT):
    """B uint8 images -> (2 x n_rot x B views, rotation of each view). Rows [r B, (r + 1) B) of each half hold
    rotation r, so row i and row i + n_rot B are two views of one rotated image. All views come from one call of
    the augmentation (each sample draws its own parameters), as common.simclr_step's. Augmenting before rotating
    keeps the flip horizontal in the upright frame, as the public code's rotation-dependent flip does. Each block
    of rows is rotated by a plain int: no per-sample indexing."""
    views = aug(xb.repeat(2 * n_rot, 1, 1, 1))
    views = torch.cat([common.rotate90(block, k % n_rot) for k, block in enumerate(views.chunk(2 * n_rot))])
    y_aux = torch.arange(2 * n_rot * len(xb), device=xb.device) // len(xb) % n_rot
    return views, y_aux


def mcl_step(net, xb, y, aug, n_rot=N_ROT, tau=0.2, alpha=0.05, beta=2.5, spa_weight=1.0, generator=None):
    """MCL's training step -> (loss, logs): the B uint8 images xb with class labels y (B,), each in n_rot
    rotations x 2 augmented views, through net (-> h, z), L_MCL on z. alpha = beta = 1/tau and spa_weight 0 give
    NT-Xent over the rotated images: MCL's SimCLR setting. No host sync."""
    views, y_aux = rotated_views(xb, aug, n_rot)
    _, z = net(views)
    return mcl_loss(z, y.repeat(2 * n_rot), y_aux, alpha, beta, tau, spa_weight, generator)


# ----------------------------------------------------------------------------------------------
# Scores: class-conditional Gaussians, Mahalanobis distances, self-ensemble (Sec. 3). Every run evaluates each SEI
# size up to --sei (1, 4, 8 views), the three aggregations and both feature layers (LF = the backbone's pooled
# feature h, PH = the projection head's z, Table 6) from one pass over each set's views, prints that grid (every
# reading's metrics in results.json, each reading a column of the CSVs) and reports the configured reading
# (--feature-layer, --sei, --sei-agg) beside the sanity baselines. Prediction = the nearest class (Eq. 13-14).


def sei_views(xb, n_views):
    """Test views of a batch (Sec. 3.2, Fig. 3), image-major: row b x n_views + v is view v of image b, the
    rotation v % 4 of image b, mirrored first when v >= 4."""
    x = common.to_float(xb)
    views = [common.rotate90(x.flip(3) if v >= N_ROT else x, v % N_ROT) for v in range(n_views)]
    return torch.stack(views, 1).flatten(0, 1)


@torch.no_grad()
def view_features(model, x, n_views, batch_size=512):
    """-> {"ph": z, "lf": h} of the uint8 images x (on the model's device), each N x n_views x d, float32 and
    L2-normalised (the official code normalises z; we do h as well). All views of an image go through the network
    in one batch."""
    h, z = common.embed(model, x, max(1, batch_size // n_views), lambda xb: sei_views(xb, n_views))
    per_image = lambda f: F.normalize(f, dim=1).view(len(x), n_views, -1)
    return {"ph": per_image(z), "lf": per_image(h)}


def sei_distances(feats, gaussians):
    """feats N x V x d, gaussians[r] = (means, chol) of rotation r -> N x V x C Mahalanobis distances (not
    squared, float64): each view against the Gaussians of its own rotation (Eq. 15-16)."""
    return torch.stack([common.mahalanobis(feats[:, v], *gaussians[v % len(gaussians)])
                        for v in range(feats.shape[1])], 1).sqrt()


def sei_aggregate(dist, how):
    """dist: N x V x C Mahalanobis distances of V views -> (predicted class, its score), Eq. 13-14; the score is
    minus an aggregate distance (higher = in-distribution).
    ambiguity: Eq. 12 as printed drops the minus sign that its text and Eq. 15 state: score = minus the distance.
    ambiguity: Eq. 12 prints the squared distance; every aggregation here works on distances, as the official
    code's (its Mahalanobis distance takes the square root).
    avg (Eq. 17): minus the mean over views of the distances (the official 'mean' sums them: the same ranking).
    max (Eq. 18): minus the smallest distance over views (the official 'min').
    w-avg (Eq. 19-20): minus the harmonic mean over views of the distances, per class.
    ambiguity: (Eq. 19) one weight per view, the inverse of a sum over classes of 1 / score, is undefined for
    Eq. 12's negative scores; the official code weights each view and class by 1 / distance, so that the weighted
    mean of the distances is their harmonic mean."""
    if how == "avg":
        agg = -dist.mean(1)
    elif how == "max":
        agg = -dist.amin(1)
    elif how == "w-avg":
        agg = -1 / (1 / dist.clamp_min(1e-12)).mean(1)
    else:
        raise ValueError(f"unknown SEI aggregation '{how}' (known: {', '.join(AGGREGATIONS)})")
    score, pred = agg.max(1)
    return pred, score


def readings(max_views):
    """(layer, views, aggregation) of every SEI reading up to max_views; a single view has no aggregation."""
    return [(layer, n, how) for layer in LAYERS for n in SEI_SIZES if n <= max_views
            for how in (AGGREGATIONS if n > 1 else ("avg",))]


def reading_name(layer, n, how):
    return f"{layer} sei{n} {how if n > 1 else '-'}"


@torch.no_grad()
def sei_readings(model, gaussians, x, max_views):
    """Every SEI reading up to max_views views of the uint8 images x (on the model's device), from one pass over
    their views -> {reading name: (predicted class, score)}."""
    dist = torch.stack([sei_distances(f, gaussians[layer])
                        for layer, f in view_features(model, x, max_views).items()], 1)     # N x layer x V x C
    return {reading_name(layer, n, how): sei_aggregate(dist[:, LAYERS.index(layer), :n], how)
            for layer, n, how in readings(max_views)}


@torch.no_grad()
def score_state(model, x, labels, n_classes, n_rot=N_ROT, fraction=1.0, ridge=0.01, seed=0):
    """What score() needs beside the weights: one Gaussian per (class, rotation) and layer, fitted on a random
    `fraction` of the training images x (uint8, on the model's device) with class labels (N,) in each of their
    n_rot rotations (n_rot: the rotations the test views need) -> {"gaussians": {layer: [[means, chol] of
    rotation r]}}. Features in float32, Gaussians in float64, whatever the autocast."""
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max(1, round(fraction * len(x)))]
    keep = keep.to(x.device)
    with torch.autocast(x.device.type, enabled=False):
        feats = view_features(model, x[keep], n_rot)
    return {"gaussians": {layer: [list(common.fit_gaussians(f[:, r], labels[keep], n_classes, ridge))
                                  for r in range(n_rot)] for layer, f in feats.items()}}


@torch.no_grad()
def score(model, state, x, s):
    """Every SEI reading the run reports, up to s.sei views of the uint8 images x (on the model's device) ->
    {reading name: N float32 scores}, higher = in-distribution; reading_name(s.feature_layer, s.sei, s.sei_agg)
    is the configured one. Features in float32 and distances in float64 whatever the autocast; deterministic (the
    test views are fixed rotations and mirrors)."""
    with torch.autocast(x.device.type, enabled=False):
        return {k: sc.float() for k, (_, sc) in sei_readings(model, state["gaussians"], x, s.sei).items()}


# ----------------------------------------------------------------------------------------------
# Stages: each returns what the next one needs.


def build_model(s):
    """The encoder MCL trains, untrained, from the run's settings s (arch, width, init, proj_dim, proj_hidden;
    weights: the input statistics of the weights the run started from).
    init 'torchvision': torchvision's kaiming init on every convolution but the stem, which keeps PyTorch's default,
    as the official code (its models.py replaces the stem convolution after torchvision's init)."""
    model = common.Encoder(s.arch, s.proj_dim, s.proj_hidden, width=s.width, init=s.init,
                           pretrained=bool(getattr(s, "weights", None)))
    if s.init == "torchvision" and s.arch in common.CIFAR_ARCHS:
        model.backbone.conv1.reset_parameters()
    return model


def kmeans_labels(model, x, aug, train, n_classes, n_rot, tau, seed):
    """Our unsupervised extension: MCL's SimCLR setting trained by train(model, step, x), then K-means (cosine) on
    the backbone feature h of the training images -> pseudo-labels (N,)."""
    train(model, lambda net, xb, idx, epoch: mcl_step(net, xb, torch.zeros_like(idx), aug, n_rot, tau, 1 / tau,
                                                      1 / tau, 0.0), x)
    labels = common.kmeans_labels(model, x, n_classes, seed)                   # ours: cosine on h
    print(f"K-means: {n_classes} clusters of sizes {torch.bincount(labels, minlength=n_classes).tolist()}", flush=True)
    return labels


def train_mcl(model, x, labels, aug, train, n_rot, tau, alpha, beta, spa_weight):
    """MCL training (Eq. 10) of model on the images x with class labels (N,) by train(model, step, x) -> the model."""
    return train(model, lambda net, xb, idx, epoch: mcl_step(net, xb, labels[idx], aug, n_rot, tau, alpha, beta,
                                                             spa_weight), x)


def accuracy_of(pred, test_y, matched):
    """Accuracy in % of the predicted classes (Hungarian-matched when the classes are K-means clusters)."""
    if test_y is None:
        return None
    return common.cluster_accuracy(pred, test_y) if matched else 100 * (pred == test_y).float().mean().item()


def print_grid(metrics, accuracy, ood_names):
    """Every reading's accuracy and AUROC per OOD set, one line each; each column headed by its set's whole name."""
    widths = [max(8, len(ood)) for ood in ood_names]
    print("layer SEI agg      acc  " + "  ".join(f"{ood:>{w}}" for ood, w in zip(ood_names, widths)) + "   (AUROC)")
    for key, m in metrics.items():
        acc = f"{accuracy[key]:5.1f}" if accuracy.get(key) is not None else "    -"
        print(f"{key:<16} {acc}  " + "  ".join(f"{m[ood]['auroc']:{w}.2f}" for ood, w in zip(ood_names, widths)))


# ----------------------------------------------------------------------------------------------
# Deviations (paper / official code / ours, with the reason after the colon):
#
#     what                  paper                    official code             ours: why
#     SEI w-avg             Eq. 19-20: one weight    per view and class,       as the official code: minus the harmonic
#                           per view, 1 / sum over   weight 1 / distance:      mean of the distances (not squared);
#                           classes of 1 / score     the harmonic mean of      Eq. 19 is undefined for Eq. 12's
#                                                    the distances             negative scores
#     SEI avg, max          Eq. 17-18 on Eq. 12's    'mean': the sum over      as the official code, on distances: avg
#                           squared distances        views of the distances    their mean (the sum's ranking), max the
#                                                    (not squared); 'min':     smallest
#                                                    the smallest distance
#                                                    (as published, both then
#                                                    stop with an
#                                                    UnboundLocalError at a
#                                                    line that reads w-avg's
#                                                    list)
#     Gaussian fit          not stated               the first 79 batches      paper preset: a random 40.4% of the
#                                                    (len // 5 + 1) of an      upright training images; elsewhere all
#                                                    unshuffled loader of      (small data sets need every image)
#                                                    every rotated image, the
#                                                    mirrors after them: the
#                                                    first 20,224 of 50,000
#                                                    images (40.4%), unflipped
#     convolution init      not stated               torchvision's (kaiming    paper preset: torchvision's; digits and
#                                                    normal, fan_out)          quick: PyTorch's default: the digits
#                                                                              evidence was measured with it
#     stem init             not stated               PyTorch's default: the    as the official code under --init
#                                                    3x3 stem convolution      torchvision (build_model resets the
#                                                    replaces the 7x7 one      stem's parameters)
#                                                    after torchvision's init
#     training length       not stated               config: 400 epochs; the   paper preset: 400 (the config);
#                                                    README's AUROC ~94 is     --epochs 800 for the README's checkpoint
#                                                    its epoch_800.pt
#     beta                  2.5 = 1 / (2 tau),       2                         2.5 (the paper; A.3 finds beta hardly
#                           App. A.3                                           changes the results)
#     cosine clamp          none                     clamp(min=1e-7)           none: the clamp zeroes the gradient of
#                                                                              every negative similarity
#     partner view in       CCM (alpha) in Eq. 4's   1/tau                     1/tau: the numerator's term then is in
#     the CCM denominator   denominator                                        its denominator (p is a probability)
#     SPA positive in its   CCM (alpha), Eq. 8       1/tau                     1/tau, for the same reason
#     denominator
#     partner view in       left out (Eq. 8)         kept with logit 0 (a      as the official code: a constant 1 in the
#     the SPA denominator                            zero mask entry)          denominator, without gradient
#     SPA draws             Eq. 9: one positive per  one other image of the    as the official code; under torchrun
#                           view from Eq. 7's set    joint label per rotated   each rank draws for the global batch
#                           (both views of every     image and step, shared
#                           other image); App. A:    by its two views: view v
#                           the mean over the set    attracts its view v
#     BatchNorm             not stated               nn.DataParallel on every  the statistics of the whole batch (one
#     statistics                                     visible GPU: each GPU's   process, or SyncBatchNorm under
#                                                    slice of the 2,048 views  torchrun): the same on any GPU count
#                                                    (512 on 4 GPUs)
#     input scaling         not stated               none: ToTensor's [0, 1]   (x - 0.5) / 0.5 in common.Encoder (a
#                                                                              pretrained net: its weights' own):
#                                                                              BatchNorm follows the first convolution,
#                                                                              so a global scale and shift of the
#                                                                              input change only the zero-padded
#                                                                              border; one scaling serves every script
#     precision             not stated               fp32 (no autocast)        training under bf16 autocast on CUDA
#                                                                              (common's --amp auto; --amp off: fp32)
#                                                                              for tensor-core speed; the losses run in
#                                                                              fp32 (common.float32), the scores on
#                                                                              fp32 features and fp64 distances
#     features              z (Eq. 12)               z, L2-normalised          z and h, both L2-normalised: h is the
#                                                                              better layer on digits
#     covariance            not stated               + 1e-9 I                  + ridge x mean variance (paper preset
#                                                                              1e-7, about 1e-9 I on unit 128-d z):
#                                                                              the ridge follows the features' scale
#     digits                not in the paper         -                         common's digit-safe augmentation, LF
#                                                                              and 4 views (DIGITS_INFERENCE): a
#                                                                              mirrored digit is not a digit


# ----------------------------------------------------------------------------------------------
# Presets and command line: --preset NAME sets values beneath the command line (explicit flags win);
# MCL's flags on top of common's, and their checks before any work.

PAPER = {
    "dataset": "cifar10",           # paper: Sec. 4.1
    "size": 32,                     # paper: CIFAR-10's own size
    "ood": ["svhn", "cifar100"],    # paper: Table 1 (its LSUN(F) and ImageNet(F) are CSI's sets: add --ood folder:PATH)
    "augment": "paper",             # paper: Sec. 4, colour jitter, grayscale, flip, inception crop
    "arch": "resnet34",             # paper: Table 1 (ResNet-18 in Table 2)
    "width": 64,                    # paper: the standard ResNet
    "init": "torchvision",          # public code: torchvision's, the stem's default (ambiguity: the paper names none)
    "proj_hidden": 2048,            # public code: head 512 -> 2048 -> 128
    "proj_dim": 128,                # public code: 128-d z
    "epochs": 400,                  # public code: its config (ambiguity: its README's result is epoch_800.pt)
    "batch_size": 256,              # paper: Sec. 4, batch 1024 = 256 images x 4 rotations (public code's sampler)
    "optimizer": "sgd",             # paper: Sec. 4
    "lr": 1.2,                      # paper: Sec. 4, 0.3 x 1024 / 256
    "momentum": 0.9,                # paper: Sec. 4
    "weight_decay": 1e-6,           # paper: Sec. 4
    "nesterov": True,               # public code: SGD with Nesterov momentum
    "warmup_epochs": 0,             # paper: Sec. 4, cosine schedule without warm-up
    "final_lr": 6e-4,               # public code: cosine down to lr x 5e-4
    "tau": 0.2,                     # paper: Sec. 4
    "alpha": 0.05,                  # paper: Sec. 4, App. A.3
    "beta": 2.5,                    # paper: App. A.3, 1 / (2 tau) (ambiguity: the public code uses 2)
    "spa_weight": 1.0,              # paper: Sec. 4, lambda
    "jitter": 0.4,                  # paper: Sec. 4, colour strength 0.5 = SimCLR's 0.8 x 0.5 (hue = jitter / 4)
    "min_crop": 0.08,               # paper: Sec. 4, inception crop
    "labels": "true",               # paper: Sec. 3.1 (public code: ground-truth CIFAR-10 labels)
    "sei": 8,                       # paper: Table 4, 8-way SEI
    "sei_agg": "w-avg",             # paper: Table 4, best AUROC
    "feature_layer": "ph",          # paper: Table 6, projection head
    # ambiguity: the paper does not say which training images the Gaussians see; the public code fits them on the
    # first 79 batches of an unshuffled loader of every rotated image (their mirrors after them): the first 20,224
    # images, none mirrored; we draw that fraction of the upright images at random.
    "fit_fraction": 0.404,          # public code: len(loader) // 5 + 1 = 79 batches x 1,024 / 4 rotations = 20,224
    "ridge": 1e-7,                  # public code: 1e-9 I on unit 128-d features, i.e. ~1e-7 x the mean variance
}
QUICK = {  # real CIFAR-10 reduced to a CPU path check: torchvision's files under --data-root
    "dataset": "cifar10",           # ours: the paper's data
    "id_classes": "0-5",            # ours: six classes in, four held out as OOD
    "size": 32,                     # paper: CIFAR-10's own size
    "subset": 6000,                 # ours: a CPU budget
    "width": 16,                    # ours: a CPU budget
    "epochs": 5,                    # ours: a CPU budget
    "batch_size": 64,               # ours: x 4 rotations x 2 views = 512 views per step
    "lr": 0.3,                      # paper: Sec. 4's 0.3 x batch / 256, at 256 rotated images
    "init": "pytorch",              # ours: PyTorch's default convolution initialisation, as on digits
}
PRESETS = {"paper": PAPER, "quick": QUICK}

PAPER_INFERENCE = {"feature_layer": "ph", "sei": 8}      # paper: Tables 4 and 6 (PH, 8-way, with --sei-agg w-avg)
# ours: the default reading on digits, chosen on 5 seeds x 3 class splits (see the README): the embedding layer,
# 4 rotations (mirrored digits are not digits). It goes with common's digit augmentation, which has no flip, so
# mirrored test views were never trained on; the paper's augmentation (natural images, --preset paper) keeps
# PAPER_INFERENCE.
DIGITS_INFERENCE = {"feature_layer": "lf", "sei": 4}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[harness.arg_parser()])
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
    g.add_argument("--simclr-epochs", type=int, default=None,
                   help="SimCLR warm-up before K-means (--labels kmeans; default: --epochs)")
    g.add_argument("--jitter", type=float, default=0.4, help="colour jitter of the paper's augmentation (hue: / 4)")
    g.add_argument("--min-crop", type=float, default=0.08, help="smallest crop area of the paper's augmentation")
    g.add_argument("--proj-hidden", type=int, default=None, help="hidden width of the head (default: backbone's)")
    g.add_argument("--proj-dim", type=int, default=128)
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum (a field of common.TrainConfig)")
    g = parser.add_argument_group("inference")
    g.add_argument("--sei", type=int, default=None, choices=SEI_SIZES,
                   help="test views: 1, 4 rotations, x 2 mirrors (default: 4 with the digits augmentation, which has "
                        "no flip; 8 with the paper's)")
    g.add_argument("--sei-agg", default="w-avg", choices=AGGREGATIONS, help="Eq. 17 (avg), 18 (max), 19-20 (w-avg)")
    g.add_argument("--feature-layer", default=None, choices=LAYERS,
                   help="the reported reading's layer: projection head z or backbone h (default: lf with the "
                        "digits augmentation, ph with the paper's)")
    g.add_argument("--fit-fraction", type=float, default=1.0, help="fraction of the training images the Gaussians see")
    g.add_argument("--ridge", type=float, default=0.01, help="covariance ridge, times the class's mean variance")
    # ours: a digits run of about 35 s on one CPU thread (the 8 x 8 digits lose nothing at 16 x 16)
    parser.set_defaults(size=16, width=8, epochs=10, batch_size=32, lr=0.3, weight_decay=1e-6)
    return parser


def training_augment(args):
    """The run's training augmentation: the paper's (Sec. 4: inception crop from --min-crop, colour jitter, grayscale,
    flip) where harness.simclr_augment picks the paper's, its digit augmentation on digits."""
    return harness.simclr_augment(args, scale=(args.min_crop, 1.0), jitter=args.jitter)


def check_args(args):
    """Every flag of the script, before setup() loads anything; fills the preset-dependent inference defaults."""
    for flag, v in (("--tau", args.tau), ("--alpha", args.alpha), ("--beta", args.beta)):
        harness.check(v > 0 and math.isfinite(v), flag, v, "a finite number > 0")
    harness.check(args.spa_weight >= 0, "--spa-weight", args.spa_weight, "a number >= 0")
    harness.check(args.clusters >= 0, "--clusters", args.clusters, "an integer >= 0 (0: the number of ID classes)")
    labelled = harness.count_classes(args.dataset) > 0
    harness.check(labelled or args.labels == "kmeans", "--labels", args.labels, f"kmeans: MCL needs class labels and "
                 f"{args.dataset} has no class folders; --labels kmeans --clusters K gives it K-means pseudo-labels")
    harness.check(labelled or args.clusters, "--clusters", args.clusters,
                 f"K >= 1 with --labels kmeans: {args.dataset} has no class folders to count the clusters from")
    harness.follow_epochs(args, "mcl", "simclr_epochs", lambda epochs: epochs)
    harness.check(args.simclr_epochs >= 1, "--simclr-epochs", args.simclr_epochs, "an integer >= 1")
    harness.check(0 <= args.jitter <= 1, "--jitter", args.jitter, "a number in [0, 1]")
    harness.check(0 < args.min_crop <= 1, "--min-crop", args.min_crop, "a number in (0, 1]")
    harness.check(args.proj_hidden is None or args.proj_hidden >= 1, "--proj-hidden", args.proj_hidden,
                 "an integer >= 1")
    harness.check(args.proj_dim >= 1, "--proj-dim", args.proj_dim, "an integer >= 1")
    harness.check(0 < args.fit_fraction <= 1, "--fit-fraction", args.fit_fraction, "a number in (0, 1]")
    harness.check(args.ridge > 0, "--ridge", args.ridge, "a finite number > 0 (0 leaves a class's covariance singular)")
    for k, v in (PAPER_INFERENCE if training_augment(args).flip else DIGITS_INFERENCE).items():
        if getattr(args, k) is None:
            setattr(args, k, v)


# ----------------------------------------------------------------------------------------------
# Main: labels -> MCL training -> Gaussians per (class, rotation) -> SEI readings.


@harness.script_main("mcl", build_parser, PRESETS, check_args,
                     may_change=("sei", "sei_agg", "feature_layer", "fit_fraction", "ridge"))
def main(args, data, device, t_start):
    x = data.train_x.to(device)
    ids = torch.as_tensor(data.id_classes)
    to_index = lambda y: torch.searchsorted(ids, y).to(device)                  # class ids -> 0 .. C - 1
    has_labels = len(ids) > 0 and bool((data.train_y >= 0).all())
    n_rot = 1 if args.no_aux else N_ROT
    alpha, beta = (1 / args.tau, 1 / args.tau) if args.no_ccm else (args.alpha, args.beta)
    spa_weight = 0.0 if args.no_spa else args.spa_weight
    model = harness.start_from_weights(build_model(args), args).to(device)
    aug = training_augment(args)

    if args.labels == "true":
        harness.check(has_labels, "--labels", "true", f"a data set with class labels ({args.dataset} has none): "
                     "use --labels kmeans")
        labels, n_classes = to_index(data.train_y), len(ids)
    else:
        n_classes = args.clusters or len(ids)
        harness.check(1 <= n_classes <= len(x), "--clusters", n_classes, f"1 <= K <= {len(x)} training images")
        warm = harness.trainer(args, "simclr", "simclr.pt", views=2 * n_rot, epochs=args.simclr_epochs)
        labels = kmeans_labels(model, x, aug, warm, n_classes, n_rot, args.tau, args.seed)
    if not (args.no_ccm or args.no_spa):
        alpha_conditions(alpha, args.tau, spa_weight, 2 * n_rot * args.batch_size, n_classes * n_rot)
    train = harness.trainer(args, "mcl", "checkpoint.pt", views=2 * n_rot)               # nesterov: from --nesterov
    train_mcl(model, x, labels, aug, train, n_rot, args.tau, alpha, beta, spa_weight)

    try:
        state = score_state(model, x, labels, n_classes, min(args.sei, N_ROT), args.fit_fraction, args.ridge, args.seed)
    except torch.linalg.LinAlgError:
        raise ValueError(f"--ridge {args.ridge}: a class covariance is not positive-definite with it; give a larger "
                         f"--ridge (the trained model is kept: --resume scores it again)") from None
    scorer = harness.Scorer.from_args("mcl", args, model, state)
    test_y = to_index(data.test_y) if has_labels else None
    accuracy = {k: accuracy_of(pred, test_y, args.labels == "kmeans")
                for k, (pred, _) in sei_readings(model, state["gaussians"], data.test_x.to(device), args.sei).items()}
    main_key = reading_name(args.feature_layer, args.sei, args.sei_agg)
    results = harness.finish(args, "mcl", scorer, data, device, t_start, report=[main_key], reading=main_key,
                            accuracy=accuracy[main_key], accuracy_by_reading=accuracy)
    print_grid(results["metrics"], accuracy, list(data.ood))
    return results


if __name__ == "__main__":
    main()
