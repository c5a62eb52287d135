"""Trial statuses: what a trial's record says of how it ended (or that it is still running)."""

from enum import StrEnum


class Status(StrEnum):
    """A trial's status; equal to its text, so records and tables hold plain strings."""

    RUNNING = "running"  # started, not ended (or its driver was killed)
    FINISHED = "finished"  # ran its epochs (or its scheduler's share of them)
    STOPPED = "stopped"  # ended early by the scheduler (ASHA) or by an interrupted sweep
    DIVERGED = "diverged"  # a non-finite loss: stopped at once, left out of the analysis
    ERROR = "error"  # raised; the record's error field says what


FAILED = (Status.ERROR, Status.DIVERGED)  # the statuses a sweep reports as failures
