"""Benchmark batch scoring end to end (parquet in, predictions parquet out) on generated data:
the `batch_scoring` flow against a naive single-process loop over the same files, in one run.

Steps: generate raw transactions (`tasks.generate`), fit the transform on a training sample and
train an XGBoost model of `--trees` trees of depth `--depth` without early stopping, register it
as champion in a local MLflow store, then time

  naive        per file: read -> transform -> predict -> write, one process (CPU: pandas + the
               NumPy transform + XGBoost with 1 thread, and again with every thread; GPU: cuDF ->
               gpu_features -> XGBoost on CuPy -> cuDF, the data on the device throughout)
  flow         `batch_scoring` with a cluster it starts itself (what `gpupipe score` does)
  flow, warm   `batch_scoring` on an already running cluster (`--cluster <address>`)

and report rows/s for each, the flow's own scoring-phase rate (from its run summary), speedups,
and a check that flow and naive scores agree file by file.

    python bench/bench_scoring.py --rows 4000000 --files 8 --device cpu --out bench_scoring.json
    python bench/bench_scoring.py --device gpu --rows 200000000 --files 20 --out gpu.json
    python bench/bench_scoring.py --quick --out /tmp/quick.json            # seconds, CPU

Goals: CPU flow >= 0.8 x cores x the single-threaded naive loop; one H100 >= 100M rows/s end to
end with a 200-tree depth-8 model.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

QUICK = {"rows": 200_000, "files": 4, "train_rows": 50_000, "trees": 20}
MODEL_NAME = "bench-xgboost"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4_000_000, help="rows to score")
    p.add_argument("--files", type=int, default=8, help="input files (partitions)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--trees", type=int, default=200, help="XGBoost trees (no early stopping)")
    p.add_argument("--depth", type=int, default=8, help="XGBoost max_depth")
    p.add_argument("--train-rows", type=int, default=500_000, help="rows the model is fit on")
    p.add_argument(
        "--unique-rows",
        type=int,
        default=20_000_000,
        help="generate at most this many distinct rows; further files are copies with their "
        "ids shifted (every id stays unique), which keeps generating 100M+ rows fast",
    )
    p.add_argument(
        "--input-codec",
        choices=["zstd", "snappy", "lz4", "none"],
        default="zstd",
        help="parquet codec of the input files (zstd: the generator's own; snappy: pyarrow's "
        "and Spark's default), to see what the input's decode costs",
    )
    p.add_argument(
        "--partition-rows", type=int, default=0, help="flow partition_rows; 0 = rows per file"
    )
    p.add_argument("--workers", type=int, default=0, help="local cluster workers; 0 = default")
    p.add_argument("--scorer", choices=["xgboost", "onnx"], default="xgboost")
    p.add_argument("--work", type=Path, default=Path(".gpupipe/bench-scoring"), help="work dir")
    p.add_argument("--no-warm", action="store_true", help="skip the warm-cluster flow run")
    p.add_argument("--no-naive-all", action="store_true", help="skip naive with all threads (CPU)")
    p.add_argument(
        "--cpu-check-files",
        type=int,
        default=2,
        help="files whose flow scores are checked against the model on the CPU (0 = none; "
        "all of them for the 20M-row GPU run: --cpu-check-files 20)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"tiny sizes: {QUICK}")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the flow runs, e.g. scoring.gpu_io=arrow (repeatable)",
    )
    p.add_argument(
        "--ab-rounds",
        type=int,
        default=0,
        help="A/B mode: no naive loop and no own cluster; on one running cluster with the model "
        "loaded, ROUNDS x (A B B A) flow runs with the --ab-a / --ab-b overrides",
    )
    p.add_argument("--ab-a", default="", help="A's overrides: 'KEY=VALUE KEY=VALUE' (on --set)")
    p.add_argument("--ab-b", default="", help="B's overrides, as --ab-a")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    return args


# ---------------------------------------------------------------- data and model


def make_inputs(
    work: Path, rows: int, files: int, unique_rows: int, seed: int, codec: str = ""
) -> list[Path]:
    """`files` parquet files holding `rows` rows; beyond `unique_rows`, files are copies whose
    ids are shifted past every generated id, so ids stay unique across all files (as a real
    input's would, and as the flow's whole-batch id check expects). `codec`: the files' parquet
    codec, the generator's (zstd) when empty."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.generate import COMPRESSION, generate_transactions

    codec = codec or COMPRESSION

    per_file = math.ceil(rows / files)
    unique_files = max(1, min(files, math.ceil(unique_rows / per_file)))
    src = work / f"unique-{unique_files}x{per_file}-s{seed}"
    made = generate_transactions(unique_files * per_file, src, seed=seed, rows_per_file=per_file)
    suffix = "" if codec == COMPRESSION else f"-{codec}"
    inputs = work / f"input-{files}x{per_file}-s{seed}-unique-ids{suffix}"
    inputs.mkdir(parents=True, exist_ok=True)
    paths = [inputs / f"part-{i:05d}.parquet" for i in range(files)]
    id_span = unique_files * per_file  # generated ids are 1..id_span

    def place(i: int) -> None:
        dest = paths[i]
        if dest.exists():
            return
        copy, source = divmod(i, unique_files)
        tmp = dest.with_name(dest.name + ".tmp")
        if copy == 0 and codec == COMPRESSION:
            shutil.copyfile(made[source], tmp)
        else:
            shift_ids(made[source], tmp, "transaction_id", copy * id_span, codec)
        tmp.rename(dest)

    with ThreadPoolExecutor(max_workers=min(16, files)) as pool:
        list(pool.map(place, range(files)))
    return paths


def shift_ids(source: Path, dest: Path, id_column: str, offset: int, codec: str) -> None:
    """Copy a parquet file with `offset` added to its id column, written with `codec`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    index = table.schema.get_field_index(id_column)
    shifted = pc.add(table.column(index), offset)
    pq.write_table(table.set_column(index, id_column, shifted), dest, compression=codec)


def build_champion(args: argparse.Namespace, work: Path) -> tuple[str, Path]:
    """Train (or reuse) the benchmark model and register it as champion; returns the config
    path for the flow and the bundle directory."""
    from tasks import registry
    from tasks.backend import resolve_backend
    from tasks.etl import load_transform, run_etl
    from tasks.generate import generate_transactions
    from tasks.pipeline import write_builtin_config
    from tasks.train import (
        ONNX_FILE,
        ONNX_INPUT,
        ONNX_OUTPUT,
        XGB_FILE,
        copy_transform,
        export_xgboost_onnx,
        read_split,
        write_bundle_json,
    )

    home = work / "home"
    train_dir = work / f"train-{args.train_rows}-s{args.seed}"
    generate_transactions(args.train_rows, train_dir, seed=args.seed + 1, rows_per_file=250_000)
    config = write_builtin_config(
        train_dir,
        home,
        {"registry.model_prefix": "bench", "model.mlp.enabled": False, "device": args.device},
    )
    bundle = work / f"bundle-{args.trees}x{args.depth}-{args.train_rows}-{args.device}"
    if not (bundle / "bundle.json").is_file():
        import xgboost as xgb

        from tasks.config import load_config

        cfg = load_config(config)
        backend = resolve_backend(args.device)
        etl = run_etl(cfg, backend, home / "etl")
        spec, _ = load_transform(etl.transform_dir)
        train = read_split(etl, "train", spec.feature_names, spec.target_column, backend)
        params = {
            "objective": "binary:logistic",
            "tree_method": "hist",
            "device": backend.xgboost_device,
            "max_depth": args.depth,
            "learning_rate": 0.1,
            "max_bin": 256,
            "seed": args.seed,
        }
        t0 = time.perf_counter()
        dtrain = xgb.QuantileDMatrix(train.features, label=train.target, max_bin=256)
        booster = xgb.train(params, dtrain, num_boost_round=args.trees)
        print(
            f"trained {args.trees} trees of depth {args.depth} in {time.perf_counter() - t0:.1f}s"
        )
        tmp = bundle.with_name(bundle.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        copy_transform(etl, tmp)
        booster.save_model(str(tmp / XGB_FILE))
        if args.scorer == "onnx":
            export_xgboost_onnx(booster, len(spec.feature_names), tmp / ONNX_FILE)
        write_bundle_json(
            tmp,
            {
                "kind": "xgboost",
                "native_file": XGB_FILE,
                "onnx_file": ONNX_FILE,
                "onnx_input": ONNX_INPUT,
                "onnx_output": ONNX_OUTPUT,
                "feature_names": spec.feature_names,
                "threshold": 0.5,
                "best_iteration": args.trees - 1,
                "backend": backend.device,
                "metrics": {},
            },
        )
        shutil.rmtree(bundle, ignore_errors=True)
        tmp.rename(bundle)
    from tasks.config import load_config

    cfg = load_config(config)
    uri = cfg.tracking_uri
    run_id = registry.log_training_run(
        uri, "bench", bundle.name, params={}, metrics={}, bundle_dir=bundle
    )
    ref = registry.register_bundle(uri, MODEL_NAME, run_id)
    registry.set_alias(uri, MODEL_NAME, "champion", ref.version)
    return str(config), bundle


# ---------------------------------------------------------------- naive loops


def naive_cpu(files: list[Path], bundle_dir: Path, out: Path, threads: int, scorer: str) -> float:
    import pandas as pd

    from tasks.bundle import LoadedBundle, frame_to_raw

    bundle = LoadedBundle.load(bundle_dir, scorer)  # type: ignore[arg-type]
    if hasattr(bundle.scorer, "booster"):
        bundle.scorer.booster.set_param({"nthread": threads})
    spec = bundle.spec
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for f in files:
        frame = pd.read_parquet(f, columns=spec.raw_columns)
        probs = bundle.predict_raw(frame_to_raw(frame, spec.raw_columns))
        pd.DataFrame(
            {
                spec.id_column: frame[spec.id_column].to_numpy(),
                "score": probs,
                "label": (probs >= bundle.threshold).astype(np.int8),
                "model_name": MODEL_NAME,
                "model_version": np.int64(1),
            }
        ).to_parquet(out / f.name, index=False)
    return time.perf_counter() - t0


def naive_gpu(files: list[Path], bundle_dir: Path, out: Path) -> float:
    import cudf
    import cupy

    from tasks.backend import use_async_device_memory
    from tasks.bundle import LoadedBundle
    from tasks.gpu_features import DeviceTransform

    # the allocator gpupipe's own GPU processes use, whether or not this process ran the ETL
    use_async_device_memory()
    bundle = LoadedBundle.load(bundle_dir, "xgboost", device="cuda")
    transform = DeviceTransform(bundle.spec_dict, bundle.lookups, cupy)
    booster = bundle.scorer.booster  # type: ignore[attr-defined]
    spec = bundle.spec
    out.mkdir(parents=True, exist_ok=True)
    # warm up kernels and the memory pool outside the timing, as the flow's workers do once
    transform.matrix(cudf.read_parquet(str(files[0]), columns=spec.raw_columns).head(1000))
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for f in files:
        frame = cudf.read_parquet(str(f), columns=spec.raw_columns)
        probs = cupy.asarray(booster.inplace_predict(transform.matrix(frame))).reshape(-1)
        cudf.DataFrame(
            {
                spec.id_column: frame[spec.id_column],
                "score": probs.astype(cupy.float32),
                "label": (probs >= bundle.threshold).astype(cupy.int8),
                "model_name": cudf.Series([MODEL_NAME]).repeat(len(frame)).reset_index(drop=True),
                "model_version": cupy.full(len(frame), 1, cupy.int64),
            }
        ).to_parquet(str(out / f.name), index=False)
    cupy.cuda.Device().synchronize()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- flow runs


def run_flow(
    args: argparse.Namespace,
    config: str,
    inputs: Path,
    out: Path,
    cluster: str,
    extra: list[str] | None = None,
) -> tuple[float, dict[str, Any]]:
    """One flow run, timed; `extra`: KEY=VALUE overrides on top of --set."""
    from flows.batch_scoring import batch_scoring

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = batch_scoring(
        input_path=str(inputs),
        output_dir=str(out),
        scorer=args.scorer,
        cluster=cluster,
        partition_rows=args.partition_rows,
        device=args.device,
        config_path=config,
        overrides=flow_overrides(args, extra),
    )
    return time.perf_counter() - t0, summary


def flow_overrides(
    args: argparse.Namespace, extra: list[str] | None = None
) -> dict[str, Any] | None:
    """--workers, --set KEY=VALUE and then `extra` KEY=VALUE as the flow's overrides (values
    parsed as JSON if they can be: numbers and booleans, else strings)."""
    out: dict[str, Any] = {"cluster.n_workers": args.workers} if args.workers else {}
    for item in [*args.set, *(extra or [])]:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out or None


def warm_prefect() -> None:
    """Start Prefect's temporary API (if one is used) before anything is timed."""
    from prefect import flow

    @flow(name="bench-warmup")
    def _noop() -> None:
        return None

    _noop()


def compare_scores(
    flow_out: Path, naive_out: Path, files: list[Path], n: int = 2, other_flow: bool = False
) -> float:
    """Largest |flow score - naive score| over the first `n` files (rows in file order);
    `other_flow`: `naive_out` is another flow run's output instead."""
    import pandas as pd

    worst = 0.0
    for f in files[:n]:
        flow_file = next(flow_out.glob(f"{f.stem}-*.parquet"))
        other = next(naive_out.glob(f"{f.stem}-*.parquet")) if other_flow else naive_out / f.name
        a = pd.read_parquet(flow_file, columns=["score"])["score"].to_numpy(np.float64)
        b = pd.read_parquet(other, columns=["score"])["score"].to_numpy(np.float64)
        if a.shape != b.shape:
            return math.inf
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
    return worst


# GPU and CPU XGBoost sum a row's trees in other orders in float32 (tests/flows/
# test_batch_scoring.py::test_gpu_flow_matches_the_cpu_model holds the flow to the same bound)
CPU_MODEL_SCORE_ATOL = 1e-5


def cpu_model_diff(
    flow_out: Path, files: list[Path], bundle_dir: Path, n: int
) -> tuple[float, int]:
    """Largest |flow score - CPU model score| over the first `n` files, and the rows compared:
    the model loaded in this process on the CPU (XGBoost's CPU predictor, pandas transform), the
    reference for a GPU run. Rows are matched by id."""
    import pandas as pd

    from tasks.bundle import LoadedBundle, frame_to_raw

    bundle = LoadedBundle.load(bundle_dir, "xgboost", device="cpu")
    spec = bundle.spec
    worst, rows = 0.0, 0
    for f in files[:n]:
        frame = pd.read_parquet(f, columns=spec.raw_columns)
        want = pd.Series(
            bundle.predict_raw(frame_to_raw(frame, spec.raw_columns)).astype(np.float64),
            index=frame[spec.id_column].to_numpy(),
        )
        flow_file = next(flow_out.glob(f"{f.stem}-*.parquet"))
        got = pd.read_parquet(flow_file, columns=[spec.id_column, "score"])
        if len(got) != len(want) or not got[spec.id_column].isin(want.index).all():
            return math.inf, rows
        served = got["score"].to_numpy(np.float64)
        expected = want.loc[got[spec.id_column].to_numpy()].to_numpy()
        worst = max(worst, float(np.max(np.abs(served - expected))) if len(got) else 0.0)
        rows += len(got)
    return worst, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from flows.cli import cli_prefect_settings

    with cli_prefect_settings():  # the flow runs here as `gpupipe score` runs it
        return run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> int:
    from prefect.settings import get_current_settings

    from tasks.cluster import cpu_count

    heartbeats_off = get_current_settings().flows.heartbeat_frequency is None

    if args.device == "gpu":
        from tasks.backend import probe_gpu

        ok, why = probe_gpu()
        if not ok:
            print(f"skipped: {why}")
            if args.out:
                args.out.write_text(json.dumps({"skipped": why}, indent=2))
            return 0
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files = make_inputs(work, args.rows, args.files, args.unique_rows, args.seed, args.input_codec)
    print(f"inputs: {args.rows:,} rows in {len(files)} file(s) ({time.perf_counter() - t0:.1f}s)")
    if not args.partition_rows:
        args.partition_rows = max(math.ceil(args.rows / args.files), 1)
    config, bundle = build_champion(args, work)
    warm_prefect()

    if args.ab_rounds:
        return run_ab(args, config, files)
    results: list[dict[str, Any]] = []

    def record(name: str, seconds: float, **extra: Any) -> None:
        results.append(
            {"name": name, "seconds": seconds, "rows_per_s": args.rows / seconds, **extra}
        )
        print(f"  {name:<28} {seconds:8.2f}s  {args.rows / seconds:>14,.0f} rows/s")

    naive_out = work / "out-naive"
    shutil.rmtree(naive_out, ignore_errors=True)
    if args.device == "gpu":
        record("naive loop (cuDF, 1 GPU)", naive_gpu(files, bundle, naive_out))
    else:
        record(
            "naive loop (1 thread)", naive_cpu(files, bundle, naive_out, 1, args.scorer), threads=1
        )
        if not args.no_naive_all:
            all_out = work / "out-naive-all"
            shutil.rmtree(all_out, ignore_errors=True)
            secs = naive_cpu(files, bundle, all_out, cpu_count(), args.scorer)
            record(f"naive loop ({cpu_count()} threads)", secs, threads=cpu_count())

    inputs = files[0].parent
    secs, summary = run_flow(args, config, inputs, work / "out-flow", "local")
    record("flow (own cluster)", secs, workers=summary["workers"])
    record(
        "  its scoring phase",
        summary["seconds_scoring"],
        note="submit to last result, from the run summary",
    )
    if summary["rows"]["scored"] != args.rows:
        raise SystemExit(f"flow scored {summary['rows']['scored']} rows, expected {args.rows}")
    diff = compare_scores(work / "out-flow", naive_out, files)
    cpu_diff, cpu_rows = (
        cpu_model_diff(work / "out-flow", files, bundle, args.cpu_check_files)
        if args.cpu_check_files
        else (math.nan, 0)
    )

    if not args.no_warm:
        from tasks.backend import resolve_backend
        from tasks.cluster import dask_client
        from tasks.config import load_config
        from tasks.scoring import scoring_cluster_config

        cfg = load_config(config, flow_overrides(args))  # the cluster the flow would make
        cluster_cfg = scoring_cluster_config(cfg, args.device)
        with dask_client(cluster_cfg, resolve_backend(args.device)) as client:
            address = client.scheduler.address
            secs, warm = run_flow(args, config, inputs, work / "out-flow-warm", address)
            record("flow (warm cluster)", secs, workers=warm["workers"])
            record("  its scoring phase", warm["seconds_scoring"])
            # the workers now hold the model (and tuned kernels): a nightly run on a long-lived
            # cluster with an unchanged champion
            secs, cached = run_flow(args, config, inputs, work / "out-flow-cached", address)
            record("flow (warm, model cached)", secs, workers=cached["workers"])
            record("  its scoring phase", cached["seconds_scoring"])
            if heartbeats_off:
                # the same run with Prefect's flow-run heartbeats on, as under a Prefect server
                from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY as FREQUENCY
                from prefect.settings import temporary_settings

                with temporary_settings(updates={FREQUENCY: FREQUENCY.default()}):
                    out = work / "out-flow-heartbeats"
                    secs, beats = run_flow(args, config, inputs, out, address)
                record("flow (warm, cached, heartbeats)", secs, workers=beats["workers"])
                record("  its scoring phase", beats["seconds_scoring"])

    base = results[0]["rows_per_s"]
    for r in results:
        r["speedup_vs_naive"] = r["rows_per_s"] / base
    names = [r["name"] for r in results]
    flow_rate = results[names.index("flow (own cluster)")]["rows_per_s"]
    best_rate = max(r["rows_per_s"] for r in results if r["name"].startswith(("flow", "  its")))
    report: dict[str, Any] = {
        "device": args.device,
        "machine": {
            "cores": cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
        },
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "max_abs_score_diff_flow_vs_naive": diff,
        "max_abs_score_diff_flow_vs_cpu_model": cpu_diff,
        "cpu_model_rows_compared": cpu_rows,
        "cpu_model_atol": CPU_MODEL_SCORE_ATOL,
        "matches_cpu_model": bool(cpu_rows) and cpu_diff <= CPU_MODEL_SCORE_ATOL,
        "prefect_heartbeats": "off (no Prefect server)" if heartbeats_off else "on",
    }
    if args.device == "cpu":
        goal = 0.8 * cpu_count()
        report["goal"] = f"flow >= {goal:.1f}x the 1-thread naive loop (0.8 x {cpu_count()} cores)"
        report["goal_met_end_to_end"] = flow_rate / base >= goal
        report["goal_met_best_flow_measure"] = best_rate / base >= goal
    else:
        report["goal"] = "flow >= 100M rows/s end to end on one H100"
        report["goal_met_end_to_end"] = flow_rate >= 100e6
        report["goal_met_best_flow_measure"] = best_rate >= 100e6
    try:
        import xgboost

        report["xgboost"] = xgboost.__version__
    except ImportError:
        pass
    print()
    print(f"{'':<30}{'seconds':>10}{'rows/s':>16}{'x naive':>10}")
    for r in results:
        print(
            f"{r['name']:<30}{r['seconds']:>10.2f}{r['rows_per_s']:>16,.0f}"
            f"{r['speedup_vs_naive']:>10.2f}"
        )
    print(f"max |flow - naive| score: {diff:.3g}")
    if cpu_rows:
        print(
            f"max |flow - CPU model| score over {cpu_rows:,} rows: {cpu_diff:.3g} "
            f"(tolerance {CPU_MODEL_SCORE_ATOL:g}: {report['matches_cpu_model']})"
        )
    print(
        f"goal: {report['goal']}: own cluster end to end {report['goal_met_end_to_end']}, "
        f"best flow measure {report['goal_met_best_flow_measure']}"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


def run_ab(args: argparse.Namespace, config: str, files: list[Path]) -> int:
    """Flow runs with settings A and B alternating (A B B A per round) on running clusters whose
    workers already hold the model: run order and machine state are spread over both sides,
    which single runs per setting were not (docs/benchmarks.md, ninth session). Sides whose
    cluster settings differ (scoring.gpu_worker_threads, cluster.*) get a cluster each, both
    running throughout; otherwise they share one."""
    from contextlib import ExitStack

    from tasks.backend import resolve_backend
    from tasks.cluster import dask_client
    from tasks.config import load_config
    from tasks.scoring import scoring_cluster_config

    sides = {"A": args.ab_a.split(), "B": args.ab_b.split()}
    inputs = files[0].parent
    work = args.work.resolve()
    runs: list[dict[str, Any]] = []
    with ExitStack() as stack:
        addresses: dict[str, str] = {}
        made: list[tuple[Any, str]] = []  # (cluster settings, scheduler address)
        for side, extra in sides.items():
            cfg = load_config(config, flow_overrides(args, extra))
            cluster_cfg = scoring_cluster_config(cfg, args.device)
            known = next((a for c, a in made if c == cluster_cfg), None)
            if known is None:
                client = stack.enter_context(dask_client(cluster_cfg, resolve_backend(args.device)))
                known = client.scheduler.address
                made.append((cluster_cfg, known))
                # the first run on a cluster loads the model into its workers
                secs, _ = run_flow(args, config, inputs, work / "out-ab-reference", known, extra)
                print(f"  {side}: first run on a new cluster (model load) {secs:.2f}s")
            addresses[side] = known
        for r in range(args.ab_rounds):
            for side in "ABBA":
                out = work / f"out-ab-{side}"
                secs, summary = run_flow(args, config, inputs, out, addresses[side], sides[side])
                if summary["rows"]["scored"] != args.rows:
                    raise SystemExit(f"{side} scored {summary['rows']['scored']} of {args.rows}")
                runs.append(
                    {
                        "round": r,
                        "side": side,
                        "seconds": secs,
                        "rows_per_s": args.rows / secs,
                        "seconds_scoring": summary["seconds_scoring"],
                        "dask_tasks": summary["dask_tasks"],
                        "max_abs_score_diff_vs_first_run": compare_scores(
                            out, work / "out-ab-reference", files, other_flow=True
                        ),
                    }
                )
                print(
                    f"  round {r} {side}: {secs:.2f}s ({args.rows / secs / 1e6:.1f}M rows/s), "
                    f"scoring phase {summary['seconds_scoring']:.2f}s"
                )
    by_side = {
        side: {
            "seconds": [x["seconds"] for x in runs if x["side"] == side],
            "mean_seconds": float(np.mean([x["seconds"] for x in runs if x["side"] == side])),
            "mean_scoring_seconds": float(
                np.mean([x["seconds_scoring"] for x in runs if x["side"] == side])
            ),
        }
        for side in "AB"
    }
    for side, v in by_side.items():
        print(
            f"{side} {sides[side] or '(defaults)'}: mean {v['mean_seconds']:.2f}s "
            f"({args.rows / v['mean_seconds'] / 1e6:.1f}M rows/s), "
            f"scoring phase {v['mean_scoring_seconds']:.2f}s"
        )
    if args.out:
        report = {
            "device": args.device,
            "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "sides": {k: v or ["(defaults)"] for k, v in sides.items()},
            "clusters": len({a for a in addresses.values()}) if runs else 0,
            "runs": runs,
            "by_side": by_side,
        }
        args.out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
