"""Data for calibration, training and evaluation, streamed as batches."""

from optcc.data.base import Batch, DataOptions, DataSource, InputSpec

__all__ = ["Batch", "DataOptions", "DataSource", "InputSpec"]
