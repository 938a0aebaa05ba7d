"""napari-lgg-seg: segment lower-grade glioma in brain MRI with a U-Net (napari plugin and ``lgg-seg`` CLI)."""

__version__ = "0.1.0"
