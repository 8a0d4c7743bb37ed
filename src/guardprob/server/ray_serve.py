"""The moderation service as a Ray Serve application: ``guardprob serve --ray``, or Ray's own
``serve run guardprob.server.ray_serve:app model=... config=serve.yaml``.

Two deployments:

- ``GuardprobReplica`` (N replicas, or autoscaled): each loads one model and serves the same
  FastAPI app as the single-process server (``create_app``: endpoints, scheduler, API keys,
  limits, error shapes, /metrics), called with the request's ASGI scope and body and streaming
  back its ASGI messages, so server-sent events stream as they are scored.
- ``GuardprobIngress`` (light, no CPU reserved): Ray Serve's HTTP proxy hands it every request;
  it reads the body (up to ``max_body_bytes``), keys the request by its conversation
  (``affinity.conversation_key``) and forwards it. Ray Serve's consistent-hash request router
  sends equal keys to the same replica while that replica is alive, so a conversation's turns
  find their prefix in that replica's cache.

A replica that dies under a request that has not begun its answer costs a retry on another
replica (``ray.retries`` times), then 503 with ``Retry-After``; an answer already streaming
ends with an ``error`` event. A request whose body streams while its answer streams (the
NDJSON form of /v1/classify) cannot be forwarded whole and is refused with 415.

This module imports ray (``pip install guardprob[serve]``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from dataclasses import fields, replace
from typing import Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from guardprob.errors import BackendError, InputError
from guardprob.server.affinity import conversation_key
from guardprob.server.config import RayServeConfig, ServerConfig, load_config
from guardprob.server.duplex import NDJSON
from guardprob.server.schemas import ApiError
from guardprob.spec import ClassifierSpec

log = logging.getLogger("guardprob.server")

APP_NAME = "guardprob"
REPLICA_HEADER = "x-guardprob-replica"  # every answer names the replica that gave it
# Ray's own router: a consistent-hash ring over the live replicas, keyed by the handle's session_id
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
# the scope keys a replica's app reads; the rest (Ray's own, not picklable) stay behind
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "root_path",
               "headers", "client", "server")
_GRACE_S = 30.0  # past the service's own timeout, how long the ingress waits for a replica's answer


# -- the replicas ---------------------------------------------------------------------------
class GuardprobReplica:
    """One model, its scheduler and the service's FastAPI app, loaded before the replica is
    marked running (so no request meets a loading model)."""

    def __init__(self, spec: ClassifierSpec, config: ServerConfig):
        from guardprob.classifier import Classifier
        from guardprob.server.app import create_app

        if spec.device.startswith("cuda"):  # Ray sets CUDA_VISIBLE_DEVICES to this replica's GPU
            spec = replace(spec, device="cuda")
        else:  # torch would otherwise use every core of the node, fighting the other replicas
            import torch

            torch.set_num_threads(max(int(config.ray.num_cpus), 1))
        self.app = create_app(Classifier.from_spec(spec), config)
        self.name = serve.get_replica_context().replica_id.unique_id.encode()

    async def forward(self, scope: dict, body: bytes):
        """Run the app on one request; yield its ASGI messages (tagged with this replica's id).
        When this call is cancelled (the client left) the app hears a disconnect and stops."""
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":  # Ray Serve's proxy adds the x-request-id it was given
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (REPLICA_HEADER.encode(), self.name)]}
            messages.put_nowait(message)

        task = asyncio.ensure_future(self.app(scope, receive, send))
        task.add_done_callback(lambda _: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                yield message
            task.result()  # the app answers its own errors; anything else is the replica's failure
        finally:
            gone.set()

    def __del__(self) -> None:  # Ray Serve has drained the replica's requests: stop its scheduler
        state = getattr(getattr(self, "app", None), "state", None)
        if state is not None:
            state.service.close()


# -- the ingress ----------------------------------------------------------------------------
@serve.ingress()
class GuardprobIngress:
    """Reads each request, keys it by conversation and forwards it to a replica (retrying a
    replica that died before answering)."""

    def __init__(self, replicas: DeploymentHandle, config: ServerConfig):
        self.replicas, self.config = replicas, config

    def __serve_build_asgi_app__(self):
        return _Asgi(self.asgi)

    async def asgi(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            body = await _read_body(receive, self.config.max_body_bytes)
            if _header(scope, b"content-type").split(";")[0].strip() == NDJSON:
                raise ApiError(415, f"a {NDJSON} body streams while its answer streams, which Ray Serve's proxy does "
                               "not carry; send the answer's chunks as a list (\"chunks\": [...], \"stream\": true), "
                               "or use the single-process server (guardprob serve without --ray)",
                               param="content-type", code="unsupported_media_type")
        except ApiError as error:
            await _answer(send, error)
            return
        except _Gone:
            return
        key = conversation_key(scope["path"], body) if self.config.ray.affinity else None
        await self._forward({k: scope[k] for k in _SCOPE_KEYS if k in scope}, body, key, receive, send)

    async def _forward(self, scope: dict, body: bytes, key: str | None, receive: Any, send: Any) -> None:
        handle = self.replicas.options(stream=True, **({"session_id": key} if key else {}))
        gone = asyncio.ensure_future(_disconnected(receive))
        relay = running = None
        try:
            for attempt in range(self.config.ray.retries + 1):
                relay = _Relay(handle.forward.remote(scope, body), send)
                running = asyncio.ensure_future(relay.run())
                done, _ = await asyncio.wait({running, gone}, timeout=self.config.timeout_s + _GRACE_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                if running not in done:  # the client left, or no answer in time (finally stops the work)
                    if gone not in done and not relay.started:
                        await _answer(send, ApiError(504, "no replica answered within the request timeout; retry, "
                                                     "or send fewer inputs", type="server_error", code="timeout"))
                    return
                error = running.result()
                if error is None:
                    return
                lost = isinstance(error, (RayActorError, ActorUnavailableError))
                log.warning(json.dumps({"event": "replica_lost" if lost else "replica_failed", "attempt": attempt + 1,
                                        "error": f"{type(error).__name__}: {str(error)[:200]}"}))
                if relay.started:  # part of the answer is out: it cannot be taken back and retried
                    await _end_stream(send)
                    return
                if not lost:  # the same request would fail the same way on any replica
                    await _answer(send, ApiError(500, f"internal error ({type(error).__name__})", type="server_error",
                                                 code="internal_error"))
                    return
            await _answer(send, ApiError(503, f"the replica scoring this request was lost {self.config.ray.retries + 1} "
                                         "time(s); retry later", type="server_error", code="replica_lost",
                                         headers={"Retry-After": "1"}))
        finally:  # also when this call is cancelled (Ray Serve's proxy saw the client leave)
            gone.cancel()
            if running is not None and not running.done():
                relay.stream.cancel()  # the replica's app hears a disconnect and stops the request's work
                running.cancel()


class _Asgi:
    """An ASGI 3 app over a bound method (uvicorn, which runs the lifespan, takes a bound method for ASGI 2)."""

    def __init__(self, handler: Any):
        self.handler = handler

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.handler(scope, receive, send)


class _Relay:
    """Passes a replica's messages on, noting whether any went out."""

    def __init__(self, stream: Any, send: Any):
        self.stream, self.send, self.started = stream, send, False

    async def run(self) -> BaseException | None:
        """None once the answer is out, else what stopped it."""
        try:
            async for message in self.stream:
                await self.send(message)
                self.started = True
        except Exception as exc:  # a lost replica (RayActorError, ActorUnavailableError) or a failed call
            return exc
        return None


async def _end_stream(send: Any) -> None:
    """End an answer cut off by a lost replica: an ``error`` event (the streams' own way to fail)."""
    error = ApiError(503, "the replica scoring this stream was lost; retry the stream", type="server_error",
                     code="replica_lost")
    event = f"event: error\ndata: {json.dumps(error.body())}\n\n".encode()
    await send({"type": "http.response.body", "body": event, "more_body": False})


class _Gone(Exception):
    """The client left while its body was being read."""


async def _read_body(receive: Any, limit: int) -> bytes:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        if not message.get("more_body", False):
            return b"".join(parts)


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


async def _answer(send: Any, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _header(scope: dict, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == name), "")


# -- building the application ---------------------------------------------------------------
def build(spec: ClassifierSpec, config: ServerConfig) -> serve.Application:
    """The Ray Serve application: the ingress over the model's replicas."""
    ray_config = config.ray
    gpus = ray_config.num_gpus if ray_config.num_gpus is not None else (1 if spec.device.startswith("cuda") else 0)
    scale: dict[str, Any] = {"num_replicas": ray_config.replicas}
    if ray_config.autoscaling:
        scale = {"autoscaling_config": AutoscalingConfig(
            min_replicas=1 if ray_config.min_replicas is None else ray_config.min_replicas,
            max_replicas=ray_config.max_replicas, target_ongoing_requests=ray_config.target_ongoing_requests,
            upscale_delay_s=ray_config.upscale_delay_s, downscale_delay_s=ray_config.downscale_delay_s)}
    replicas = serve.deployment(
        GuardprobReplica, name="GuardprobReplica",
        ray_actor_options={"num_cpus": ray_config.num_cpus, "num_gpus": gpus},
        max_ongoing_requests=ray_config.max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),
        # a stopping replica first answers what it holds (the service's own timeout bounds each request)
        graceful_shutdown_timeout_s=config.timeout_s + 5, graceful_shutdown_wait_loop_s=1.0,
        **scale,
    ).bind(spec, config)
    ingress = serve.deployment(
        GuardprobIngress, name="GuardprobIngress", num_replicas=ray_config.ingress_replicas,
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=config.timeout_s + _GRACE_S + 5, graceful_shutdown_wait_loop_s=1.0,
    )
    return ingress.bind(replicas, config)


def app(args: dict[str, Any]) -> serve.Application:
    """The application builder for Ray's own tools: ``serve run guardprob.server.ray_serve:app
    config=serve.yaml model=DIR replicas=2`` (or ``args:`` of an application in a Serve config
    file for ``serve deploy``). ``config`` is guardprob's server config file; the other keys
    are ``ClassifierSpec`` fields (model, taxonomy, format, device, dtype, ...), and
    ``replicas`` overrides ``ray.replicas``."""
    args = dict(args)
    config = load_config(args.pop("config")) if "config" in args else ServerConfig()
    if "replicas" in args:
        config = replace(config, ray=replace(config.ray, replicas=int(args.pop("replicas"))))
    known = {f.name for f in fields(ClassifierSpec)}
    unknown = set(args) - known
    if unknown:
        raise InputError(f"unknown argument(s) {', '.join(sorted(unknown))}; use config, replicas or a model setting "
                         f"({', '.join(sorted(known))})")
    for name in ("cache_mb", "prefill_chunk"):  # Ray's command line passes every value as text
        if isinstance(args.get(name), str):
            try:
                args[name] = json.loads(args[name])
            except ValueError:
                pass  # ClassifierSpec names the bad value
    return build(ClassifierSpec(**args), config)


# -- guardprob serve --ray ------------------------------------------------------------------
def serve_forever(spec: ClassifierSpec, config: ServerConfig, *, address: str, host: str, port: int,
                  stop: threading.Event | None = None) -> None:
    """Connect to Ray (as ``guardprob eval --ray`` does), run the application until SIGINT or
    SIGTERM (or ``stop``), then delete it: each replica answers what it holds first."""
    import ray

    from guardprob.evaluation.distributed import connect_ray

    ray_config = config.ray
    owned = connect_ray(address, max(int(ray_config.num_cpus * _most_replicas(ray_config)), 1))
    stop = stop or threading.Event()
    try:
        if spec.device.startswith("cuda") and not ray.cluster_resources().get("GPU") and ray_config.num_gpus != 0:
            raise BackendError(f"the model runs on {spec.device!r} but the Ray cluster has no GPUs; use --device cpu, "
                               "or join a cluster with GPUs (RAY_ADDRESS or --ray HOST:PORT)")
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build(spec, config), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:  # a replica that cannot load the model fails the deployment
            raise BackendError(f"the Ray Serve application did not start: {_first_line(exc)}") from None
        log.info(json.dumps({"event": "ray_serve_ready", "url": f"http://{host}:{port}",
                             "replicas": _replica_summary(ray_config)}))
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        try:
            serve.delete(APP_NAME)  # drains: replicas finish their requests within the graceful timeout
            serve.shutdown()
        finally:
            if owned:
                ray.shutdown()


def _most_replicas(ray_config: RayServeConfig) -> int:
    return ray_config.max_replicas if ray_config.autoscaling else ray_config.replicas


def _replica_summary(ray_config: RayServeConfig) -> str:
    if ray_config.autoscaling:
        return f"{ray_config.min_replicas or 1} to {ray_config.max_replicas} (autoscaling)"
    return str(ray_config.replicas)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
