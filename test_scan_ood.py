"""Tests of scan_ood.py: each loss against a literal per-sample loop, neighbour mining against brute force,
self-labelling's mask and weights, weight averaging, scoring, presets, and a short
end-to-end digits run."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import scan_ood


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
    with pytest.raises(SystemExit, match="num-neighbors"):
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
    knn = scan_ood.make_scorer("knn", train_h, train_logits, 1)(test_h, test_logits)
    knn3 = scan_ood.make_scorer("knn", train_h, train_logits, 3)(test_h, test_logits)
    for i in range(9):
        s = sorted((cos(test_h[i], t).item() for t in train_h), reverse=True)
        assert abs(knn[i].item() - s[0]) < 1e-5 and abs(knn3[i].item() - s[2]) < 1e-5
    msp = scan_ood.make_scorer("msp", train_h, train_logits)(test_h, test_logits)
    assert torch.allclose(msp, torch.softmax(test_logits, 1).max(1).values)
    maha = scan_ood.make_scorer("mahalanobis", train_h, train_logits)(test_h, test_logits)
    y = train_logits.argmax(1).numpy()
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


# ---------------------------------------------------------------------------------------------- presets, end to end

def test_presets_resolve_and_flags_override():
    for name, preset in scan_ood.PRESETS.items():
        args = common.parse_args(scan_ood.build_parser(), scan_ood.PRESETS, ["--preset", name])
        assert all(getattr(args, k) == v for k, v in preset.items())
        assert all(args.sources[k] == f"preset {name}" for k in preset)
    args = common.parse_args(scan_ood.build_parser(), scan_ood.PRESETS, ["--preset", "paper", "--scan-epochs", "3"])
    assert args.scan_epochs == 3 and args.sources["scan_epochs"] == "command line" and args.epochs == 500


def test_digits_end_to_end_beats_chance_and_resume_loads_the_finished_stages(tmp_path):
    """--preset quick on digits with short stages: the preset's and the flags' values land in the checkpoints;
    --resume of the finished run loads every stage and gives the same results."""
    out = tmp_path / "run"
    argv = ["--preset", "quick", "--dataset", "digits", "--id-classes", "0-5", "--subset", "400", "--size", "16",
            "--width", "8", "--epochs", "6", "--batch-size", "128", "--scan-epochs", "5", "--scan-lr", "1e-3",
            "--scan-batch-size", "64", "--selflabel-epochs", "1", "--selflabel-batch-size", "128", "--heads", "2",
            "--num-neighbors", "10", "--out", str(out), "--data-root", str(tmp_path), "--no-baselines"]
    res = scan_ood.main(argv)
    (auroc,) = [m["auroc"] for m in res["metrics"]["scan_features"].values()]     # the one OOD set: digits 6-9
    assert auroc > 60, res["metrics"]
    assert res["cluster_accuracy"]["selflabel"] > 25, res["cluster_accuracy"]   # chance: ~17% (6 classes)
    settings = torch.load(out / "pretext.pt", weights_only=False)["run"]["settings"]
    assert settings["scan_epochs"] == 5 and settings["weight_decay"] == 1e-4 and settings["width"] == 8
    saved = json.load(open(out / "results.json"))
    assert saved["config"]["selflabel_batch_size"] == 128 and saved["metrics"] == res["metrics"]
    res2 = scan_ood.main(argv + ["--resume"])
    assert res2["metrics"] == res["metrics"] and res2["cluster_accuracy"] == res["cluster_accuracy"]


def test_pretrained_variant_on_a_random_weight_backbone(tmp_path):
    """The Sec. 3.2 path (DN2, fine-tuning on pseudo-labels, weight averaging) with a random ResNet-18: a path
    check only, no pretrained weights here. K-means labels keep it short."""
    res = scan_ood.main(["--subset", "96", "--size", "16", "--width", "4", "--epochs", "1", "--batch-size", "32",
                         "--labels", "kmeans", "--selflabel-epochs", "1", "--selflabel-batch-size", "32",
                         "--backbone", "resnet18", "--weights", "random", "--adapt-size", "16", "--adapt-epochs", "2",
                         "--adapt-batch-size", "32", "--out", str(tmp_path / "run"), "--data-root", str(tmp_path),
                         "--no-baselines"])
    assert set(res["metrics"]) == {"simclr_knn", "kmeans_features", "dn2", "pretrained"}
    assert res["main_variant"] == "pretrained"
    with pytest.raises(SystemExit, match="backbone"):
        scan_ood.main(["--weights", "random", "--out", str(tmp_path / "bad")])
