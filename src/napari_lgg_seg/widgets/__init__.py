"""napari dock widgets (thin layers over the core)."""
