"""Validation that runs the user's code: build the task once, before anything trains, and report every problem at once.

The experiment file's keys and rules are checked by ``netshrink.config`` (no user code); this
module imports the ``module:factory`` references, builds the splits and the model, loads
``task.weights``, runs one batch of real validation samples through the model, the loss and
the metric, exports the model to ONNX once and probes the space on it. Seconds for the built-in
task; every problem found is named with its field and the rule.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from netshrink.config import Experiment
from netshrink.config import load_experiment as read_experiment
from netshrink.errors import UserError

Log = Callable[..., None]  # called as log(text) and log(text, end=""), as print and rich's Console.print are
STILL_RUNNING_FIRST_S = 10.0  # a phase of the built-in task takes about a second; past 10 s the user hears of it
STILL_RUNNING_EVERY_S = 30.0


def load_experiment(path: str | Path, log: Log | None = None) -> Experiment:
    """Read and validate an experiment file, then build its task once (``check_task``); ``log``, where given,
    hears what runs (``Progress``)."""
    experiment = read_experiment(path)
    if log is not None:
        log(f"Checking {path} by building its task once:")
    check_task(experiment, search_path=str(Path(path).resolve().parent), log=log)
    return experiment


class Progress:
    """Says what validation runs as each phase starts, and its time when it ends, on one line per phase.

    Validation runs the user's code, which can hang (a dataset download, a lock, a loop): a phase
    still running after ``STILL_RUNNING_FIRST_S`` says so, and a Ctrl-C is re-raised as a
    ``KeyboardInterrupt`` that names the phase and its time (the CLI prints it). With no ``log``
    nothing is printed and no thread starts.
    """

    def __init__(self, log: Log | None) -> None:
        self.log = log
        self.line_open = False  # the current phase's line waits for its end

    @contextmanager
    def phase(self, name: str, detail: str = "", problems: list[str] | None = None) -> Iterator[None]:
        """Run the body as the phase ``name`` ("building the model"); it failed where it raised or added to ``problems``."""
        start, found = time.monotonic(), len(problems or [])
        stop = threading.Event()
        watcher = threading.Thread(target=self._say_still_running, args=(name, start, stop), daemon=True)
        try:
            try:  # a Ctrl-C right after the phase's line is printed is this phase's too
                if self.log is not None:
                    self.log(f"  {name}{f' ({detail})' if detail else ''} ...", end="")
                    self.line_open = True
                    watcher.start()
                yield
            finally:
                stop.set()  # a thread still starting sees it at once
                if watcher.is_alive():
                    watcher.join()  # the notice thread never outlives its phase
        except KeyboardInterrupt as error:
            self._end(name, "")
            raise KeyboardInterrupt(f"while {name}, after {time.monotonic() - start:.1f} s") from error
        except Exception:
            self._end(name, f"failed after {time.monotonic() - start:.1f} s")
            raise
        failed = len(problems or []) > found
        self._end(name, f"{'failed after' if failed else 'done in'} {time.monotonic() - start:.1f} s")

    def _say_still_running(self, name: str, start: float, stop: threading.Event) -> None:
        wait = STILL_RUNNING_FIRST_S
        while not stop.wait(wait):
            self._break_line()
            self.log(f"  still {name} after {time.monotonic() - start:.0f} s ...")
            wait = STILL_RUNNING_EVERY_S

    def _break_line(self) -> None:
        if self.line_open:
            self.log("")
            self.line_open = False

    def _end(self, name: str, outcome: str) -> None:
        if self.log is None:
            return
        if self.line_open:
            self.log(f" {outcome}" if outcome else "")
        elif outcome:
            self.log(f"  {name}: {outcome}")
        self.line_open = False


def check_task(experiment: Experiment, search_path: str, log: Log | None = None) -> None:
    """Build the task once: data, model (with ``task.weights``), one batch through the model, the loss and the metric,
    one ONNX export, the space probed on the model. ``UserError`` listing every problem found, each naming its field.

    Cheap next to a search (seconds), and it turns a typo, a model that does not fit
    the data or one that ONNX cannot carry into a clear message before Ray starts
    and before the baseline trains. ``log`` hears each phase as it starts and ends (``Progress``).
    """
    from netshrink.tasks.task import TaskError, load_task
    from netshrink.techniques.inputs import call, describe, logits_of

    config = experiment.task
    progress = Progress(log)
    problems: list[str] = []
    try:
        with progress.phase("building the dataset", config.dataset):
            task = load_task(config, search_path)
    except TaskError as error:
        raise UserError([str(error)], title="invalid experiment file") from None
    for section, settings in (("task.train", config.train), ("finetune", experiment.finetune)):
        if settings.precision != "fp32" and not torch.cuda.is_available():
            problems.append(
                f"{section}.precision: {settings.precision} is mixed precision on CUDA, and torch {torch.__version__} sees no CUDA device here; "
                "netshrink trains in fp32 only on the CPU"
            )
    from netshrink.tasks import BUILTIN_MODELS, resolve_factory

    with progress.phase("building the model", config.model + (f", weights {config.weights}" if config.weights else ""), problems):
        try:
            resolve_factory(config.model, BUILTIN_MODELS, search_path)
        except ValueError as error:
            raise UserError(problems + [f"task.model: {error}"], title="invalid experiment file") from None
        try:
            model = task.build_model()
        except Exception as error:
            raise UserError(problems + [f"task.model: building model {config.model!r} failed: {type(error).__name__}: {error}"], title="invalid experiment file") from None
        if config.weights:
            try:
                from netshrink.tasks import load_weights

                load_weights(model, task.weights_file())
            except ValueError as error:
                problems.append(f"task.weights: {error}")
    data = task.data
    if len(data.val) < 3:  # type: ignore[arg-type]
        raise UserError(problems + ["task.dataset: the validation split needs at least 3 samples"], title="invalid experiment file")
    logits = None
    with progress.phase("running one batch through the model, the loss and the metric", problems=problems):
        try:
            example, (check_inputs, check_targets) = task.example(), task.batches.collated(data.val, [1, 2])
        except (RuntimeError, TypeError, ValueError) as error:  # torch's default collate on samples of different shapes
            field = "task.collate" if config.collate else "task.dataset"
            hint = "" if config.collate else "; samples of different lengths need a collate function that pads them (task.collate)"
            raise UserError(problems + [f"{field}: two validation samples cannot be batched: {type(error).__name__}: {str(error)[:300]}{hint}"],
                            title="invalid experiment file") from None
        try:
            with torch.no_grad():
                outputs = call(model.eval(), check_inputs)
        except Exception as error:
            problems.append(
                f"task.model: model {config.model!r} does not run on a batch of {config.dataset!r} ({describe(check_inputs)}): {type(error).__name__}: {error}"
            )
        else:
            try:
                logits = logits_of(outputs)
            except TypeError as error:
                problems.append(f"task.model: {error}")
        if logits is not None:
            problems += check_loss_and_metric(task, model, check_inputs, check_targets)
    if logits is not None:
        from netshrink.deploy.onnx_export import check_exportable

        with progress.phase("exporting to ONNX and comparing ONNX Runtime with torch", problems=problems):
            try:
                check_exportable(model, example, check_inputs, task.dynamic_axes())
            except ValueError as error:
                problems.append(f"task.model: model {config.model!r}: {error}")
    if problems:
        raise UserError(problems, title="invalid experiment file")
    with progress.phase("probing the space on the model"):
        check_exit_points(experiment, model)
        check_layer_names(experiment, model)
        check_space_on_model(experiment, model, example)


def check_loss_and_metric(task, model, inputs, targets) -> list[str]:
    """The loss on one training step's worth of samples is a scalar tensor; the metric is a finite number."""
    from netshrink.techniques.inputs import forward_logits

    problems = []
    model.train()
    try:
        loss = task.loss(forward_logits(model, inputs), targets, inputs)
    except Exception as error:
        problems.append(f"task.loss: {task.config.loss!r} failed on a batch: {type(error).__name__}: {error}")
    else:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            what = type(loss).__name__ if not isinstance(loss, torch.Tensor) else f"a tensor of shape {tuple(loss.shape)}"
            problems.append(f"task.loss: {task.config.loss!r} returned {what}; it must return a scalar tensor (reduce the batch, e.g. .mean())")
        elif not loss.requires_grad:
            problems.append(f"task.loss: {task.config.loss!r} returned a tensor that does not depend on the model's outputs (no gradient)")
    model.eval()
    try:
        with torch.no_grad():
            task.metric(forward_logits(model, inputs).float(), targets)
    except (TypeError, ValueError) as error:
        problems.append(f"{error}" if str(error).startswith("task.metric") else f"task.metric: {error}")
    except Exception as error:
        problems.append(f"task.metric: {task.config.metric!r} failed on a batch: {type(error).__name__}: {error}")
    return problems


def check_space_on_model(experiment: Experiment, model, example) -> None:
    """Every technique the space may switch on can act on this model, and pipelines of the space run and export
    (``spaces.probe``): a pipeline that would break the model's shapes fails here, in seconds, not in a trial."""
    from netshrink.spaces.probe import probe

    problems = probe(experiment.space, model, example)
    if problems:
        raise UserError(problems, title=f"the space does not fit model {experiment.task.model!r}")


def check_layer_names(experiment: Experiment, model) -> None:
    """Every layer a per-layer map names (``pruning.layer_ratios``, ``quantization.layer_bits``, ...) is one the technique acts on."""
    from netshrink.spaces.knobs import Fixed
    from netshrink.techniques import REGISTRY
    from netshrink.techniques.base import compressible_weights, is_per_layer_field, module_of

    layers = [module_of(name) for name in compressible_weights(model)]
    problems = []
    for kind, space in experiment.space.techniques().items():
        for field, knob in space.knobs().items():
            if is_per_layer_field(REGISTRY[kind].config_type, field) and isinstance(knob, Fixed) and knob.value:
                unknown = [name for name in knob.value if name not in layers]
                if unknown:
                    problems.append(
                        f"space.{kind}.{field}: {', '.join(map(repr, unknown))} is not a layer of model {experiment.task.model!r} "
                        f"that {kind} acts on; its layers: {', '.join(layers)}"
                    )
    if problems:
        raise UserError(problems, title="invalid experiment file")


def check_exit_points(experiment: Experiment, model) -> None:
    """Every placement the space may give early exits names a cut point of this model."""
    from netshrink.spaces.knobs import Choice, Fixed
    from netshrink.techniques import EarlyExitConfig, exit_points

    space = experiment.space.techniques().get("early_exit")
    if space is None or space.enabled is False:
        return
    try:
        available = exit_points(model)
    except ValueError as error:
        raise UserError(f"space.early_exit: model {experiment.task.model!r}: {error}") from None
    knob = space.after
    placements = [knob.value] if isinstance(knob, Fixed) else list(knob.options) if isinstance(knob, Choice) else []
    for placement in placements:
        names = EarlyExitConfig(after=placement).after
        unknown = [name for name in names if name not in available]
        if unknown:
            raise UserError(
                f"space.early_exit.after: {'+'.join(unknown)!r} is not a cut point of model {experiment.task.model!r}; "
                f"its cut points, in forward order: {', '.join(available)}"
            )


def task_exit_points(experiment: Experiment, search_path: str) -> list[str]:
    """The names ``space.early_exit.after`` may use for this experiment's model."""
    from netshrink.tasks.task import load_task
    from netshrink.techniques import exit_points

    return exit_points(load_task(experiment.task, search_path).build_model())
