"""Speed of the hot paths: ratios measured in one run, and exact counts of what a GPU would wait for.

    python bench.py --quick              # every CPU row, fewer repeats: about 10 minutes on a 2-core CPU
    python bench.py                      # more repeats
    python bench.py --rows 1,9-10        # some rows only; --json PATH for the output (default bench.json)
    python bench.py --cifar10 PATH       # rows 7 and 8 on CIFAR-10 as an ImageFolder with train/ and test/

Timed rows compare two measurements taken in the same run, interleaved (A, B, A, B, ...) and summarised by the
median, so that a busy minute of the machine hits both alike; on a CPU the clock is the process's CPU time. Rows 9
and 10 are exact counts, the same on every run and every machine: they predict GPU behaviour without a GPU.
Threads: --threads (default 1) for torch and for scikit-learn's BLAS/OpenMP alike. On a CPU the ResNet-18 is the
CIFAR one at a narrow --width (the table says which). Every method's step is the one its script trains with
(imported, never copied).

Rows and targets:
 1 augmentation  common.SimCLRAugment on a batch vs torchvision's per-image PIL pipeline        >= 5x faster
 2 training      images/s of each method's full step in common.train (augmentation, forward, loss, backward,
                 optimizer) / images/s of a bare forward + backward + step on pre-made views      >= 0.85
 3 loss          each loss forward + backward at batch 512 (1024 views) / the backbone step      < 5%
 4 K-means       common.kmeans vs scikit-learn, 50,000 x 512, k = 10 and 100: faster, inertia <= 1.01 x; and the
                 seeding failure rate on 10 Gaussian blobs over 30 seeds: no worse than scikit-learn's
 5 kNN           common.knn_scores, ccl.score_cos vs NearestNeighbors(brute, cosine), 10,000 x 50,000 x 128:
                 faster, identical top-1, peak extra memory < 1 GiB
 6 ensembles     OECL's 1 + 32-view score and MCL's 8-view SEI / one plain forward pass          <= 1.1 x views
 7 data loading  second start of a run on --cifar10 (decoded cache)                              < 5 s
 8 GPU only      seconds per SimCLR epoch (CIFAR-10, ResNet-18 width 64, batch 512, bf16, channels_last), with
                 and without torch.compile, against the 0.33 s floor (see the README's Speed section)
 9 counts        host syncs and kernel launches per training step (DispatchCounter): 0 syncs in fp32 or
                 bf16; launches <= 1.3 x the bare backbone forward + backward + SGD step on the same views;
                 StrongAugment <= 2 x SimCLRAugment's launches per call
10 compile       graph breaks of torch.compile on each whole step (augmentation + model + loss): 0 for SimCLR,
                 CCL, OECL

The floor. A CIFAR ResNet-18 (width 64) costs 1.11 GFLOP forward and 3.33 GFLOP forward + backward per 32 x 32 view
(PyTorch's FLOP counter), so a SimCLR epoch on CIFAR-10 (2 views x 50,000 images) is 331 TFLOP: 0.33 s at an H100's
or H200's dense bf16 peak (989 TFLOP/s). Row 8 measures the epoch on a GPU as a multiple of that floor; it has not
been run on a GPU yet.

Measured with `OMP_NUM_THREADS=1 python bench.py --quick --rows R` on a 2-core AMD EPYC shared with other jobs
(row 9: an Intel Xeon), one thread, CIFAR ResNet-18 at width 16 (rows 1-6: ratios of interleaved medians; rows 9-10:
exact counts; rows 7 and 8 need --cifar10 PATH and CUDA and were not run):

 # measurement                                                       measured                       target                          met
 1 augmentation: SimCLRAugment vs per-image PIL                      4.07x                          >= 5x                           NO
 2 training step: SimCLR (common.simclr_step)                        0.924                          >= 0.85                         yes
 2 training step: CCL joint stage (ccl.CCLStep, LARS)                0.904                          >= 0.85                         yes
 2 training step: MCL (mcl.mcl_step, 4 rotations)                    0.951                          >= 0.85                         yes
 2 training step: OECL (oecl.oecl_step, 2 views of ID and outliers)  0.972                          >= 0.85                         yes
 2 training step: self-OECL (oecl.self_oecl_step, rotations)         1.042                          >= 0.85                         yes
 2 training step: SCAN stage (scan_ood.scan_step, StrongAugment)     0.777                          >= 0.85                         NO
 2 training step: self-labelling (scan_ood.selflabel_step)           1.560                          >= 0.85                         yes
 3 loss overhead: SimCLR NT-Xent                                     0.21%                          < 5%                            yes
 3 loss overhead: CCL cluster losses (Eq. 4, 6)                      0.37%                          < 5%                            yes
 3 loss overhead: MCL CCM + SPA (Eq. 4-10)                           0.55%                          < 5%                            yes
 3 loss overhead: OECL loss (Eq. 12)                                 0.07%                          < 5%                            yes
 3 loss overhead: SCAN loss                                          0.02%                          < 5%                            yes
 4 K-means k=10: common.kmeans vs sklearn                            0.70x, inertia 0.9996          > 1x, inertia <= 1.01           NO
 4 K-means k=100: common.kmeans vs sklearn                           1.16x, inertia 0.9878          > 1x, inertia <= 1.01           yes
 4 K-means seeding: failures over 30 seeds, ours vs sklearn          2/30 vs 8/30                   ours <= sklearn                 yes
 5 kNN: common.knn_scores vs sklearn brute cosine                    4.38x, peak 287 MiB            > 1x, same top-1, peak < 1 GiB  yes
 5 kNN: ccl.score_cos vs sklearn brute cosine                        4.57x, peak 311 MiB            > 1x, same top-1, peak < 1 GiB  yes
 6 ensemble: OECL ensemble score, clean + 32 augmentations           33.1x = 1.00 per view          <= 36.3x (1.1 per view)         yes
 6 ensemble: MCL SEI, 8 views (4 rotations x mirror), Mahalanobis    8.5x = 1.07 per view           <= 8.8x (1.1 per view)          yes
 9 per step: SimCLR (common.simclr_step)                             0 syncs, 328 launches (1.83x)  0 syncs, <= 1.3x bare           NO
 9 per step: CCL joint stage (ccl.CCLStep, LARS)                     0 syncs, 474 launches (2.65x)  0 syncs, <= 1.3x bare           NO
 9 per step: MCL (mcl.mcl_step, 4 rotations)                         0 syncs, 400 launches (2.23x)  0 syncs, <= 1.3x bare           NO
 9 per step: OECL (oecl.oecl_step, 2 views of ID and outliers)       0 syncs, 345 launches (1.93x)  0 syncs, <= 1.3x bare           NO
 9 per step: self-OECL (oecl.self_oecl_step, rotations)              0 syncs, 351 launches (1.96x)  0 syncs, <= 1.3x bare           NO
 9 per step: SCAN stage (scan_ood.scan_step, StrongAugment)          0 syncs, 660 launches (3.82x)  0 syncs, <= 1.3x bare           NO
 9 per step: self-labelling (scan_ood.selflabel_step)                0 syncs, 503 launches (2.91x)  0 syncs, <= 1.3x bare           NO
 9 per call: StrongAugment vs SimCLRAugment (blur on)                0 syncs, 224 vs 133 launches   0 syncs, <= 2x                  yes
10 compile: SimCLR (common.simclr_step)                              0 graph breaks                 0                               yes
10 compile: CCL joint stage (ccl.CCLStep, LARS)                      0 graph breaks                 0                               yes
10 compile: MCL (mcl.mcl_step, 4 rotations)                          0 graph breaks                 reported                        -
10 compile: OECL (oecl.oecl_step, 2 views of ID and outliers)        0 graph breaks                 0                               yes
10 compile: self-OECL (oecl.self_oecl_step, rotations)               0 graph breaks                 reported                        -
10 compile: SCAN stage (scan_ood.scan_step, StrongAugment)           0 graph breaks                 reported                        -
10 compile: self-labelling (scan_ood.selflabel_step)                 0 graph breaks                 reported                        -

Rows 1-6 come from OMP_NUM_THREADS=1 python bench.py --quick --rows R in runs on the loaded machine (rows 1 and
4 together, rows 2-3 and 6 together, row 5 alone), with CCL's LARS in the solo-learn scope and MCL drawing each
view in its own augmentation call; rows 9 and 10 count the steps as they are (--rows 9 and --rows 10; row 9 also
counts .tolist(), .numpy() and .cpu() as syncs: 0 in every step). Rows 7 (needs --cifar10 PATH) and 8 (needs
CUDA) were not run. Timed ratios from one quick sample move by ±15% with the machine's load. The misses:
- Row 1: 4.1x (10,356 vs 2,546 images/s); SimCLRAugment's own time was 52 ms per 512 images, and the PIL side of
  the same comparison has measured 7.3x slower than ours on a quieter machine.
- Row 2, SCAN: StrongAugment is 224 elementwise launches on 256 images per call on one CPU thread: 0.78.
- Row 4, k = 10: our k-means++ (twice scikit-learn's candidates) started from other centres and ran 31 Lloyd
  iterations against scikit-learn's 20; per iteration it is the faster (61 vs 66 ms). Its inertia is the lower.
- Row 9: no step makes a host sync, but every step launches 1.8-3.8x the bare backbone step in eager mode; see
  above. torch.compile traces every step without a graph break (row 10).
"""
import argparse
import collections
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
from torch.utils._python_dispatch import TorchDispatchMode

import ccl
import common
import harness
import mcl
import oecl
import scan_ood

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------
# Measuring: interleaved medians, peak memory, CUDA-aware clocks.

class DispatchCounter(TorchDispatchMode):
    """Counts what a GPU would wait for, on any device: every operator that launches a kernel (views and metadata
    ops aside) and every one that blocks the host on CUDA (.item(), bool(t), nonzero, boolean-mask indexing,
    bincount, unique, masked_select, a host-to-device copy of a new tensor). Device-to-host reads that dispatch no
    operator on a CPU tensor (.tolist(), .numpy(), .cpu()) are counted where they are called, as syncs named after
    the method. What it cannot see: a read of a tensor's storage from C code outside PyTorch (ctypes, a buffer
    protocol) and the launches inside a fused or compiled kernel (one operator counts one launch).

        with DispatchCounter() as c:
            loss = step(net, xb, idx, 0); loss.backward()
        c.launches, c.syncs, c.sync_ops (a Counter of the syncing operators)"""

    SYNCS = {"_local_scalar_dense", "nonzero", "bincount", "unique", "_unique", "_unique2", "unique_consecutive",
             "unique_dim", "masked_select", "item", "is_nonzero", "equal", "allclose"}
    FREE = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "squeeze", "unsqueeze",
            "select", "slice", "as_strided", "alias", "detach", "_reshape_alias", "unbind", "split", "chunk",
            "split_with_sizes", "narrow", "diagonal", "view_as_real", "view_as_complex", "empty",
            "empty_like", "empty_strided", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
            "_to_copy_meta", "set_", "_has_compatible_shallow_copy_type", "result_type", "size", "stride", "dim",
            "numel", "is_contiguous", "_conj", "conj", "_neg_view", "real", "imag", "expand_as", "view_as"}

    def __init__(self):
        super().__init__()
        self.launches, self.syncs, self.sync_ops = 0, 0, collections.Counter()

    PYTHON_READS = ("tolist", "numpy", "cpu")       # no operator is dispatched for these on a CPU tensor

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self.PYTHON_READS}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._counting(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _counting(self, name, method):
        def read(tensor, *args, **kwargs):
            self.syncs += 1
            self.sync_ops[name] += 1
            with torch.utils._python_dispatch._disable_current_modes():   # the read itself is not counted twice
                return method(tensor, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__.rstrip("_")
        tensor_repeats = name == "repeat_interleave" and len(args) > 1 and torch.is_tensor(args[1])
        index_by_mask = name in ("index", "index_put") and any(
            torch.is_tensor(i) and i.dtype == torch.bool for a in args if isinstance(a, (list, tuple)) for i in a)
        host_copy = name in ("_to_copy", "copy") and any(
            torch.is_tensor(a) and a.device.type == "cpu" for a in args) and str(kwargs.get("device", "")) not in ("", "cpu")
        from_python = name in ("lift_fresh", "lift_fresh_copy")     # torch.tensor(data): a host-to-device copy
        if name in self.SYNCS or index_by_mask or host_copy or from_python or tensor_repeats:
            self.syncs += 1
            self.sync_ops[name + ("[bool mask]" if index_by_mask else "")] += 1
        if name not in self.FREE:
            self.launches += 1
        return func(*args, **kwargs)


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
# The training steps every row measures: each method's own step, imported from its script.

def training_steps(width, device, n_images, size=32):
    """{name: namespace(model, views per image, optimizer, step for common.train, loss on stand-in features for
    row 3)}; the optimizer is the one of the method's paper preset."""
    images = lambda seed: random_images(n_images, size, seed).to(device)
    aug = common.SimCLRAugment(size)
    encoder = lambda: common.Encoder("resnet18", width=width).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(10, (n_images,), device=device, generator=gen)
    steps = {}

    steps["simclr"] = SimpleNamespace(
        model=encoder(), views=2, optimizer="sgd", label="SimCLR (common.simclr_step)",
        step=lambda net, xb, idx, epoch: common.simclr_step(net, xb, aug, 0.5),
        loss=lambda h, z, n: common.nt_xent(z, 0.5), loss_label="SimCLR NT-Xent")

    model, x = encoder(), images(1)
    cstep = ccl.CCLStep(aug=common.SimCLRAugment(size, blur=True), x=x, clusters=10, start=0, every=10)
    with quiet():
        cstep.update(model, 0)                                   # K-means once: the joint stage's state
    steps["ccl"] = SimpleNamespace(
        model=model, views=2, optimizer="lars", label="CCL joint stage (ccl.CCLStep, LARS)", step=cstep,
        loss=lambda h, z, n: ccl.cluster_center_loss(h, cstep.centers, cstep.assign[:n].repeat(2), cstep.phi)
        + ccl.cluster_instance_loss(h, cstep.assign[:n].repeat(2)), loss_label="CCL cluster losses (Eq. 4, 6)")

    def mcl_loss(h, z, n):          # z: 2n views = n / 4 images in 4 rotations, 2 views each
        y_aux = torch.arange(2 * n, device=z.device) // (n // mcl.N_ROT) % mcl.N_ROT
        return mcl.mcl_loss(z, labels[:n // mcl.N_ROT].repeat(2 * mcl.N_ROT), y_aux)[0]
    steps["mcl"] = SimpleNamespace(
        model=encoder(), views=2 * mcl.N_ROT, optimizer="sgd", label="MCL (mcl.mcl_step, 4 rotations)",
        step=lambda net, xb, idx, epoch: mcl.mcl_step(net, xb, labels[idx], aug),
        loss=mcl_loss, loss_label="MCL CCM + SPA (Eq. 4-10)")

    outliers = images(2)
    steps["oecl"] = SimpleNamespace(
        model=encoder(), views=4, optimizer="sgd", label="OECL (oecl.oecl_step, 2 views of ID and outliers)",
        step=lambda net, xb, idx, epoch: oecl.oecl_step(net, xb, outliers, aug),
        loss=lambda h, z, n: oecl.oecl_loss(z[:n], z[n:])[0], loss_label="OECL loss (Eq. 12)")
    no_flip = common.SimCLRAugment(size, flip=False)
    steps["self_oecl"] = SimpleNamespace(
        model=encoder(), views=8, optimizer="sgd", label="self-OECL (oecl.self_oecl_step, rotations)",
        step=lambda net, xb, idx, epoch: oecl.self_oecl_step(net, xb, no_flip))

    strong = scan_ood.StrongAugment()
    x, neighbors = images(3), torch.randint(n_images, (n_images, 21), device=device, generator=gen)
    steps["scan"] = SimpleNamespace(
        model=scan_ood.ClusterNet("resnet18", 10, 1, width=width).to(device), views=2, optimizer="adam",
        label="SCAN stage (scan_ood.scan_step, StrongAugment)",
        step=lambda net, xb, idx, epoch: scan_ood.scan_step(net, xb, idx, x, neighbors, strong, 5.0),
        loss=lambda h, logits, n: scan_ood.scan_loss(logits[:, :n], logits[:, n:])[0].sum(), loss_label="SCAN loss",
        logits_dim=10)
    steps["selflabel"] = SimpleNamespace(
        model=scan_ood.ClusterNet("resnet18", 10, 1, width=width).to(device), views=2, optimizer="adam",
        label="self-labelling (scan_ood.selflabel_step)",
        step=lambda net, xb, idx, epoch: scan_ood.selflabel_step(net, xb, strong, 0.99))
    return steps


def optimizer_for(model, name, lr=1e-3):
    return common.make_optimizer(model.parameters(), common.TrainConfig(epochs=1, batch_size=2, lr=lr, optimizer=name))


def bare_step(model, opt, views):
    """What a user's minimal loop costs: forward, a trivial loss, backward, optimizer step."""
    opt.zero_grad(set_to_none=True)
    model(views)[1].float().square().mean().backward()
    opt.step()


# ----------------------------------------------------------------------------------------------
# Rows 2 and 3: each method's training step and loss.

def bench_training(cfg, device):
    batch, steps = 256, cfg.train_steps
    rows = []
    for name, m in training_steps(cfg.width, device, batch * steps).items():
        x = random_images(batch * steps, seed=3).to(device)
        tcfg = common.TrainConfig(epochs=1, batch_size=batch, lr=1e-3, optimizer=m.optimizer)
        views = torch.rand(m.views * batch, 3, 32, 32, device=device)
        opt = optimizer_for(m.model, "sgd")

        def full():
            with quiet():
                common.train(m.model, m.step, x, tcfg)
        # The warm-up round runs the bare step only: it creates the convolution kernels for this model and view
        # count, which the full step then shares; augmentation and loss need no warm-up.
        t = race({"full": full, "bare": lambda: [bare_step(m.model, opt, views) for _ in range(steps)]},
                 cfg.repeat_train, device, warm=["bare"])
        ratio = t["bare"] / t["full"]       # (images/s full) / (images/s bare)
        rows.append(row(2, f"training step: {m.label}", f"{ratio:.3f}", ">= 0.85", ratio >= 0.85,
                        f"batch {batch} x {m.views} views, width {cfg.width}, {m.optimizer} (bare: sgd); img/s full "
                        f"{fmt_rate(batch * steps / t['full'])}, bare {fmt_rate(batch * steps / t['bare'])}",
                        ratio=ratio, full_s=t["full"], bare_s=t["bare"], method=name))
    return rows


def bench_losses(cfg, device):
    """Row 3: loss forward+backward on stand-in features of 1024 views (batch 512) / a bare backbone step of
    1024 views. The features are leaves that require grad, so backward stops at the loss: only its own cost."""
    n = 512
    ms = {k: m for k, m in training_steps(cfg.width, device, 2 * n).items() if hasattr(m, "loss")}
    model = common.Encoder("resnet18", width=cfg.width).to(device)
    opt = optimizer_for(model, "sgd")
    views = torch.rand(2 * n, 3, 32, 32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(2 * n, model.feat_dim, device=device, generator=g).requires_grad_()
    z = torch.randn(2 * n, 128, device=device, generator=g).requires_grad_()

    def loss_step(loss_fn, z):
        return lambda: torch.autograd.grad(loss_fn(h, z, n), [h, z], allow_unused=True)
    fns = {}
    for name, m in ms.items():
        zz = torch.randn(1, 2 * n, m.logits_dim, device=device, generator=g).requires_grad_() \
            if hasattr(m, "logits_dim") else z                 # SCAN: heads x views x clusters
        fns[name] = loss_step(m.loss, zz)
    # The backbone step is ~100x a loss: time it fewer times, the losses many times, interleaved.
    t_losses = race(fns, cfg.repeat_loss, device)
    t_backbone = race({"backbone": lambda: bare_step(model, opt, views)}, cfg.repeat_train, device)["backbone"]
    rows = []
    for name, t in t_losses.items():
        frac = t / t_backbone
        rows.append(row(3, f"loss overhead: {ms[name].loss_label}", f"{100 * frac:.2f}%", "< 5%", frac < 0.05,
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
        ok = speedup > 1 and inertia <= 1.01          # a lower inertia than scikit-learn is better, not a miss
        iters = f"iterations: ours {calls[0] // cfg.repeat_kmeans - 2}, sklearn {res['sklearn'].n_iter_}"
        rows.append(row(4, f"K-means k={k}: common.kmeans vs sklearn", f"{speedup:.2f}x, inertia {inertia:.4f}",
                        "> 1x, inertia <= 1.01", ok,
                        f"50,000 x 512, k-means++ n_init 1, max_iter {cfg.kmeans_iters}, tol 1e-4; "
                        f"{t['ours']:.2f} s vs {t['sklearn']:.2f} s; {iters}",
                        speedup=speedup, inertia_ratio=inertia, ours_s=t["ours"], sklearn_s=t["sklearn"]))
    return rows


def bench_kmeans_seeding(cfg, device):
    """Row 4b: how often a k-means++ seeding ends more than 1% above the best inertia found, on 10 Gaussian blobs
    (centres randn(10, d) * 3, points centre + randn * 2), k = 10, 30 seeds: ours vs scikit-learn's KMeans(n_init=1)."""
    from sklearn.cluster import KMeans
    n, d = (2000, 64) if cfg.quick else (20_000, 512)
    ours, ref = [], []
    for s in range(30):
        g = torch.Generator().manual_seed(s)
        x = (torch.randn(10, d, generator=g) * 3)[torch.randint(10, (n,), generator=g)] + torch.randn(n, d, generator=g) * 2
        c, a = common.kmeans(x.to(device), 10, seed=s)
        ours.append(float(((x.to(device) - c[a]) ** 2).sum()))
        ref.append(KMeans(10, n_init=1, random_state=s).fit(x.numpy()).inertia_)
    best = [min(a, b) for a, b in zip(ours, ref)]
    fails = lambda v: sum(a > 1.01 * b for a, b in zip(v, best))
    f_ours, f_ref = fails(ours), fails(ref)
    return [row(4, "K-means seeding: failures over 30 seeds, ours vs sklearn", f"{f_ours}/30 vs {f_ref}/30",
                "ours <= sklearn", f_ours <= f_ref, f"10 blobs, {n:,} x {d}, k = 10; a failure ends > 1% above the "
                f"best inertia of both", fails_ours=f_ours, fails_sklearn=f_ref)]


# ----------------------------------------------------------------------------------------------
# Row 5: kNN scores.

def bench_knn(cfg, device):
    from sklearn.neighbors import NearestNeighbors
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50_000, 128, generator=g), torch.randn(10_000, 128, generator=g)
    train_d, test_d = train.to(device), test.to(device)
    tn, qn = train.numpy(), test.numpy()
    contenders = {"knn_scores": lambda: common.knn_scores(train_d, test_d, 1, "cosine"),
                  "sklearn": lambda: NearestNeighbors(n_neighbors=1, algorithm="brute", metric="cosine").fit(tn)
                  .kneighbors(qn), "score_cos": lambda: ccl.score_cos(train_d, test_d)}
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
    return rows


# ----------------------------------------------------------------------------------------------
# Row 6: inference ensembles.

def bench_ensembles(cfg, device):
    # Every forward pass holds ~256 views, the plain pass as the ensembles' chunks: on a CPU the cost per view
    # grows with the batch, which is not the per-image overhead this row looks for.
    n = batch = 256
    x = random_images(n, seed=4).to(device)
    model = common.Encoder("resnet18", width=cfg.width).to(device).eval()
    aug = common.SimCLRAugment(32)
    g = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(10, (2000,), device=device, generator=g)
    fit = lambda dim: common.fit_gaussians(F.normalize(torch.randn(2000, dim, device=device, generator=g), dim=1),
                                           labels, 10)
    gaussians = {"ph": [fit(128) for _ in range(4)], "lf": [fit(model.feat_dim) for _ in range(4)]}

    def sei():                         # mcl.py's inference per test set: 8 views, both layers, Mahalanobis
        f = mcl.view_features(model, x, 8, device, batch_size=batch)
        return {layer: mcl.sei_aggregate(mcl.sei_distances(v, gaussians[layer]), "w-avg") for layer, v in f.items()}
    fns = {"plain": lambda: common.embed(model, x, batch),
           "oecl": lambda: oecl.ensemble_scores(model, x, aug, 32, batch_size=batch), "mcl": sei}
    views = {"oecl": 33, "mcl": 8}
    label = {"oecl": "OECL ensemble score, clean + 32 augmentations",
             "mcl": "MCL SEI, 8 views (4 rotations x mirror), Mahalanobis"}
    t = race(fns, cfg.repeat_ens, device)
    rows = []
    for name in views:
        ratio = t[name] / t["plain"]
        per_view = ratio / views[name]
        rows.append(row(6, f"ensemble: {label[name]}", f"{ratio:.1f}x = {per_view:.2f} per view",
                        f"<= {1.1 * views[name]:.1f}x (1.1 per view)", per_view <= 1.1,
                        f"{n} test images, ~{batch} views per forward, width {cfg.width}; plain forward "
                        f"{t['plain']:.2f} s, ensemble {t[name]:.2f} s", ratio=ratio, per_view=per_view,
                        views=views[name]))
    return rows


# ----------------------------------------------------------------------------------------------
# Row 7: data loading.

START = """import sys, time, argparse
t = time.process_time()
sys.path.insert(0, {here!r})
import common
args = harness.parse_args(argparse.ArgumentParser(parents=[harness.arg_parser()]), argv=sys.argv[1:])
t_load = time.process_time()
data = harness.load_data(args)
print(time.process_time() - t_load)
"""


def bench_loading(cfg, device):
    """A start = a fresh python that imports common and runs load_data with the quick preset's data flags. Judged
    on its CPU time (user + system, children included): on this shared machine the wall clock measures the other
    jobs; on an idle one the two agree up to disk reads, which the page cache serves on a second start."""
    folder = cfg.cifar10
    if folder is None:
        return [missing(7, "data loading, second start", "< 5 s", "skipped: no --cifar10 folder")]
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
                f"(decodes 60,000 JPEGs on {os.cpu_count()} threads); --dataset folder:{folder} "
                f"--id-classes 0-5 --subset 6000", first_cpu_s=first_cpu, first_wall_s=first_wall, second_cpu_s=cpu,
                second_wall_s=wall, load_data_s=load, import_torch_s=floor)]


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


# ----------------------------------------------------------------------------------------------
# Row 8: GPU epoch (CUDA only).

class TimedSimCLR:
    """common.simclr_step with a clock read (synchronised) before every epoch: train's update hook."""

    def __init__(self, aug):
        self.aug, self.stamps = aug, []

    def __call__(self, net, xb, idx, epoch):
        return common.simclr_step(net, xb, self.aug, 0.5)

    def update(self, model, epoch):
        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def bench_gpu(cfg, device):
    if device.type != "cuda":
        return [missing(8, "GPU SimCLR epoch", "measured", "skipped: no CUDA device")]
    if cfg.cifar10:
        x, source = harness.load_dataset(f"folder:{cfg.cifar10}", True, os.path.join(HERE, "data"))[0], "CIFAR-10"
    else:   # the time of an epoch does not depend on the pixels
        x, source = random_images(50_000), "random images (no --cifar10)"
    x = x.to(device)
    rows = []
    for compiled in (False, True):
        model = common.Encoder("resnet18", width=64).to(device)
        step = TimedSimCLR(common.SimCLRAugment(32))
        tcfg = common.TrainConfig(epochs=3, batch_size=512, lr=0.1, amp="bf16", compile=compiled)
        with quiet():
            common.train(model, step, x, tcfg)
        torch.cuda.synchronize()
        step.stamps.append(time.perf_counter())
        epoch_s = step.stamps[2] - step.stamps[1]                      # the second epoch: compiled and warm
        floor = 0.33 * len(x) / 50_000
        rows.append(row(8, f"GPU SimCLR epoch, {'with' if compiled else 'without'} torch.compile",
                        f"{epoch_s:.2f} s = {epoch_s / floor:.1f}x the floor", "measured", None,
                        f"{source}, {len(x)} images, ResNet-18 width 64, batch 512, bf16, channels_last; first epoch "
                        f"{step.stamps[1] - step.stamps[0]:.1f} s; floor {floor:.2f} s (3.33 GFLOP per view at 989 "
                        f"TFLOP/s)", epoch_s=epoch_s, floor_s=floor))
    return rows


# ----------------------------------------------------------------------------------------------
# Row 9: host syncs and kernel launches per step, counted exactly (DispatchCounter).

def count(fn):
    with DispatchCounter() as c:
        fn()
    return c


def counted_step(m, x, opt):
    """One whole training iteration of m: the step, backward, the optimizer (the loop's own bookkeeping aside)."""
    idx = torch.arange(len(x), device=x.device)

    def one():
        out = m.step(m.model, x, idx, 0)
        loss = out[0] if isinstance(out, tuple) else out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    one()                                        # the first step makes the optimizer's state: not a steady step
    return count(one)


def bench_counts(cfg, device):
    """Exact, so one run is enough. Tiny settings (16 images, width 4, 32 px): the counts do not depend on them."""
    n, rows = 16, []
    x = random_images(n, seed=5).to(device)
    syncs, launches = {}, {}
    for name, m in training_steps(4, device, n).items():
        c = counted_step(m, x, optimizer_for(m.model, m.optimizer))
        views = torch.rand(m.views * n, 3, 32, 32, device=device)
        opt = optimizer_for(m.model, "sgd")
        bare_step(m.model, opt, views)
        bare = count(lambda: bare_step(m.model, opt, views)).launches
        syncs[name], launches[name] = c.syncs, c.launches
        ok = c.syncs == 0 and c.launches <= 1.3 * bare
        detail = f"{m.optimizer}; bare backbone + SGD on {m.views * n} views: {bare} launches"
        if c.syncs:
            detail += f"; syncs: {dict(c.sync_ops)}"
        rows.append(row(9, f"per step: {m.label}", f"{c.syncs} syncs, {c.launches} launches ({c.launches / bare:.2f}x)",
                        "0 syncs, <= 1.3x bare", ok, detail, syncs=c.syncs, launches=c.launches, bare_launches=bare,
                        method=name))
    xf = common.to_float(x)
    simclr_aug = count(lambda: common.SimCLRAugment(32, blur=True)(xf))
    strong = count(lambda: scan_ood.StrongAugment()(xf))
    ok = strong.syncs == 0 and strong.launches <= 2 * simclr_aug.launches
    rows.append(row(9, "per call: StrongAugment vs SimCLRAugment (blur on)",
                    f"{strong.syncs} syncs, {strong.launches} vs {simclr_aug.launches} launches", "0 syncs, <= 2x", ok,
                    f"StrongAugment syncs: {dict(strong.sync_ops)}" if strong.syncs else "", syncs=strong.syncs,
                    launches=strong.launches, simclr_launches=simclr_aug.launches))
    return rows, {"syncs_per_step": syncs, "launches_per_step": launches}


# ----------------------------------------------------------------------------------------------
# Row 10: torch.compile of each whole step: graph breaks (torch._dynamo.explain traces without compiling).

def bench_compile(cfg, device):
    n, rows, breaks = 16, [], {}
    x = random_images(n, seed=6).to(device)
    idx = torch.arange(n, device=device)
    from torch import _dynamo as dynamo
    for name, m in training_steps(4, device, n).items():
        dynamo.reset()
        explained = dynamo.explain(lambda xb: m.step(m.model, xb, idx, 0))(x)
        breaks[name] = explained.graph_break_count
        target = 0 if name in ("simclr", "ccl", "oecl") else None
        reasons = sorted({str(b.reason).splitlines()[0][:90] for b in explained.break_reasons})
        rows.append(row(10, f"compile: {m.label}", f"{explained.graph_break_count} graph breaks",
                        "0" if target == 0 else "reported", None if target is None else explained.graph_break_count == 0,
                        "; ".join(reasons[:3]), graph_breaks=explained.graph_break_count, method=name))
    dynamo.reset()
    return rows, {"graph_breaks_per_step": breaks}


# ----------------------------------------------------------------------------------------------

ROWS = {1: bench_augmentation, 2: bench_training, 3: bench_losses, 4: bench_kmeans, 5: bench_knn, 6: bench_ensembles,
        7: bench_loading, 8: bench_gpu, 9: bench_counts, 10: bench_compile}


def parse_rows(text):
    """'1,4-6' -> [1, 4, 5, 6]; anything else ends with one line naming --rows."""
    rows = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not (lo.isdigit() and (hi.isdigit() if dash else True)):
            raise ValueError(f"--rows {text!r}: expected row numbers or ranges from 1 to {max(ROWS)}, e.g. 1,4-6")
        rows += range(int(lo), int(hi if dash else lo) + 1)
    if not rows or not set(rows) <= set(ROWS):
        raise ValueError(f"--rows {text!r}: expected row numbers or ranges from 1 to {max(ROWS)}, e.g. 1,4-6")
    return sorted(set(rows))


@harness.entry_point
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller K-means seeding row")
    parser.add_argument("--rows", default=f"1-{max(ROWS)}", help="rows to run, e.g. 1,4-6")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and scikit-learn alike")
    parser.add_argument("--width", type=int, default=None, help="CIFAR ResNet-18 width (default: 16 on CPU, 64 on CUDA)")
    parser.add_argument("--cifar10", default=None, help="CIFAR-10 as an ImageFolder with train/ and test/ (rows 7, 8)")
    parser.add_argument("--json", default="bench.json")
    cfg = parser.parse_args(argv)
    wanted = parse_rows(cfg.rows)
    harness.check(cfg.threads >= 1, "--threads", cfg.threads, "an integer >= 1")
    harness.check(cfg.cifar10 is None or os.path.isdir(os.path.join(cfg.cifar10, "train")), "--cifar10", cfg.cifar10,
                 "a folder with train/<class>/ and test/<class>/")
    device = harness.get_device(cfg.device)
    limit_threads(cfg.threads)
    cfg.width = cfg.width or (64 if device.type == "cuda" else 16)
    q = cfg.quick
    cfg.repeat, cfg.repeat_train, cfg.repeat_loss = (5, 1, 10) if q else (9, 3, 20)
    cfg.repeat_kmeans, cfg.repeat_knn, cfg.repeat_ens, cfg.repeat_start = (1, 0, 1, 1) if q else (3, 2, 3, 3)
    cfg.train_steps, cfg.kmeans_iters = (1, 100) if q else (2, 100)
    torch.manual_seed(0)
    t0, cpu0 = time.time(), cpu_seconds()
    rows, counts = [], {}
    for number in wanted:
        t_row, cpu_row = time.time(), cpu_seconds()
        try:
            out = ROWS[number](cfg, device)
            if number == 4:
                out += bench_kmeans_seeding(cfg, device)
            if isinstance(out, tuple):                  # rows 9 and 10 also return their counts by step
                out, extra = out
                counts.update(extra)
            rows += out
        except Exception as e:   # one broken row must not lose the others
            traceback.print_exc()
            rows.append(missing(number, f"row {number}", "", f"failed: {type(e).__name__}: {e}"))
        print(f"row {number} done in {time.time() - t_row:.0f} s wall, {cpu_seconds() - cpu_row:.0f} s CPU",
              flush=True)
    print_table(rows, cfg, device)
    # On a loaded machine the wall time says little; the CPU time (this process and its children) is what the run
    # costs: with --threads 1 it is the wall time on an idle machine.
    print(f"\ntotal {time.time() - t0:.0f} s wall, {cpu_seconds() - cpu0:.0f} s CPU")
    harness.save_results(cfg.json, {"machine": machine(device), "device": str(device), "threads": cfg.threads,
                                   "width": cfg.width, "quick": cfg.quick, "seconds": time.time() - t0,
                                   "cpu_seconds": cpu_seconds() - cpu0, "rows": rows, **counts})
    return rows


if __name__ == "__main__":
    main()
