"""Tests of common.py against independent references: literal loops, scikit-learn, torchvision."""
import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF

import bench
import common
import harness

ERROR = (ValueError, OSError, FloatingPointError)   # what the building blocks and the harness raise


# ---------------------------------------------------------------------------------------------- augmentation

def test_simclr_augment_shapes_ranges_and_per_sample_parameters():
    x = harness.load_dataset("digits")[0][:64]
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


def test_views_per_image_follow_from_the_pixels_alone_with_no_host_sync():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    aug = common.SimCLRAugment(8)
    with bench.DispatchCounter() as c:
        views = common.views_per_image(x, aug, 5)
    assert c.syncs == 0, c.sync_ops
    assert views.shape == (6, 5, 3, 8, 8) and 0 <= views.min() and views.max() <= 1
    torch.manual_seed(1)                                                # the global RNG plays no part
    others = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    again = common.views_per_image(torch.cat([others, x.flip(0)]), aug, 5)[3:].flip(0)   # other places, companions
    assert torch.equal(again, views) and torch.equal(common.views_per_image(x[2:3], aug, 5)[0], views[2])
    assert not torch.equal(views[0, 0], views[0, 1])                    # each view its own draw
    changed = x.clone()
    changed[0, 2, 11, 11] ^= 1                                          # one bit of one pixel: unrelated views
    assert common.image_seeds(changed)[0] != common.image_seeds(x)[0]
    assert torch.equal(common.image_seeds(x.float() / 255), common.image_seeds(x))   # floats at 8 bits
    u = common.seeded_uniform(torch.arange(2000), 31)                   # uniform numbers: mean 1/2, var 1/12
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005


def test_mix32_is_murmur3s_finaliser():
    def literal(h):
        h ^= h >> 16
        h = h * 0x85EBCA6B % 2 ** 32
        h ^= h >> 13
        h = h * 0xC2B2AE35 % 2 ** 32
        return h ^ (h >> 16)
    values = [0, 1, 12345, 2 ** 31, 2 ** 32 - 1] + torch.randint(0, 2 ** 32, (50,)).tolist()
    assert common.mix32(torch.tensor(values)).tolist() == [literal(v) for v in values]


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


def lite0_state_dict(seed=0):
    """A random state dict in the key layout and shapes of EfficientNet-Lite0's published ImageNet weights (the
    efficientnet_pytorch family's: 296 keys, 4,694,073 numbers), written out from the architecture's table: per
    block (expansion, input channels, output channels, kernel)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = ([(1, 32, 16, 3), (6, 16, 24, 3), (6, 24, 24, 3), (6, 24, 40, 5), (6, 40, 40, 5), (6, 40, 80, 3)]
              + [(6, 80, 80, 3)] * 2 + [(6, 80, 112, 5)] + [(6, 112, 112, 5)] * 2 + [(6, 112, 192, 5)]
              + [(6, 192, 192, 5)] * 3 + [(6, 192, 320, 3)])
    shapes = {"_conv_stem.weight": (32, 3, 3, 3)}

    def bn(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                       f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})
    bn("_bn0", 32)
    for i, (expand, cin, cout, k) in enumerate(blocks):
        c = cin * expand
        if expand != 1:
            shapes[f"_blocks.{i}._expand_conv.weight"] = (c, cin, 1, 1)
            bn(f"_blocks.{i}._bn0", c)
        shapes[f"_blocks.{i}._depthwise_conv.weight"] = (c, 1, k, k)
        bn(f"_blocks.{i}._bn1", c)
        shapes[f"_blocks.{i}._project_conv.weight"] = (cout, c, 1, 1)
        bn(f"_blocks.{i}._bn2", cout)
    shapes["_conv_head.weight"] = (1280, 320, 1, 1)
    bn("_bn1", 1280)
    shapes.update({"_fc.weight": (1000, 1280), "_fc.bias": (1000,)})
    return {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else
                torch.rand(s, generator=gen) + 0.5 if k.endswith("running_var") else torch.randn(s, generator=gen))
            for k, s in shapes.items()}


def test_efficientnet_lite0_loads_its_published_key_layout_strictly(tmp_path):
    """A random state dict of Lite0's exact keys and shapes loads key by key into our backbone, from a dict and from
    a file; its classifier is dropped; one key missing, extra or of another shape is refused, naming it."""
    sd = lite0_state_dict()
    assert len(sd) == 296 and sum(v.numel() for v in sd.values()) == 4_694_073
    torch.save(sd, tmp_path / "lite0.pth")
    for weights in (sd, str(tmp_path / "lite0.pth")):
        net, dim = common.build_backbone("efficientnet_lite0", weights=weights)
        own = net.state_dict()
        assert dim == 1280 and set(own) == {k for k in sd if not k.startswith("_fc.")}
        assert all(torch.equal(own[k], sd[k]) for k in own)
    net.eval()
    for side in (32, 57, 128):                         # any input side: TensorFlow's SAME padding, computed per call
        assert net(torch.rand(2, 3, side, side)).shape == (2, 1280)
    for broken, match in (({k: v for k, v in sd.items() if k != "_blocks.3._bn1.weight"}, "missing"),
                          ({**sd, "_blocks.16._bn0.weight": torch.ones(3)}, "unexpected"),
                          ({**sd, "_conv_head.weight": torch.ones(1280, 320, 3, 3)}, "_conv_head.weight")):
        with pytest.raises(ERROR, match=match):
            common.build_backbone("efficientnet_lite0", weights=broken)


def test_a_torchvision_resnet_state_dict_loads_strictly_into_the_imagenet_style_backbone(tmp_path):
    """torchvision's own ResNet-18 (random, its key layout with fc) loads key by key: the features are that
    network's pooled features; a ResNet-34's state dict is refused, naming keys."""
    import torchvision
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    net, dim = common.build_backbone("imagenet_resnet18", weights=str(tmp_path / "r18.pth"))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref.fc = nn.Identity()
        assert dim == 512 and torch.equal(net.eval()(x), ref(x))
    with pytest.raises(ERROR, match="unexpected"):
        common.build_backbone("imagenet_resnet18", weights=torchvision.models.resnet34().state_dict())
    with pytest.raises(ERROR, match="torchvision has ImageNet weights for imagenet_resnet18.*not for resnet18"):
        common.build_backbone("resnet18", weights="imagenet")


def test_same_padding_is_tensorflows():
    """SAME: output side ceil(side / stride); the odd padding pixel goes to the bottom and right."""
    conv = common.SameConv2d(1, 1, 3, 2, bias=False)
    x = torch.randn(1, 1, 8, 7)
    want = F.conv2d(F.pad(x, [1, 1, 0, 1]), conv.weight, stride=2)     # width 7: 2 pixels, 1 + 1; height 8: 0 + 1
    assert torch.equal(conv(x), want) and want.shape[-2:] == (4, 4)


def test_the_encoder_normalises_as_its_weights_expect():
    """Pretrained weights: their training statistics (ImageNet's for torchvision, (x - 127/255) / (128/255) for
    TensorFlow's Lite0); random weights, or a model rebuilt for a run's own weights, as chosen by pretrained."""
    x = torch.full((1, 3, 8, 8), 0.5)
    assert torch.equal(common.Encoder("resnet18", width=2).normalize(x), torch.zeros_like(x))
    lite = common.Encoder("efficientnet_lite0", weights=lite0_state_dict())
    assert torch.allclose(lite.normalize(torch.full_like(x, 127 / 255)), torch.zeros_like(x))
    assert torch.equal(common.Encoder("efficientnet_lite0", pretrained=True).mean, lite.mean)
    net = common.Encoder("imagenet_resnet18", pretrained=True)
    assert net.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert torch.equal(common.Encoder("imagenet_resnet18").normalize(x), torch.zeros_like(x))


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
    x = harness.load_dataset("digits")[0][:32]
    cfg = common.TrainConfig(epochs=3, batch_size=16, lr=0.1)
    run = {"script": script, "settings": {"width": width}}
    checkpoint = common.Checkpoint(str(tmp_path / "ckpt.pt"), every=1, resume=resume, record=run,
                                   check=lambda saved, path: harness.compare_runs(saved, run, path))
    os.makedirs(tmp_path, exist_ok=True)
    step = step or CountingStep()
    return common.train(model, step, x, cfg, checkpoint), step


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
    cfg = common.TrainConfig(epochs=1, batch_size=8, lr=0.1)
    x = torch.zeros(16, 2)
    with pytest.raises(ERROR, match="training diverged in epoch 1 .* no checkpoint was written yet"):
        common.train(nn.Linear(2, 1), lambda net, xb, idx, ep: net(xb.float()).sum() * float("nan"), x, cfg,
                     common.Checkpoint(str(tmp_path / "c.pt")))


def test_a_diverged_buffer_never_replaces_the_last_good_checkpoint(tmp_path):
    """An inf BatchNorm running_var with a finite loss (the --lr 1e6 case): the run stops, the checkpoint of the
    last good epoch survives byte for byte."""
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    cfg = common.TrainConfig(epochs=2, batch_size=8, lr=0.01)
    x = torch.randn(16, 2)
    common.train(model, lambda net, xb, idx, ep: net(xb).pow(2).mean(), x, cfg,
                 common.Checkpoint(str(tmp_path / "c.pt")))
    good = (tmp_path / "c.pt").read_bytes()

    def poison(net, xb, idx, epoch):
        model[1].running_var.fill_(float("inf"))
        return net(xb).pow(2).mean().nan_to_num(0.0)
    cfg = dataclasses.replace(cfg, epochs=3)
    with pytest.raises(ERROR, match="training diverged in epoch 3 .*the last good checkpoint is .*c.pt"):
        common.train(model, poison, x, cfg, common.Checkpoint(str(tmp_path / "c.pt"), every=1, resume=True))
    assert (tmp_path / "c.pt").read_bytes() == good


def test_a_checkpoint_of_another_record_is_refused_and_a_longer_run_goes_on(tmp_path):
    x, cfg = torch.randn(16, 2), common.TrainConfig(epochs=1, batch_size=8, lr=0.01)
    step = lambda net, xb, idx, ep: net(xb).pow(2).mean()
    common.train(nn.Linear(2, 1), step, x, cfg, common.Checkpoint(str(tmp_path / "c.pt"), record={"a": 1}))
    with pytest.raises(ERROR, match="c.pt was written by another run"):
        common.train(nn.Linear(2, 1), step, x, cfg, common.Checkpoint(str(tmp_path / "c.pt"), resume=True,
                                                                     record={"a": 2}))
    longer = dataclasses.replace(cfg, epochs=2)
    common.train(nn.Linear(2, 1), step, x, longer, common.Checkpoint(str(tmp_path / "c.pt"), resume=True,
                                                                    record={"a": 1}))
    assert torch.load(tmp_path / "c.pt", weights_only=True)["epoch"] == 2
    with pytest.raises(ERROR, match="has done 2 epochs, more than the 1 asked for now"):
        common.train(nn.Linear(2, 1), step, x, cfg, common.Checkpoint(str(tmp_path / "c.pt"), resume=True,
                                                                     record={"a": 1}))
    with pytest.raises(ERROR, match="batch_size 32 is larger than the training set \\(16 images\\)"):
        common.train(nn.Linear(2, 1), step, x, dataclasses.replace(cfg, batch_size=32))


def test_the_loop_makes_no_host_sync_per_step_even_when_it_prints_progress():
    """The host syncs of an epoch do not grow with its steps (losses summed and finite flags kept on the device,
    read once per epoch), progress lines inside the epoch included: they read the clock alone."""
    def syncs(n_steps):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        step = lambda net, xb, idx, ep: (net(xb).pow(2).mean(), {"extra": xb.mean()})
        log = common.TrainLog("stage", first_every=0.0, every=0.0)          # a progress line after every step
        with bench.DispatchCounter() as c:
            common.train(model, step, torch.randn(8 * n_steps, 4), common.TrainConfig(2, 8, 0.1), log=log)
        return c.syncs
    assert syncs(2) == syncs(10), (syncs(2), syncs(10))


def test_the_lines_name_the_stage_its_cost_and_the_first_epochs_progress(capsys, monkeypatch):
    """A clock that moves 10 s per reading: a 10-step epoch is long, so the first epoch reports its progress, and
    the measured stage (over 2 minutes) its estimated time and how to shorten it; later epochs wait `every`."""
    clock = iter(range(0, 10 ** 6, 10))
    monkeypatch.setattr(common, "time", type("Clock", (), {"time": staticmethod(lambda: next(clock))}))
    step = lambda net, xb, idx, ep: net(xb).pow(2).mean()
    log = common.TrainLog("pretext", views=2, shorter="fewer epochs")
    common.train(nn.Linear(2, 1), step, torch.randn(80, 2), common.TrainConfig(epochs=2, batch_size=8, lr=0.1),
                 log=log)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "pretext: 80 images x 2 views x 2 epochs = 320 views, 10 steps of 8 per epoch"
    assert lines[1] == "  pretext epoch 1/2: 8/80 images (10%), 1 img/s, epoch eta 1m30s, stage eta 3m10s"
    assert lines[2] == "pretext: about 3m20s at the measured 1 img/s; shorter: fewer epochs"
    first = [line for line in lines if line.startswith("  pretext epoch 1/2")]
    assert 3 <= len(first) <= 9                                         # every ~tenth of the epoch, not every step
    later = [line for line in lines if line.startswith("  pretext epoch 2/2")]
    assert len(later) < len(first)                                      # every 60 s after the first epoch
    assert [line.split(" loss")[0] for line in lines if " loss " in line] == ["pretext epoch 1/2", "pretext epoch 2/2"]


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


# ---------------------------------------------------------------------------------------------- torchrun / DDP (gloo, 2 CPU processes)

def _one_step(ckpt):
    """One SGD step of a BatchNorm-free model on a global batch of 16 (two views: the image and its mirror)."""
    cfg = common.TrainConfig(epochs=1, batch_size=16, lr=0.5, amp="off")
    harness.seed_everything(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6))
    x = torch.randint(0, 256, (16, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    two_views = lambda net, xb, idx, ep: common.nt_xent(net(common.to_float(torch.cat([xb, xb.flip(3)]))), 0.5)
    common.train(model, two_views, x, cfg, common.Checkpoint(ckpt, every=1))
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
    xb = harness.load_dataset("digits")[0][:8]
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


# ---------------------------------------------------------------------------------------------- the two layers

def test_common_is_the_building_blocks_alone():
    """common.py imports nothing of the harness or of any method (directly or by name), holds no command line, and
    never ends the process: a reader copies it, or a piece of it, without the scripts."""
    import ast
    src = open(os.path.join(os.path.dirname(__file__), "common.py")).read()
    tree = ast.parse(src)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"contextlib", "dataclasses", "functools", "math", "os", "time", "numpy", "torch",
                        "torchvision", "sklearn", "scipy"}, imported
    ours = {"harness", "ccl", "mcl", "oecl", "scan_ood", "bench"}
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not ours & strings, ours & strings                  # no importlib.import_module("harness")
    names = {x.id for x in ast.walk(tree) if isinstance(x, ast.Name)} | \
            {x.attr for x in ast.walk(tree) if isinstance(x, ast.Attribute)}
    assert not names & {"exit", "_exit", "SystemExit", "ArgumentParser", "import_module", "__import__"}, \
        names & {"exit", "_exit", "SystemExit", "ArgumentParser", "import_module", "__import__"}
    assert "argparse" not in src and "run.json" not in src

