"""`levante deploy`: start or join a Ray cluster, run the application, follow its replicas."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

import ray
from ray import serve

from levante.scale.options import DeployOptions
from levante.scale.ray_serve import build_app
from levante.scale.remote import header_path


def deployment_states(app_name: str) -> dict[str, str]:
    """Deployment -> "HEALTHY, 2 RUNNING, 1 STARTING" for an application."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return {}
    return {
        name: ", ".join([str(getattr(d.status, "value", d.status))] + [f"{n} {getattr(k, 'value', k)}" for k, n in d.replica_states.items()])
        for name, d in status.deployments.items()
    }


def on_loopback() -> None:
    """Make the next local cluster bind Ray's ports to 127.0.0.1, not the network address.

    Ray's switch for one-machine clusters (named for laptops): the variable for the cluster's
    processes, the constant it sets for this process, where Ray was imported before it was set.
    """
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def deploy(opts: DeployOptions, address: str | None = None, num_cpus: int | None = None, detach: bool = False,
           echo: Callable[[str], None] = print) -> None:
    """Start (or join) a Ray cluster, run the application, follow its replicas until interrupted."""
    local = address in (None, "", "local")
    if detach and local:
        raise ValueError("--detach leaves the application on a cluster that outlives this command: give --address")
    if local:
        for _, source in opts.named_models():  # this machine is the cluster: a missing model fails here, not in a replica
            header_path(source)
        on_loopback()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address, configure_logging=False)
    try:
        serve.start(http_options={"host": opts.host, "port": opts.port}, proxy_location="EveryNode")
        try:
            serve.run(build_app(opts.to_args(include_secrets=True)), name=opts.app_name, route_prefix=opts.route_prefix)
        except RuntimeError as e:  # Serve's "deploy failed", with the replicas' errors
            raise ValueError(f"the application did not deploy: {e}") from None
        host = "127.0.0.1" if opts.host in ("0.0.0.0", "::", "") else opts.host
        echo(f"levante: {', '.join(n for n, _ in opts.named_models())} served at http://{host}:{opts.port}{opts.route_prefix.rstrip('/')}/v1 "
             f"(application {opts.app_name!r}, {opts.min_replicas}..{opts.max_replicas} replicas per model)")
        if detach:
            return
        _follow(opts.app_name, echo)
    finally:
        if not detach:
            with contextlib.suppress(Exception):
                serve.delete(opts.app_name)
            if local:
                serve.shutdown()
            ray.shutdown()


def _follow(app_name: str, echo: Callable[[str], None], interval: float = 2.0) -> None:
    """Print each deployment's replicas when they change, until Ctrl-C or SIGTERM."""
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    shown: dict[str, str] = {}
    with contextlib.suppress(KeyboardInterrupt):
        while not stop:
            for name, state in deployment_states(app_name).items():
                if shown.get(name) != state:
                    echo(f"{time.strftime('%H:%M:%S')} {name}: {state}")
                    shown[name] = state
            time.sleep(interval)
