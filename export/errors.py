"""Errors an export raises. Each names what failed and the numbers behind it; none leaves an output file behind."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export could not produce a verified model (conversion failed, unsupported ops, ...)."""


class UnsupportedOpsError(ExportError):
    """The converted graph needs Flex (SELECT_TF_OPS) or custom ops, which a stock LiteRT runtime cannot run."""

    def __init__(self, message: str, ops: dict[str, int]):
        super().__init__(message)
        self.ops = dict(ops)


class ExportParityError(ExportError):
    """The exported model disagrees with the JAX model beyond the tolerance (or agreement threshold) asked for."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
