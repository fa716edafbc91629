"""Plain-torch reference optimizers, written from the papers, for behaviour where optimi 0.3.3 is
buggy (see docs/differences.md). Out-of-place, one tensor at a time, any dtype: readability first."""
