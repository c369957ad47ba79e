"""OECL: Outlier-Exposure Contrastive Learning, and self-OECL (Le-Gia & Ahn, "Understanding Normalization in
Contrastive Representation Learning and Out-of-Distribution Detection"; public code nguoikhongnao/real_OECL).

SimCLR only looks at the directions of its projections z, so their norms are free; the paper observes that
training gives in-distribution (ID) images a larger ||z|| than anything else, and OECL makes this explicit:
NT-Xent on the L2-normalised projections of ID views, plus alpha times the mean norm of the UN-normalised
projections of outlier images, pushing outliers to the origin (Eq. 12). The OOD score is the norm of the
projection of a test image, averaged over augmentations (Eq. 14-15). Outliers are an external set (OECL,
--oe SPEC) or the training images themselves rotated by 180 and 270 degrees (self-OECL, --self-oe, Eq. 13).

    python oecl.py                                      # self-OECL, digits 0-5 vs 6-9, 6 min on the shared CPU
    python oecl.py --oe digits --oe-classes 6-7         # OECL; outliers: training-split digits 6 and 7
    python oecl.py --preset quick                       # CIFAR-10 0-5 vs 6-9 (CPU path check), digits as outliers
    python oecl.py --preset paper --oe npy:PATH.npy     # CIFAR-10 one-vs-rest, every class, 500 epochs
    python oecl.py --preset paper --self-oe --epochs 1000   # self-OECL's row of Table I
    python oecl.py --protocol leave-one-out --all-classes   # every class held out in turn, per-class AUROC

Outlier sets. The paper's CIFAR outliers, 80 Million Tiny Images, were withdrawn by their authors (2020). The
usual substitutes: the 300K random images of Hendrycks et al.'s Outlier Exposure code (a debiased 80MTI subset,
`npy:300K_random_images.npy`), CIFAR-100 (`cifar100`), or any folder of images (`folder:PATH`).

Measured on the 2-core CPU shared with four other jobs (wall times ~5x a quiet machine). Digits, --id-classes 0-5,
OOD = the test images of digits 6-9, default flags (20 epochs, 16 px, width 8, crop scale 0.3), AUROC %, mean ± std
over --seed 0/1/2. OECL's outliers are the TRAINING-split images of digits 6 and 7: not ID, and different images
from the test's, but the same classes as half of the test OOD; so the table splits the OOD set into the exposed
classes 6-7 and the never-seen classes 8-9 (count-weighted means of per-class AUROC, an exact decomposition).
                                                     vs 6-9 (all)    vs 8-9 (unseen)  vs 6-7 (exposed)
  OECL, alpha 1         norm ||z||, Eq. 14           83.6 ± 3.3      70.2 ± 5.6       95.1 ± 1.4
  (4.0 min per run)     ensemble, Eq. 15             84.0 ± 4.2      71.4 ± 7.7       94.8 ± 1.2
                        E||z||^2, App. C             78.5 ± 5.9      65.9 ± 9.3       89.3 ± 2.9
  alpha 0 = its SimCLR  norm                         72.9 ± 9.8      75.5 ± 9.9       70.7 ± 9.7
  (3.4 min)             ensemble                     78.7 ± 5.4      80.7 ± 6.3       76.9 ± 4.8
                        E||z||^2                     72.7 ± 5.8      77.4 ± 7.4       68.6 ± 4.4
  self-OECL             norm                         77.2 ± 3.5      64.7 ± 1.8       88.1 ± 5.6
  (5.9 min)             ensemble                     85.2 ± 0.1      76.3 ± 1.0       92.8 ± 1.0
                        E||z||^2                     80.0 ± 3.2      65.3 ± 5.1       92.7 ± 1.6

    python oecl.py --oe digits --oe-classes 6-7 --seed S            # OECL
    python oecl.py --oe digits --oe-classes 6-7 --alpha 0 --seed S  # the same run without the outlier term
    python oecl.py --seed S                                         # self-OECL

Read: exposure to digits 6-7 lifts their AUROC from 77 to 95 but lowers the never-seen 8-9 from 81 to 71: on these
short runs the outlier term learns "not 6 or 7" more than "not 0-5". Self-OECL's ensemble is the best 6-9 number
and the steadiest; the ensemble matters most there (norm 77 -> 85). With App. J's CIFAR crop scale 0.08 (seed 0
only) OECL collapses: AUROC 51 / 57 / 57 (norm, E||z||^2, ensemble; in a model we inspected, most test images sat at
||z|| = the norm of the last layer's bias, every ReLU of the head off); alpha 0 gives 84 / 77 / 84, self-OECL 78 / 80 / 84.
One-vs-rest, self-OECL, every digit (`--protocol one-vs-rest --all-classes --epochs 5 --oe-warmup 1 --n-aug 8`,
~140 images per class): mean AUROC 65.8; digits 0 and 8, which look the same rotated by 180 degrees, score 27 and
33, the failure of rotation outliers on rotation-invariant classes that Sec. V-A describes.
CIFAR-10 (`--preset quick --epochs 2 --oe-warmup 1 --n-aug 2`: the preset's 12 epochs took 8.5 min each here, so
1 SimCLR epoch + 1 OECL epoch, 22 min): AUROC 46.0 / 46.3 / 46.6 against classes 6-9, below chance; a path check
only (training norms at the end: ID 2.68, digit outliers 0.37).
"""
import argparse
import copy
import os
import time

import numpy as np
import torch

import common

# ----------------------------------------------------------------------------------------------
# Presets (--preset paper | quick); explicit flags override them.

PAPER = dict(                       # the CIFAR-10 one-vs-rest row of Table I (OECL)
    dataset="cifar10",              # Sec. IV-B
    protocol="one-vs-rest",         # Sec. IV-C: one class is ID, the other nine are OOD ...
    all_classes=True,               # ... for every class in turn ("we use all available classes")
    oe="npy:data/300K_random_images.npy",  # Sec. IV-B uses 80MTI (withdrawn); our choice: its usual substitute
    arch="resnet18", width=64,      # Sec. IV-A: ResNet-18 (CIFAR variant, public code)
    size=32,                        # CIFAR-10's own size
    epochs=500,                     # App. I (self-OECL: 1000)
    oe_warmup=50,                   # App. G, App. I: alpha = 0 for the first 50 epochs
    batch_size=256,                 # App. I: 256 ID + 256 outlier images
    optimizer="sgd",                # public code: its LARS wrapper never rescales (App. I says LARS)
    lr=0.1, momentum=0.9,           # App. I
    weight_decay=5e-4,              # public code (the value is lost in App. I)
    warmup_epochs=0, final_lr=0.0,  # App. I: cosine decay without restart; public code: no lr warm-up
    tau=0.5,                        # App. I
    alpha=1.0,                      # App. I: 1 for CIFAR-10 and ImageNet-30
    crop_scale=0.08,                # App. J (CIFAR-10)
    n_aug=32,                       # App. I: ensemble score (15) with 32 augmentations
)

QUICK = dict(                       # the README's CPU row: a path check on real data, not a quality signal
    dataset="folder:../shared/data/cifar10", id_classes="0-5", subset=6000, width=16,  # our choice (README)
    size=32, batch_size=128,        # our choice: CIFAR's size, the README's batch
    crop_scale=0.08,                # App. J (CIFAR-10)
    oe="digits",                    # our choice: far outliers that exist everywhere (no leak of CIFAR classes)
    epochs=12, oe_warmup=2,         # our choice: ~10 min on 2 CPU cores
    n_aug=8,                        # our choice: the ensemble costs (1 + n_aug) forwards per test image
)

PRESETS = {"paper": PAPER, "quick": QUICK}

# The flags that change what a checkpoint is, beyond common's: resuming under other values is refused.
IDENTITY_KEYS = common.IDENTITY_KEYS + ("oe", "oe_classes", "self_oe", "alpha", "oe_warmup", "tau", "crop_scale")


def arg_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], parents=[common.arg_parser()])
    g = parser.add_argument_group("OECL")
    g.add_argument("--oe", default=None, help=f"outlier set for OECL ({common.DATASET_SPECS}); any size, "
                   "sampled with replacement, training split")
    g.add_argument("--oe-classes", default=None, help="keep only these classes of --oe (e.g. 6-7)")
    g.add_argument("--self-oe", action=argparse.BooleanOptionalAction, default=None,
                   help="self-OECL (Eq. 13): outliers are the training images rotated by 180/270 degrees "
                        "(default: on when no --oe is given)")
    g.add_argument("--alpha", type=float, default=1.0, help="weight of the outlier norm term (Eq. 12)")
    g.add_argument("--oe-warmup", type=int, default=2, help="epochs of plain SimCLR (alpha = 0) first (App. G)")
    g.add_argument("--tau", type=float, default=0.5, help="NT-Xent temperature")
    g.add_argument("--crop-scale", type=float, default=0.3, help="smallest random-resized-crop area (App. J: 0.08; "
                   "0.3 for its non-standard sets)")
    g.add_argument("--n-aug", type=int, default=32, help="augmentations in the ensemble score, besides the clean view")
    g.add_argument("--protocol", choices=["one-vs-rest", "leave-one-out"], default=None,
                   help="with --all-classes: each class alone is ID (one-vs-rest) or alone OOD (leave-one-out)")
    g.add_argument("--all-classes", action=argparse.BooleanOptionalAction, default=False,
                   help="run --protocol for every class; per-class and mean AUROC")
    # Defaults: a few minutes on a CPU with digits, which are 8 x 8 images: 16 px loses nothing and costs 1/4 of 32.
    # Crop scale 0.3 (App. J's value for its non-standard sets): at 0.08 a crop of a 16-px digit is a 4-px patch, ID
    # and outlier crops look alike and OECL collapses to trivial features as Sec. V-A warns (measured: AUROC 57).
    parser.set_defaults(size=16, width=8, epochs=20, batch_size=64)
    return parser


# ----------------------------------------------------------------------------------------------
# Loss (Eq. 12-13)

def oecl_loss(z_id, z_oe, tau=0.5, alpha=1.0):
    """Eq. 12: NT-Xent over the L2-normalised ID projections z_id = cat([view1, view2]) (2N x d) plus
    alpha * mean ||z_oe||_2 over the UN-normalised outlier projections z_oe (M x d). Outliers never enter the
    contrastive denominator. Returns (loss, {"norm_in": mean ||z_id||, "norm_out": mean ||z_oe||})."""
    norm_in, norm_out = z_id.float().norm(dim=1).mean(), z_oe.float().norm(dim=1).mean()
    loss = common.nt_xent(z_id, tau) + alpha * norm_out
    return loss, {"norm_in": norm_in.detach(), "norm_out": norm_out.detach()}


def alpha_at(epoch, args):
    """App. G: plain SimCLR (alpha = 0) for the first --oe-warmup epochs, then --alpha."""
    return 0.0 if epoch < args.oe_warmup else args.alpha


def random_hflip(x):
    """Flip each image horizontally with probability 1/2."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def self_oe_split(xb):
    """Eq. 13 as in the public code: rotations by 0 and 90 degrees are ID instances (2B), by 180 and 270 degrees
    outliers (2B). The random flip comes before the rotation (as in CSI): flipping a 90-degree image afterwards
    would make it a 270-degree rotation of the flipped image, i.e. an outlier.
    Eq. 13's L_CL ("CSI"): NT-Xent with each (image, rotation) an instance; no rotation-prediction head (our reading)."""
    xb = random_hflip(xb)
    x_id = torch.cat([xb, common.rotate90(xb, 1)])
    x_oe = torch.cat([common.rotate90(xb, 2), common.rotate90(xb, 3)])
    return x_id, x_oe


def make_loss_fn(args, augment, oe_x=None):
    """common.train's loss_fn. With oe_x (uint8 outlier images, any count): OECL, one outlier per ID image drawn
    with replacement (App. I: equal batch sizes); without: self-OECL (--batch-size counts images: 2B ID instances,
    2B outliers; our choice). ID views and outliers share one forward pass (and so the BatchNorm statistics, as the
    public code). Eq. 12's expectation over T_OE: one augmented view per outlier and step (our choice).
    During the warm-up outliers still go through the network (alpha multiplies their term, as in the public
    code): they shape the BatchNorm statistics and their norm is logged from the first epoch (Fig. 1's curve)."""
    def loss_fn(net, xb, idx, epoch):
        if oe_x is None:
            x_id, x_oe = self_oe_split(xb)
        else:
            x_id, x_oe = xb, oe_x[torch.randint(len(oe_x), (len(xb),), device=oe_x.device)]
        z = net(augment(torch.cat([x_id, x_id, x_oe])))[1]       # rows: view 1 | view 2 | outliers
        return oecl_loss(z[:2 * len(x_id)], z[2 * len(x_id):], args.tau, alpha_at(epoch, args))
    return loss_fn


# ----------------------------------------------------------------------------------------------
# Scores (Eq. 14-15, App. C); higher = more in-distribution.

def norm_score(z):
    """Eq. 14: the L2 norm of the (un-normalised) projection."""
    return z.float().norm(dim=1)


@torch.no_grad()
def ensemble_scores(model, x, augment, n_aug, batch_size=512, seed=0):
    """The three scores of App. C over the clean view and n_aug random training augmentations of each image:
    'norm' ||z(x)|| (Eq. 14), 'ensemble' ||mean_t z(t(x))|| (Eq. 15; the public code counts the clean view among
    the t) and 'mean_sq_norm' mean_t ||z(t(x))||^2 (App. C). Chunks of batch_size // (1 + n_aug) images; all the
    views of a chunk go through the network together. The seeded generator gives every set the same draws."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    chunk = max(1, batch_size // (1 + n_aug))
    out = {"norm": [], "ensemble": [], "mean_sq_norm": []}
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        views = [common.to_float(xb)] + ([augment(xb.repeat(n_aug, 1, 1, 1), generator=gen)] if n_aug else [])
        z = model(torch.cat(views))[1].float().view(1 + n_aug, len(xb), -1)    # row t * len(xb) + i: view t of i
        out["norm"].append(norm_score(z[0]))
        out["ensemble"].append(norm_score(z.mean(0)))
        out["mean_sq_norm"].append(z.pow(2).sum(2).mean(0))
    model.train(was_training)
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------
# One run: train, score, report.

def resolve_outliers(args):
    """OECL (--oe SPEC) or self-OECL (--self-oe; the default without --oe): exactly one -> args, resolved."""
    if args.self_oe and args.sources.get("oe") != "command line":
        args.oe = None                                   # a typed --self-oe replaces a preset's outlier set
    if args.self_oe is None:
        args.self_oe = args.oe is None
    if args.self_oe == (args.oe is not None):
        common.fail("give exactly one of --oe SPEC (OECL) and --self-oe (self-OECL)")
    if args.oe_classes and not args.oe:
        common.fail("--oe-classes needs --oe")
    return args


def load_outliers(args, data, device):
    x, y, _ = common.load_dataset(args.oe, True, args.data_root, True, args.size)
    if args.oe_classes:
        if y.min() < 0:
            common.fail(f"--oe {args.oe} has no labels, so --oe-classes cannot select from it")
        ids = common.parse_classes(args.oe_classes)
        if args.oe == args.dataset and set(ids) & set(data.id_classes):
            common.fail(f"--oe-classes {args.oe_classes} overlap the in-distribution classes {data.id_classes}")
        x, y = common.select_classes(x, y, ids)
    if len(x) == 0:
        common.fail(f"the outlier set --oe {args.oe} {args.oe_classes or ''} holds no images")
    return x.to(device)


def run(args):
    """Train and evaluate one configuration -> results dict (also written to <out>/results.json)."""
    t0 = time.time()
    resolve_outliers(args)
    device = common.setup(args, "oecl")
    data = common.load_data(args)
    x = data.train_x.to(device)
    oe_x = None if args.self_oe else load_outliers(args, data, device)
    print(f"train {len(x)} ID images, outliers: "
          f"{'rotations by 180/270 degrees' if args.self_oe else f'{len(oe_x)} images of {args.oe}'}", flush=True)

    model = common.Encoder(args.arch, bn_in_head=True, width=args.width).to(device)   # App. I: BN in the head
    train_aug = common.SimCLRAugment(args.size, scale=(args.crop_scale, 1.0), flip=not args.self_oe)
    common.train(model, make_loss_fn(args, train_aug, oe_x), x, args, os.path.join(args.out, "checkpoint.pt"),
                 keys=IDENTITY_KEYS)

    test_aug = common.SimCLRAugment(args.size, scale=(args.crop_scale, 1.0))  # Eq. 15: training augmentations, with flip
    with common.autocast(args, device):
        score = lambda t: ensemble_scores(model, t.to(device), test_aug, args.n_aug, seed=args.seed)
        s_id, s_ood = score(data.test_x), {name: score(t) for name, t in data.ood.items()}
    metrics = {k: {name: common.ood_metrics(s_id[k], s[k]) for name, s in s_ood.items()} for k in s_id}
    method = "self-OECL" if args.self_oe else \
        f"OECL (outliers: {args.oe}{' classes ' + args.oe_classes if args.oe_classes else ''})"
    for k in ("norm", "mean_sq_norm", "ensemble"):
        common.print_results(metrics[k], f"{method}, score {k}" + (f" over the clean view + {args.n_aug} augmentations"
                                                                   if k != "norm" else " (clean view)"))
    per_class = {}
    for name, labels in data.ood_y.items():                    # the held-out classes: AUROC of each class
        for c in labels.unique().tolist():
            keep = (labels == c).to(device)
            per_class[c] = {k: common.ood_metrics(s_id[k], s_ood[name][k][keep])["auroc"] for k in s_id}
        print("ensemble AUROC per held-out class: " + ", ".join(f"{c}: {v['ensemble']:.2f}" for c, v in per_class.items()))
    results = {"method": method, "config": vars(args), "metrics": metrics["ensemble"], "scores": metrics,
               "per_class_auroc": per_class, "seconds": time.time() - t0, "device": str(device)}
    common.save_results(os.path.join(args.out, "results.json"), results)
    return results


def main(argv=None):
    args = common.parse_args(arg_parser(), PRESETS, argv)
    if args.all_classes != bool(args.protocol) and (args.all_classes or args.sources["protocol"] == "command line"):
        common.fail("--protocol and --all-classes go together; for one class use --id-classes "
                    "(one-vs-rest: --id-classes 3; leave-one-out: --id-classes 0-2,4-9)")
    if not args.all_classes:
        return run(args)
    if args.id_classes:
        common.fail("--all-classes chooses the in-distribution classes itself; drop --id-classes")
    _, y, classes = common.load_dataset(args.dataset, True, args.data_root, True, args.size)
    if y.min() < 0:
        common.fail(f"{args.dataset} has no labels: --protocol needs classes")
    n = len(classes) or int(y.max()) + 1
    root = args.out or os.path.join("runs", f"oecl-{args.protocol}-{args.dataset.replace(':', '_').replace('/', '_')}")
    per_class = {}
    for c in range(n):
        a = copy.deepcopy(args)
        a.id_classes = str(c) if args.protocol == "one-vs-rest" else ",".join(str(k) for k in range(n) if k != c)
        a.out = os.path.join(root, f"class-{c}")
        metrics = run(a)["metrics"]      # the held-out set is named by its classes, which change with c
        per_class[c] = {("held-out classes" if k.startswith("classes ") else k): v for k, v in metrics.items()}
    sets = list(per_class[0])
    print(f"\n{args.protocol}, AUROC of the ensemble score per {'ID' if args.protocol == 'one-vs-rest' else 'OOD'} class")
    for c, m in per_class.items():
        print(f"  {c:>3} {(classes[c] if classes else ''):<12} " + " ".join(f"{m[s]['auroc']:7.2f}" for s in sets))
    mean = {s: float(np.mean([m[s]["auroc"] for m in per_class.values()])) for s in sets}
    print("  mean             " + " ".join(f"{v:7.2f}" for v in mean.values()) + f"   ({', '.join(sets)})")
    results = {"method": "oecl", "protocol": args.protocol, "config": vars(args), "per_class": per_class,
               "mean_auroc": mean}
    common.save_results(os.path.join(root, "results.json"), results)
    return results


if __name__ == "__main__":
    main()
