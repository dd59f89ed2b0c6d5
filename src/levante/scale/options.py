"""What `levante deploy` takes: `levante serve`'s options plus replicas, autoscaling and resources.

The same options travel as the `args` of the Ray Serve application (the builder
`levante.scale.ray_serve:build_app` reads them), so a config written by `levante deploy
--config` and a direct `levante deploy` build the same application. Ray's own knobs map to
Ray's names: `autoscaling_config` {min_replicas, max_replicas, target_ongoing_requests,
upscale_delay_s, downscale_delay_s, ...}, `max_ongoing_requests`, `ray_actor_options`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from levante.config import EngineConfig
from levante.server.launch import ServeOptions, served_name

BUILDER = "levante.scale.ray_serve:build_app"
# ServeOptions that mean nothing here: a deployment serves exactly the models it names, always loaded.
NOT_DEPLOYED = frozenset({"keep_alive", "max_memory"})
# Where the Serve proxy listens comes from http_options, not from the application's args.
PROXY_OPTIONS = frozenset({"host", "port"})
SECRETS = frozenset({"api_keys"})
SIZES = frozenset({"kv_cache_memory", "max_body_bytes"})


@dataclass
class DeployOptions(ServeOptions):
    """`levante serve`'s options (engine, API, limits) and how the models scale on Ray Serve."""

    ui: bool = False  # the chat page is opt-in here: it runs in the ingress replicas
    # ---- replicas of each model deployment ----
    min_replicas: int = 1
    max_replicas: int = 1  # above min_replicas: Ray's autoscaler adds and removes replicas
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # per replica; continuous batching wants several at once
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    autoscaling_config: dict[str, Any] = field(default_factory=dict)  # any other Ray autoscaling field
    max_ongoing_requests: int | None = None  # per replica; default max_num_seqs (beyond it Ray queues)
    replica_cpus: float = 1.0
    replica_gpus: float | None = None  # default: 1 when the device is a GPU, else 0
    threads: int | None = None  # torch threads per CPU replica; default: its CPUs, at least 1
    # ---- the ingress (the HTTP API in front of the models) ----
    ingress_replicas: int = 1
    ingress_cpus: float = 0.0
    ingress_max_ongoing_requests: int = 1000  # HTTP requests one ingress replica holds (streams included)
    # ---- the Serve application ----
    app_name: str = "levante"
    route_prefix: str = "/"

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # ServeOptions' own checks, should it grow some
            parent()
        if not self.models:
            raise ValueError("deploy at least one model")
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {self.min_replicas}..{self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.target_ongoing_requests <= 0:
            raise ValueError("target_ongoing_requests must be positive")
        if min(self.upscale_delay_s, self.downscale_delay_s, self.replica_cpus, self.ingress_cpus, self.replica_gpus or 0) < 0:
            raise ValueError("delays and resources must not be negative")
        if self.ingress_replicas < 1 or (self.max_ongoing_requests is not None and self.max_ongoing_requests < 1):
            raise ValueError("ingress_replicas and max_ongoing_requests must be at least 1")
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with '/'")

    # ---- the Serve application's args ----

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> DeployOptions:
        """Options from an application's `args` (a Serve config, or `levante deploy`)."""
        known = {f.name for f in fields(cls)} - NOT_DEPLOYED
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown levante deploy options {unknown}; known: {sorted(known)}")
        values = dict(args)
        if isinstance(values.get("models"), str):
            values["models"] = [values["models"]]
        for key in SIZES & set(values):
            if isinstance(values[key], str):
                from levante.cli import parse_size

                values[key] = parse_size(values[key])
        return cls(**values)

    def to_args(self, include_secrets: bool = False) -> dict[str, Any]:
        """The options that differ from the defaults (the models and replica counts always), as plain values."""
        defaults = DeployOptions(models=list(self.models))
        always = {"models", "min_replicas", "max_replicas", "target_ongoing_requests"}
        skip = NOT_DEPLOYED | PROXY_OPTIONS | (frozenset() if include_secrets else SECRETS)
        args: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in skip and (f.name in always or value != getattr(defaults, f.name)):
                args[f.name] = list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
        return args

    # ---- what each deployment is made of ----

    def named_models(self) -> list[tuple[str, str]]:
        """(served name, source) of each model, in order; the first is the default."""
        names = [self.served_model_name if (i == 0 and self.served_model_name) else served_name(m) for i, m in enumerate(self.models)]
        if len(set(names)) != len(names):
            raise ValueError(f"two models would be served under one name: {names}; use --served-model-name")
        return list(zip(names, self.models, strict=True))

    @property
    def gpus(self) -> float:
        if self.replica_gpus is not None:
            return self.replica_gpus
        return 0.0 if self.device == "cpu" else 1.0

    def replica_engine_config(self, source: str) -> EngineConfig:
        """The engine of one replica. Each model deployment is its own pool of processes, so the KV
        fraction is not split between models as `levante serve` splits it."""
        config = dataclasses.replace(self, models=[source]).engine_config(source)
        if self.device == "cpu":
            config = dataclasses.replace(config, num_threads=self.threads or max(1, math.ceil(self.replica_cpus)))
        return config

    def model_deployment_options(self) -> dict[str, Any]:
        """`serve.deployment` options of a model deployment (Ray's names)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests or self.max_num_seqs,
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.gpus},
            "graceful_shutdown_timeout_s": self.shutdown_timeout,  # a replica scaled down first finishes its streams
        }
        if self.min_replicas == self.max_replicas and not self.autoscaling_config:
            options["num_replicas"] = self.min_replicas
            return options
        autoscaling: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            autoscaling["initial_replicas"] = self.initial_replicas
        options["autoscaling_config"] = {**autoscaling, **self.autoscaling_config}
        return options

    def ingress_deployment_options(self) -> dict[str, Any]:
        return {
            "num_replicas": self.ingress_replicas,
            "max_ongoing_requests": self.ingress_max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.ingress_cpus},
            "graceful_shutdown_timeout_s": self.shutdown_timeout,
        }

    def serve_config(self) -> dict[str, Any]:
        """A Ray Serve config (`serve deploy`, or a KubeRay RayService's serveConfigV2)."""
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": self.host, "port": self.port},
            "applications": [
                {"name": self.app_name, "route_prefix": self.route_prefix, "import_path": BUILDER, "args": self.to_args()}
            ],
        }


def deployment_name(model: str) -> str:
    """The Serve deployment of a served model: `model-<name>` with characters Serve keeps."""
    return "model-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-")


CONFIG_HEADER = """\
# Ray Serve config for Levante, written by `levante deploy --config`.
# On a running Ray cluster: `serve deploy {path}`. On Kubernetes: paste the document under a
# KubeRay RayService's spec.serveConfigV2 (README, "Scale out").
# Every node needs levante installed and the model files at the same path (image or shared volume).
# `args` are levante deploy's options (replicas and autoscaling included); API keys are not written
# here: set LEVANTE_API_KEY in the ingress's environment (e.g. from a Kubernetes secret).
"""


def render_config(opts: DeployOptions, path: str) -> str:
    import yaml  # PyYAML comes with ray[serve] and transformers

    return CONFIG_HEADER.format(path=path) + yaml.safe_dump(opts.serve_config(), sort_keys=False)
