"""OECL: Outlier-Exposure Contrastive Learning, and self-OECL (Le-Gia & Ahn, "Understanding Normalization in
Contrastive Representation Learning and Out-of-Distribution Detection"; public code nguoikhongnao/real_OECL).

SimCLR leaves the norms of its projections z free, and training gives in-distribution images the larger ||z||;
OECL makes it explicit: NT-Xent on the normalised ID projections plus alpha x the mean norm of the un-normalised
outlier projections (Eq. 12). Outliers: an external set (--oe SPEC) or the training images rotated by 180/270
degrees (self-OECL, Eq. 13). Score: ||z|| (Eq. 14), of the mean z over augmentations (Eq. 15), E||z||^2 (App. C).

    python oecl.py                                # self-OECL, digits 0-5 vs 6-9: ~20 s of CPU, 1 thread, AMD EPYC
    python oecl.py --alpha 0                      # its SimCLR setting: the same run without the outlier term
    python oecl.py --oe digits --oe-classes 6-7   # OECL; outliers: training digits 6-7, evaluated on 8-9
    python oecl.py --preset paper --oe npy:PATH.npy   # CIFAR-10 one-vs-rest, every class, 500 epochs: GPU jobs

Result on digits, AUROC % over --seed 0-4, mean ± std (README's table: `OMP_NUM_THREADS=1 python oecl.py
[--alpha 0] --id-classes SPLIT --seed S`, a 2-core AMD EPYC): self-OECL's ensemble / norm 73.3 ± 8.1 / 71.4 ± 9.2
with 0-5 in (84.7 / 79.9 with the odd digits in; 58.3 / 62.1 with 4-9 in, where a rotated 6 is a 9: Sec. V-A's
failure on rotation-invariant data); its SimCLR setting (--alpha 0) 88.6 / 84.3; beside the same runs' baselines,
raw pixels' nearest neighbour 98.5 and an untrained encoder's 82.9 ± 8.7, which self-OECL does not beat here.

Use it in your code:

    import torch, common, oecl
    model = common.Encoder("resnet18", bn_in_head=True, width=4)           # ResNet + BatchNorm MLP head (App. I)
    aug = common.SimCLRAugment(16)                                          # training and Eq. 15's augmentation
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)           # ID images, uint8
    outliers = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)    # any outlier set
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(2):
        loss, logs = oecl.oecl_step(model, x, outliers, aug, tau=0.5, alpha=1.0)   # Eq. 12, one batch
        # or, with no outlier set: loss, logs = oecl.self_oecl_step(model, x, aug)  (Eq. 13)
        opt.zero_grad()
        loss.backward()
        opt.step()
    new = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    scores = oecl.ensemble_scores(model, new, aug, n_aug=4)               # higher = more in-distribution
    print({name: v[:3] for name, v in scores.items()})                    # ensemble (Eq. 15), norm (14), mean_sq_norm
"""
import argparse
import copy
import os
import re
from types import SimpleNamespace

import numpy as np
import torch

import common
import harness

# ----------------------------------------------------------------------------------------------
# Losses: Eq. 12's OECL loss (Eq. 13 is the same loss on rotations).

@common.float32
def oecl_loss(z_id, z_oe, tau=0.5, alpha=1.0):
    """Eq. 12: NT-Xent over the L2-normalised ID projections z_id = cat([view1, view2]) (2N x d) plus
    alpha * mean ||z_oe||_2 over the UN-normalised outlier projections z_oe (M x d). Outliers never enter the
    contrastive denominator. Returns (loss, {"norm_in": mean ||z_id||, "norm_out": mean ||z_oe||})."""
    norm_in, norm_out = z_id.norm(dim=1).mean(), z_oe.norm(dim=1).mean()
    loss = common.nt_xent(z_id, tau) + alpha * norm_out
    return loss, {"norm_in": norm_in.detach(), "norm_out": norm_out.detach()}


# ----------------------------------------------------------------------------------------------
# Training step: OECL and self-OECL, one forward pass each (ID and outlier views share the BatchNorm statistics,
# as in the public code). During App. G's warm-up (alpha = 0) the outliers still go through the network: they
# shape the BatchNorm statistics, and their norm is logged from the first epoch (Fig. 1's curve).

def alpha_at(epoch, alpha, warmup):
    """App. G: plain SimCLR (alpha = 0) for the first `warmup` epochs, then alpha."""
    return 0.0 if epoch < warmup else alpha


def self_oe_views(xb, aug, id_rot=(0, 1), oe_rot=(2, 3)):
    """Eq. 13's instances in the public code's order: each image augmented into four views (`aug`: crop, flip,
    colour), two for the ID instances and two for the outliers, and only then each view rotated by k x 90 degrees,
    k in id_rot (ID) or oe_rot (outliers), so that the rotations of one view share its crop and colour and differ by
    the rotation alone -> (x_id, x_oe), each [view 1 rotated by every k | view 2 rotated by every k]: rows i and
    i + len(x_id) / 2 are the two views of one (image, rotation) instance. As in the public code (a second loader
    over the same images), the outliers are rotations of their own two views, not of the ID views.
    ambiguity (Eq. 13's L_CL is "CSI"): NT-Xent with each (image, rotation) an instance, no rotation head."""
    id1, id2, oe1, oe2 = aug(torch.cat([xb] * 4)).chunk(4)       # one augmentation call for the four views
    x_id = torch.cat([common.rotate90(v, k) for v in (id1, id2) for k in id_rot])
    x_oe = torch.cat([common.rotate90(v, k) for v in (oe1, oe2) for k in oe_rot])
    return x_id, x_oe


def oecl_step(net, xb, oe_x, aug, tau=0.5, alpha=1.0):
    """OECL (Eq. 12) on a batch of B ID images xb: B outliers from oe_x (App. I: as many outliers as ID images),
    two augmented views of every image, one forward pass of 4B views -> (loss, logs). ambiguity (the paper does not
    say how outliers are drawn): uniformly with replacement, afresh at every step, so any set size works."""
    xo = oe_x[torch.randint(len(oe_x), (len(xb),), device=oe_x.device)]
    z = net(aug(torch.cat([xb, xb, xo, xo])))[1]           # rows: ID view 1 | ID view 2 | outlier views
    return oecl_loss(z[:2 * len(xb)], z[2 * len(xb):], tau, alpha)


def self_oecl_step(net, xb, aug, tau=0.5, alpha=1.0, id_rot=(0, 1), oe_rot=(2, 3)):
    """self-OECL (Eq. 13) on a batch of B images: B x len(id_rot) ID instances and B x len(oe_rot) outliers
    (self_oe_views), two views of each, one forward pass (8B views with the paper's rotations) -> (loss, logs)."""
    x_id, x_oe = self_oe_views(xb, aug, id_rot, oe_rot)
    z = net(torch.cat([x_id, x_oe]))[1]
    return oecl_loss(z[:len(x_id)], z[len(x_id):], tau, alpha)


# ----------------------------------------------------------------------------------------------
# Scores: the norm scores of Eq. 14-15 and App. C, higher = more in-distribution; the scorer's functions
# (build_model, score_state, score), with which a saved run scores new images.

def norm_score(z):
    """Eq. 14: the L2 norm of the (un-normalised) projection."""
    return z.float().norm(dim=1)


@torch.no_grad()
def ensemble_scores(model, x, aug=None, n_aug=0, batch_size=512):
    """The three scores of App. C over the clean view and n_aug views of each uint8 image by the augmentation aug
    (the training one, Eq. 15): 'norm' ||z(x)|| (Eq. 14), 'ensemble' ||mean_t z(t(x))|| (Eq. 15; the public code
    counts the clean view among the t) and 'mean_sq_norm' mean_t ||z(t(x))||^2 (App. C; ambiguity: over the same
    views, the clean one included) -> {name: N float32}. An image's views follow from its pixels alone
    (common.views_per_image), so its scores never depend on its position or companions. Chunks of
    batch_size // (1 + n_aug) images; all the views of a chunk go through the network together."""
    chunk = max(1, batch_size // (1 + n_aug))

    def views(xb):                                   # image-major: the clean view, then the n_aug augmented ones
        clean = common.to_float(xb)[:, None]
        return torch.cat([clean, common.views_per_image(xb, aug, n_aug)] if n_aug else [clean], 1).flatten(0, 1)
    out = []
    for i in range(0, len(x), chunk):
        z = common.embed(model, x[i:i + chunk], chunk, views)[1]
        z = z.view(-1, 1 + n_aug, z.shape[1])                                  # z[j, t]: view t of image j
        out.append(torch.stack([norm_score(z.mean(1)), norm_score(z[:, 0]), z.pow(2).sum(2).mean(1)], 1))
    return dict(zip(("ensemble", "norm", "mean_sq_norm"), torch.cat(out).unbind(1)))


def build_model(s):
    """The encoder of settings s (s.arch, s.width, s.init; s.weights: the input statistics of the weights the run
    started from): a ResNet and an MLP head with BatchNorm (App. I)."""
    return common.Encoder(s.arch, bn_in_head=True, width=s.width, init=s.init,
                          pretrained=bool(getattr(s, "weights", None)))


def augmentation(s):
    """The training augmentation of settings s, also Eq. 15's test-time one: the paper's (App. J, crop scale
    s.crop_scale) on natural images, common's digits augmentation on digits."""
    return harness.simclr_augment(s, scale=(s.crop_scale, 1.0))


def score_state(model):
    """What score() needs beside the weights and the settings: nothing; the norm scores read no training data."""
    return {}


def score(model, state, x, s):
    """The Scorer's adapter: ensemble_scores of the uint8 images x with s.n_aug views of the run's augmentation
    -> {'ensemble', 'norm', 'mean_sq_norm': N float32 scores}, higher = more in-distribution."""
    return ensemble_scores(model, x, augmentation(s) if s.n_aug else None, s.n_aug)


# ----------------------------------------------------------------------------------------------
# Stages: outliers, training, one run (training, then scoring), the --all-classes protocol (`python oecl.py
# --protocol leave-one-out --all-classes`: every class held out in turn, per-class AUROC).
#
# Outlier sets. The paper's CIFAR outliers, 80 Million Tiny Images, were withdrawn by their authors (2020). The
# usual substitutes: the 300K random images of Hendrycks et al.'s Outlier Exposure code (a debiased 80MTI subset,
# `npy:300K_random_images.npy`), CIFAR-100 (`cifar100`), or any folder of images (`folder:PATH`). When the outliers
# come from the in-distribution data set (`--oe digits`), they are classes outside --id-classes (--oe-classes, by
# default all of them), and those classes leave the evaluated OOD set: a test set whose classes were trained on as
# outliers would measure exposure, not detection. `--oe digits` without --oe-classes or --ood exposes every
# held-out digit and leaves no OOD set to evaluate: it ends with an error.

def exposed_classes(labels, id_classes, oe_classes=None):
    """The classes of the in-distribution data set that serve as outliers when --oe is that data set: --oe-classes
    (text, e.g. '6-7'), by default every class outside the ID classes; never an ID class, which would train the
    same images as instances and as outliers -> sorted list of class ids."""
    outside = sorted(set(labels.unique().tolist()) - set(id_classes))
    if oe_classes is None:
        if not outside:
            raise ValueError("--oe is the in-distribution data set and every class of it is in-distribution: "
                             "no class is left to serve as outliers")
        return outside
    chosen = harness.parse_classes(oe_classes, int(labels.max()) + 1, "--oe-classes")
    if set(chosen) & set(id_classes):
        raise ValueError(f"--oe-classes {oe_classes}: expected classes outside the in-distribution classes "
                         f"{harness.format_classes(id_classes)}")
    return chosen


def without_classes(data, exposed):
    """data with the classes `exposed` removed from its held-out OOD set (renamed after the classes left): a class
    trained on as outliers would measure exposure, not detection."""
    ood, ood_y, names = dict(data.ood), dict(data.ood_y), dict(data.ood_names)
    for name, labels in data.ood_y.items():
        keep = ~torch.isin(labels, torch.tensor(exposed))
        del ood[name], ood_y[name], names[name]
        if keep.any():
            left = f"classes {harness.format_classes(labels[keep].unique().tolist())}"
            ood[left], ood_y[left] = data.ood[name][keep], labels[keep]
            names[left] = [n for n, k in zip(data.ood_names[name], keep.tolist()) if k]
    if not ood:
        raise ValueError(f"classes {harness.format_classes(exposed)} serve as outliers, which leaves no OOD set to "
                         f"evaluate: expose fewer held-out classes (--oe-classes) or add --ood SPEC")
    return SimpleNamespace(**{**vars(data), "ood": ood, "ood_y": ood_y, "ood_names": names})


def select_classes(x, y, ids):
    """Keep the images whose label is in ids (labels are kept as they are)."""
    keep = torch.isin(y, torch.as_tensor(ids, dtype=y.dtype))
    return x[keep], y[keep]


def load_outliers(args, data, device):
    """The --oe images (training split) on the device -> (outliers, data, the outlier class ids or None for the
    whole set). --oe-classes selects classes of a labelled set; when --oe is the in-distribution data set, the
    outliers are exposed_classes (never an ID class) and leave the evaluated OOD set (data, without_classes)."""
    x, y, _ = harness.load_dataset(args.oe, True, args.data_root, True, args.size)
    is_id_set = harness.same_spec(args.oe, args.dataset)
    if (args.oe_classes or is_id_set) and y.min() < 0:
        raise ValueError(f"--oe {args.oe} has no labels, so no class of it can be chosen as outliers"
                         + (" (it is the in-distribution data set)" if is_id_set else ""))
    if is_id_set:
        ids = exposed_classes(y, data.id_classes, args.oe_classes)
        data = without_classes(data, ids)
    else:
        ids = harness.parse_classes(args.oe_classes, int(y.max()) + 1, "--oe-classes", args.oe) \
            if args.oe_classes else None
    if ids is not None:
        x, _ = select_classes(x, y, ids)
    if len(x) == 0:
        raise ValueError(f"--oe {args.oe} {args.oe_classes or ''}: no outlier images")
    harness.refuse_ood_sets_of_id_images({args.oe: x}, [args.oe], torch.cat([data.train_x, data.test_x]), flag="--oe")
    return x.to(device), data, ids


def train_stage(args, x, oe_x, device):
    """The encoder (ResNet + MLP head with BatchNorm, App. I) trained with OECL or self-OECL -> model."""
    model, aug = harness.start_from_weights(build_model(args), args).to(device), augmentation(args)
    n_rot = len(args.id_rotations.split(",")) + len(args.oe_rotations.split(","))
    train = harness.trainer(args, "oecl" if oe_x is not None else "self-oecl", "checkpoint.pt",
                            views=4 if oe_x is not None else 2 * n_rot)      # per ID image, outliers included
    alpha = lambda epoch: alpha_at(epoch, args.alpha, args.oe_warmup)
    if oe_x is not None:
        step = lambda net, xb, idx, epoch: oecl_step(net, xb, oe_x, aug, args.tau, alpha(epoch))
    else:
        rot = lambda text: tuple(int(r) // 90 for r in text.split(","))
        step = lambda net, xb, idx, epoch: self_oecl_step(net, xb, aug, args.tau, alpha(epoch),
                                                          rot(args.id_rotations), rot(args.oe_rotations))
    return train(model, step, x)


def run(args):
    """One configuration: train, score, report -> the results dict (also <out>/results.json)."""
    data, device, t_start = harness.start_run(args, "oecl", may_change=("n_aug",))
    oe_x, data, oe_ids = load_outliers(args, data, device) if not args.self_oe else (None, data, None)
    outliers = f"{args.oe}" + (f" classes {harness.format_classes(oe_ids)}" if oe_ids else "")
    print(f"{len(data.train_x)} ID training images; outliers: " + (f"rotations by {args.oe_rotations} degrees"
          if args.self_oe else f"{len(oe_x)} images of {outliers}"), flush=True)
    if args.alpha > 0 and args.oe_warmup >= args.epochs:
        print(f"note: --oe-warmup {args.oe_warmup} ({args.sources.get('oe_warmup')}) >= --epochs {args.epochs}: the "
              f"outlier term never applies, so this run is plain SimCLR (--oe-warmup 0 applies it at once)", flush=True)
    model = train_stage(args, data.train_x.to(device), oe_x, device)
    scorer = harness.Scorer.from_args("oecl", args, model.eval(), score_state(model))
    method = "self-OECL" if args.self_oe else f"OECL (outliers: {outliers})"
    if args.alpha > 0 and args.oe_warmup >= args.epochs:          # a shortened preset or default: say what it was
        method = f"SimCLR: {method} whose outlier term never applied (--oe-warmup {args.oe_warmup} >= --epochs " \
                 f"{args.epochs})"
    return harness.finish(args, method, scorer, data, device, t_start)


def run_protocol(args):
    """--all-classes: one run per class (one-vs-rest: it alone is ID; leave-one-out: it alone is OOD) -> results
    with the ensemble AUROC of each class and their mean (<root>/results.json)."""
    top = copy.deepcopy(args)       # the root folder, guarded and recorded by common as a run's; it holds only
    top.resume, top.overwrite = False, args.overwrite or args.resume        # the summary: each class's run resumes
    harness.setup(top, f"oecl-{args.protocol}", ood_check=False)   # (--id-classes and OOD sets are each class's)
    _, y, classes = harness.load_dataset(args.dataset, True, args.data_root, True, args.size)
    if y.min() < 0:
        raise ValueError(f"{args.dataset} has no labels: --protocol needs classes")
    n = len(classes) or int(y.max()) + 1
    root = args.out = top.out
    per_class = {}
    for c in range(n):
        a = copy.deepcopy(args)
        a.id_classes = str(c) if args.protocol == "one-vs-rest" else ",".join(str(k) for k in range(n) if k != c)
        a.out = os.path.join(root, f"class-{c}")
        a.resume = args.resume and os.path.exists(os.path.join(a.out, "checkpoint.pt"))   # a class not begun: afresh
        metrics = run(a)["metrics"]["ensemble"]     # the held-out set is named by its classes, which change with c
        per_class[c] = {("held-out classes" if k.startswith("classes ") else k): v for k, v in metrics.items()}
    sets = list(per_class[0])
    print(f"\n{args.protocol}, AUROC of the ensemble score per {'ID' if args.protocol == 'one-vs-rest' else 'OOD'} class")
    for c, m in per_class.items():
        print(f"  {c:>3} {(classes[c] if classes else ''):<12} " + " ".join(f"{m[s]['auroc']:7.2f}" for s in sets))
    mean = {s: float(np.mean([m[s]["auroc"] for m in per_class.values()])) for s in sets}
    print("  mean             " + " ".join(f"{v:7.2f}" for v in mean.values()) + f"   ({', '.join(sets)})")
    results = {"method": "oecl", "protocol": args.protocol, "config": vars(args), "per_class": per_class,
               "mean_auroc": mean}
    harness.save_results(os.path.join(root, "results.json"), results)
    return results


# ----------------------------------------------------------------------------------------------
# Deviations from the paper and the public code (why in the last column):
#   what             paper                        public code                         ours
#   optimiser        LARS (App. I)                a LARS wrapper that never rescales: SGD: what produced the
#                                                 SGD, lr 0.1, momentum 0.9, wd 5e-4  published numbers
#   outlier set      80MTI (Sec. IV-B)            80MTI or CIFAR-100                  any --oe: 80MTI is withdrawn
#   outlier draws    not stated                   DistributedSampler never given      fresh outliers every step,
#                                                 set_epoch: every epoch sees the     drawn with replacement; the
#                                                 same 4,864 outliers (one CIFAR-10   fixed subset is an accident,
#                                                 class, 4 GPUs) in the same order,   not a choice, and may explain
#                                                 the ID images one fixed order, and  gaps to the official numbers
#                                                 self-OECL's ID and outlier loaders
#                                                 the same order
#   self-OECL batch  256 for both normal and OE   32 images on one GPU (run_self.sh   --batch-size counts images; the
#                    samples (App. I)             starts one process): 64 ID + 64     paper preset with --self-oe: 128
#                                                 outlier (image, rotation)           images, 256 ID + 256 outlier
#                                                 instances a step                    instances: the paper's count
#   outlier views    E over T_OE (Eq. 12)         two views per outlier, one forward  the same (BatchNorm statistics
#                                                 pass with the ID views              as the official batch)
#   self-OECL views  not stated (Eq. 13: CSI's    each view augmented (crop, flip,    the same: four augmented views
#                    loss, rotations as shifts)   jitter, grey) by the data loader,   of each image, each then rotated
#                                                 then rotated: the 0/90 instances    (CSI's order, rotation first and
#                                                 of a view share its crop and        each (image, rotation) augmented
#                                                 colour; the 180/270 outliers are    on its own, is not the public
#                                                 rotations of two more views of the  code's)
#                                                 same images (a second loader)
#   input scaling    not stated                   CIFAR-10: its statistics in the     (x - 0.5) / 0.5 in common.Encoder
#                                                 loader (mean 125.3, 123.0, 113.9;   (a pretrained net: its weights'
#                                                 std 63.0, 62.1, 66.7, / 255);       own): BatchNorm follows
#                                                 other sets: (x - 0.5) / 0.5 as the  the first convolution, so a scale
#                                                 network's first layer (CSI's)       and shift change only the zero-
#                                                                                     padded border; the CIFAR stds
#                                                                                     differ by 7% between channels
#   precision        not stated                   float32 throughout                  training in bf16 autocast on CUDA
#                                                                                     (--amp auto; speed: --amp off
#                                                                                     trains in float32); the loss and
#                                                                                     every score in float32
#   crop scale       0.08, another value for      0.08 (DIOR), 0.5 (Raabin-WBC)       --crop-scale 0.08
#                    Raabin-WBC, HAM10000 (App. J)
#   digits           not in the paper             not in the code                     common's digits augmentation: the
#                                                                                     paper's without the flip (a
#                                                                                     mirrored 2 is a 5-like shape)


# ----------------------------------------------------------------------------------------------
# Presets: --preset NAME; explicit flags win.

PAPER = dict(
    dataset="cifar10",              # paper: Sec. IV-B
    protocol="one-vs-rest",         # paper: Sec. IV-C, one class is ID, the other nine are OOD ...
    all_classes=True,               # paper: Sec. IV-C, ... for every class in turn
    oe="npy:data/300K_random_images.npy",  # ours: 80MTI's usual substitute (paper: Sec. IV-B, 80MTI, withdrawn)
    arch="resnet18", width=64,      # paper: Sec. IV-A, ResNet-18 (public code: its CIFAR variant)
    size=32,                        # paper: CIFAR-10's own size
    epochs=500,                     # paper: App. I
    oe_warmup=50,                   # paper: App. G, App. I, alpha = 0 for the first 50 epochs
    batch_size=256,                 # paper: App. I, 256 ID + 256 outlier images (public code: 64 x 4 GPUs)
    optimizer="sgd",                # public code: its LARS wrapper never rescales (paper: App. I, LARS)
    lr=0.1,                         # paper: App. I
    momentum=0.9,                   # public code: its yaml files (App. I's value is lost in our copy)
    weight_decay=5e-4,              # public code: its yaml files (App. I's value is lost in our copy)
    warmup_epochs=0, final_lr=0.0,  # paper: App. I, cosine decay without restart (public code: no lr warm-up)
    tau=0.5,                        # public code: NTXentOE's temperature (App. I's value is lost in our copy)
    alpha=1.0,                      # public code: 1 for CIFAR-10 and ImageNet-30, 0.1 for DIOR and Raabin-WBC
                                    # (App. I names these data sets; its values are lost in our copy)
    crop_scale=0.08,                # paper: App. J
    n_aug=32,                       # paper: App. I, ensemble score (15) with 32 augmentations
)

PAPER_SELF_OECL = dict(             # PAPER's values that differ for self-OECL (--preset paper --self-oe)
    oe=None,                        # paper: Eq. 13, the outliers are rotations
    epochs=1000,                    # paper: App. I, "except self-OECL with 1000 epochs"
    # ambiguity (App. I, "256 for both normal and OE samples"): a sample is an (image, rotation) instance, so 128
    # images give 256 ID and 256 outlier instances (the public code runs self-OECL with 32 images on one GPU)
    batch_size=128,                 # paper: App. I (public code: 32, one process in run_self.sh)
)

QUICK = dict(                       # a CPU path check on real data, not a quality signal
    dataset="cifar10", id_classes="0-5", subset=6000, width=16,  # ours: CIFAR-10 under --data-root
    size=32, batch_size=128,        # ours: CIFAR's size, a CPU batch
    crop_scale=0.08,                # paper: App. J
    oe="digits",                    # ours: far outliers that need no download (no CIFAR class leaks in)
    epochs=12, oe_warmup=2,         # ours: ~10 min on 2 CPU cores
    n_aug=8,                        # ours: the ensemble costs (1 + n_aug) forwards per test image
)

PRESETS = {"paper": PAPER, "quick": QUICK}


# ----------------------------------------------------------------------------------------------
# Command line: build_parser() and check_args(), every flag checked before any work.

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[harness.arg_parser()])
    g = parser.add_argument_group("oecl")
    g.add_argument("--oe", default=None, help=f"outlier set for OECL ({harness.DATASET_SPECS}); any size, "
                   "drawn with replacement, training split")
    g.add_argument("--oe-classes", default=None,
                   help="the classes of --oe that serve as outliers (e.g. 6-7; default: all). When --oe is the "
                        "in-distribution data set: default every class outside --id-classes, never an ID class, and "
                        "the exposed classes leave the evaluated OOD set (an error if no OOD set is left)")
    g.add_argument("--self-oe", action=argparse.BooleanOptionalAction, default=None,
                   help="self-OECL (Eq. 13): outliers are the training images rotated by --oe-rotations "
                        "(default: on when no --oe is given)")
    g.add_argument("--id-rotations", default="0,90", help="self-OECL: rotations (degrees) that are ID instances")
    g.add_argument("--oe-rotations", default="180,270", help="self-OECL: rotations (degrees) that are outliers")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the outlier norm term (Eq. 12); 0 = SimCLR")
    g.add_argument("--oe-warmup", type=int, default=2, help="epochs of plain SimCLR (alpha = 0) first (App. G)")
    g.add_argument("--tau", type=float, default=0.5, help="NT-Xent temperature")
    g.add_argument("--crop-scale", type=float, default=0.08,
                   help="smallest random-resized-crop area of the paper's augmentation (App. J: 0.08; the public "
                        "code: 0.5 for Raabin-WBC); digits get common's digits augmentation unless --augment paper")
    g.add_argument("--n-aug", type=int, default=32, help="augmentations in the ensemble score, besides the clean view")
    g.add_argument("--protocol", choices=["one-vs-rest", "leave-one-out"], default=None,
                   help="with --all-classes: each class alone is ID (one-vs-rest) or alone OOD (leave-one-out)")
    g.add_argument("--all-classes", action=argparse.BooleanOptionalAction, default=False,
                   help="run --protocol for every class; per-class and mean AUROC")
    # Defaults: digits at 16 x 16 (the digits are 8 x 8: nothing is lost), a small ResNet-18.
    parser.set_defaults(size=16, width=8, epochs=10, batch_size=64)
    return parser


CLASSES = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def check_args(args):
    """Every oecl flag, before any work; resolves OECL vs self-OECL (exactly one) and PAPER_SELF_OECL."""
    if args.self_oe and args.sources.get("oe") != "command line":
        args.oe = None                                   # a typed --self-oe replaces a preset's outlier set
    if args.self_oe is None:
        args.self_oe = args.oe is None
    if args.self_oe and args.preset == "paper":
        for k, v in PAPER_SELF_OECL.items():
            if args.sources[k] in ("default", "preset paper"):
                setattr(args, k, v)
                args.sources[k] = "preset paper (self-OECL)"
    harness.check(args.self_oe != (args.oe is not None), "--self-oe", args.self_oe,
                 "exactly one of --oe SPEC (OECL) and --self-oe (self-OECL)")
    if args.oe is not None:
        harness.check_spec(args.oe, "--oe")
    if args.oe_classes is not None:
        harness.check(args.oe is not None, "--oe-classes", args.oe_classes, "--oe SPEC with it")
        harness.check(CLASSES.fullmatch(args.oe_classes), "--oe-classes", args.oe_classes, "class ids, e.g. 6-7 or 0,2")
        harness.check(not args.oe.startswith("npy:"), "--oe-classes", args.oe_classes, "a labelled --oe (npy: has none)")
        if harness.count_classes(args.oe):
            harness.parse_classes(args.oe_classes, harness.count_classes(args.oe), "--oe-classes", args.oe)
    harness.check(not (args.all_classes and args.oe and harness.same_spec(args.oe, args.dataset)), "--oe", args.oe,
                 "an outlier set other than --dataset with --all-classes (each class is in-distribution in some run)")
    for flag, text in (("--id-rotations", args.id_rotations), ("--oe-rotations", args.oe_rotations)):
        harness.check(re.fullmatch(r"(0|90|180|270)(,(0|90|180|270))*", text), flag, text,
                     "rotations out of 0, 90, 180, 270, comma-separated")
    harness.check(not set(args.id_rotations.split(",")) & set(args.oe_rotations.split(",")), "--oe-rotations",
                 args.oe_rotations, f"rotations that are not ID rotations ({args.id_rotations})")
    harness.check(args.alpha >= 0 and np.isfinite(args.alpha), "--alpha", args.alpha, "a finite number >= 0")
    harness.check(args.oe_warmup >= 0, "--oe-warmup", args.oe_warmup, "an integer >= 0")
    harness.check(args.tau > 0, "--tau", args.tau, "a number > 0")
    harness.check(0 < args.crop_scale <= 1, "--crop-scale", args.crop_scale, "a number in (0, 1]")
    harness.check(args.n_aug >= 0, "--n-aug", args.n_aug, "an integer >= 0 (0: the clean view only)")
    harness.check_memory(args, "--n-aug", args.n_aug, (1 + args.n_aug) * (3 + args.width) * args.size ** 2 * 4,
                         f"the {1 + args.n_aug} views of one image through the first layer")
    harness.check(args.alpha == 0 or args.oe_warmup < args.epochs or args.sources.get("oe_warmup") != "command line",
                  "--oe-warmup", args.oe_warmup, f"fewer than --epochs {args.epochs}: the outlier term starts after "
                  f"the warm-up, so this run would be plain SimCLR (--oe-warmup 0 starts it at once)")
    harness.check(args.all_classes == (args.protocol is not None), "--protocol", args.protocol,
                 "--protocol and --all-classes together (one class: --id-classes 3, or --id-classes 0-2,4-9)")
    harness.check(not (args.all_classes and args.id_classes), "--id-classes", args.id_classes,
                 "none with --all-classes, which chooses the in-distribution classes itself")
    return args


# ----------------------------------------------------------------------------------------------
# Main: the command line, then one run or one run per class.

@harness.script_main("oecl", build_parser, PRESETS, check_args, load=False)
def main(args):
    return run_protocol(args) if args.all_classes else run(args)


if __name__ == "__main__":
    main()
