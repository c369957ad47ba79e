"""Speed and memory of the hot paths, against what a user would otherwise write (issue 7).

    python bench.py --quick          # every row in under 5 minutes on a 2-core CPU (fewer repeats)
    python bench.py                  # more repeats
    python bench.py --rows 1,4,5     # some rows only; --json PATH for the output (default bench.json)

One run prints a table and writes bench.json. Every number that is judged is a RATIO of two measurements taken in
the same run, interleaved (A, B, A, B, ...) and summarised by the median, because this machine is shared and
absolute times drift by 2x from minute to minute. Threads: --threads (default 1) for torch AND for scikit-learn's
BLAS/OpenMP, so that both sides of a comparison get the same cores. On CPU the ResNet-18 is the CIFAR one at a
narrow --width (the table says which); the loss and augmentation fractions only get smaller at width 64.

Rows (targets from issue 7):
 1 augmentation   common.SimCLRAugment on a batch vs torchvision's per-image PIL pipeline      >= 5x faster
 2 training       images/s of each method's full step (common.train: augmentation, forward, loss, backward,
                  optimizer) / images/s of a bare forward+backward+step on pre-made tensors   >= 0.85
 3 loss overhead  each loss forward+backward at batch 512 (1024 views) / the backbone step     < 5%
 4 K-means        common.kmeans vs sklearn KMeans, 50,000 x 512, k = 10 and 100              faster, inertia +-1%
 5 kNN scores     common.knn_scores, CCL's score_cos vs sklearn NearestNeighbors(brute, cosine), 10,000 x
                  50,000 x 128                                      faster, identical top-1, peak extra < 1 GiB
 6 ensembles      OECL's 1 + 32 view score and MCL's 8-view SEI / one plain forward pass   <= 1.1 x views
 7 data loading   first / second start of a run on folder:../shared/data/cifar10           second < 5 s
 8 GPU only       seconds per SimCLR epoch (CIFAR-10, ResNet-18 width 64, batch 512, bf16, channels_last),
                  with and without torch.compile, and the share of the step spent in augmentation

Measured (python bench.py --quick at commit 69f5529's code, CPU AMD EPYC 2 cores shared with other jobs, 1 thread,
width 16; 289 s wall, 269 s CPU): 1 aug 4.65x (NO); 2 train 0.93 / 0.92 / 1.09 / 0.98 / 1.06 (SimCLR, CCL, MCL, OECL,
SCAN; one sample each, +-10%); 3 loss 0.19% / 0.34% / 0.66% / 0.20% / 0.01%; 4 K-means 0.41x (k=10), 0.38x (k=100),
inertia 1.0005 / 1.0045 (NO); 5 kNN 4.6x, score_cos 3.8x, identical top-1, peak 311 MiB (sklearn 1564 MiB); 6 OECL
1.15 per view (NO: the augmentation), MCL 0.99; 7 second start 3.55 s CPU (python + import torch 3.08 s of it),
first 31 s. Rows 1, 4 and 6-OECL miss; the common.py changes that fix them (faster colour jitter and crop grid:
row 1 9.7x; k-means++ without torch.cdist and a fast variance: 0.98x / 1.43x) went to the lead.
"""
import argparse
import contextlib
import ctypes
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import common

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR_FOLDER = "../shared/data/cifar10"


# ----------------------------------------------------------------------------------------------
# Measuring: interleaved medians, peak memory, CUDA-aware clocks.

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device):
    """The clock every comparison uses. CPU: the CPU time of this process (all its threads), which other jobs on
    a shared machine barely change, unlike the wall clock; with --threads 1 it is the wall time of an idle
    machine. CUDA: the wall clock, synchronised."""
    return time.perf_counter if device.type == "cuda" else time.process_time


def race(fns, repeat, device, warmup=1, warm=None):
    """Time each callable of fns {name: fn} `repeat` times, round-robin (A, B, A, B, ...) after `warmup` untimed
    rounds (of the names in `warm` only, if given), so that a slow minute of the shared machine hits every
    contender alike -> {name: median seconds}."""
    times, now = {name: [] for name in fns}, clock(device)
    for r in range(warmup + repeat):
        for name, fn in fns.items():
            if r < warmup and warm is not None and name not in warm:
                continue
            sync(device)
            t = now()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(now() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_extra_memory(fn, device):
    """(fn(), peak memory above the start in bytes). CPU: the kernel's resident-set high-water mark, reset before
    the call (/proc/self/clear_refs, Linux); it sees every allocator (torch, numpy, BLAS), which tracemalloc does
    not. Freed heap is returned to the OS first (malloc_trim) so that old free blocks cannot hide new ones.
    CUDA: torch.cuda.max_memory_allocated. None where neither is available."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                    # 5 = reset the peak RSS (VmHWM) to the current RSS
        base = _rss_kib("VmRSS")
    except OSError:
        return fn(), None
    out = fn()
    return out, (_rss_kib("VmHWM") - base) * 1024


@contextlib.contextmanager
def count_calls(module, name):
    """Count the calls of module.name while the block runs -> a one-element list holding the count."""
    fn, calls = getattr(module, name), [0]

    def counted(*a, **kw):
        calls[0] += 1
        return fn(*a, **kw)
    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, fn)


@contextlib.contextmanager
def quiet():
    """Swallow the epoch lines common.train prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def limit_threads(n):
    """torch and the BLAS/OpenMP pools of numpy and scikit-learn, all to n threads."""
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:
        pass


def cpu_seconds():
    """CPU time of this process and its finished children (the row-7 starts)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def fmt_rate(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def row(number, name, value, target, ok, detail="", **extra):
    """One line of the table: value is what is compared with the target (a ratio or seconds), as text."""
    return {"row": number, "name": name, "value": value, "target": target, "ok": ok, "detail": detail, **extra}


def missing(number, name, target, why):
    return row(number, name, "n/a", target, None, why)


def try_import(module, names):
    """A method file's public functions, or None with a reason (the file may not be written yet)."""
    try:
        mod = __import__(module)
    except Exception as e:   # not written yet, or broken: the row says so, the other rows still run
        return None, f"n/a ({module}.py not present)" if isinstance(e, ModuleNotFoundError) else \
            f"n/a ({module}.py fails to import: {type(e).__name__}: {e})"
    lacking = [n for n in names if not hasattr(mod, n)]
    if lacking:
        return None, f"n/a ({module}.py lacks {', '.join(lacking)})"
    return mod, ""


def random_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# ----------------------------------------------------------------------------------------------
# Row 1: batched augmentation vs torchvision's per-image PIL pipeline.

def bench_augmentation(cfg, device):
    import torchvision.transforms as T
    from PIL import Image
    n = 512
    x = random_images(n).to(device)
    ours = common.SimCLRAugment(32)
    pipeline = T.Compose([T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                          T.ToTensor()])
    arrays = x.cpu().permute(0, 2, 3, 1).numpy()
    # What a torchvision Dataset + DataLoader does per image (fromarray, transforms) and per batch (stack).
    pil = lambda: torch.stack([pipeline(Image.fromarray(a)) for a in arrays]).to(device)
    t = race({"ours": lambda: ours(x), "pil": pil}, cfg.repeat, device)
    ratio = t["pil"] / t["ours"]
    return [row(1, "augmentation: SimCLRAugment vs per-image PIL", f"{ratio:.2f}x", ">= 5x", ratio >= 5,
                f"{n} images 32x32, img/s ours {fmt_rate(n / t['ours'])}, PIL {fmt_rate(n / t['pil'])}",
                ratio=ratio, ours_s=t["ours"], baseline_s=t["pil"])]


# ----------------------------------------------------------------------------------------------
# Rows 2 and 3: each method's training step and loss. A method is (model, views per image, optimizer, a
# common.train loss_fn, a loss on stand-in features for row 3). Each mirrors the loss_fn of its method file's
# main(), built from that file's public functions.

def method_simclr(cfg, device):
    aug = common.SimCLRAugment(32)
    model = common.Encoder("resnet18", width=cfg.width).to(device)
    step = lambda net, xb, idx, ep: common.nt_xent(net(torch.cat([aug(xb), aug(xb)]))[1])
    loss = lambda h, z, n: common.nt_xent(z)
    return SimpleNamespace(model=model, views=2, optimizer="sgd", step=step, loss=loss, label="SimCLR (nt_xent)")


def method_ccl(cfg, device, n_images):
    ccl, why = try_import("ccl", ["concentration", "cluster_center_loss", "cluster_instance_loss", "ccl_loss"])
    if ccl is None:
        return why
    k = 10
    aug = common.SimCLRAugment(32, blur=True)                      # ccl.py: crop, colour, Gaussian blur
    model = common.Encoder("resnet18", width=cfg.width).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    centers = F.normalize(torch.randn(k, model.feat_dim, device=device, generator=g), dim=1)
    assign_all = torch.randint(k, (n_images,), device=device, generator=g)
    phi = torch.full((k,), 0.3, device=device)

    def cluster_terms(h, assign):
        return ccl.cluster_center_loss(h, centers, assign, phi), ccl.cluster_instance_loss(h, assign)

    def step(net, xb, idx, ep):       # ccl.py's loss_fn in the joint stage, clustering on the embedding layer
        h, z = net(torch.cat([aug(xb), aug(xb)]))
        return ccl.ccl_loss(common.nt_xent(z), *cluster_terms(h, assign_all[idx].repeat(2)), 0.5)

    def loss(h, z, n):                # row 3: the cluster losses alone (Eq. 4 and 6)
        a, b = cluster_terms(h, assign_all[:n].repeat(2))
        return a + b
    return SimpleNamespace(model=model, views=2, optimizer="sgd", step=step, loss=loss,
                           label="CCL (L_self + cluster losses)", loss_label="CCL cluster losses (Eq. 4, 6)")


def method_mcl(cfg, device, n_images):
    mcl, why = try_import("mcl", ["mcl_loss", "rotated_views"])
    if mcl is None:
        return why
    n_rot = getattr(mcl, "N_ROT", 4)
    aug = common.SimCLRAugment(32)
    model = common.Encoder("resnet18", width=cfg.width).to(device)
    labels = torch.randint(10, (n_images,), device=device, generator=torch.Generator(device=device).manual_seed(0))

    def step(net, xb, idx, ep):       # mcl.py's loss_fn: every image in its 4 rotations, 2 views each
        views, y_aux = mcl.rotated_views(xb, aug, n_rot)
        return mcl.mcl_loss(net(views)[1], labels[idx].repeat(2 * n_rot), y_aux)[0]

    def loss(h, z, n):                # z: 2 x n views; n / 4 images in 4 rotations, 10 pseudo-classes
        y_aux = torch.arange(n_rot, device=z.device).repeat_interleave(n // n_rot).repeat(2)
        y_main = labels[:n // n_rot].repeat(2 * n_rot)
        return mcl.mcl_loss(z, y_main, y_aux)[0]
    return SimpleNamespace(model=model, views=2 * n_rot, optimizer="sgd", step=step, loss=loss,
                           label=f"MCL (CCM + SPA, {n_rot} rotations)", loss_label="MCL CCM + SPA (Eq. 4-10)")


def method_oecl(cfg, device, n_images):
    oecl, why = try_import("oecl", ["oecl_loss", "make_loss_fn"])
    if oecl is None:
        return why
    aug = common.SimCLRAugment(32)
    model = common.Encoder("resnet18", width=cfg.width).to(device)
    outliers = random_images(n_images, seed=1).to(device)
    args = SimpleNamespace(tau=0.5, alpha=1.0, oe_warmup=0)
    step = oecl.make_loss_fn(args, aug, outliers)                   # OECL with an outlier set (paper preset)
    loss = lambda h, z, n: oecl.oecl_loss(z, z[:n].detach().clone().requires_grad_())[0]
    return SimpleNamespace(model=model, views=3, optimizer="sgd", step=step, loss=loss,
                           label="OECL (2 ID views + 1 outlier)", loss_label="OECL loss (Eq. 12)")


def method_scan(cfg, device, n_images):
    scan, why = try_import("scan_ood", ["scan_loss", "ClusterNet"])
    if scan is None:
        return why
    k = 10
    strong = common.StrongAugment(n_ops=4, cutout=16)
    model = scan.ClusterNet("resnet18", k, 1, width=cfg.width).to(device)
    pool = random_images(n_images, seed=2).to(device)
    neighbors = torch.randint(n_images, (n_images, 21), device=device)

    def step(net, xb, idx, ep):       # scan_ood.py's SCAN stage: anchor and a mined neighbour, strong aug, one pass
        pick = torch.randint(neighbors.shape[1], (len(idx),), device=device)
        logits = net(torch.cat([strong(xb), strong(pool[neighbors[idx, pick]])]))[1]
        anchor, neighbor = logits.transpose(0, 1).chunk(2, dim=1)
        return scan.scan_loss(anchor, neighbor)[0].sum()

    def loss(h, logits, n):
        return scan.scan_loss(logits[:, :n], logits[:, n:])[0].sum()
    return SimpleNamespace(model=model, views=2, optimizer="adam", step=step, loss=loss, logits_dim=k,
                           label="SCAN (strong aug, anchor + neighbour)", loss_label="SCAN loss")


def methods(cfg, device, n_images):
    """{name: method namespace or the reason it is missing}."""
    out = {"simclr": method_simclr(cfg, device)}
    for name, make in (("ccl", method_ccl), ("mcl", method_mcl), ("oecl", method_oecl), ("scan", method_scan)):
        try:
            out[name] = make(cfg, device, n_images)
        except Exception as e:   # a method file mid-edit must not take the other rows down
            out[name] = f"n/a (building the {name} step failed: {type(e).__name__}: {e})"
    return out


def bare_step(model, opt, views):
    """What a user's minimal loop costs: forward, a trivial loss, backward, optimizer step."""
    opt.zero_grad(set_to_none=True)
    model(views)[1].float().square().mean().backward()
    opt.step()


def bench_training(cfg, device):
    batch = 256
    steps = cfg.train_steps
    ms = methods(cfg, device, max(batch * steps, 1024))      # row 3 uses the first 512 too
    rows = []
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    for name, m in ms.items():
        label = getattr(m, "label", name)
        if isinstance(m, str):
            rows.append(missing(2, f"training step: {name}", ">= 0.85", m))
            continue
        try:
            x = random_images(batch * steps, seed=3).to(device)
            args = common.parse_args(argparse.ArgumentParser(parents=[common.arg_parser()]), argv=[
                "--epochs", "1", "--batch-size", str(batch), "--optimizer", m.optimizer, "--lr", "1e-3",
                "--save-every", "1000000", "--device", str(device)])
            views = torch.rand(m.views * batch, 3, 32, 32, device=device)
            opt = common.make_optimizer(m.model.parameters(), args)
            ckpt = os.path.join(tmp, f"{name}.pt")

            def full():
                with quiet():
                    common.train(m.model, m.step, x, args, ckpt)

            # The warm-up round runs the bare step only: it creates the convolution kernels for this model and
            # view count, which the full step then shares; augmentation and loss need no warm-up.
            t = race({"full": full, "bare": lambda: [bare_step(m.model, opt, views) for _ in range(steps)]},
                     cfg.repeat_train, device, warm=["bare"])
            ratio = t["bare"] / t["full"]       # (images/s full) / (images/s bare)
            rows.append(row(2, f"training step: {label}", f"{ratio:.3f}", ">= 0.85", ratio >= 0.85,
                            f"batch {batch} x {m.views} views, width {cfg.width}, {m.optimizer}; img/s full "
                            f"{fmt_rate(batch * steps / t['full'])}, bare {fmt_rate(batch * steps / t['bare'])}",
                            ratio=ratio, full_s=t["full"], bare_s=t["bare"], method=name))
        except Exception as e:
            rows.append(missing(2, f"training step: {name}", ">= 0.85", f"failed: {type(e).__name__}: {e}"))
            traceback.print_exc()
    return rows, ms


def bench_losses(cfg, device, ms):
    """Row 3: loss forward+backward on stand-in features of 1024 views (batch 512) / a bare backbone step of
    1024 views. The features are leaves that require grad, so backward stops at the loss: only its own cost."""
    n = 512
    rows = []
    model = common.Encoder("resnet18", width=cfg.width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    views = torch.rand(2 * n, 3, 32, 32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(2 * n, model.feat_dim, device=device, generator=g).requires_grad_()
    z = torch.randn(2 * n, 128, device=device, generator=g).requires_grad_()

    def loss_step(loss_fn, h, z):
        def go():
            loss = loss_fn(h, z, n)
            grads = torch.autograd.grad(loss, [t for t in (h, z) if t.requires_grad], allow_unused=True)
            return grads
        return go

    fns = {"backbone": lambda: bare_step(model, opt, views)}
    labels = {}
    for name, m in ms.items():
        if isinstance(m, str):
            rows.append(missing(3, f"loss overhead: {name}", "< 5%", m))
            continue
        zz = torch.randn(1, 2 * n, m.logits_dim, device=device, generator=g).requires_grad_() \
            if hasattr(m, "logits_dim") else z                 # SCAN: heads x views x clusters
        fns[name] = loss_step(m.loss, h, zz)
        labels[name] = getattr(m, "loss_label", m.label)
    # The backbone step is ~100x a loss: time it fewer times, the losses many times, interleaved.
    t_losses = race({k: v for k, v in fns.items() if k != "backbone"}, cfg.repeat_loss, device)
    t_backbone = race({"backbone": fns["backbone"]}, cfg.repeat_train, device)["backbone"]
    t_losses.update(race({k: v for k, v in fns.items() if k != "backbone"}, cfg.repeat_loss, device))
    for name, t in t_losses.items():
        frac = t / t_backbone
        rows.append(row(3, f"loss overhead: {labels[name]}", f"{100 * frac:.2f}%", "< 5%", frac < 0.05,
                        f"1024 views fwd+bwd {1e3 * t:.1f} ms vs backbone step (width {cfg.width}) "
                        f"{1e3 * t_backbone:.0f} ms", fraction=frac, loss_s=t, backbone_s=t_backbone, method=name))
    return rows


# ----------------------------------------------------------------------------------------------
# Row 4: K-means.

def kmeans_features(n=50_000, d=512, centres=100, seed=0):
    """A mixture of `centres` Gaussians with overlapping clusters: structure for K-means to find, as in features."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    return (c[torch.randint(centres, (n,), generator=g)] + 1.5 * torch.randn(n, d, generator=g)).float()


def bench_kmeans(cfg, device):
    from sklearn.cluster import KMeans
    x = kmeans_features()
    xd = x.to(device)
    xn = x.numpy()
    rows = []
    for k in (10, 100):
        res = {}

        def ours():
            res["ours"] = common.kmeans(xd, k, iters=cfg.kmeans_iters, n_init=1, seed=0)

        def sk():
            res["sklearn"] = KMeans(k, init="k-means++", n_init=1, max_iter=cfg.kmeans_iters, tol=1e-4,
                                    algorithm="lloyd", random_state=0).fit(xn)

        with count_calls(common, "_nearest") as calls:   # 1 in the init + 1 per iteration + 1 final assignment
            t = race({"ours": ours, "sklearn": sk}, cfg.repeat_kmeans, device, warmup=0)
        c, a = res["ours"]
        ours_inertia = float(sum((xd[i:i + 8192] - c[a[i:i + 8192]]).pow(2).sum() for i in range(0, len(xd), 8192)))
        speedup, inertia = t["sklearn"] / t["ours"], ours_inertia / res["sklearn"].inertia_
        ok = speedup > 1 and abs(inertia - 1) <= 0.01
        iters = f"iterations: ours {calls[0] // cfg.repeat_kmeans - 2}, sklearn {res['sklearn'].n_iter_}"
        rows.append(row(4, f"K-means k={k}: common.kmeans vs sklearn", f"{speedup:.2f}x, inertia {inertia:.4f}",
                        "> 1x, inertia 1 +- 0.01", ok,
                        f"50,000 x 512, k-means++ n_init 1, max_iter {cfg.kmeans_iters}, tol 1e-4; "
                        f"{t['ours']:.2f} s vs {t['sklearn']:.2f} s; {iters}",
                        speedup=speedup, inertia_ratio=inertia, ours_s=t["ours"], sklearn_s=t["sklearn"]))
    return rows


# ----------------------------------------------------------------------------------------------
# Row 5: kNN scores.

def bench_knn(cfg, device):
    from sklearn.neighbors import NearestNeighbors
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50_000, 128, generator=g), torch.randn(10_000, 128, generator=g)
    train_d, test_d = train.to(device), test.to(device)
    tn, qn = train.numpy(), test.numpy()
    ccl, why = try_import("ccl", ["score_cos"])
    contenders = {"knn_scores": lambda: common.knn_scores(train_d, test_d, 1, "cosine"),
                  "sklearn": lambda: NearestNeighbors(n_neighbors=1, algorithm="brute", metric="cosine").fit(tn)
                  .kneighbors(qn)}
    if ccl is not None:
        contenders["score_cos"] = lambda: ccl.score_cos(train_d, test_d)
    # Round 1 measures peak memory (each contender alone, before timing rounds leave buffers around) and time;
    # further interleaved rounds only time. sklearn is a CPU library: its memory is the process's on any device.
    times, peaks, now = {name: [] for name in contenders}, {}, clock(device)
    for r in range(1 + cfg.repeat_knn):
        for name, fn in contenders.items():
            sync(device)
            t0 = now()
            if r == 0:
                out, peaks[name] = peak_extra_memory(fn, torch.device("cpu") if name == "sklearn" else device)
                if name == "sklearn":
                    sk_idx = torch.from_numpy(out[1][:, 0])
            else:
                fn()
            sync(device)
            times[name].append(now() - t0)
    t = {name: statistics.median(v) for name, v in times.items()}
    # Identical top-1: common.knn is the function knn_scores and score_cos rank with.
    ours_idx = common.knn(test_d, train_d, 1, "cosine")[1][:, 0].cpu()
    differ = (ours_idx != sk_idx).nonzero()[:, 0]
    # A differing pick is a float tie if both neighbours are equally similar in float64.
    q64, r64 = F.normalize(test.double(), dim=1), F.normalize(train.double(), dim=1)
    gap = ((q64[differ] * r64[ours_idx[differ]]).sum(1) - (q64[differ] * r64[sk_idx[differ]]).sum(1)).abs()
    ties = int((gap < 1e-6).sum())
    mib = lambda b: "n/a" if b is None else f"{b / 2 ** 20:.0f} MiB"
    rows = []
    for name in [n for n in ("knn_scores", "score_cos") if n in contenders]:
        speedup = t["sklearn"] / t[name]
        peak = peaks[name]
        ok = speedup > 1 and len(differ) == ties and (peak is None or peak < 2 ** 30)
        label = "common.knn_scores" if name == "knn_scores" else "ccl.score_cos"
        rows.append(row(5, f"kNN: {label} vs sklearn brute cosine", f"{speedup:.2f}x, peak {mib(peak)}",
                        "> 1x, same top-1, peak < 1 GiB", ok,
                        f"10,000 x 50,000 x 128; {t[name]:.2f} s vs {t['sklearn']:.2f} s; top-1 differs for "
                        f"{len(differ)} of 10,000 ({ties} float64 ties); sklearn peak {mib(peaks['sklearn'])}",
                        speedup=speedup, peak_bytes=peak, sklearn_peak_bytes=peaks["sklearn"],
                        top1_differ=len(differ), top1_ties=ties))
    if ccl is None:
        rows.append(missing(5, "kNN: ccl.score_cos vs sklearn brute cosine", "> 1x, same top-1, peak < 1 GiB", why))
    return rows


# ----------------------------------------------------------------------------------------------
# Row 6: inference ensembles.

def bench_ensembles(cfg, device):
    # Every forward pass holds ~256 views, the plain pass as the ensembles' chunks: on a CPU the cost per view
    # grows with the batch (512 views cost 1.45x two batches of 256 at width 16: caches), which is not the
    # per-image overhead this row looks for.
    n = batch = 256
    x = random_images(n, seed=4).to(device)
    model = common.Encoder("resnet18", width=cfg.width).to(device).eval()
    fns = {"plain": lambda: common.embed(model, x, batch)}
    views, label, rows = {}, {}, []
    oecl, why = try_import("oecl", ["ensemble_scores"])
    if oecl is None:
        rows.append(missing(6, "ensemble: OECL 1 + 32 views", "<= 1.1 x views", why))
    else:
        aug = common.SimCLRAugment(32)
        fns["oecl"] = lambda: oecl.ensemble_scores(model, x, aug, 32, batch_size=batch)
        views["oecl"], label["oecl"] = 33, "OECL ensemble score, clean + 32 augmentations"
    mcl, why = try_import("mcl", ["view_features", "sei_scores"])
    if mcl is None:
        rows.append(missing(6, "ensemble: MCL 8-view SEI", "<= 1.1 x views", why))
    else:
        g = torch.Generator(device=device).manual_seed(0)
        feats = F.normalize(torch.randn(2000, 128, device=device, generator=g), dim=1)
        labels = torch.randint(10, (2000,), device=device, generator=g)
        gaussians = {"ph": [common.fit_gaussians(feats, labels, 10) for _ in range(4)]}
        gaussians["lf"] = [common.fit_gaussians(F.normalize(torch.randn(2000, model.feat_dim, device=device,
                                                                     generator=g), dim=1), labels, 10)] * 4

        def sei():                     # mcl.py's inference per test set: 8 views, both layers, Mahalanobis
            f = mcl.view_features(model, x, 8, device, batch_size=batch)
            return {layer: mcl.sei_scores(v, gaussians[layer]) for layer, v in f.items()}
        fns["mcl"] = sei
        views["mcl"], label["mcl"] = 8, "MCL SEI, 8 views (4 rotations x mirror), Mahalanobis"
    t = race(fns, cfg.repeat_ens, device)
    for name in views:
        ratio = t[name] / t["plain"]
        per_view = ratio / views[name]
        rows.append(row(6, f"ensemble: {label[name]}", f"{ratio:.1f}x = {per_view:.2f} per view",
                        f"<= {1.1 * views[name]:.1f}x (1.1 per view)", per_view <= 1.1,
                        f"{n} test images, ~{batch} views per forward, width {cfg.width}; plain forward {t['plain']:.2f} s, ensemble "
                        f"{t[name]:.2f} s", ratio=ratio, per_view=per_view, views=views[name]))
    return rows


# ----------------------------------------------------------------------------------------------
# Row 7: data loading.

START = """import sys, time, argparse
t = time.process_time()
sys.path.insert(0, {here!r})
import common
args = common.parse_args(argparse.ArgumentParser(parents=[common.arg_parser()]), argv=sys.argv[1:])
t_load = time.process_time()
data = common.load_data(args)
print(time.process_time() - t_load)
"""


def bench_loading(cfg, device):
    """A start = a fresh python that imports common and runs load_data with the quick preset's data flags. Judged
    on its CPU time (user + system, children included): on this shared machine the wall clock measures the other
    jobs; on an idle one the two agree up to disk reads, which the page cache serves on a second start."""
    folder = os.path.join(HERE, CIFAR_FOLDER)
    if not os.path.isdir(folder):
        return [missing(7, "data loading, second start", "< 5 s", f"skipped: {CIFAR_FOLDER} not found")]
    root = tempfile.mkdtemp(prefix="bench-data-")          # a fresh cache: the first start really decodes
    argv = ["--dataset", f"folder:{folder}", "--id-classes", "0-5", "--subset", "6000", "--data-root", root]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}

    def start(code, args=()):
        """-> (wall seconds, CPU seconds, stdout) of one fresh python process."""
        cpu0, t = cpu_seconds(), time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(out.stderr.strip().splitlines()[-1])
        return time.perf_counter() - t, cpu_seconds() - cpu0, out.stdout
    first_wall, first_cpu, _ = start(START.format(here=HERE), argv)
    runs = []
    for _ in range(cfg.repeat_start):                      # interleaved with the floor: python + import torch
        wall, cpu, out = start(START.format(here=HERE), argv)
        runs.append((wall, cpu, float(out.split()[-1]), start("import torch")[1]))
    wall, cpu, load, floor = (statistics.median(v) for v in zip(*runs))
    return [row(7, "data loading: second start (decoded cache)", f"{cpu:.2f} s", "< 5 s", cpu < 5,
                f"CPU seconds (wall on this loaded machine {wall:.1f} s); load_data {load:.2f} s of it, python + "
                f"import torch alone {floor:.2f} s; first start {first_cpu:.0f} s CPU, {first_wall:.0f} s wall "
                f"(decodes 60,000 JPEGs on {os.cpu_count()} threads); --dataset folder:{CIFAR_FOLDER} "
                f"--id-classes 0-5 --subset 6000", first_cpu_s=first_cpu, first_wall_s=first_wall, second_cpu_s=cpu,
                second_wall_s=wall, load_data_s=load, import_torch_s=floor)]


# ----------------------------------------------------------------------------------------------
# Row 8: GPU epoch (CUDA only).

def bench_gpu(cfg, device):
    if device.type != "cuda":
        return [missing(8, "GPU SimCLR epoch", "measured", "skipped: no CUDA device")]
    folder = os.path.join(HERE, CIFAR_FOLDER)
    if os.path.isdir(folder):
        x, source = common.load_dataset(f"folder:{folder}", True, os.path.join(HERE, "data"))[0], "CIFAR-10"
    else:   # the time of an epoch does not depend on the pixels
        x, source = random_images(50_000), "random images (CIFAR-10 folder not found)"
    x = x.to(device)
    aug = common.SimCLRAugment(32)
    rows = []
    for compiled in (False, True):
        model = common.Encoder("resnet18", width=64).to(device).to(memory_format=torch.channels_last)
        args = common.parse_args(argparse.ArgumentParser(parents=[common.arg_parser()]), argv=[
            "--epochs", "3", "--batch-size", "512", "--lr", "0.1", "--amp", "bf16", "--save-every", "1000000",
            "--device", "cuda"] + (["--compile"] if compiled else []))
        stamps = []

        def on_epoch_start(epoch, net):
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        loss_fn = lambda net, xb, idx, ep: common.nt_xent(net(torch.cat([aug(xb), aug(xb)]))[1])
        with quiet():
            common.train(model, loss_fn, x, args, os.path.join(tempfile.mkdtemp(), "c.pt"),
                         on_epoch_start=on_epoch_start)
        epoch_s = stamps[2] - stamps[1]                     # the second epoch: compiled and warm
        rows.append(row(8, f"GPU SimCLR epoch, {'with' if compiled else 'without'} torch.compile",
                        f"{epoch_s:.2f} s", "measured", None,
                        f"{source}, {len(x)} images, ResNet-18 width 64, batch 512, bf16, channels_last; "
                        f"first epoch {stamps[1] - stamps[0]:.1f} s", epoch_s=epoch_s))
    xb = x[:512]
    t_aug = race({"aug": lambda: (aug(xb), aug(xb))}, 20, device)["aug"]
    share = t_aug * (len(x) // 512) / rows[0]["epoch_s"]
    rows.append(row(8, "GPU: share of the (uncompiled) epoch spent in augmentation", f"{100 * share:.1f}%",
                    "measured", None, f"2 views of 512 images: {1e3 * t_aug:.2f} ms", share=share))
    return rows


# ----------------------------------------------------------------------------------------------

ROWS = {1: bench_augmentation, 4: bench_kmeans, 5: bench_knn, 6: bench_ensembles, 7: bench_loading, 8: bench_gpu}


def print_table(rows, cfg, device):
    w = max(len(r["name"]) for r in rows)
    v = max(len(r["value"]) for r in rows)
    t = max(len(r["target"]) for r in rows)
    mark = {True: "yes", False: "NO", None: "-"}
    print(f"\n{'#':>2} {'measurement':<{w}}  {'measured':<{v}}  {'target':<{t}}  met")
    for r in rows:
        print(f"{r['row']:>2} {r['name']:<{w}}  {r['value']:<{v}}  {r['target']:<{t}}  {mark[r['ok']]}")
    print(f"\n{machine(device)}; {cfg.threads} thread(s); CPU ResNet-18 width {cfg.width}; medians of interleaved "
          f"repeats ({'--quick' if cfg.quick else 'full'})")
    for r in rows:
        if r["detail"]:
            print(f"{r['row']:>2} {r['name']}: {r['detail']}")


def machine(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores (torch {torch.__version__})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats: under 5 min on 2 cores")
    parser.add_argument("--rows", default="1-8", help="rows to run, e.g. 1,4-6")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and scikit-learn alike")
    parser.add_argument("--width", type=int, default=None, help="CIFAR ResNet-18 width (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--json", default="bench.json")
    cfg = parser.parse_args(argv)
    device = common.get_device(cfg.device)
    limit_threads(cfg.threads)
    cfg.width = cfg.width or (64 if device.type == "cuda" else 16)
    q = cfg.quick
    cfg.repeat, cfg.repeat_train, cfg.repeat_loss = (5, 1, 10) if q else (9, 3, 20)
    cfg.repeat_kmeans, cfg.repeat_knn, cfg.repeat_ens, cfg.repeat_start = (1, 0, 1, 1) if q else (3, 2, 3, 3)
    cfg.train_steps, cfg.kmeans_iters = (1, 100) if q else (2, 100)
    wanted = common.parse_classes(cfg.rows)
    torch.manual_seed(0)
    t0, cpu0 = time.time(), cpu_seconds()
    rows, ms = [], None
    for number in wanted:
        t_row, cpu_row = time.time(), cpu_seconds()
        try:
            if number == 2 or (number == 3 and ms is None):
                r2, ms = bench_training(cfg, device) if 2 in wanted else ([], methods(cfg, device, 1024))
                rows += r2
            if number == 3:
                rows += bench_losses(cfg, device, ms)
            elif number in ROWS:
                rows += ROWS[number](cfg, device)
        except Exception as e:   # one broken row must not lose the others
            traceback.print_exc()
            rows.append(missing(number, f"row {number}", "", f"failed: {type(e).__name__}: {e}"))
        print(f"row {number} done in {time.time() - t_row:.0f} s wall, {cpu_seconds() - cpu_row:.0f} s CPU",
              flush=True)
    print_table(rows, cfg, device)
    # On a loaded machine the wall time says little; the CPU time (this process and its children) is what the run
    # costs: with --threads 1 it is the wall time on an idle machine.
    print(f"\ntotal {time.time() - t0:.0f} s wall, {cpu_seconds() - cpu0:.0f} s CPU")
    common.save_results(cfg.json, {"machine": machine(device), "device": str(device), "threads": cfg.threads,
                                   "width": cfg.width, "quick": cfg.quick, "seconds": time.time() - t0,
                                   "cpu_seconds": cpu_seconds() - cpu0,
                                   "rows": rows})
    return rows


if __name__ == "__main__":
    main()
