"""The U-Net presets and the mapping of brain-segmentation-pytorch weights."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from napari_lgg_seg import inference, model


@pytest.mark.parametrize("preset", list(model.PRESETS))
def test_every_preset_on_odd_sizes(preset):
    torch.manual_seed(0)
    net = model.build(preset).eval()
    cfg = model.PRESETS[preset]
    assert net.encoders[0].conv1.out_channels == cfg.base_filters
    assert net.bottleneck.conv2.out_channels == cfg.base_filters * 2 ** (cfg.depth - 1)
    x = torch.randn(2, 3, 48, 80)
    assert net(x).shape == (2, 1, 48, 80)
    with torch.inference_mode():  # inference pads odd sizes to a multiple of 16 and crops back
        p = inference._forward_probs(net, torch.randn(2, 3, 37, 53), "fp32", tta=False, input_size=None, out_hw=(37, 53))
    assert p.shape == (2, 37, 53) and float(p.min()) >= 0 and float(p.max()) <= 1
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 3, 37, 53))


def test_tutorial_preset_is_the_seed_recipe():
    net = model.build("tutorial")
    assert [e.conv1.out_channels for e in net.encoders] + [net.bottleneck.conv1.out_channels] == [64, 128, 256, 512, 1024]
    assert isinstance(net.encoders[0].drop, nn.Dropout2d) and net.encoders[0].drop.p == 0.6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(isinstance(u, nn.ConvTranspose2d) for u in net.upconvs)


class BudaUNet(nn.Module):
    """The module layout of mateuszbuda/brain-segmentation-pytorch ``unet.py`` (names matter, not weights)."""

    def __init__(self, in_channels=3, out_channels=1, init_features=32):
        super().__init__()
        f = init_features
        self.encoder1 = self._block(in_channels, f, "enc1")
        self.pool1 = nn.MaxPool2d(2, 2)
        self.encoder2 = self._block(f, f * 2, "enc2")
        self.pool2 = nn.MaxPool2d(2, 2)
        self.encoder3 = self._block(f * 2, f * 4, "enc3")
        self.pool3 = nn.MaxPool2d(2, 2)
        self.encoder4 = self._block(f * 4, f * 8, "enc4")
        self.pool4 = nn.MaxPool2d(2, 2)
        self.bottleneck = self._block(f * 8, f * 16, "bottleneck")
        self.upconv4 = nn.ConvTranspose2d(f * 16, f * 8, 2, stride=2)
        self.decoder4 = self._block(f * 16, f * 8, "dec4")
        self.upconv3 = nn.ConvTranspose2d(f * 8, f * 4, 2, stride=2)
        self.decoder3 = self._block(f * 8, f * 4, "dec3")
        self.upconv2 = nn.ConvTranspose2d(f * 4, f * 2, 2, stride=2)
        self.decoder2 = self._block(f * 4, f * 2, "dec2")
        self.upconv1 = nn.ConvTranspose2d(f * 2, f, 2, stride=2)
        self.decoder1 = self._block(f * 2, f, "dec1")
        self.conv = nn.Conv2d(f, out_channels, 1)

    def forward(self, x):
        e1 = self.encoder1(x)
        e2 = self.encoder2(self.pool1(e1))
        e3 = self.encoder3(self.pool2(e2))
        e4 = self.encoder4(self.pool3(e3))
        b = self.bottleneck(self.pool4(e4))
        d4 = self.decoder4(torch.cat((self.upconv4(b), e4), dim=1))
        d3 = self.decoder3(torch.cat((self.upconv3(d4), e3), dim=1))
        d2 = self.decoder2(torch.cat((self.upconv2(d3), e2), dim=1))
        d1 = self.decoder1(torch.cat((self.upconv1(d2), e1), dim=1))
        return torch.sigmoid(self.conv(d1))

    @staticmethod
    def _block(cin, f, name):
        return nn.Sequential(OrderedDict([
            (name + "conv1", nn.Conv2d(cin, f, 3, padding=1, bias=False)),
            (name + "norm1", nn.BatchNorm2d(f)),
            (name + "relu1", nn.ReLU(inplace=True)),
            (name + "conv2", nn.Conv2d(f, f, 3, padding=1, bias=False)),
            (name + "norm2", nn.BatchNorm2d(f)),
            (name + "relu2", nn.ReLU(inplace=True)),
        ]))


def buda_state_dict(seed=0) -> dict:
    torch.manual_seed(seed)
    ref = BudaUNet()
    for m in ref.modules():  # non-trivial running statistics, so a mix-up of norm keys would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return ref.eval(), ref.state_dict()


def test_buda_state_dict_maps_key_by_key_and_computes_the_same():
    ref, state = buda_state_dict()
    assert "encoder1.enc1conv1.weight" in state and "decoder4.dec4norm2.running_var" in state
    mapped = model.from_buda_state_dict(state)
    net = model.UNet(model.buda_config_from_state_dict(state))
    assert net.config == model.PRESETS["buda"]
    net.load_state_dict(mapped, strict=True)  # every key used, none missing
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(torch.sigmoid(net(x)), ref(x), atol=1e-5, rtol=1e-4)


def test_foreign_key_is_refused():
    _, state = buda_state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="extra.weight"):
        model.from_buda_state_dict(state)
