"""Multi-GPU scaling of XGBoost training (xgboost.dask on a LocalCUDACluster, one worker per
GPU) on the same ETL output, for 1..N GPUs of one host, in one run.

    python bench/bench_multigpu.py --rows 20000000 --gpus 1,2 --out multigpu_train.json

Efficiency(n) = throughput(n) / (n x throughput(1)). Scoring scaling is measured with
bench/bench_scoring.py --workers 1 and --workers 2 on the same data (see bench/gpu_session.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--gpus", default="1,2")
    p.add_argument("--trees", type=int, default=200)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpupipe-multigpu"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from dask_cuda import LocalCUDACluster
    from distributed import Client

    from tasks.backend import resolve_backend
    from tasks.config import builtin_config
    from tasks.etl import load_transform, run_etl
    from tasks.generate import generate_transactions
    from tasks.train import fit_xgboost_dask

    data = args.work / f"data-{args.rows}"
    generate_transactions(args.rows, data, seed=0)
    backend = resolve_backend("gpu")
    cfg = builtin_config(
        data,
        args.work / "home",
        **{
            "model.xgboost.n_estimators": args.trees,
            "model.xgboost.max_depth": args.depth,
            "model.xgboost.early_stopping_rounds": args.trees,
        },
    )
    etl = run_etl(cfg, backend, args.work / "home" / "etl")
    spec, _ = load_transform(etl.transform_dir)
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": args.rows,
        "train_rows": etl.rows["train"],
        "trees": args.trees,
        "depth": args.depth,
        "runs": [],
    }
    for n in (int(g) for g in args.gpus.split(",")):
        devices = ",".join(str(i) for i in range(n))
        with (
            LocalCUDACluster(
                CUDA_VISIBLE_DEVICES=devices, n_workers=n, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            # warm-up: worker start, CUDA context and data load are not training throughput
            fit_xgboost_dask(
                client,
                etl,
                spec.feature_names,
                spec.target_column,
                cfg.model.xgboost.model_copy(update={"n_estimators": 2}),
                backend,
                0,
            )
            start = time.perf_counter()
            fit_xgboost_dask(
                client, etl, spec.feature_names, spec.target_column, cfg.model.xgboost, backend, 0
            )
            seconds = time.perf_counter() - start
        report["runs"].append(
            {"gpus": n, "seconds": seconds, "rows_per_s": etl.rows["train"] * args.trees / seconds}
        )
        print(
            f"{n} GPU(s): {seconds:.2f} s, {etl.rows['train'] * args.trees / seconds:,.0f} row-trees/s"
        )
    base = report["runs"][0]["rows_per_s"]
    for r in report["runs"]:
        r["efficiency"] = r["rows_per_s"] / (r["gpus"] * base)
        print(f"efficiency at {r['gpus']} GPU(s): {r['efficiency']:.2%}")
    report["env"] = {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE",)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
