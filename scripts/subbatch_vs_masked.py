"""Hard sub-batch vs masked outputs of a dsn in true float32 (TF32 off, as attacks run), for the GPU scripts.

    python scripts/subbatch_vs_masked.py DEVICE [DEPTH_N] [WIDTH] [OUT_JSON]

Same random decisions executed both ways on 256 random images: the paths must be equal and the fine logits within
1e-5 relative. Prints one line, writes the figures to OUT_JSON when given, exits 1 when they differ.
"""
from __future__ import annotations

import json
import sys

import torch

from models.registry import create_model
from robustness.core.runtime import true_float32

TOLERANCE = 1e-5


def main(argv: list[str]) -> int:
    device = torch.device(argv[0])
    depth = int(argv[1]) if len(argv) > 1 else 18
    width = int(argv[2]) if len(argv) > 2 else 16
    model = create_model("dsn", num_fine=100, num_coarse=20, depth_n=depth, width=width).to(device).eval()
    model.gate_rate.fill_(0.5)
    x = torch.rand(256, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), true_float32():
        torch.manual_seed(0)
        sub = model(x, mode="random", execution="subbatch")
        torch.manual_seed(0)
        mask = model(x, mode="random", execution="mask")
    rel = float((sub.fine - mask.fine).abs().max() / mask.fine.abs().max())
    same_path = bool(torch.equal(sub.path, mask.path))
    ok = same_path and rel < TOLERANCE
    if len(argv) > 3:
        with open(argv[3], "w") as f:
            json.dump({"depth_n": depth, "width": width, "batch": 256, "tf32": False, "max_rel_diff": rel,
                       "same_path": same_path, "ok": ok}, f, indent=2)
    print(f"hard sub-batch vs masked, depth_n {depth} width {width}, TF32 off: max relative difference {rel:.2e}"
          f"{'' if same_path else ', paths differ'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
