"""Programmatic dependent launch (PDL) inside the decode-path Triton kernels.

``pdl_prologue`` goes first in a kernel body: with ``USE_PDL`` it waits until the previous
kernel in the stream has finished and its writes are visible (``griddepcontrol.wait``), then
lets the next kernel launch (``griddepcontrol.launch_dependents``), whose programs in turn wait
before touching memory. Every load and store of a kernel follows the wait, so results are those
of serial launches; what overlaps is one kernel's launch and ramp-up with the previous one's
tail. Launchers pass ``USE_PDL=dispatch.pdl(x)`` and ``launch_pdl`` with the same value; with
``USE_PDL=False`` (the interpreter, older GPUs) the prologue is empty.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
