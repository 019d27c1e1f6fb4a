"""Exception types shared by every layer; messages say what was expected and what came."""


class LyraError(Exception):
    """Base class of every error this project raises on purpose."""


class LyraConfigError(LyraError, ValueError):
    """A configuration value or key is invalid (names the key path and the accepted form)."""


class LyraInputError(LyraError, ValueError):
    """User input (image, depth, poses, prompt bank...) is malformed (names file, field, expected form)."""


class LyraStorageError(LyraError, RuntimeError):
    """The run store is unreachable, read-only, or holds data that does not match its manifest."""


class LyraNonFiniteError(LyraInputError, FloatingPointError):
    """Tensors that must be finite hold NaN/Inf (in training: a diverged model; caught as FloatingPointError)."""
