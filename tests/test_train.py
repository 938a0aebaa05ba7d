"""The training engine on real patients: sampling, augmentation, loss going down, checkpoints, resume, cancel,
fine-tuning on listed slices only, and DDP with two gloo processes."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_lgg_seg import checkpoint, data, inference, io, preprocess, train


@pytest.fixture(scope="session")
def two_train(kaggle, split):
    return [io.read_patient(kaggle / pid) for pid in split["train"][:2]]


def samples(patients, slices=None):
    return [data.Sample.from_arrays(p.patient_id, p.image, p.mask, preprocess.DEFAULT, slices) for p in patients]


def tiny_config(**kw):
    base = dict(preset="fast", input_size=(64, 64), epochs=3, steps_per_epoch=6, batch_size=8, precision="fp32",
                device="cpu", seed=1)
    base.update(kw)
    return train.TrainConfig(**base)


def run(gen, events=None):
    return inference.run(gen, events.append if events is not None else None)


def test_sampling_weights_formula():
    areas = np.array([0, 0, 100, 300, 0])
    w = data.slice_weights(areas)
    total, n = 400, 5
    np.testing.assert_allclose(w, (areas + 0.1 * total / n) / (1.1 * total))
    assert w.sum() == pytest.approx(1.0) and w[3] > w[2] > w[0] > 0
    np.testing.assert_allclose(data.slice_weights(np.zeros(4)), 0.25)


def test_sampling_draws_abnormal_slices_often(two_train):
    index = data.SliceIndex(samples(two_train))
    draws = index.draw(20000, torch.Generator().manual_seed(0))
    abnormal = np.array([index.samples[i].mask[z].any() for i, z in index.pairs])
    frac = abnormal[draws].mean()
    expected = index.weights[abnormal].sum()
    assert frac == pytest.approx(expected, abs=0.02) and expected > abnormal.mean()


def test_augmentation_keeps_image_and_mask_aligned(two_train):
    p = two_train[0]
    z = int(np.argmax(p.mask.sum(axis=(1, 2))))
    y = torch.from_numpy(p.mask[[z] * 8]).float()[:, None]
    x = torch.cat([y, torch.from_numpy(p.image[[z] * 8, ..., :2]).float().permute(0, 3, 1, 2) / 255], dim=1)
    aug = data.Augment(scale=0.05, rotate=15, flip=True)
    xa, ya = aug(x, y, torch.Generator().manual_seed(3), background=torch.zeros(1, 3, 1, 1))
    # channel 0 of the image *is* the mask: any drift between the two transforms would show here
    torch.testing.assert_close(xa[:, 0:1], ya, atol=1e-6, rtol=0)
    assert not torch.allclose(ya, y)  # it did transform
    assert len({tuple(ya[i].flatten()[::97].tolist()) for i in range(8)}) == 8  # per-slice parameters
    off = data.Augment(enabled=False)
    assert off(x, y, torch.Generator())[0] is x


def test_short_training_lowers_the_loss_and_is_reproducible(two_train, sample_patient, tmp_path):
    tr, va = samples(two_train), samples([sample_patient])
    ev = []
    res = run(train.iter_train(tr, va, tiny_config(epochs=4), tmp_path / "a"), ev)
    reports = [e for e in ev if isinstance(e, train.EpochReport)]
    assert len(reports) == 4 and [e.epoch for e in reports] == [1, 2, 3, 4]
    assert reports[-1].train["loss"] < reports[0].train["loss"]
    assert any(isinstance(e, train.StepProgress) and e.eta_s >= 0 for e in ev)
    assert 0 <= reports[-1].val["dsc_mean"] <= 1 and sample_patient.patient_id in reports[-1].val["dsc"]
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert files == ["best.pt", "curves.png", "epoch_002.pt", "epoch_003.pt", "epoch_004.pt", "metrics.csv"]
    best = checkpoint.load(tmp_path / "a" / "best.pt")
    assert best.training["epochs"] == max(res.history, key=lambda r: r["val_dsc_mean"])["epoch"]
    assert best.preprocessing == preprocess.DEFAULT and best.input_size == (64, 64)
    assert "resume" not in best.training  # the model file carries no optimiser state
    exported = tmp_path / "model.pt"
    proc = subprocess.run([sys.executable, "-m", "napari_lgg_seg.cli", "export", str(tmp_path / "a" / "epoch_004.pt"),
                           "--output", str(exported), "--half"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    small = checkpoint.load(exported)
    assert "resume" not in small.training and small.training["epochs"] == 4
    assert torch.load(exported, weights_only=True)["state_dict"]["head.weight"].dtype == torch.float16
    again = run(train.iter_train(tr, va, tiny_config(epochs=4), tmp_path / "b"))
    assert [r["train_loss"] for r in again.history] == [r["train_loss"] for r in res.history]
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run(train.iter_train(tr, va, tiny_config(epochs=1), tmp_path / "a"))


def test_resume_gives_the_same_next_epoch(two_train, sample_patient, tmp_path):
    tr, va = samples(two_train), samples([sample_patient])
    full = run(train.iter_train(tr, va, tiny_config(optimizer="sgd"), tmp_path / "full"))
    cancel = {"stop": False}
    gen = train.iter_train(tr, va, tiny_config(optimizer="sgd"), tmp_path / "cut", cancel=lambda: cancel["stop"])
    with pytest.raises(inference.Cancelled):
        for ev in gen:  # interrupt during epoch 3, after epoch 2 was saved
            if isinstance(ev, train.StepProgress) and ev.epoch == 3:
                cancel["stop"] = True
    assert (tmp_path / "cut" / "epoch_002.pt").exists() and not (tmp_path / "cut" / "epoch_003.pt").exists()
    resumed = run(train.iter_train(tr, va, tiny_config(), tmp_path / "cut", resume=tmp_path / "cut" / "epoch_002.pt"))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[2]["train_loss"] == pytest.approx(full.history[2]["train_loss"], abs=1e-6)
    assert resumed.history[2]["val_dsc_mean"] == pytest.approx(full.history[2]["val_dsc_mean"], abs=1e-6)
    a = checkpoint.load(tmp_path / "full" / "epoch_003.pt").state_dict
    b = checkpoint.load(tmp_path / "cut" / "epoch_003.pt").state_dict
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_cancel_leaves_the_starting_model_untouched(two_train, small_ckpt):
    before = {k: v.clone() for k, v in small_ckpt.state_dict.items()}
    gen = train.iter_finetune(small_ckpt, samples(two_train), steps=20, device="cpu", precision="fp32",
                              cancel=lambda: True)
    with pytest.raises(inference.Cancelled):
        run(gen)
    for k, v in small_ckpt.state_dict.items():
        assert torch.equal(v, before[k])


def test_finetune_uses_only_the_listed_slices(two_train, small_ckpt):
    p = two_train[0]
    listed = [int(z) for z in np.flatnonzero(p.mask.any(axis=(1, 2)))[:3]]
    other = np.ones_like(p.mask)  # a different truth everywhere except the listed slices
    other[listed] = p.mask[listed]
    results = []
    for mask in (p.mask, other):
        s = data.Sample.from_arrays(p.patient_id, p.image, mask, small_ckpt.preprocessing, listed)
        results.append(run(train.iter_finetune(small_ckpt, [s], steps=10, device="cpu", precision="fp32")))
    a, b = (r.checkpoint.state_dict for r in results)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    changed = any(not torch.equal(a[k], small_ckpt.state_dict[k]) for k in a if a[k].is_floating_point())
    assert changed
    assert results[0].checkpoint.training["data"]["finetune_slices"] == {p.patient_id: [z + 1 for z in listed]}


def test_finetune_cli_records_parent_and_refuses_to_overwrite_the_start(tmp_path, two_train, kaggle, small_ckpt_file):
    folder = kaggle / two_train[0].patient_id
    out = tmp_path / "tuned.pt"
    cmd = [sys.executable, "-m", "napari_lgg_seg.cli", "finetune", "--model", str(small_ckpt_file), "--data",
           str(folder), "--output", str(out), "--slices", "8-10,12", "--steps", "5", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fine-tuned on 4 slices of 1 patients" in proc.stdout
    tuned = checkpoint.load(out)
    assert tuned.parent == str(small_ckpt_file)
    assert tuned.training["data"]["finetune_slices"] == {two_train[0].patient_id: [8, 9, 10, 12]}
    cmd[cmd.index("--output") + 1] = str(small_ckpt_file)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "is the starting model" in proc.stderr
    bad = subprocess.run(cmd[:-6] + ["--output", str(tmp_path / "x.pt"), "--slices", "3-999"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "outside 1.." in bad.stderr
    assert data.parse_slices("12-14, 3", 20) == [2, 11, 12, 13] and data.parse_slices(None, 5) is None


def test_train_cli_with_split_file(tmp_path, kaggle, split):
    import json

    names = split["train"][:2] + split["val"][:1]
    root = tmp_path / "data"
    root.mkdir()
    for n in names:
        os.symlink(kaggle / n, root / n)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": names[:2], "val": names[2:]}))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "napari_lgg_seg.cli", "train", str(root), "--split", str(split_file),
                           "--output", str(out), "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "4",
                           "--input-size", "64", "--device", "cpu", "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("epoch")]
    assert len(lines) == 2 and "val DSC mean" in lines[0]
    assert (out / "metrics.csv").read_text().count("\n") == 3 and (out / "curves.png").stat().st_size > 1000
    ck = checkpoint.load(out / "best.pt")
    assert ck.training["data"]["train_patients"] == names[:2] and ck.training["data"]["val_patients"] == names[2:]


def test_ddp_two_gloo_processes(tmp_path, kaggle, split):
    root = tmp_path / "data"
    root.mkdir()
    for n in split["train"][:2] + split["val"][:1]:
        os.symlink(kaggle / n, root / n)
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "napari_lgg_seg.train", str(root),
                           "--val-patients", "1", "--output", str(out), "--epochs", "2", "--steps-per-epoch", "2",
                           "--batch-size", "4", "--input-size", "64", "--device", "cpu", "--precision", "fp32",
                           "--cache", str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(l.startswith("epoch") for l in proc.stdout.splitlines()) == 2  # rank 0 reports, once per epoch
    ck = checkpoint.load(out / "best.pt")
    assert ck.training["world_size"] == 2
    assert (out / "metrics.csv").read_text().count("\n") == 3
