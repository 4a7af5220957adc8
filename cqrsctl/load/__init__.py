"""`cqrs load`: a load generator for the order services (open or closed loop, HdrHistogram latencies,
time-to-queryable), usable from the CLI (worker processes) or in-process through `run_load`."""

from cqrsctl.load.config import ConfigError, LoadConfig, parse_mix
from cqrsctl.load.report import LoadReport
from cqrsctl.load.runner import LoadRunError, LoadSetupError, run_load

__all__ = ["ConfigError", "LoadConfig", "LoadReport", "LoadRunError", "LoadSetupError", "parse_mix", "run_load"]
