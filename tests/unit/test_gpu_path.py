"""The GPU path against the CPU path on the same data: ETL features, transform and training.

Runs only where cuDF and a CUDA device are usable (`-m gpu`); skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.backend import probe_gpu, resolve_backend

GPU_OK, GPU_WHY = probe_gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU_OK, reason=GPU_WHY)]

FEATURE_ATOL = 1e-5


@pytest.fixture(scope="module")
def both_etls(raw_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    from tasks.config import builtin_config
    from tasks.etl import run_etl

    home = tmp_path_factory.mktemp("gpu-home")
    # batches of 512 rows: the default 4096 gives the MLP only a few steps on this small table
    cfg = builtin_config(
        raw_dataset, home, **{"model.xgboost.n_estimators": 50, "model.mlp.batch_size": 512}
    )
    cpu = run_etl(cfg, resolve_backend("cpu"), home / "etl-cpu")
    gpu = run_etl(cfg, resolve_backend("gpu"), home / "etl-gpu")
    return cfg, cpu, gpu


def test_gpu_etl_matches_cpu(both_etls) -> None:
    """One GPU: the ETL holds one cuDF frame (etl_frames = auto -> single)."""
    _, cpu, gpu = both_etls
    assert len(list(gpu.features_dir("train").glob("*.parquet"))) == 1
    assert_etls_match(cpu, gpu)


def test_partitioned_gpu_etl_matches_cpu(both_etls, tmp_path: Path) -> None:
    """The dask-cuDF path (what several GPUs run) on one GPU, forced."""
    from tasks.etl import run_etl

    cfg, cpu, _ = both_etls
    cfg = cfg.model_copy(update={"etl_frames": "dask"})
    gpu = run_etl(cfg, resolve_backend("gpu"), tmp_path / "etl-gpu-dask")
    assert len(list(gpu.features_dir("train").glob("*.parquet"))) > 1
    assert_etls_match(cpu, gpu)


def assert_etls_match(cpu, gpu) -> None:  # type: ignore[no-untyped-def]
    from tasks.etl import load_transform

    assert cpu.rows == gpu.rows
    spec_c, lk_c = load_transform(cpu.transform_dir)
    spec_g, lk_g = load_transform(gpu.transform_dir)
    assert spec_c.feature_names == spec_g.feature_names
    for a, b in zip(spec_c.numeric, spec_g.numeric, strict=True):
        np.testing.assert_allclose(
            [a.fill, a.lo, a.hi, a.mean, a.std],
            [b.fill, b.lo, b.hi, b.mean, b.std],
            rtol=1e-6,
            atol=1e-9,
        )
    for a, b in zip(spec_c.categorical, spec_g.categorical, strict=True):
        assert a.vocabulary == b.vocabulary
        np.testing.assert_allclose(a.encoding, b.encoding, rtol=1e-12)
    for key in lk_c:
        np.testing.assert_array_equal(lk_c[key]["key"], lk_g[key]["key"])
        for stat in ("count", "mean", "std", "target_rate"):
            np.testing.assert_allclose(lk_c[key][stat], lk_g[key][stat], rtol=1e-9, atol=1e-12)
    for split in ("train", "valid", "test"):
        fc = pd.read_parquet(cpu.features_dir(split)).sort_values("transaction_id")
        fg = pd.read_parquet(gpu.features_dir(split)).sort_values("transaction_id")
        np.testing.assert_array_equal(fc.transaction_id.to_numpy(), fg.transaction_id.to_numpy())
        np.testing.assert_allclose(
            fc[spec_c.feature_names].to_numpy(),
            fg[spec_c.feature_names].to_numpy(),
            atol=FEATURE_ATOL,
        )


def test_device_transform_matches_numpy(both_etls) -> None:
    import cudf
    import cupy

    from tasks.bundle import frame_to_raw
    from tasks.etl import load_transform
    from tasks.gpu_features import DeviceTransform
    from tasks.numpy_features import transform_raw

    _, cpu, _ = both_etls
    spec, lookups = load_transform(cpu.transform_dir)
    raw = pd.read_parquet(cpu.raw_test_dir)
    expected = transform_raw(frame_to_raw(raw, spec.raw_columns), spec.model_dump(), lookups)
    got = DeviceTransform(spec.model_dump(), lookups, cupy).matrix(cudf.from_pandas(raw))
    np.testing.assert_allclose(cupy.asnumpy(got), expected, atol=FEATURE_ATOL)


@pytest.mark.parametrize(("kind", "auc_floor"), [("xgboost", 0.7), ("mlp", 0.6)])
def test_gpu_model_trains_on_device_data(
    both_etls, tmp_path: Path, kind: str, auc_floor: float
) -> None:
    """Each model trained on the GPU (XGBoost from CuPy arrays; the MLP with its steps replayed
    from a CUDA graph) against the same model trained on the CPU."""
    from tasks.etl import load_transform
    from tasks.train import train_mlp, train_xgboost

    train = {"xgboost": train_xgboost, "mlp": train_mlp}[kind]
    cfg, cpu, gpu = both_etls
    spec, _ = load_transform(gpu.transform_dir)
    args = (spec.feature_names, spec.target_column, cfg.model)
    on_gpu = train(gpu, *args, resolve_backend("gpu"), tmp_path / "g", 0)
    on_cpu = train(cpu, *args, resolve_backend("cpu"), tmp_path / "c", 0)
    assert on_gpu.params["device"] == "cuda"
    assert on_gpu.parity_max_abs_diff <= cfg.model.onnx_parity_atol
    # GPU and CPU differ in float summation order, so the models differ; on a test split of
    # a few thousand rows and ~1% positives their AUCs may differ by sampling noise alone:
    # allow three standard errors of the AUC (Hanley & McNeil 1982), not a fixed 0.03
    y = on_cpu.extra["y_test"]
    tolerance = 3 * auc_standard_error(on_cpu.metrics["roc_auc"], int(y.sum()), int((1 - y).sum()))
    assert abs(on_gpu.metrics["roc_auc"] - on_cpu.metrics["roc_auc"]) < tolerance
    assert on_gpu.metrics["roc_auc"] > auc_floor


def test_cuda_graph_mlp_steps_equal_eager_steps(both_etls) -> None:
    """Replaying the captured step does what launching it eagerly does: same batches, same init,
    same weights after several epochs (up to float reassociation in cuBLAS)."""
    import torch

    from tasks.config import MLPConfig
    from tasks.etl import load_transform
    from tasks.train import build_mlp, fit_mlp, read_split

    _, _, gpu = both_etls
    gpu_backend = resolve_backend("gpu")
    spec, _ = load_transform(gpu.transform_dir)
    train, valid = (
        read_split(gpu, s, spec.feature_names, spec.target_column, gpu_backend)
        for s in ("train", "valid")
    )
    mlp_cfg = MLPConfig(epochs=2, batch_size=512, hidden=[32, 16])
    graphed = fit_mlp(train, valid, mlp_cfg, gpu_backend, seed=3, cuda_graph=True).state_dict()
    eager = fit_mlp(train, valid, mlp_cfg, gpu_backend, seed=3, cuda_graph=False).state_dict()
    assert graphed.keys() == eager.keys()
    for name in graphed:
        np.testing.assert_allclose(
            graphed[name].numpy(), eager[name].numpy(), atol=1e-4, err_msg=name
        )
    # and the replays trained: the weights left their initial values (fit_mlp seeds torch first)
    torch.manual_seed(3)
    initial = build_mlp(len(spec.feature_names), mlp_cfg.hidden).state_dict()
    assert max(float((graphed[k] - initial[k]).abs().max()) for k in graphed) > 1e-3


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    q1 = auc / (2 - auc)
    q2 = 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / (
        positives * negatives
    )
    return float(np.sqrt(var))


def test_auc_standard_error_shrinks_with_more_rows() -> None:
    small = auc_standard_error(0.85, 45, 4455)
    assert 0.015 < small < 0.05
    assert auc_standard_error(0.85, 4500, 445500) < small / 5


def test_async_device_memory_is_chosen_once() -> None:
    """In a fresh process (RMM still on its default cudaMalloc resource) the call switches to
    cudaMallocAsync; a second call finds a resource chosen and changes nothing."""
    import subprocess
    import sys

    code = (
        "import rmm\n"
        "from tasks.backend import use_async_device_memory\n"
        "first = use_async_device_memory()\n"
        "mr = rmm.mr.get_current_device_resource()\n"
        "print(first, type(mr).__name__, use_async_device_memory())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == ["True", "CudaAsyncMemoryResource", "False"]


def test_segment_stats_on_the_device_equal_host_counts_per_file(test_seed: int) -> None:
    """A batch's per-file statistics, counted in one launch on the device, equal each file's
    counts on the host."""
    from types import SimpleNamespace

    import cupy

    from tasks.scoring import SCORE_BIN_EDGES, segment_stats
    from tasks.spec import Histogram

    rng = np.random.default_rng(test_seed)
    matrix = rng.normal(size=(5000, 3)).astype(np.float32)
    matrix[rng.random(matrix.shape) < 0.02] = np.nan
    probs = rng.random(5000).astype(np.float32)
    labels = (probs >= 0.5).astype(np.int8)
    names = ["a", "b", "c"]
    hists = {
        "a": Histogram(edges=[-1.0, 0.0, 1.0], fractions=[0.2, 0.3, 0.3, 0.2]),
        "c": Histogram(edges=[0.5], fractions=[0.6, 0.4]),
    }
    # what segment_stats reads of a TransformSpec
    spec = SimpleNamespace(feature_names=names, histograms=hists)
    offsets = [0, 1200, 1200, 4999, 5000]
    host = segment_stats(matrix, probs, labels, spec, offsets)  # type: ignore[arg-type]
    device = segment_stats(
        cupy.asarray(matrix),
        cupy.asarray(probs),
        cupy.asarray(labels),
        spec,  # type: ignore[arg-type]
        offsets,
    )
    assert len(device) == len(offsets) - 1
    for h, d in zip(host, device, strict=True):
        assert (d.rows, d.positives) == (h.rows, h.positives)
        np.testing.assert_array_equal(d.score_counts, h.score_counts)
        assert d.score_counts.size == len(SCORE_BIN_EDGES) + 1
        assert sorted(d.drift_counts) == ["a", "c"]
        for name in d.drift_counts:
            np.testing.assert_array_equal(d.drift_counts[name], h.drift_counts[name])


@pytest.mark.parametrize("sliced", [False, True])
def test_string_keys_are_matched_on_the_device_like_the_oracle(
    test_seed: int, sliced: bool
) -> None:
    """A small vocabulary goes through the string-match kernel on the column's own buffers
    (a sliced column's too); its positions equal the NumPy oracle's, nulls included."""
    import cudf
    import cupy

    from tasks.gpu_features import KeyIndex
    from tasks.numpy_features import lookup_positions

    vocab = np.array(sorted(["de", "fr", "gb", "us", "online", "", "ünï"]))
    rng = np.random.default_rng(test_seed)
    pool = [*vocab.tolist(), "FR", "d", "online ", "x" * 70, None]
    values = [pool[i] for i in rng.integers(0, len(pool), 5000)]
    index = KeyIndex.build(vocab, cupy)
    assert index.packed_strings is not None
    series = cudf.Series(values, dtype="str")
    if sliced:
        series, values = series.iloc[1234:4321], values[1234:4321]
    got = cupy.asnumpy(index.positions(series, cupy))
    want = lookup_positions(vocab, np.asarray(values, dtype=object))
    np.testing.assert_array_equal(got, want)
    assert (got[[v is None for v in values]] == -1).all()
    many = KeyIndex.build(np.array(sorted(f"k{i:03d}" for i in range(100))), cupy)
    assert many.packed_strings is None  # a large vocabulary keeps cuDF's index lookup
    keys = cudf.Series(["k007", "k100", None, "k099"], dtype="str")
    assert cupy.asnumpy(many.positions(keys, cupy)).tolist() == [7, -1, -1, 99]
