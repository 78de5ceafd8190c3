"""Debug aid: compare the GPU and CPU ETL stage by stage on a small generated dataset."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dask
import numpy as np
import pandas as pd

import tasks.etl as etl
from tasks.backend import resolve_backend
from tasks.config import builtin_config
from tasks.generate import generate_transactions


def stages(device: str, raw: Path, home: Path) -> dict[str, pd.DataFrame]:
    cfg = builtin_config(raw, home)
    backend = resolve_backend(device)
    files = sorted(raw.glob("*.parquet"))
    roles = etl.column_roles(cfg)
    with dask.config.set({"dataframe.backend": backend.dataframe_backend}):
        ddf = etl.read_raw(files, cfg, roles, backend)
        cuts = etl.time_cuts(ddf, "timestamp", "transaction_id", 0.15, 0.15, 42)
        split = ddf.map_partitions(
            etl.assign_split,
            target="is_fraud",
            timestamp="timestamp",
            cuts=cuts,
            valid_fraction=0.15,
            test_fraction=0.15,
            seed=42,
        ).compute()
    split = split.to_pandas() if hasattr(split, "to_pandas") else split
    print(
        device,
        "cuts",
        cuts,
        "rows",
        len(split),
        "split counts",
        split["__split"].value_counts().to_dict(),
    )
    return {"split": split}


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    raw = tmp / "raw"
    generate_transactions(30_000, raw, seed=123, rows_per_file=10_000)
    a = stages("cpu", raw, tmp / "c")["split"].sort_values("transaction_id").reset_index(drop=True)
    b = stages("gpu", raw, tmp / "g")["split"].sort_values("transaction_id").reset_index(drop=True)
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        same = (
            (x == y) | (pd.isna(x) & pd.isna(y))
            if x.dtype.kind != "O"
            else (x.astype(str) == y.astype(str))
        )
        print(
            f"{col:15} {a[col].dtype!s:16} {b[col].dtype!s:16} equal rows {int(np.sum(same))}/{len(x)}"
        )
    train_c = a[a["__split"] == 0].amount
    train_g = b[b["__split"] == 0].amount
    print("train amount median cpu", train_c.median(), "gpu", train_g.median())
    cfg = builtin_config(raw, tmp / "h")
    specs, lookups = {}, {}
    for dev in ("cpu", "gpu"):
        out = etl.run_etl(cfg, resolve_backend(dev), tmp / f"etl-{dev}")
        specs[dev], lookups[dev] = etl.load_transform(out.transform_dir)
    for fc, fg in zip(specs["cpu"].numeric, specs["gpu"].numeric, strict=True):
        a = np.array([fc.fill, fc.lo, fc.hi, fc.mean, fc.std])
        b = np.array([fg.fill, fg.lo, fg.hi, fg.mean, fg.std])
        flag = "" if np.allclose(a, b, rtol=1e-6) else "   <-- differs"
        print(f"{fc.name:28} cpu {np.round(a, 4)} gpu {np.round(b, 4)}{flag}")
    for key, lc in lookups["cpu"].items():
        lg = lookups["gpu"][key]
        print(
            key, "keys equal", np.array_equal(lc["key"], lg["key"]), len(lc["key"]), len(lg["key"])
        )
        for stat in ("count", "mean", "std", "target_rate"):
            if len(lc[stat]) == len(lg[stat]):
                d = np.abs(lc[stat] - lg[stat])
                print(
                    f"  {stat:12} max diff {np.nanmax(d):.3g} nan cpu {np.isnan(lc[stat]).sum()} gpu {np.isnan(lg[stat]).sum()}"
                )
        print(
            "  prior",
            next(e for e in specs["cpu"].entities if e.key == key).prior_mean,
            next(e for e in specs["gpu"].entities if e.key == key).prior_mean,
        )


if __name__ == "__main__":
    main()
