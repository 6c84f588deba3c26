"""The Triton interpreter (``TRITON_INTERPRET=1``) as the CPU tests and smoke runs use it."""

from __future__ import annotations


def patch_numpy_index() -> None:
    """Triton 3.6's interpreter takes int() of 1-element arrays, which numpy >= 2.4 refuses;
    give its tensors an ``__index__`` that reads the one element. Idempotent."""
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
