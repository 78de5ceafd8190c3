"""Where the time goes when one GPU scores one file: each step timed with a device sync.

    python bench/profile_gpu_scoring.py --work /tmp/gpupipe-bench-scoring --files 5

Uses the inputs and the champion bundle that bench/bench_scoring.py left in --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench-scoring"))
    p.add_argument("--files", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import cudf
    import cupy

    from tasks.bundle import LoadedBundle
    from tasks.gpu_features import DeviceTransform, preprocess, time_feature_columns, timestamps_us

    bundles = sorted(b for b in args.work.glob("bundle-*/**/bundle.json"))
    files = sorted(args.work.glob("input-*/part-*.parquet"))[: args.files]
    bundle = LoadedBundle.load(bundles[0].parent, "xgboost", device="cuda")
    spec = bundle.spec_dict
    transform = DeviceTransform(spec, bundle.lookups, cupy)
    booster = bundle.scorer.booster  # type: ignore[attr-defined]
    sync = cupy.cuda.Device().synchronize
    times: dict[str, list[float]] = defaultdict(list)

    def step(name: str, fn, *a, **k):  # type: ignore[no-untyped-def]
        sync()
        t = time.perf_counter()
        out = fn(*a, **k)
        sync()
        times[name].append(time.perf_counter() - t)
        return out

    for i, f in enumerate([files[0], *files]):
        frame = step("read_parquet", cudf.read_parquet, str(f), columns=bundle.spec.raw_columns)
        step(
            "time_features",
            lambda fr: time_feature_columns(
                timestamps_us(fr[spec["timestamp_column"]]), spec["time_features"], cupy
            ),
            frame,
        )
        for entity, keys, stats in transform.entities:
            step(f"entity_{entity['key']}", transform._entity_columns, frame, entity, keys, stats)
        for j, feat in enumerate(spec["categorical"]):
            step(
                f"category_{feat['name']}",
                transform.vocabularies[j].positions,
                frame[feat["name"]],
                cupy,
            )
        numeric, codes = step("feature_columns_total", transform.feature_columns, frame)
        matrix = step(
            "fused_preprocess",
            preprocess,
            numeric,
            codes,
            transform.kernel,
            transform.kernel_host,
            cupy,
        )
        probs = step("predict", lambda m: cupy.asarray(booster.inplace_predict(m)), matrix)
        table = step(
            "build_output",
            lambda fr=frame, pr=probs: cudf.DataFrame(
                {"id": fr[bundle.spec.id_column], "score": pr.reshape(-1)}
            ),
        )
        step("write_parquet", table.to_parquet, f"/tmp/profile-out-{i}.parquet", index=False)
        if i == 0:
            times.clear()  # the first file warms up kernels and pools
    rows = len(frame)
    report = {
        k: {"median_ms": 1000 * sorted(v)[len(v) // 2], "n": len(v)} for k, v in times.items()
    }
    for k, v in report.items():
        print(f"{k:28} {v['median_ms']:9.2f} ms")
    print(f"rows per file: {rows:,}")
    if args.out:
        args.out.write_text(json.dumps({"rows_per_file": rows, "steps": report}, indent=2))


if __name__ == "__main__":
    main()
