"""Where a train step's time goes, JAX beside PyTorch on the same machine in the same run: the forward pass
(loss), forward + backward (gradients), the optimizer update, and the whole step.

    python benchmarks/step_breakdown.py modernbert-base --max_seq_length 256 --per_device_train_batch_size 2

Each part is timed alone (median of --repeats after one untimed call): JAX's parts as separately jitted
functions over the run's own Trainer (sparse head, the config's optimizer), PyTorch's as transformers'
model with torch.optim.AdamW (what `flax-bert bench --compare torch` times). fp32 on the CPU. The parts do
not add up to the step exactly: the step fuses them and donates the state.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from flax_bert.training import accelerators

accelerators.quiet_libtpu_without_a_tpu()  # before JAX: no libtpu probing errors on a machine without a TPU


def median_seconds(fn, repeats: int, ready=lambda out: out) -> float:
    ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_parts(args, run, model_config) -> dict[str, float]:
    import jax

    from flax_bert import bench
    from flax_bert.models import partitioning
    from flax_bert.training.sharding import batch_sharding

    trainer, _ = bench.make_trainer(run, model_config)
    host = bench.random_batch(args.per_device_train_batch_size, run.max_seq_length, model_config)
    batch = {k: jax.device_put(v, batch_sharding(trainer.mesh, v.ndim)) for k, v in host.items()}
    state = trainer.init_state(seed=0)
    masked = trainer._mask(trainer.masking_key(), state.step, batch)
    inputs = {k: v for k, v in batch.items() if k != "input_ids"}
    count = float(masked.weights.sum())

    def loss(params):
        with partitioning.use_mesh(trainer.mesh):
            return trainer._loss_sums(params, inputs, masked, jax.random.key(0), count, 1.0)[0]

    forward, gradients = jax.jit(loss), jax.jit(jax.grad(loss))
    grads = gradients(state.params)
    update = jax.jit(lambda g, opt, p: trainer.tx.update(g, opt, p), donate_argnums=(1,))
    holder = {"opt": state.opt_state}

    def one_update():
        _, holder["opt"] = update(grads, holder["opt"], state.params)
        return holder["opt"]

    ready = jax.block_until_ready
    parts = {"forward": median_seconds(lambda: forward(state.params), args.repeats, ready),
             "forward+backward": median_seconds(lambda: gradients(state.params), args.repeats, ready),
             "optimizer update": median_seconds(one_update, args.repeats, ready)}
    holder.clear()
    step_state = {"state": trainer.init_state(seed=0)}  # the update above consumed (donated) this one's optimizer state

    def one_step():
        step_state["state"], metrics = trainer.train_step(step_state["state"], batch)
        return metrics

    parts["train step"] = median_seconds(one_step, args.repeats, ready)
    return parts


def torch_parts(args, run, model_config) -> dict[str, float]:
    import torch

    from flax_bert import bench

    model = bench.torch_model(model_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.learning_rate, betas=(run.adam_beta1, run.adam_beta2),
                                  eps=run.adam_epsilon, weight_decay=run.weight_decay)
    batch = bench.random_batch(args.per_device_train_batch_size, run.max_seq_length, model_config)
    ids = torch.from_numpy(batch["input_ids"]).long()
    specials, mask_id = bench.special_token_ids(model_config)
    inputs, labels = bench.torch_mask_tokens(ids, specials, mask_id, model_config.vocab_size, run.mlm_probability)
    mask = torch.ones_like(inputs)

    def forward():
        with torch.no_grad():
            return model(input_ids=inputs, attention_mask=mask, labels=labels).loss

    def forward_backward():
        model(input_ids=inputs, attention_mask=mask, labels=labels).loss.backward()

    def step():
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    parts = {"forward": median_seconds(forward, args.repeats),
             "forward+backward": median_seconds(forward_backward, args.repeats)}
    parts["optimizer update"] = median_seconds(optimizer.step, args.repeats)  # the gradients of the calls above
    parts["train step"] = median_seconds(step, args.repeats)
    return parts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", help="a YAML run config or a name in configs/ (modernbert-base)")
    parser.add_argument("--max_seq_length", type=int, default=256)
    parser.add_argument("--per_device_train_batch_size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    from flax_bert import bench

    bench_args = bench.build_parser().parse_args(
        [args.config, "--max_seq_length", str(args.max_seq_length), "--dtype", "float32",
         "--per_device_train_batch_size", str(args.per_device_train_batch_size)])
    run, model_config = bench.load_setup(bench_args)
    ours, theirs = jax_parts(args, run, model_config), torch_parts(args, run, model_config)
    print(f"{args.config}: batch {args.per_device_train_batch_size} x seq {args.max_seq_length}, fp32, "
          f"{run.optimizer} (JAX) / AdamW (PyTorch)")
    print(f"{'part':<18}{'JAX s':>10}{'PyTorch s':>12}{'PyTorch/JAX':>13}")
    for part in ours:
        print(f"{part:<18}{ours[part]:>10.3f}{theirs[part]:>12.3f}{theirs[part] / ours[part]:>13.2f}")
    result = {"config": args.config, "jax": ours, "torch": theirs}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return result


if __name__ == "__main__":
    main()
