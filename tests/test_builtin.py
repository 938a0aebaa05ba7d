"""The built-in model: ships in the package, loads offline with weights_only, records its preprocessing, and
segments the bundled sample (a `val` patient) well above a floor (a guard against a broken file or drift)."""

import subprocess
import sys

import numpy as np
import torch

from napari_lgg_seg import _sample_data, checkpoint, inference, io, metrics, preprocess

FLOOR = 0.75  # measured on the bundled sample: see MODEL_CARD.md; far below it means something broke


def test_builtin_loads_offline_with_weights_only():
    assert checkpoint.has_builtin()
    assert checkpoint.BUILTIN_FILE.stat().st_size < 8 * 2**20  # a few MB
    raw = torch.load(checkpoint.BUILTIN_FILE, map_location="cpu", weights_only=True)
    assert raw["format"] == checkpoint.FORMAT
    ckpt = checkpoint.load_builtin()
    assert ckpt.source == "built-in" and ckpt.input_size == (128, 128)
    assert ckpt.training["data"]["val_patients"] and _sample_data.SAMPLE_PATIENT in ckpt.training["data"]["val_patients"]


def test_builtin_records_the_preprocessing_inference_uses():
    ckpt = checkpoint.load_builtin()
    assert ckpt.preprocessing == preprocess.DEFAULT
    vol = io.read_patient(_sample_data.sample_path()).image[8:12]
    a = inference.segment(vol, ckpt, precision="fp32", keep_largest=False)
    b = inference.segment(vol, ckpt.build_model(), precision="fp32", keep_largest=False,
                          preprocessing=ckpt.preprocessing, input_size=ckpt.input_size)
    np.testing.assert_array_equal(a.probabilities, b.probabilities)


def test_builtin_segments_the_bundled_sample():
    p = io.read_patient(_sample_data.sample_path())
    res = inference.segment(p.image, checkpoint.load_builtin())
    assert metrics.dice(res.labels, p.mask) > FLOOR


def test_sample_command_and_default_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "napari_lgg_seg.cli", "sample", "--output", str(tmp_path / "s"),
                           "--no-view"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "per-volume DSC vs the sample's own masks" in proc.stdout and "built-in" in proc.stdout
    dsc = float(proc.stdout.split("masks: ")[1].split()[0])
    assert dsc > FLOOR
    assert len(list((tmp_path / "s" / _sample_data.SAMPLE_PATIENT).glob("*_mask.tif"))) == 20
    pred = subprocess.run([sys.executable, "-m", "napari_lgg_seg.cli", "predict", str(_sample_data.sample_path()),
                           "--output", str(tmp_path / "p")], capture_output=True, text=True)
    assert pred.returncode == 0, pred.stderr
    assert "built-in" not in pred.stderr and len(list((tmp_path / "p").rglob("*_mask.tif"))) == 20
