"""The exceptions that mean bad input (a one-line message and a nonzero exit), not a bug. Every other exception
(a bare ValueError or RuntimeError from JAX, XLA or Orbax) keeps its traceback (cli.run_command)."""
from flax_bert.bad_input import InputError
from flax_bert.bench import BenchError
from flax_bert.checkpoint import CheckpointMismatchError, DamagedCheckpointError, OutputDirError
from flax_bert.config import ConfigError
from flax_bert.convert import WeightsError
from flax_bert.data_sources import DataError
from flax_bert.export import HubUploadError
from flax_bert.run_config import RunConfigError
from flax_bert.sharding import MeshError
from flax_bert.tokenizer_training import TokenizerTrainingError
from flax_bert.train import NonFiniteLossError

USER_ERRORS = (InputError, ConfigError, WeightsError, DataError, RunConfigError, NonFiniteLossError, MeshError,
               BenchError, HubUploadError, OutputDirError, DamagedCheckpointError, CheckpointMismatchError,
               TokenizerTrainingError)
