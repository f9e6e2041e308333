"""The XLA options of the test run, for the pytest processes (conftest) and every run a test starts.

LLVM's own optimizations are off: XLA still fuses and simplifies the program, but its machine code is built
without LLVM's passes. A tiny run then compiles in about a quarter less CPU time; its steps run slower, so a
run of hundreds of steps asks for `optimized`. A bit-identity check compares two runs made with the same
options."""
import os

TEST_XLA_OPTIONS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None, optimized: bool = False) -> str:
    """XLA_FLAGS with `devices` simulated CPU devices (None: one, JAX's default); `optimized`: LLVM's
    optimizations on, for a run whose hundreds of steps cost more than its compile."""
    count = f"--xla_force_host_platform_device_count={devices}" if devices else ""
    return f"{count} {'' if optimized else TEST_XLA_OPTIONS}".strip()


def one_device_env(optimized: bool = False, **extra: str) -> dict[str, str]:
    """os.environ for a run in a subprocess: one CPU device (a faster compile than the tests' eight)."""
    return {**os.environ, "XLA_FLAGS": xla_flags(optimized=optimized), **extra}
