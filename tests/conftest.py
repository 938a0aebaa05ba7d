"""Shared fixtures: the real LGG data in ../shared/lgg (skip where absent, fail under CI) and a small checkpoint
fitted in the test session on a real training patient (so predictions have real structure)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_lgg_seg import checkpoint, io, model, preprocess

ROOT = Path(__file__).resolve().parents[1]
LGG = Path(os.environ.get("LGG_DATA", ROOT.parent / "shared" / "lgg"))
KAGGLE = LGG / "kaggle_3m"
SAMPLE = "TCGA_CS_5393_19990606"  # 20 slices, val split, also in original/


def _need_data():
    if not KAGGLE.is_dir():
        reason = f"LGG data not found at {LGG} (set LGG_DATA to the folder holding kaggle_3m/)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + "; CI must run the data tests")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def lgg_root() -> Path:
    _need_data()
    return LGG


@pytest.fixture(scope="session")
def kaggle(lgg_root) -> Path:
    return lgg_root / "kaggle_3m"


@pytest.fixture(scope="session")
def split(lgg_root) -> dict:
    return json.loads((lgg_root / "split.json").read_text())


@pytest.fixture(scope="session")
def sample_dir(kaggle) -> Path:
    return kaggle / SAMPLE


@pytest.fixture(scope="session")
def sample_patient(sample_dir) -> io.Patient:
    return io.read_patient(sample_dir)


def fit_small(patients: list[io.Patient], steps: int = 60, seed: int = 0) -> checkpoint.Checkpoint:
    """A few dozen Adam steps of a tiny U-Net at 128x128 on real slices: enough for a non-trivial outline in a
    few seconds. A test fixture, not the training pipeline."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = model.UNet(model.UNetConfig(depth=4, base_filters=8, batch_norm=True))
    xs, ys = [], []
    for p in patients:
        x = preprocess.preprocess(p.image)
        keep = np.flatnonzero(p.mask.any(axis=(1, 2)))
        keep = np.concatenate([keep, rng.choice(p.n_slices, size=max(2, len(keep) // 3), replace=False)])
        xs.append(x[keep]), ys.append(p.mask[keep])
    x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.concatenate(ys)).float()[:, None]
    x = torch.nn.functional.interpolate(x, size=(128, 128), mode="bilinear", antialias=True)
    y = torch.nn.functional.interpolate(y, size=(128, 128), mode="bilinear")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(x), size=min(16, len(x)), replace=False))
        logits = net(x[idx])
        prob = torch.sigmoid(logits)
        dice = 1 - (2 * (prob * y[idx]).sum() + 1) / (prob.sum() + y[idx].sum() + 1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx]) + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return checkpoint.Checkpoint.from_model(net, input_size=(128, 128), training={"note": "test fixture"})


@pytest.fixture(scope="session")
def small_ckpt(kaggle, split) -> checkpoint.Checkpoint:
    train = [io.read_patient(kaggle / pid) for pid in split["train"][:2]]
    return fit_small(train)


@pytest.fixture(scope="session")
def small_ckpt_file(small_ckpt, tmp_path_factory) -> Path:
    return checkpoint.save(small_ckpt, tmp_path_factory.mktemp("ckpt") / "small.pt")
