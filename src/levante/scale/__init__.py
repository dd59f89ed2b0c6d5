"""Scale-out: the same HTTP API as `levante serve`, run as a Ray Serve application.

- options.py         DeployOptions: `levante serve`'s options plus replicas, autoscaling and resources;
                     the Ray Serve config (YAML) they make.
- remote.py          the server's view of a model whose engines run elsewhere (no Ray in it).
- replicas.py        which replica served a request: the `X-Levante-Replica` header (no Ray in it).
- ray_serve.py       the deployments (one ingress, one per model) and the application builder.
- remote_engine.py   the ingress's engine client over a model deployment: streams, retries, replica state.
- deploy.py / cli.py `levante deploy`: start or join a cluster, run the application, follow it.

Nothing in levante.engine or levante.server imports Ray: the deployment wraps them.
"""
