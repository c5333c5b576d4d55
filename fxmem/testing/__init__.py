"""Testing helpers for fxmem and its users: equivalence, sample models, random graphs."""

from fxmem.testing.equivalence import assert_equivalent
from fxmem.testing.recording import recording_backend
from fxmem.testing.samples import SAMPLES, Sample, sample

__all__ = ["assert_equivalent", "recording_backend", "SAMPLES", "Sample", "sample"]
