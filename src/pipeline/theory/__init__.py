"""Section 5 of the study as numerics: the random-feature model of why consistency distillation filters
memorization (teacher curvature U, CD curvature C, their spectra and the per-mode response)."""
