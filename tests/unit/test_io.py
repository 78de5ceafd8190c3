"""Bad input gets a clear error naming the file, the column and the reason."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.io import ColumnRoles, DataError, check_files, discover_files

ROLES = ColumnRoles(
    {"id": "id", "y": "target", "x": "numeric", "c": "categorical", "t": "timestamp"}
)


def frame(n: int = 5) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "y": np.array([0, 1] * n)[:n],
            "x": np.linspace(0, 1, n),
            "c": ["a"] * n,
            "t": pd.date_range("2026-01-01", periods=n, freq="h"),
        }
    )


def test_discover_directory_glob_and_file(tmp_path: Path) -> None:
    for i in range(2):
        frame().to_parquet(tmp_path / f"p{i}.parquet")
    (tmp_path / "_meta.parquet").write_text("not data")
    assert len(discover_files(str(tmp_path))) == 2
    assert len(discover_files(str(tmp_path / "p*.parquet"))) == 2
    assert len(discover_files(str(tmp_path / "p0.parquet"))) == 1
    with pytest.raises(DataError, match="no input files"):
        discover_files(str(tmp_path / "none*.parquet"))


def test_partitioned_directory_names_the_glob_to_use(tmp_path: Path) -> None:
    """Tables only in subdirectories (dt=.../part.parquet): the error says how to name them,
    for training and scoring alike; the glob then finds them all."""
    from tasks.scoring import discover_partitions

    for day in ("dt=2026-01-01", "dt=2026-01-02"):
        (tmp_path / day).mkdir()
        frame().to_parquet(tmp_path / day / "part-0.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    glob_hint = re.escape(f"use a glob such as '{tmp_path}/*/*.parquet'")
    with pytest.raises(DataError, match=glob_hint):
        discover_files(str(tmp_path))
    with pytest.raises(DataError, match=glob_hint):
        discover_partitions(str(tmp_path))
    assert len(discover_files(str(tmp_path / "*" / "*.parquet"))) == 2
    assert len(discover_partitions(str(tmp_path / "*" / "*.parquet"))) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert discover_partitions(str(empty)) == []  # an empty directory stays a clean no-op


def test_csv_text_in_a_number_column_past_the_sample_is_named(tmp_path: Path) -> None:
    """A CSV column's type is guessed from its first rows; text further down is found by the
    check, which names the file, the column, the value and its row."""
    good = frame(1500)
    bad = good.copy()
    bad["x"] = bad["x"].astype(object)
    bad.loc[1200, "x"] = "oops"
    good.to_csv(tmp_path / "a.csv", index=False)
    bad.to_csv(tmp_path / "b.csv", index=False)
    check_files([tmp_path / "a.csv"], ROLES)
    with pytest.raises(DataError, match=r"b\.csv: column 'x': 1 value\(s\) that are not numbers"):
        check_files([tmp_path / "a.csv", tmp_path / "b.csv"], ROLES)
    with pytest.raises(DataError, match="'oops' in data row 1201"):
        check_files([tmp_path / "b.csv"], ROLES)


def test_good_files_pass(tmp_path: Path) -> None:
    frame().to_parquet(tmp_path / "a.parquet")
    frame().assign(t=lambda d: d.t.astype(str)).to_csv(tmp_path / "b.csv", index=False)
    check_files([tmp_path / "a.parquet", tmp_path / "b.csv"], ROLES)


@pytest.mark.parametrize(
    ("mutate", "column", "reason"),
    [
        (lambda d: d.drop(columns="x"), "x", "missing"),
        (lambda d: d.assign(x=["oops"] * len(d)), "x", "expected a numeric type"),
        (lambda d: d.assign(y=[0, 1, 2, 0, 1]), "y", "binary"),
        (lambda d: d.assign(y=["no", "yes", "no", "no", "no"]), "y", "numeric"),
        (lambda d: d.assign(t=np.arange(len(d)) * 1.5), "t", "timestamp"),
        (lambda d: d.assign(id=pd.array([None] * len(d), dtype="Int64")), "id", "all ids are null"),
    ],
)
def test_bad_file_error_names_file_column_reason(
    tmp_path: Path, mutate, column: str, reason: str
) -> None:
    path = tmp_path / "bad.parquet"
    mutate(frame()).to_parquet(path)
    with pytest.raises(DataError) as info:
        check_files([path], ROLES)
    message = str(info.value)
    assert str(path) in message and repr(column) in message and reason in message


@pytest.mark.parametrize(
    ("mutate", "write_statistics", "proven"),
    [
        (lambda d: d, True, True),
        (lambda d: d.assign(y=d.y.astype(bool)), True, True),
        (lambda d: d, False, False),  # no statistics: the columns must be read
        (lambda d: d.assign(y=d.y.astype(float)), True, False),  # 0.5 would fit [0, 1]
        (lambda d: d.assign(y=[0, 1, 2, 0, 1]), True, False),
        (lambda d: d.assign(y=pd.array([0, 1, None, 0, 1], dtype="Int64")), True, False),
        (lambda d: d.assign(id=pd.array([None] * len(d), dtype="Int64")), True, False),
        (lambda d: d.assign(id=pd.array([None, 1, None, 2, 3], dtype="Int64")), True, True),
    ],
)
def test_footer_statistics_prove_valid_values_only_when_they_can(
    tmp_path: Path, mutate, write_statistics: bool, proven: bool
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.io import footer_shows_valid_values, read_footer

    path = tmp_path / "f.parquet"
    table = pa.Table.from_pandas(mutate(frame()), preserve_index=False)
    pq.write_table(table, path, write_statistics=write_statistics, row_group_size=2)
    assert footer_shows_valid_values(read_footer(path).metadata, ROLES) is proven
    if proven:
        check_files([path], ROLES)  # and a file it proves valid passes


def test_empty_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    frame().iloc[:0].to_parquet(path)
    with pytest.raises(DataError, match=r"empty\.parquet: empty file"):
        check_files([path], ROLES)


def test_all_problems_listed_at_once(tmp_path: Path) -> None:
    frame().drop(columns="c").to_parquet(tmp_path / "one.parquet")
    frame().assign(y=[3] * 5).to_parquet(tmp_path / "two.parquet")
    with pytest.raises(DataError) as info:
        check_files([tmp_path / "one.parquet", tmp_path / "two.parquet"], ROLES)
    assert "one.parquet" in str(info.value) and "two.parquet" in str(info.value)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: unreadable parquet"):
        check_files([path], ROLES)
