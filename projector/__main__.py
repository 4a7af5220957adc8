"""Entry point: `python -m projector` (configured only by CQRS_* environment variables, see config.py)."""

from __future__ import annotations

import sys

from core.entrypoint import run_service
from projector.config import ProjectorSettings
from projector.lifecycle import run_projector


def main() -> int:
    # run_projector stops gracefully once the stop event is set, even while still waiting for NATS at start-up.
    return run_service("projector", ProjectorSettings, run_projector)


if __name__ == "__main__":
    sys.exit(main())
