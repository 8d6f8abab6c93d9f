"""One small error hierarchy. The CLI turns a ToolkitError into one clear line and a non-zero exit.

Torch-free: the on-device runtime imports this module.
"""


class ToolkitError(Exception):
    """A user-facing error: bad input, missing file, unavailable device. Never a bug."""

    exit_code = 2


class ConfigError(ToolkitError):
    """A recipe, override or model configuration is invalid."""


class DataError(ToolkitError):
    """A corpus or evaluation text is missing, empty or unreadable."""


class CheckpointError(ToolkitError):
    """A checkpoint is missing, truncated or inconsistent with its config."""


class ExportError(ToolkitError):
    """ONNX export or its validation failed."""


class BundleError(ToolkitError):
    """A bundle is missing a file, has a changed file, or a path escapes the bundle."""


class QuantizationError(ToolkitError):
    """A quantization request cannot be honoured (bad calibration, group size, precision)."""


class TargetUnavailable(ToolkitError):
    """A requested target is unknown or not usable on this machine."""


class ParityFailure(ToolkitError):
    """A backend's outputs disagree with the PyTorch reference beyond the thresholds."""

    exit_code = 1
