"""How a run ended: the `status` of its summary.json, written by training and read by the modes, the
sweeper, the end-of-sweep table and the report.

A `Status` is a str, so it goes into JSON as its value and compares equal to what summary.json holds.
"""
from enum import StrEnum

STATUS = "status"  # the summary.json key


class Status(StrEnum):
    FINISHED = "finished"  # trained all its epochs and ran the final evaluation
    FAILED = "failed"  # an exception ended it (or it could not start); summary.json's `error` says which
    DIVERGED = "diverged"  # the loss became NaN/Inf: its metrics are NaN, a sweep goes on

# What the readers (tulip-report, the end-of-sweep table) list as the status of a run folder whose
# summary.json is missing or cannot be read: never written to a summary.
UNREADABLE = "unreadable"
# Every status a reader lists, in the order of the report's columns.
READ_STATUSES = (*(status.value for status in Status), UNREADABLE)
