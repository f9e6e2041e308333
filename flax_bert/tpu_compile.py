"""`flax-bert compile`: compile the real train step (and eval step) for a TPU topology on any machine, and
report what a TPU user meets first: does it fit the chip's HBM, what it moves between chips.

With libtpu installed (`pip install "flax-bert[tpu]"`) JAX describes a TPU topology without a TPU
(`jax.experimental.topologies`); the Trainer's jitted steps are lowered onto a mesh of those devices with
abstract inputs and compiled. Nothing runs. The report is per device: HBM, argument / temporary / output
bytes, whether it fits, the compiler's FLOPs, every kind of collective with its count and bytes per step
(loop bodies counted as often as they run), and the compile time.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import sys
import time

from flax_bert.errors import InputError, MissingDependencyError
from flax_bert.run import out_of_memory
from flax_bert.training.accelerators import use_compile_only_settings

GIB = 2 ** 30
EXIT_DOES_NOT_FIT = 2
INSTALL_HINT = 'compiling for a TPU needs libtpu: pip install "flax-bert[tpu]"'


class TopologyError(InputError):
    """A topology name that is neither JAX's (v5e:2x2) nor an accelerator type (v5litepod-16)."""


# accelerator-type prefix -> (JAX's chip name, TensorCores the type's number counts per chip)
ACCELERATOR_TYPES = {"v4": ("v4", 2), "v5p": ("v5p", 2), "v5litepod": ("v5e", 1), "v5e": ("v5e", 1), "v6e": ("v6e", 1)}
TWO_D_CHIPS = ("v5e", "v6e")  # 2-D tori; v4 and v5p are 3-D


def chip_grid(chip: str, chips: int) -> str:
    """The topology of `chips` chips as Cloud TPU lays them out: 2x2, 4x4, 8x16 (v5e, v6e); 2x2x1, 2x2x4 (v4, v5p)."""
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"{chips} chips: TPU slices have a power of two of chips (e.g. v5litepod-16, v4-32)")
    if chip in TWO_D_CHIPS:
        dims = [1, 1]
        while math.prod(dims) < chips:
            dims[dims.index(min(dims))] *= 2  # 1x1, 2x1 -> 2x2, 4x2 ...
        return "x".join(map(str, sorted(dims)))
    dims = [2, 2, 1] if chips >= 4 else [chips, 1, 1]
    while math.prod(dims) < chips:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2  # 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4 ...
    return "x".join(map(str, dims))


def parse_topology(name: str) -> tuple[str, str]:
    """(JAX topology name, chip config) for `v5e:2x2` style names and accelerator types (`v5litepod-16`,
    `v4-32`, `v5p-128`, `v6e-8`). v4 counts TensorCores in its type and runs them as one device per chip
    (megacore), as a v4 TPU VM does."""
    name = name.strip().lower()
    if ":" in name:
        chip = name.split(":")[0]
        if chip not in {c for c, _ in ACCELERATOR_TYPES.values()}:
            raise TopologyError(f"unknown TPU {chip!r} in --topology {name}: use v4, v5e, v5p or v6e (e.g. v5e:2x2)")
        return name, "megacore" if chip == "v4" else "default"
    match = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
    if not match:
        raise TopologyError(f"unknown --topology {name!r}: give JAX's name (v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2) "
                            "or an accelerator type (v5litepod-16, v4-32, v5p-128, v6e-8)")
    chip, cores_per_chip = ACCELERATOR_TYPES[match.group(1)]
    chips = int(match.group(2)) // cores_per_chip
    return f"{chip}:{chip_grid(chip, chips)}", "megacore" if chip == "v4" else "default"


def topology_devices(name: str, num_slices: int = 1):
    """The compile-only devices of a topology (and `num_slices` copies of it joined over the data-center network)."""
    jax_name, chip_config = parse_topology(name)  # a bad name is reported with or without libtpu
    if importlib.util.find_spec("libtpu") is None:
        raise MissingDependencyError(INSTALL_HINT)
    use_compile_only_settings()  # libtpu loads with the topology below
    from jax.experimental import topologies

    extra = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=jax_name, chip_config_name=chip_config,
                                            **extra).devices
    except Exception as err:  # noqa: BLE001 - libtpu's own message names what it cannot build
        raise TopologyError(f"libtpu cannot describe --topology {name} ({jax_name}): {str(err).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- what the compiler says
_HBM_CACHE: dict[str, int] = {}


def hbm_bytes(mesh) -> int:
    """HBM one device offers, as the compiler reckons it: read from its refusal of a program far too large."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    kind = mesh.devices.flat[0].device_kind
    if kind not in _HBM_CACHE:
        huge = jax.ShapeDtypeStruct((2 ** 42,), jnp.int8, sharding=NamedSharding(mesh, P()))
        try:
            jax.jit(lambda x: x + 1).lower(huge).compile()
            raise RuntimeError("a 4 TiB program compiled: cannot tell this device's HBM")
        except Exception as err:  # noqa: BLE001
            match = out_of_memory.TPU_AVAILABLE.search(str(err))
            if not match:
                raise
            _HBM_CACHE[kind] = out_of_memory.tpu_bytes(match)
    return _HBM_CACHE[kind]


_COLLECTIVE_RE = re.compile(r"=\s*(?P<shape>.+?)\s+(?P<kind>all-gather|all-reduce|reduce-scatter|all-to-all|"
                            r"collective-permute|ragged-all-to-all)(?P<start>-start)?\(")
_ARRAY_RE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_TRIP_RE = re.compile(r"\"known_trip_count\":\{\"n\":\"(\d+)\"")
_CALLEE_RE = re.compile(r"\b(body|calls|to_apply|condition)=%?([\w.\-]+)|\bbranch_computations=\{([^}]*)\}")


def array_shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY_RE.findall(text)]


def _computations(lines: list[str]) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    bodies: dict[str, list[str]] = {}
    entry = current = None
    for line in lines:
        head = _COMPUTATION_RE.match(line)
        if head:
            current = head.group(2)
            entry = current if head.group(1) else entry
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    return bodies, entry


def _trip_count(line: str, bodies: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the one integer bound its condition compares with
    (TPU HLO leaves the annotation out), else 1."""
    known = _TRIP_RE.search(line)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%?([\w.\-]+)", line)
    bounds = {int(n) for text in bodies.get(condition.group(1) if condition else "", [])
              for n in re.findall(r"[su](?:32|64)\[\](?:\{[^}]*\})? constant\((\d+)\)", text)}
    return bounds.pop() if len(bounds) == 1 else 1


def _runs_per_step(lines: list[str]) -> dict[str, int]:
    """How often each computation runs per step: a while body its trip count times its caller, others as their caller."""
    bodies, entry = _computations(lines)
    calls: dict[str, list[tuple[str, int]]] = {}
    for computation, instructions in bodies.items():
        for line in instructions:
            for role, name, branches in _CALLEE_RE.findall(line):
                factor = _trip_count(line, bodies) if role == "body" else 1
                for callee in [name] if name else branches.split(","):
                    calls.setdefault(computation, []).append((callee.strip().lstrip("%"), factor))
    runs: dict[str, int] = {}

    def visit(name, times):
        runs[name] = runs.get(name, 0) + times
        for callee, factor in calls.get(name, ()):
            visit(callee, times * factor)

    if entry:
        visit(entry, 1)
    return runs


def collectives(hlo: str) -> list[dict]:
    """Every collective of the compiled HLO: kind, the largest array of its result (the gathered or reduced
    data), its bytes, and how often it runs per step (the trip counts of the loops around it)."""
    lines = hlo.splitlines()
    runs = _runs_per_step(lines)
    found, computation = [], None
    for line in lines:
        head = _COMPUTATION_RE.match(line)
        if head:
            computation = head.group(2)
            continue
        match = _COLLECTIVE_RE.search(line)
        arrays = array_shapes(match.group("shape")) if match else []
        if not arrays:
            continue
        dtype, shape = max(arrays, key=lambda a: math.prod(a[1]) * _BYTES[a[0]])
        found.append({"kind": match.group("kind"), "dtype": dtype, "shape": shape,
                      "bytes": math.prod(shape) * _BYTES[dtype], "runs": runs.get(computation, 1)})
    return found


def collective_summary(found: list[dict]) -> dict:
    """{kind: {count, bytes}} per device per step."""
    summary: dict = {}
    for c in found:
        entry = summary.setdefault(c["kind"], {"count": 0, "bytes": 0})
        entry["count"] += c["runs"]
        entry["bytes"] += c["runs"] * c["bytes"]
    return dict(sorted(summary.items()))


def batch_collectives(found: list[dict], rows: int, length: int) -> list[dict]:
    """Collectives whose data spans `rows` rows of `length` tokens (as [rows, length, ...] or [rows·length, ...])."""
    def spans(shape):
        return any(shape[i:i + 2] == (rows, length) for i in range(len(shape) - 1)) or rows * length in shape
    return [c for c in found if spans(c["shape"])]


# ----------------------------------------------------------------------------- compiling the steps
@dataclasses.dataclass
class StepReport:
    arguments: int
    temporaries: int
    outputs: int
    aliased: int
    code: int
    flops: float | None
    collectives: dict
    compile_seconds: float
    hlo: str = dataclasses.field(repr=False, default="")
    required: int | None = None  # when the compiler refused: the bytes it said it needed

    @property
    def total(self) -> int:
        if self.required is not None:
            return self.required
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def compile_step(jitted, *abstract_args) -> StepReport:
    """Lower and compile one step; a step too large for HBM comes back with `required` from the refusal."""
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*abstract_args).compile()
    except Exception as err:  # noqa: BLE001 - RESOURCE_EXHAUSTED is the answer "does not fit"
        required = out_of_memory.TPU_REQUIRED.search(str(err))
        if "RESOURCE_EXHAUSTED" not in str(err) or not required:
            raise
        return StepReport(0, 0, 0, 0, 0, None, {}, time.perf_counter() - start, required=out_of_memory.tpu_bytes(required))
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    return StepReport(memory.argument_size_in_bytes, memory.temp_size_in_bytes, memory.output_size_in_bytes,
                      memory.alias_size_in_bytes, memory.generated_code_size_in_bytes,
                      (cost or {}).get("flops"), collective_summary(collectives(hlo)), seconds, hlo)


@dataclasses.dataclass
class CompileReport:
    topology: str
    devices: int
    device_kind: str
    mesh: dict
    hbm: int
    per_device_batch: int
    global_batch: int
    max_seq_length: int
    attention: str
    train: StepReport
    eval: StepReport | None
    model_flops_per_step: float

    @property
    def fits(self) -> bool:
        return all(step.required is None and step.total <= self.hbm for step in (self.train, self.eval) if step)

    def to_json(self) -> dict:
        def step(report: StepReport | None):
            if report is None:
                return None
            return {"fits": report.required is None and report.total <= self.hbm,
                    "bytes_per_device": {"arguments": report.arguments, "temporaries": report.temporaries,
                                         "outputs": report.outputs, "aliased": report.aliased,
                                         "code": report.code, "total": report.total},
                    "compiler_flops_per_device": report.flops, "collectives": report.collectives,
                    "compile_seconds": report.compile_seconds}

        train = step(self.train)
        return {"fits": self.fits, "topology": self.topology, "devices": self.devices, "device_kind": self.device_kind,
                "mesh": self.mesh, "hbm_bytes_per_device": self.hbm, "per_device_train_batch_size": self.per_device_batch,
                "global_batch": self.global_batch, "max_seq_length": self.max_seq_length, "attention": self.attention,
                "bytes_per_device": train["bytes_per_device"], "flops_per_step": self.model_flops_per_step,
                "compiler_flops_per_step": None if self.train.flops is None else self.train.flops * self.devices,
                "collectives": train["collectives"], "compile_seconds": self.train.compile_seconds
                + (self.eval.compile_seconds if self.eval else 0.0), "train_step": train, "eval_step": step(self.eval)}


def compile_run(run, topology: str, num_slices: int = 1, with_eval: bool = True) -> CompileReport:
    """Build the run's Trainer on the topology's devices and compile its steps for abstract inputs."""
    import jax

    from flax_bert.bench import make_trainer, random_batch
    from flax_bert.run.config import fresh_model_config
    from flax_bert.training.peak_flops import step_flops_per_token
    from flax_bert.training.sharding import batch_sharding, make_mesh

    devices = topology_devices(topology, num_slices)
    mesh = make_mesh(run.mesh, devices)
    model_config = fresh_model_config(run, run.vocab_size or run.tokenizer_vocab_size)
    trainer, _ = make_trainer(run, model_config, mesh=mesh, gradient_accumulation_steps=run.gradient_accumulation_steps)

    def abstract_batch(rows):
        example = random_batch(1, run.max_seq_length, trainer.model_config, nsp=run.objective == "mlm+nsp")
        return {name: jax.ShapeDtypeStruct((rows, *value.shape[1:]), value.dtype,
                                           sharding=batch_sharding(mesh, value.ndim)) for name, value in example.items()}

    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         trainer.abstract_state, trainer.state_shardings)
    rows = run.per_device_train_batch_size * len(devices) * run.gradient_accumulation_steps
    train = compile_step(trainer.train_step, state, abstract_batch(rows))
    evaluation = None
    if with_eval:  # an eval batch also carries each row's place in the validation set (its masks' key)
        eval_rows = run.per_device_eval_batch_size * len(devices)
        eval_batch = {**abstract_batch(eval_rows), "row_ids": jax.ShapeDtypeStruct(
            (eval_rows,), jax.numpy.int32, sharding=batch_sharding(mesh, 1))}
        evaluation = compile_step(trainer.eval_step, state.params, eval_batch)
    flops = step_flops_per_token(trainer.model_config, trainer.step_config.masking) * rows * run.max_seq_length
    return CompileReport(topology=topology, devices=len(devices), device_kind=devices[0].device_kind,
                         mesh=dict(mesh.shape), hbm=hbm_bytes(mesh), per_device_batch=run.per_device_train_batch_size,
                         global_batch=rows, max_seq_length=run.max_seq_length, attention=trainer.model_config.attention,
                         train=train, eval=evaluation, model_flops_per_step=flops)


FIND_BATCH_LIMIT = 65536  # rows per device; bert-base with full remat fits 9,564 on a v5p chip


def find_batch(run, topology: str, num_slices: int = 1, limit: int = FIND_BATCH_LIMIT, start: int = 8,
               precision: float = 0.0,
               on_try=None) -> int:
    """The largest per-device train batch whose train step fits (0 when not even one row does), found within
    `precision` (0: exactly: the next batch up does not fit). `on_try(batch, report)` hears of every compile.

    The bytes a step needs grow close to linearly with its rows, so after two compiles each next try is the batch
    where the line through the two tries nearest the answer meets the chip's HBM (then one batch past what fits,
    to confirm). The line is not quite straight on a TPU (bert-base on v5e: 10 compiles to the exact answer,
    where doubling and bisecting from 8 rows takes 12). After one try that fits, the line runs from the bytes that
    do not grow with the rows (the arguments: parameters and optimizer state) through that try; after one that
    does not fit, the rows shrink by HBM / bytes. A try the line cannot place (the compiler gave no size) bisects,
    or doubles while nothing failed."""
    tried: dict[int, tuple[bool, int]] = {}  # batch -> (fits, bytes the compiler needs for it)
    fixed = 0  # the bytes of the step's arguments, the same for every batch (known once a try fits)
    hbm = 0

    def measure(batch: int) -> None:
        nonlocal hbm, fixed
        report = compile_run(dataclasses.replace(run, per_device_train_batch_size=batch), topology, num_slices,
                             with_eval=False)
        if on_try:
            on_try(batch, report)
        hbm = report.hbm
        tried[batch] = (report.fits, report.train.total)
        if report.train.required is None:
            fixed = report.train.arguments

    batch = max(1, min(start, limit))
    while True:
        measure(batch)
        low = max((b for b, (fits, _) in tried.items() if fits), default=0)
        high = min((b for b, (fits, _) in tried.items() if not fits), default=limit + 1)
        if high - low <= max(1, int(low * precision)):
            return min(low, limit)
        batch = _next_try(tried, hbm, fixed, low, high, limit, precision)


def _next_try(tried: dict[int, tuple[bool, int]], hbm: int, fixed: int, low: int, high: int, limit: int,
              precision: float) -> int:
    """find_batch's next batch strictly between `low` (fits) and `high` (does not fit, or limit + 1)."""
    step = max(1, int(low * precision))
    nearest = sorted(sorted(tried, key=lambda b: (b not in (low, high), abs(b - low)))[:2])
    guess = None
    if len(nearest) == 1 and 0 < fixed < tried[nearest[0]][1]:
        tried = {0: (True, fixed), **tried}  # zero rows would need the arguments alone
        nearest = [0, nearest[0]]
    elif len(nearest) == 1 and tried[nearest[0]][1] > hbm > 0:  # too large, arguments unknown: scale it down
        guess = nearest[0] * hbm // tried[nearest[0]][1]
    if len(nearest) == 2:
        (b1, b2), (m1, m2) = nearest, (tried[nearest[0]][1], tried[nearest[1]][1])
        if m2 > m1 > 0:
            guess = b1 + int((hbm - m1) * (b2 - b1) / (m2 - m1))  # where the line meets the HBM
            guess = low + step if guess <= low else guess  # the line says `low` is the answer: confirm one step up
    if guess is None:
        guess = (low + high) // 2 if high <= limit else low * 2
    return max(low + 1, min(guess, high - 1))


# ----------------------------------------------------------------------------- the command
def _gb(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def format_report(report: CompileReport) -> str:
    lines = [f"{report.topology}: {report.devices} x {report.device_kind}, mesh "
             + ",".join(f"{k}={v}" for k, v in report.mesh.items()) + f", {_gb(report.hbm)} HBM per device; "
             f"{report.per_device_batch} rows x {report.max_seq_length} tokens per device (global batch "
             f"{report.global_batch}), attention {report.attention}"]
    for name, step in (("train step", report.train), ("eval step", report.eval)):
        if step is None:
            continue
        if step.required is not None:
            lines.append(f"  {name}: does not fit: the compiler needs {_gb(step.required)} per device "
                         f"({step.compile_seconds:.0f} s)")
            continue
        lines.append(f"  {name}: {'fits' if step.total <= report.hbm else 'DOES NOT FIT'}: {_gb(step.total)} per device "
                     f"= arguments {_gb(step.arguments)} + temporaries {_gb(step.temporaries)} + outputs "
                     f"{_gb(step.outputs)} - aliased {_gb(step.aliased)} + code {_gb(step.code)}; compiled in "
                     f"{step.compile_seconds:.0f} s")
        for kind, c in step.collectives.items():
            lines.append(f"    {kind:<20} {c['count']:>6} per step, {_gb(c['bytes'])} per device")
    flops = report.train.flops
    lines.append(f"  FLOPs per step: {report.model_flops_per_step:.3e} by the model formula (docs/design.md)"
                 + (f", {flops * report.devices:.3e} by the compiler's count" if flops else ""))
    return "\n".join(lines)


def advice(report: CompileReport, run) -> str:
    """One line: by how much it misses, and what would make it fit."""
    worst = max((s for s in (report.train, report.eval) if s), key=lambda s: s.total)
    options = []
    if report.per_device_batch > 1:
        options.append(f"--per_device_train_batch_size {report.per_device_batch // 2} with --gradient_accumulation_steps "
                       f"{run.gradient_accumulation_steps * 2} (the same global batch)")
    if run.remat_policy == "none":
        options.append("--remat_policy full")
    if report.mesh.get("fsdp", 1) == 1 and report.devices > 1:
        options.append(f"--mesh data=-1,fsdp={report.devices}")
    if report.attention == "xla" and run.max_seq_length >= 1024:
        options.append("--attention splash (with --attention_probs_dropout_prob 0)")
    return (f"does not fit: {_gb(worst.total)} per device, {_gb(worst.total - report.hbm)} more than the "
            f"{_gb(report.hbm)} of a {report.device_kind}; try " + ", or ".join(options or ["a chip with more HBM"]))


def build_parser():
    from flax_bert.run.config import OneLineErrorParser

    parser = OneLineErrorParser(prog="flax-bert compile", add_help=False, description=(
        "Compile the train step (and the eval step) for a TPU topology, compile only, and report per device HBM, "
        "bytes, FLOPs and collectives. Exit 0 when it fits, 2 when not. Needs libtpu: pip install \"flax-bert[tpu]\". "
        "Every train option (a YAML config first, --per_device_train_batch_size, --mesh, --remat_policy, "
        "--attention ...) applies."))
    parser.add_argument("--topology", required=True, help="JAX's name (v5e:2x2, v4:2x2x1, v5p:2x2x1, v6e:2x2) or an "
                        "accelerator type (v5litepod-16, v4-32, v5p-128, v6e-8)")
    parser.add_argument("--num_slices", type=int, default=1, help="slices joined over the data-center network")
    parser.add_argument("--json", help="write the report as JSON to this file")
    parser.add_argument("--hlo", help="write the train step's compiled HLO text to this file")
    parser.add_argument("--find_batch", action="store_true",
                        help="print the largest per-device train batch that fits under the other options")
    parser.add_argument("--no_eval", action="store_true", help="compile the train step only")
    return parser


def parse(argv):
    """(compile options, RunConfig): ours first, the rest as `flax-bert train` reads them."""
    from flax_bert.run.config import parse_run_config, resolve_config_file

    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        print("\ntrain's options:")
        parse_run_config(["--help"], prog="flax-bert compile")
    args, rest = build_parser().parse_known_args(argv)
    if rest and not rest[0].startswith("-"):
        rest[0] = str(resolve_config_file(rest[0]))  # a name in configs/ as every command takes it
    run = parse_run_config(rest, prog="flax-bert compile",
                           defaults={"do_train": True, "do_eval": True, "output_dir": "(compile only)"})
    if run.max_seq_length is None:
        raise InputError("flax-bert compile needs --max_seq_length (or a config that sets it)")
    if args.num_slices < 1:
        raise InputError("--num_slices must be at least 1")
    return args, run


def phase_runs(run) -> list[tuple[str, object]]:
    """(label, run) for each distinct setting of a phased run's phases (its row length, batch and mask rate: what
    changes the compiled step's memory), else [("", run)]."""
    if not run.phases:
        return [("", run)]
    from flax_bert.run.build import phase_options
    from flax_bert.training.phases import parse_phases

    settings: dict[tuple, tuple[list[str], object]] = {}
    for phase in parse_phases(run.phases, max_seq_length=run.max_seq_length, mlm_probability=run.mlm_probability):
        options = dataclasses.replace(phase_options(run, phase), phases=None)
        key = (options.max_seq_length, options.per_device_train_batch_size, options.gradient_accumulation_steps,
               options.mlm_probability)
        settings.setdefault(key, ([], options))[0].append(f"{phase.index} {phase.name!r}")
    return [(f"phase{'s' if len(names) > 1 else ''} {', '.join(names)}: ", options)
            for names, options in settings.values()]

def main(argv) -> int:
    args, run = parse(argv)
    phased = phase_runs(run)
    if args.find_batch:
        def heard(batch, report):
            verdict = "fits" if report.fits else "does not fit"
            print(f"  {batch} rows per device: {verdict} ({_gb(report.train.total)} of {_gb(report.hbm)})", flush=True)

        found = []
        for label, phase_run in phased:
            best = find_batch(phase_run, args.topology, args.num_slices, on_try=heard)
            found.append(best)
            at_least = "at least " if best == FIND_BATCH_LIMIT else ""  # the search goes no further
            print(f"{label}largest per-device batch that fits on {args.topology}: {at_least}{best} rows of "
                  f"{phase_run.max_seq_length} tokens (remat {run.remat_policy}, mesh {run.mesh}, accumulation "
                  f"{phase_run.gradient_accumulation_steps})")
        return 0 if all(found) else EXIT_DOES_NOT_FIT
    reports = []
    for label, phase_run in phased:  # a phased run: each distinct phase compiled, as its steps will be
        report = compile_run(phase_run, args.topology, args.num_slices, with_eval=not args.no_eval)
        print(label + format_report(report))
        reports.append((label, phase_run, report))
    if args.json:
        documents = [{"phases": label.rstrip(": "), **report.to_json()} if label else report.to_json()
                     for label, _, report in reports]
        document = documents[0] if len(documents) == 1 else {
            "fits": all(report.fits for _, _, report in reports), "phases": documents}
        pathlib.Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    largest = max(reports, key=lambda item: item[2].train.total)[2]
    if args.hlo and largest.train.hlo:
        pathlib.Path(args.hlo).write_text(largest.train.hlo)  # of the phase that needs the most memory
    unfit = [(label, phase_run, report) for label, phase_run, report in reports if not report.fits]
    for label, phase_run, report in unfit:
        print(label + advice(report, phase_run), file=sys.stderr)
    return EXIT_DOES_NOT_FIT if unfit else 0
