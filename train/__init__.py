"""Drafter training: self-distillation data from the target, EAGLE-3 / P-EAGLE / DFlash heads."""
