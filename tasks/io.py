"""Finding, reading and checking raw input tables (parquet or CSV), with errors that name the
file, the column and the reason."""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow.parquet as pq

Role = Literal["id", "target", "numeric", "categorical", "timestamp", "key"]
TableFormat = Literal["parquet", "csv"]
_SUFFIX_FORMAT: dict[str, TableFormat] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Input data that cannot be used; the message names the file, the column and the reason."""


@dataclass(frozen=True)
class ColumnRoles:
    """What each raw column is for; the checks follow from the role."""

    roles: dict[str, Role]

    @property
    def columns(self) -> list[str]:
        return list(self.roles)

    def of(self, role: Role) -> list[str]:
        return [c for c, r in self.roles.items() if r == role]


def table_format(path: Path, declared: str = "auto") -> TableFormat:
    if declared in ("parquet", "csv"):
        return declared  # type: ignore[return-value]
    fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown table format (expected .parquet or .csv, or set data.format)"
        )
    return fmt


def nested_tables_hint(directory: Path) -> str:
    """For a directory whose tables are only in subdirectories (a partitioned layout such as
    `dt=2026-01-01/part-0.parquet`): how to name them, since directories are not searched
    recursively."""
    if not directory.is_dir():
        return ""
    nested = any(
        f.suffix.lower() in _SUFFIX_FORMAT
        for sub in directory.iterdir()
        if sub.is_dir()
        for f in sub.iterdir()
    )
    if not nested:
        return ""
    return (
        " directly in it (directories are not searched recursively; for files in "
        f"subdirectories use a glob such as '{directory}/*/*.parquet')"
    )


def discover_files(source: str, declared_format: str = "auto") -> list[Path]:
    """Expand a file, a directory (its parquet/CSV files) or a glob into a sorted file list."""
    p = Path(source).expanduser()
    if p.is_dir():
        found = [f for f in p.iterdir() if f.suffix.lower() in _SUFFIX_FORMAT and f.is_file()]
    elif p.is_file():
        found = [p]
    else:
        found = [Path(f) for f in glob.glob(str(p)) if Path(f).is_file()]
    files = sorted(f.resolve() for f in found if not f.name.startswith(("_", ".")))
    if not files:
        raise DataError(f"{source}: no input files found{nested_tables_hint(p)}")
    for f in files:
        table_format(f, declared_format)
    return files


def files_fingerprint(files: Iterable[Path], salt: str = "") -> str:
    """A content-addressing key from each file's path, size and modification time."""
    h = hashlib.sha256(salt.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def read_table(
    path: Path, columns: Sequence[str] | None = None, declared: str = "auto"
) -> pd.DataFrame:
    """Read one parquet or CSV file with pandas; raises DataError naming the file if unreadable."""
    fmt = table_format(path, declared)
    try:
        if fmt == "parquet":
            return pd.read_parquet(path, columns=list(columns) if columns else None)
        return pd.read_csv(path, usecols=list(columns) if columns else None)
    except ValueError as exc:
        if columns:
            present = set(peek_schema(path, declared).columns)
            missing = [c for c in columns if c not in present]
            if missing:
                raise DataError(f"{path}: column {missing[0]!r}: missing") from exc
        raise DataError(f"{path}: unreadable {fmt} file: {exc}") from exc
    except Exception as exc:
        raise DataError(f"{path}: unreadable {fmt} file: {exc}") from exc


def peek_schema(path: Path, declared: str = "auto") -> pd.DataFrame:
    """An empty frame with the file's columns and pandas dtypes, read without loading data."""
    fmt = table_format(path, declared)
    try:
        if fmt == "parquet":
            return pq.read_schema(path).empty_table().to_pandas()
        return pd.read_csv(path, nrows=1000).iloc[:0]
    except Exception as exc:
        raise DataError(f"{path}: unreadable {fmt} file: {exc}") from exc


@dataclass(frozen=True)
class ParquetFooter:
    """What a parquet file's footer tells without reading data."""

    schema: pd.DataFrame  # empty, with the file's columns and pandas dtypes (as `peek_schema`)
    rows: int
    metadata: Any  # pyarrow FileMetaData: row groups and their column statistics


def read_footer(path: Path) -> ParquetFooter:
    """A parquet file's schema, row count and statistics from one read of its footer."""
    try:
        footer = pq.ParquetFile(path)
        schema = footer.schema_arrow.empty_table().to_pandas()
        return ParquetFooter(schema, int(footer.metadata.num_rows), footer.metadata)
    except Exception as exc:
        raise DataError(f"{path}: unreadable parquet file: {exc}") from exc


def count_rows(path: Path, declared: str = "auto") -> int:
    if table_format(path, declared) == "parquet":
        try:
            return int(pq.ParquetFile(path).metadata.num_rows)
        except Exception as exc:
            raise DataError(f"{path}: unreadable parquet file: {exc}") from exc
    with path.open("rb") as fh:
        lines = sum(1 for _ in fh)
    return max(lines - 1, 0)


def coerce_timestamps(df: pd.DataFrame, roles: ColumnRoles, path: Path) -> pd.DataFrame:
    """CSV files carry timestamps as text: parse them, naming the file and column on failure."""
    for col in roles.of("timestamp"):
        if col in df.columns and not pd.api.types.is_datetime64_any_dtype(df[col]):
            try:
                df = df.assign(**{col: pd.to_datetime(df[col], format="ISO8601")})
            except (ValueError, TypeError) as exc:
                raise DataError(f"{path}: column {col!r}: not a timestamp ({exc})") from exc
    return df


def dtype_problems(frame: pd.DataFrame, roles: ColumnRoles, path: Path) -> list[str]:
    """Missing columns and columns whose type does not fit their role (schema only, no data)."""
    problems = []
    for col, role in roles.roles.items():
        if col not in frame.columns:
            problems.append(f"{path}: column {col!r}: missing")
            continue
        dtype = frame[col].dtype
        if role in ("numeric", "target") and not (
            pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
        ):
            problems.append(
                f"{path}: column {col!r}: expected a numeric type for {role}, got {dtype}"
            )
        if role == "timestamp" and not (
            pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_string_dtype(dtype)
        ):
            problems.append(f"{path}: column {col!r}: expected a timestamp, got {dtype}")
    return problems


def numeric_text_problems(frame: pd.DataFrame, roles: ColumnRoles, path: Path) -> list[str]:
    """Numeric-role columns of a read CSV that hold text which is not a number: the column, the
    count and the first such value with its row."""
    problems = []
    for col in roles.of("numeric"):
        if col not in frame.columns or pd.api.types.is_numeric_dtype(frame[col].dtype):
            continue
        values = frame[col]
        bad = pd.to_numeric(values, errors="coerce").isna() & values.notna()
        if bad.any():
            row = int(bad.to_numpy().argmax())  # the first True
            problems.append(
                f"{path}: column {col!r}: {int(bad.sum())} value(s) that are not numbers "
                f"(e.g. {values.iloc[row]!r} in data row {row + 1})"
            )
    return problems


def value_problems(
    frame: pd.DataFrame, roles: ColumnRoles, path: Path, *, unique_ids: bool
) -> list[str]:
    """Problems in the values: empty table, non-binary target, all-null or duplicate ids."""
    if len(frame) == 0:
        return [f"{path}: empty file (0 rows)"]
    problems = []
    for col in roles.of("target"):
        values = frame[col]
        if values.isna().any():
            problems.append(
                f"{path}: column {col!r}: {int(values.isna().sum())} missing target values"
            )
        bad = sorted(set(values.dropna().unique().tolist()) - {0, 1})
        if bad:
            problems.append(f"{path}: column {col!r}: target must be binary 0/1, found {bad[:5]}")
    for col in roles.of("id"):
        ids = frame[col]
        if ids.isna().all():
            problems.append(f"{path}: column {col!r}: all ids are null")
            continue
        if not unique_ids:
            continue
        # A missing id is a bad value in a row, scored like the others; only ids that are
        # there count as repeated (two missing ids are not the same id).
        present = ids.dropna()
        repeated = present.duplicated()
        if repeated.any():
            dup = present[repeated].iloc[0]
            dup = dup.item() if hasattr(dup, "item") else dup  # 601, not np.int64(601)
            problems.append(
                f"{path}: column {col!r}: {int(repeated.sum())} duplicate ids (e.g. {dup!r})"
            )
    return problems


def check_files(files: Sequence[Path], roles: ColumnRoles, declared: str = "auto") -> None:
    """Schema and value checks over every input file; raises one DataError listing all problems.

    Reads each file's schema, then its target and id columns only where the parquet footer's
    statistics cannot already show them valid, so it stays cheap on large inputs.
    """
    problems: list[str] = []
    for path in files:
        footer = read_footer(path) if table_format(path, declared) == "parquet" else None
        schema = footer.schema if footer is not None else peek_schema(path, declared)
        found = dtype_problems(schema, roles, path)
        if found:
            problems.extend(found)
            continue
        check_cols = roles.of("target") + roles.of("id")
        if footer is not None:
            if footer.rows == 0:
                problems.append(f"{path}: empty file (0 rows)")
                continue
            if footer_shows_valid_values(footer.metadata, roles):
                continue
        else:
            # CSV types come from a sample of rows: a number column can hold text further down
            check_cols += roles.of("numeric")
        frame = read_table(path, check_cols, declared)
        problems.extend(value_problems(frame, roles, path, unique_ids=False))
        problems.extend(numeric_text_problems(frame, roles, path))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(f"input data failed validation:\n  {shown}{more}")


def footer_shows_valid_values(meta: Any, roles: ColumnRoles) -> bool:
    """True when a parquet footer's statistics (`ParquetFooter.metadata`) prove what
    `value_problems` checks: an integer or boolean target with no nulls and values within
    [0, 1], and ids not all null.

    False means only "not proven": the caller then reads the columns and finds the problem, if
    any, with its full message. Files written without statistics always read.
    """
    index = {meta.schema.column(i).name: i for i in range(meta.num_columns)}
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    for col in roles.of("target"):
        if col not in index or meta.schema.column(index[col]).physical_type not in (
            "BOOLEAN",
            "INT32",
            "INT64",
        ):
            return False
        for group in groups:
            stats = group.column(index[col]).statistics
            if stats is None or not stats.has_min_max or not stats.has_null_count:
                return False
            if stats.null_count or not (stats.min >= 0 and stats.max <= 1):
                return False
    for col in roles.of("id"):
        if col not in index:
            return False
        nulls = 0
        for group in groups:
            stats = group.column(index[col]).statistics
            if stats is None or not stats.has_null_count:
                return False
            nulls += stats.null_count
        if nulls >= meta.num_rows:
            return False
    return True


def raw_bytes(files: Sequence[Path], columns: Sequence[str]) -> int:
    """About how many bytes the columns take in memory once read, from parquet footers: rows x
    width for fixed-width columns, the footer's uncompressed size plus 4-byte offsets for strings.
    A CSV file counts its size (text is at least as large as the values it holds)."""
    wanted = set(columns)
    total = 0
    for path in files:
        if path.suffix.lower() == ".csv":
            total += path.stat().st_size
            continue
        try:  # the metadata alone: `read_footer`'s pandas schema is not needed here
            meta = pq.read_metadata(path)
        except Exception:  # unreadable here: the file's size, and the ETL's read reports it
            total += path.stat().st_size
            continue
        rows = meta.num_rows
        text_bytes: dict[str, int] = {}
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                name = chunk.path_in_schema.split(".")[0]
                text_bytes[name] = text_bytes.get(name, 0) + int(chunk.total_uncompressed_size)
        for field in meta.schema.to_arrow_schema():
            if field.name not in wanted:
                continue
            try:
                total += rows * field.type.bit_width // 8
            except ValueError:  # variable width (strings): values plus offsets
                total += text_bytes.get(field.name, 0) + 4 * rows
    return total
