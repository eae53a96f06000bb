"""Time per frame of the mesh renderer against the NeRF renderer, side by side, in one run.

    python scripts/bench_mesh.py [--threads 2] [--iters 10] [--res 128] [--faces 20000]

The mesh is an icosphere-like surface of about ``--faces`` triangles with a 512^2 texture, rendered
with the pure-PyTorch rasteriser (or nvdiffrast on CUDA when installed): lambertian shading,
antialiasing on, forward + backward of an image loss (gradients to vertices and texture). The NeRF is
the freshly initialised field at the same resolution with the same loss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from text3d.cameras import spherical_cameras  # noqa: E402
from text3d.renderers import NeRFConfig, NeRFRenderer  # noqa: E402
from text3d.renderers.mesh import MeshAsset, render_mesh  # noqa: E402


def _time(fn, iters: int, warmup: int = 2) -> tuple[float, float]:
    fwd, total = [], []
    for i in range(warmup + iters):
        cams = spherical_cameras(15.0, torch.rand(1) * 360.0 - 180.0, 2.8, 42.0)
        t0 = time.perf_counter()
        out = fn(cams)
        t1 = time.perf_counter()
        (out["rgb"] * torch.randn_like(out["rgb"])).sum().backward()
        t2 = time.perf_counter()
        if i >= warmup:
            fwd.append(1000 * (t1 - t0))
            total.append(1000 * (t2 - t0))
    return statistics.median(fwd), statistics.median(total)


def main() -> None:
    import trimesh

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--faces", type=int, default=20000)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    subdiv = 1
    while 20 * 4 ** subdiv < args.faces:
        subdiv += 1
    sphere = trimesh.creation.icosphere(subdivisions=subdiv, radius=0.7)
    uv = torch.rand(len(sphere.vertices), 2)
    asset = MeshAsset(torch.as_tensor(sphere.vertices, dtype=torch.float32, device=device).requires_grad_(True),
                      torch.as_tensor(sphere.faces, device=device), uv.to(device),
                      torch.rand(512, 512, 3, device=device).requires_grad_(True))
    mesh_ms = _time(lambda c: render_mesh(asset, c, args.res, args.res, shading="lambertian"), args.iters)
    nerf = NeRFRenderer(NeRFConfig()).to(device)
    nerf.update_occupancy(1)
    nerf_ms = _time(lambda c: nerf(c, args.res, args.res, shading="lambertian"), args.iters)
    print(f"{args.res}x{args.res}, {len(sphere.faces)} triangles, {args.threads} threads, device {device}")
    print(f"{'renderer':<10} {'forward ms':>11} {'fwd+bwd ms':>11}")
    print(f"{'mesh':<10} {mesh_ms[0]:>11.1f} {mesh_ms[1]:>11.1f}")
    print(f"{'nerf':<10} {nerf_ms[0]:>11.1f} {nerf_ms[1]:>11.1f}")
    print(f"mesh : nerf = {mesh_ms[1] / nerf_ms[1]:.2f} : 1 (forward + backward)")


if __name__ == "__main__":
    main()
