"""Fingerprint a seeded `generate` run's final checkpoint tensors, to check that a refactor keeps behaviour.

    python scripts/checkpoint_fingerprint.py --guidance sds --steps 20 --out ref_sds.json [--teacher DIR|embedded]
    python scripts/checkpoint_fingerprint.py --distill swiftbrush --steps 4 --out ref_sb.json
    python scripts/checkpoint_fingerprint.py --compare ref_sds.json new_sds.json

Each tensor of ``checkpoints/*.pt`` and of a distill2d run's saved students (``student/``, ``phases/*/``) is
hashed (sha256 of its bytes) with its shape, dtype and sum, so two fingerprints are equal exactly when every
tensor is bit-identical; ``--compare`` prints the tensors that
differ and their largest absolute difference is not known from hashes alone (sums are shown instead).
Without ``--teacher`` a tiny random test teacher (seed 0) is built in a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def fingerprint(state, prefix: str = "", out: dict | None = None) -> dict:
    import torch

    out = {} if out is None else out
    if isinstance(state, torch.Tensor):
        t = state.detach().cpu().contiguous()
        digest = hashlib.sha256(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
        out[prefix] = {"sha256": digest.hexdigest()[:16], "shape": list(t.shape), "dtype": str(t.dtype),
                       "sum": float(t.double().sum()) if t.is_floating_point() or t.dtype.is_complex is False else 0.0}
    elif isinstance(state, dict):
        for k, v in state.items():
            fingerprint(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            fingerprint(v, f"{prefix}[{i}]", out)
    return out


def run(guidance: str, steps: int, teacher: str | None, seed: int, distill: str | None = None,
        overrides: list[str] = ()) -> dict:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        if teacher is None:
            from text3d.teacher.tiny import build_tiny_teacher

            teacher = str(build_tiny_teacher(Path(tmp) / "teacher", seed=0))
        teacher_args = [] if teacher == "embedded" else ["--teacher", teacher]
        run_dir = Path(tmp) / "run"
        if distill:
            cmd = [sys.executable, "-m", "text3d", "distill2d", "--method", distill, "--steps", str(steps),
                   "--seed", str(seed), *teacher_args, "--out", str(run_dir), "--no-eval", "--quiet",
                   "batch_size=2", "sample_every=1000", "regression.pairs=4", "regression.sampler_steps=2",
                   "real_images=8", "trajectory.round_steps=2", "trajectory.start_steps=4", "trajectory.stage1_steps=2", *overrides]
        else:
            cmd = [sys.executable, "-m", "text3d", "generate", "a red cube", "--guidance", guidance,
                   "--steps", str(steps), "--seed", str(seed), *teacher_args, "--out", str(run_dir), "--no-video", *overrides]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        result = {}
        for path in sorted((run_dir / "checkpoints").glob("*.pt")):
            state = torch.load(path, map_location="cpu", weights_only=False)
            state.pop("rng", None)  # the RNG state is compared through what it produced
            result[path.name] = fingerprint(state)
        # a distill2d run's saved students (KD, PD and guided end on a boundary checkpoint without tensors)
        for path in sorted(run_dir.glob("*/**/*.safetensors")):
            from safetensors.torch import load_file

            result[str(path.relative_to(run_dir))] = fingerprint(load_file(path))
        return result


def compare(a_path: str, b_path: str) -> int:
    a, b = json.loads(Path(a_path).read_text()), json.loads(Path(b_path).read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        ta, tb = a.get(name, {}), b.get(name, {})
        for key in sorted(set(ta) | set(tb)):
            if ta.get(key, {}).get("sha256") != tb.get(key, {}).get("sha256"):
                bad += 1
                print(f"differs: {name} {key}: {ta.get(key)} vs {tb.get(key)}")
        print(f"{name}: {len(set(ta) | set(tb))} tensors compared")
    print("identical" if bad == 0 else f"{bad} tensors differ")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guidance", default="sds")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--distill", default=None, help="a distill2d method instead of generate")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for the run")
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    Path(args.out).write_text(json.dumps(run(args.guidance, args.steps, args.teacher, args.seed, args.distill, args.set), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
