"""Drafter checkpoints shipped with outrider (speculators format), one folder per target."""
