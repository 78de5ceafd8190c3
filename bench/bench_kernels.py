"""Benchmark the fused preprocessing kernel on a GPU against device copy bandwidth and an unfused
sequence of library operations.

Reports, per output dtype: the fused kernel's time and effective bandwidth
((bytes read + bytes written) / time), that bandwidth as a share of a plain device-to-device copy,
the unfused sequence's time (CuPy when installed, else torch) and unfused/fused. The large run is
checked against the NumPy reference on a random sample of rows.

    python bench/bench_kernels.py --out bench_kernels.json            # n=50M, k=28, c=4
    python bench/bench_kernels.py --quick --out /tmp/quick.json       # tiny, seconds
    python bench/bench_kernels.py --sweep --out sweep.json            # also time every tile config

Exits 0 with a message (and a "skipped" JSON when --out is given) when no GPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

QUICK = {"n": 100_003, "copy_mib": 256}
# Everything runs here; a module constant so that the helpers can be dry-run on CPU.
DEVICE = "cuda"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000_000, help="rows")
    p.add_argument("--k", type=int, default=28, help="numeric features")
    p.add_argument("--c", type=int, default=4, help="categorical features")
    p.add_argument("--dtypes", default="float32,float16", help="output dtypes, comma separated")
    p.add_argument("--copy-mib", type=int, default=4096, help="size of the copy-bandwidth buffer")
    p.add_argument("--card", type=int, default=1000, help="categories per categorical feature")
    p.add_argument("--warmup-ms", type=int, default=100)
    p.add_argument("--rep-ms", type=int, default=1000)
    p.add_argument("--check-rows", type=int, default=20_000, help="rows sampled for the check")
    p.add_argument("--seed", type=int, default=20240611)
    p.add_argument("--sweep", action="store_true", help="also time every (BLOCK_N, num_warps)")
    p.add_argument("--no-unfused", action="store_true", help="skip the unfused baseline")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK}")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.copy_mib = QUICK["n"], QUICK["copy_mib"]
        args.rep_ms, args.warmup_ms = 200, 25
    return args


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def bench_ms(fn, warmup_ms: int, rep_ms: int) -> float:
    """Median time of fn on the device in milliseconds (triton.testing.do_bench, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def measure_copy(mib: int, warmup_ms: int, rep_ms: int) -> tuple[float, float]:
    """Device-to-device copy of a `mib` MiB buffer: (ms, GB/s counting bytes read + written)."""
    import torch

    src = torch.rand(mib * 2**20 // 4, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), warmup_ms, rep_ms)
    return ms, 2 * src.numel() * src.element_size() / ms / 1e6


def make_problem(n: int, k: int, c: int, card: int, seed: int) -> dict[str, Any]:
    """Random inputs on the device with NaN, +-inf, -1 and out-of-range codes mixed in."""
    import torch

    dev = DEVICE
    gen = torch.Generator(device=dev).manual_seed(seed)
    numeric = torch.randn((k, n), generator=gen, device=dev, dtype=torch.float32) * 3 + 0.5
    if k:
        flat = numeric.view(-1)
        m = max(3, flat.numel() // 100)
        idx = torch.randint(0, flat.numel(), (m,), generator=gen, device=dev)
        flat[idx[0::3]] = float("nan")
        flat[idx[1::3]] = float("inf")
        flat[idx[2::3]] = float("-inf")
    sizes = torch.full((c,), card, dtype=torch.int32)
    sizes -= torch.arange(c, dtype=torch.int32)  # differing table sizes
    offsets = torch.cumsum(sizes, 0, dtype=torch.int32) - sizes
    codes = torch.empty((c, n), dtype=torch.int32, device=dev)
    for i in range(c):
        codes[i] = torch.randint(-1, int(sizes[i]) + 5, (n,), generator=gen, device=dev)
    half = torch.rand(k, generator=gen, device=dev) * 3 + 0.5
    centre = torch.rand(k, generator=gen, device=dev) * 2 - 1
    return {
        "numeric": numeric,
        "codes": codes,
        "fill": torch.rand(k, generator=gen, device=dev) * 4 - 2,
        "lo": centre - half,
        "hi": centre + half,
        "mean": torch.rand(k, generator=gen, device=dev) * 2 - 1,
        "inv_std": torch.rand(k, generator=gen, device=dev) * 2.75 + 0.25,
        "enc_table": torch.rand(int(sizes.sum()), generator=gen, device=dev) * 4 - 2,
        "enc_offsets": offsets.to(dev),
        "enc_sizes": sizes.to(dev),
        "unseen": torch.rand(c, generator=gen, device=dev) - 3,
    }


def unfused(problem: dict[str, Any], out_dtype: str, use_cupy: bool):
    """The same steps as separate library calls: a kernel (and a full-size temporary) per step."""
    k, c = problem["numeric"].shape[0], problem["codes"].shape[0]
    sizes = [int(s) for s in problem["enc_sizes"].cpu()]
    offsets = [int(o) for o in problem["enc_offsets"].cpu()]
    if use_cupy:
        import cupy as xp

        p = {name: xp.asarray(t) for name, t in problem.items()}
    else:
        import torch as xp

        p = problem
    x = p["numeric"]
    x = xp.where(xp.isnan(x), p["fill"][:, None], x)
    x = xp.minimum(xp.maximum(x, p["lo"][:, None]), p["hi"][:, None])
    x = x - p["mean"][:, None]
    x = x * p["inv_std"][:, None]
    cats = []
    for i in range(c):
        code = p["codes"][i]
        valid = (code >= 0) & (code < sizes[i])
        idx = xp.where(valid, code, 0) + offsets[i]
        vals = p["enc_table"][idx]
        cats.append(xp.where(valid, vals, p["unseen"][i]))
    parts = ([x] if k else []) + ([xp.stack(cats)] if c else [])
    full = xp.concatenate(parts, 0)
    if use_cupy:
        return xp.ascontiguousarray(full.T).astype(out_dtype)
    return full.t().contiguous().to(getattr(xp, out_dtype))


def check_sample(problem: dict[str, Any], got, out_dtype: str, rows: int, seed: int) -> float:
    """Max |got - reference| over a random sample of rows; raises on a mismatch."""
    import torch

    from kernels.reference import fused_preprocess_reference

    n = (
        problem["codes"].shape[1]
        if problem["numeric"].shape[0] == 0
        else problem["numeric"].shape[1]
    )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, n, (min(rows, n),), generator=gen)
    idx[0], idx[-1] = 0, n - 1  # the edges of the grid
    idx_dev = idx.to(DEVICE)
    host = {
        name: (t[:, idx_dev] if name in ("numeric", "codes") else t).cpu().numpy()
        for name, t in problem.items()
    }
    want = fused_preprocess_reference(**host, out_dtype=np.dtype(out_dtype).type)
    got_rows = torch.as_tensor(got, device=DEVICE)[idx_dev].float().cpu().numpy()
    tol = 1e-6 if out_dtype == "float32" else 1e-3
    np.testing.assert_allclose(got_rows, want.astype(np.float32), rtol=tol, atol=tol)
    return float(np.abs(got_rows - want.astype(np.float32)).max())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta: dict[str, Any] = {"args": vars(args), "host": platform.node(), "time": time.time()}

    def skip(reason: str) -> int:
        print(f"bench_kernels: skipped: {reason}")
        write_json(args.out, {"status": "skipped", "reason": reason, **meta})
        return 0

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return skip("TRITON_INTERPRET is set: unset it to benchmark the compiled kernel")
    try:
        import torch
        import triton
    except ImportError as exc:
        return skip(f"torch and triton are needed ({exc})")
    if not torch.cuda.is_available():
        return skip("no CUDA device")
    try:
        import kernels.fused_preprocess as fp
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import kernels.fused_preprocess as fp
    try:
        import cupy  # noqa: F401

        use_cupy = True
    except ImportError:
        use_cupy = False

    meta.update(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        unfused_backend="cupy" if use_cupy else "torch",
    )
    print(f"device: {meta['device']}  torch {torch.__version__}  triton {triton.__version__}")

    # (a) device-to-device copy: the roofline the fused kernel is judged against.
    copy_ms, copy_gbs = measure_copy(args.copy_mib, args.warmup_ms, args.rep_ms)
    print(f"copy: {args.copy_mib} MiB, {copy_ms:.3f} ms, {copy_gbs:.1f} GB/s (read + write)")

    n, k, c = args.n, args.k, args.c
    problem = make_problem(n, k, c, args.card, args.seed)
    bytes_read = (k + c) * n * 4
    results = []
    for out_dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        tdtype = getattr(torch, out_dtype)
        out = torch.empty((n, k + c), dtype=tdtype, device=DEVICE)
        bytes_total = bytes_read + out.numel() * out.element_size()

        def fused(out=out, out_dtype=out_dtype, **tile):
            return fp.fused_preprocess(**problem, out_dtype=out_dtype, out=out, **tile)

        fused()  # autotunes on first call for this shape bucket
        torch.cuda.synchronize()
        out.fill_(float("nan"))
        fused()
        torch.cuda.synchronize()
        if bool(torch.isnan(out).any()):
            raise AssertionError(f"{out_dtype}: unwritten output elements")
        err = check_sample(problem, out, out_dtype, args.check_rows, args.seed)
        fused_ms = bench_ms(fused, args.warmup_ms, args.rep_ms)
        gbs = bytes_total / fused_ms / 1e6
        row: dict[str, Any] = {
            "out_dtype": out_dtype,
            "n": n,
            "k": k,
            "c": c,
            "bytes_read": bytes_read,
            "bytes_written": bytes_total - bytes_read,
            "fused_ms": fused_ms,
            "fused_gbs": gbs,
            "pct_of_copy": 100 * gbs / copy_gbs,
            "config": (
                fp.best_config()
                if n >= fp.AUTOTUNE_MIN_ROWS
                else dict(zip(("BLOCK_N", "num_warps"), fp.FIXED_CONFIG, strict=True))
            ),
            "check_rows": min(args.check_rows, n),
            "check_max_abs_err": err,
        }
        if args.sweep:
            row["sweep"] = []
            for bn, nw in fp.AUTOTUNE_CONFIGS:
                ms = bench_ms(
                    lambda bn=bn, nw=nw: fused(block_n=bn, num_warps=nw),
                    args.warmup_ms,
                    args.rep_ms,
                )
                g = bytes_total / ms / 1e6
                row["sweep"].append(
                    {"BLOCK_N": bn, "num_warps": nw, "ms": ms, "gbs": g, "pct": 100 * g / copy_gbs}
                )
        if not args.no_unfused:
            ref_out = unfused(problem, out_dtype, use_cupy)
            row["unfused_check_max_abs_err"] = check_sample(
                problem, ref_out, out_dtype, args.check_rows, args.seed + 1
            )
            del ref_out
            torch.cuda.empty_cache()
            unfused_ms = bench_ms(
                lambda out_dtype=out_dtype: unfused(problem, out_dtype, use_cupy),
                args.warmup_ms,
                args.rep_ms,
            )
            row["unfused_ms"] = unfused_ms
            row["unfused_over_fused"] = unfused_ms / fused_ms
        results.append(row)
        del out
        torch.cuda.empty_cache()

    print()
    header = (
        f"{'dtype':8} {'fused ms':>9} {'GB/s':>8} {'% copy':>7} {'unfused ms':>11} {'ratio':>6}"
    )
    print(f"n={n:,} k={k} c={c}; copy {copy_gbs:.1f} GB/s; unfused via {meta['unfused_backend']}")
    print(header)
    for r in results:
        unf = f"{r['unfused_ms']:11.3f} {r['unfused_over_fused']:6.2f}" if "unfused_ms" in r else ""
        print(
            f"{r['out_dtype']:8} {r['fused_ms']:9.3f} {r['fused_gbs']:8.1f} "
            f"{r['pct_of_copy']:6.1f}% {unf}   tile {r['config']}"
        )
        for s in r.get("sweep", []):
            print(
                f"    BLOCK_N={s['BLOCK_N']:4} warps={s['num_warps']}: {s['ms']:.3f} ms "
                f"{s['gbs']:.1f} GB/s {s['pct']:.1f}%"
            )
    write_json(
        args.out,
        {
            "status": "ok",
            **meta,
            "copy": {"mib": args.copy_mib, "ms": copy_ms, "gbs": copy_gbs},
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
