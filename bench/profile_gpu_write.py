"""What the predictions write costs on the GPU, by how the table is built and encoded.

A batch of predictions (id, score, label, model name, model version) is built on the device and
written to one parquet file per input file with one `to_parquet(partition_offsets=...)` call, as
`GpuEngine.write_batch` does. Each variant is timed side by side in one process (median of
--repeats), with the file bytes per row, and read back to check the columns users see.

    python bench/profile_gpu_write.py --rows 20000000 --files 20 --out /tmp/write.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL_NAME = "gpupipe-xgboost"
MODEL_VERSION = 7


def build_table(ids: Any, probs: Any, labels: Any, with_model_columns: bool) -> Any:
    """The predictions table as `GpuEngine` builds it (the model name a string column repeated,
    the version int64), or without the name/version columns: the floor. A one-category
    `category` name column would be cheaper to build, but cuDF's parquet writer refuses it."""
    import cudf
    import cupy

    n = len(ids)
    data: dict[str, Any] = {"id": ids, "score": probs, "label": labels}
    if with_model_columns:
        data["model_name"] = cudf.Series([MODEL_NAME]).repeat(n).reset_index(drop=True)
        data["model_version"] = cupy.full(n, MODEL_VERSION, cupy.int64)
    return cudf.DataFrame(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-bench-write"))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="only the current layout and the floor")
    args = p.parse_args()

    import cupy
    import pyarrow.parquet as pq

    from tasks.backend import use_async_device_memory

    use_async_device_memory()  # as the scoring workers run
    n = args.rows
    rng = cupy.random.default_rng(0)
    ids = cupy.arange(n, dtype=cupy.int64) * 7 + 11
    probs = rng.random(n, dtype=cupy.float32)
    labels = (probs >= 0.5).astype(cupy.int8)
    per_file = n // args.files
    offsets = [*(i * per_file for i in range(args.files)), n]

    # (label, with the model name/version columns, to_parquet keyword arguments)
    variants: list[tuple[str, bool, dict[str, Any]]] = [
        ("current: name strings, int64 version", True, {}),
        ("no statistics", True, {"statistics": "NONE"}),
        ("uncompressed", True, {"compression": None}),
        ("plain id/score", True, {"column_encoding": {"id": "PLAIN", "score": "PLAIN"}}),
        ("no dictionary", True, {"use_dictionary": False}),
        ("floor: id, score, label only", False, {}),
        ("floor, uncompressed", False, {"compression": None}),
    ]
    if args.quick:
        variants = [variants[0], variants[-2]]
    report: dict[str, Any] = {
        "rows": n,
        "files": args.files,
        "work": str(args.work),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("KVIKIO", "LIBCUDF"))},
        "variants": {},
    }

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        cupy.cuda.runtime.deviceSynchronize()
        t = time.perf_counter()
        value = fn()
        cupy.cuda.runtime.deviceSynchronize()
        return time.perf_counter() - t, value

    for label, with_model_columns, kwargs in variants:
        out_dir = args.work / "out"
        builds, writes = [], []
        for _ in range(args.repeats + 1):  # the first is a warm-up
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            paths = [str(out_dir / f"part-{i:04d}.parquet") for i in range(args.files)]
            build_s, table = timed(lambda m=with_model_columns: build_table(ids, probs, labels, m))
            options = {"compression": "snappy", **kwargs}
            write_s, _ = timed(
                lambda t=table, ps=paths, o=options: t.to_parquet(
                    ps, partition_offsets=offsets, index=False, **o
                )
            )
            builds.append(build_s)
            writes.append(write_s)
        size = sum(Path(q).stat().st_size for q in paths)
        back = pq.read_table(paths[0])
        columns = {f.name: str(f.type) for f in back.schema}
        name_ok = not with_model_columns or set(back.column("model_name").to_pylist()) == {
            MODEL_NAME
        }
        score_ok = (
            back.column("score").to_numpy().tolist() == cupy.asnumpy(probs[: offsets[1]]).tolist()
        )
        build_ms = statistics.median(builds[1:]) * 1e3 / (n / 1e6)
        write_ms = statistics.median(writes[1:]) * 1e3 / (n / 1e6)
        report["variants"][label] = {
            "build_ms_per_1M": round(build_ms, 3),
            "write_ms_per_1M": round(write_ms, 3),
            "total_ms_per_1M": round(build_ms + write_ms, 3),
            "bytes_per_row": round(size / n, 2),
            "columns_read_back": columns,
            "values_read_back_ok": bool(name_ok and score_ok),
        }
        print(f"{label}: {report['variants'][label]}", flush=True)
        del table
    shutil.rmtree(args.work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
