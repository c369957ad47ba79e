"""Tests of scan_ood.py: each loss against a literal per-sample loop (and the SCAN loss's gradient where <p, q> <
1e-12 against SCAN's BCE), SCAN's model selection, neighbour mining against brute force, self-labelling's mask and
weights, weight averaging, scoring, the strong augmentation against PIL (SCAN's ops), its shift and Cutout-area
distributions and its kernel count, 0 host syncs in every training step, presets, bad flags and the stage flags checked
only when their stage runs, short digits runs whose scores the scorer contract (build_model, score_state, score)
reproduces, and the module docstring's "Use it in your code" example."""
import copy
import io
import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import bench
import common
import harness
import scan_ood
from conftest import assert_scores_follow_the_image


def grads(fn, *inputs):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out.detach(), torch.autograd.grad(out, inputs)


# ---------------------------------------------------------------------------------------------- SCAN loss

def scan_loss_literal(anchor, neighbor, w):
    B, K = anchor.shape
    consistency = 0
    for i in range(B):
        p, q = torch.softmax(anchor[i], 0), torch.softmax(neighbor[i], 0)
        consistency = consistency - torch.log(sum(p[k] * q[k] for k in range(K))) / B
    mean_p = sum(torch.softmax(anchor[i], 0) for i in range(B)) / B
    entropy = -sum(mean_p[k] * torch.log(mean_p[k]) for k in range(K))
    return consistency - w * entropy


def test_scan_loss_matches_literal_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    a, n = torch.randn(7, 5, generator=g) * 2, torch.randn(7, 5, generator=g) * 2
    ours, g_ours = grads(lambda a, n: scan_ood.scan_loss(a, n, 5.0)[0], a, n)
    ref, g_ref = grads(lambda a, n: scan_loss_literal(a, n, 5.0), a, n)
    assert torch.allclose(ours, ref, atol=1e-5)
    for x, y in zip(g_ours, g_ref):
        assert torch.allclose(x, y, atol=1e-5)
    total, consistency, entropy = scan_ood.scan_loss(a, n, 5.0)
    assert torch.allclose(total, consistency - 5.0 * entropy) and entropy > 0


def test_scan_loss_entropy_term_rewards_spread_clusters():
    """Same perfect consistency, but all images in one cluster vs spread over all: spread must cost less."""
    K = 4
    onehot = lambda c: torch.nn.functional.one_hot(c, K).float() * 20
    collapsed, spread = onehot(torch.zeros(8, dtype=torch.long)), onehot(torch.arange(8) % K)
    loss = lambda x: scan_ood.scan_loss(x, x, 2.0)[0]
    assert loss(spread) < loss(collapsed) - 2.0 * np.log(K) + 0.01
    assert abs(scan_ood.scan_loss(spread, spread, 1.0)[2].item() - np.log(K)) < 1e-4


def test_scan_loss_heads_are_independent():
    g = torch.Generator().manual_seed(1)
    a, n = torch.randn(3, 6, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    total = scan_ood.scan_loss(a, n, 5.0)[0]
    assert total.shape == (3,)
    for h in range(3):
        assert torch.allclose(total[h], scan_ood.scan_loss(a[h], n[h], 5.0)[0])


def scan_bce_literal(anchor, neighbor, w):
    """SCAN's code: BCE(<p, q>, 1) with torch's clamps, minus w x the entropy of the clamped mean prediction."""
    p, q = torch.softmax(anchor, 1), torch.softmax(neighbor, 1)
    sim = torch.bmm(p[:, None, :], q[:, :, None])[:, 0, 0]
    mean_p = p.mean(0).clamp_min(1e-8)
    return F.binary_cross_entropy(sim, torch.ones_like(sim)) + w * (mean_p * mean_p.log()).sum()


@pytest.mark.parametrize("gap", [30.4, 40.4])     # <p, q> ~ 1.9e-13 and ~ 8.5e-18: below BCE's 1e-12 clamp
def test_scan_loss_gradient_stops_below_1e12_as_scans_bce(gap):
    """Confidently disagreeing pairs: the gradient equals that of SCAN's BCE (which stops pulling them), not the
    unclamped -log <p, q>'s; above the clamp both agree."""
    anchor = torch.tensor([[gap / 2, -gap / 2, 0.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    neighbor = torch.tensor([[-gap / 2, gap / 2, 0.0], [0.5, 0.0, 0.2]], dtype=torch.float64)
    sim = (torch.softmax(anchor, 1) * torch.softmax(neighbor, 1)).sum(1)
    assert sim[0] < 1e-12 < sim[1]
    ours, g_ours = grads(lambda a, n: scan_ood.scan_loss(a.double(), n.double(), 2.0)[0], anchor, neighbor)
    ref, g_ref = grads(lambda a, n: scan_bce_literal(a, n, 2.0), anchor, neighbor)
    for x, y in zip(g_ours, g_ref):
        torch.testing.assert_close(x.double(), y, atol=1e-6, rtol=1e-5)
    unclamped = grads(lambda a, n: scan_loss_literal(a, n, 2.0), anchor, neighbor)[1]
    assert (g_ours[0][0] - unclamped[0][0]).abs().max() > 0.1          # the unclamped loss still pulls
    torch.testing.assert_close(g_ours[0][1].double(), unclamped[0][1], atol=1e-6, rtol=1e-5)


def test_selection_loss_matches_scans_evaluation_literal():
    """SCAN's scan_evaluate: BCE over every (image, neighbour) pair of the similarity matrix, minus the entropy of
    the mean prediction (weight 1), per head."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(15, 2, 4, generator=g) * 3
    neighbors = torch.cat([torch.arange(15)[:, None], torch.randint(15, (15, 4), generator=g)], 1)
    ours = scan_ood.selection_loss(logits, neighbors)
    for h in range(2):
        probs = torch.softmax(logits[:, h], 1)
        sim = probs @ probs.T
        pairs = [sim[i, j] for i in range(15) for j in neighbors[i].tolist()]
        consistency = -sum(max(math.log(v), -100) for v in pairs) / len(pairs)
        mean_p = probs.mean(0).clamp_min(1e-8)
        entropy = -float((mean_p * mean_p.log()).sum())
        assert abs(ours[h].item() - (consistency - entropy)) < 1e-4


def tiny_cluster_net(heads=2, clusters=3, seed=0):
    torch.manual_seed(seed)
    return scan_ood.ClusterNet("resnet18", clusters, heads, width=4)


def test_scan_step_keeps_the_epoch_and_head_of_lowest_held_out_loss():
    g = torch.Generator().manual_seed(0)
    held_x = torch.randint(256, (12, 3, 8, 8), dtype=torch.uint8, generator=g)
    held_nb = scan_ood.mine_neighbors(held_x.flatten(1).float(), 3)
    step = scan_ood.SCANStep(None, None, None, 5.0, held_x, held_nb)
    nets = [tiny_cluster_net(seed=s) for s in range(3)]
    losses = torch.stack([scan_ood.selection_loss(common.embed(n, held_x)[1], held_nb) for n in nets])  # epoch x head
    for epoch, net in enumerate(nets, 1):
        step.update(net, epoch)
    step.update(nets[0], 0)                                     # before the first epoch: nothing to select
    best = int(losses.argmin())
    assert (step.kept["epoch"], step.kept["head"]) == (best // 2 + 1, best % 2)
    assert step.kept["loss"] == pytest.approx(float(losses.min()))
    restored = scan_ood.SCANStep(None, None, None, 5.0, held_x, held_nb)
    restored.load_state_dict(step.state_dict())
    one = restored.best(tiny_cluster_net(seed=9))
    expected = nets[best // 2].head.weight[(best % 2) * 3:(best % 2) * 3 + 3]
    assert one.heads == 1 and torch.equal(one.head.weight, expected)
    torch.testing.assert_close(common.embed(one, held_x)[1][:, 0],
                               common.embed(nets[best // 2], held_x)[1][:, best % 2])


# ---------------------------------------------------------------------------------------------- pretext loss

def scan_pretext_loss_literal(first, second, tau):
    """SCAN's pretext SimCLRLoss, one anchor at a time: the rows of the first view are the anchors, each contrasted
    with the other 2B - 1 rows of both views, its positive the same image's second view; the mean over B anchors."""
    rows = torch.cat([first, second])
    b, loss = len(first), 0
    for i in range(b):
        logits = torch.stack([first[i] @ rows[j] / tau for j in range(2 * b) if j != i])
        loss = loss - (first[i] @ second[i] / tau - torch.logsumexp(logits, 0)) / b
    return loss


def test_pretext_loss_is_scans_averaged_over_both_view_orders():
    # the deviations row "pretext loss anchors": ours equals the mean of SCAN's loss over both orders of the views;
    # one order alone has the same expectation but its own gradient
    z = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    views = lambda z: F.normalize(z, dim=1).chunk(2)           # SCAN's head L2-normalises its output
    ours, g_ours = grads(lambda z: common.nt_xent(z, 0.1), z)
    both, g_both = grads(lambda z: (scan_pretext_loss_literal(*views(z), 0.1)
                                    + scan_pretext_loss_literal(*views(z)[::-1], 0.1)) / 2, z)
    one, g_one = grads(lambda z: scan_pretext_loss_literal(*views(z), 0.1), z)
    torch.testing.assert_close(ours, both)
    torch.testing.assert_close(g_ours[0], g_both[0])
    assert (g_one[0] - g_ours[0]).norm() > 0.1 * g_ours[0].norm()


# ---------------------------------------------------------------------------------------------- neighbours

def test_mine_neighbors_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 8, generator=g)
    nb = scan_ood.mine_neighbors(feats, 5)
    f = feats / feats.norm(dim=1, keepdim=True)
    sims = f @ f.T
    sims.fill_diagonal_(-float("inf"))
    assert nb.shape == (60, 6)
    assert torch.equal(nb[:, 0], torch.arange(60))
    for i in range(60):
        assert nb[i, 1:].tolist() == sorted(range(60), key=lambda j: -sims[i, j].item())[:5]


def test_mine_neighbors_keeps_self_first_with_duplicates_and_checks_k():
    feats = torch.randn(10, 4).repeat(3, 1)                                 # every row has two exact copies
    nb = scan_ood.mine_neighbors(feats, 4)
    assert torch.equal(nb[:, 0], torch.arange(30))
    assert all(i not in nb[i, 1:].tolist() for i in range(30))
    assert all(len(set(r)) == 5 for r in nb.tolist())
    with pytest.raises(ValueError, match="num-neighbors"):
        scan_ood.mine_neighbors(feats, 30)


# ---------------------------------------------------------------------------------------------- self-labelling

def test_confidence_mask_and_weighted_cross_entropy_match_literal():
    g = torch.Generator().manual_seed(0)
    weak = torch.randn(12, 3, generator=g)
    weak[[0, 2, 3, 5, 8]] *= 30                                             # some confident rows
    strong = torch.randn(12, 3, generator=g)
    mask, target = scan_ood.confidence_mask(weak, 0.99)
    for i in range(12):
        p = torch.softmax(weak[i], 0)
        assert mask[i].item() == (p.max().item() > 0.99) and target[i].item() == p.argmax().item()
    assert 0 < mask.sum() < 12

    def literal(s):
        idx = [i for i in range(12) if mask[i]]
        counts = {c: sum(1 for i in idx if target[i] == c) for c in range(3)}
        num = sum(-torch.log_softmax(s[i], 0)[target[i]] / counts[int(target[i])] for i in idx)
        return num / sum(1 / counts[int(target[i])] for i in idx)

    ours, g_ours = grads(lambda s: scan_ood.self_label_loss(weak, s, 0.99)[0], strong)
    ref, g_ref = grads(literal, strong)
    assert torch.allclose(ours, ref, atol=1e-5) and torch.allclose(g_ours[0], g_ref[0], atol=1e-5)
    nothing = scan_ood.weighted_cross_entropy(strong, target, torch.zeros(12, dtype=torch.bool))
    assert nothing.item() == 0


def test_average_weights_includes_batchnorm_buffers():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)) for _ in range(2)]
    for i, net in enumerate(nets):
        for _ in range(i + 1):
            net(torch.randn(8, 3, 6, 6) + i)                                 # different running statistics
    sds = [n.state_dict() for n in nets]
    avg = scan_ood.average_weights(sds)
    assert set(avg) == set(sds[0])
    for k in ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.allclose(avg[k], (sds[0][k] + sds[1][k]) / 2)
    assert not torch.allclose(sds[0]["1.running_mean"], sds[1]["1.running_mean"])
    assert avg["1.num_batches_tracked"].dtype == torch.long and avg["1.num_batches_tracked"].item() == 2  # 1.5 -> 2
    w = scan_ood.average_weights(sds, [3, 1])
    assert torch.allclose(w["1.running_var"], 0.75 * sds[0]["1.running_var"] + 0.25 * sds[1]["1.running_var"])
    nets[0].load_state_dict(avg)                                             # loads strictly


# ---------------------------------------------------------------------------------------------- scoring

def test_scorers_against_literal():
    g = torch.Generator().manual_seed(0)
    train_h, test_h = torch.randn(40, 5, generator=g), torch.randn(9, 5, generator=g)
    train_logits, test_logits = torch.randn(40, 3, generator=g), torch.randn(9, 3, generator=g)
    cos = lambda a, b: (a @ b) / (a.norm() * b.norm())
    labels = torch.randint(3, (40,), generator=g)                # pseudo-labels, not the logits' argmax
    scorer = lambda kind, k=1: scan_ood.score_features(kind, scan_ood.score_reference(kind, train_h, labels), test_h,
                                                      test_logits, k)
    knn, knn3 = scorer("knn"), scorer("knn", 3)
    for i in range(9):
        s = sorted((cos(test_h[i], t).item() for t in train_h), reverse=True)
        assert abs(knn[i].item() - s[0]) < 1e-5 and abs(knn3[i].item() - s[2]) < 1e-5
    msp = scorer("msp")
    assert torch.allclose(msp, torch.softmax(test_logits, 1).max(1).values)
    maha = scorer("mahalanobis")
    y = labels.numpy()
    h = train_h.double().numpy()
    gauss = []
    for c in sorted(set(y)):
        hc = h[y == c]
        cov = np.cov(hc.T)
        gauss.append((hc.mean(0), np.linalg.inv(cov + 1e-6 * np.trace(cov) / 5 * np.eye(5))))
    for i in range(9):
        t = test_h[i].double().numpy()
        d = min((t - m) @ prec @ (t - m) for m, prec in gauss)
        assert abs(maha[i].item() + d) < 1e-3 * max(1, d)


# ---------------------------------------------------------------------------------------------- strong augmentation

# SCAN's augment list: PIL calls and magnitude ranges (the reference our batched version must reproduce)
SCAN_RANGES = {"identity": (0, 1), "autocontrast": (0, 1), "equalize": (0, 1), "rotate": (-30, 30),
               "solarize": (0, 256), "color": (.05, .95), "contrast": (.05, .95), "brightness": (.05, .95),
               "sharpness": (.05, .95), "shear_x": (-.1, .1), "translate_x": (-.1, .1), "translate_y": (-.1, .1),
               "posterize": (4, 8), "shear_y": (-.1, .1)}


def pil_op(img, name, v):
    W, H = img.size
    affine = {"shear_x": (1, v, 0, 0, 1, 0), "shear_y": (1, 0, 0, v, 1, 0), "translate_x": (1, 0, v * W, 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, v * H)}
    if name in affine:
        return img.transform(img.size, Image.AFFINE, affine[name])
    if name in ("color", "contrast", "brightness", "sharpness"):
        return getattr(ImageEnhance, name.capitalize())(img).enhance(v)
    return {"identity": lambda: img, "autocontrast": lambda: ImageOps.autocontrast(img),
            "equalize": lambda: ImageOps.equalize(img), "rotate": lambda: img.rotate(v),
            "solarize": lambda: ImageOps.solarize(img, v), "posterize": lambda: ImageOps.posterize(img, int(v))}[name]()


def smooth_images(n, size=16, seed=0):
    """Images with structure (upsampled 4 x 4 noise, levels 30..220): histograms and edges to work on."""
    low = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(low, size=size, mode="bilinear", align_corners=False) * 190 + 30).to(torch.uint8)


def scan_reference(x, aug, seed):
    """SCAN's Augment(n_ops) on each image with PIL, from the same draws as aug (forward's layout: op choices,
    magnitudes, flip, Cutout) -> uint8 B x H x W x 3."""
    B, R = len(x), aug.n_ops
    u = torch.rand(B, 2 * R + 4, generator=torch.Generator().manual_seed(seed))
    out = []
    for i in range(B):
        img = Image.fromarray(x[i].permute(1, 2, 0).numpy())
        if u[i, 2 * R] < 0.5:
            img = ImageOps.mirror(img)
        for r in range(R):
            name = aug.ops[min(int(u[i, r] * len(aug.ops)), len(aug.ops) - 1)]
            lo, hi = SCAN_RANGES[name]
            img = pil_op(img, name, lo + (hi - lo) * float(u[i, R + r]))
        out.append(np.asarray(img))
    return np.stack(out).astype(int)


@pytest.mark.parametrize("name", scan_ood.StrongAugment.OPS)
def test_strong_augment_matches_pil_op_by_op(name):
    """Each of SCAN's 14 ops alone against PIL on the same draws: geometric ops and the histogram ops exact but for
    a few pixels on nearest-pixel ties, the blends within one level (PIL truncates in fixed point)."""
    x = smooth_images(32)
    aug = scan_ood.StrongAugment(n_ops=1, cutout=0, ops=(name,))
    ours = (aug(x, generator=torch.Generator().manual_seed(1)) * 255).round().permute(0, 2, 3, 1).numpy()
    diff = np.abs(scan_reference(x, aug, 1) - ours)
    assert (diff > 1).mean() < 0.001 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def test_strong_augment_four_ops_match_pil():
    x = smooth_images(32, seed=1)
    aug = scan_ood.StrongAugment(n_ops=4, cutout=0)
    ours = (aug(x, generator=torch.Generator().manual_seed(2)) * 255).round().permute(0, 2, 3, 1).numpy()
    diff = np.abs(scan_reference(x, aug, 2) - ours)
    assert (diff > 1).mean() < 0.002, (diff > 1).mean()


@pytest.mark.parametrize("name,row", [("translate_x", 16), ("translate_y", 16), ("shear_x", 32)])
def test_strong_augment_shift_distribution_is_scans(name, row):
    """A single bright pixel on a 33 x 33 image (the centre column, so a flip leaves it): its displacement after
    translate (+-10% of 33 px) or a shear of the bottom row (+-0.1 x 32.5 px) has SCAN's distribution: PIL maps
    each output pixel centre to floor(centre + v), v uniform in +-3.3 (+-3.25), so the shift is k in -3..3 with
    probability |[k - 0.5, k + 0.5) & [-span, span)| / (2 span)."""
    n, span = 3000, 3.3 if name.startswith("translate") else 3.25
    x = torch.zeros(n, 3, 33, 33, dtype=torch.uint8)
    x[:, :, row, 16] = 255
    out = scan_ood.StrongAugment(n_ops=1, cutout=0, ops=(name,))(x, generator=torch.Generator().manual_seed(0))
    where = out[:, 0].flatten(1).argmax(1)
    moved = (where // 33 - row) if name == "translate_y" else (where % 33 - 16)
    assert (out[:, 0].flatten(1).amax(1) == 1).all()
    for k in range(-4, 5):
        p = max(0.0, min(k + 0.5, span) - max(k - 0.5, -span)) / (2 * span)
        freq = (moved == k).float().mean().item()
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9, (k, freq, p)


def test_strong_augment_cutout_area_distribution_is_scans():
    """SCAN's Cutout on 32 x 32 with length 16: L uniform in 1..16, rows [y - L // 2, y + L // 2) clipped, y and x
    uniform pixels. The exact distribution by enumeration against 20,000 draws: mean area ~70 px, 1/16 empty."""
    areas = []
    for L in range(1, 17):
        for y in range(32):
            for x in range(32):
                side = lambda c: min(c + L // 2, 32) - max(c - L // 2, 0)
                areas.append(side(y) * side(x))
    areas = np.array(areas, dtype=float)
    n = 20000
    white = torch.full((n, 1, 32, 32), 255, dtype=torch.uint8)             # Cutout alone works on any channels
    out = scan_ood.StrongAugment(n_ops=0, cutout=16)(white, generator=torch.Generator().manual_seed(0))
    ours = (out[:, 0] == 0.5).flatten(1).sum(1).double().numpy()
    assert abs(ours.mean() - areas.mean()) < 4 * areas.std() / math.sqrt(n), (ours.mean(), areas.mean())
    empty = (areas == 0).mean()
    assert abs((ours == 0).mean() - empty) < 4 * math.sqrt(empty * (1 - empty) / n) and empty == 1 / 16
    assert ours.max() == 256 and set(np.unique(np.sqrt(ours[ours == ours.max()]))) == {16.0}
    assert (out[out != 0.5] == 1).all()                                 # nothing but the box changes


def test_strong_augment_batched_per_sample_and_deterministic():
    x = (torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    aug = scan_ood.StrongAugment()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    same = aug(x[:1].expand(64, -1, -1, -1), torch.Generator().manual_seed(2))
    assert len({bytes(v.numpy()) for v in (same * 255).round().byte().reshape(64, -1)}) > 60  # per-sample params
    assert ((a == 0.5).all(1).sum((1, 2)) > 0).float().mean() > 0.9         # a Cutout square nearly always shows


def test_strong_augment_is_batched_without_syncs_within_twice_simclr_kernels():
    x = smooth_images(64)
    simclr, strong = common.SimCLRAugment(16, scale=(0.2, 1.0)), scan_ood.StrongAugment(n_ops=4, cutout=8)
    counts = []
    for aug in (simclr, strong):
        aug(x)
        with bench.DispatchCounter() as c:
            aug(x)
        counts.append(c)
    assert counts[1].syncs == 0, counts[1].sync_ops
    assert counts[1].launches <= 2 * counts[0].launches, (counts[1].launches, counts[0].launches)
    identity = scan_ood.StrongAugment(n_ops=3, cutout=0, ops=("identity",))(x)     # identities are exact
    same = (identity == x.float() / 255).flatten(1).all(1)
    mirrored = (identity == x.flip(3).float() / 255).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


# ---------------------------------------------------------------------------------------------- steps: 0 host syncs

def count_syncs(step, net):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
    idx = torch.arange(8)
    out = step(net, x[idx], idx, 0)                                         # warm-up (lazy inits)
    with bench.DispatchCounter() as c:
        out = step(net, x[idx], idx, 0)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
    return c


def test_every_training_step_makes_no_host_sync():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
    neighbors = scan_ood.mine_neighbors(x.flatten(1).float(), 3)
    strong = scan_ood.StrongAugment(n_ops=4, cutout=8)
    scan = scan_ood.SCANStep(x, neighbors, strong, 5.0, x[:6], neighbors[:6, :3] % 6)
    target = torch.randint(3, (16,), generator=g)
    crop = common.SimCLRAugment(16, scale=(0.8, 1.0), jitter=0.0, p_gray=0.0)
    steps = {"scan_step": (scan, tiny_cluster_net(heads=3)),
             "selflabel_step": (lambda net, xb, idx, epoch: scan_ood.selflabel_step(net, xb, strong, 0.5),
                                tiny_cluster_net(heads=1)),
             "label_step": (lambda net, xb, idx, epoch: scan_ood.label_step(net, xb, target[idx], strong),
                            tiny_cluster_net(heads=1)),
             "adapt_step": (scan_ood.AdaptStep(target, crop),
                            scan_ood.ClusterNet("imagenet_resnet18", 3, 1, weights="random"))}
    for name, (step, net) in steps.items():
        c = count_syncs(step, net)
        assert c.syncs == 0, (name, dict(c.sync_ops))


# ---------------------------------------------------------------------------------------------- presets, end to end

def test_presets_resolve_and_flags_override():
    for name, preset in scan_ood.PRESETS.items():
        args = harness.parse_args(scan_ood.build_parser(), scan_ood.PRESETS, ["--preset", name])
        assert all(getattr(args, k) == v for k, v in preset.items())
        assert all(args.sources[k] == f"preset {name}" for k in preset)
    args = harness.parse_args(scan_ood.build_parser(), scan_ood.PRESETS, ["--preset", "paper", "--scan-epochs", "3"])
    assert args.scan_epochs == 3 and args.sources["scan_epochs"] == "command line" and args.epochs == 500


def test_stage_epochs_follow_epochs_unless_typed_or_set_by_a_preset():
    def stages(*argv):
        args = harness.parse_args(scan_ood.build_parser(), scan_ood.PRESETS, list(argv))
        scan_ood.check_args(args)
        return args.epochs, args.scan_epochs, args.selflabel_epochs
    assert stages() == (20, 10, 5)                                           # the digits default, as it was
    assert stages("--epochs", "2") == (2, 1, 1)
    assert stages("--epochs", "2", "--scan-epochs", "3", "--selflabel-epochs", "0") == (2, 3, 0)
    assert stages("--preset", "quick") == (12, 4, 3) == stages("--preset", "quick", "--epochs", "12")
    assert stages("--preset", "quick", "--epochs", "2") == (2, 4, 3)          # a preset's stage lengths win


def record_final_scores(monkeypatch):
    """Wraps scan_ood.score: its first call in main (the in-distribution test images) is kept with a copy of the
    model's weights and the score state."""
    calls, original = [], scan_ood.score

    def recording(model, state, x, s):
        out = original(model, state, x, s)
        if not calls:
            calls.append({"weights": copy.deepcopy(model.state_dict()), "state": state, "x": x, "scores": out})
        return out
    monkeypatch.setattr(scan_ood, "score", recording)
    return calls


def assert_scorer_reproduces(call, res):
    """build_model(settings) + the run's weights (loaded strictly) + its state, saved and loaded as a scorer would
    (torch.save, weights_only=True), give the run's scores of the first images to 1e-5."""
    s = SimpleNamespace(**res["config"])
    model = scan_ood.build_model(s)
    model.load_state_dict(call["weights"])
    buffer = io.BytesIO()
    torch.save(call["state"], buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    out = scan_ood.score(model.eval(), state, call["x"][:20], s)
    assert set(out) == set(call["scores"]) == {res["main_variant"]}
    for name, scores in out.items():
        assert scores.dtype == torch.float32 and scores.shape == (20,)
        torch.testing.assert_close(scores, call["scores"][name][:20], atol=1e-5, rtol=0)


def test_digits_end_to_end_scorer_contract_and_resume(tmp_path, monkeypatch):
    """--preset quick on digits with short stages: the preset's and the flags' values land in the checkpoints; the
    scorer contract (build_model, score_state, score) reproduces the run's scores; --resume of the finished run
    loads every stage and gives the same results."""
    calls = record_final_scores(monkeypatch)
    out = tmp_path / "run"
    argv = ["--preset", "quick", "--dataset", "digits", "--id-classes", "0-5", "--subset", "400", "--size", "16",
            "--width", "8", "--epochs", "6", "--batch-size", "128", "--scan-epochs", "5", "--scan-lr", "1e-3",
            "--scan-batch-size", "64", "--selflabel-epochs", "1", "--selflabel-batch-size", "128", "--heads", "2",
            "--num-neighbors", "10", "--out", str(out), "--data-root", str(tmp_path), "--no-baselines"]
    res = scan_ood.main(argv)
    assert res["main_variant"] == "scan_features" and res["config"]["clusters"] == 6      # K resolved: 6 classes
    assert_scorer_reproduces(calls[0], res)
    (auroc,) = [m["auroc"] for m in res["metrics"]["scan_features"].values()]     # the one OOD set: digits 6-9
    # These argv with --seed 0-4 at OMP_NUM_THREADS=1 and 2 gave AUROC 65.9-91.8 (chance 50): too wide a spread
    # for a bar, so the AUROC is checked as a contract; SCAN's cluster accuracy, 37.75-58.25% (chance ~17%, 6
    # classes), keeps a bar well below its lowest.
    assert 0 <= auroc <= 100, res["metrics"]
    assert res["cluster_accuracy"]["scan"] > 25, res["cluster_accuracy"]
    assert 1 <= res["selected_epoch"] <= 5 and 0 <= res["selected_head"] < 2
    settings = torch.load(out / "pretext.pt", weights_only=True)["run"]["settings"]
    assert settings["scan_epochs"] == 5 and settings["weight_decay"] == 1e-4 and settings["width"] == 8
    saved = json.load(open(out / "results.json"))
    assert saved["config"]["selflabel_batch_size"] == 128 and saved["metrics"] == res["metrics"]
    res2 = scan_ood.main(argv + ["--resume"])
    assert res2["metrics"] == res["metrics"] and res2["cluster_accuracy"] == res["cluster_accuracy"]
    assert_scores_follow_the_image(scan_ood.main, out)


def test_pretrained_variant_on_a_random_weight_backbone(tmp_path, monkeypatch):
    """The Sec. 3.2 path (DN2, fine-tuning on pseudo-labels, weight averaging) with a random ResNet-18: a path
    check only, no pretrained weights here; the scorer contract reproduces the final (averaged) classifier's
    Mahalanobis scores. K-means labels keep it short."""
    calls = record_final_scores(monkeypatch)
    res = scan_ood.main(["--subset", "96", "--size", "16", "--width", "4", "--epochs", "1", "--batch-size", "32",
                         "--labels", "kmeans", "--selflabel-epochs", "1", "--selflabel-batch-size", "32",
                         "--backbone", "resnet18", "--backbone-weights", "random", "--adapt-size", "16",
                         "--adapt-epochs", "2",
                         "--adapt-batch-size", "32", "--adapt-crop", "center", "--adapt-freeze", "layer2",
                         "--recompute-bn", "--ood-score", "mahalanobis", "--out", str(tmp_path / "run"),
                         "--data-root", str(tmp_path), "--no-baselines"])
    assert set(res["metrics"]) == {"simclr_knn", "kmeans_features", "dn2", "pretrained", "pretrained_bn"}
    assert res["main_variant"] == "pretrained"
    assert_scorer_reproduces(calls[0], res)
    assert_scores_follow_the_image(scan_ood.main, tmp_path / "run")     # through the pre-trained network's view


@pytest.mark.parametrize("flags,message", [
    (["--backbone-weights", "random"], "--backbone-weights random: expected --backbone"),
    (["--val-fraction", "0.9"], "--val-fraction 0.9: expected a number in (0, 0.5]"),
    (["--confidence", "1"], "--confidence 1.0: expected a number in (0, 1)"),
    (["--backbone", "resnet18", "--backbone-weights", "IMAGENET1K_V9"],
     "--backbone-weights IMAGENET1K_V9: expected IMAGENET1K_V1"),
    (["--clusters", "1"], "--clusters 1: expected 0"),
    (["--subset", "96", "--batch-size", "32", "--scan-batch-size", "500"],
     "--scan-batch-size 500: expected at most the 86 images"),
    (["--subset", "96", "--batch-size", "32", "--selflabel-batch-size", "32", "--knn-k", "500"],
     "--knn-k 500: expected at most the 96 training images"),
    (["--subset", "96", "--batch-size", "32", "--selflabel-batch-size", "32", "--num-neighbors", "90"],
     "--num-neighbors 90: expected fewer than the 86 images"),
    (["--subset", "60", "--batch-size", "32", "--scan-batch-size", "32", "--selflabel-batch-size", "32",
      "--backbone", "resnet18", "--backbone-weights", "random"],
     "--adapt-batch-size 64: expected at most the 60 training images"),
])
def test_bad_flags_fail_in_one_line_before_any_work(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        scan_ood.main(flags + ["--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_stage_flags_are_checked_only_when_their_stage_runs():
    """A stage's flags are checked when it runs: 60 images refuse the adapt stage's default batch of 64 with
    --backbone only, and K-means labels ignore the SCAN stage's flags."""
    parse = lambda *flags: harness.parse_args(scan_ood.build_parser(), scan_ood.PRESETS, list(flags))
    small = ["--subset", "60", "--batch-size", "32", "--scan-batch-size", "32", "--selflabel-batch-size", "32"]
    for args in (parse(*small), parse("--labels", "kmeans", "--heads", "0", "--val-fraction", "0.9",
                                      "--scan-batch-size", "500", "--num-neighbors", "500", "--batch-size", "32",
                                      "--selflabel-batch-size", "60")):
        scan_ood.check_args(args)
        scan_ood.check_sizes(args, 60)
    args = parse(*small, "--backbone", "resnet18", "--backbone-weights", "random")
    scan_ood.check_args(args)
    with pytest.raises(ValueError, match=re.escape("--adapt-batch-size 64: expected at most the 60 training images")):
        scan_ood.check_sizes(args, 60)
    with pytest.raises(ValueError, match="--heads 100000000: expected a smaller value: 100000000 heads"):
        scan_ood.check_args(parse("--heads", "100000000"))
    with pytest.raises(ValueError, match=re.escape("--scan-lr 1e+300: expected a finite number > 0")):
        scan_ood.check_args(parse("--scan-lr", "1e300"))


def test_use_it_in_your_code_block_runs(run_use_it):
    """The module docstring's example (the indented lines after `Use it in your code:`) runs as is."""
    namespace = run_use_it(scan_ood)
    scores = namespace["scores"]
    assert scores.shape == (8,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.isfinite(namespace["loss"])
