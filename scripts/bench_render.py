"""Benchmark the NeRF renderer: median forward / backward ms per shading mode and resolution, and culling.

    python scripts/bench_render.py [--threads 2] [--iters 20] [--res 64 128] [--batch 1]

The scene is the freshly initialised field (DreamFusion's centre blob) after one occupancy update, seen by
training-mode cameras at radius 2.8, fovy 42, elevation 15 and random azimuths (stratified sampling on).
The backward pass is that of an SDS-like loss on the rgb image (plus the orientation loss when normals exist).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from text3d.cameras import spherical_cameras  # noqa: E402
from text3d.renderers import NeRFConfig, NeRFRenderer  # noqa: E402


def bench(renderer: NeRFRenderer, res: int, batch: int, shading: str, iters: int, warmup: int) -> dict[str, float]:
    fwd, bwd, culled = [], [], []
    for i in range(warmup + iters):
        cams = spherical_cameras(15.0, torch.rand(batch) * 360.0 - 180.0, 2.8, 42.0)
        t0 = time.perf_counter()
        out = renderer(cams, res, res, shading=shading)
        t1 = time.perf_counter()
        loss = (out["rgb"] * torch.randn_like(out["rgb"])).sum()
        if "orientation_loss" in out:
            loss = loss + 0.01 * out["orientation_loss"]
        loss.backward()
        t2 = time.perf_counter()
        renderer.zero_grad(set_to_none=True)
        if i >= warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            culled.append(renderer.last_stats["culled_fraction"])
    return {"fwd": statistics.median(fwd), "bwd": statistics.median(bwd),
            "total": statistics.median([a + b for a, b in zip(fwd, bwd)]), "culled": statistics.mean(culled),
            "kept": renderer.last_stats["samples_kept"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--res", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--shading", nargs="+", default=["albedo", "lambertian", "textureless"])
    ap.add_argument("--normals", default=None, help="override NeRFConfig.normals")
    ap.add_argument("--num-samples", type=int, default=None, help="override NeRFConfig.num_samples")
    ap.add_argument("--n-levels", type=int, default=None, help="override NeRFConfig.n_levels")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = NeRFConfig(backend="torch")
    if args.normals:
        cfg.normals = args.normals
    if args.num_samples:
        cfg.num_samples = args.num_samples
    if args.n_levels:
        cfg.n_levels = args.n_levels
    renderer = NeRFRenderer(cfg).train()
    t0 = time.perf_counter()
    renderer.update_occupancy(0)
    t_occ = (time.perf_counter() - t0) * 1e3
    print(f"threads={torch.get_num_threads()} batch={args.batch} num_samples={cfg.num_samples} "
          f"n_levels={cfg.n_levels} normals={cfg.normals} occupied cells={renderer.occupancy.occupied_fraction():.3f} "
          f"occupancy update {t_occ:.1f} ms; load average {os.getloadavg()[0]:.2f} (other processes skew timings)")
    print(f"{'res':>5} {'shading':<12} {'fwd ms':>8} {'bwd ms':>8} {'total ms':>9} {'culled':>7} {'kept':>8}")
    for res in args.res:
        for shading in args.shading:
            r = bench(renderer, res, args.batch, shading, args.iters, args.warmup)
            print(f"{res:>5} {shading:<12} {r['fwd']:8.1f} {r['bwd']:8.1f} {r['total']:9.1f} {r['culled']:7.3f} "
                  f"{int(r['kept']):>8}", flush=True)


if __name__ == "__main__":
    main()
