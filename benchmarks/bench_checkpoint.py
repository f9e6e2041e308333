"""How long a checkpoint save blocks the train loop: asynchronous (the default) vs synchronous.

    python benchmarks/bench_checkpoint.py [--model roberta-base|small] [--repeats 3] [--devices 1]

The state is a real TrainState tree (parameters + AdamW moments) of the chosen model, filled with
random values (no compile needed). For each mode it saves `--repeats` times and reports the median of:
  blocked  the time `Checkpointer.save` takes to return: the train loop waits this long
  written  the time until the bundle is complete on disk (save + wait)
While an asynchronous bundle is written, it also times a stand-in train step (a jitted matmul) against
the same step with no save in flight, since the background write shares the host's CPU cores.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from flax_bert.training import accelerators  # noqa: E402

accelerators.quiet_libtpu_without_a_tpu()  # before JAX: no libtpu probing errors on a machine without a TPU


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["roberta-base", "small"], default="roberta-base")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices; >1 shards the state with fsdp")
    parser.add_argument("--dir", help="where to write (default: a temporary folder, deleted afterwards)")
    return parser.parse_args()


def build_state(model: str):
    import jax
    import numpy as np

    from flax_bert.models.config import ModelConfig
    from flax_bert.training.optim import make_optimizer
    from flax_bert.training.sharding import make_mesh
    from flax_bert.training.step import MaskingConfig, StepConfig, Trainer

    small = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 2048}
    sizes = {} if model == "roberta-base" else small
    cfg = ModelConfig.for_family("roberta", vocab_size=50265, **sizes)
    masking = MaskingConfig(special_ids=(0, 1, 2, 3), mask_token_id=50264, random_vocab_size=50265)
    tx, schedule = make_optimizer(learning_rate=1e-4, warmup_steps=10, total_steps=100)
    mesh = make_mesh("fsdp=-1" if jax.device_count() > 1 else "data=1")
    trainer = Trainer(cfg, StepConfig(masking=masking), tx, mesh, schedule)
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype) if np.issubdtype(a.dtype, np.integer)
                        else rng.standard_normal(a.shape, dtype=np.float32).astype(a.dtype), trainer.abstract_state)
    state = jax.device_put(host, trainer.state_shardings)
    return trainer, state


def stand_in_step():
    """A jitted matmul chain that keeps the cores busy like a train step (about 0.1-0.3 s here)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1024, 1024), jnp.float32)
    step = jax.jit(lambda x: jnp.tanh(x @ x @ x @ x) * 0.5)
    step(x).block_until_ready()

    def run(count: int) -> float:
        start = time.perf_counter()
        y = x
        for _ in range(count):
            y = step(y)
        y.block_until_ready()
        return (time.perf_counter() - start) / count

    return run


def main() -> int:
    args = parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    import jax

    from flax_bert.run.checkpoint import Checkpointer

    trainer, state = build_state(args.model)
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    print(f"{args.model}: {sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.1f}M parameters, "
          f"train state {state_bytes / 2**20:.0f} MiB on {jax.device_count()} device(s) ({jax.devices()[0].platform})")
    run_steps = stand_in_step()
    baseline_step = run_steps(5)

    work = pathlib.Path(args.dir) if args.dir else pathlib.Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    results = {}
    for mode in ("synchronous", "asynchronous"):
        checkpointer = Checkpointer(work / mode, save_steps=1, save_total_limit=1, async_save=mode == "asynchronous")
        blocked, written, step_times = [], [], []
        for repeat in range(args.repeats):
            step = repeat + 1
            state = state.replace(step=jax.device_put(jax.numpy.int32(step), trainer.state_shardings.step))
            jax.block_until_ready(state)
            start = time.perf_counter()
            checkpointer.save(step, state, {"epoch": 0, "position": step}, {"seed": 0})
            blocked.append(time.perf_counter() - start)
            if mode == "asynchronous":
                step_times.append(run_steps(3))  # the loop goes on while the bundle is written
            checkpointer.wait()
            written.append(time.perf_counter() - start)
        checkpointer.close()
        results[mode] = (statistics.median(blocked), statistics.median(written), step_times)

    print(f"{'mode':<14}{'blocked (s)':>12}{'written (s)':>13}")
    for mode, (blocked, written, _) in results.items():
        print(f"{mode:<14}{blocked:>12.3f}{written:>13.3f}")
    sync_blocked, async_blocked = results["synchronous"][0], results["asynchronous"][0]
    print(f"an asynchronous save blocks the loop {async_blocked:.3f} s instead of {sync_blocked:.3f} s "
          f"({sync_blocked / max(async_blocked, 1e-9):.1f}x less)")
    during = statistics.median(results["asynchronous"][2])
    print(f"stand-in train step: {baseline_step * 1e3:.0f} ms alone, {during * 1e3:.0f} ms while a bundle is written "
          f"(the write shares the {os.cpu_count()} CPU cores)")
    if not args.dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
