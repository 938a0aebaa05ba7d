"""The lgg-seg command line on a real patient, in a subprocess as a lab would run it."""

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_lgg_seg import inference, io, metrics


def lgg_seg(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "napari_lgg_seg.cli", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"lgg-seg {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_console_script_is_installed():
    exe = shutil.which("lgg-seg")
    assert exe is not None
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "predict" in out.stdout and "evaluate" in out.stdout


def test_predict_then_evaluate(tmp_path, sample_dir, sample_patient, small_ckpt, small_ckpt_file):
    # images only: the CLI must not need the mask files
    images = tmp_path / "in" / sample_dir.name
    images.mkdir(parents=True)
    for f in sample_dir.glob("*[0-9].tif"):
        shutil.copy(f, images / f.name)
    out = tmp_path / "pred"
    proc = lgg_seg("predict", images, "--output", out, "--model", small_ckpt_file, "--device", "cpu",
                   "--precision", "fp32", "--batch-size", "8")
    pid = sample_patient.patient_id
    assert f"{pid}: 20 slices" in proc.stdout and "done: 1 patients, 20 slices" in proc.stdout
    files = sorted((out / pid).iterdir())
    assert len(files) == 20
    first = tifffile.imread(out / pid / f"{pid}_1_mask.tif")
    assert first.dtype == np.uint8 and first.shape == (256, 256) and set(np.unique(first)) <= {0, 255}
    expected = inference.segment(sample_patient.image, small_ckpt, device="cpu", precision="fp32").labels
    np.testing.assert_array_equal(io.read_stack(out / pid / f"{pid}_12_mask.tif")[0] // 255, expected[11])

    again = lgg_seg("predict", images, "--output", out, "--model", small_ckpt_file, check=False)
    assert again.returncode == 2 and f"{pid}_1_mask.tif: exists" in again.stderr and "--overwrite" in again.stderr

    csv_path = tmp_path / "scores.csv"
    ev = lgg_seg("evaluate", out, sample_dir.parent, "--csv", csv_path)
    dsc = metrics.dice(expected, sample_patient.mask)
    assert f"{pid}  DSC {dsc:.4f}" in ev.stdout and "patients: 1" in ev.stdout
    rows = list(csv.DictReader(csv_path.open()))
    assert rows[0]["patient"] == pid and float(rows[0]["dsc"]) == pytest.approx(dsc)
    assert float(rows[0]["hd95"]) == pytest.approx(metrics.hd95(expected, sample_patient.mask))


def test_predict_on_a_tiff_stack_and_options(tmp_path, sample_patient, small_ckpt_file):
    stack = tmp_path / "volume.tif"
    tifffile.imwrite(stack, sample_patient.image[5:15])
    out = tmp_path / "pred"
    lgg_seg("predict", stack, "-o", out, "-m", small_ckpt_file, "--tta", "--no-postprocess", "--threshold", "0.4")
    assert len(list((out / "volume").glob("volume_*_mask.tif"))) == 10


def test_bad_inputs_give_clear_errors(tmp_path, small_ckpt_file):
    missing = lgg_seg("predict", tmp_path / "nope", "-o", tmp_path / "o", "-m", small_ckpt_file, check=False)
    assert missing.returncode == 2 and "nope: does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = lgg_seg("predict", tmp_path / "empty", "-o", tmp_path / "o", "-m", small_ckpt_file, check=False)
    assert empty.returncode == 2 and "no LGG patient folders" in empty.stderr
    bad_model = tmp_path / "m.pt"
    bad_model.write_bytes(b"x")
    bm = lgg_seg("predict", tmp_path / "empty", "-o", tmp_path / "o", "-m", bad_model, check=False)
    assert bm.returncode == 2 and "m.pt: not a readable torch checkpoint" in bm.stderr
