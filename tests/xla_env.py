"""The compile options of the test run, for the pytest processes (conftest) and every run a test starts.

JAX's own switch `jax_disable_most_optimizations` (JAX_DISABLE_MOST_OPTIMIZATIONS=1) is on: XLA still fuses
and simplifies the program, but builds its machine code without LLVM's optimizations and expensive passes.
The tiny models compile in less CPU time and their steps run slower, so what runs hundreds of steps or more
turns it off: a run in a subprocess with `one_device_env(optimized=True)`, a test module in-process with
`optimized_compiles()` (JAX reads the switch at every compile). A bit-identity check compares two runs made
with the same options."""
import contextlib
import os

SWITCH = "JAX_DISABLE_MOST_OPTIMIZATIONS"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS with `devices` simulated CPU devices (None: one, JAX's default)."""
    return f"--xla_force_host_platform_device_count={devices}" if devices else ""


def one_device_env(optimized: bool = False, **extra: str) -> dict[str, str]:
    """os.environ for a run in a subprocess: one CPU device (a faster compile than the tests' eight);
    `optimized`: LLVM's optimizations on, for a run whose hundreds of steps cost more than its compile."""
    return {**os.environ, "XLA_FLAGS": xla_flags(), SWITCH: "0" if optimized else "1", **extra}


@contextlib.contextmanager
def optimized_compiles():
    """Compiles in this process with LLVM's optimizations while the block runs."""
    import jax

    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
