"""Stage 3: distillation methods, each an objective plugged into the shared training loop."""
