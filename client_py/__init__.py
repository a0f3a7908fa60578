"""Python client for the Machina engine (gRPC).

Synchronous use (also inside Jupyter)::

    from client_py import EngineClient

    with EngineClient("127.0.0.1:50051", api_key="...") as client:
        execution = client.execute("Summarise README.md", tools=["Read"])
        for event in execution:
            print(event)
        run = execution.run
        if run.paused:
            run = execution.handle.approve(run.interrupts[0].interrupt_id)

``AsyncEngineClient`` offers the same methods as coroutines. Errors are raised as
subclasses of ``MachinaError`` keyed by the engine's stable error codes; a run
that fails is not an exception but a Run whose ``error`` is set.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("machina-client")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

from client_py._async import AsyncEngineClient, AsyncExecution, AsyncRunHandle, AsyncThreadHandle, CallOptions
from client_py._errors import (
    AbortedError,
    AlreadyExistsError,
    ConcurrentUpdateError,
    DeadlineExceededError,
    DestinationRefusedError,
    FailedPreconditionError,
    ForkPointError,
    InternalError,
    InterruptDecidedError,
    InterruptNotFoundError,
    InvalidArgumentError,
    InvalidDecisionError,
    InvalidEditsError,
    InvalidIdError,
    InvalidRequestError,
    InvalidScriptError,
    MachinaError,
    NotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
    ResourceExhaustedError,
    ResultNotFoundError,
    RpcCancelledError,
    RunActiveError,
    RunExistsError,
    RunNotFoundError,
    RunNotPausedError,
    RunReferencedError,
    RunTerminalError,
    ShuttingDownError,
    StorageUnavailableError,
    ThreadBusyError,
    ThreadExistsError,
    ThreadNotFoundError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownToolError,
    error_from_rpc,
)
from client_py._progress import ProgressLine, print_events
from client_py._retry import RetryPolicy
from client_py._spec import Approve, Decision, DecisionLike, Reject, Respond, RunOptions
from client_py._sync import EngineClient, Execution, RunHandle, ThreadHandle
from client_py._types import (
    AgentFinished,
    AgentStarted,
    ApiCallMetered,
    ApprovalDecided,
    ApprovalRequested,
    AssistantMessage,
    ContextCompacted,
    HandoffToRunner,
    InputRequested,
    Interrupt,
    Paused,
    PauseReason,
    Resumed,
    RetentionReport,
    Run,
    RunError,
    RunEvent,
    RunFinished,
    RunMeta,
    RunStarted,
    RunState,
    TextDelta,
    Thread,
    ToolCall,
    ToolCallCompleted,
    ToolCallStarted,
    ToolResultRequested,
    UnknownEvent,
    Usage,
    UsageReported,
)

__all__ = [
    "AbortedError",
    "AgentFinished",
    "AgentStarted",
    "AlreadyExistsError",
    "ApiCallMetered",
    "ApprovalDecided",
    "ApprovalRequested",
    "Approve",
    "AssistantMessage",
    "AsyncEngineClient",
    "AsyncExecution",
    "AsyncRunHandle",
    "AsyncThreadHandle",
    "CallOptions",
    "ConcurrentUpdateError",
    "ContextCompacted",
    "DeadlineExceededError",
    "Decision",
    "DecisionLike",
    "DestinationRefusedError",
    "EngineClient",
    "Execution",
    "FailedPreconditionError",
    "ForkPointError",
    "HandoffToRunner",
    "InputRequested",
    "InternalError",
    "Interrupt",
    "InterruptDecidedError",
    "InterruptNotFoundError",
    "InvalidArgumentError",
    "InvalidDecisionError",
    "InvalidEditsError",
    "InvalidIdError",
    "InvalidRequestError",
    "InvalidScriptError",
    "MachinaError",
    "NotFoundError",
    "PauseReason",
    "Paused",
    "PermissionDeniedError",
    "ProgressLine",
    "Reject",
    "RequestTooLargeError",
    "ResourceExhaustedError",
    "Respond",
    "ResultNotFoundError",
    "Resumed",
    "RetentionReport",
    "RetryPolicy",
    "RpcCancelledError",
    "Run",
    "RunActiveError",
    "RunError",
    "RunEvent",
    "RunExistsError",
    "RunFinished",
    "RunHandle",
    "RunMeta",
    "RunNotFoundError",
    "RunNotPausedError",
    "RunOptions",
    "RunReferencedError",
    "RunStarted",
    "RunState",
    "RunTerminalError",
    "ShuttingDownError",
    "StorageUnavailableError",
    "TextDelta",
    "Thread",
    "ThreadBusyError",
    "ThreadExistsError",
    "ThreadHandle",
    "ThreadNotFoundError",
    "ToolCall",
    "ToolCallCompleted",
    "ToolCallStarted",
    "ToolResultRequested",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownEvent",
    "UnknownToolError",
    "Usage",
    "UsageReported",
    "error_from_rpc",
    "print_events",
]
