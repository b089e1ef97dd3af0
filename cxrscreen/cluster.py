"""Ray set-up shared by scoring, training and the benchmarks: an embedded local Ray by default,
a cluster with ``RAY_ADDRESS`` / ``address``."""

from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None, num_cpus: int | None = None):
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
        if address:
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
