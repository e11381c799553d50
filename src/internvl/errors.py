"""Typed errors: every user-facing failure names what is wrong (file, line, key, expected vs got)."""


class InternVLError(Exception):
    """Base class for every error this package raises on purpose. The CLI prints its message as one line."""


class ConfigError(InternVLError):
    """A config.json or preset that cannot be understood."""


class CheckpointError(InternVLError):
    """A checkpoint file or tensor that is missing, truncated or of the wrong shape."""


class TokenizerError(InternVLError):
    """A tokenizer that cannot be loaded or lacks a required special token."""


class ImageError(InternVLError):
    """An image that cannot be read, is corrupt, or is too large."""


class VideoError(InternVLError):
    """A video that cannot be read or decoded."""


class PromptError(InternVLError):
    """A prompt that does not match its images or does not fit the context."""


class DataError(InternVLError):
    """A training or evaluation data row that is invalid; the message names file and line."""


class TrainingError(InternVLError):
    """A training run that cannot start or continue (bad options, diverged loss, bad resume state)."""
