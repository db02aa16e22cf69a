"""Connecting to Ray: join a cluster when an address is given, otherwise start a local one.

A plain `ray.init()` would join whatever cluster a stale `ray start` left behind; the local case
asks for `address="local"` explicitly so the run is self-contained.
"""
from __future__ import annotations

import os
from typing import Optional


def connect(address: Optional[str] = None, num_cpus: Optional[int] = None, quiet: bool = True) -> str:
    """Initialise Ray once; returns a short description of where we are connected."""
    import ray

    if ray.is_initialized():
        return "already connected"
    _quiet_ray_data(quiet)
    address = address or os.environ.get("RAY_ADDRESS") or None
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if address:
        ray.init(address=address, log_to_driver=not quiet, logging_level="WARNING" if quiet else "INFO")
        # Which rayft runs matters on a cluster: a submitted job ships its own (py_modules) and says so here.
        return f"joined Ray at {address} (rayft code: {_rayft_code_dir()})"
    # The dashboard (on loopback, on a free port) serves Ray's state API, which Ray Train uses to release
    # the placement group of a run whose controller died (a trial stopped by ASHA, a killed driver).
    # Without it those CPUs stay reserved and later trials wait forever. Ray's workers find the state API by
    # auto-detection, which fails ("multiple active Ray instances") when another Ray runs on the machine, so
    # they are told where it is.
    dashboard_port = _free_port()
    api = f"http://127.0.0.1:{dashboard_port}"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api}},
        log_to_driver=not quiet,
        logging_level="WARNING" if quiet else "INFO",
        _node_ip_address="127.0.0.1",
    )
    return f"started a local Ray ({int(ray.cluster_resources().get('CPU', 0))} CPUs)"


def _rayft_code_dir() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent)


def _quiet_ray_data(quiet: bool) -> None:
    """Progress bars on a terminal; elsewhere (CI, logs) only rayft's own stage lines and warnings."""
    import logging
    import sys

    from ray.data import DataContext

    interactive = sys.stderr.isatty()
    DataContext.get_current().enable_progress_bars = interactive
    if quiet and not interactive:
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
