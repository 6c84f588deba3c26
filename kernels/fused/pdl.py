"""Programmatic dependent launch (PDL) inside the decode-path Triton kernels.

``pdl_prologue`` goes first in a kernel body: with ``USE_PDL`` it waits until the previous
kernel in the stream has finished and its writes are visible (``griddepcontrol.wait``), then
lets the next kernel launch (``griddepcontrol.launch_dependents``), whose programs in turn wait
before touching what the previous kernel wrote. Stores always follow the wait, so results are
those of serial launches; what overlaps is one kernel's launch, ramp-up and early loads with the
previous one's tail. Launchers pass ``USE_PDL=dispatch.pdl(x)`` and ``launch_pdl`` with the same
value; with ``USE_PDL=False`` (the interpreter, older GPUs) the prologue is empty.

NOTE: the rule for loads issued before the wait. A kernel starts only after the kernel before
it has let it launch, which ``pdl_prologue`` does after its own wait, that is once the kernel
two back has finished. So a load before the wait may read only what the previous kernel cannot
be writing: weights, the host-staged metadata (slot mappings, sequence lengths, block tables),
and KV-cache entries of positions before this step's new tokens (written by earlier steps or
by earlier layers' kernels). The skinny GEMM loads its first weight tile early, the decode
attention (``_paged_decode_early_kernel``) its first key tile.
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
