"""`levante deploy`: the server as a Ray Serve application, or the Serve config for one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer


def deploy(
    models: list[str] = typer.Argument(None, help="Models to serve (GGUF file, HF folder or known name); default smollm2 or $MODEL_ID."),
    config: Path | None = typer.Option(None, "--config", help="Write the Ray Serve config (YAML) to this file instead of deploying."),
    address: str | None = typer.Option(None, "--address", envvar="RAY_ADDRESS", help="Ray cluster: 'auto' (a running one), HOST:6379, or ray://HOST:10001. Default: start a local one."),
    num_cpus: int | None = typer.Option(None, "--num-cpus", min=1, help="CPUs of the local cluster (default: all)."),
    detach: bool = typer.Option(False, "--detach", help="Return once the application runs (needs --address); default: follow it until Ctrl-C, then delete it."),
    name: str = typer.Option("levante", "--name", help="Serve application name."),
    route_prefix: str = typer.Option("/", "--route-prefix"),
    host: str | None = typer.Option(None, "--host", help="Serve proxy bind address (default 127.0.0.1; 0.0.0.0 in a written config)."),
    port: int = typer.Option(8000, "--port", "-p", help="Serve proxy port."),
    min_replicas: int = typer.Option(1, "--min-replicas", min=0),
    max_replicas: int | None = typer.Option(None, "--max-replicas", min=1, help="Default: --min-replicas (no autoscaling)."),
    initial_replicas: int | None = typer.Option(None, "--initial-replicas", min=0),
    target_ongoing_requests: float = typer.Option(8.0, "--target-ongoing-requests", min=0.01, help="Requests in flight per replica the autoscaler aims at."),
    upscale_delay: float = typer.Option(30.0, "--upscale-delay", min=0.0, help="Seconds of sustained load before adding replicas."),
    downscale_delay: float = typer.Option(600.0, "--downscale-delay", min=0.0, help="Seconds of low load before removing replicas."),
    autoscaling_config: str | None = typer.Option(None, "--autoscaling-config", help='More of Ray\'s autoscaling_config as JSON, e.g. \'{"look_back_period_s": 10}\'.'),
    max_ongoing_requests: int | None = typer.Option(None, "--max-ongoing-requests", min=1, help="Requests one replica takes at once (default --max-num-seqs); Ray queues the rest."),
    replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0.0, help="CPUs Ray reserves per model replica."),
    replica_gpus: float | None = typer.Option(None, "--replica-gpus", min=0.0, help="GPUs per model replica (default 1 with a GPU --device, else 0)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch threads per CPU replica (default: its CPUs)."),
    ingress_replicas: int = typer.Option(1, "--ingress-replicas", min=1, help="Replicas of the HTTP API in front of the models."),
    served_model_name: str | None = typer.Option(None, "--served-model-name"),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda for GPU replicas."),
    max_model_len: int | None = typer.Option(None, "--max-model-len", min=16),
    kv_cache_memory: str | None = typer.Option(None, "--kv-cache-memory", help="KV-cache budget per replica, e.g. 4GiB."),
    kv_cache_fraction: float = typer.Option(0.25, "--kv-cache-fraction", min=0.01, max=0.95),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", min=1),
    max_num_batched_tokens: int = typer.Option(512, "--max-num-batched-tokens", min=16),
    max_waiting: int = typer.Option(256, "--max-waiting", min=1),
    api_key: list[str] = typer.Option(None, "--api-key", help="Accept this key (repeatable; not written to --config: set LEVANTE_API_KEY on the cluster)."),
    ui: bool = typer.Option(False, "--ui/--no-ui", help="Serve the chat page at /ui from the ingress."),
    qdrant_url: str | None = typer.Option(None, "--qdrant-url", envvar="LEVANTE_QDRANT_URL", help="Qdrant server for /v1/rag (needed with several ingress replicas)."),
) -> None:
    """Serve models on Ray Serve: an ingress (the same HTTP API) and a deployment per model whose replicas Ray scales.

    levante deploy smollm2 --min-replicas 1 --max-replicas 4 --target-ongoing-requests 8
    levante deploy smollm2 --max-replicas 4 --config levante-serve.yaml   # for `serve deploy` / KubeRay
    """
    from levante.cli import parse_size, user_errors
    from levante.scale.options import DeployOptions, render_config

    with user_errors():
        env_model = os.environ.get("LEVANTE_MODEL") or os.environ.get("MODEL_ID")
        values: dict[str, Any] = {
            "min_replicas": min_replicas, "max_replicas": max_replicas if max_replicas is not None else max(1, min_replicas),
            "initial_replicas": initial_replicas, "target_ongoing_requests": target_ongoing_requests,
            "upscale_delay_s": upscale_delay, "downscale_delay_s": downscale_delay,
            "autoscaling_config": _json_object(autoscaling_config) if autoscaling_config else {},
            "max_ongoing_requests": max_ongoing_requests, "replica_cpus": replica_cpus, "replica_gpus": replica_gpus,
            "threads": threads, "ingress_replicas": ingress_replicas, "app_name": name, "route_prefix": route_prefix,
            "host": host or ("0.0.0.0" if config else "127.0.0.1"), "port": port,
            "served_model_name": served_model_name, "dtype": dtype, "device": device, "max_model_len": max_model_len,
            "kv_cache_memory": parse_size(kv_cache_memory) if kv_cache_memory else None, "kv_cache_fraction": kv_cache_fraction,
            "max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens, "max_waiting": max_waiting,
            "api_keys": list(api_key or []), "ui": ui, "qdrant_url": qdrant_url,
        }
        if models or env_model:
            values["models"] = list(models) if models else [env_model]
        opts = DeployOptions(**values)
        opts.named_models()  # two models under one name: fail here, not on the cluster
        if config is not None:
            config.write_text(render_config(opts, str(config)))
            if opts.api_keys:
                typer.secho("note: API keys are not written to the config; set LEVANTE_API_KEY for the ingress", err=True)
            typer.echo(f"wrote {config}: deploy it with `serve deploy {config}` or as a RayService's serveConfigV2")
            return
        try:
            from levante.scale.deploy import deploy as run
        except ImportError as e:
            raise ValueError(f"levante deploy needs Ray Serve: pip install 'levante[scale]' ({e})") from None
        run(opts, address=address, num_cpus=num_cpus, detach=detach, echo=typer.echo)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--autoscaling-config is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--autoscaling-config must be a JSON object")
    return value
