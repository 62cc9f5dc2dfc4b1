"""nbval's kernel start, tried up to three times (pytest loads this for the chapters).

`make nbval` runs two chapters side by side (pytest-xdist), each in a kernel of its
own. A kernel can die before it answers its first request when two start at once:
jupyter_client picks free TCP ports in one process and the kernel binds them in
another, so two kernels starting together can pick the same port. One such death (CI,
2026-12-05) failed every cell of a chapter at setup, before any of its code had run. A
kernel that dies at startup has computed nothing, so starting it again cannot hide a
difference in a chapter's outputs; a kernel that dies later is not started again.
"""

import warnings

import nbval.kernel

ATTEMPTS = 3
_start_new_kernel = nbval.kernel.start_new_kernel


def start_new_kernel(*args, **kwargs):
    """nbval's ``start_new_kernel``, again after a kernel that died unanswered."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _start_new_kernel(*args, **kwargs)
        except RuntimeError as error:
            if "died" not in str(error) or attempt == ATTEMPTS:
                raise
            warnings.warn(
                f"the kernel died before it replied ({error}); starting it again "
                f"(attempt {attempt + 1} of {ATTEMPTS})",
                stacklevel=2,
            )


nbval.kernel.start_new_kernel = start_new_kernel
