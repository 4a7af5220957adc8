#!/usr/bin/env bash
# Regenerates the Python modules and .pyi stubs from protos/ (committed; tests/unit/test_protos.py checks they are fresh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
find protos/cqrs -name '*_pb2*.py*' -delete
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out=protos --mypy_out=protos --grpc_python_out=protos --mypy_grpc_out=protos \
  $(find protos/cqrs -name '*.proto' | sort)
for d in $(find protos/cqrs -type d); do [ -f "$d/__init__.py" ] || : > "$d/__init__.py"; done
