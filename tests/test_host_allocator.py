"""The train command's re-execution with glibc's huge pages: once, before anything heavy, keeping the
process id, argv, stdin and exit code; skipped on request, off CPU, or when the user chose already. And what
the entry points tell from the machine before JAX starts (training/accelerators.py): which platform JAX will
run on, and libtpu's quiet settings where no TPU is present."""
import fnmatch
import os
import pathlib
import subprocess
import sys

import pytest

from flax_bert.training import accelerators, host_allocator
ROOT = pathlib.Path(__file__).resolve().parent.parent
# a stand-in entry point: what run_mlm_flax.py does first, then it reports what the process sees
PROBE = """
import os, sys
print("started", flush=True)
from flax_bert.training import host_allocator
host_allocator.ensure_hugepages()
print("pid", os.getpid())
print("tunables", os.environ.get("GLIBC_TUNABLES"))
print("argv", sys.argv[1:])
print("stdin", sys.stdin.read())
print(host_allocator.describe())
sys.exit(int(sys.argv[1]))
"""

needs_glibc = pytest.mark.skipif(host_allocator.reexec_reason() == "off (needs Linux with glibc 2.35 or newer)",
                                 reason="glibc.malloc.hugetlb needs Linux with glibc >= 2.35")


def run_probe(**env_changes):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("FLAX_BERT_HUGEPAGES")}
    env.update({"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env_changes})
    process = subprocess.Popen([sys.executable, "-c", PROBE, "7", "two words"], env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = process.communicate("from stdin", timeout=60)
    lines = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    return process, out, lines


@needs_glibc
def test_reexecutes_once_keeping_pid_argv_stdin_and_exit_code():
    process, out, lines = run_probe()
    assert process.returncode == 7
    assert out.count("started") == 2  # the original and the re-executed process: exactly one exec
    assert lines["pid"] == str(process.pid)  # the same process: the parent's signals and wait() still reach it
    assert lines["tunables"] == "glibc.malloc.hugetlb=1"
    assert lines["argv"] == "['7', 'two words']" and lines["stdin"] == "from stdin"
    assert "on: re-executed" in lines["glibc"]


@needs_glibc
@pytest.mark.parametrize("env, said", [
    ({"FLAX_BERT_HUGEPAGES": "0"}, "off (FLAX_BERT_HUGEPAGES=0)"),
    ({"JAX_PLATFORMS": "tpu"}, "off (not a CPU platform: JAX_PLATFORMS=tpu)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "as set by the environment"),
])
def test_no_reexecution_when_opted_out_off_cpu_or_already_chosen(env, said):
    process, out, lines = run_probe(**env)
    assert process.returncode == 7 and out.count("started") == 1
    assert lines["tunables"] == env.get("GLIBC_TUNABLES", "None")
    assert said in lines["glibc"]


@pytest.mark.parametrize("installed, devices, expected", [
    ({"libtpu"}, [], None),  # the tpu extra on a machine without a TPU: JAX runs on the CPU
    ({"libtpu"}, ["/dev/vfio/0"], "libtpu is installed and its device is present"),  # a v5e/v6e host
    ({"libtpu"}, ["/dev/accel0"], "libtpu is installed and its device is present"),  # a v4 host
    ({"jax_cuda12_plugin"}, ["/dev/nvidia0"], "jax_cuda12_plugin is installed and its device is present"),
    (set(), ["/dev/nvidia0"], None),  # a GPU without JAX's CUDA plugin: JAX runs on the CPU
])
def test_an_accelerator_runtime_counts_only_with_its_device(monkeypatch, installed, devices, expected):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    pretend_machine(monkeypatch, installed, devices)
    assert accelerators.not_cpu_because() == expected


def pretend_machine(monkeypatch, installed, devices):
    monkeypatch.setattr(accelerators.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    monkeypatch.setattr(accelerators.glob, "glob", lambda pattern: [d for d in devices if fnmatch.fnmatch(d, pattern)])


@pytest.mark.parametrize("installed, devices, user_set, expected", [
    ({"libtpu"}, [], {}, accelerators.COMPILE_ONLY_ENVIRONMENT),  # the tpu extra without a TPU: quiet settings
    ({"libtpu"}, [], {"TPU_ACCELERATOR_TYPE": "v6e-8"}, {**accelerators.COMPILE_ONLY_ENVIRONMENT,
                                                         "TPU_ACCELERATOR_TYPE": "v6e-8"}),  # the user's stays
    ({"libtpu"}, ["/dev/vfio/0"], {}, {}),  # a TPU host: libtpu finds its own settings
    (set(), [], {}, {}),  # no libtpu: nothing to quiet
    ({"libtpu"}, [], {"JAX_PLATFORMS": "tpu"}, {}),  # the user chose the platform: libtpu's own messages stay
])
def test_libtpu_without_a_tpu_gets_the_compile_only_settings(monkeypatch, installed, devices, user_set, expected):
    for name in [*accelerators.COMPILE_ONLY_ENVIRONMENT, "JAX_PLATFORMS", "LIBTPU_INIT_ARGS"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in user_set.items():
        monkeypatch.setenv(name, value)
    pretend_machine(monkeypatch, installed, devices)
    accelerators.quiet_libtpu_without_a_tpu()
    assert {name: os.environ[name] for name in accelerators.COMPILE_ONLY_ENVIRONMENT if name in os.environ} == expected


def test_libtpu_without_a_tpu_gets_larger_compiler_stacks_and_the_users_flags_stay(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    pretend_machine(monkeypatch, {"libtpu"}, [])
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_enable_x=true --default_thread_stack_size=1048576")
    accelerators.quiet_libtpu_without_a_tpu()
    assert os.environ["LIBTPU_INIT_ARGS"].split() == [
        "--xla_tpu_enable_x=true", "--default_thread_stack_size=1048576",
        "--fibers_default_thread_stack_size=268435456", "--xla_internal_thread_stack_size_bytes=268435456"]
    accelerators.quiet_libtpu_without_a_tpu()  # a second call adds nothing
    assert len(os.environ["LIBTPU_INIT_ARGS"].split()) == 4


@pytest.mark.skipif(not accelerators.installed("libtpu") or accelerators.device_present("libtpu"),
                    reason="needs libtpu installed on a machine without a TPU")
def test_jax_starts_on_the_cpu_without_libtpu_probing_errors():
    """What every command does before JAX is imported (cli.main), against the real libtpu: without it JAX's
    start prints libtpu's probing errors; with it, nothing, and JAX runs on the CPU all the same (libtpu accepts
    the compiler-stack flags it adds: an unknown flag in LIBTPU_INIT_ARGS ends the start with exit 1)."""
    start_jax = "import jax; print(jax.devices()[0].platform)"
    dropped = {*accelerators.COMPILE_ONLY_ENVIRONMENT, "JAX_PLATFORMS", "LIBTPU_INIT_ARGS"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    for quieted in (False, True):
        code = ("from flax_bert.training import accelerators; accelerators.quiet_libtpu_without_a_tpu(); " * quieted
                + start_jax)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                              cwd=ROOT)
        assert done.returncode == 0 and done.stdout.strip() == "cpu", done.stderr
        assert ("TPU_WORKER_HOSTNAMES" in done.stderr) != quieted, done.stderr


def test_calls_from_python_never_reexecute(monkeypatch, capsys):
    """cli.main(argv) from Python (tests, scripts) must not replace the calling process."""
    from flax_bert import cli
    monkeypatch.setattr(host_allocator, "ensure_hugepages", lambda: pytest.fail("re-executed a Python caller"))
    for call in (lambda: cli.main(["train", "--no_such_flag"]), lambda: cli.run_mlm_flax_main(["--no_such_flag"])):
        with pytest.raises(SystemExit) as exited:  # parsed and rejected in this very process
            call()
        assert exited.value.code == 2
    assert "no_such_flag" in capsys.readouterr().err
