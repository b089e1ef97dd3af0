"""Ray set-up shared by scoring, training and the benchmarks: an embedded local Ray by default,
a cluster with ``RAY_ADDRESS`` / ``address``."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys


class ClusterUnreachable(RuntimeError):
    """The Ray cluster address given does not answer."""


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with one line, when a ``host:port`` (or ``ray://host:port``) address does
    not accept a TCP connection; Ray itself retries the GCS for minutes before giving up."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"Ray address {address!r}: expected host:port or ray://host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ClusterUnreachable(f"no Ray cluster answers at {address} ({e.strerror or e}); start one with "
                                 "`ray start --head`, fix RAY_ADDRESS / --address, or unset it for a local Ray") from None


def verbose() -> bool:
    """Whether Ray's own log lines are shown (``cxrscreen -v``, or ``CXRSCREEN_VERBOSE=1``)."""
    return os.environ.get("CXRSCREEN_VERBOSE", "") not in ("", "0")


def settle_fsspec_http() -> None:
    """Ray Data lists and reads Parquet files from several threads, each asking whether fsspec's
    HTTP filesystem is in use; without aiohttp that import fails, and a thread that races another
    sees a half-imported module (ImportError, which Ray does not catch, instead of
    ModuleNotFoundError). Import it once; if it cannot load, mark it absent for good. Run in the
    driver and, as Ray's worker set-up hook, in every worker."""
    try:
        import fsspec.implementations.http  # noqa: F401
    except ImportError:
        sys.modules["fsspec.implementations.http"] = None


@contextlib.contextmanager
def _stderr_silenced(on: bool):
    """File descriptor 2 pointed at /dev/null for the block (C++ lines bypass Python's sys.stderr)."""
    if not on:
        yield
        return
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to ``address`` (else ``RAY_ADDRESS``) or start an embedded local Ray.

    Quiet unless ``verbose()``: Ray's driver log lines below errors, its C++ log lines and the
    workers' forwarded output are not printed (our own errors still reach the user: a failing
    row is an error row, a failing run an exception); ``-v`` shows all of them."""
    import ray

    loud = verbose()
    if not loud:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # read by the driver's core worker at init
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # Ray Data sets up its logger again per run
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        settle_fsspec_http()
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING if loud else logging.ERROR,
                      log_to_driver=loud,
                      runtime_env={"worker_process_setup_hook": "cxrscreen.cluster.settle_fsspec_http"})
        if address:
            check_reachable(address)
        with _stderr_silenced(not loud):  # the core worker announces the log level it read
            if address:
                ray.init(address=address, **kwargs)
            else:  # "local": always a fresh embedded instance, never a stray `ray start` cluster
                # no idle workers started for the driver: they would import Ray on every core while
                # the models load; tasks and actors start their own (benchmarks/README.md, start-up)
                os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
                ray.init(address="local", num_cpus=num_cpus, **kwargs)
    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.INFO if loud else logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:  # the per-worker memory advice is noise for model actors that load weights once
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    except AttributeError:
        pass
    return ray
