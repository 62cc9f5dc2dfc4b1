"""Where and how a run was computed: the machine, and the numeric environment that decides its bits.

:func:`machine` is recorded in every result file. :func:`numeric_environment` (ATen's instruction
set and Intel MKL's reproducibility mode, both fixed when torch loads) is what worker processes
must share with their parent for a parallel grid to produce a serial grid's files;
:func:`inherited_environment` makes processes started inside it load torch with it.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ENVIRONMENT_VARIABLES",
    "environment_variables",
    "inherited_environment",
    "machine",
    "numeric_environment",
]


#: The environment variables a run's file records (:func:`machine`): those of
#: :data:`robustreg.study.config.NUMERIC_ENVIRONMENTS`.
ENVIRONMENT_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def machine() -> dict[str, Any]:
    """The computer a run happens on: CPU model, cores, torch threads, versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.system(),
        "environment": {k: os.environ.get(k) for k in ENVIRONMENT_VARIABLES},
        # 1-minute load average when the run ended: > cores means a shared, busy machine
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def numeric_environment() -> dict[str, Any]:
    """What decides the bits of a computation besides its inputs: ATen's instruction set, Intel
    MKL's reproducibility mode and oneDNN's instruction set (all fixed when torch loads)."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
        "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def environment_variables(environment: Mapping[str, Any]) -> dict[str, str | None]:
    """The variables that make a new process load torch in ``environment``."""
    return {
        "ATEN_CPU_CAPABILITY": environment["cpu_capability"].lower(),
        "MKL_CBWR": environment["MKL_CBWR"],
        "ONEDNN_MAX_CPU_ISA": environment.get("ONEDNN_MAX_CPU_ISA"),
    }


@contextlib.contextmanager
def inherited_environment(environment: Mapping[str, Any]) -> Iterator[None]:
    """Worker processes started inside load torch with this numeric ``environment``."""
    wanted = environment_variables(environment)
    saved = {k: os.environ.get(k) for k in wanted}

    def apply(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    apply(wanted)
    try:
        yield
    finally:
        apply(saved)
