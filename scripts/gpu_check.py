#!/usr/bin/env python
"""Each CUDA path of text3d against its PyTorch twin on the same inputs: agreement and time side by side.

    python scripts/gpu_check.py [--teacher DIR] [--sd-steps 3] [--skip-sd]

Rows (one table; on a machine without CUDA every row is printed as skipped, with the reason, and the exit
code is 0, so CI runs it):

  nerfacc      nerfacc 0.5's OccGridEstimator sampling + weights + accumulation against the torch occupancy
               sampler (volume.py), same occupancy mask, same rays, an analytic sphere field: mean |opacity
               difference| and |colour difference| per ray (tolerance 0.02: the two march with slightly
               different sample positions), forward time of each
  tcnn         tiny-cuda-nn's hash grid against the torch HashGridEncoding (the table layouts differ, so the
               check is behavioural): both fit the same 3D target with Adam for 200 steps; final MSE within a
               factor 2 of each other, forward + backward time
  nvdiffrast   nvdiffrast against the pure-PyTorch rasteriser: a textured icosphere, 4 views at 256 px:
               mean |rgb difference| (tolerance 0.01) and mask IoU (>= 0.99), forward + backward time
  fp16         the teacher in fp16 against fp32 on the GPU: relative L2 error of the CFG noise prediction
               (tolerance 0.02) and of the VAE latents, time of each
  sd-sds       one SD-2.1-sized latent SDS step (random weights, built in memory unless --teacher), split as
  sd-vsd       scripts/bench_step.py splits it, and the ratios against its targets (SDS / bare teacher work
               <= 1.3, VSD / SDS <= 1.6)

Budget: under 8 minutes on one GPU (the SD rows build an 865 M UNet in fp16 and run a few steps).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


class Skip(Exception):
    """A row that cannot run here (no CUDA, package missing); the message is the reason."""


def _time(fn, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` (CUDA synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return times[len(times) // 2]


def _need_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise Skip("no CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cuda")


def _need(module: str, pip: str) -> None:
    from text3d.utils.backends import optional_module

    if optional_module(module) is None:
        raise Skip(f"{module} is not importable (pip install {pip})")


# ------------------------------------------------------------------------------------------------ rows
def check_nerfacc(args) -> dict:
    device = _need_cuda()
    _need("nerfacc", "nerfacc")
    from text3d.renderers.occupancy import OccupancyGrid
    from text3d.renderers.volume import (composite, make_nerfacc_estimator, sample_rays, sample_rays_nerfacc,
                                         weights_dense, weights_nerfacc)

    torch.manual_seed(0)
    bound, samples, n_rays = 1.0, 256, 64 * 64

    def field(x):  # a soft sphere of radius 0.5 with a position-dependent colour
        sigma = 50.0 * torch.sigmoid(40.0 * (0.5 - x.norm(dim=-1)))
        return sigma, torch.sigmoid(3.0 * x)

    grid = OccupancyGrid(resolution=64, bound=bound).to(device)
    grid.update(lambda x: field(x)[0], density_threshold=0.01)
    origins = torch.tensor([0.0, 0.0, 2.5], device=device).expand(n_rays, 3).contiguous()
    uv = torch.stack(torch.meshgrid(torch.linspace(-0.4, 0.4, 64, device=device),
                                    torch.linspace(-0.4, 0.4, 64, device=device), indexing="ij"), -1).view(-1, 2)
    dirs = torch.nn.functional.normalize(torch.cat([uv, -torch.ones(n_rays, 1, device=device)], 1), dim=1)
    estimator = make_nerfacc_estimator(bound, 64, device)

    def torch_path():
        s = sample_rays(origins, dirs, bound, samples, False, grid.occupied)
        sigma, rgb = field(s.positions)
        return composite(weights_dense(s, sigma), s, {"rgb": rgb})

    def nerfacc_path():
        s = sample_rays_nerfacc(estimator, grid.mask, origins, dirs, bound, samples, False)
        sigma, rgb = field(s.positions)
        return composite(weights_nerfacc(s, sigma), s, {"rgb": rgb}, use_nerfacc=True)

    a, b = torch_path(), nerfacc_path()
    d_op = float((a["opacity"] - b["opacity"]).abs().mean())
    d_rgb = float((a["rgb"] - b["rgb"]).abs().mean())
    ok = d_op < 0.02 and d_rgb < 0.02
    return {"agreement": f"|opacity| {d_op:.4f}, |rgb| {d_rgb:.4f} (tol 0.02)", "ok": ok,
            "cuda_ms": _time(nerfacc_path), "torch_ms": _time(torch_path)}


def check_tcnn(args) -> dict:
    device = _need_cuda()
    _need("tinycudann", "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch")
    from text3d.renderers.hashgrid import HashGridEncoding, TCNNHashGridEncoding

    kwargs = dict(n_levels=8, n_features_per_level=2, log2_hashmap_size=16, base_resolution=16, max_resolution=256,
                  bound=1.0)
    torch.manual_seed(0)
    x = torch.rand(2**16, 3, device=device) * 2 - 1
    target = torch.sin(4 * x).prod(dim=1, keepdim=True)

    def fit(encoding):
        torch.manual_seed(0)
        head = torch.nn.Linear(encoding.output_dim, 1).to(device)
        opt = torch.optim.Adam(list(encoding.parameters()) + list(head.parameters()), lr=1e-2)
        for _ in range(200):
            loss = (head(encoding(x).float()) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss), encoding

    def fwd_bwd(encoding):
        def run():
            encoding(x).float().sum().backward()
        return run

    mse_torch, enc_torch = fit(HashGridEncoding(**kwargs).to(device))
    mse_tcnn, enc_tcnn = fit(TCNNHashGridEncoding(**kwargs).to(device))
    ok = max(mse_torch, mse_tcnn) <= 2 * min(mse_torch, mse_tcnn) + 1e-4
    return {"agreement": f"fit MSE tcnn {mse_tcnn:.2e} vs torch {mse_torch:.2e} (within 2x)", "ok": ok,
            "cuda_ms": _time(fwd_bwd(enc_tcnn)), "torch_ms": _time(fwd_bwd(enc_torch))}


def check_nvdiffrast(args) -> dict:
    device = _need_cuda()
    _need("nvdiffrast.torch", "git+https://github.com/NVlabs/nvdiffrast")
    import trimesh

    from text3d.cameras import spherical_cameras
    from text3d.renderers.mesh import MeshAsset, render_mesh

    torch.manual_seed(0)
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.7)
    uv = torch.as_tensor(sphere.vertices[:, :2] * 0.5 / 0.7 + 0.5, dtype=torch.float32)
    asset = MeshAsset(torch.as_tensor(sphere.vertices, dtype=torch.float32, device=device).requires_grad_(True),
                      torch.as_tensor(sphere.faces, device=device), uv.to(device),
                      torch.rand(256, 256, 3, device=device).requires_grad_(True))
    cams = spherical_cameras(15.0, torch.tensor([0.0, 90.0, 180.0, 270.0]), 2.8, 42.0, device=device)

    def render(backend):
        return render_mesh(asset, cams, 256, 256, shading="lambertian", backend=backend)

    a, b = render("torch"), render("nvdiffrast")
    d_rgb = float((a["rgb"] - b["rgb"]).abs().mean())
    ma, mb = a["opacity"] > 0.5, b["opacity"] > 0.5
    iou = float((ma & mb).sum() / (ma | mb).sum().clamp_min(1))
    ok = d_rgb < 0.01 and iou >= 0.99

    def fwd_bwd(backend):
        def run():
            render(backend)["rgb"].sum().backward()
        return run

    return {"agreement": f"|rgb| {d_rgb:.4f} (tol 0.01), mask IoU {iou:.4f} (>= 0.99)", "ok": ok,
            "cuda_ms": _time(fwd_bwd("nvdiffrast")), "torch_ms": _time(fwd_bwd("torch"))}


def _teacher_dir(args) -> str:
    if args.teacher:
        return args.teacher
    if getattr(args, "_built", None) is None:
        from text3d.teacher.sd_shapes import build_sd_teacher, find_clip_bpe
        from text3d.errors import UserError

        words = None
        try:
            find_clip_bpe()
        except UserError:
            words = ["a", "corgi"]  # the word-list tokenizer: shapes and speed do not depend on it
        args._built = str(build_sd_teacher(Path(tempfile.mkdtemp()) / "sd21-base", "sd21-base",
                                           tokenizer_words=words))
    return args._built


def check_fp16(args) -> dict:
    device = _need_cuda()
    from text3d.teacher import load_teacher

    folder = _teacher_dir(args)
    t32 = load_teacher(folder, device, dtype="fp32")
    t16 = load_teacher(folder, device, dtype="fp16")
    torch.manual_seed(0)
    image = torch.rand(1, 3, t32.image_size, t32.image_size, device=device)
    lat32, lat16 = t32.encode_images(image), t16.encode_images(image)
    x = torch.randn_like(lat32)
    t = torch.tensor([500], device=device)

    def eps(teacher):
        with torch.no_grad():
            return teacher.predict_eps(x, t, teacher.encode_prompts(["a corgi"]), teacher.encode_prompts([""]), 7.5)

    e32, e16 = eps(t32), eps(t16)
    rel = float((e32 - e16).norm() / e32.norm())
    rel_lat = float((lat32 - lat16).norm() / lat32.norm())
    ok = rel < 0.02 and rel_lat < 0.02
    out = {"agreement": f"rel. L2 eps {rel:.4f}, latents {rel_lat:.4f} (tol 0.02)", "ok": ok,
           "cuda_ms": _time(lambda: eps(t16)), "torch_ms": _time(lambda: eps(t32))}
    return out  # both teachers are freed on return


def _sd_step(args, method: str) -> dict:
    device = _need_cuda()
    if args.skip_sd:
        raise Skip("--skip-sd")
    import bench_step

    from text3d.teacher import load_teacher

    folder = _teacher_dir(args)
    teacher = load_teacher(folder, device)  # fp16 on CUDA
    if "bare" not in args.sd:
        args.sd["bare"] = bench_step.bare_teacher_work(teacher, 64, args.sd_steps, 1)
    parts = bench_step.bench_method(teacher, folder, method, 64, args.sd_steps, 1, [], device)
    args.sd[method] = parts["step"]
    if method == "sds":
        ratio = parts["step"] / args.sd["bare"]
        text, ok = f"SDS / bare teacher work {ratio:.2f} (target <= 1.3)", ratio <= 1.3
    else:
        ratio = parts["step"] / args.sd["sds"] if "sds" in args.sd else math.nan
        text, ok = f"VSD / SDS {ratio:.2f} (target <= 1.6)", ratio <= 1.6
    split = ", ".join(f"{k} {v * 1000:.0f}" for k, v in parts.items() if k != "step" and v > 0)
    return {"agreement": f"{text}; ms: {split}", "ok": ok, "cuda_ms": parts["step"] * 1000, "torch_ms": None}


ROWS = [("nerfacc", check_nerfacc), ("tcnn", check_tcnn), ("nvdiffrast", check_nvdiffrast), ("fp16", check_fp16),
        ("sd-sds", lambda a: _sd_step(a, "sds")), ("sd-vsd", lambda a: _sd_step(a, "vsd"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--teacher", default=None, help="an SD-2.1-sized diffusers folder (default: built in a "
                                                        "temporary folder with random weights)")
    parser.add_argument("--sd-steps", type=int, default=3, help="timed steps of each SD row")
    parser.add_argument("--skip-sd", action="store_true", help="skip the SD-sized rows")
    parser.add_argument("--rows", default=None, help="comma-separated subset of rows")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a row that errors")
    args = parser.parse_args(argv)
    args.sd = {}
    wanted = set(args.rows.split(",")) if args.rows else None
    table, failed = [], 0
    start = time.perf_counter()
    for name, fn in ROWS:
        if wanted is not None and name not in wanted:
            continue
        try:
            r = fn(args)
            status = "ok" if r["ok"] else "FAIL"
            failed += not r["ok"]
            table.append((name, status, r["agreement"], r["cuda_ms"], r["torch_ms"]))
        except Skip as why:
            table.append((name, "skipped", str(why), None, None))
        except Exception as exc:  # a broken backend is a failed row, not a crash of the whole check
            failed += 1
            table.append((name, "ERROR", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          None, None))
            if args.debug:
                traceback.print_exc()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"gpu_check: torch {torch.__version__}, CUDA device: {gpu}, {time.perf_counter() - start:.0f} s")
    print(f"{'row':<11} {'result':<8} {'CUDA ms':>9} {'torch ms':>9}  agreement / reason")
    for name, status, text, cuda_ms, torch_ms in table:
        c = f"{cuda_ms:9.1f}" if cuda_ms is not None else f"{'-':>9}"
        t = f"{torch_ms:9.1f}" if torch_ms is not None else f"{'-':>9}"
        print(f"{name:<11} {status:<8} {c} {t}  {text}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
