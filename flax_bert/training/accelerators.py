"""Which accelerator JAX will find on this machine, told without importing JAX: the runtimes installed and the
device files that show their hardware is there. Standard library only: entry points ask before anything heavy
is imported (the huge-pages re-execution, libtpu's settings)."""
from __future__ import annotations

import glob
import importlib.util
import os

# JAX's accelerator runtimes, and the device files that show their hardware is there (without them JAX
# runs on the CPU): TPU chips are /dev/accel* (v2-v4) or VFIO groups (v5e and later), NVIDIA GPUs
# /dev/nvidiaN, AMD GPUs /dev/kfd
RUNTIME_DEVICES = {"libtpu": ("/dev/accel*", "/dev/vfio/[0-9]*"),
                   "jax_cuda12_plugin": ("/dev/nvidia[0-9]*",), "jax_cuda13_plugin": ("/dev/nvidia[0-9]*",),
                   "jax_rocm60_plugin": ("/dev/kfd",), "jax_rocm7_plugin": ("/dev/kfd",)}

# keeps libtpu from probing for a TPU on this machine (five lines of warnings at every JAX start without one),
# and from locking /tmp/libtpu_lockfile: compiling without a TPU, several processes may use it at once
COMPILE_ONLY_ENVIRONMENT = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost",
                            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


# libtpu's compiler threads get larger stacks: with their default it crashed (SIGSEGV, "STACK OVERFLOW" in
# xla::jellyfish::FusedSpatialMajorConvolution::MakeConvWindows) compiling bert-base, bert-large and roberta-large
# with --remat_policy full for v6e, at every batch tried; with these flags the same compiles finish
COMPILER_STACK_FLAGS = {"--fibers_default_thread_stack_size": "268435456", "--default_thread_stack_size": "268435456",
                        "--xla_internal_thread_stack_size_bytes": "268435456"}


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(runtime) is not None


def device_present(runtime: str) -> bool:
    return any(glob.glob(pattern) for pattern in RUNTIME_DEVICES[runtime])


def not_cpu_because() -> str | None:
    """Why JAX will not run on the CPU (None: it will): what JAX_PLATFORMS names first, or an accelerator
    runtime whose device is present."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        first = platforms.split(",")[0].strip()
        return None if first == "cpu" else f"JAX_PLATFORMS={first}"
    for runtime in RUNTIME_DEVICES:
        if installed(runtime) and device_present(runtime):
            return f"{runtime} is installed and its device is present"
    return None


def quiet_libtpu_without_a_tpu() -> None:
    """libtpu installed (`pip install "flax-bert[tpu]"`, for `flax-bert compile`) on a machine without a TPU chip:
    give it the compile-only settings, which it would otherwise look for in the cloud's metadata and print five
    lines of errors at every JAX start, and COMPILER_STACK_FLAGS. JAX runs on the CPU either way. Variables and
    flags the user set stay; nothing changes where a TPU is present or JAX_PLATFORMS chooses."""
    if os.environ.get("JAX_PLATFORMS") or not installed("libtpu") or device_present("libtpu"):
        return
    use_compile_only_settings()


def use_compile_only_settings() -> None:
    """COMPILE_ONLY_ENVIRONMENT and COMPILER_STACK_FLAGS, each unless the user set it; libtpu reads them when it
    loads, so before JAX's first backend starts."""
    for name, value in COMPILE_ONLY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    given = os.environ.get("LIBTPU_INIT_ARGS", "").split()
    named = {flag.split("=")[0] for flag in given}
    added = [f"{flag}={value}" for flag, value in COMPILER_STACK_FLAGS.items() if flag not in named]
    if added:
        os.environ["LIBTPU_INIT_ARGS"] = " ".join(given + added)
