"""The train command's re-execution with glibc's huge pages: once, before anything heavy, keeping the
process id, argv, stdin and exit code; skipped on request, off CPU, or when the user chose already."""
import os
import pathlib
import subprocess
import sys

import pytest

from flax_bert.training import host_allocator
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
    ({"JAX_PLATFORMS": "tpu"}, "off (not a CPU platform)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "as set by the environment"),
])
def test_no_reexecution_when_opted_out_off_cpu_or_already_chosen(env, said):
    process, out, lines = run_probe(**env)
    assert process.returncode == 7 and out.count("started") == 1
    assert lines["tunables"] == env.get("GLIBC_TUNABLES", "None")
    assert said in lines["glibc"]


def test_calls_from_python_never_reexecute(monkeypatch, capsys):
    """cli.main(argv) from Python (tests, scripts) must not replace the calling process."""
    from flax_bert import cli
    monkeypatch.setattr(host_allocator, "ensure_hugepages", lambda: pytest.fail("re-executed a Python caller"))
    for call in (lambda: cli.main(["train", "--no_such_flag"]), lambda: cli.run_mlm_flax_main(["--no_such_flag"])):
        with pytest.raises(SystemExit) as exited:  # parsed and rejected in this very process
            call()
        assert exited.value.code == 2
    assert "no_such_flag" in capsys.readouterr().err
