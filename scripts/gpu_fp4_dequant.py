"""FP4 weights with 16-bit compute, one Linear at FLUX.1's shapes: the NVFP4 weight expanded to bf16 by a table
lookup per byte (before 2026-12-07) or from the codes' bits (pipelines/quant.py `decode_bits`), each compiled as
the app compiles the model, alone and followed by the GEMM; the same-run baseline is the bf16 Linear. The app
uses the table; the bits take over on GPUs if this shows them faster.

    python scripts/gpu_fp4_dequant.py --out OUT [--tokens 4608]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_profile_step import timed  # noqa: E402
from pipelines.quant import FP4_BLOCK, decode_bits, decode_table, nvfp4_quantize  # noqa: E402

SHAPES = [(3072, 3072), (12288, 3072), (3072, 12288), (3072, 15360), (21504, 3072)]  # (out, in) of FLUX.1's Linears


def expand(decode):
    def weight(packed, block_scale, tensor_scale):
        n = packed.shape[0]
        values = decode(packed, torch.bfloat16).reshape(n, -1, FP4_BLOCK)
        return (values * (block_scale.float() * tensor_scale).to(torch.bfloat16)[..., None]).reshape(n, -1)
    return weight


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=4608)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    cuda = args.device == "cuda"
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device=args.device) * 0.02
        q = nvfp4_quantize(w)
        x = torch.randn(args.tokens, k, device=args.device, dtype=torch.bfloat16)
        w16 = w.to(torch.bfloat16)
        row = {"shape": f"{n}x{k}", "bf16 linear ms": timed(lambda: F.linear(x, w16), 20, cuda)}
        expanded = {}
        for label, decode in (("table", decode_table), ("bits", decode_bits)):
            torch._dynamo.reset()  # one compile per shape and variant, not recompiles of one function
            weight = torch.compile(expand(decode), dynamic=False)
            linear = torch.compile(lambda x, *q_: F.linear(x, expand(decode)(*q_)), dynamic=False)
            with torch.inference_mode():
                expanded[label] = weight(q.packed, q.block_scale, q.tensor_scale)
                row[f"{label} expand ms"] = timed(lambda: weight(q.packed, q.block_scale, q.tensor_scale), 20, cuda)
                row[f"{label} expand+linear ms"] = timed(lambda: linear(x, q.packed, q.block_scale, q.tensor_scale), 20, cuda)
        row["bits equal table, compiled"] = torch.equal(expanded["bits"], expanded["table"])
        rows.append({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()})
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fp4-dequant.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
