"""Keeps ``import pyhappy`` quiet on stderr when Triton is not installed.

Registering an op with ``torch.library.triton_op`` makes torch look for Triton kernels inside the
op's body; without Triton, torch logs "Triton not available, find_triton_kernels = []" (logger
``torch._library.triton``) once per op. That is expected here (the Triton backends are optional and
``python -m pyhappy.info`` reports them), so pyhappy's own import filters exactly that record, and
only while it runs: ``install()`` before the op registrations, ``remove()`` after them.
"""

import logging

_LOGGER = "torch._library.triton"


class _NoTritonProbe(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Triton not available")


_FILTER = _NoTritonProbe()


def install() -> None:
    logging.getLogger(_LOGGER).addFilter(_FILTER)


def remove() -> None:
    logging.getLogger(_LOGGER).removeFilter(_FILTER)
