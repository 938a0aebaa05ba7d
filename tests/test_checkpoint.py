"""Checkpoints: one weights-only file holding the model, its preprocessing and its use."""

import pytest
import torch

from napari_lgg_seg import checkpoint, model, preprocess
from test_model import buda_state_dict


def make_ckpt(seed=0, **kwargs):
    torch.manual_seed(seed)
    net = model.UNet(model.UNetConfig(depth=3, base_filters=4, dropout=0.1))
    return net, checkpoint.Checkpoint.from_model(net, preset=None, **kwargs)


def test_save_load_round_trip_weights_only(tmp_path):
    net, ckpt = make_ckpt(threshold=0.4, input_size=(128, 128), training={"epochs": 3, "val_dsc": 0.5})
    path = checkpoint.save(ckpt, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)  # plain tensors and builtins only
    assert raw["format"] == checkpoint.FORMAT and raw["preprocessing"] == preprocess.DEFAULT
    assert raw["channels"] == ["pre-contrast", "FLAIR", "post-contrast"]
    back = checkpoint.load(path)
    assert back.config == net.config and back.threshold == 0.4 and back.input_size == (128, 128)
    assert back.training == {"epochs": 3, "val_dsc": 0.5} and back.source == str(path)
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(back.build_model()(x), net.eval()(x))


def test_fp16_storage_is_cast_back(tmp_path):
    net, ckpt = make_ckpt()
    path = checkpoint.save(ckpt, tmp_path / "half.pt", half=True)
    assert torch.load(path, weights_only=True)["state_dict"]["head.weight"].dtype == torch.float16
    back = checkpoint.load(path).build_model()
    assert back.head.weight.dtype == torch.float32
    torch.testing.assert_close(back.head.weight, net.head.weight, atol=1e-3, rtol=1e-3)


def test_refuses_to_overwrite(tmp_path):
    _, ckpt = make_ckpt()
    path = checkpoint.save(ckpt, tmp_path / "m.pt")
    with pytest.raises(FileExistsError, match="m.pt: exists"):
        checkpoint.save(ckpt, path)
    checkpoint.save(ckpt, path, overwrite=True)


def test_pickled_whole_model_is_refused_with_conversion_recipe(tmp_path):
    net, _ = make_ckpt()
    path = tmp_path / "whole.pt"
    torch.save(net, path)  # what torch.save(model) / the tutorial's torch_save(model) makes
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(path)
    msg = str(err.value)
    assert str(path) in msg and "pickled whole model" in msg and "m.state_dict()" in msg and "checkpoint.save" in msg


def test_buda_state_dict_file_loads_as_buda_preset(tmp_path):
    ref, state = buda_state_dict()
    path = tmp_path / "unet.pt"
    torch.save(state, path)
    ckpt = checkpoint.load(path)
    assert ckpt.preset == "buda" and ckpt.preprocessing["mode"] == "buda"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(torch.sigmoid(ckpt.build_model()(x)), ref(x), atol=1e-5, rtol=1e-4)


def test_other_bad_files(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        checkpoint.load(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(checkpoint.CheckpointError, match="junk.pt: not a readable torch checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    net, _ = make_ckpt()
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(checkpoint.CheckpointError, match="bare.pt: a bare state dict"):
        checkpoint.load(tmp_path / "bare.pt")
    _, ckpt = make_ckpt()
    d = ckpt.to_dict()
    d["model"]["config"]["base_filters"] = 8
    torch.save(d, tmp_path / "mismatch.pt")
    with pytest.raises(checkpoint.CheckpointError, match="mismatch.pt: weights do not fit"):
        checkpoint.load(tmp_path / "mismatch.pt")
    d = ckpt.to_dict()
    d["preprocessing"] = {"mode": "magic", "params": {}}
    torch.save(d, tmp_path / "mode.pt")
    with pytest.raises(checkpoint.CheckpointError, match="unknown preprocessing mode 'magic'"):
        checkpoint.load(tmp_path / "mode.pt")
