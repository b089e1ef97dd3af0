"""Ray set-up shared by scoring, training and the benchmarks: an embedded local Ray by default,
a cluster with ``RAY_ADDRESS`` / ``address``."""

from __future__ import annotations

import logging
import os
import socket


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


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to ``address`` (else ``RAY_ADDRESS``) or start an embedded local Ray."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        if address:
            check_reachable(address)
            ray.init(address=address, **kwargs)
        else:  # "local": always a fresh embedded instance, never a stray `ray start` cluster
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:  # the per-worker memory advice is noise for model actors that load weights once
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    except AttributeError:
        pass
    return ray
