"""Exceptions a user can act on. Each message says what is wrong and how to fix it."""


class CompressorError(Exception):
    """Base class: an error caused by input the user controls (config, files, model)."""


class ConfigError(CompressorError):
    """A config file is missing, malformed, or holds an impossible value."""


class ModelLoadError(CompressorError):
    """A model could not be found or is not a supported causal language model."""


class UnsupportedArchitectureError(ModelLoadError):
    """The model's architecture has no adapter (see compressor.models.arch)."""


class DataError(CompressorError):
    """A dataset is missing, empty, malformed or too small for the request."""


class SparsityPatternError(CompressorError):
    """A tensor violates the N:M pattern it should have, or its width does not fit M."""


class CheckpointError(CompressorError):
    """A checkpoint is missing, incomplete, corrupt, or does not match the model."""


class OutputExistsError(CompressorError):
    """An output folder already holds results and overwriting was not requested."""


class OutputWriteError(CompressorError):
    """Writing an output failed (no space, no permission, read-only folder); the message names the file."""


class NonFiniteError(CompressorError):
    """NaN or inf where finite numbers are required (weights, statistics, loss)."""


class EvaluationError(CompressorError):
    """An evaluation task cannot run: its package or data is missing, or it returned no results."""
