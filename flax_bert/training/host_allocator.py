"""Huge pages for glibc's allocator on CPU, set up by the train command itself.

XLA:CPU allocates a fresh temporary buffer of up to gigabytes every step; with 4 KiB pages touching
it costs hundreds of thousands of page faults (measured: 71% of the bench's step throughput through
the train command before this, 92% with the tunable exported by hand). `GLIBC_TUNABLES=
glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages, but glibc reads it only when a
process starts, so `ensure_hugepages()` re-executes the process once, at the very start (before JAX is
imported), with the variable added. `exec` keeps the process id, argv, open files (stdin included)
and the parent's view of exit code and signals. It is skipped when:

- the platform is not CPU: JAX_PLATFORMS names another first, or a TPU/GPU runtime is installed and
  its device is there (libtpu alone, as `pip install "flax-bert[tpu]"` brings for `flax-bert compile` on
  any machine, leaves JAX on the CPU, and the run keeps its huge pages),
- glibc is older than 2.35 (no such tunable) or the kernel's transparent huge pages are `never`,
- GLIBC_TUNABLES already sets glibc.malloc.hugetlb (the user's own choice stays),
- FLAX_BERT_HUGEPAGES=0 (the opt-out), or this process is already the re-executed one.

Module of the standard library only: it runs before anything heavy is imported.
"""
from __future__ import annotations

import os
import pathlib
import sys

from flax_bert.training import accelerators

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "FLAX_BERT_HUGEPAGES"
_DONE = "FLAX_BERT_HUGEPAGES_REEXEC"  # set in the re-executed process: never a second exec
_decision = "not checked"


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def _transparent_hugepages_off() -> bool:
    try:
        return "[never]" in pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


def reexec_reason() -> str | None:
    """None when the process should re-execute itself with the tunable; otherwise why not."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get(_DONE):
        return f"on: re-executed with GLIBC_TUNABLES={tunables}"
    if TUNABLE in tunables:
        return f"as set by the environment: GLIBC_TUNABLES={tunables}"
    if os.environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return f"off ({OPT_OUT}={os.environ[OPT_OUT]})"
    if not sys.platform.startswith("linux") or (_glibc_version() or (0, 0)) < (2, 35):
        return "off (needs Linux with glibc 2.35 or newer)"
    not_cpu = accelerators.not_cpu_because()
    if not_cpu:
        return f"off (not a CPU platform: {not_cpu})"
    if _transparent_hugepages_off():
        return "off (the kernel's transparent huge pages are disabled)"
    if not getattr(sys, "orig_argv", None):
        return "off (the interpreter's command line is unknown)"
    return None


def ensure_hugepages() -> None:
    """Re-execute this process with glibc.malloc.hugetlb=1 when `reexec_reason()` allows; otherwise
    remember why not (`describe()`). Call it first thing in an entry point, never from library code."""
    global _decision
    reason = reexec_reason()
    if reason is not None:
        _decision = reason
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), f"{TUNABLE}=1"]))
    env[_DONE] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as err:  # the run goes on with 4 KiB pages, only slower
        _decision = f"off (re-executing {sys.executable} failed: {err})"


def describe() -> str:
    """The decision, for the run's log: huge pages for the host allocator on, off, and why."""
    return f"glibc malloc huge pages {_decision}"
