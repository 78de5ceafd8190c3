"""tasks/gpu_io.py: parquet read and written by libcudf on the calling thread's own CUDA stream,
against cuDF's own reader and writer on the default stream (GPU tests), and its argument checks
(CPU)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.backend import probe_gpu
from tasks.gpu_io import write_parquet_on_stream

GPU_OK, GPU_WHY = probe_gpu()


@pytest.mark.parametrize(
    ("offsets", "n_paths"), [([0, 5], 2), ([0, 5, 9], 1), ([0, 6, 4, 9], 3), ([], 0)]
)
def test_write_refuses_offsets_that_do_not_cover_the_paths(
    offsets: list[int], n_paths: int, tmp_path: Path
) -> None:
    paths = [tmp_path / f"{i}.parquet" for i in range(n_paths)]
    with pytest.raises(ValueError, match="non-decreasing row offsets"):
        write_parquet_on_stream(None, offsets, paths, "snappy")
    assert list(tmp_path.iterdir()) == []


def raw_frame(rng: np.random.Generator, n: int, start: int) -> pd.DataFrame:
    amount = rng.lognormal(3, 1, n)
    amount[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame(
        {
            "row_id": np.arange(start, start + n, dtype=np.int64),
            "amount": amount,
            "count": rng.integers(-5, 5, n).astype(np.int32),
            "shop": rng.choice(["a", "bb", "ccc", None], n),
            "ts": pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 10**6, n), "s"),
        }
    )


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
def test_stream_reader_and_writer_match_cudf(tmp_path: Path, test_seed: int) -> None:
    import cudf

    from tasks.gpu_io import read_parquet_on_stream

    rng = np.random.default_rng(test_seed)
    sizes = [1000, 1, 2500, 700]
    paths = []
    start = 0
    for i, n in enumerate(sizes):
        path = tmp_path / f"in-{i}.parquet"
        raw_frame(rng, n, start).to_parquet(path, index=False, row_group_size=600)
        paths.append(path)
        start += n
    columns = ["shop", "row_id", "amount", "ts"]  # a subset, out of file order

    got = read_parquet_on_stream(paths, columns)
    want = cudf.read_parquet([str(p) for p in paths], columns=columns)
    assert list(got.columns) == columns
    assert len(got) == sum(sizes)
    pd.testing.assert_frame_equal(
        got.to_pandas().reset_index(drop=True), want.to_pandas().reset_index(drop=True)
    )

    # each input's rows back to its own file: same tables as cuDF's partitioned writer
    offsets = list(np.cumsum([0, *sizes]))
    ours = [tmp_path / f"ours-{i}.parquet" for i in range(len(sizes))]
    theirs = [tmp_path / f"theirs-{i}.parquet" for i in range(len(sizes))]
    write_parquet_on_stream(got, offsets, ours, "snappy")
    want.to_parquet([str(p) for p in theirs], partition_offsets=offsets, index=False)
    codecs = set()
    for a, b, n in zip(ours, theirs, sizes, strict=True):
        mine, cudfs = pq.read_table(a), pq.read_table(b)
        assert mine.num_rows == n
        assert mine.equals(cudfs.replace_schema_metadata(None))
        # libcudf leaves a page uncompressed where snappy would not shrink it, in both writers
        ours_codecs, their_codecs = column_codecs(a), column_codecs(b)
        assert ours_codecs == their_codecs
        codecs.update(ours_codecs)
    assert "SNAPPY" in codecs


def column_codecs(path: Path) -> list[str]:
    meta = pq.read_metadata(path)
    return [
        meta.row_group(g).column(c).compression
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
    ]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
def test_threads_get_their_own_non_blocking_streams() -> None:
    from cuda.bindings import runtime

    from tasks.gpu_io import thread_stream

    mine = thread_stream()
    assert thread_stream() is mine
    seen: list[object] = []
    worker = threading.Thread(target=lambda: seen.append(thread_stream()), name="gpu-io-test")
    worker.start()
    worker.join()
    assert seen[0] is not mine
    for stream in (mine, seen[0]):
        handle = stream.__cuda_stream__()[1]  # type: ignore[attr-defined]
        assert handle != 0  # not the legacy default stream
        err, flags = runtime.cudaStreamGetFlags(handle)
        assert err == runtime.cudaError_t.cudaSuccess
        assert flags & runtime.cudaStreamNonBlocking


KEY_CASES = {
    "unique ints": [5, 3, 9, 1],
    "a repeated int": [5, 3, 9, 3],
    "a null": [5, None, 9, 1],
    "unique strings": ["a", "bb", "ccc", ""],
    "a repeated string": ["a", "bb", "a", "c"],
    "two NaNs": [1.5, float("nan"), 2.5, float("nan")],
    "one NaN": [1.5, float("nan"), 2.5, 3.5],
    "empty": [],
    "one value": [7],
}


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)
@pytest.mark.parametrize("case", list(KEY_CASES))
def test_is_key_on_stream_agrees_with_cudf(case: str, test_seed: int) -> None:
    import cudf

    from tasks.gpu_io import is_key_on_stream

    values = KEY_CASES[case]
    ids = cudf.Series(values, nan_as_null=False) if values else cudf.Series([], dtype="int64")
    want = not bool(ids.isna().any()) and not bool(ids.duplicated().any())
    assert is_key_on_stream(ids) is want
    # and on a large column read from parquet, with a repeat planted at a random place
    rng = np.random.default_rng(test_seed)
    big = cudf.Series(rng.permutation(3_000_000).astype(np.int64))
    assert is_key_on_stream(big) is True
    i, j = rng.choice(len(big), 2, replace=False)
    big.iloc[int(i)] = big.iloc[int(j)]
    assert is_key_on_stream(big) is False
