"""The last line a job logs: how its run stands, where it is, and how to look at it.

Read from the run folder's summary.json, so it says the same for a run trained now, one found already
finished, and one that mode=evaluate or mode=summary worked on:

    (one line) run finished: test error 3.20% at epoch 4 of 8 (the best epoch, which the final evaluation used);
    run folder outputs/2026-01-01/12-00-00; look at it with `tulip-report outputs/2026-01-01/12-00-00`;
    W&B logged offline: upload with `wandb sync outputs/2026-01-01/12-00-00/wandb/offline-run-*`
"""
from tulip.runs import metric_keys
from tulip.runs.folder import RunFolder, RunFolderError
from tulip.runs.status import STATUS, Status

# What each mode did to the run, as the line's first words.
DONE = {"train": "run", "evaluate": "re-evaluated run", "summary": "summarized run"}


def counted(n: int, noun: str) -> str:
    """`1 job`, `2 jobs`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _outcome(summary: dict) -> str:
    status = summary.get(STATUS, "without a status")
    if summary.get(metric_keys.BEST_TEST_ERROR) is not None and status == Status.FINISHED:
        chosen_on = summary.get(metric_keys.SELECTION, "test")  # runs from before the validation split: test
        return (f"{status}: test error {summary[metric_keys.BEST_TEST_ERROR]:.2f}% at epoch "
                f"{summary.get(metric_keys.BEST_EPOCH)} of {summary.get(metric_keys.EPOCH)} "
                f"(the best epoch on the {'validation' if chosen_on == 'val' else 'test'} set, which the "
                f"final evaluation used)")
    if "error" in summary:
        return f"{status} at epoch {summary.get(metric_keys.EPOCH)}: {summary['error']}"
    return str(status)


def result_line(mode: str, folder: RunFolder) -> str:
    """One line: `<what> <status>: test error and selected epoch; run folder; how to look at it`."""
    try:
        outcome = _outcome(folder.read_summary()) if folder.summary_file.exists() else "without a summary.json"
    except RunFolderError as error:
        outcome = f"with an unreadable summary.json ({error})"
    line = (f"{DONE.get(mode, mode)} {outcome}; run folder {folder.path}; "
            f"look at it with `tulip-report {folder.path}`")
    if any(folder.wandb_dir.glob("offline-run-*")):
        line += f"; W&B logged offline: upload with `wandb sync {folder.wandb_dir}/offline-run-*`"
    return line
