"""Runner configuration: the engine's settings plus where the runner listens."""

from __future__ import annotations

from pydantic import Field, field_validator

from engine_service import EngineConfig
from engine_service.api.serving import check_address


class RunnerConfig(EngineConfig):
    """EngineConfig (same storage, workdirs and model settings as the engine) plus the runner's own."""

    # gRPC RunnerService (MACHINA_RUNNER_LISTEN / --listen).
    runner_listen: str = "127.0.0.1:50052"
    # HTTP shim with POST /continue and GET /health (MACHINA_RUNNER_HTTP_LISTEN / --http-listen).
    runner_http_listen: str = "127.0.0.1:8080"
    # The workspace whose runs this runner continues when a request does not name one.
    runner_workspace: str = "default"
    # Test hook, inert by default (0): hold an accepted run this long before taking it, like a
    # runner that queues work.
    test_runner_hold_s: float = Field(0.0, ge=0)
    # Largest /continue body accepted.
    runner_max_body_bytes: int = Field(4096, ge=64, le=1 << 20)
    # The HTTP shim aborts a connection that has not sent a complete request head this many seconds
    # after connecting (or after the first byte of its next request), and one whose body is not
    # complete this many seconds after its head: slow or idle clients cannot hold sockets (slowloris).
    runner_http_header_timeout_s: float = Field(5.0, gt=0, le=300)
    runner_http_body_timeout_s: float = Field(5.0, gt=0, le=300)
    # Open HTTP shim connections at most; a new one past it makes room by aborting the connection
    # idle the longest (one with a request in progress never is). Keep it well under `ulimit -n`.
    runner_http_max_connections: int = Field(256, ge=1, le=65536)
    # PEM certificate chain and private key: serve both gRPC and the HTTP shim over TLS
    # (MACHINA_RUNNER_TLS_CERT / MACHINA_RUNNER_TLS_KEY / --tls-cert, --tls-key). Separate from
    # the engine's tls_cert/tls_key, so one config file can serve both processes.
    runner_tls_cert: str = ""
    runner_tls_key: str = ""

    @field_validator("runner_listen", "runner_http_listen")
    @classmethod
    def _address(cls, value: str) -> str:
        return check_address(value)
