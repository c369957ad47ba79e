"""Tests of oecl.py: the loss against a literal loop of Eq. 12, the warm-up, the scores, self-OECL's views (the
public code's order: augment, then rotate), the batch composition of both steps and of the paper preset, host
syncs, and short end-to-end runs on the embedded digits."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import bench
import common
import harness
import oecl
from conftest import assert_scores_follow_the_image

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


def test_oecl_loss_is_float32_under_autocast():
    z_id, z_oe = torch.randn(16, 8), torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = oecl.oecl_loss(z_id.bfloat16(), z_oe.bfloat16(), 0.5, 1.0)[0]
    ref = oecl.oecl_loss(z_id.bfloat16().float(), z_oe.bfloat16().float(), 0.5, 1.0)[0]
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, atol=1e-5)


def test_alpha_zero_is_simclr():
    z_id, z_oe = torch.randn(16, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    loss = oecl.oecl_loss(z_id, z_oe, 0.5, 0.0)[0]
    assert torch.equal(loss, common.nt_xent(z_id, 0.5))
    assert torch.all(torch.autograd.grad(loss, z_oe)[0] == 0)        # outliers get no gradient at alpha = 0


def test_warmup_switches_the_outlier_term_on():
    assert [oecl.alpha_at(e, 0.7, 3) for e in range(5)] == [0, 0, 0, 0.7, 0.7]
    model = common.Encoder("resnet18", bn_in_head=True, width=4)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    oe_x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    aug = common.SimCLRAugment(16)
    out = {}
    for alpha in (0.0, 0.7):                                         # same draws, warm-up vs after
        torch.manual_seed(0)
        out[alpha] = oecl.oecl_step(model, x, oe_x, aug, 0.5, alpha)
    (before, logs), (after, _) = out[0.0], out[0.7]
    assert torch.allclose(after - before, 0.7 * logs["norm_out"], atol=1e-5) and logs["norm_out"] > 0


def test_ensemble_scores_match_a_loop_over_views():
    torch.manual_seed(0)
    model = common.Encoder("resnet18", bn_in_head=True, width=4).eval()
    for p in model.modules():                            # non-trivial BatchNorm statistics for eval mode
        if isinstance(p, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            p.running_mean.uniform_(-0.5, 0.5), p.running_var.uniform_(0.5, 2)
    x = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    aug = common.SimCLRAugment(16)
    n_aug, batch = 3, 12                                                 # chunks of 12 // 4 = 3 images: 3 + 3 + 1
    s = oecl.ensemble_scores(model, x, aug, n_aug, batch_size=batch)
    with torch.no_grad():
        for i in range(len(x)):                                          # one image, one view at a time
            views = common.views_per_image(x[i:i + 1], aug, n_aug)[0]   # the image's own views
            zs = [model(common.to_float(x[i:i + 1]))[1][0]] + [model(views[t:t + 1])[1][0] for t in range(n_aug)]
            mean_z = sum(zs) / len(zs)
            assert torch.allclose(s["norm"][i], zs[0].norm(), rtol=1e-4)
            assert torch.allclose(s["ensemble"][i], mean_z.norm(), rtol=1e-4)
            assert torch.allclose(s["mean_sq_norm"][i], sum(z.pow(2).sum() for z in zs) / len(zs), rtol=1e-4)
    no_aug = oecl.ensemble_scores(model, x)                              # no augmentation: all three are ||z||
    assert torch.allclose(no_aug["ensemble"], s["norm"]) and torch.allclose(no_aug["mean_sq_norm"], s["norm"] ** 2)


def test_ensemble_scores_depend_on_the_image_alone():
    """An image's views follow from its pixels: the same scores at any position, in any chunking, with any
    companions, whatever the global RNG; a changed pixel changes its views."""
    torch.manual_seed(0)
    model = common.Encoder("resnet18", bn_in_head=True, width=4).eval()
    x = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8)
    aug = common.SimCLRAugment(16)
    whole = oecl.ensemble_scores(model, x, aug, 4, batch_size=1000)          # one chunk
    torch.manual_seed(1)                                                      # the global RNG plays no part
    others = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    for batch in (5, 10, 15):                                                 # chunks of 1, 2, 3 images
        cut = oecl.ensemble_scores(model, x, aug, 4, batch_size=batch)
        assert all(torch.allclose(cut[k], whole[k], rtol=1e-5) for k in whole)
    order = torch.randperm(9)
    shuffled = oecl.ensemble_scores(model, torch.cat([others, x[order]]), aug, 4)   # other positions, companions
    alone = oecl.ensemble_scores(model, x[4:5], aug, 4)
    for k in whole:
        assert torch.allclose(shuffled[k][5:], whole[k][order], rtol=1e-5)
        assert torch.allclose(alone[k], whole[k][4:5], rtol=1e-5)
    changed = x.clone()
    changed[0, 0, 0, 0] ^= 1                                                  # one bit of one pixel
    assert oecl.ensemble_scores(model, changed[:1], aug, 4)["ensemble"] != whole["ensemble"][0]


class Recorder(torch.nn.Module):
    """A stand-in network: remembers its input batch, returns (h, z) with z a fixed function of the pixels."""
    def forward(self, x):
        self.seen = x
        return None, x.flatten(1)[:, :8] + 1


identity = common.to_float                                               # an augmentation that changes nothing


def rot(t, k):
    return torch.rot90(t, k, dims=(2, 3))                                # counter-clockwise, k x 90 degrees


def public_code_self_oe_views(views, id_rot=(0, 1), oe_rot=(2, 3)):
    """The public code's self-OECL batch, literally: an ID loader and an outlier loader over the same images, each
    yielding two augmented views (v1, v2 and o1, o2); each view rotated (torch.rot90 per rotation, concatenated)."""
    v1, v2, o1, o2 = views
    data_id1, data_id2 = (torch.cat([rot(v, k) for k in id_rot]) for v in (v1, v2))
    data_oe1, data_oe2 = (torch.cat([rot(v, k) for k in oe_rot]) for v in (o1, o2))
    return torch.cat([data_id1, data_id2]), torch.cat([data_oe1, data_oe2])


@pytest.mark.parametrize("id_rot,oe_rot", [((0, 1), (2, 3)), ((0,), (1, 2, 3))])
def test_self_oe_views_augment_first_then_rotate_as_the_public_code(id_rot, oe_rot):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    aug, drawn = common.SimCLRAugment(8), []
    recording = lambda xb: drawn.append(aug(xb)) or drawn[-1]                # the same draws for both builds
    x_id, x_oe = oecl.self_oe_views(x, recording, id_rot, oe_rot)
    ref_id, ref_oe = public_code_self_oe_views(drawn[0].chunk(4), id_rot, oe_rot)
    assert torch.equal(x_id, ref_id) and torch.equal(x_oe, ref_oe)
    n = len(x)                                                              # what that means, directly:
    for views, rots in ((x_id, id_rot), (x_oe, oe_rot)):
        for v in views.chunk(2):                                            # one view's rotations: one crop,
            for j, k in enumerate(rots):                                    # one colour, turned
                assert torch.equal(v[j * n:(j + 1) * n], rot(v[:n], k - rots[0]))
    assert not torch.equal(x_id[:n], x_id[len(x_id) // 2:][:n])             # the two views of a pair differ


def test_batch_composition_of_both_steps_and_the_paper_preset():
    b, m = 6, 5
    x = torch.randint(0, 256, (b, 3, 8, 8), dtype=torch.uint8)
    oe_x = torch.randint(0, 256, (m, 3, 8, 8), dtype=torch.uint8)
    net = Recorder()
    oecl.oecl_step(net, x, oe_x, identity)                               # OECL: 2B ID views + 2 views of B outliers
    seen = (net.seen * 255).round().to(torch.uint8)
    assert len(seen) == 4 * b and torch.equal(seen[:b], x) and torch.equal(seen[b:2 * b], x)
    assert torch.equal(seen[2 * b:3 * b], seen[3 * b:])                  # each outlier twice (two views)
    assert all(any(torch.equal(o, e) for e in oe_x) for o in seen[2 * b:])
    oecl.self_oecl_step(net, x, identity)                                # self-OECL: 2B instances x 2 views, 2B outliers x 2
    seen = (net.seen * 255).round().to(torch.uint8)
    assert len(seen) == 8 * b
    for first, k in ((0, 0), (b, 1), (2 * b, 0), (3 * b, 1), (4 * b, 2), (5 * b, 3), (6 * b, 2), (7 * b, 3)):
        assert torch.equal(seen[first:first + b], rot(x, k))             # ID views 1, 2 (0, 90), outlier views (180, 270)
    parse = lambda *argv: oecl.check_args(harness.parse_args(oecl.build_parser(), oecl.PRESETS, list(argv)))
    args = parse("--preset", "paper", "--oe", "cifar100")                # App. I: 256 ID + 256 outlier images a step
    assert not args.self_oe and args.batch_size == 256 and args.epochs == 500
    args = parse("--preset", "paper", "--self-oe")                       # 128 images: 256 + 256 instances, 1000 epochs
    assert args.self_oe and args.oe is None and args.epochs == 1000 and args.sources["epochs"] == "preset paper (self-OECL)"
    x_id, x_oe = oecl.self_oe_views(torch.zeros(args.batch_size, 3, 8, 8, dtype=torch.uint8), identity)
    assert len(x_id) // 2 == 256 and len(x_oe) // 2 == 256               # instances (each in two views)
    args = parse("--preset", "paper", "--self-oe", "--batch-size", "32", "--epochs", "7")
    assert args.batch_size == 32 and args.epochs == 7                    # typed flags still win


@pytest.mark.parametrize("self_oe", [False, True])
def test_steps_make_no_host_sync(self_oe):
    torch.manual_seed(0)
    model = common.Encoder("resnet18", bn_in_head=True, width=2)
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    oe_x = torch.randint(0, 256, (9, 3, 8, 8), dtype=torch.uint8)
    for aug in (common.SimCLRAugment(8), common.SimCLRAugment(8, **harness.DIGITS_AUGMENT)):
        with bench.DispatchCounter() as c:
            if self_oe:
                loss, logs = oecl.self_oecl_step(model, x, aug, 0.5, 1.0)
            else:
                loss, logs = oecl.oecl_step(model, x, oe_x, aug, 0.5, 1.0)
            loss.backward()
        assert c.syncs == 0, c.sync_ops
        assert c.launches > 0 and torch.isfinite(loss)


def test_presets_resolve_and_flags_override():
    parser = oecl.build_parser
    for name, preset in oecl.PRESETS.items():
        args = harness.parse_args(parser(), oecl.PRESETS, ["--preset", name])
        assert all(getattr(args, k) == v for k, v in preset.items())   # every key is a real argument
        assert all(args.sources[k] == f"preset {name}" for k in preset)
        args = harness.parse_args(parser(), oecl.PRESETS, ["--preset", name, "--epochs", "3", "--alpha", "0.1"])
        assert args.epochs == 3 and args.alpha == 0.1 and args.sources["epochs"] == "command line"
    assert oecl.QUICK["dataset"] == "cifar10" and not oecl.QUICK["oe"].startswith(("folder:", "npy:"))
    assert all(hasattr(harness.parse_args(parser(), {}, []), k) for k in oecl.PAPER_SELF_OECL)


def test_digits_oecl_evaluates_unexposed_classes_and_checkpoint_records_settings(tmp_path):
    # Outliers: training digits 6-7; the OOD test set keeps only the never-seen classes 8-9.
    res = oecl.main(["--oe", "digits", "--oe-classes", "6-7", "--subset", "128", "--epochs", "1", "--n-aug", "2",
                     "--oe-warmup", "0", *TINY, "--out", str(tmp_path)])
    assert set(res["metrics"]) == {"norm", "ensemble", "mean_sq_norm"} and res["method"] == "OECL (outliers: digits classes 6-7)"
    assert set(res["metrics"]["ensemble"]) == {"classes 8-9"} and set(res["baselines"]["pixels_knn"]) == {"classes 8-9"}
    assert 0 <= res["metrics"]["ensemble"]["classes 8-9"]["auroc"] <= 100
    run = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["run"]
    assert run["script"] == "oecl" and run["settings"]["oe"] == "digits" and run["settings"]["self_oe"] is False
    assert "n_aug" not in run["settings"]                               # evaluation only: may change on --resume


def test_select_classes_keeps_the_chosen_labels_in_order():
    x, y = torch.arange(10)[:, None], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    xs, ys = oecl.select_classes(x, y, [1, 3])
    assert ys.tolist() == [1, 3, 1, 3] and xs[:, 0].tolist() == [1, 3, 6, 8]


def test_outliers_from_the_id_data_set_never_include_id_or_evaluated_classes():
    labels = torch.arange(10).repeat(3)
    assert oecl.exposed_classes(labels, [0, 1, 2, 3, 4, 5]) == [6, 7, 8, 9]       # default: all held-out classes
    assert oecl.exposed_classes(labels, [0, 1, 2, 3, 4, 5], "6-7") == [6, 7]
    with pytest.raises(ValueError, match="outside the in-distribution classes 0-5"):
        oecl.exposed_classes(labels, [0, 1, 2, 3, 4, 5], "5-6")
    with pytest.raises(ValueError, match="no class is left"):
        oecl.exposed_classes(labels, list(range(10)))
    test_y = torch.arange(6, 10).repeat(2)
    data = SimpleNamespace(ood={"classes 6-9": test_y.float(), "svhn": torch.zeros(3)},
                           ood_y={"classes 6-9": test_y},
                           ood_names={"classes 6-9": [f"{i}" for i in range(8)], "svhn": ["0", "1", "2"]})
    kept = oecl.without_classes(data, [6, 7])
    assert set(kept.ood) == {"classes 8-9", "svhn"} and torch.equal(kept.ood["classes 8-9"], kept.ood_y["classes 8-9"].float())
    assert kept.ood_names["classes 8-9"] == ["2", "3", "6", "7"] and kept.ood_names["svhn"] == ["0", "1", "2"]
    assert set(kept.ood_y["classes 8-9"].tolist()) == {8, 9}
    assert set(oecl.without_classes(data, [6, 7, 8, 9]).ood) == {"svhn"}          # another OOD set is left
    del data.ood["svhn"]
    with pytest.raises(ValueError, match="leaves no OOD set to evaluate"):
        oecl.without_classes(data, [6, 7, 8, 9])


def test_oe_digits_alone_on_digits_is_refused(tmp_path):
    # The outliers would be every held-out digit, the evaluated OOD set: nothing would be left to evaluate honestly.
    with pytest.raises(SystemExit, match="leaves no OOD set to evaluate"):
        oecl.main(["--oe", "digits", *TINY, "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="--oe digits: expected an outlier set other than --dataset"):
        oecl.main(["--oe", "digits", "--protocol", "one-vs-rest", "--all-classes", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_self_oecl_above_chance_on_digits(tmp_path):
    res = oecl.main(["--epochs", "3", "--batch-size", "32", "--oe-warmup", "1", "--n-aug", "4", "--no-baselines",
                     "--out", str(tmp_path)])                            # 81 steps, ~15 s of one CPU core
    assert res["method"] == "self-OECL" and res["config"]["self_oe"] is True
    auroc = res["metrics"]["ensemble"]["classes 6-9"]["auroc"]
    # Measured with --seed 0-4: 65.1, 66.4, 73.0, 69.0, 66.9 (OMP_NUM_THREADS=1) and 68.8, 61.7, 73.5, 74.9, 67.7
    # (OMP_NUM_THREADS=2). Chance is 50: a score of the wrong sign or an untrained encoder falls to it or below.
    assert auroc > 50, auroc


def test_a_saved_run_scores_as_the_run_did(tmp_path, monkeypatch):
    # The scorer contract: build_model(settings) + the checkpoint's weights + score() give the run's own scores.
    seen, score = [], oecl.score
    monkeypatch.setattr(oecl, "score", lambda *a: seen.append(score(*a)) or seen[-1])   # the run's evaluation
    res = oecl.main(["--subset", "64", "--epochs", "1", "--n-aug", "3", "--no-baselines", *TINY,
                     "--out", str(tmp_path)])
    s = SimpleNamespace(**res["config"])
    model = oecl.build_model(s)
    model.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"])   # strict
    state = oecl.score_state(model)
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    test_x = harness.load_data(s).test_x
    with torch.autocast("cpu", dtype=torch.bfloat16):                    # score() runs in float32 regardless
        again = score(model.eval(), state, test_x[:6], s)
    assert set(again) == set(seen[0]) == {"ensemble", "norm", "mean_sq_norm"}
    for k, v in again.items():                                           # seen[0]: the ID test set, scored whole
        assert v.dtype == torch.float32 and v.shape == (6,)
        assert torch.allclose(v, seen[0][k][:6], rtol=1e-5, atol=1e-6), k
    assert_scores_follow_the_image(oecl.main, tmp_path)                 # Eq. 15's views follow from each image


def test_use_it_in_your_code_block_runs(run_use_it):
    scores = run_use_it(oecl)["scores"]
    assert set(scores) == {"ensemble", "norm", "mean_sq_norm"} and all(v.shape == (8,) for v in scores.values())


def test_outliers_of_another_size_and_count(tmp_path):
    np.save(tmp_path / "oe.npy", np.random.RandomState(0).randint(0, 256, (37, 20, 20, 3), dtype=np.uint8))
    res = oecl.main(["--oe", f"npy:{tmp_path / 'oe.npy'}", "--subset", "96", "--epochs", "1", "--n-aug", "1",
                     "--no-baselines", *TINY, "--out", str(tmp_path / "oe")])  # 37 outliers of 20 px vs 96 of 16 px
    assert 0 <= res["metrics"]["ensemble"]["classes 6-9"]["auroc"] <= 100


def test_outliers_that_are_in_distribution_images_are_refused_by_content(tmp_path):
    x, y, _ = harness.load_dataset("digits", True, size=16)          # the ID training images (classes 0-5) as an array
    np.save(tmp_path / "id.npy", x[y < 6].permute(0, 2, 3, 1).numpy())
    with pytest.raises(SystemExit, match=r"--oe npy:\S+id.npy: 872 of its 872 images are in-distribution images"):
        oecl.main(["--oe", f"npy:{tmp_path / 'id.npy'}", "--epochs", "1", *TINY, "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_bad_input_fails_clearly(tmp_path):
    out = ["--out", str(tmp_path / "never")]
    for argv, msg in ((["--oe", "digits", "--self-oe"], "exactly one of"),
                      (["--no-self-oe"], "exactly one of"),
                      (["--oe", "digits", "--oe-classes", "5-6"], "outside the in-distribution classes"),
                      (["--oe", "digits", "--oe-classes", "six"], "--oe-classes six: expected class ids"),
                      (["--oe-classes", "6"], "--oe SPEC with it"),
                      (["--oe", "npy:/no/such.npy"], "--oe npy:/no/such.npy"),
                      (["--alpha", "-1"], "--alpha -1.0"),
                      (["--crop-scale", "0"], "--crop-scale 0.0"),
                      (["--n-aug", "-1"], "--n-aug -1"),
                      (["--n-aug", "10000000"], "--n-aug 10000000: expected a smaller value"),
                      (["--epochs", "1", "--oe-warmup", "5"], "--oe-warmup 5: expected fewer than --epochs 1"),
                      (["--oe", "digits", "--oe-classes", "0-99999999999"], "--oe-classes 0-99999999999: expected cl"),
                      (["--protocol", "one-vs-rest"], "together"),
                      (["--all-classes"], "together"),
                      (["--protocol", "leave-one-out", "--all-classes", "--id-classes", "3"], "none with --all-classes")):
        with pytest.raises(SystemExit, match=msg):
            oecl.main([*argv, *out])
    assert not (tmp_path / "never").exists()                             # refused before any folder is made


def test_protocol_loops_over_every_class(tmp_path):
    from PIL import Image
    rng = np.random.RandomState(0)
    for c in range(3):                                                   # a labelled folder: 3 classes x 12 images
        (tmp_path / "imgs" / "train" / f"c{c}").mkdir(parents=True)
        (tmp_path / "imgs" / "test" / f"c{c}").mkdir(parents=True)
        for i in range(12):
            for split in ("train", "test"):
                img = Image.fromarray(rng.randint(0, 256, (8, 8, 3), dtype=np.uint8))
                img.save(tmp_path / "imgs" / split / f"c{c}" / f"{i}.png")
    argv = ["--dataset", f"folder:{tmp_path / 'imgs'}", "--protocol", "leave-one-out", "--all-classes",
            "--size", "8", "--width", "2", "--batch-size", "8", "--epochs", "1", "--n-aug", "1",
            "--no-baselines", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "runs")]
    res = oecl.main(argv)
    assert sorted(res["per_class"]) == [0, 1, 2] and (tmp_path / "runs" / "class-2" / "results.json").exists()
    assert all(0 <= m["held-out classes"]["auroc"] <= 100 for m in res["per_class"].values())
    assert set(res["mean_auroc"]) == {"held-out classes"}
    import shutil
    shutil.rmtree(tmp_path / "runs" / "class-2")                        # a class the protocol had not begun
    again = oecl.main(argv + ["--resume"])                               # the others resume their finished runs
    assert again["per_class"][0] == res["per_class"][0] and sorted(again["per_class"]) == [0, 1, 2]
