"""The dask cluster that batch scoring runs on, and a per-worker cache so every worker process
loads a model bundle once, not once per partition.

Three kinds of cluster: an existing scheduler (`tcp://host:8786`, for many machines), or a local
one made for the run: `dask_cuda.LocalCUDACluster` (one worker per GPU, RMM on cudaMallocAsync or a
pool, cuDF spilling) on GPU, `distributed.LocalCluster` (one single-threaded worker process per
core) on CPU.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import dask
from distributed import Client

from tasks.backend import Backend, visible_gpus
from tasks.config import ClusterConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
LOCAL = "local"
# Worker processes take a few seconds to start (imports); a scheduler with no worker after this
# long is a configuration problem, not slowness.
WORKER_WAIT_S = 120.0
# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 so that long-lived workers give
# freed memory back to the OS. Setting that variable also turns off glibc's adaptive mmap
# threshold: every array over 128 KiB is then mmapped and page-faulted in afresh, which made CPU
# scoring 10-15% slower per file (pandas/NumPy transform). A CPU cluster made for one run exits
# when the run ends, so its workers keep glibc's defaults (None unsets a pre-spawn variable).
LOCAL_CPU_DASK_CONFIG: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
}
# Modules a GPU scoring worker needs, imported when the worker starts (dask-cuda's pre_import)
# rather than inside its first scoring task. torch is what Triton's launcher uses for devices and
# streams. On the H100 a long-lived cluster's first run spent ~7 s more than later runs, most of
# it these imports (bench/results/2026-11-23_h100_gpu_worker_start.json: torch 3.2 s, gpupipe's
# scoring modules 2.5 s). For workers of an existing scheduler, pass the same list to
# `dask cuda worker --pre-import` (README).
GPU_WORKER_PRE_IMPORT = (
    "cudf",
    "cupy",
    "xgboost",
    "torch",
    "triton",
    "tasks.scoring",
    "tasks.gpu_features",
    "kernels.fused_preprocess",
    "kernels.bin_counts",
)
# Bundles kept per worker process: enough for a champion and the challenger being compared with
# it, small enough that a long-lived cluster scoring many versions does not grow without bound.
CACHE_SIZE = 4


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cluster_address(cluster: str, cfg: ClusterConfig) -> str | None:
    """`local` (or empty) -> the configured address, None meaning a local cluster; else the
    scheduler address given."""
    if cluster.strip() in ("", LOCAL):
        return cfg.address
    return cluster.strip()


@contextmanager
def dask_client(
    cluster_cfg: ClusterConfig, backend: Backend, address: str | None = None
) -> Iterator[Client]:
    """A client to the cluster batch scoring runs on; a local cluster lives as long as the block.

    Args:
        cluster_cfg: worker count, threads, RMM pool and spilling settings for local clusters.
        backend: `gpu` makes a LocalCUDACluster, `cpu` a LocalCluster of processes.
        address: an existing scheduler; overrides `cluster_cfg.address`. Its workers must see
            the input and output paths.
    """
    address = address or cluster_cfg.address
    if address:
        log.info("dask: connecting to the scheduler at %s", address)
        with Client(address) as client:
            client.wait_for_workers(1, timeout=WORKER_WAIT_S)
            yield client
        return
    if backend.device == "gpu":
        with _quiet_dask(), _local_cuda_cluster(cluster_cfg) as cluster, Client(cluster) as client:
            yield client
        return
    from distributed import LocalCluster

    n_workers = cluster_cfg.n_workers or max(1, cpu_count() // cluster_cfg.threads_per_worker)
    log.info(
        "dask: LocalCluster of %d worker process(es) x %d thread(s)",
        n_workers,
        cluster_cfg.threads_per_worker,
    )
    with (
        _quiet_dask(),
        dask.config.set(LOCAL_CPU_DASK_CONFIG),
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=cluster_cfg.threads_per_worker,
            processes=True,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@contextmanager
def _quiet_dask(level: int = logging.WARNING) -> Iterator[None]:
    """A cluster made for one run logs its start and stop at INFO through the run's handlers;
    keep those lines out of the flow logs while it lives."""
    logger = logging.getLogger("distributed")
    previous = logger.level
    logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def _local_cuda_cluster(cfg: ClusterConfig) -> Iterator[Any]:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise RuntimeError(
            "device 'gpu' needs dask-cuda for a local cluster (pip install 'gpupipe[gpu]'), "
            "or pass the address of a running dask-cuda scheduler"
        ) from exc
    kwargs: dict[str, Any] = {
        "threads_per_worker": cfg.threads_per_worker,
        "rmm_pool_size": cfg.rmm_pool_size,
        # a pool (explicit size) or cudaMallocAsync: never a cudaMalloc + cudaFree per column
        "rmm_async": cfg.rmm_async and cfg.rmm_pool_size is None,
        "enable_cudf_spill": True,
        "dashboard_address": ":0",
        # imported when each worker starts, not inside the first scoring task
        "pre_import": list(GPU_WORKER_PRE_IMPORT),
    }
    if cfg.n_workers is not None:
        # one worker per GPU at most: a CPU-sized worker count must not ask for absent GPUs
        kwargs["n_workers"] = min(cfg.n_workers, visible_gpus())
    if cfg.device_memory_limit is not None:
        kwargs["device_memory_limit"] = cfg.device_memory_limit
    log.info("dask: LocalCUDACluster (one worker per GPU) %s", kwargs)
    with LocalCUDACluster(**kwargs) as cluster:
        yield cluster


def worker_count(client: Client) -> int:
    return len(client.scheduler_info().get("workers", {}))


def thread_count(client: Client) -> int:
    """Threads of all the cluster's workers: tasks that can run at once."""
    return sum(int(n) for n in client.nthreads().values())


def worker_threads() -> int:
    """Threads of the dask worker this runs in (so a model uses that many), else all cores."""
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except ValueError:  # not inside a worker
        return cpu_count()


def worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except ValueError:
        return f"pid-{os.getpid()}"


# ---------------------------------------------------------------- per-worker cache

_CACHE: OrderedDict[Hashable, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_LOADS: dict[Hashable, int] = {}


def worker_cached(key: Hashable, factory: Callable[[], T]) -> T:
    """The object cached under `key` in this process, built by `factory()` on first use.

    Module-level state is per worker process, so a model is loaded once per worker and shared by
    its threads and by every task that runs there. Least recently used entries beyond CACHE_SIZE
    are dropped.
    """
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]  # type: ignore[no-any-return]
        # built under the lock: two threads of one worker must not both load the same model
        value = factory()
        _CACHE[key] = value
        _LOADS[key] = _LOADS.get(key, 0) + 1
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
        return value


def cache_loads() -> dict[str, int]:
    """How many times each key was loaded in this process (for tests and diagnostics)."""
    with _CACHE_LOCK:
        return {repr(k): n for k, n in _LOADS.items()}


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
        _LOADS.clear()
