"""What a run records as it goes: metrics.jsonl, TensorBoard, a progress bar, and a plot at the end.

Every record is {"step", "stage", "time", "<prefix>/<name>": value, ...}: train/... for an update's metrics
(including the memory in use and at its peak, and MFU: the update's model FLOPs over its seconds and the devices'
measured peak), eval/... for an evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _record(line: str) -> dict | None:
    """A metrics.jsonl line, or None for one cut short (a kill -9 in the middle of writing it)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class EventsFile:
    """A TensorBoard event file written in the caller's thread. tensorboardX's SummaryWriter writes from a thread of
    its own: on a full disk that thread dies and the next add_scalar waits forever on its queue; here the fault is
    an OSError at the step that met it."""

    def __init__(self, folder: Path):
        from tensorboardX.event_file_writer import EventsWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.events = EventsWriter(str(folder / "events"))

    def add_scalar(self, tag: str, value: float, step: int, walltime: float | None = None) -> None:
        from tensorboardX.proto import event_pb2
        from tensorboardX.summary import scalar

        self.events.write_event(event_pb2.Event(summary=scalar(tag, value), step=step,
                                                wall_time=time.time() if walltime is None else walltime))

    def flush(self) -> None:
        self.events.flush()

    def close(self) -> None:
        self.events.close()


class Logger:
    """A run's metrics: one JSON line per step in <out>/metrics.jsonl, the same scalars in TensorBoard event files
    under <out>/tensorboard, and a progress bar showing the latest few.

    A run that starts at step start_step > 0 (a resumed run) keeps the lines up to its checkpoint's step and drops
    the rest; TensorBoard's files are written again from the lines kept, so both hold every step exactly once
    whatever stopped the run before (Ctrl-C, kill -9, an error).

    writes=False writes nothing and shows no bar (every process but the first of a multi-process run: one run, one
    set of files); either way the evaluations logged (and those kept) are in .evaluations."""

    def __init__(self, out: Path, total_steps: int, start_step: int, tensorboard: bool = True, progress: bool = True,
                 name: str = "", writes: bool = True):
        self.path = out / "metrics.jsonl"
        self.file = self.writer = self.bar = None
        self.evaluations: list[dict] = []
        self.shown: dict[str, object] = {}
        if not writes:
            return
        kept = []  # a run from step 0 (also one stopped before its first checkpoint) starts the file again
        if start_step > 0 and self.path.exists():  # a resumed run drops what was logged after its checkpoint
            kept = [record for record in map(_record, self.path.read_text().splitlines())
                    if record is not None and record["step"] <= start_step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        self.file = self.path.open("a")
        self.evaluations = [record for record in kept if "eval/success" in record]
        if tensorboard:  # rewritten from the JSONL kept: every step exactly once, whatever stopped the last run
            for stale in (out / "tensorboard").glob("events.out.tfevents.*"):
                stale.unlink()
            self.writer = EventsFile(out / "tensorboard")
            for record in kept:
                for metric, value in record.items():  # not `name`: the bar below is titled with that
                    if "/" in metric:
                        self.writer.add_scalar(metric, value, record["step"], walltime=record["time"])
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True)

    def log(self, step: int, stage: str, metrics: dict, prefix: str = "train") -> None:
        values = {f"{prefix}/{k}": float(v) for k, v in metrics.items()}
        record = {"step": step, "stage": stage, "time": time.time(), **values}
        if "eval/success" in record:
            self.evaluations.append(record)
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()
        for name in ("eval/success", "eval/wm_accuracy_inline", "eval/wm_accuracy", "train/return", "train/reward",
                     "train/loss", "train/wm_loss"):
            if name in values:
                self.shown[name.split("/")[1]] = round(values[name], 3)
        if "train/mfu" in values:
            self.shown["mfu"] = f"{values['train/mfu']:.1%}"
        if "train/peak_memory_gib" in values:
            self.shown["memory"] = f"{values['train/peak_memory_gib']:.1f}G"
        if self.bar is not None:
            self.bar.set_postfix(self.shown, refresh=True)

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def write(self, text: str):
        (self.bar.write if self.bar is not None else print)(text)

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


# curves.png's panels: (title, y label, metrics). PaW's world-model loss (a clipped MAE or a cross-entropy per
# observation token) is on another scale than the return, so it has a panel of its own.
PANELS = [("task success (held out)", "success rate", ["eval/success"]),
          ("world-model accuracy (held out)", "accuracy",
           ["eval/wm_accuracy", "eval/wm_accuracy_direct", "eval/wm_accuracy_inline"]),
          ("training signal", "mean return (RL) / reward (RWML)", ["train/return", "train/reward"]),
          ("PaW's world-model loss", "loss per observation token", ["train/wm_loss"])]


def curves_figure(records: list[dict]):
    """A matplotlib Figure of PANELS against the step, from metrics.jsonl's records; a panel whose metrics the run
    did not record says so."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend is left alone, nothing opens a window

    figure = Figure(figsize=(12, 7), layout="tight")
    for axis, (title, ylabel, names) in zip(figure.subplots(2, 2).flat, PANELS):
        for name in names:
            points = [(r["step"], r[name]) for r in records if name in r]
            if points:
                axis.plot(*zip(*points), marker="o" if name.startswith("eval") else None, label=name.split("/")[1])
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        if axis.lines:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "not recorded by this method", ha="center", va="center", transform=axis.transAxes)
    return figure


def plot_curves(metrics_file: Path, path: Path) -> Path:
    """curves_figure of a run's metrics.jsonl, saved as a PNG."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    curves_figure(records).savefig(path, dpi=110)
    return path
