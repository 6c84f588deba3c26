"""Which Triton kernels compile, and when: a log filled by Triton's JIT hooks (Triton >= 3.4).

A kernel variant compiled on first use inside a timed run is a stall of hundreds of ms; this
names it. ``CompileLog.install()`` chains onto ``triton.knobs.runtime.jit_cache_hook`` (called
before each compile of a variant missing from the in-memory cache) and
``jit_post_compile_hook`` (after it); without Triton, or with an older one, it records nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Compile:
    name: str  # the kernel's qualified name
    signature: str  # the specialised arguments, as Triton prints them
    start_s: float  # time.perf_counter()
    seconds: float | None = None


@dataclass
class CompileLog:
    entries: list[Compile] = field(default_factory=list)
    installed: bool = False
    _restore: tuple[Any, Any] = (None, None)

    def install(self) -> bool:
        try:
            from triton import knobs
        except ImportError:
            return False
        rt = knobs.runtime
        if not hasattr(rt, "jit_cache_hook") or not hasattr(rt, "jit_post_compile_hook"):
            return False
        before, after = rt.jit_cache_hook, rt.jit_post_compile_hook
        open_: dict[str, Compile] = {}

        def on_cache(**kw: Any) -> bool | None:
            rep = str(kw.get("repr", ""))
            name, _, sig = rep.partition("](")
            c = Compile(name.split("[")[0], sig.removesuffix(")"), time.perf_counter())
            self.entries.append(c)
            open_[str(kw.get("key"))] = c
            # NOTE: a true value would skip the compile; chain to an earlier hook.
            return before(**kw) if before else None

        def on_compiled(**kw: Any) -> bool | None:
            c = open_.pop(str(kw.get("key")), None)
            if c is not None:
                c.seconds = time.perf_counter() - c.start_s
            return after(**kw) if after else None

        rt.jit_cache_hook = on_cache
        rt.jit_post_compile_hook = on_compiled
        self._restore = (before, after)
        self.installed = True
        return True

    def uninstall(self) -> None:
        """Put back the hooks that were there before ``install``."""
        if not self.installed:
            return
        from triton import knobs

        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._restore
        self.installed = False

    def since(self, t: float) -> list[dict[str, Any]]:
        """Compiles that started at or after ``t`` (perf_counter), as JSON rows."""
        return [
            {
                "kernel": c.name,
                "ms": None if c.seconds is None else round(c.seconds * 1e3, 1),
                "signature": c.signature[:800],
            }
            for c in self.entries
            if c.start_s >= t
        ]
