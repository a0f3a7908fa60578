"""``python -m runner_service``: not implemented yet (see the package docstring)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runner_service",
        description="Machina runner (gRPC RunnerService + HTTP /continue shim). Not implemented yet.",
    )
    parser.parse_args(argv)
    print("runner_service is not implemented yet; only the engine runs today", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
