"""Tests of oecl.py: the loss against a literal loop of Eq. 12, the warm-up, the scores, self-OECL's rotation
split, presets, and short end-to-end runs on the embedded digits."""
import math

import numpy as np
import pytest
import torch

import common
import oecl

TINY = ["--size", "16", "--width", "4", "--batch-size", "32"]   # seconds per run on a CPU


def literal_oecl_loss(z_id, z_oe, tau, alpha):
    """Eq. 12 written out: for each of the 2N ID views, -log of exp(cos with its other view / tau) over the sum
    of exp(cos / tau) with every other ID view; the mean; plus alpha * the mean L2 norm of the outliers."""
    n2 = len(z_id)
    cos = lambda a, b: (a * b).sum() / (a.norm() * b.norm())
    total = 0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        denom = sum(torch.exp(cos(z_id[i], z_id[k]) / tau) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(cos(z_id[i], z_id[pos]) / tau) / denom)
    norms = [torch.sqrt((z_oe[m] ** 2).sum()) for m in range(len(z_oe))]
    return total / n2 + alpha * sum(norms) / len(norms)


@pytest.mark.parametrize("tau,alpha", [(0.5, 1.0), (0.2, 0.1)])
def test_oecl_loss_matches_literal_loop(tau, alpha):
    g = torch.Generator().manual_seed(0)
    z_id = torch.randn(10, 6, generator=g, dtype=torch.float64).requires_grad_()
    z_oe = (3 * torch.randn(7, 6, generator=g, dtype=torch.float64)).requires_grad_()  # M != 2N: any count
    loss, logs = oecl.oecl_loss(z_id, z_oe, tau, alpha)
    ref = literal_oecl_loss(z_id, z_oe, tau, alpha)
    assert torch.allclose(loss.double(), ref, atol=1e-5)
    for a, b in zip(torch.autograd.grad(loss, (z_id, z_oe)), torch.autograd.grad(ref, (z_id, z_oe))):
        assert torch.allclose(a.double(), b, atol=1e-5)
    assert math.isclose(logs["norm_in"], z_id.norm(dim=1).mean().item(), rel_tol=1e-5)
    assert math.isclose(logs["norm_out"], z_oe.norm(dim=1).mean().item(), rel_tol=1e-5)


def test_alpha_zero_is_simclr():
    z_id, z_oe = torch.randn(16, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    loss = oecl.oecl_loss(z_id, z_oe, 0.5, 0.0)[0]
    assert torch.equal(loss, common.nt_xent(z_id, 0.5))
    assert torch.all(torch.autograd.grad(loss, z_oe)[0] == 0)        # outliers get no gradient at alpha = 0


def test_oe_warmup_switches_the_outlier_term_on():
    args = common.parse_args(oecl.arg_parser(), oecl.PRESETS, ["--oe-warmup", "3", "--alpha", "0.7"])
    assert [oecl.alpha_at(e, args) for e in range(5)] == [0, 0, 0, 0.7, 0.7]
    model = common.Encoder("resnet18", bn_in_head=True, width=4)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    oe_x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    loss_fn = oecl.make_loss_fn(args, common.SimCLRAugment(16), oe_x)
    out = {}
    for epoch in (2, 3):                                             # same draws, last warm-up epoch vs first after
        torch.manual_seed(0)
        out[epoch] = loss_fn(model, x, None, epoch)
    (before, logs), (after, _) = out[2], out[3]
    assert torch.allclose(after - before, 0.7 * logs["norm_out"], atol=1e-5) and logs["norm_out"] > 0


def test_ensemble_scores_match_a_loop_over_views():
    torch.manual_seed(0)
    model = common.Encoder("resnet18", bn_in_head=True, width=4).eval()
    for p in model.modules():                            # non-trivial BatchNorm statistics for eval mode
        if isinstance(p, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            p.running_mean.uniform_(-0.5, 0.5), p.running_var.uniform_(0.5, 2)
    x = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    aug, seen = common.SimCLRAugment(16), []
    recording = lambda xb, generator=None: seen.append(aug(xb, generator=generator)) or seen[-1]
    n_aug, batch = 3, 12                                                 # chunks of 12 // 4 = 3 images: 3 + 3 + 1
    s = oecl.ensemble_scores(model, x, recording, n_aug, batch_size=batch)
    views = torch.cat([v.view(n_aug, -1, 3, 16, 16) for v in seen], 1)  # n_aug x 7 images, as drawn
    with torch.no_grad():
        for i in range(len(x)):                                          # one image, one view at a time
            zs = [model(common.to_float(x[i:i + 1]))[1][0]] + [model(views[t, i:i + 1])[1][0] for t in range(n_aug)]
            mean_z = sum(zs) / len(zs)
            assert torch.allclose(s["norm"][i], zs[0].norm(), rtol=1e-4)
            assert torch.allclose(s["ensemble"][i], mean_z.norm(), rtol=1e-4)
            assert torch.allclose(s["mean_sq_norm"][i], sum(z.pow(2).sum() for z in zs) / len(zs), rtol=1e-4)
    no_aug = oecl.ensemble_scores(model, x, aug, 0)                    # no augmentation: all three are ||z||
    assert torch.allclose(no_aug["ensemble"], s["norm"]) and torch.allclose(no_aug["mean_sq_norm"], s["norm"] ** 2)


def test_self_oe_split_rotations():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    x_id, x_oe = oecl.self_oe_split(x)
    assert x_id.shape == x_oe.shape == (12, 3, 8, 8)
    base = x_id[:6]                                                      # each image, possibly flipped (before rotating)
    flipped = [not torch.equal(base[i], x[i]) for i in range(6)]
    assert all(torch.equal(base[i], x[i].flip(2) if f else x[i]) for i, f in enumerate(flipped)) and 0 < sum(flipped) < 6
    rot = lambda t, k: torch.rot90(t, k, dims=(2, 3))                   # counter-clockwise, k x 90 degrees
    assert torch.equal(x_id[6:], rot(base, 1))                          # ID: 0 and 90 degrees
    assert torch.equal(x_oe[:6], rot(base, 2)) and torch.equal(x_oe[6:], rot(base, 3))   # outliers: 180, 270


def test_presets_resolve_and_flags_override():
    parser = oecl.arg_parser
    for name, preset in oecl.PRESETS.items():
        args = common.parse_args(parser(), oecl.PRESETS, ["--preset", name])
        assert all(getattr(args, k) == v for k, v in preset.items())   # every key is a real argument
        assert all(args.sources[k] == f"preset {name}" for k in preset)
        args = common.parse_args(parser(), oecl.PRESETS, ["--preset", name, "--epochs", "3", "--alpha", "0.1"])
        assert args.epochs == 3 and args.alpha == 0.1 and args.sources["epochs"] == "command line"
    args = oecl.resolve_outliers(common.parse_args(parser(), oecl.PRESETS, ["--preset", "paper"]))
    assert args.oe == oecl.PAPER["oe"] and args.self_oe is False
    args = oecl.resolve_outliers(common.parse_args(parser(), oecl.PRESETS, ["--preset", "paper", "--self-oe"]))
    assert args.oe is None and args.self_oe is True                     # a typed --self-oe replaces the preset's set


def test_digits_oecl_far_above_chance_and_checkpoint_records_preset(tmp_path):
    # The quick preset with digits in place of CIFAR: its other values (id_classes, oe, n_aug) stay. Outliers:
    # training-split digits 6-9, the test OOD classes (other images): the easiest case, so that 6 epochs suffice.
    res = oecl.main(["--preset", "quick", "--dataset", "digits", "--subset", "0", "--oe-classes", "6-9",
                     "--size", "16", "--width", "8", "--batch-size", "64", "--crop-scale", "0.5",
                     "--epochs", "6", "--oe-warmup", "1", "--out", str(tmp_path)])
    auroc = res["metrics"]["classes 6-9"]["auroc"]
    assert auroc > 75, auroc                                             # measured: 81 (seed 0)
    assert set(res["scores"]) == {"norm", "ensemble", "mean_sq_norm"} and set(res["per_class_auroc"]) == {6, 7, 8, 9}
    config = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["config"]
    assert config["oe"] == "digits" and config["n_aug"] == oecl.QUICK["n_aug"] and config["epochs"] == 6
    assert config["sources"]["n_aug"] == "preset quick" and config["sources"]["epochs"] == "command line"
    assert config["self_oe"] is False                                    # the resolved value, not None


def test_self_oecl_and_outliers_of_another_size_and_count(tmp_path):
    np.save(tmp_path / "oe.npy", np.random.RandomState(0).randint(0, 256, (37, 20, 20, 3), dtype=np.uint8))
    res = oecl.main(["--oe", f"npy:{tmp_path / 'oe.npy'}", "--subset", "96", "--epochs", "1", "--n-aug", "1",
                     *TINY, "--out", str(tmp_path / "oe")])                # 37 outliers of 20 px vs 96 images of 16 px
    assert 0 <= res["metrics"]["classes 6-9"]["auroc"] <= 100
    res = oecl.main(["--subset", "64", "--epochs", "1", "--n-aug", "1", *TINY, "--out", str(tmp_path / "self")])
    assert res["method"] == "self-OECL" and res["config"]["self_oe"] is True


def test_bad_input_fails_clearly(tmp_path):
    out = ["--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="exactly one of"):
        oecl.main(["--oe", "digits", "--self-oe", *out])
    with pytest.raises(SystemExit, match="exactly one of"):
        oecl.main(["--no-self-oe", *out])
    with pytest.raises(SystemExit, match="overlap the in-distribution"):
        oecl.main(["--oe", "digits", "--oe-classes", "5-6", "--epochs", "0", *out])
    with pytest.raises(SystemExit, match="go together"):
        oecl.main(["--protocol", "one-vs-rest", *out])
    with pytest.raises(SystemExit, match="go together"):
        oecl.main(["--all-classes", *out])
    with pytest.raises(SystemExit, match="drop --id-classes"):
        oecl.main(["--protocol", "leave-one-out", "--all-classes", "--id-classes", "3", *out])


def test_protocol_loops_over_every_class(tmp_path):
    from PIL import Image
    rng = np.random.RandomState(0)
    for c in range(3):                                                   # a labelled folder: 3 classes x 12 images
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    res = oecl.main(["--dataset", f"folder:{tmp_path / 'imgs'}", "--protocol", "leave-one-out", "--all-classes",
                     "--size", "8", "--width", "2", "--batch-size", "8", "--epochs", "1", "--n-aug", "1",
                     "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "runs")])
    assert sorted(res["per_class"]) == [0, 1, 2] and (tmp_path / "runs" / "class-2" / "results.json").exists()
    assert all(0 <= m["held-out classes"]["auroc"] <= 100 for m in res["per_class"].values())
    assert set(res["mean_auroc"]) == {"held-out classes"}
