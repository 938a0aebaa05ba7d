"""One configurable 2D U-Net and its named presets.

The net returns logits (one channel); the sigmoid head is applied by inference and inside the loss, which is the
numerically stable place for it. Module names follow the encoder/decoder layout of
mateuszbuda/brain-segmentation-pytorch so that its published state dict maps onto the ``buda`` preset key by key.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    depth: int = 5  # resolution levels (bottleneck included); filters base_filters .. base_filters * 2**(depth-1)
    base_filters: int = 16
    batch_norm: bool = True
    dropout: float = 0.0  # after the first conv of each block (the tutorial's place)
    in_channels: int = 3
    out_channels: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown U-Net settings: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, UNetConfig] = {
    # The R-torch tutorial's net: 64..1024 filters, ReLU, dropout 0.6 after the first conv, no batch norm.
    "tutorial": UNetConfig(depth=5, base_filters=64, batch_norm=False, dropout=0.6),
    # mateuszbuda/brain-segmentation-pytorch: 32..512 filters, batch norm.
    "buda": UNetConfig(depth=5, base_filters=32, batch_norm=True, dropout=0.0),
    # Fast CPU default: 16..256 filters, batch norm (about 4x cheaper than buda per slice).
    "fast": UNetConfig(depth=5, base_filters=16, batch_norm=True, dropout=0.0),
}


class Block(nn.Module):
    """conv3x3 - [BN] - ReLU - [dropout] - conv3x3 - [BN] - ReLU."""

    def __init__(self, cin: int, cout: int, batch_norm: bool, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)
        self.norm1 = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=not batch_norm)
        self.norm2 = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.relu(self.norm1(self.conv1(x))))
        return self.relu(self.norm2(self.conv2(x)))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | None = None, **overrides):
        super().__init__()
        config = config or PRESETS["fast"]
        if overrides:
            config = UNetConfig(**{**config.to_dict(), **overrides})
        if config.depth < 2 or config.base_filters < 1:
            raise ValueError(f"depth must be >= 2 and base_filters >= 1, got {config}")
        self.config = config
        f = [config.base_filters * 2**i for i in range(config.depth)]
        levels = config.depth - 1  # poolings
        bn, dp = config.batch_norm, config.dropout
        self.encoders = nn.ModuleList(
            [Block(config.in_channels if i == 0 else f[i - 1], f[i], bn, dp) for i in range(levels)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = Block(f[-2], f[-1], bn, dp)
        # upconvs[i] / decoders[i] work at the resolution of encoders[i]
        self.upconvs = nn.ModuleList([nn.ConvTranspose2d(f[i + 1], f[i], 2, stride=2) for i in range(levels)])
        self.decoders = nn.ModuleList([Block(2 * f[i], f[i], bn, dp) for i in range(levels)])
        self.head = nn.Conv2d(f[0], config.out_channels, 1)

    @property
    def size_multiple(self) -> int:
        """H and W must be multiples of this; inference pads to it."""
        return 2 ** (self.config.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input H, W must be multiples of {m}, got {tuple(x.shape[-2:])} (inference pads)")
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for i in reversed(range(self.config.depth - 1)):
            x = self.decoders[i](torch.cat([self.upconvs[i](x), skips[i]], dim=1))
        return self.head(x)


def build(preset: str | None = "fast", **overrides) -> UNet:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return UNet(PRESETS[preset], **overrides)


# ------------------------------------------------------------------------ brain-segmentation-pytorch weights

_BUDA_BLOCK = re.compile(r"^(encoder(\d)|decoder(\d)|bottleneck)\.(?:enc\d|dec\d|bottleneck)(conv|norm)([12])\.(.+)$")
_BUDA_UP = re.compile(r"^upconv(\d)\.(weight|bias)$")


def is_buda_state_dict(state: dict) -> bool:
    return any(k.startswith("encoder1.enc1conv1.") for k in state)


def from_buda_state_dict(state: dict) -> dict:
    """Rename the keys of a mateuszbuda/brain-segmentation-pytorch ``UNet`` state dict to this module's names.

    ``encoder1.enc1conv1.weight`` -> ``encoders.0.conv1.weight``, ``decoder4.dec4norm2.bias`` ->
    ``decoders.3.norm2.bias``, ``upconv4.weight`` -> ``upconvs.3.weight``, ``conv.*`` -> ``head.*``.
    """
    out = {}
    for key, value in state.items():
        if (m := _BUDA_BLOCK.match(key)) is not None:
            if m[2]:
                prefix = f"encoders.{int(m[2]) - 1}"
            elif m[3]:
                prefix = f"decoders.{int(m[3]) - 1}"
            else:
                prefix = "bottleneck"
            out[f"{prefix}.{m[4]}{m[5]}.{m[6]}"] = value
        elif (m := _BUDA_UP.match(key)) is not None:
            out[f"upconvs.{int(m[1]) - 1}.{m[2]}"] = value
        elif key.startswith("conv."):
            out["head." + key[5:]] = value
        else:
            raise KeyError(f"unexpected key in a brain-segmentation-pytorch state dict: {key!r}")
    return out


def buda_config_from_state_dict(state: dict) -> UNetConfig:
    """The ``buda`` preset, with base filters and input channels read from the weights."""
    w = state["encoder1.enc1conv1.weight"]
    depth = len({k.split(".")[0] for k in state if k.startswith("encoder")}) + 1
    return UNetConfig(depth=depth, base_filters=int(w.shape[0]), batch_norm=True, dropout=0.0,
                      in_channels=int(w.shape[1]), out_channels=int(state["conv.weight"].shape[0]))
