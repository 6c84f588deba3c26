"""Kernel tests run on CUDA, or on CPU tensors through the Triton interpreter when
``OUTRIDER_TRITON_INTERPRET=1`` (small shapes; see tests/gpu/README.md)."""

from __future__ import annotations

import os

# NOTE: tests/conftest.py sets TRITON_INTERPRET=1 for this mode before triton is imported.
INTERPRET = os.environ.get("OUTRIDER_TRITON_INTERPRET") == "1"


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter takes int() of 1-element arrays, which numpy >= 2.4 refuses."""
    import numpy as np
    from triton.runtime import interpreter

    orig = interpreter._patch_lang_tensor
    if getattr(orig, "outrider_fix", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).flat[0]))

    patched.outrider_fix = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _patch_interpreter_index()
