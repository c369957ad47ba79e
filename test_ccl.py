"""Tests of ccl.py: each loss against a literal loop over the paper's equation (values and gradients), the
schedule and --resume, both scores against brute force, the test-time ensemble, presets, a digits run."""
import json
import math
import os

import numpy as np
import pytest
import torch

import ccl
import common


def cos(a, b):
    return (a @ b) / (a.norm() * b.norm())


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------- losses vs literal loops

def test_concentration_matches_eq5_loop():
    g = torch.Generator().manual_seed(0)
    h, centers = torch.randn(20, 5, generator=g), torch.randn(4, 5, generator=g)
    assign = torch.tensor([0] * 9 + [1] * 6 + [2] * 4 + [3])        # cluster 3 has one member
    alpha = 10.0
    expected = []
    for c in range(4):
        members = [h[t] for t in range(20) if assign[t] == c]
        T = len(members)
        expected.append(sum((m - centers[c]).norm() for m in members) / (T * math.log(T + alpha)) if T >= 2 else None)
    largest = max(e for e in expected if e is not None)
    expected = torch.stack([e if e is not None else largest for e in expected])
    torch.testing.assert_close(ccl.concentration(h, centers, assign, alpha), expected)
    lo, hi = np.percentile(expected.numpy(), 10), np.percentile(expected.numpy(), 90)   # PCL's rescaling
    clipped = torch.tensor([min(max(float(e), lo), hi) for e in expected])
    torch.testing.assert_close(ccl.concentration(h, centers, assign, alpha, mean=0.3), 0.3 * clipped / clipped.mean())


def test_cluster_center_loss_matches_eq4_loop():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(12, 6, generator=g, requires_grad=True)
    centers = torch.randn(4, 6, generator=g, requires_grad=True)
    phi = (0.1 + torch.rand(4, generator=g)).requires_grad_()
    assign = torch.randint(4, (12,), generator=g)
    terms = []
    for i in range(12):
        a = assign[i]
        numerator = torch.exp(cos(h[i], centers[a]) / phi[a])
        denominator = sum(torch.exp(cos(h[i], centers[j]) / phi[j]) for j in range(4) if j != a)   # c_j != c_i
        terms.append(-torch.log(numerator / denominator))
    slow = torch.stack(terms).sum() / 12                                                            # 1 / 2N
    fast = ccl.cluster_center_loss(h, centers, assign, phi)
    torch.testing.assert_close(fast, slow)
    for gf, gs in zip(grads(fast, [h, centers, phi]), grads(slow, [h, centers, phi])):
        torch.testing.assert_close(gf, gs)


def test_cluster_instance_loss_matches_eq6_loop():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(10, 7, generator=g, requires_grad=True)
    assign = torch.tensor([0, 1, 2, 0, 1, 0, 3, 1, 2, 0])      # view 6 is alone in cluster 3: contributes nothing
    tau = 0.5
    per_anchor = []
    for i in range(10):
        others = [a for a in range(10) if a != i]                                      # A(i)
        positives = [p for p in others if assign[p] == assign[i]]                      # P(i)
        if not positives:
            continue
        denominator = sum(torch.exp(cos(h[i], h[a]) / tau) for a in others)
        per_anchor.append(-sum(torch.log(torch.exp(cos(h[i], h[p]) / tau) / denominator)
                               for p in positives) / len(positives))
    slow = torch.stack(per_anchor).mean()
    fast = ccl.cluster_instance_loss(h, assign, tau)
    assert torch.isfinite(fast)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(grads(fast, [h])[0], grads(slow, [h])[0])


def test_total_loss_eq7_eq8_and_ablations():
    l_self, l_ccl, l_cil = torch.tensor(2.0), torch.tensor(1.0), torch.tensor(4.0)
    assert ccl.ccl_loss(l_self, l_ccl, l_cil, 0.5) == pytest.approx(0.5 * 2 + 0.5 * (1 + 4) / 2)
    assert ccl.ccl_loss(l_self, None, l_cil, 0.2) == pytest.approx(0.8 * 2 + 0.2 * 4)
    assert ccl.ccl_loss(l_self, l_ccl, None, 0.2) == pytest.approx(0.8 * 2 + 0.2 * 1)
    assert ccl.ccl_loss(l_self, l_ccl, l_cil, 0.0) == pytest.approx(2.0)


# ---------------------------------------------------------------- scores vs brute force

def test_scores_match_brute_force_and_chunk(monkeypatch):
    g = torch.Generator().manual_seed(3)
    train_z, test_z = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    k = 5
    sims = torch.stack([torch.stack([cos(t, m) for m in train_z]) for t in test_z])      # test x train, all at once
    want_cos = sims.max(1).values * test_z.norm(dim=1)                                  # Eq. 9, CSI's test norm
    want_var = []
    for i in range(len(test_z)):
        top = sims[i].argsort(descending=True)[:k]                                      # V: highest score_cos terms
        v = train_z[top]
        mean = v.mean(0)
        std = math.sqrt(sum(float((v[j] - mean).pow(2).sum()) for j in range(k)) / (k - 1))
        want_var.append(want_cos[i] / std)
    want_var = torch.stack(want_var)
    monkeypatch.setattr(common, "chunk_rows", lambda n_cols: 7)                       # force several chunks
    torch.testing.assert_close(ccl.score_cos(train_z, test_z), want_cos)
    torch.testing.assert_close(ccl.score_var(train_z, test_z, k), want_var)


def test_ensemble_applies_the_same_views_to_every_image():
    torch.manual_seed(0)
    model = common.Encoder("resnet18", width=2).eval()
    x = torch.randint(0, 256, (520, 3, 16, 16), dtype=torch.uint8)                      # > one embed batch (512)
    perm = torch.randperm(len(x))
    z = ccl.projections(model, x, n_aug=2, size=16, blur=True)
    torch.testing.assert_close(ccl.projections(model, x[perm], n_aug=2, size=16, blur=True), z[perm])
    assert not torch.allclose(z, ccl.projections(model, x, n_aug=0, size=16, blur=True))


# ---------------------------------------------------------------- schedule, resume, presets, bad input

def test_is_cluster_epoch():
    assert [e for e in range(12) if ccl.is_cluster_epoch(e, 3, 4)] == [3, 7, 11]
    assert [e for e in range(12) if ccl.is_cluster_epoch(e, 2, 0)] == [2]              # Table 4, "0": never updated


TINY = ["--subset", "64", "--width", "2", "--batch-size", "32", "--clusters", "3", "--score-k", "3",
        "--save-every", "1"]


def kmeans_lines(out):
    return [line.split(":")[0] for line in out.splitlines() if "K-means" in line]


def test_schedule_and_resume_keep_the_clusters(tmp_path, capsys):
    args = TINY + ["--cluster-start", "1", "--cluster-every", "3", "--out", str(tmp_path)]
    ccl.main(args + ["--epochs", "3"])
    out = capsys.readouterr().out
    assert kmeans_lines(out) == ["epoch 2"]                                  # none in the warm-up epoch 1
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ") and "/3" in line]
    assert "ccl" not in epoch_lines[0] and "ccl" in epoch_lines[1] and "cil" in epoch_lines[2]
    saved = torch.load(os.path.join(tmp_path, "checkpoint.pt"), weights_only=False)["state"]
    assert saved["assign"].shape == (64,) and saved["centers"].shape[0] == 3 and saved["phi"].shape == (3,)
    ccl.main(args + ["--epochs", "5", "--resume"])     # epoch 4 trains on the restored clusters, K-means again at 5
    assert kmeans_lines(capsys.readouterr().out) == ["epoch 5"]


def test_presets_resolve_override_and_reach_the_checkpoint(tmp_path):
    for name, preset in ccl.PRESETS.items():
        args = common.parse_args(ccl.build_parser(), ccl.PRESETS, ["--preset", name])   # unknown keys raise
        assert all(getattr(args, k) == v for k, v in preset.items())
        args = common.parse_args(ccl.build_parser(), ccl.PRESETS, ["--preset", name, "--epochs", "3"])
        assert args.epochs == 3 and args.sources["epochs"] == "command line"
    ccl.main(["--preset", "quick", "--dataset", "digits", "--epochs", "2", "--cluster-start", "1",
              "--out", str(tmp_path)] + TINY)
    config = torch.load(os.path.join(tmp_path, "checkpoint.pt"), weights_only=False)["config"]
    assert config["cluster_every"] == ccl.QUICK["cluster_every"] and config["clusters"] == 3
    assert config["sources"]["cluster_every"] == "preset quick" and config["sources"]["dataset"] == "command line"


@pytest.mark.parametrize("flags, message", [
    (["--cluster-start", "5", "--epochs", "5"], "no joint stage"),
    (["--clusters", "1"], "at least 2"),
    (["--lam", "1.5"], "--lam"),
    (["--score-k", "1"], "--score-k"),
])
def test_bad_input_fails_with_one_line(flags, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        ccl.main(flags + ["--out", str(tmp_path)])


# ---------------------------------------------------------------- end to end

def test_digits_end_to_end_far_above_chance(tmp_path):
    # 16 x 16 keeps everything of the 8 x 8 digits and costs a quarter of 32 x 32
    results = ccl.main(["--size", "16", "--subset", "320", "--out", str(tmp_path)])   # else the defaults
    saved = json.load(open(os.path.join(tmp_path, "results.json")))
    assert saved["metrics"] == results["metrics"] and saved["method"] == "ccl"
    # chance is 50; on 320 images and 20 epochs the AUROC moves between ~64 and ~88 with the data order (seeds)
    for score in ("score_cos", "score_var"):
        assert all(m["auroc"] > 60 for m in results["metrics"][score].values())
