"""What makes a run repeat: thread count, package versions, device; and quiet kernels.

A run of the series repeats bit for bit (identical weights, identical ``summary.json`` apart
from wall-clock seconds) for the same parameters (seeds included), the same torch thread count,
the same device and CPU instruction set, and the same package versions. :func:`reproducibility_record`
writes these into ``summary.json``; :func:`comparable_summary` strips what always differs
(seconds, the folder path). A different thread count or machine changes the order of
floating-point sums inside BLAS, convolutions and FFTs: single evaluations then agree to float32
rounding (~1e-6 relative), but training amplifies such differences epoch after epoch, so two
trained networks, and the figures of record that depend on them, are not promised to agree.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from typing import Any

__all__ = [
    "RECORDED_PACKAGES",
    "kernel_manager_class",
    "default_threads",
    "kernel_threads",
    "reproducibility_record",
    "comparable_summary",
]


def kernel_manager_class() -> type:
    """The Jupyter kernel manager for the series' kernels: no plain-text TCP transport, and no
    interrupt at shutdown.

    With CurveZMQ in pyzmq (the usual wheels) the manager provisions encryption keys for
    kernels whose spec declares support (ipykernel's does); otherwise, on POSIX, the kernel
    talks over IPC (Unix sockets) instead of TCP. Either way ipykernel has no reason to print
    its "running over TCP without encryption" warning, and no warning filter hides anything.

    jupyter_client interrupts (SIGINT) every kernel it shuts down. papermill shuts a kernel down
    as soon as the reply to its last request (``kernel_info``) arrives, while ipykernel may still
    be inside that request's handler, where SIGINT raises: the kernel then logs
    ``ERROR | KeyboardInterrupt caught in kernel.`` in a run that succeeded. The series shuts a
    kernel down only after its cells finished (or failed), so the interrupt is skipped there;
    the shutdown request and, past its wait, the kill still stop a kernel that hangs.
    """
    import zmq
    from jupyter_client.manager import KernelManager
    from jupyter_client.utils import run_sync
    from traitlets import default

    class QuietShutdownKernelManager(KernelManager):
        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:  # set by shutdown_kernel before it interrupts
                return
            await super()._async_interrupt_kernel()

        interrupt_kernel = run_sync(_async_interrupt_kernel)

    if "transport_encryption" in KernelManager.class_trait_names() and zmq.has("curve"):

        class EncryptedKernelManager(QuietShutdownKernelManager):
            @default("transport_encryption")
            def _encrypt_when_supported(self) -> str:
                return "auto"

        return EncryptedKernelManager
    if os.name == "posix":

        class IPCKernelManager(QuietShutdownKernelManager):
            @default("transport")
            def _ipc(self) -> str:
                return "ipc"

        return IPCKernelManager
    return QuietShutdownKernelManager


def default_threads() -> int:
    """Torch threads of this process (the cores, or ``OMP_NUM_THREADS``): a run's default."""
    import torch

    return int(torch.get_num_threads())


@contextlib.contextmanager
def kernel_threads(threads: int) -> Any:
    """Set ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` for the kernels started inside the block."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: str(threads) for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


#: Distributions whose versions decide whether a run repeats bit for bit.
RECORDED_PACKAGES = (
    "torch",
    "numpy",
    "scipy",
    "e3nn",
    "gemmi",
    "healpy",
    "torch-fourier-slice",
    "papermill",
)


def _package_versions() -> dict[str, str | None]:
    import importlib.metadata

    from cryosphere import __version__

    versions: dict[str, str | None] = {"cryosphere": __version__}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _blas_libraries() -> dict[str, Any]:
    import re

    import numpy
    import torch

    match = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    try:
        numpy_blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        numpy_name = f"{numpy_blas.get('name')} {numpy_blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - older NumPy: the record just says unknown
        numpy_name = None
    return {
        "torch": match.group(1) if match else None,
        "torch_mkl": bool(torch.backends.mkl.is_available()),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy": numpy_name,
    }


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})"
    return "cpu"


def reproducibility_record(seeds: dict[str, Any], threads: int) -> dict[str, Any]:
    """What decides whether a run repeats bit for bit, for ``summary.json``.

    Same parameters (seeds included), thread count, device, CPU instruction set and package
    versions give identical weights and results; the record lists each of them: Python and
    platform, package versions (cryosphere and :data:`RECORDED_PACKAGES`), torch threads of
    the notebooks' kernels, BLAS libraries of torch and NumPy with torch's CPU capability
    (MKL picks kernels by instruction set), the device and the seeds.
    """
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": _package_versions(),
        "threads": int(threads),
        "blas": _blas_libraries(),
        "device": _device(),
        "seeds": dict(seeds),
        "executable": sys.executable,
    }


def _drop_seconds(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _drop_seconds(item)
            for key, item in value.items()
            if not (isinstance(key, str) and (key.endswith("_s") or key == "seconds"))
        }
    if isinstance(value, list):
        return [_drop_seconds(item) for item in value]
    return value


def _replace_text(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {key: _replace_text(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_replace_text(item, old, new) for item in value]
    return value.replace(old, new) if isinstance(value, str) else value


def comparable_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` without wall-clock figures (every key ending in ``_s``, seconds by the
    unit-suffix convention) and with the run folder's path written ``<run_dir>``: what two runs
    must share to have repeated each other."""
    folder = summary.get("run_dir")
    stripped = _drop_seconds({key: value for key, value in summary.items() if key != "run_dir"})
    return _replace_text(stripped, folder, "<run_dir>") if folder else stripped
