"""Sample data: one real patient of the LGG dataset, shipped with the package (see README for the citation)."""

from __future__ import annotations

from pathlib import Path

from . import io
from ._reader import patient_layers

SAMPLE_PATIENT = "TCGA_CS_5393_19990606"


def sample_path() -> Path:
    return Path(__file__).parent / "sample_data" / SAMPLE_PATIENT


def sample_patient():
    return patient_layers(io.read_patient(sample_path()))
