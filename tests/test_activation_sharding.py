"""FSDP that is FSDP: the compiled train step on a simulated 8-device CPU mesh moves weights and gradients
between devices, never activations of the whole global batch, for BERT/RoBERTa and ModernBERT, over the fsdp
and the tensor axes. The HLO is read as `flax-bert compile` reads a TPU's."""
import jax
import numpy as np
import pytest

from flax_bert.models import partitioning
from flax_bert.models.config import ModelConfig
from flax_bert.tpu_compile import batch_collectives, collectives
from flax_bert.training.optim import make_optimizer
from flax_bert.training.sharding import batch_sharding, make_mesh
from flax_bert.training.step import MaskingConfig, StepConfig, Trainer

# sizes no weight shares: 16 rows x 24 tokens (384) globally, hidden 64, FFN 160, vocab 500
ROWS, SEQ, VOCAB = 16, 24, 500
CONFIGS = {
    "roberta": ModelConfig.for_family("roberta", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=160, max_position_embeddings=40,
                                      attention="xla"),
    "modernbert": ModelConfig.for_family("modernbert", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, intermediate_size=80, local_attention=8,
                                         layer_types=("full_attention", "sliding_attention", "sliding_attention"),
                                         pad_token_id=1, attention="xla"),
}
MASKING = MaskingConfig(special_ids=(0, 1, 2, 3, 4), mask_token_id=4, random_vocab_size=VOCAB, max_seq_length=SEQ)


def compiled_train_step(cfg, mesh_spec):
    tx, schedule = make_optimizer(learning_rate=1e-3, warmup_steps=1, total_steps=10)
    trainer = Trainer(cfg, StepConfig(masking=MASKING), tx, make_mesh(mesh_spec), schedule)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         trainer.abstract_state, trainer.state_shardings)
    batch = {name: jax.ShapeDtypeStruct((ROWS, SEQ), dtype, sharding=batch_sharding(trainer.mesh))
             for name, dtype in (("input_ids", np.int32), ("segment_ids", np.int32), ("word_starts", bool))}
    return trainer.train_step.lower(state, batch).compile()


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(family, mesh_spec):
        if (family, mesh_spec) not in cache:
            cache[family, mesh_spec] = compiled_train_step(CONFIGS[family], mesh_spec)
        return cache[family, mesh_spec]
    return get


@pytest.mark.parametrize("family, mesh_spec", [("roberta", "fsdp=8"), ("modernbert", "fsdp=8"), ("roberta", "data=2,tensor=4")])
def test_no_collective_carries_the_global_batch(compiled, family, mesh_spec):
    """Without the activation constraints the fsdp=8 steps all-gather and all-reduce [16, 24, ...] activations
    in every layer (the whole global batch), and their temporaries exceed data=8's."""
    found = collectives(compiled(family, mesh_spec).as_text())
    assert found, "a sharded step without collectives: the HLO reader found nothing"
    assert not batch_collectives(found, ROWS, SEQ), [(c["kind"], c["shape"]) for c in batch_collectives(found, ROWS, SEQ)]


def test_fsdp_temporaries_no_larger_than_data_parallel(compiled):
    fsdp = compiled("roberta", "fsdp=8").memory_analysis().temp_size_in_bytes
    data = compiled("roberta", "data=8").memory_analysis().temp_size_in_bytes
    assert fsdp <= data, (fsdp, data)


def test_activation_spec_follows_the_rules():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert partitioning.activation_spec(mesh, (8, 24, 64), ("batch", "length", "embed")) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None, None)
    assert partitioning.activation_spec(mesh, (8, 24, 4, 16), ("batch", "length", "heads", None)) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None)
    assert partitioning.activation_spec(mesh, (3, 24, 5), ("batch", None, "heads")) == \
        jax.sharding.PartitionSpec(None, None, None)  # axes that do not divide a dimension leave it whole
