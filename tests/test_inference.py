"""Inference on a real patient: precision, batching, subsets, TTA, post-processing, progress, cancel, OOM."""

import threading

import numpy as np
import pytest
import torch

from napari_lgg_seg import inference, metrics, model


def test_fp32_and_bf16_agree_on_a_real_patient(sample_patient, small_ckpt):
    fp32 = inference.segment(sample_patient.image, small_ckpt, device="cpu", precision="fp32")
    bf16 = inference.segment(sample_patient.image, small_ckpt, device="cpu", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    # Stated tolerance: bf16 keeps 8 mantissa bits; probabilities within 0.1 anywhere, 0.01 on average, and the
    # masks agree with DSC >= 0.98.
    diff = np.abs(fp32.probabilities - bf16.probabilities)
    assert diff.max() < 0.1 and diff.mean() < 0.01
    assert metrics.dice(fp32.labels, bf16.labels) >= 0.98
    assert metrics.dice(fp32.labels, sample_patient.mask) > 0.3  # the fixture learned something real


def test_batch_size_and_slice_subset_do_not_change_the_result(sample_patient, small_ckpt):
    ref = inference.segment(sample_patient.image, small_ckpt, precision="fp32", batch_size=16, keep_largest=False)
    one = inference.segment(sample_patient.image, small_ckpt, precision="fp32", batch_size=3, keep_largest=False)
    np.testing.assert_allclose(one.probabilities, ref.probabilities, atol=1e-5)
    # a volume's statistics are taken over the whole volume: segmenting it reversed gives the reversed result
    rev = inference.segment(sample_patient.image[::-1], small_ckpt, precision="fp32", keep_largest=False)
    np.testing.assert_allclose(rev.probabilities[::-1], ref.probabilities, atol=1e-5)


def test_odd_sizes_and_native_resolution(sample_patient):
    torch.manual_seed(0)
    net = model.UNet(model.UNetConfig(depth=3, base_filters=4))
    vol = sample_patient.image[8:11, 3:250, 5:200]  # 247 x 195
    res = inference.segment(vol, net, precision="fp32")
    assert res.probabilities.shape == res.labels.shape == (3, 247, 195)
    assert res.probabilities.dtype == np.float32 and res.labels.dtype == np.uint8
    one = inference.segment(sample_patient.image[10], net, precision="fp32")  # a single (H, W, 3) slice
    assert one.labels.shape == (1, 256, 256)


def test_tta_threshold_and_postprocessing(sample_patient, small_ckpt):
    plain = inference.segment(sample_patient.image, small_ckpt, precision="fp32", keep_largest=False)
    tta = inference.segment(sample_patient.image, small_ckpt, precision="fp32", keep_largest=False, tta=True)
    assert not np.allclose(plain.probabilities, tta.probabilities)
    assert metrics.dice(plain.labels, tta.labels) > 0.8
    high = inference.segment(sample_patient.image, small_ckpt, precision="fp32", keep_largest=False, threshold=0.9)
    assert high.labels.sum() < plain.labels.sum()
    np.testing.assert_array_equal(high.labels, (plain.probabilities >= 0.9).astype(np.uint8))


def test_postprocess_keeps_largest_component_and_min_size():
    vol = np.zeros((4, 20, 20), np.uint8)
    vol[0:3, 2:8, 2:8] = 1  # 108 voxels
    vol[1, 15:17, 15:17] = 1  # 4 voxels
    vol[3, 12:15, 2:5] = 1  # 9 voxels, touches nothing
    largest = inference.postprocess(vol, keep_largest=True)
    assert largest.sum() == 108 and largest[1, 15, 15] == 0
    small_gone = inference.postprocess(vol, keep_largest=False, min_size=5)
    assert small_gone.sum() == 117
    assert inference.postprocess(vol, keep_largest=False, min_size=0).sum() == vol.sum()
    assert inference.postprocess(vol, keep_largest=True, min_size=200).sum() == 0


def test_progress_and_cancel(sample_patient, small_ckpt):
    seen = []
    inference.segment(sample_patient.image, small_ckpt, batch_size=8, progress=seen.append)
    assert [p.done for p in seen] == [0, 8, 16, 20] and all(p.total == 20 for p in seen)
    cancel = threading.Event()
    gen = inference.iter_segment(sample_patient.image, small_ckpt, batch_size=4, cancel=cancel)
    next(gen), next(gen)
    cancel.set()
    with pytest.raises(inference.Cancelled):
        next(gen)


class OOMOnLargeBatches(model.UNet):
    """Raises torch's own out-of-memory error for batches over 4 slices, as a full GPU would."""

    def forward(self, x):
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return super().forward(x)


def test_out_of_memory_retries_with_smaller_batches(sample_patient):
    torch.manual_seed(0)
    cfg = model.UNetConfig(depth=3, base_filters=4)
    net = OOMOnLargeBatches(cfg)
    res = inference.segment(sample_patient.image, net, precision="fp32", batch_size=16)
    assert res.batch_size == 4
    plain = model.UNet(cfg)
    plain.load_state_dict(net.state_dict())
    ref = inference.segment(sample_patient.image, plain, precision="fp32", batch_size=16)
    np.testing.assert_allclose(res.probabilities, ref.probabilities, atol=1e-5)


def test_device_and_precision_selection():
    cpu = torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert inference.resolve_device("auto") == cpu
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            inference.resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown precision"):
        inference.resolve_precision("fp8", cpu)
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        inference.resolve_precision("fp16", cpu)
    # auto on the CPU: bf16 only with native bf16 instructions
    expected = "bf16" if inference.cpu_has_native_bf16() else "fp32"
    assert inference.resolve_precision("auto", cpu) == expected
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert inference.resolve_precision("auto", cuda) == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(sample_patient, small_ckpt):
    cpu = inference.segment(sample_patient.image, small_ckpt, device="cpu", precision="fp32")
    for prec in ("fp32", "bf16", "fp16"):
        gpu = inference.segment(sample_patient.image, small_ckpt, device="cuda", precision=prec)
        assert gpu.device == "cuda"
        assert metrics.dice(gpu.labels, cpu.labels) >= 0.98
