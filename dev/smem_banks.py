#!/usr/bin/env python3
"""Bank conflicts of the quantize sweeps' shared-memory accesses, by a model.

The layouts of csrc/cuda/quantize_common.cuh (OperandTile, coef_offset),
written again here, against every warp-wide access pattern the sweeps use
(lane = 4 g + t): the degree of each is the most distinct words any of the 32
banks serves in one pass (1: conflict-free). 4-byte accesses are counted over
the whole warp, 8-byte ones per half-warp. `--old` shows the previous layout
(stride width + 4, coefficient stride 68) for comparison. No GPU needed; the
GPU's own count is the profiler's shared-memory bank-conflict metric.

  python dev/smem_banks.py [--old]
"""

from __future__ import annotations

import argparse


def pair_code(j: int, col: int) -> int:
    return 4 * (col >> 1) + 2 * j + (col & 1)


LANES = [(lane // 4, lane % 4) for lane in range(32)]  # (g, t)


def degree(addresses, size: int) -> int:
    groups = [range(32)] if size == 4 else [range(16), range(16, 32)]
    worst = 1
    for group in groups:
        banks: dict[int, set] = {}
        for lane in group:
            for word in range(size // 4):
                w = addresses[lane] * (size // 4) + word
                banks.setdefault(w % 32, set()).add(w)
        worst = max(worst, max(len(words) for words in banks.values()))
    return worst


def operand_stride(width: int, size: int) -> int:
    group = 64 // size
    padded = -(-width // group) * group
    return padded if padded * size % 128 == 64 else padded + group


def operand_tile(width: int, size: int, old: bool):
    shift = 2 if size == 4 else 1
    if old:
        return lambda r, c: r * (width + 4) + c
    stride = operand_stride(width, size)
    return lambda r, c: r * stride + (c ^ (((r ^ (r >> 2)) & 3) << shift))


def coef_tile(old: bool):
    if old:
        return lambda r, c: r * 68 + c
    return lambda r, c: r * 64 + (c ^ (5 * (r & 3) + 16 * ((r ^ (r >> 2)) & 1)))


def operand_patterns(at, width):
    """tile_logits A (rows r0 + g, columns k0 + t) and B (rows pair_code, columns k0 + t), their
    SIMT forms, the transposed B loads (rows k0 + t, columns c0 + g), the per-code norm reads."""
    steps = range(0, width - width % 8, 8)
    return {
        "A": [[at(r0 + g, k0 + h + t) for g, t in LANES] for r0 in (0, 8, 16) for k0 in steps for h in (0, 4)],
        "B": [[at(16 + pair_code(j, g), k0 + h + t) for g, t in LANES] for j in (0, 1) for k0 in steps
              for h in (0, 4)],
        "A simt": [[at(r0 + g, k0 + k) for g, t in LANES] for r0 in (0, 8) for k0 in steps for k in range(8)],
        "B simt": [[at(pair_code(j, 2 * t + i), k0 + k) for g, t in LANES] for j in (0, 1) for i in (0, 1)
                   for k0 in steps for k in range(8)],
        "transposed B": [[at(k0 + h + t, c0 + g) for g, t in LANES] for k0 in (0, 8, 16, 24) for h in (0, 4)
                         for c0 in steps],
        "norms": [[at(16 + 4 * t + q, width - 8) for g, t in LANES] for q in range(4)],
    }


def coef_patterns(at):
    """Stores (row g, column c0 + 4 t + q), A loads (row g, column k0 + t), transposed A loads
    (row k0 + t, column c0 + g) of the coefficient tiles."""
    return {
        "stores": [[at(g + h, base + 4 * t + q) for g, t in LANES] for base in (0, 16, 32, 48) for q in range(4)
                   for h in (0, 8)],
        "A": [[at(r0 + g, k0 + h + t) for g, t in LANES] for r0 in (0, 8, 16) for k0 in range(0, 64, 8)
              for h in (0, 4)],
        "transposed A": [[at(k0 + h + t, c0 + g) for g, t in LANES] for k0 in (0, 8, 16, 24) for h in (0, 4)
                         for c0 in (0, 8, 16, 24, 32, 48)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", action="store_true", help="the previous layout")
    args = parser.parse_args()
    worst = 1
    for size, name in ((4, "float"), (8, "double")):
        for width in (16, 24, 72, 128, 136, 256):
            if size == 8 and width > 136:
                continue
            found = {p: max(degree(a, size) for a in accesses)
                     for p, accesses in operand_patterns(operand_tile(width, size, args.old), width).items()}
            if size == 8:
                found.pop("B")  # the tensor path is float only
            print(f"operand tile {name:6} width {width:3}: " + ", ".join(f"{p} {d}" for p, d in found.items()))
            worst = max(worst, *found.values())
        found = {p: max(degree(a, size) for a in accesses) for p, accesses in coef_patterns(coef_tile(args.old)).items()}
        print(f"coefficient tile {name:6}:      " + ", ".join(f"{p} {d}" for p, d in found.items()))
        worst = max(worst, *found.values())
    print(f"worst: {worst}-way")
    return 0 if worst == 1 or args.old else 1


if __name__ == "__main__":
    raise SystemExit(main())
