"""Tests of common.py against independent references: literal loops, scikit-learn, torchvision."""
import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps

import bench
import common

ERROR = (ValueError, OSError, FloatingPointError)   # what the building blocks and the harness raise


def args_for(tmp_path, *argv):
    return common.parse_args(argparse.ArgumentParser(parents=[common.arg_parser()]),
                             argv=["--out", str(tmp_path), "--data-root", str(tmp_path / "data"), *argv])


# ---------------------------------------------------------------------------------------------- data

def test_digits_split_is_deterministic_disjoint_and_32px():
    xtr, ytr, classes = common.load_dataset("digits", train=True)
    xte, yte, _ = common.load_dataset("digits", train=False)
    assert xtr.dtype == torch.uint8 and xtr.shape[1:] == (3, 32, 32) and ytr.dtype == torch.int64
    assert len(xtr) + len(xte) == 1797 and len(xtr) == int(0.8 * 1797) and classes == [str(i) for i in range(10)]
    assert torch.equal(xtr, common.load_dataset("digits", train=True)[0])
    assert torch.equal(xtr[:, 0], xtr[:, 2]) and xtr.max() > 200          # grey digits, full range
    flat = lambda x: {bytes(v) for v in x.reshape(len(x), -1).numpy()}
    assert len(flat(xtr) & flat(xte)) < 5                                   # (a few identical digits exist)


def test_parse_and_select_classes():
    assert common.parse_classes("0-2,4-5") == [0, 1, 2, 4, 5] and common.parse_classes("3") == [3]
    assert common.format_classes([0, 1, 2, 4, 5, 7]) == "0-2,4-5,7"
    x, y = torch.arange(10)[:, None], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    xs, ys = common.select_classes(x, y, [1, 3])
    assert ys.tolist() == [1, 3, 1, 3] and xs[:, 0].tolist() == [1, 3, 6, 8]
    for bad in ("a-b", "5-2", "", "1,,2", "-3"):
        with pytest.raises(ERROR, match="--id-classes .*expected class ids"):
            common.parse_classes(bad)


def test_load_data_default_split_and_errors(tmp_path):
    data = common.load_data(args_for(tmp_path))
    assert set(data.train_y.tolist()) == set(range(6)) and set(data.test_y.tolist()) == set(range(6))
    (name, ood), = data.ood.items()
    xte, yte, _ = common.load_dataset("digits", train=False)
    assert len(ood) == int((yte >= 6).sum()) and name == "classes 6-9"
    assert torch.equal(data.ood_y[name], yte[yte >= 6])
    both = common.evaluate(lambda x: {"a": x.float().mean((1, 2, 3)), "b": -x.float().mean((1, 2, 3))},
                           data.test_x, data.ood)
    assert both["a"][name]["auroc"] == pytest.approx(100 - both["b"][name]["auroc"])
    assert len(common.load_data(args_for(tmp_path, "--subset", "100")).train_x) == 100
    with pytest.raises(ERROR, match="--id-classes 0-12: expected classes of digits: 0-9"):
        common.load_data(args_for(tmp_path, "--id-classes", "0-12"))
    with pytest.raises(ERROR, match="no OOD set"):
        common.load_data(args_for(tmp_path, "--id-classes", "0-9"))
    with pytest.raises(ERROR, match="unknown data set 'mnist'"):
        common.load_dataset("mnist")
    with pytest.raises(ERROR, match="data folder not found"):
        common.load_dataset(f"folder:{tmp_path}/nowhere")
    with pytest.raises(ERROR, match="npy file not found"):
        common.load_dataset(f"npy:{tmp_path}/nowhere.npy")


def _write_images(folder, n, size, seed):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(f"{folder}/{i}.png")


def test_folder_loader_splits_resizes_caches_and_names_bad_images(tmp_path):
    root = tmp_path / "set"
    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "ant"):
            _write_images(root / split / c, n, 40, seed=n)
    cache = str(tmp_path / "cache")
    x, y, classes = common.load_dataset(f"folder:{root}", train=True, root=cache)
    assert classes == ["ant", "cat"] and x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(common.load_dataset(f"folder:{root}", train=False, root=cache)[0]) == 4
    expected = common.resize_uint8(TF.pil_to_tensor(Image.open(root / "train" / "ant" / "0.png"))[None], 32)[0]
    assert torch.equal(x[0], expected)
    assert len(os.listdir(tmp_path / "cache" / "cache")) == 2                # one decoded tensor per split
    assert torch.equal(common.load_dataset(f"folder:{root}", train=True, root=cache)[0], x)   # from the cache
    os.remove(root / "train" / "ant" / "0.png")                             # a changed folder is decoded again
    assert torch.equal(common.load_dataset(f"folder:{root}", train=True, root=cache)[0], x[1:])
    _write_images(root / "train" / "bee", 1, 40, seed=9)                   # a new class too
    x2, y2, classes2 = common.load_dataset(f"folder:{root}", train=True, root=cache)
    assert classes2 == ["ant", "bee", "cat"] and y2.tolist() == [0, 0, 1, 2, 2, 2]
    for f in os.listdir(tmp_path / "cache" / "cache"):                      # a corrupt cache is rebuilt
        (tmp_path / "cache" / "cache" / f).write_bytes(b"garbage")
    assert torch.equal(common.load_dataset(f"folder:{root}", train=True, root=cache)[0], x2)
    flat = tmp_path / "flat"                                                # no class folders: unlabeled
    _write_images(flat, 3, 32, seed=0)
    (flat / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ERROR, match="image will not decode: .*broken.jpg"):
        common.load_dataset(f"folder:{flat}", root=cache)
    os.remove(flat / "broken.jpg")
    x, y, _ = common.load_dataset(f"folder:{flat}", root=cache)
    assert len(x) == 3 and (y == -1).all()
    with pytest.raises(ERROR, match="has no train/ and test/ subfolders"):   # as the in-distribution set
        common.load_dataset(f"folder:{flat}", root=cache, need_split=True)


def test_npy_resized_and_interp(tmp_path):
    a = np.random.RandomState(0).randint(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "oe.npy", a)
    x, y, _ = common.load_dataset(f"npy:{tmp_path}/oe.npy")
    assert x.shape == (5, 3, 32, 32) and (y == -1).all()
    np.save(tmp_path / "bad.npy", a.astype(np.float32))
    with pytest.raises(ERROR, match="expected a uint8"):
        common.load_dataset(f"npy:{tmp_path}/bad.npy")
    np.save(tmp_path / "empty.npy", a[:0])
    np.save(tmp_path / "objects.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    (tmp_path / "bytes.npy").write_bytes(os.urandom(256))
    for name, message in (("empty", "N >= 1"), ("objects", "not a readable .npy"), ("bytes", "not a readable .npy")):
        with pytest.raises(ERROR, match=f"{name}.npy.*{message}"):
            common.load_dataset(f"npy:{tmp_path}/{name}.npy")
    x, _, _ = common.load_dataset("interp:digits")
    test, _, _ = common.load_dataset("digits", train=False)
    assert len(x) == len(test) - 100
    assert torch.equal(x[7], ((test[107].float() + test[7].float()) / 2).round().to(torch.uint8))


# ---------------------------------------------------------------------------------------------- augmentation

def test_simclr_augment_shapes_ranges_and_per_sample_parameters():
    x = common.load_dataset("digits")[0][:64]
    aug = common.SimCLRAugment(32, blur=True)
    out = aug(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    again = aug(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)                                          # reproducible from the generator
    same = aug(x[:1].expand(8, -1, -1, -1), generator=torch.Generator().manual_seed(1))
    assert (same - same[:1]).abs().amax((1, 2, 3)).gt(1e-3).sum() >= 6      # one image, eight different views
    shared = aug(x[:1].expand(8, -1, -1, -1), generator=torch.Generator().manual_seed(1), same_for_batch=True)
    assert torch.allclose(shared, shared[:1].expand_as(shared))             # CSI's test-time mode
    assert common.SimCLRAugment(48)(x[:2]).shape == (2, 3, 48, 48)


def test_crop_is_identity_at_full_scale_and_flip_mirrors():
    x = torch.rand(4, 3, 32, 32)
    aug = common.SimCLRAugment(32, scale=(1.0, 1.0), jitter=0, p_gray=0, flip=False)
    assert torch.allclose(aug(x), x, atol=1e-5)
    ones = torch.ones(4, 10)
    flipped = common.SimCLRAugment(32).crop_flip(x, ones, 0.5 * ones, 0.5 * torch.ones(4, 2), torch.zeros(4))
    assert torch.allclose(flipped, x.flip(3), atol=1e-5)


def test_crop_box_lands_on_the_requested_pixels():
    x = torch.rand(2, 3, 32, 32)
    aug = common.SimCLRAugment(16, scale=(0.25, 0.25), flip=False)   # area 1/4, ratio 1: a 16 x 16 box
    half = 0.5 * torch.ones(2, 10)
    corner = aug.crop_flip(x, half, half, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.ones(2))
    assert torch.allclose(corner[0], x[0, :, :16, :16], atol=1e-5)   # top-left quadrant
    assert torch.allclose(corner[1], x[1, :, 16:, 16:], atol=1e-5)   # bottom-right quadrant


def test_color_jitter_matches_torchvision_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    b, c, s = (0.6 + 0.8 * torch.rand(6, generator=g) for _ in range(3))
    h = 0.2 * torch.rand(6, generator=g) - 0.1
    ours = common.color_jitter(x, b, c, s, h)
    for i in range(6):
        ref = TF.adjust_brightness(x[i], b[i].item())
        ref = TF.adjust_contrast(ref, c[i].item())
        ref = TF.adjust_saturation(ref, s[i].item())
        ref = TF.adjust_hue(ref, h[i].item())
        assert torch.allclose(ours[i], ref, atol=1e-4), i
    assert torch.allclose(common.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6)


def test_rotate90_per_sample():
    x = torch.rand(8, 3, 5, 5)
    k = torch.arange(8) % 4
    out = common.rotate90(x, k)
    for i in range(8):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), (1, 2)))
    assert torch.equal(common.rotate90(x, 2), torch.rot90(x, 2, (2, 3)))


# ---------------------------------------------------------------------------------------------- backbones

def test_encoder_shapes_and_standard_parameter_count():
    x = torch.rand(2, 3, 32, 32)
    for arch, dim in (("resnet18", 64), ("resnet34", 64), ("resnet50", 256)):
        h, z = common.Encoder(arch, proj_dim=16, width=8)(x)
        assert h.shape == (2, dim) and z.shape == (2, 16)
    net, dim = common.build_backbone("resnet18", 64)
    assert dim == 512 and sum(p.numel() for p in net.parameters()) == 11_168_832   # CIFAR ResNet-18 without fc
    h, z = common.Encoder("imagenet_resnet18", bn_in_head=True)(torch.rand(2, 3, 64, 64))
    assert h.shape == (2, 512) and z.shape == (2, 128)
    with pytest.raises(ERROR, match="unknown arch"):
        common.build_backbone("vgg11")


def test_load_weights_strips_prefixes_and_names_mismatches():
    a, b = common.Encoder(width=4), common.Encoder(width=4)
    common.load_weights(b, {"model": {"module." + k: v for k, v in a.state_dict().items()}})
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    bad = dict(a.state_dict())
    bad.pop("head.0.weight")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ERROR, match=r"missing \['head.0.weight'\], unexpected \['extra.weight'\]"):
        common.load_weights(b, bad)


# ---------------------------------------------------------------------------------------------- losses

def literal_nt_xent(z, tau):
    """SimCLR Eq. 1, one anchor at a time."""
    z = z / z.norm(dim=1, keepdim=True)
    n2 = len(z)
    total = 0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(torch.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(z[i] @ z[j] / tau) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_literal_values_and_gradients(tau):
    z = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    ours, ref = common.nt_xent(z, tau), literal_nt_xent(z, tau)
    assert torch.allclose(ours.double(), ref, atol=1e-5)
    g1, = torch.autograd.grad(ours, z)
    g2, = torch.autograd.grad(ref, z)
    assert torch.allclose(g1.double(), g2, atol=1e-5)


def test_nt_xent_stable_in_bf16():
    assert torch.isfinite(common.nt_xent((100 * torch.randn(64, 16)).bfloat16(), 0.05))


# ---------------------------------------------------------------------------------------------- training

def test_lr_schedule_warmup_then_cosine():
    lrs = [common.lr_at(s, 100, 1.0, warmup=10, final=0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.505) and lrs[-1] > 0.01
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


class CountingStep:
    """A SimCLR step with per-run state (how many steps it made), to check that train saves and restores it."""

    def __init__(self, kill_at=None):
        self.aug, self.steps, self.kill_at = common.SimCLRAugment(32), torch.zeros((), dtype=torch.long), kill_at

    def __call__(self, net, xb, idx, epoch):
        self.steps += 1
        return common.simclr_step(net, xb, self.aug, 0.5)

    def update(self, model, epoch):
        if epoch == self.kill_at:
            raise KeyboardInterrupt

    def state_dict(self):
        return {"steps": self.steps.clone()}

    def load_state_dict(self, d):
        self.steps = d["steps"].clone()


def tiny_run(tmp_path, resume=False, width=2, step=None, script="test"):
    torch.manual_seed(0)
    model = common.Encoder(width=width, proj_dim=8)
    x = common.load_dataset("digits")[0][:32]
    cfg = common.TrainConfig(epochs=3, batch_size=16, lr=0.1, save_every=1, checkpoint=str(tmp_path / "ckpt.pt"),
                             resume=resume, run={"script": script, "settings": {"width": width}})
    os.makedirs(tmp_path, exist_ok=True)
    step = step or CountingStep()
    return common.train(model, step, x, cfg), step


def test_killed_and_resumed_run_ends_with_the_same_weights_and_step_state(tmp_path):
    full, full_step = tiny_run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path / "b", step=CountingStep(kill_at=2))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["epoch"] == 2
    resumed, resumed_step = tiny_run(tmp_path / "b", resume=True)
    for (k, v), w in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k
    assert int(resumed_step.steps) == int(full_step.steps) == 6
    with pytest.raises(ERROR, match="trained with other settings: --width 2 -> 4"):
        tiny_run(tmp_path / "b", resume=True, width=4)
    with pytest.raises(ERROR, match="was made by test.py, not other.py"):
        tiny_run(tmp_path / "b", resume=True, script="other")
    for bad in (b"", b"\x00garbage", b"PK\x03\x04truncated"):
        (tmp_path / "b" / "ckpt.pt").write_bytes(bad)
        with pytest.raises(ERROR, match="ckpt.pt is not a readable checkpoint"):
            tiny_run(tmp_path / "b", resume=True)


def test_nan_guard_stops_with_a_clear_message(tmp_path):
    cfg = common.TrainConfig(epochs=1, batch_size=8, lr=0.1, checkpoint=str(tmp_path / "c.pt"))
    x = torch.zeros(16, 2)
    with pytest.raises(ERROR, match="training diverged in epoch 1 .* no checkpoint was written yet"):
        common.train(nn.Linear(2, 1), lambda net, xb, idx, ep: net(xb.float()).sum() * float("nan"), x, cfg)


def test_a_diverged_buffer_never_replaces_the_last_good_checkpoint(tmp_path):
    """An inf BatchNorm running_var with a finite loss (the --lr 1e6 case): the run stops, the checkpoint of the
    last good epoch survives byte for byte."""
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    cfg = common.TrainConfig(epochs=2, batch_size=8, lr=0.01, save_every=1, checkpoint=str(tmp_path / "c.pt"))
    x = torch.randn(16, 2)
    common.train(model, lambda net, xb, idx, ep: net(xb).pow(2).mean(), x, cfg)
    good = (tmp_path / "c.pt").read_bytes()

    def poison(net, xb, idx, epoch):
        model[1].running_var.fill_(float("inf"))
        return net(xb).pow(2).mean().nan_to_num(0.0)
    cfg = dataclasses.replace(cfg, epochs=3, resume=True)
    with pytest.raises(ERROR, match="training diverged in epoch 3 .*the last good checkpoint is .*c.pt"):
        common.train(model, poison, x, cfg)
    assert (tmp_path / "c.pt").read_bytes() == good


def test_presets_apply_beneath_explicit_flags():
    parser = argparse.ArgumentParser(parents=[common.arg_parser()])
    presets = {"paper": {"epochs": 1000, "width": 64, "lr": 0.3}}
    args = common.parse_args(parser, presets, ["--preset", "paper", "--lr", "0.5"])
    assert (args.epochs, args.width, args.lr) == (1000, 64, 0.5)
    assert args.sources["epochs"] == "preset paper" and args.sources["lr"] == "command line"
    assert args.sources["seed"] == "default"
    with pytest.raises(ERROR, match="--preset nope: expected one of paper"):
        common.parse_args(argparse.ArgumentParser(parents=[common.arg_parser()]), presets, ["--preset", "nope"])


# ---------------------------------------------------------------------------------------------- K-means, kNN

@pytest.mark.parametrize("k", [3, 10])
def test_kmeans_inertia_within_one_percent_of_sklearn(k):
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs
    x, _ = make_blobs(2000, n_features=16, centers=8, cluster_std=3.0, random_state=0)
    x = torch.tensor(x, dtype=torch.float32)
    centers, assign = common.kmeans(x, k, n_init=3, seed=0)
    ours = ((x - centers[assign]) ** 2).sum()
    ref = KMeans(k, n_init=3, random_state=0).fit(x.numpy()).inertia_
    assert ours <= ref * 1.01
    assert torch.equal(assign, torch.cdist(x, centers).argmin(1))          # each point at its nearest centre
    assert torch.allclose(centers[2], x[assign == 2].mean(0), atol=1e-4)    # each centre the mean of its points


def test_kmeans_cosine_and_errors():
    x = torch.randn(300, 8)
    centers, assign = common.kmeans(x, 4, metric="cosine")
    assert torch.allclose(centers.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.equal(assign, (torch.nn.functional.normalize(x, dim=1) @ centers.T).argmax(1))
    with pytest.raises(ERROR, match="k=400 needs at least k points"):
        common.kmeans(x, 400)
    with pytest.raises(ERROR, match="non-finite features: the model has diverged"):
        common.kmeans(x * float("inf"), 4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_matches_brute_force_in_small_chunks(metric, monkeypatch):
    from sklearn.neighbors import NearestNeighbors
    g = torch.Generator().manual_seed(0)
    ref, query = torch.randn(500, 12, generator=g), torch.randn(77, 12, generator=g)
    monkeypatch.setattr(common, "chunk_rows", lambda n_cols, budget=0: 10)   # force many chunks
    vals, idx = common.knn(query, ref, k=5, metric=metric)
    dist, nn_idx = NearestNeighbors(n_neighbors=5, algorithm="brute", metric=metric).fit(ref).kneighbors(query)
    assert np.array_equal(idx.numpy(), nn_idx)
    expected = 1 - dist if metric == "cosine" else -dist
    assert np.allclose(vals.numpy(), expected, atol=1e-4)
    assert torch.allclose(common.knn_scores(ref, query, k=5, metric=metric), vals[:, -1])


# ---------------------------------------------------------------------------------------------- Gaussians

def test_gaussians_and_mahalanobis_match_numpy():
    rng = np.random.RandomState(0)
    C, d, ridge = 3, 4, 0.01
    feats = rng.randn(60, d) * rng.rand(d) + rng.randn(d)
    labels = np.repeat(np.arange(C), 20)
    query = rng.randn(7, d)
    means, chol = common.fit_gaussians(torch.tensor(feats).float(), torch.tensor(labels), C, ridge)
    dist = common.mahalanobis(torch.tensor(query), means, chol)
    for c in range(C):
        fc = feats[labels == c].astype(np.float32).astype(np.float64)
        cov = np.cov(fc, rowvar=False)
        cov += ridge * np.trace(cov) / d * np.eye(d)
        np.testing.assert_allclose(means[c].numpy(), fc.mean(0), rtol=1e-6)
        np.testing.assert_allclose((chol[c] @ chol[c].T).numpy(), cov, rtol=1e-6, atol=1e-9)
        precision = np.linalg.inv(cov)
        for i in range(len(query)):
            diff = query[i] - fc.mean(0)
            assert dist[i, c].item() == pytest.approx(diff @ precision @ diff, rel=1e-6)


def test_mahalanobis_matches_scikit_learn():
    from sklearn.covariance import EmpiricalCovariance
    rng = np.random.RandomState(1)
    feats = rng.randn(200, 5) @ rng.randn(5, 5)
    est = EmpiricalCovariance().fit(feats)                                          # ML covariance (n, not n - 1)
    means, chol = common.fit_gaussians(torch.tensor(feats), torch.zeros(200, dtype=torch.long), 1, ridge=0.0)
    query = rng.randn(9, 5)
    ours = common.mahalanobis(torch.tensor(query), means, chol)[:, 0].numpy()
    np.testing.assert_allclose(ours * 200 / 199, est.mahalanobis(query), rtol=1e-6)


def test_fit_gaussians_refuses_a_class_with_one_image():
    with pytest.raises(ERROR, match="class 1"):
        common.fit_gaussians(torch.randn(5, 3), torch.tensor([0, 0, 1, 2, 2]), 3)


# ---------------------------------------------------------------------------------------------- metrics

def literal_metrics(s_id, s_ood):
    s_id, s_ood = np.asarray(s_id, float), np.asarray(s_ood, float)
    auroc = np.mean([(a > b) + 0.5 * (a == b) for a in s_id for b in s_ood])
    thr = sorted(set(s_id) | set(s_ood), reverse=True)
    fpr95 = next(np.mean(s_ood >= t) for t in thr if np.mean(s_id >= t) >= 0.95)

    def ap(pos, neg):  # average precision: mean precision at each positive, ties counted together
        return np.mean([(np.sum(pos >= p)) / (np.sum(pos >= p) + np.sum(neg >= p)) for p in pos])
    return {"auroc": 100 * auroc, "fpr95": 100 * fpr95, "aupr_in": 100 * ap(s_id, s_ood), "aupr_out": 100 * ap(-s_ood, -s_id)}


def test_ood_metrics_conventions():
    rng = np.random.RandomState(0)
    s_id, s_ood = rng.randn(200) + 1, rng.randn(150)
    ours, ref = common.ood_metrics(torch.tensor(s_id), s_ood), literal_metrics(s_id, s_ood)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
    perfect = common.ood_metrics([5, 6, 7], [1, 2])
    assert perfect == {"auroc": 100.0, "fpr95": 0.0, "aupr_in": 100.0, "aupr_out": 100.0}
    swapped = common.ood_metrics([1, 2], [5, 6, 7])
    assert swapped["auroc"] == 0.0 and swapped["fpr95"] == 100.0


def test_cluster_accuracy_hungarian():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    assert common.cluster_accuracy(np.array([5, 5, 3, 3, 9, 9, 9]), labels) == 100.0   # any renaming
    assert common.cluster_accuracy(np.array([1, 1, 1, 0, 2, 2, 0]), labels) == pytest.approx(100 * 5 / 7)


def test_threshold_accepts_the_asked_share_of_id_scores_as_fpr95_does():
    torch.manual_seed(0)
    s_id, s_ood = torch.randn(200), torch.randn(300) - 1
    for tpr in (0.95, 0.9, 0.5, 1.0):
        t = common.threshold_at(s_id, tpr)
        assert (s_id >= t).float().mean() >= tpr and (s_id > t).float().mean() < tpr    # the highest such t
    t = common.threshold_at(s_id, 0.95)
    assert 100 * (s_ood >= t).float().mean().item() == pytest.approx(common.ood_metrics(s_id, s_ood)["fpr95"])
    assert common.threshold_at(torch.arange(100.0), 0.95) == 5.0                  # 95 of 100 accepted, not 96


# ---------------------------------------------------------------------------------------------- reporting

def test_print_and_save_results(tmp_path, capsys):
    res = {"a": common.ood_metrics([3, 4], [1, 2]), "b": common.ood_metrics([3, 4], [1, 5])}
    common.print_results(res, "title")
    out = capsys.readouterr().out
    assert "title" in out and "mean" in out and "100.00" in out
    common.save_results(str(tmp_path / "r.json"), {"metrics": res})
    import json
    assert json.load(open(tmp_path / "r.json"))["metrics"]["a"]["auroc"] == 100.0


def test_import_is_light():
    """Importing common must not run anything or pull in scikit-learn (it costs seconds)."""
    code = "import sys, common; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------------------------------- torchrun / DDP (gloo, 2 CPU processes)

def _one_step(ckpt):
    """One SGD step of a BatchNorm-free model on a global batch of 16 (two views: the image and its mirror)."""
    cfg = common.TrainConfig(epochs=1, batch_size=16, lr=0.5, amp="off", save_every=1, checkpoint=ckpt)
    common.seed_everything(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    x = torch.randint(0, 256, (16, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    two_views = lambda net, xb, idx, ep: common.nt_xent(net(common.to_float(torch.cat([xb, xb.flip(3)]))), 0.5)
    common.train(model, two_views, x, cfg)
    return model[1].weight.detach()


def _ddp_worker(rank, world, tmp):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = {}
    # (a) NT-Xent over the gathered views of both ranks, this rank's half of the global batch
    z = torch.randn(2, 2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # rank, view, n, d
    z_local = torch.cat([z[rank, 0], z[rank, 1]]).requires_grad_()
    loss = common.nt_xent(z_local, 0.5)
    loss.backward()
    out["loss"], out["grad"] = loss.detach(), z_local.grad
    # (b) one training step under DDP, 8 images per rank
    out["weights"] = _one_step(f"{tmp}/ckpt.pt")
    # (c) K-means: rank 1 asks for another seed, yet both ranks end with rank 0's clustering
    out["centers"] = common.kmeans(torch.randn(200, 4, generator=torch.Generator().manual_seed(2)), 5, seed=rank)[0]
    torch.save(out, f"{tmp}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_torchrun_path_equals_one_process_with_the_global_batch(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    z = torch.randn(2, 2, 3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z_full = torch.cat([z[0, 0], z[1, 0], z[0, 1], z[1, 1]]).requires_grad_()   # view 1 of both ranks, then view 2
    loss = common.nt_xent(z_full, 0.5)
    grad, = torch.autograd.grad(loss, z_full)
    assert torch.allclose(r0["loss"], loss) and torch.allclose(r1["loss"], loss)
    for r, res in enumerate((r0, r1)):   # each rank's gradient is the sum over both ranks' identical losses
        rows = torch.tensor([r * 3 + i for i in range(3)] + [6 + r * 3 + i for i in range(3)])
        assert torch.allclose(res["grad"] / 2, grad[rows])
    single = _one_step(str(tmp_path / "single.pt"))
    assert torch.allclose(r0["weights"], single, atol=1e-6) and torch.equal(r0["weights"], r1["weights"])
    assert torch.equal(r0["centers"], r1["centers"])


# ---------------------------------------------------------------------------------------------- K-means seeding

def test_kmeans_seeding_fails_no_more_often_than_sklearn():
    """10 Gaussian blobs (centres randn * 3, points centre + randn * 2; 2,000 x 64 here for speed), k = 10, 30 seeds:
    a seed fails when its inertia ends more than 1% above the best of both. k-means++ with scikit-learn's 2 + ln k
    candidates fails in about 40% of such seeds; ours draws twice as many."""
    from sklearn.cluster import KMeans
    ours, ref = [], []
    for s in range(30):
        g = torch.Generator().manual_seed(s)
        x = (torch.randn(10, 64, generator=g) * 3).repeat_interleave(200, 0) + torch.randn(2000, 64, generator=g) * 2
        c, assign = common.kmeans(x, 10, seed=s)
        ours.append(float(((x - c[assign]) ** 2).sum()))
        ref.append(KMeans(10, n_init=1, random_state=s).fit(x.numpy()).inertia_)
    best = np.minimum(ours, ref)
    fails_ours, fails_ref = (np.array(ours) > 1.01 * best).sum(), (np.array(ref) > 1.01 * best).sum()
    assert fails_ours <= fails_ref, (fails_ours, fails_ref)


# ---------------------------------------------------------------------------------------------- float32 losses, host syncs

def test_nt_xent_runs_in_float32_under_bf16_autocast():
    z = torch.randn(32, 16, requires_grad=True)
    fn = lambda z: common.nt_xent(z, 0.1)
    ref = fn(z)
    g_ref, = torch.autograd.grad(ref, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(z)                                       # without the float32 guard z @ z.T would run in bf16
        from_bf16 = fn(z.bfloat16())                      # a bf16 input: the loss of its float32 value
    g, = torch.autograd.grad(out, z)
    assert out.dtype == torch.float32 and from_bf16.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(g, g_ref, atol=1e-5)
    assert torch.allclose(from_bf16, fn(z.bfloat16().float()), atol=1e-5)


def test_dispatch_counter_counts_host_syncs_and_launches():
    x, tolist = torch.randn(8, 3), torch.Tensor.tolist
    with bench.DispatchCounter() as c:
        x.sum().item()                                    # 1 sync
        x[x > 0]                                          # boolean-mask indexing: 1 sync
        torch.bincount(torch.tensor([1, 2]))              # a tensor from Python data (a copy on CUDA), bincount
        x.tolist(), x.numpy(), x.cpu()                    # device-to-host reads that dispatch nothing on a CPU
    assert c.syncs == 7 and c.launches >= 4, c.sync_ops
    x.cpu().numpy()
    assert torch.Tensor.tolist is tolist and c.syncs == 7                 # restored on exit, nothing counted after


def test_shared_hot_paths_make_no_host_sync():
    torch.manual_seed(0)
    net = common.Encoder(width=2, proj_dim=8)
    xb = common.load_dataset("digits")[0][:8]
    aug = common.SimCLRAugment(32, blur=True)
    with bench.DispatchCounter() as c:
        loss = common.simclr_step(net, xb, aug, 0.5)
        loss.backward()
        common.rotate90(common.to_float(xb), torch.arange(8) % 4)
    assert c.syncs == 0, c.sync_ops


def literal_torchlars_step(params, grads, bufs, lr, momentum, wd, trust_coef=0.001, eps=1e-8, scope="all"):
    """torchlars' LARS around torch.optim.SGD, written out one parameter at a time: weight decay hidden from SGD,
    each gradient (g + wd w) scaled by trust_coef ||w|| / (||g|| + wd ||w|| + eps), then SGD's momentum step.
    scope 'weights': solo-learn's form, 1-d parameters get plain SGD without weight decay."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if scope == "all" or p.ndim > 1:
            w_norm, g_norm = p.norm(), g.norm()
            adaptive = w_norm / (g_norm + wd * w_norm + eps) * trust_coef if w_norm > 0 and g_norm > 0 else 1.0
            d = (g + wd * p) * adaptive
        else:
            d = g
        bufs[i] = momentum * bufs[i] + d
        out.append(p - lr * bufs[i])
    return out


@pytest.mark.parametrize("scope", ["all", "weights"])
def test_lars_matches_torchlars_written_out_and_makes_its_buffers_once(scope):
    torch.manual_seed(0)
    w = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    ref = [p.detach().clone() for p in w]
    buf = [torch.zeros_like(p) for p in w]
    opt = common.LARS(w, lr=1.0, momentum=0.9, weight_decay=1e-2, eta=0.02, scope=scope)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in w]
        for p, g in zip(w, grads):
            p.grad = g.clone()
        opt.step()
        ref = literal_torchlars_step(ref, grads, buf, 1.0, 0.9, 1e-2, trust_coef=0.02, scope=scope)
        states = [opt.state[p]["momentum"] for p in w]
        assert all(s is opt.state[p]["momentum"] for s, p in zip(states, w))
    for p, r in zip(w, ref):
        assert torch.allclose(p.detach(), r, atol=1e-6)


def test_lars_scope_all_is_torchlars_on_a_network_in_one_step():
    """One step of CSI's optimiser (torchlars around SGD, lr 1.0, momentum 0.9, wd 1e-6) on a small Encoder: the
    same weights as the written-out update, BatchNorm weights and biases included; the solo-learn scope differs
    exactly there."""
    torch.manual_seed(0)
    net = common.Encoder(width=2, proj_dim=4, bn_in_head=True)
    loss = net(torch.rand(4, 3, 16, 16))[1].pow(2).sum()
    loss.backward()
    params = [p for p in net.parameters() if p.grad is not None]
    before, grads = [p.detach().clone() for p in params], [p.grad.clone() for p in params]
    common.LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-6).step()
    expected = literal_torchlars_step(before, grads, [torch.zeros_like(p) for p in params], 1.0, 0.9, 1e-6)
    assert all(torch.allclose(p, e, atol=1e-6) for p, e in zip(params, expected))
    solo = literal_torchlars_step(before, grads, [torch.zeros_like(p) for p in params], 1.0, 0.9, 1e-6, scope="weights")
    assert any(p.ndim == 1 and not torch.allclose(s, e) for p, s, e in zip(params, solo, expected))


# ---------------------------------------------------------------------------------------------- the run contract

def run_selfcheck(tmp_path, *argv):
    """common.py's own main, in this process: -> (exit message or None, the run folder's files and their bytes)."""
    import runpy
    out = tmp_path / "run"
    argv = ["common.py", "--out", str(out), "--data-root", str(tmp_path / "data"), "--subset", "64", "--size", "8",
            "--width", "2", "--batch-size", "32", "--no-baselines", *argv]
    old = sys.argv
    sys.argv, message = argv, None
    try:
        runpy.run_path(os.path.join(os.path.dirname(__file__), "common.py"), run_name="__main__")
    except SystemExit as e:
        message = str(e.code)
    finally:
        sys.argv = old
    files = folder_files(out) if out.exists() else {}
    return message, files


@pytest.mark.parametrize("argv, message", [
    (["--id-classes", "5-2"], "--id-classes '5-2': expected"),
    (["--id-classes", ""], "--id-classes '': expected"),
    (["--id-classes", "0-12"], "--id-classes 0-12: expected classes of digits: 0-9"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer >= 2"),
    (["--batch-size", "-4"], "--batch-size -4: expected"),
    (["--size", "0"], "--size 0: expected an integer >= 8"),
    (["--subset", "-5"], "--subset -5: expected an integer >= 0"),
    (["--epochs", "0"], "--epochs 0: expected an integer >= 1"),
    (["--epochs", "-2"], "--epochs -2: expected an integer >= 1"),
    (["--lr", "-0.1", "--optimizer", "lars"], "--lr -0.1: expected a finite number > 0"),
    (["--final-lr", "-1"], "--final-lr -1.0: expected a number in"),
    (["--save-every", "0"], "--save-every 0: expected an integer >= 1"),
    (["--dataset", "mnist"], "--dataset mnist: expected one of digits"),
    (["--dataset", "folder:/nowhere"], "--dataset folder:/nowhere: expected an existing folder"),
    (["--ood", "npy:/nowhere.npy"], "--ood npy:/nowhere.npy: expected an existing .npy file"),
    (["--resume", "--overwrite"], "--resume --overwrite: expected one of the two"),
    (["--preset", "nope"], "--preset nope: expected one of"),
    (["--device", "gpu7"], "--device gpu7: expected auto, cpu"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, argv, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("{}")              # a finished run that must stay untouched
    got, files = run_selfcheck(tmp_path, *argv)
    assert got is not None and got.startswith("error: ") and "\n" not in got and message in got, got
    assert files == {"results.json": b"{}"}


def test_a_used_run_folder_is_refused_locked_and_resumed_only_with_the_same_settings(tmp_path):
    assert run_selfcheck(tmp_path)[0] is None
    finished = folder_files(tmp_path / "run")
    message, files = run_selfcheck(tmp_path)
    assert "holds another run (checkpoint.pt, results.json, scorer.pt): add --resume to continue it, --overwrite" in message
    assert files == finished                                                              # refused: nothing changed
    assert run_selfcheck(tmp_path, "--resume", "--epochs", "2")[0] is None                 # a longer run: allowed
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert "has done 2 epochs, more than the 1 asked for now" in run_selfcheck(tmp_path, "--resume", "--epochs", "1")[0]
    message, after = run_selfcheck(tmp_path, "--resume", "--lr", "0.2", "--width", "4")
    assert "trained with other settings: --lr 0.1 -> 0.2; --width 2 -> 4" in message
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["script"] == "common" and run_json["settings"]["lr"] == 0.1
    (tmp_path / "run" / "run.json").write_text(json.dumps({**run_json, "script": "ccl"}))
    assert "was made by ccl.py, not common.py" in run_selfcheck(tmp_path, "--resume", "--epochs", "2")[0]
    (tmp_path / "run" / "lock").write_text(f"{os.getppid()}\n")                            # a live process
    assert "another run (process" in run_selfcheck(tmp_path, "--overwrite")[0]
    (tmp_path / "run" / "lock").write_text("999999999\n")                                   # a dead one
    (tmp_path / "run" / "checkpoint.pt.tmp999999999").write_bytes(b"half a checkpoint")      # of a dead process
    assert run_selfcheck(tmp_path, "--overwrite")[0] is None
    left = set(os.listdir(tmp_path / "run"))
    assert left == {"checkpoint.pt", "results.json", "run.json", "scorer.pt", "scores"}, left   # lock released, orphan gone
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["settings"]["lr"] == 0.1 and res["baselines"] == {} and "knn_h" in res["metrics"]


def test_a_read_only_run_folder_is_refused_before_training(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "run").mkdir()
    os.chmod(tmp_path / "run", 0o500)
    assert "not writable" in run_selfcheck(tmp_path)[0]


def test_finish_writes_the_baselines_under_their_fixed_names(tmp_path):
    args = args_for(tmp_path, "--size", "16", "--width", "2")
    args.run = {"script": "common", "settings": dict(vars(args))}
    data = common.load_data(args)
    model = common.build_model(args)
    train_h, train_z = common.embed(model, data.train_x)
    scorer = common.Scorer("common", vars(args), model, {"train_h": train_h, "train_z": train_z})
    res = common.finish(args, "test", scorer, data, torch.device("cpu"), 0.0)
    saved = json.load(open(tmp_path / "results.json"))
    assert set(saved["baselines"]) == {"pixels_knn", "random_init_knn"} and saved == json.loads(json.dumps(res))
    px = saved["baselines"]["pixels_knn"]["classes 6-9"]
    assert set(px) == {"auroc", "fpr95", "aupr_in", "aupr_out"} and px["auroc"] > 95   # digits: trivially separable


DEAD_PID = 999999999    # above every PID_MAX: no such process


def folder_files(folder):
    """{relative path: bytes} of every file under folder."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(folder) for f in fs}


def one_line_error(message, *parts):
    assert message is not None and message.startswith("error: ") and "\n" not in message, message
    assert all(p in message for p in parts), message


def test_overwrite_keeps_the_finished_run_until_the_new_one_has_written(tmp_path):
    """--overwrite moves the old run aside and brings it back, byte for byte, when the new run stops before writing a
    checkpoint (a check after setup, a kill); once the new run has written, the old one is gone."""
    assert run_selfcheck(tmp_path)[0] is None
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    del record["checkpoints"]                                       # as a run made before the list existed
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    finished = folder_files(tmp_path / "run")
    assert set(finished) == {"checkpoint.pt", "results.json", "run.json", "scorer.pt", os.path.join("scores", "id_test.csv"),
                             os.path.join("scores", "classes_6-9.csv")}
    message, _ = run_selfcheck(tmp_path, "--overwrite", "--batch-size", "100")           # refused after setup
    one_line_error(message, "--batch-size 100 is larger than the training set")
    assert folder_files(tmp_path / "run") == finished
    # a killed --overwrite (its lock's process gone, the old run aside, the new run.json written): back at the next start
    os.makedirs(tmp_path / "run" / common.REPLACED)
    for name in finished:
        if os.sep not in name:                                      # the run's files; its CSVs stay in scores/
            os.replace(tmp_path / "run" / name, tmp_path / "run" / common.REPLACED / name)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"script": "common", "settings": {"lr": 9}}))
    (tmp_path / "run" / "lock").write_text(f"{DEAD_PID} 1\n")
    one_line_error(run_selfcheck(tmp_path)[0], "holds another run (checkpoint.pt, results.json, scorer.pt)")
    assert folder_files(tmp_path / "run") == finished
    (tmp_path / "run" / "scores" / "old_set.csv").write_text("image\n")    # a CSV of the old run only
    assert run_selfcheck(tmp_path, "--overwrite", "--lr", "0.05")[0] is None               # the new run replaces it
    assert set(folder_files(tmp_path / "run")) == set(finished)                           # old CSVs gone with it
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["lr"] == 0.05


def test_only_the_runs_own_files_and_exact_temporary_files_are_ever_removed(tmp_path):
    """Temporary files go by write_atomic's exact pattern <file of ours>.tmp<pid>, and only a dead process's; a *.pt
    or results.json that these scripts did not write is never replaced or deleted, --overwrite or not."""
    run = tmp_path / "run"
    run.mkdir()
    users = {"notes.tmp.txt": b"notes", "draft.tmpl": b"x", "notes.txt.tmp1": b"y", "model.pt": b"weights",
             f"checkpoint.pt.tmp{os.getppid()}": b"a live writer's"}
    for name, data in users.items():
        (run / name).write_bytes(data)
    (run / "cache.tmp").mkdir()
    (run / common.REPLACED).mkdir()                                 # a folder of the user's with --overwrite's name
    (run / common.REPLACED / "mine.pt").write_bytes(b"kept")
    (run / f"checkpoint.pt.tmp{DEAD_PID}").write_bytes(b"half a checkpoint")
    (run / f"run.json.tmp{DEAD_PID}").write_text("{")
    torch.save({"model": {}}, run / "weights.pt")                   # a state dict of the user's: not a checkpoint
    for argv in ((), ("--overwrite",)):
        one_line_error(run_selfcheck(tmp_path, *argv)[0], "holds model.pt, weights.pt, not written by these scripts")
    left = folder_files(run)
    assert {k: left[k] for k in users} == users and os.path.isdir(run / "cache.tmp")
    assert not any(str(DEAD_PID) in name for name in left)
    os.replace(run / "model.pt", tmp_path / "model.pt")
    os.replace(run / "weights.pt", tmp_path / "weights.pt")
    (run / "results.json").write_text('{"accuracy": 0.9}')          # the user's own results
    one_line_error(run_selfcheck(tmp_path, "--overwrite")[0], "holds results.json, not written by these scripts")
    assert (run / "results.json").read_text() == '{"accuracy": 0.9}'
    os.remove(run / "results.json")
    assert run_selfcheck(tmp_path)[0] is None
    assert {k: folder_files(run)[k] for k in users if k != "model.pt"} == {k: v for k, v in users.items() if k != "model.pt"}
    assert run_selfcheck(tmp_path, "--overwrite")[0] is None
    assert (run / common.REPLACED / "mine.pt").read_bytes() == b"kept"


def test_a_full_disk_is_one_line_leaves_no_temporary_file_and_keeps_the_old_run(tmp_path, monkeypatch):
    assert run_selfcheck(tmp_path)[0] is None
    finished = folder_files(tmp_path / "run")
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith(".pt.tmp" + str(os.getpid())):
            open(f, "wb").write(b"the first bytes")                 # a partial file, as a full disk leaves
            raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed: No space left on device")
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    message, files = run_selfcheck(tmp_path, "--overwrite")
    one_line_error(message, "cannot write", "checkpoint.pt", "No space left on device")
    assert files == finished                                         # no temporary file, the old run back in place


@pytest.mark.parametrize("content", ["{}", "[]", "not json", "", '{"script": "common", "settings": [1]}'])
def test_a_malformed_run_json_on_resume_is_one_line(tmp_path, content):
    (tmp_path / "run").mkdir()
    torch.save({"model": {}, "epoch": 1, "run": {"script": "common", "settings": {}}}, tmp_path / "run" / "checkpoint.pt")
    (tmp_path / "run" / "run.json").write_text(content)
    one_line_error(run_selfcheck(tmp_path, "--resume")[0], "run.json is not", "--overwrite")
    assert (tmp_path / "run" / "run.json").read_text() == content


def test_resume_with_nothing_to_resume_is_one_line_and_makes_nothing(tmp_path):
    """The rule: --resume needs at least one checkpoint of the script in --out (run.json alone is not a run)."""
    one_line_error(run_selfcheck(tmp_path, "--resume")[0], "--resume: there is no run folder", "run")
    assert not (tmp_path / "run").exists()                         # a mistyped --out: nothing created
    assert run_selfcheck(tmp_path)[0] is None
    assert json.loads((tmp_path / "run" / "run.json").read_text())["checkpoints"] == ["checkpoint.pt"]
    os.replace(tmp_path / "run" / "checkpoint.pt", tmp_path / "checkpoint.pt")
    torch.save({"model": {}, "epoch": 1, "run": {"script": "common", "settings": {}}}, tmp_path / "run" / "simclr.pt")
    one_line_error(run_selfcheck(tmp_path, "--resume", "--epochs", "2")[0],    # an earlier stage's is not enough
                   "checkpoint.pt of the run in", "is gone (it was there when the run last stopped)")
    os.remove(tmp_path / "run" / "simclr.pt")
    kept = folder_files(tmp_path / "run")
    one_line_error(run_selfcheck(tmp_path, "--resume", "--epochs", "2")[0], "holds no checkpoint of common.py",
                   "nothing to resume")
    assert folder_files(tmp_path / "run") == kept
    os.remove(tmp_path / "run" / "results.json")
    os.remove(tmp_path / "run" / "scorer.pt")
    one_line_error(run_selfcheck(tmp_path, "--resume")[0], "holds no checkpoint of common.py (no run files)")
    torch.save({"model": {}, "epoch": 1, "run": {"script": "ccl", "settings": {}}}, tmp_path / "run" / "checkpoint.pt")
    one_line_error(run_selfcheck(tmp_path, "--resume")[0], "holds a run of ccl.py, not of common.py")


def test_a_lock_is_taken_over_from_a_dead_process_and_from_a_reused_pid(tmp_path):
    out = str(tmp_path / "run")
    run = {"script": "test", "settings": {}}
    os.makedirs(out)
    live = os.getppid()
    start = common._process_start(live)
    for text, taken in ((f"{DEAD_PID}\n", True), (f"{DEAD_PID} 5\n", True), ("garbage", True), ("", True),
                        (f"{live}\n", False), (f"{live} {start}\n", start is None or False)):
        (tmp_path / "run" / "lock").write_text(text)
        if taken:
            common.guard_run_folder(out, run, resume=False, overwrite=False)
            assert (tmp_path / "run" / "lock").read_text().split()[0] == str(os.getpid())
            common._release.pop(os.path.abspath(out))()
            assert not (tmp_path / "run" / "lock").exists()
        else:
            with pytest.raises(ERROR, match=f"another run \\(process {live}\\) is writing there"):
                common.guard_run_folder(out, run, resume=False, overwrite=False)
    os.remove(tmp_path / "run" / "lock")
    os.mkdir(tmp_path / "run" / "lock")                             # not a lock file: named, never removed
    with pytest.raises(ERROR, match="lock is not a lock file of these scripts: move it away"):
        common.guard_run_folder(out, run, resume=False, overwrite=False)
    assert os.path.isdir(tmp_path / "run" / "lock")
    os.rmdir(tmp_path / "run" / "lock")
    if start is not None:                                           # Linux: the start time tells a reused PID
        (tmp_path / "run" / "lock").write_text(f"{live} {int(start) + 1}\n")
        common.guard_run_folder(out, run, resume=False, overwrite=False)
        common._release.pop(os.path.abspath(out))()


def test_resume_refuses_training_images_that_changed(tmp_path):
    """The run records a fingerprint of its training images; an edit keeping each file's size and mtime is seen
    too (the folder cache's key reads the files' bytes)."""
    root = tmp_path / "set"
    for split in ("train", "test"):
        for c in ("0", "1"):
            _write_images(root / split / c, 8, 8, seed=len(split) + int(c))
    argv = ["--dataset", f"folder:{root}", "--id-classes", "0", "--batch-size", "4", "--subset", "0"]
    assert run_selfcheck(tmp_path, *argv)[0] is None
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert recorded["images"] == 8 and recorded["shape"] == [3, 8, 8]
    image = root / "train" / "0" / "3.png"
    st = os.stat(image)
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    if os.stat(image).st_size != st.st_size:                       # PNG sizes vary: pad the same edit to the size
        pytest.skip("the edit changed the file size")
    message, _ = run_selfcheck(tmp_path, *argv, "--resume", "--epochs", "2")
    one_line_error(message, "--resume: the training data", "changed", "the pixels of the 8 training images differ")
    os.remove(image)
    message, _ = run_selfcheck(tmp_path, *argv, "--resume", "--epochs", "2")
    one_line_error(message, "8 training images then, 7 now")


def test_the_folder_cache_on_a_read_only_data_root_and_its_orphans(tmp_path, monkeypatch, capsys):
    """A data root that cannot be written: a cache already there is read, a missing one is decoded without a
    traceback. A killed cache write's temporary file goes at the next load; a live writer's stays."""
    root = tmp_path / "set"
    _write_images(root / "a", 3, 16, seed=0)
    data = str(tmp_path / "data")
    x16 = common.load_dataset(f"folder:{root}", root=data, size=16)[0]
    cache = tmp_path / "data" / "cache"
    (cache / f"folder-0.pt.tmp{DEAD_PID}").write_bytes(b"half")
    (cache / f"folder-1.pt.tmp{os.getppid()}").write_bytes(b"being written")

    def read_only(*args, **kwargs):                                 # torch's words for an unwritable path
        raise RuntimeError("File data/cache/x.pt cannot be opened.")
    monkeypatch.setattr(torch, "save", read_only)
    before = sorted(os.listdir(cache))
    assert torch.equal(common.load_dataset(f"folder:{root}", root=data, size=16)[0], x16)        # from the cache
    x8 = common.load_dataset(f"folder:{root}", root=data, size=8)[0]                               # decoded
    assert x8.shape == (3, 3, 8, 8) and "without caching it" in capsys.readouterr().out
    assert sorted(os.listdir(cache)) == [n for n in before if str(DEAD_PID) not in n]
    if os.geteuid() != 0:                                          # a real read-only folder (root writes anyway)
        monkeypatch.undo()
        os.chmod(cache, 0o500)
        try:
            assert common.load_dataset(f"folder:{root}", root=data, size=12)[0].shape == (3, 3, 12, 12)
        finally:
            os.chmod(cache, 0o700)


def test_devices_this_machine_lacks_and_large_seeds_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for argv, words in ((["--device", "cuda"], "--device cuda: this machine has no CUDA GPU"),
                        (["--device", "cuda:1"], "--device cuda:1: this machine has no CUDA GPU"),
                        (["--device", "mps"], "--device mps: Apple's MPS is not available"),
                        (["--device", "meta"], "--device meta: expected auto, cpu, cuda"),
                        (["--seed", str(2 ** 32)], "--seed 4294967296: expected an integer in [0, 2^32 - 1]"),
                        (["--seed", "-1"], "--seed -1: expected")):
        message, files = run_selfcheck(tmp_path, *argv)
        one_line_error(message, words)
        assert files == {}                                          # before any work: no folder made
    assert common.get_device("auto") == torch.device("cpu")
    args = args_for(tmp_path, "--seed", str(2 ** 32 - 1))          # the largest seed runs
    common.seed_everything(args.seed + 1)


def test_compile_on_a_cpu_is_noted_in_one_line(tmp_path, capsys):
    args = args_for(tmp_path, "--compile", "--device", "cpu")
    common.setup(args, "test")
    common._release.pop(os.path.abspath(args.out))()
    notes = [line for line in capsys.readouterr().out.splitlines() if "--compile" in line and "note" in line]
    assert len(notes) == 1 and "slower" in notes[0]


def test_entry_point_stops_in_one_line_on_interrupts_and_a_closed_pipe(tmp_path):
    """Ctrl-C and SIGTERM: one line, exit status 130, the run folder released. Output into a reader that quits
    (`| head`): one `error:` line, no traceback, no second complaint from Python's exit."""
    import signal
    out = str(tmp_path / "run")

    @common.entry_point
    def main(interrupt):
        common.guard_run_folder(out, {"script": "test", "settings": {}}, resume=False, overwrite=False)
        interrupt()
    for interrupt in (lambda: (_ for _ in ()).throw(KeyboardInterrupt), lambda: os.kill(os.getpid(), signal.SIGTERM)):
        with pytest.raises(SystemExit) as e:
            main(interrupt)
        assert e.value.code == 130 and not os.path.exists(out)      # the folder it made, released and removed
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL      # the handler is the caller's again
    code = ("import common\n@common.entry_point\ndef main():\n    for i in range(10 ** 6):\n        print(i)\nmain()")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    p.stdout.readline()
    p.stdout.close()                                                # `| head -1`
    err = p.stderr.read().decode()
    assert p.wait() == 1 and err.strip().splitlines() == ["error: the output pipe was closed (its reader quit), so the "
                                                          "run stopped"], err


# ---------------------------------------------------------------------------------------------- the two halves

def test_building_blocks_use_nothing_of_the_harness_and_never_exit():
    """Above the HARNESS banner of common.py: no name defined below it is used, and nothing exits the process."""
    import ast
    src = open(os.path.join(os.path.dirname(__file__), "common.py")).read()
    cut = src.index("# HARNESS")
    tree = ast.parse(src)
    line = src[:cut].count("\n") + 1
    top = [n for n in tree.body if n.lineno < line]
    below = {t.id if isinstance(t, ast.Name) else None for n in tree.body if n.lineno > line
             for t in ([n] if isinstance(n, (ast.FunctionDef, ast.ClassDef)) else getattr(n, "targets", []))}
    below |= {n.name for n in tree.body if n.lineno > line and isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    used = {x.id for n in top for x in ast.walk(n) if isinstance(x, ast.Name)}
    assert not (used & below), sorted(used & below)
    calls = {(x.func.attr if isinstance(x.func, ast.Attribute) else getattr(x.func, "id", "")) for n in top
             for x in ast.walk(n) if isinstance(x, ast.Call)}
    assert not calls & {"exit", "_exit", "fail"}, calls & {"exit", "_exit", "fail"}
    assert not any(isinstance(x, ast.Name) and x.id == "SystemExit" for n in top for x in ast.walk(n))
    assert len(top) > 40 and len(below) > 30                  # both halves are there


# ---------------------------------------------------------------------------------------------- your own images

def _digits_folder(root, splits=("train", "test"), classes=range(10), flat=False, per_class=12):
    """Digits as PNG files: root/<split>/<class>/<i>.png (or root/<split>/<i>.png with flat), the first per_class
    images of each class of that split."""
    for split in splits:
        x, y, _ = common.load_dataset("digits", train=split == "train")
        for c in classes:
            folder = root / split if flat else root / split / str(c)
            os.makedirs(folder, exist_ok=True)
            for i, img in enumerate(x[y == c][:per_class]):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{c}_{i}.png")


def test_folder_classes_come_from_train_and_sort_as_numbers(tmp_path):
    _digits_folder(tmp_path / "set", per_class=2)
    os.rename(tmp_path / "set" / "train" / "9", tmp_path / "set" / "train" / "10")     # folders 0-8 and 10
    os.rename(tmp_path / "set" / "test" / "9", tmp_path / "set" / "test" / "10")
    x, y, classes, names = common.load_dataset(f"folder:{tmp_path / 'set'}", True, str(tmp_path), names=True)
    assert classes == ["0", "1", "2", "3", "4", "5", "6", "7", "8", "10"] and names[0] == os.path.join("0", "0_0.png")
    assert y.tolist() == [c for c in range(10) for _ in range(2)] and names[-1] == os.path.join("10", "9_1.png")
    import shutil
    shutil.rmtree(tmp_path / "set" / "test" / "2")                                    # test/ lacks a class:
    _, y_test, _ = common.load_dataset(f"folder:{tmp_path / 'set'}", False, str(tmp_path))
    assert 2 not in y_test.tolist() and y_test.max() == 9                              # the numbers stay train/'s
    _digits_folder(tmp_path / "more", splits=("test",), classes=[3], per_class=1)
    os.rename(tmp_path / "more" / "test" / "3", tmp_path / "set" / "test" / "cat")     # a class training lacks
    with pytest.raises(ValueError, match="class folders that the training folder lacks: cat"):
        common.load_dataset(f"folder:{tmp_path / 'set'}", False, str(tmp_path))


def selfcheck(tmp_path, *argv):
    """common.py's main in this process -> its results, or the text of its one error line."""
    try:
        return common.main(["--data-root", str(tmp_path / "data"), "--size", "8", "--width", "2",
                            "--batch-size", "16", "--no-baselines", *argv])
    except SystemExit as e:
        return str(e.code)


def test_a_run_scores_every_image_and_scores_new_images_later_from_its_folder_alone(tmp_path):
    _digits_folder(tmp_path / "ids", classes=range(6))
    _digits_folder(tmp_path / "unseen", splits=("test",), classes=range(6, 10), flat=True, per_class=5)
    os.rename(tmp_path / "unseen" / "test", tmp_path / "new")                        # a flat folder of new images
    out = tmp_path / "run"
    res = selfcheck(tmp_path, "--dataset", f"folder:{tmp_path / 'ids'}", "--id-classes", "0-3", "--out", str(out), "--epochs", "1",
                    "--tpr", "0.9")
    rows = list(csv.DictReader(open(out / "scores" / "id_test.csv")))
    assert [r["image"] for r in rows] == [os.path.join(str(c), f) for c in range(4)
                                          for f in sorted(f"{c}_{i}.png" for i in range(12))]   # files sort as text
    held_out = list(csv.DictReader(open(out / "scores" / "classes_4-5.csv")))
    assert len(held_out) == 24 and held_out[0]["image"] == os.path.join("4", "4_0.png")
    accepted = np.mean([r["ood_knn_h"] == "0" for r in rows])
    assert 0.9 <= accepted < 0.9 + 2 / len(rows) and set(res["thresholds"]) == {"knn_h", "knn_z"}
    before = {f: (out / f).read_bytes() for f in ("results.json", "checkpoint.pt", "scorer.pt")}
    os.rename(tmp_path / "ids", tmp_path / "moved")                                   # no training data any more
    sets = selfcheck(tmp_path, "--out", str(out), "--score", f"folder:{tmp_path / 'moved' / 'test'}",
                     f"folder:{tmp_path / 'new'}")
    assert before == {f: (out / f).read_bytes() for f in before}                     # nothing of the run changed
    again = list(csv.DictReader(open(out / "scored" / csv_name_of(tmp_path / "moved" / "test"))))
    id_rows = {r["image"]: r for r in again}
    assert all(abs(float(id_rows[r["image"]]["knn_h"]) - float(r["knn_h"])) < 1e-5 for r in rows)
    assert all(id_rows[r["image"]]["ood_knn_h"] == r["ood_knn_h"] for r in rows)
    new = list(csv.DictReader(open(out / "scored" / csv_name_of(tmp_path / "new"))))
    assert len(new) == len(sets[f"folder:{tmp_path / 'new'}"]["knn_h"]) == 20 and new[0]["image"] == "6_0.png"
    scorer = common.Scorer.load(str(out))                                             # from Python
    scores, is_ood = scorer(common.load_dataset(f"folder:{tmp_path / 'new'}", root=str(tmp_path))[0])
    assert torch.allclose(scores["knn_h"], torch.tensor([float(r["knn_h"]) for r in new]), atol=1e-6)
    assert is_ood["knn_h"].tolist() == [r["ood_knn_h"] == "1" for r in new]
    os.remove(out / "scorer.pt")
    assert "a run that is not finished yet (no scorer.pt): finish it with --resume" in selfcheck(
        tmp_path, "--out", str(out), "--score", "digits")
    assert "holds no finished run" in selfcheck(tmp_path, "--out", str(tmp_path / "nowhere"), "--score", "digits")
    assert "--tpr 0.5: expected no --tpr with --score" in selfcheck(tmp_path, "--out", str(out), "--score", "digits",
                                                                      "--tpr", "0.5")


def csv_name_of(path):
    return common.csv_name(f"folder:{path}")


def test_an_unlabeled_folder_trains_and_asks_for_an_ood_set_before_any_work(tmp_path):
    _digits_folder(tmp_path / "flat", classes=range(3), flat=True, per_class=10)
    message = selfcheck(tmp_path, "--dataset", f"folder:{tmp_path / 'flat'}", "--out", str(tmp_path / "r"))
    assert message.startswith("error: no OOD set: every image of folder:") and not (tmp_path / "r").exists()
    assert not (tmp_path / "data").exists()                                           # nothing decoded
    assert "--id-classes 0-1: expected nothing" in selfcheck(tmp_path, "--dataset", f"folder:{tmp_path / 'flat'}",
                                                             "--id-classes", "0-1", "--ood", "digits")
    res = selfcheck(tmp_path, "--dataset", f"folder:{tmp_path / 'flat'}", "--ood", "interp:digits",
                    "--out", str(tmp_path / "r"), "--epochs", "1")
    assert set(res["metrics"]["knn_h"]) == {"interp:digits"}
    assert len(list(open(tmp_path / "r" / "scores" / "interp_digits.csv"))) == 1 + 260


def test_ood_sets_of_in_distribution_images_are_refused_and_repeated_flags_add_up(tmp_path):
    assert "--ood digits: 211 of its 360 images are in-distribution images" in selfcheck(
        tmp_path, "--ood", "digits", "--out", str(tmp_path / "r"))
    args = args_for(tmp_path, "--ood", "interp:digits", "--ood", "digits", "cifar10")
    assert args.ood == ["interp:digits", "digits", "cifar10"]


def test_defaults_follow_the_data_and_help_shows_them(tmp_path, capsys):
    parser = lambda: argparse.ArgumentParser(parents=[common.arg_parser()])
    digits = common.parse_args(parser(), argv=[])
    other = common.parse_args(parser(), argv=["--dataset", "cifar10"])
    paper = common.parse_args(parser(), {"paper": {"width": 32}}, argv=["--dataset", "cifar10", "--preset", "paper"])
    assert (digits.size, other.size, other.width, paper.width) == (32, 32, 64, 32)
    assert other.sources["width"] == "default off digits" and paper.sources["width"] == "preset paper"
    with pytest.raises(SystemExit):
        common.parse_args(parser(), {"paper": {"width": 32}}, argv=["--help"])
    assert "[default 16; off digits 64; --preset paper 32]" in " ".join(capsys.readouterr().out.split())


def test_library_calls_raise_exceptions_never_system_exit(tmp_path):
    for call in (lambda: common.kmeans(torch.randn(3, 2), 5), lambda: common.knn(torch.randn(3, 2), torch.randn(2, 2), 3),
                 lambda: common.build_backbone("resnet7"), lambda: common.threshold_at(torch.ones(3), 1.5),
                 lambda: common.Scorer.load(str(tmp_path)), lambda: common.load_dataset("mnist")):
        with pytest.raises(ERROR):
            call()


def test_a_file_that_would_run_code_on_loading_is_refused_everywhere(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "evil.pt").write_bytes(b"")
    torch.save({"model": RunsCode(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt is not a plain weights file: it holds Python objects"):
        common.load_weights(common.Encoder(width=2), str(tmp_path / "evil.pt"))
    out = tmp_path / "run"
    selfcheck(tmp_path, "--out", str(out), "--subset", "32")
    torch.save({"model": RunsCode(str(marker)), "epoch": 1, "run": {}}, out / "checkpoint.pt")
    message = selfcheck(tmp_path, "--out", str(out), "--subset", "32", "--resume", "--epochs", "2")
    assert message.startswith("error: ") and "\n" not in message                   # refused as no checkpoint of ours
    with pytest.raises(ValueError, match="checkpoint.pt is not a plain checkpoint: it holds Python objects"):
        common.load_checkpoint(str(out / "checkpoint.pt"))
    torch.save({"script": "common", "model": RunsCode(str(marker))}, out / "scorer.pt")
    message = selfcheck(tmp_path, "--out", str(out), "--score", "digits")
    assert message.startswith("error: ") and "scorer.pt is not a plain scorer file" in message
    assert not marker.exists()
    here = os.path.dirname(os.path.abspath(__file__))
    assert not [f for f in os.listdir(here) if f.endswith(".py") and "weights_only=" + "False" in open(os.path.join(here, f)).read()]


class RunsCode:
    """An object whose unpickling creates a file: what a malicious .pt could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block of the README runs as printed, in a folder where `runs/photos` is a finished run and
    `images` a batch of uint8 images."""
    import re
    readme = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    assert isinstance(selfcheck(tmp_path, "--out", "runs/photos", "--subset", "32"), dict)
    for block in blocks:
        exec(block, {"images": common.load_dataset("digits", train=False)[0][:6]})


def test_a_run_of_an_earlier_version_loads_its_weights_and_is_not_resumed_under_new_settings(tmp_path):
    """A checkpoint written before a setting existed: its tensors load with weights_only; --resume says in one line
    why it will not continue, and what to do."""
    old = {"script": "ccl", "settings": {"lr": 0.1}}
    with pytest.raises(ValueError, match="made by an earlier version of these scripts, which had no --lars-scope: .*"
                                         "start afresh with --overwrite"):
        common.compare_runs(old, {"script": "ccl", "settings": {"lr": 0.1, "lars_scope": "all"}}, "the run")
    net = common.Encoder(width=2)
    torch.save({"model": net.state_dict(), "epoch": 1, "run": old, "rng": common.rng_state()}, tmp_path / "old.pt")
    assert common.load_checkpoint(str(tmp_path / "old.pt"))["epoch"] == 1
    common.load_weights(common.Encoder(width=2), str(tmp_path / "old.pt"))
