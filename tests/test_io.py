"""Reading and writing the LGG layout on real patients."""

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_lgg_seg import io


def copy_patient(src: Path, dst_root: Path, slices=None) -> Path:
    dst = dst_root / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        m = re.match(r".+_(\d+)(_mask)?\.tif$", f.name)
        if slices is None or (m and int(m[1]) in slices):
            shutil.copy(f, dst / f.name)
    return dst


def test_numeric_slice_order_shapes_channels_and_mask_values(sample_dir, sample_patient):
    p = sample_patient
    assert p.patient_id == sample_dir.name
    assert p.image.shape == (20, 256, 256, 3) and p.image.dtype == np.uint8
    assert p.mask.shape == (20, 256, 256) and p.mask.dtype == np.uint8
    assert set(np.unique(p.mask)) == {0, 1}
    # numeric order: slice index z holds file <patient>_<z+1>.tif (a text sort would put 10 after 1)
    assert [f.name for f in p.image_paths[:3]] == [f"{p.patient_id}_{n}.tif" for n in (1, 2, 3)]
    for z in (0, 1, 9, 10, 19):
        raw = tifffile.imread(sample_dir / f"{p.patient_id}_{z + 1}.tif")
        np.testing.assert_array_equal(p.image[z], raw)  # channel order kept: pre-contrast, FLAIR, post-contrast
        raw_mask = tifffile.imread(sample_dir / f"{p.patient_id}_{z + 1}_mask.tif")
        np.testing.assert_array_equal(p.mask[z], raw_mask // 255)


def test_compressed_and_original_tiffs_hold_the_same_pixels(lgg_root, sample_patient):
    original = io.read_patient(lgg_root / "original" / sample_patient.patient_id)
    np.testing.assert_array_equal(original.image, sample_patient.image)
    np.testing.assert_array_equal(original.mask, sample_patient.mask)


def test_kaggle_root_lists_patients(kaggle, split):
    patients = io.list_patients(kaggle)
    assert len(patients) == len(split["train"]) + len(split["val"]) == 81
    assert {p.name for p in patients} == set(split["train"]) | set(split["val"])
    assert io.resolve_inputs([kaggle])[:2] == patients[:2]


def test_writer_round_trip_and_format_of_the_original(lgg_root, sample_patient, tmp_path):
    paths = io.write_masks(sample_patient.mask, tmp_path, sample_patient.patient_id)
    assert len(paths) == 20 and paths[9].name == f"{sample_patient.patient_id}_10_mask.tif"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    orig_dir = lgg_root / "original" / sample_patient.patient_id
    for n in (1, 10, 20):
        ours = tifffile.TiffFile(tmp_path / f"{sample_patient.patient_id}_{n}_mask.tif")
        theirs = tifffile.TiffFile(orig_dir / f"{sample_patient.patient_id}_{n}_mask.tif")
        a, b = ours.pages[0], theirs.pages[0]
        assert (a.shape, a.dtype, a.compression, a.photometric, a.planarconfig, a.bitspersample, a.rowsperstrip) == (
            b.shape, b.dtype, b.compression, b.photometric, b.planarconfig, b.bitspersample, b.rowsperstrip)
        assert len(ours.pages) == 1
        np.testing.assert_array_equal(a.asarray(), b.asarray())  # 0/255, identical pixels
    # the written masks sit beside copies of the images and read back as the same patient
    for f in (lgg_root / "kaggle_3m" / sample_patient.patient_id).glob("*[0-9].tif"):
        shutil.copy(f, tmp_path / f.name)
    back = io.read_patient(tmp_path)
    np.testing.assert_array_equal(back.mask, sample_patient.mask)
    np.testing.assert_array_equal(back.image, sample_patient.image)


def test_writer_refuses_to_overwrite_unless_asked(sample_patient, tmp_path):
    io.write_masks(sample_patient.mask, tmp_path, "P")
    before = (tmp_path / "P_3_mask.tif").read_bytes()
    with pytest.raises(FileExistsError, match=r"P_1_mask\.tif: exists"):
        io.write_masks(np.zeros_like(sample_patient.mask), tmp_path, "P")
    assert (tmp_path / "P_3_mask.tif").read_bytes() == before
    io.write_masks(np.zeros_like(sample_patient.mask), tmp_path, "P", overwrite=True)
    assert tifffile.imread(tmp_path / "P_3_mask.tif").max() == 0


def test_multipage_stack_round_trip(sample_patient, tmp_path):
    path = io.write_mask_stack(sample_patient.mask, tmp_path / "pred_mask.tif")
    stack = io.read_stack(path)
    assert stack.shape == (20, 256, 256)
    np.testing.assert_array_equal(stack // 255, sample_patient.mask)
    with pytest.raises(FileExistsError, match="pred_mask.tif"):
        io.write_mask_stack(sample_patient.mask, path)
    rgb = tmp_path / "volume.tif"
    tifffile.imwrite(rgb, sample_patient.image)
    p = io.read_any(rgb)
    assert p.image.shape == (20, 256, 256, 3) and p.mask is None
    grey = tmp_path / "flair.tif"
    tifffile.imwrite(grey, sample_patient.image[..., 1])
    p = io.read_any(grey)  # FLAIR-only: replicated to three channels
    np.testing.assert_array_equal(p.image[..., 0], sample_patient.image[..., 1])
    np.testing.assert_array_equal(p.image[..., 2], sample_patient.image[..., 1])


def test_single_slice_file_with_its_mask(sample_dir, sample_patient):
    p = io.read_any(sample_dir / f"{sample_patient.patient_id}_12.tif")
    assert p.image.shape == (1, 256, 256, 3)
    np.testing.assert_array_equal(p.image[0], sample_patient.image[11])
    np.testing.assert_array_equal(p.mask[0], sample_patient.mask[11])


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_slice_is_named(sample_dir, tmp_path):
    d = copy_patient(sample_dir, tmp_path, slices=set(range(1, 21)) - {7})
    with pytest.raises(io.LGGFormatError, match=rf"{d.name}_7\.tif: missing slice"):
        io.read_patient(d)


def test_mask_without_image_is_named(sample_dir, tmp_path):
    d = copy_patient(sample_dir, tmp_path, slices=set(range(1, 21)))
    (d / f"{d.name}_20.tif").unlink()
    with pytest.raises(io.LGGFormatError, match=rf"{d.name}_20_mask\.tif: mask without its image"):
        io.read_patient(d)


def test_missing_mask_is_named(sample_dir, tmp_path):
    d = copy_patient(sample_dir, tmp_path)
    (d / f"{d.name}_5_mask.tif").unlink()
    with pytest.raises(io.LGGFormatError, match=rf"{d.name}_5_mask\.tif: missing mask"):
        io.read_patient(d)


def test_mixed_sizes_are_named(sample_dir, tmp_path):
    d = copy_patient(sample_dir, tmp_path)
    big = np.zeros((320, 320, 3), np.uint8)
    tifffile.imwrite(d / f"{d.name}_4.tif", big)
    with pytest.raises(io.LGGFormatError, match=rf"{d.name}_4\.tif: slice is 320x320"):
        io.read_patient(d)


def test_corrupt_file_wrong_channels_and_bad_mask_values(sample_dir, tmp_path):
    d = copy_patient(sample_dir, tmp_path)
    (d / f"{d.name}_2.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(io.LGGFormatError, match=rf"{d.name}_2\.tif: cannot be read as a TIFF"):
        io.read_patient(d)
    tifffile.imwrite(d / f"{d.name}_2.tif", np.zeros((256, 256), np.uint8))
    with pytest.raises(io.LGGFormatError, match=rf"{d.name}_2\.tif: expected an RGB slice"):
        io.read_patient(d)
    shutil.copy(sample_dir / f"{d.name}_2.tif", d / f"{d.name}_2.tif")
    tifffile.imwrite(d / f"{d.name}_3_mask.tif", np.full((256, 256), 7, np.uint8))
    with pytest.raises(io.LGGFormatError, match=rf"{d.name}_3_mask\.tif: mask values must be 0/255"):
        io.read_patient(d)


def test_two_patients_in_one_folder_and_stray_tiff(sample_dir, tmp_path):
    d = copy_patient(sample_dir, tmp_path)
    shutil.copy(d / f"{d.name}_1.tif", d / "OTHER_PATIENT_1.tif")
    with pytest.raises(io.LGGFormatError, match="more than one patient"):
        io.read_patient(d)
    (d / "OTHER_PATIENT_1.tif").unlink()
    shutil.copy(d / f"{d.name}_1.tif", d / "notes.tif")
    with pytest.raises(io.LGGFormatError, match=r"notes\.tif: not an LGG slice name"):
        io.read_patient(d)


def test_non_lgg_folders(tmp_path, kaggle):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(io.NotAnLGGFolder, match=str(tmp_path)):
        io.read_patient(tmp_path)
    assert not io.is_patient_folder(tmp_path)
    assert not io.is_patient_folder(kaggle)  # a root is not a patient
    with pytest.raises(io.NotAnLGGFolder, match="no LGG patient folders"):
        io.list_patients(tmp_path)
    with pytest.raises(io.LGGFormatError, match="does not exist"):
        io.resolve_inputs([tmp_path / "nope"])
