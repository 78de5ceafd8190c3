"""What the fused kernel's autotuning costs a new process, with and without the tuning kept in
Triton's on-disk cache (`kernels.fused_preprocess.AUTOTUNE_CACHE_RESULTS`).

Times the first and the second `fused_preprocess` call on an (n x k numeric, c categorical)
problem in this process. Run it in fresh processes sharing one TRITON_CACHE_DIR: the first pays
compiling and tuning; later ones find compiled binaries, and the tuning too when it is cached.

    d=$(mktemp -d)
    TRITON_CACHE_DIR=$d python bench/profile_kernel_autotune.py --label cold
    TRITON_CACHE_DIR=$d python bench/profile_kernel_autotune.py --label tuned-again --no-cache-results
    TRITON_CACHE_DIR=$d python bench/profile_kernel_autotune.py --label tuning-cached
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16_000_000)
    p.add_argument("--numeric", type=int, default=14)
    p.add_argument("--categorical", type=int, default=4)
    p.add_argument("--label", default="run")
    p.add_argument("--no-cache-results", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch

    import kernels.fused_preprocess as fp

    fp.AUTOTUNE_CACHE_RESULTS = not args.no_cache_results
    n, k, c = args.rows, args.numeric, args.categorical
    gen = torch.Generator(device="cuda").manual_seed(0)
    numeric = torch.randn((k, n), device="cuda", generator=gen)
    sizes = torch.full((c,), 8, dtype=torch.int32, device="cuda")
    inputs: dict[str, Any] = {
        "numeric": numeric,
        "codes": torch.randint(-1, 10, (c, n), dtype=torch.int32, device="cuda", generator=gen),
        "fill": torch.zeros(k, device="cuda"),
        "lo": torch.full((k,), -3.0, device="cuda"),
        "hi": torch.full((k,), 3.0, device="cuda"),
        "mean": torch.zeros(k, device="cuda"),
        "inv_std": torch.ones(k, device="cuda"),
        "enc_table": torch.rand(8 * c, device="cuda", generator=gen),
        "enc_offsets": torch.arange(0, 8 * c, 8, dtype=torch.int32, device="cuda"),
        "enc_sizes": sizes,
        "unseen": torch.zeros(c, device="cuda"),
    }
    seconds = []
    for _ in range(2):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fp.fused_preprocess(**inputs)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    report = {
        "label": args.label,
        "cache_results": fp.AUTOTUNE_CACHE_RESULTS,
        "rows": n,
        "numeric": k,
        "categorical": c,
        "first_call_s": round(seconds[0], 4),
        "second_call_s": round(seconds[1], 4),
        "best_config": fp.best_config(),
        "gpu": torch.cuda.get_device_name(),
    }
    print(json.dumps(report))
    if args.out:
        with args.out.open("a") as fh:
            fh.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
