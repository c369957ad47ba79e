"""Tests of mcl.py: each loss against a literal per-view loop of the paper's equation (values and gradients),
the Gaussians against numpy, the SEI aggregations against loops, the batch layout, presets, and short digits runs."""
import inspect
import json
import math
import os
import re
import types

import pytest
import torch

import bench
import common
import harness
import mcl
from conftest import assert_scores_follow_the_image

TAU, ALPHA, BETA = 0.2, 0.05, 2.5


def random_batch(n_images=6, n_classes=3, n_rot=2, d=5, seed=0):
    """z (2N x d) for N = n_images rotated images and per-view labels, laid out as the training batches are."""
    g = torch.Generator().manual_seed(seed)
    n = n_images
    z = torch.randn(2 * n, d, generator=g, dtype=torch.float64).float().requires_grad_()
    y_img = torch.randint(n_classes, (n,), generator=g)
    r_img = torch.randint(n_rot, (n,), generator=g)
    return z, y_img.repeat(2), r_img.repeat(2)


def literal_ccm(i, j, y_main, y_aux, n):
    """Eq. 11 for one pair; the partner view (same image) keeps 1/tau."""
    if j == (i + n) % (2 * n):
        return 1 / TAU
    if y_main[i] == y_main[j] and y_aux[i] == y_aux[j]:
        return ALPHA
    if y_main[i] == y_main[j]:
        return BETA
    return 1 / TAU


def cos(z, i, j):
    return (z[i] @ z[j]) / (z[i].norm() * z[j].norm())


def test_ccm_mask_matches_eq11_pair_by_pair():
    z, y_main, y_aux = random_batch(n_images=7)
    mask = mcl.ccm_mask(y_main, y_aux, ALPHA, BETA, TAU)
    n2 = len(z)
    for i in range(n2):
        for j in range(n2):
            if i != j:
                assert mask[i, j].item() == pytest.approx(literal_ccm(i, j, y_main, y_aux, n2 // 2))


def test_ccm_loss_matches_eq4_to_6_loop():
    z, y_main, y_aux = random_batch()
    n2, n = len(z), len(z) // 2
    total = 0
    for i in range(n2):
        j = (i + n) % n2
        denom = sum(torch.exp(cos(z, i, k) * literal_ccm(i, k, y_main, y_aux, n)) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(cos(z, i, j) / TAU) / denom)
    expected = total / n2
    got = mcl.ccm_loss(z, y_main, y_aux, ALPHA, BETA, TAU)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    g_got, = torch.autograd.grad(got, z)
    g_exp, = torch.autograd.grad(expected, z)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-4, atol=1e-6)


def test_without_ccm_the_loss_is_nt_xent():
    z, y_main, y_aux = random_batch()
    got = mcl.ccm_loss(z, y_main, y_aux, 1 / TAU, 1 / TAU, TAU)
    assert got.item() == pytest.approx(common.nt_xent(z, TAU).item(), rel=1e-5)


def literal_positive_set(i, y_main, y_aux, n):
    """Eq. 7: views with the same joint label whose parent image differs."""
    return [k for k in range(2 * n) if y_main[k] == y_main[i] and y_aux[k] == y_aux[i] and k % n != i % n]


def test_spa_positives_are_uniform_over_eq7_set():
    z, y_main, y_aux = random_batch(n_images=8, n_classes=2, n_rot=2)
    n = len(z) // 2
    image = torch.arange(n)
    same = (y_main[:n, None] == y_main[None, :n]) & (y_aux[:n, None] == y_aux[None, :n]) & (image[:, None] != image)
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([mcl.spa_positives(same, gen) for _ in range(4000)])        # 4000 x N
    for i in range(n):
        allowed = [k for k in literal_positive_set(i, y_main, y_aux, n) if k < n]   # the other images
        if not allowed:
            assert (draws[:, i] == -1).all()
            continue
        counts = torch.bincount(draws[:, i], minlength=n).float()
        assert counts[[k for k in range(n) if k not in allowed]].sum() == 0
        freq = counts[allowed] / len(draws)
        assert (freq - 1 / len(allowed)).abs().max() < 0.04                        # ~5 sigma at 4000 draws


def literal_draw(y_main, y_aux, n, generator):
    """The image each rotated image draws, as spa_loss draws it: the highest of one uniform score per image among
    the other images with its joint label (Eq. 7), read row by row from the same generator stream."""
    scores = torch.rand(n, n, generator=generator)
    drawn = []
    for i in range(n):
        allowed = [k for k in literal_positive_set(i, y_main, y_aux, n) if k < n]
        drawn.append(max(allowed, key=lambda k: scores[i, k].item()) if allowed else None)
    return drawn


def literal_spa(z, y_main, y_aux, generator):
    """Eq. 7-10, one view at a time, with our resolved choices: the drawn image is shared by the two views (view
    v attracts view v of it), the positive at 1/tau in its denominator, the partner view in it with logit 0."""
    n2, n = len(z), len(z) // 2
    drawn = literal_draw(y_main, y_aux, n, generator)
    total = 0
    for i in range(n2):
        if drawn[i % n] is None:
            continue                                                                # contributes nothing
        j = drawn[i % n] + (n if i >= n else 0)
        denom = 0
        for k in range(n2):
            if k == i:
                continue
            if k % n == i % n:                                                      # the partner view: logit 0
                denom = denom + 1
                continue
            mask = 1 / TAU if k == j else literal_ccm(i, k, y_main, y_aux, n)
            denom = denom + torch.exp(cos(z, i, k) * mask)
        total = total - torch.log(torch.exp(cos(z, i, j) / TAU) / denom)
    return total / n2


def test_spa_loss_matches_eq7_to_9_loop_with_a_fixed_generator():
    z, y_main, y_aux = random_batch(n_images=8, n_classes=2, n_rot=2, seed=3)
    got = mcl.spa_loss(z, y_main, y_aux, ALPHA, BETA, TAU, torch.Generator().manual_seed(7))
    expected = literal_spa(z, y_main, y_aux, torch.Generator().manual_seed(7))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    g_got, = torch.autograd.grad(got, z)
    g_exp, = torch.autograd.grad(expected, z)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-4, atol=1e-6)


def official_spa(z, cls, rot, drawn, beta, alpha, t):
    """The official code's SPA loss, re-derived view pair by view pair from what its nt_xent_SPA computes, on its
    layout: views 2k and 2k + 1 of rotated image k (class cls[k], rotation rot[k]); drawn[k] the image that k
    attracts, view v of k its view v. Mask of a pair of images: 1/t for another class, beta for the same class at
    another rotation, alpha for the same class and rotation, 0 within an image; the positive's entry 1/t. Logits:
    the cosine clamped at 1e-7 times the mask, the own view out; the mean cross-entropy over the 2N views."""
    n2 = len(z)
    total = 0
    for a in range(n2):
        k, target = a // 2, 2 * drawn[a // 2] + a % 2
        logits = []
        for b in range(n2):
            if b == a:
                continue
            m = b // 2
            if b == target:
                mask = 1 / t
            elif m == k:
                mask = 0.0
            elif cls[m] != cls[k]:
                mask = 1 / t
            else:
                mask = beta if rot[m] != rot[k] else alpha
            logits.append((b, cos(z, a, b).clamp(min=1e-7) * mask))
        denom = sum(torch.exp(v) for _, v in logits)
        total = total - torch.log(torch.exp(dict(logits)[target]) / denom)
    return total / n2


def test_spa_loss_matches_the_official_code_on_identical_inputs():
    """The same positives, the same views: ours (views i and i + N) against the official layout (2k, 2k + 1)."""
    n, gen = 8, torch.Generator().manual_seed(5)
    z = torch.rand(2 * n, 6, generator=gen, dtype=torch.float64).float().requires_grad_()   # cosines > 0
    y_main = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]).repeat(2)
    y_aux = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]).repeat(2)
    ours = mcl.spa_loss(z, y_main, y_aux, ALPHA, BETA, TAU, torch.Generator().manual_seed(9))
    drawn = literal_draw(y_main, y_aux, n, torch.Generator().manual_seed(9))
    interleaved = torch.stack([z[:n], z[n:]], 1).flatten(0, 1)                     # row 2k + v = view v of k
    theirs = official_spa(interleaved, y_main[:n].tolist(), y_aux[:n].tolist(), drawn, BETA, ALPHA, TAU)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    g_ours, = torch.autograd.grad(ours, z)
    g_theirs, = torch.autograd.grad(theirs, z)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)


def test_spa_loss_is_zero_without_any_positive():
    z, _, _ = random_batch(n_images=4)
    y = torch.arange(4).repeat(2)                                                   # every image its own class
    assert mcl.spa_loss(z, y, torch.zeros_like(y)).item() == 0


def test_mcl_loss_is_ccm_plus_lambda_spa():
    z, y_main, y_aux = random_batch(n_images=8, n_classes=2)
    loss, logs = mcl.mcl_loss(z, y_main, y_aux, ALPHA, BETA, TAU, 0.5, torch.Generator().manual_seed(2))
    spa = mcl.spa_loss(z, y_main, y_aux, ALPHA, BETA, TAU, torch.Generator().manual_seed(2))
    ccm = mcl.ccm_loss(z, y_main, y_aux, ALPHA, BETA, TAU)
    assert loss.item() == pytest.approx((ccm + 0.5 * spa).item(), rel=1e-6)
    assert set(logs) == {"ccm", "spa"}
    ccm_only = mcl.mcl_loss(z, y_main, y_aux, spa_weight=0)[0]
    assert ccm_only.item() == pytest.approx(mcl.ccm_loss(z, y_main, y_aux).item())


def test_alpha_conditions_of_appendix_a():
    # A.3: 2N = 2048 views, C = 40 joint classes: Eq. 24 bound 1 / (0.2 x 51.2) = 0.098, alpha = 0.05 passes.
    assert mcl.alpha_conditions(0.05, 0.2, 1.0, 2048, 40) == []
    with pytest.warns(UserWarning, match="Eq. 24"):
        assert len(mcl.alpha_conditions(0.2, 0.2, 1.0, 2048, 40)) == 1
    with pytest.warns(UserWarning, match="Eq. 31"):                                 # bound 1 / (0.4 x 2046)
        assert len(mcl.alpha_conditions(1e-3, 0.2, 1.0, 2048, 40)) == 1


def test_rotated_views_keep_all_four_rotations_of_an_image_in_the_batch():
    xb = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    views, y_aux = mcl.rotated_views(xb, common.to_float)                          # identity augmentation
    assert views.shape == (2 * 4 * 3, 3, 8, 8)
    xf = common.to_float(xb)
    for half in range(2):
        for r in range(4):
            for b in range(3):
                row = half * 12 + r * 3 + b
                assert y_aux[row] == r
                torch.testing.assert_close(views[row], torch.rot90(xf[b], r, dims=(1, 2)))


def test_rotated_views_draw_both_views_in_one_augmentation_call():
    calls = []
    aug = lambda x: calls.append(len(x)) or common.to_float(x)
    mcl.rotated_views(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), aug)
    assert calls == [2 * 4 * 3]


def test_sei_views_are_rotations_then_mirrors():
    xb = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8)
    views = mcl.sei_views(xb, 8).view(2, 8, 3, 6, 6)
    xf = common.to_float(xb)
    for b in range(2):
        for v in range(8):
            src = xf[b].flip(2) if v >= 4 else xf[b]
            torch.testing.assert_close(views[b, v], torch.rot90(src, v % 4, dims=(1, 2)))


def literal_harmonic_mean(values):
    return len(values) / sum(1 / v for v in values)


@pytest.mark.parametrize("how", mcl.AGGREGATIONS)
def test_sei_aggregations_match_loops(how):
    """Eq. 13-14 and 17-20 view by view, on distances (not squared): avg = minus their mean, max = minus the
    smallest, w-avg = minus their harmonic mean."""
    g = torch.Generator().manual_seed(0)
    dist = torch.rand(5, 8, 3, generator=g, dtype=torch.float64) * 10
    pred, score = mcl.sei_aggregate(dist, how)
    for n in range(5):
        agg = []
        for c in range(3):
            views = [dist[n, v, c].item() for v in range(8)]
            if how == "avg":                                                        # Eq. 17
                agg.append(-sum(views) / len(views))
            elif how == "max":                                                      # Eq. 18
                agg.append(max(-d for d in views))
            else:                                                                   # Eq. 19-20
                agg.append(-literal_harmonic_mean(views))
        best = max(range(3), key=lambda c: agg[c])
        assert pred[n].item() == best
        assert score[n].item() == pytest.approx(agg[best])


def official_sei(dist, method):
    """What the official SEI_single computes for one test image, re-derived: dist[view][class] are Mahalanobis
    distances (its distance takes the square root) -> (predicted class, score). 'min': the class of the smallest
    distance over all views and classes (a tie goes to the later view and class), the score minus the smallest
    distance of that class; 'mean': the class with the smallest sum over views, the score minus that sum."""
    classes = range(len(dist[0]))
    if method == "min":
        _, _, cls = min((d, -v, -c) for v, row in enumerate(dist) for c, d in enumerate(row))
        return -cls, -min(row[-cls] for row in dist)
    sums = [sum(row[c] for row in dist) for c in classes]
    cls = sums.index(min(sums))
    return cls, -sums[cls]


@pytest.mark.parametrize("how, method", [("avg", "mean"), ("max", "min")])
def test_sei_avg_and_max_match_the_official_mean_and_min(how, method):
    """Identical features and Gaussians: the same predicted class; max gives the official score, avg the official
    sum over the views divided by their number (the same ranking)."""
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(6, 4, 5, generator=g, dtype=torch.float64)                  # 6 images x 4 views
    gaussians = [common.fit_gaussians(torch.randn(40, 5, generator=g, dtype=torch.float64), torch.arange(40) % 3, 3)
                 for _ in range(4)]                                                  # 3 classes per rotation
    pred, score = mcl.sei_aggregate(mcl.sei_distances(feats, gaussians), how)
    for n in range(6):
        views = []
        for v in range(4):
            means, chol = gaussians[v]
            inverse = torch.linalg.inv(chol @ chol.transpose(1, 2))
            delta = feats[n, v] - means                                             # classes x d
            views.append([math.sqrt(delta[c] @ inverse[c] @ delta[c]) for c in range(3)])
        cls, official = official_sei(views, method)
        assert pred[n].item() == cls
        assert score[n].item() == pytest.approx(official / (4 if method == "mean" else 1), rel=1e-9)


def test_w_avg_is_not_the_harmonic_mean_of_squared_distances():
    dist = torch.tensor([[[1.0], [3.0]]], dtype=torch.float64)
    assert mcl.sei_aggregate(dist, "w-avg")[1].item() == pytest.approx(-1.5)        # 2 / (1 + 1/3)
    assert -literal_harmonic_mean([1.0, 9.0]) == pytest.approx(-1.8)                 # the squared form: 2 / (1 + 1/9)


def test_presets_resolve_and_flags_override():
    known = {a.dest for a in mcl.build_parser()._actions}
    for name, preset in mcl.PRESETS.items():
        assert set(preset) <= known, name
        args = harness.parse_args(mcl.build_parser(), mcl.PRESETS, ["--preset", name, "--epochs", "3"])
        assert args.epochs == 3 and args.sources["epochs"] == "command line"
        for k, v in preset.items():
            if k != "epochs":
                assert getattr(args, k) == v and args.sources[k] == f"preset {name}"
    assert mcl.QUICK["dataset"] == "cifar10"                                        # nothing outside the repository


def test_every_preset_value_names_its_source():
    text = inspect.getsource(mcl)
    for name in ("PAPER", "QUICK"):
        body = text[text.index(f"{name} = {{"):]
        body = body[body.index("\n") + 1:body.index("\n}")]
        entries = [line for line in body.splitlines() if line.lstrip().startswith('"')]
        assert len(entries) == len(getattr(mcl, name)), name
        for line in entries:
            assert re.search(r"# (paper|public code|ours):", line), line


def resolved(*argv):
    args = harness.parse_args(mcl.build_parser(), mcl.PRESETS, list(argv))
    mcl.check_args(args)
    return args.feature_layer, args.sei, args.sei_agg


def test_inference_defaults_digits_and_paper():
    assert resolved() == ("lf", 4, "w-avg")                                         # digits: no mirrored views
    assert resolved("--preset", "paper") == ("ph", 8, "w-avg")                      # the paper's SEI
    assert resolved("--dataset", "cifar10") == ("ph", 8, "w-avg")
    assert resolved("--sei", "1", "--feature-layer", "ph") == ("ph", 1, "w-avg")
    assert resolved("--augment", "paper") == ("ph", 8, "w-avg")                     # trained on mirrored digits


@pytest.mark.parametrize("flag, value", [("--tau", "0.0"), ("--alpha", "-1.0"), ("--spa-weight", "-0.5"),
                                         ("--fit-fraction", "0.0"), ("--min-crop", "1.5"), ("--ridge", "-1.0"),
                                         ("--clusters", "-2"), ("--simclr-epochs", "0"), ("--proj-dim", "0"),
                                         ("--ridge", "0.0"), ("--proj-dim", "1000000000")])
def test_bad_flags_fail_in_one_line_before_any_work(tmp_path, flag, value):
    with pytest.raises(SystemExit, match=f"{flag} {value}: expected"):
        mcl.main([flag, value, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match="--ridge inf: expected a finite number"):         # inf and NaN, any flag
        mcl.main(["--ridge", "inf", "--out", str(tmp_path / "run")])


def tiny_net():
    return common.Encoder("resnet18", proj_dim=8, width=2)


@pytest.mark.parametrize("setting", ["mcl", "simclr"])
def test_training_step_makes_no_host_sync(setting):
    torch.manual_seed(0)
    net, xb = tiny_net(), torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    aug = common.SimCLRAugment(8)
    kw = dict(alpha=5.0, beta=5.0, spa_weight=0.0) if setting == "simclr" else {}
    mcl.mcl_step(net, xb, y, aug, **kw)[0].backward()                              # warm-up outside the count
    with bench.DispatchCounter() as c:
        loss, _ = mcl.mcl_step(net, xb, y, aug, **kw)
        loss.backward()
    assert c.launches > 0 and c.syncs == 0, c.sync_ops


def test_losses_run_in_float32_under_autocast():
    z, y_main, y_aux = random_batch(n_images=8, n_classes=2)
    expected = mcl.mcl_loss(z, y_main, y_aux, generator=torch.Generator().manual_seed(0))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):                              # the cosines' matmul included
        got = mcl.mcl_loss(z, y_main, y_aux, generator=torch.Generator().manual_seed(0))[0]
    assert got.dtype == torch.float32 and got.item() == pytest.approx(expected.item(), abs=1e-5)


def tiny_run(tmp_path, *flags):
    return ["--subset", "96", "--width", "4", "--size", "16", "--epochs", "1", "--batch-size", "24",
            "--out", str(tmp_path), *flags]


def test_run_records_the_resolved_preset_and_resumes_with_another_reading(tmp_path):
    out = mcl.main(tiny_run(tmp_path, "--preset", "quick", "--dataset", "digits", "--sei", "4"))
    settings = torch.load(os.path.join(tmp_path, "checkpoint.pt"), weights_only=True)["run"]["settings"]
    assert settings["lr"] == mcl.QUICK["lr"] and settings["width"] == 4 and settings["dataset"] == "digits"
    assert "sei" not in settings                                                    # evaluation only
    saved = json.load(open(os.path.join(tmp_path, "results.json")))
    assert saved["config"]["sources"]["lr"] == "preset quick" and saved["config"]["sources"]["width"] == "command line"
    assert saved["method"] == "mcl" and saved["reading"] == "lf sei4 w-avg" and set(saved["metrics"]) == set(out["metrics"])
    assert set(saved["baselines"]) == {"pixels_knn", "random_init_knn"}
    assert set(saved["metrics"]) == {f"{layer} {key}" for layer in ("ph", "lf")
                                     for key in ["sei1 -"] + [f"sei4 {a}" for a in mcl.AGGREGATIONS]}
    again = mcl.main(tiny_run(tmp_path, "--preset", "quick", "--dataset", "digits", "--sei", "4", "--resume",
                              "--feature-layer", "ph", "--no-baselines"))                # the trained model, read again
    assert again["metrics"]["ph sei4 w-avg"] == out["metrics"]["ph sei4 w-avg"]


def test_kmeans_labels_run_and_bad_cluster_count(tmp_path):
    out = mcl.main(tiny_run(tmp_path, "--labels", "kmeans", "--simclr-epochs", "1", "--clusters", "4", "--sei", "1",
                            "--feature-layer", "ph"))
    assert 0 <= out["accuracy"] <= 100 and math.isfinite(out["metrics"]["ph sei1 -"]["classes 6-9"]["auroc"])
    with pytest.raises(SystemExit, match="--clusters"):
        mcl.main(tiny_run(tmp_path / "bad", "--labels", "kmeans", "--clusters", "1000"))


def test_digits_run_is_far_above_chance(tmp_path):
    """Digits 0-5 vs 6-9: a short MCL run (without rotations, to stay fast) separates them and classifies the
    six classes with class-wise Gaussians; the rotation path runs in the tests above."""
    # Measured with --seed 0-4 at OMP_NUM_THREADS=1 and 2 (within 0.9 of each other): AUROC 81.6-95.1, accuracy
    # 86.7-94.3; the thresholds sit more than 11 and 26 points below the lowest.
    out = mcl.main(["--no-aux", "--sei", "1", "--feature-layer", "lf", "--epochs", "3", "--out", str(tmp_path)])
    assert out["metrics"]["lf sei1 -"]["classes 6-9"]["auroc"] > 70                # chance: 50
    assert out["accuracy"] > 60                                                     # chance: 1/6


def settings(**kw):
    base = dict(arch="resnet18", width=4, init="pytorch", proj_dim=8, proj_hidden=None, sei=4, feature_layer="lf",
                sei_agg="w-avg")
    return types.SimpleNamespace(**{**base, **kw})


def test_torchvision_init_keeps_pytorchs_default_on_the_stem():
    """As the official code: kaiming-normal (fan_out) on every convolution but the 3x3 stem, which keeps PyTorch's
    default, uniform within 1 / sqrt(fan_in) (std 1 / sqrt(3 fan_in)); 1,728 stem weights: std within 10%."""
    torch.manual_seed(0)
    net = mcl.build_model(settings(init="torchvision", width=64)).backbone
    stem, conv = net.conv1.weight, net.layer1[0].conv1.weight
    assert stem.abs().max() <= 1 / math.sqrt(27)
    assert stem.std().item() == pytest.approx(1 / math.sqrt(3 * 27), rel=0.1)
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)      # kaiming, fan_out


def tiny_scoring(seed=0):
    torch.manual_seed(seed)
    model = mcl.build_model(settings())
    x = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    state = mcl.score_state(model, x, torch.arange(12) % 2, 2)
    return model, state, x


def test_score_returns_every_reading_in_float32_whatever_the_autocast():
    model, state, x = tiny_scoring()
    s = settings()
    plain = mcl.score(model, state, x, s)
    assert set(plain) == {mcl.reading_name(*r) for r in mcl.readings(4)}
    assert mcl.reading_name(s.feature_layer, s.sei, s.sei_agg) in plain
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state_bf16 = mcl.score_state(model, x, torch.arange(12) % 2, 2)
        under = mcl.score(model, state_bf16, x, s)
    for k, v in plain.items():
        assert v.dtype == torch.float32 and v.shape == (12,) and torch.isfinite(v).all()
        torch.testing.assert_close(under[k], v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mcl.score(model, state, x, s)["lf sei4 w-avg"], plain["lf sei4 w-avg"], rtol=0, atol=0)


def test_a_rebuilt_model_reproduces_the_runs_scores(tmp_path):
    """The scorer contract: build_model(settings) + the trained weights + score_state + score() give the run's
    metrics for every reading of its grid."""
    out = mcl.main(tiny_run(tmp_path, "--sei", "4", "--no-baselines"))
    s = types.SimpleNamespace(**out["config"])
    model = mcl.build_model(s)
    model.load_state_dict(torch.load(os.path.join(tmp_path, "checkpoint.pt"), weights_only=True)["model"])
    model.eval()
    data = harness.load_data(s)
    labels = torch.searchsorted(torch.as_tensor(data.id_classes), data.train_y)
    state = mcl.score_state(model, data.train_x, labels, len(data.id_classes), 4, s.fit_fraction, s.ridge, s.seed)
    full = common.evaluate(lambda imgs: mcl.score(model, state, imgs, s), data.test_x, data.ood)
    assert set(full) == set(out["metrics"])
    for key, m in full.items():
        for ood, values in m.items():
            for name, v in values.items():
                assert v == pytest.approx(out["metrics"][key][ood][name], abs=1e-5), (key, ood, name)
    assert_scores_follow_the_image(mcl.main, tmp_path)


def test_the_grid_names_whole_sets(capsys):
    """Two OOD folders that share a long prefix keep their whole names as column heads."""
    sets = ["folder:../data/ood_near", "folder:../data/ood_far"]
    metrics = {"lf sei4 w-avg": {sets[0]: {"auroc": 61.0}, sets[1]: {"auroc": 88.5}}}
    mcl.print_grid(metrics, {"lf sei4 w-avg": 70.0}, sets)
    head, row = capsys.readouterr().out.splitlines()
    assert head.split()[-3:-1] == sets and row.split()[-2:] == ["61.00", "88.50"]


def test_the_use_it_in_your_code_block_runs(run_use_it):
    namespace = run_use_it(mcl)
    assert namespace["score"].shape == (8,) and torch.isfinite(namespace["score"]).all()
