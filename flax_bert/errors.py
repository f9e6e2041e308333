"""The exceptions that mean bad input (a one-line message and a nonzero exit), not a bug."""
from flax_bert.config import ConfigError
from flax_bert.convert import WeightsError
from flax_bert.data_sources import DataError
from flax_bert.run_config import RunConfigError
from flax_bert.train import NonFiniteLossError

USER_ERRORS = (ConfigError, WeightsError, DataError, RunConfigError, NonFiniteLossError, FileNotFoundError,
               FileExistsError, ValueError, ImportError, RuntimeError)
