"""`flax-bert compile`: topology names, the HLO reader, and the tiny config compiled for a 4-chip v5e (with
libtpu; skipped with the reason without it): report, JSON, HLO, exit codes."""
import dataclasses
import importlib.util
import json

import pytest

from flax_bert import cli, tpu_compile
from flax_bert.tpu_compile import batch_collectives, collective_summary, collectives, parse_topology

NEEDS_LIBTPU = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='compiling for a TPU needs libtpu: pip install "flax-bert[tpu]"')
TINY = ["configs/tiny.yaml", "--topology", "v5e:2x2", "--attention", "xla", "--num_hidden_layers", "1",
        "--max_seq_length", "64", "--no_eval"]


def test_topology_names():
    assert parse_topology("v5e:2x2") == ("v5e:2x2", "default")
    assert parse_topology("v5litepod-16") == ("v5e:4x4", "default")
    assert parse_topology("v5litepod-8") == ("v5e:2x4", "default")
    assert parse_topology("v4-8") == ("v4:2x2x1", "megacore")   # v4 types count TensorCores: 4 chips
    assert parse_topology("v4-32") == ("v4:2x2x4", "megacore")
    assert parse_topology("v5p-128") == ("v5p:4x4x4", "default")
    assert parse_topology("v6e-256") == ("v6e:16x16", "default")
    with pytest.raises(tpu_compile.TopologyError, match="v5litepod-16"):
        parse_topology("v9-8")


HLO = """HloModule m
%cond (p: (s32[], f32[8,4])) -> pred[] {
  %c = s32[]{:T(128)} constant(12)
  ROOT %lt = pred[] compare(%gte, %c), direction=LT
}
%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %ag = bf16[64,1024]{1,0} all-gather(%x), dimensions={0}
  %ars = (f32[16,24,64]{2,1,0}, f32[16,24,64]{2,1,0}) all-reduce-start(%y), to_apply=%add
  %ard = f32[16,24,64]{2,1,0} all-reduce-done(%ars)
}
ENTRY %main (a: f32[8,4]) -> f32[8,4] {
  %w = (s32[], f32[8,4]) while(%t), condition=%cond, body=%body
  %rs = f32[2,4]{1,0} reduce-scatter(%z), dimensions={0}
}
"""


def test_hlo_reader_counts_loop_bodies_by_their_trip_count():
    found = collectives(HLO)
    assert collective_summary(found) == {"all-gather": {"count": 12, "bytes": 12 * 64 * 1024 * 2},
                                         "all-reduce": {"count": 12, "bytes": 12 * 16 * 24 * 64 * 4},
                                         "reduce-scatter": {"count": 1, "bytes": 32}}
    assert [c["shape"] for c in batch_collectives(found, 16, 24)] == [(16, 24, 64)]


def test_without_libtpu_one_line_names_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(tpu_compile.importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    assert cli.main(["compile", *TINY]) == 1
    assert capsys.readouterr().err.strip() == 'error: compiling for a TPU needs libtpu: pip install "flax-bert[tpu]"'


@pytest.fixture(scope="module")
def tiny_report():
    args, run = tpu_compile.parse(TINY)
    return tpu_compile.compile_run(run, args.topology, with_eval=False)


@NEEDS_LIBTPU
def test_tiny_config_compiles_for_v5e(tiny_report, tmp_path, monkeypatch, capsys):
    assert tiny_report.devices == 4 and tiny_report.device_kind == "TPU v5 lite"
    assert tiny_report.hbm > 15 * 2 ** 30 and tiny_report.fits
    assert "all-reduce" in tiny_report.train.collectives  # data parallel: the gradients are summed
    monkeypatch.setattr(tpu_compile, "compile_run", lambda *a, **k: tiny_report)
    assert cli.main(["compile", *TINY, "--json", str(tmp_path / "r.json"), "--hlo", str(tmp_path / "r.hlo")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    for key in ("fits", "hbm_bytes_per_device", "bytes_per_device", "flops_per_step", "collectives",
                "compile_seconds", "topology", "mesh"):
        assert key in report
    assert set(report["bytes_per_device"]) >= {"arguments", "temporaries", "outputs", "total"}
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert "HloModule" in (tmp_path / "r.hlo").read_text()
    capsys.readouterr()
    small_chip = dataclasses.replace(tiny_report, hbm=tiny_report.train.total // 2)
    monkeypatch.setattr(tpu_compile, "compile_run", lambda *a, **k: small_chip)
    assert cli.main(["compile", *TINY]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("does not fit: ") and "--per_device_train_batch_size 8" in last and "--remat_policy full" in last


@NEEDS_LIBTPU
def test_accelerator_types_and_slices_give_their_chips():
    assert len(tpu_compile.topology_devices("v4-32")) == 16  # 32 TensorCores, one device per chip
    assert len(tpu_compile.topology_devices("v5p-128")) == 64
    two_slices = tpu_compile.topology_devices("v5e:2x2", num_slices=2)
    assert len(two_slices) == 8 and {d.slice_index for d in two_slices} == {0, 1}


@NEEDS_LIBTPU
def test_a_phased_config_compiles_each_phase_and_auto_avoids_splash_for_short_rows(tmp_path, capsys):
    """Each distinct phase is compiled as its steps will run (here 32- then 64-token rows); rows that are not a
    multiple of 128 tokens cannot use the TPU splash kernel, so --attention auto takes xla for them."""
    out = tmp_path / "report.json"
    assert cli.main(["compile", "modernbert-tiny-recipe", "--topology", "v5e:2x2", "--no_eval", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "phase 0 'short': v5e:2x2" in printed and "phase 1 'long': v5e:2x2" in printed
    report = json.loads(out.read_text())
    assert report["fits"] and [(p["phases"], p["max_seq_length"], p["attention"]) for p in report["phases"]] == [
        ("phase 0 'short'", 32, "xla"), ("phase 1 'long'", 64, "xla")]
    from flax_bert.models import attention
    from flax_bert.models.config import ModelConfig

    config = ModelConfig.for_family("modernbert")
    assert attention.resolve("auto", config, "tpu", 1024)[0] == "splash"
    with pytest.raises(attention.AttentionError, match="multiple of 128 tokens, not 96"):
        attention.resolve("splash", config, "tpu", 96)


@pytest.mark.parametrize("hbm_rows, start, precision", [(5, 8, 0.0), (37, 8, 0.0), (301, 8, 0.0), (301, 8, 0.1),
                                                        (0, 8, 0.0), (4096, 8, 0.0), (9564, 8, 0.0), (1422, 1300, 0.0),
                                                        (1422, 1500, 0.0)])
def test_find_batch_follows_the_memory_line_to_the_largest_batch_that_fits(monkeypatch, hbm_rows, start, precision):
    """A fake compiler whose bytes grow linearly with the rows (plus a little noise the line must absorb): the
    answer is exact (or within the precision) and takes a few compiles whether the chip holds 5 or 301 rows."""
    fixed, per_row, hbm = 3_000_000, 1_000_000, 3_000_000 + hbm_rows * 1_000_000 + 500_000
    tried = []

    def fake_compile(run, topology, num_slices=1, with_eval=True):
        rows = run.per_device_train_batch_size
        tried.append(rows)
        total = fixed + rows * per_row + (rows % 3) * 10_000
        arguments = 2_000_000  # the parameters and optimizer state; the gradients are temporaries
        step = tpu_compile.StepReport(arguments, total - arguments, 0, 0, 0, None, {}, 1.0,
                                      required=None if total <= hbm else total)
        return dataclasses.replace(FAKE_REPORT, hbm=hbm, train=step)

    monkeypatch.setattr(tpu_compile, "compile_run", fake_compile)
    run = tpu_compile.parse(TINY)[1]
    best = tpu_compile.find_batch(run, "v5e:2x2", start=start, precision=precision)
    assert len(set(tried)) == len(tried)  # no batch compiled twice
    if precision == 0:
        assert best == hbm_rows
    else:
        assert hbm_rows * (1 - precision) <= best <= hbm_rows
    assert len(tried) <= (3 if abs(start - hbm_rows) < 0.1 * hbm_rows else 5), tried  # a near start saves compiles


FAKE_REPORT = tpu_compile.CompileReport(topology="v5e:2x2", devices=4, device_kind="TPU v5 lite", mesh={"data": 4},
                                        hbm=0, per_device_batch=0, global_batch=0, max_seq_length=128,
                                        attention="xla", train=None, eval=None, model_flops_per_step=0.0)
