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
    for dev in ("cpu", "gpu"):
        out = etl.run_etl(cfg, resolve_backend(dev), tmp / f"etl-{dev}")
        spec, _ = etl.load_transform(out.transform_dir)
        print(dev, spec.numeric[0])
        f = pd.read_parquet(out.features_dir("train"))
        print(dev, "train rows", len(f), "ids", f.transaction_id.min(), f.transaction_id.max())


if __name__ == "__main__":
    main()
