"""``netshrink export``: one trial of a search, chosen from its Pareto front, as files that ship.

The folder holds ``model.onnx`` (runs with numpy and onnxruntime alone), the
compressed artifact exactly as the trial logged it (its size is the reported
``size_bytes``), ``recipe.json`` and ``MODEL_CARD.md``. The ONNX model is rebuilt
from the artifact the way the trial rebuilt it, so it computes what the trial
measured; the export checks that on the validation split.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from netshrink.config import TaskConfig
from netshrink.errors import UserError, describe_validation_error
from netshrink.integrity import damage, file_sha256
from netshrink.yaml_file import DuplicateKeyError, read_yaml

from netshrink.deploy.slimmable_export import all_width_files, width_path
from netshrink.techniques.slimmable import find_slimmable

from .front import WIDTH_KEY, TrialPoint, format_metric, knee_point
from .model_card import CardFacts, onnx_snippet, render_card
from .report import collect_points, load_front
from .tracking import ARTIFACT_SHA_TAG, CONFIG_ARTIFACT, PARENT_TAG, RECIPE_FILE, ROLE_TAG, SearchRecord, Tracker, default_tracking_uri, is_local, text_sha256
from .trial import ARTIFACT_FILE, ONNX_FILE

CARD_FILE = "MODEL_CARD.md"
# How far model.onnx's metric on the validation split may be from the figure the trial logged for its own model.onnx.
# Both come from the same artifact through the same export and the same ONNX Runtime, so they agree to the sample;
# the margin is for a kernel that rounds differently on another machine. Beyond it the file is not what was measured.
FAITHFUL_TOLERANCE = 0.005
PICKS = {  # --pick value -> how the card and the CLI say the trial was picked
    "accuracy": "as the most accurate trial on the front",
    "smallest": "as the smallest trial on the front",
    "fastest": "as the fastest trial on the front",
    "knee": "as the knee of the front (the balanced point: objectives min-max normalised over the front, nearest the ideal corner)",
}


@dataclass(frozen=True)
class Chosen:
    """The trial to export and the search it belongs to."""

    point: TrialPoint
    pick: str  # how it was picked, in words
    search: SearchRecord
    infeasible: str = ""  # picked by run id though it misses the search's constraints: which, in words
    siblings: tuple[TrialPoint, ...] = ()  # a slimmable trial: the points of all its widths (the picked one among them)

    @property
    def search_run_id(self) -> str:
        return self.search.run_id

    @property
    def baseline(self) -> dict[str, float]:
        return self.search.baseline


@dataclass(frozen=True)
class Export:
    """What ``export_model`` wrote, and where."""

    folder: Path
    chosen: Chosen
    files: dict[str, int]  # file name -> bytes on disk
    onnx_accuracy: float
    registered_version: str | None
    forced: str = ""  # with --force: why export would have refused, in words
    snippet: str = ""  # how to run model.onnx with onnxruntime alone: its inputs by name and dtype (as the card shows it)


def pick_from_front(front: list[TrialPoint], pick: str, objectives: list[str]) -> TrialPoint:
    """``accuracy``, ``smallest``, ``fastest`` or ``knee``; ties go to the more accurate point."""
    if pick == "accuracy":
        return min(front, key=lambda p: (-p.accuracy, p.size_bytes, p.latency_ms))
    if pick == "smallest":
        return min(front, key=lambda p: (p.size_bytes, -p.accuracy))
    if pick == "fastest":
        return min(front, key=lambda p: (p.latency_ms, -p.accuracy))
    return knee_point(front, objectives)


def choose_trial(tracker: Tracker, experiment: str, pick: str, min_accuracy: float | None, search_run: str | None) -> Chosen:
    if pick in PICKS:
        return _choose_on_front(tracker, experiment, pick, min_accuracy, search_run)
    return _choose_run(tracker, experiment, pick, min_accuracy, search_run)


def _choose_on_front(tracker: Tracker, experiment: str, pick: str, min_accuracy: float | None, search_run: str | None) -> Chosen:
    loaded = load_front(experiment, tracker.uri, search_run)
    if not loaded.front:
        closest = "; ".join(
            f"{p.run_id[:8]} ({p.name}: {', '.join(loaded.search.constraints.misses(p.metrics()))})" for p in loaded.closest[:3]
        ) if loaded.closest and loaded.search.constraints else ""
        hint = f" The closest: {closest}. Export one of them anyway with --pick RUN_ID (or a unique prefix); the card says it is infeasible." if closest else ""
        raise UserError(f"search {loaded.parent_run_id} of {experiment!r}: no trial meets the search's constraints, so the front is empty.{hint}")
    candidates = [p for p in loaded.front if min_accuracy is None or p.accuracy >= min_accuracy]
    if not candidates:
        best = max(p.accuracy for p in loaded.front)
        raise UserError(f"--min-accuracy {min_accuracy}: no trial on the front of search {loaded.parent_run_id} reaches it (the best has {best:.4f})")
    point = pick_from_front(candidates, pick, loaded.search.objectives)
    siblings = tuple(p for p in loaded.points if p.run_id == point.run_id and WIDTH_KEY in p.extra)
    return Chosen(point=point, pick=PICKS[pick], search=loaded.search, siblings=siblings)


def _choose_run(tracker: Tracker, experiment: str, run_id: str, min_accuracy: float | None, search_run: str | None) -> Chosen:
    """A trial named by its run id: any finished trial of the experiment, on the front or not."""
    experiment_id = tracker.experiment_id(experiment, create=False)
    if experiment_id is None:
        raise UserError(f"--experiment: no MLflow experiment named {experiment!r} at {tracker.uri}")
    run_id, _, width_text = run_id.partition("@")  # trial@0.5: a width of a slimmable trial
    run = tracker.find_run(run_id) or _run_by_prefix(tracker, experiment_id, run_id)
    if run is None:
        raise UserError(f"--pick: {run_id!r} is none of {', '.join(PICKS)}, and no MLflow run has that id (or starts with it) at {tracker.uri}")
    run_id = run.info.run_id
    if run.info.experiment_id != experiment_id or run.data.tags.get(ROLE_TAG) != "trial":
        raise UserError(f"--pick: run {run_id} is not a trial of experiment {experiment!r}")
    parent_id = run.data.tags[PARENT_TAG]
    if search_run and search_run != parent_id:
        raise UserError(f"--search: trial {run_id} belongs to search {parent_id}, not {search_run}")
    search = tracker.search_record(parent_id)
    measured = collect_points(tracker, experiment_id, parent_id, search.metric, include_stopped=True)[0]  # stopped early: measured as it stood
    points = sorted((p for p in measured if p.run_id == run_id), key=lambda p: p.extra.get(WIDTH_KEY, 1.0))
    if not points:
        raise UserError(f"--pick: trial {run_id} did not finish (status {run.info.status}); only finished trials can be exported")
    point = points[-1]  # a slimmable trial named by its run id alone: its widest width (model.onnx)
    if width_text:
        widths = [p.extra[WIDTH_KEY] for p in points if WIDTH_KEY in p.extra]
        try:
            point = next(p for p in points if p.extra.get(WIDTH_KEY) == float(width_text))
        except (ValueError, StopIteration):
            which = f"its widths are {', '.join(f'{w:g}' for w in widths)}" if widths else "it is no slimmable trial (no widths)"
            raise UserError(f"--pick: trial {run_id} has no width {width_text!r}: {which}") from None
    if min_accuracy is not None and point.accuracy < min_accuracy:
        raise UserError(f"--min-accuracy {min_accuracy}: trial {run_id} has accuracy {point.accuracy:.4f}, below it")
    misses = search.constraints.misses(point.metrics()) if search.constraints is not None else []
    infeasible = f"it misses the search's constraints: {'; '.join(misses)}" if misses else ""
    return Chosen(
        point=point, pick="by its MLflow run id" + (" (INFEASIBLE)" if misses else ""), search=search, infeasible=infeasible,
        siblings=tuple(p for p in points if WIDTH_KEY in p.extra),
    )


def _run_by_prefix(tracker: Tracker, experiment_id: str, prefix: str):
    """The trial run of the experiment whose id starts with ``prefix`` (at least 4 hex digits); ``UserError`` if several do."""
    if len(prefix) < 4 or any(c not in "0123456789abcdef" for c in prefix):
        return None
    matches = [run for run in tracker.trial_runs(experiment_id) if run.info.run_id.startswith(prefix)]
    if len(matches) > 1:
        names = ", ".join(f"{run.info.run_id} ({run.info.run_name})" for run in matches[:5])
        raise UserError(f"--pick: {prefix!r} starts {len(matches)} trial run ids ({names}); give more of the id")
    return matches[0] if matches else None


def task_of_search(tracker: Tracker, search: SearchRecord, config: Path | None = None, trust_logged_code: bool = False) -> tuple[TaskConfig, str]:
    """The search's task, and the folder its ``module:factory`` references import from.

    Rebuilding the task runs the code its experiment file names. The file logged
    to MLflow is used only when the store is a local file (as trusted as the disk
    it is on) or the user says they trust it (``trust_logged_code``): whoever can
    write to a shared tracking server could otherwise make the exporter run code.
    Else the local ``config`` is used, and only if it is the very file the search
    ran (its SHA-256 is logged); its folder is where the factories import from.
    """
    search_run_id = search.run_id
    logged_hash = search.config_sha256
    if config is not None:
        if not config.is_file():
            raise UserError(f"--config: experiment file {str(config)!r} not found")
        text = config.read_text()
        expected = logged_hash or text_sha256(_logged_config(tracker, search_run_id))
        if text_sha256(text) != expected:
            raise UserError(
                f"--config: {config} is not the experiment file search {search_run_id} ran (its SHA-256 differs from the logged "
                f"one, {expected[:12]}...); give the file as it was when the search started"
            )
        search_path = os.fspath(config.resolve().parent)
    elif is_local(tracker.uri) or trust_logged_code:
        text = _logged_config(tracker, search_run_id)
        config_file = search.config_file
        # searches from before the absolute path was logged logged it as given: resolved against the current directory
        search_path = os.fspath(Path(config_file).resolve().parent) if config_file else os.getcwd()
    else:
        raise UserError(
            f"search {search_run_id} is on the tracking server {tracker.uri}: export rebuilds the model by running the code its "
            f"experiment file names, and will not take that file from a server others can write to. Pass --config FILE, your "
            "copy of the experiment file the search ran (checked against the logged SHA-256), or --trust-logged-code if you trust the server"
        )
    try:
        raw = read_yaml(text) or {}
    except (yaml.YAMLError, DuplicateKeyError) as error:
        raise UserError(f"search {search_run_id}: its experiment file is not valid YAML: {error}") from None
    try:
        task = TaskConfig.model_validate(raw.get("task") or {})
    except ValidationError as error:
        raise UserError(describe_validation_error(error, "task"), title=f"search {search_run_id}: its experiment.yaml no longer validates") from None
    return task, search_path


def _logged_config(tracker: Tracker, search_run_id: str) -> str:
    try:
        return tracker.read_text(search_run_id, CONFIG_ARTIFACT)
    except Exception as error:
        raise UserError(f"search {search_run_id}: cannot read its {CONFIG_ARTIFACT} artifact ({type(error).__name__}: {error})") from None


def check_out_folder(out: Path) -> None:
    """Export never overwrites: ``--out`` must be a new folder or an empty one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file; give a folder to create")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out: folder {out} exists and is not empty; give a new or empty folder (export never overwrites files)")


def export_model(
    experiment: str,
    pick: str,
    out: str | os.PathLike,
    *,
    min_accuracy: float | None = None,
    register: str | None = None,
    tracking_uri: str | None = None,
    search_run: str | None = None,
    config: Path | None = None,
    trust_logged_code: bool = False,
    force: bool = False,
) -> Export:
    """Choose a trial, write its files into ``out`` (all or nothing), and optionally register the ONNX model.

    ``pick`` is ``accuracy``, ``smallest``, ``fastest`` or ``knee`` (see
    ``knee_point``), chosen among the front of ``search_run`` (default: the
    latest search) restricted to accuracy >= ``min_accuracy``; or the MLflow run
    id of any finished trial of the experiment. ``config`` and
    ``trust_logged_code``: where the task's code comes from (``task_of_search``).

    The downloaded artifact must have the SHA-256 the trial logged, and model.onnx must score on the
    validation split what the trial logged for it, within ``FAITHFUL_TOLERANCE``: else ``UserError``
    and nothing is written, or with ``force`` the files are written and the card says what differs.
    """
    out = Path(out)
    check_out_folder(out)
    if min_accuracy is not None and not 0 <= min_accuracy <= 1:
        raise UserError(f"--min-accuracy: must be a fraction in [0, 1] (0.95 for 95%), got {min_accuracy}")
    tracker = Tracker(tracking_uri or default_tracking_uri())
    chosen = choose_trial(tracker, experiment, pick, min_accuracy, search_run)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        written = write_files(tracker, experiment, chosen, staging, config, trust_logged_code, force)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    version = register_model(tracker.uri, register, chosen, out, written.sha256) if register else None
    return Export(
        folder=out, chosen=chosen, files=written.files, onnx_accuracy=written.onnx_accuracy, registered_version=version,
        snippet=written.snippet, forced=written.forced,
    )


@dataclass(frozen=True)
class Written:
    """What ``write_files`` put in the folder."""

    files: dict[str, int]  # file name -> bytes
    sha256: dict[str, str]  # file name -> SHA-256, as written (and stated in the card)
    onnx_accuracy: float  # model.onnx's metric on the validation split
    snippet: str  # the card's snippet that runs model.onnx
    forced: str  # with --force: what the faithfulness check found


def write_files(
    tracker: Tracker, experiment: str, chosen: Chosen, folder: Path, config: Path | None = None, trust_logged_code: bool = False,
    force: bool = False,
) -> Written:
    """Artifact and recipe as the trial logged them (the artifact checked against its logged SHA-256); the ONNX model
    rebuilt from the artifact and checked against the logged metric; the card."""
    from netshrink.deploy.measure import onnx_evaluate
    from netshrink.deploy.onnx_export import deployment_config, export_artifact
    from netshrink.tasks.task import load_task
    from netshrink.techniques import has_exits, load_artifact

    run_id = chosen.point.run_id
    for name in (ARTIFACT_FILE, RECIPE_FILE):
        try:
            tracker.client.download_artifacts(run_id, name, os.fspath(folder))
        except Exception as error:  # the artifact store may be remote, or the file gone
            raise UserError(f"trial {run_id}: cannot download its {name} ({type(error).__name__}: {error})") from None
    run = tracker.client.get_run(run_id)
    stored = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_FILE}"  # where the file lies, for the messages
    redo = "Export another trial (--pick), or run the search again to measure a sound one"
    if ARTIFACT_SHA_TAG in run.data.tags:  # searches of netshrink 0.x before integrity checks logged none
        problem = damage(folder / ARTIFACT_FILE, run.data.tags[ARTIFACT_SHA_TAG])
        if problem:
            raise UserError(f"trial {run_id}'s artifact {stored}: {problem}; nothing was written. {redo}")
    task_config, search_path = task_of_search(tracker, chosen.search, config, trust_logged_code)
    try:
        task = load_task(task_config, search_path)
        fresh = task.build_model()
    except Exception as error:  # user code, or a module that no longer imports from where it was
        raise UserError(
            f"task: cannot rebuild the model of search {chosen.search_run_id} ({type(error).__name__}: {error}); "
            f"'module:factory' references import from {search_path}, the experiment file's folder: the code must still be there"
        ) from None
    try:
        loaded = load_artifact(folder / ARTIFACT_FILE, fresh)
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"task.model: {task_config.model!r} as it is now does not fit trial {run_id}'s artifact: {error}") from None
    except Exception as error:  # safetensors' own error for a file it cannot parse
        raise UserError(f"trial {run_id}'s artifact {stored} cannot be read ({type(error).__name__}: {error}). {redo}") from None
    model = loaded.model
    example = task.example()
    # the path the trial took to the ONNX it measured
    export_artifact(loaded, example, folder / ONNX_FILE, task.calibration(), task.dynamic_axes())
    slimmable = find_slimmable(model)
    width = chosen.point.extra.get(WIDTH_KEY)
    onnx_file = width_path(folder / ONNX_FILE, width) if width is not None else folder / ONNX_FILE  # the picked width's own graph
    onnx_accuracy = onnx_evaluate(onnx_file, task.data.val, task.batches, task.metric).value
    forced = unfaithful(chosen.point, onnx_accuracy, onnx_file.name)
    if forced and not force:
        raise UserError(f"trial {run_id}: {forced}; nothing was written. {redo}, or pass --force to write it anyway (the card then says so)")
    graphs = [ONNX_FILE] if slimmable is None else [file.name for file in all_width_files(folder / ONNX_FILE, slimmable.widths)]
    files = {name: os.path.getsize(folder / name) for name in (*graphs, ARTIFACT_FILE, RECIPE_FILE)}
    widths = ()
    if slimmable is not None:  # every width's figures, as the search measured them
        siblings = {p.extra[WIDTH_KEY]: p for p in chosen.siblings}
        widths = tuple(
            (w, width_path(folder / ONNX_FILE, w).name, siblings[w].metrics()) for w in slimmable.widths if w in siblings
        )
    exits = has_exits(model)
    from netshrink.deploy.sizes import size_note
    from netshrink.techniques.inputs import input_names, tensors

    facts = CardFacts(
        experiment=experiment,
        search_run_id=chosen.search_run_id,
        point=chosen.point,
        pick=chosen.pick,
        baseline=chosen.baseline,
        onnx_accuracy=onnx_accuracy,
        files=files,
        task=task_config,
        search_path=search_path,
        inputs=tuple((name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)) for name, tensor in zip(input_names(example), tensors(example))),
        metric=task.metric.name,
        exit_cuts=tuple(model.cut_names) if exits else (),
        exit_threshold=model.threshold if exits else None,
        session_config=deployment_config(onnx_file),
        sha256={name: file_sha256(folder / name) for name in files},
        forced=forced,
        infeasible=chosen.infeasible,
        size_note=size_note(loaded.encodings, files[ARTIFACT_FILE], sum(files[name] for name in graphs)),
        widths=widths,
        onnx_file=onnx_file.name,
    )
    (folder / CARD_FILE).write_text(render_card(facts))
    return Written(files=files, sha256=facts.sha256, onnx_accuracy=onnx_accuracy, snippet=onnx_snippet(facts), forced=forced)


def unfaithful(point: TrialPoint, onnx_value: float, onnx_file: str = ONNX_FILE) -> str:
    """Why model.onnx is not the model the trial measured, in words, when its metric on the validation split (``onnx_value``)
    is further than ``FAITHFUL_TOLERANCE`` (relative, for metrics beyond 1) from the one the trial logged for its own
    model.onnx (``onnx_<metric>``; its torch figure for a search that logged none); "" when it is within."""
    name = point.metric_name
    key = f"onnx_{name}" if f"onnx_{name}" in point.extra else name
    logged = point.extra.get(key, point.accuracy)
    if abs(onnx_value - logged) <= FAITHFUL_TOLERANCE * max(1.0, abs(logged)):
        return ""
    return (
        f"{onnx_file} scores {name} {format_metric(name, onnx_value)} on the validation split, but the trial logged "
        f"{format_metric(name, logged)} ({key}): more than {FAITHFUL_TOLERANCE:g} apart, so it is not the model the search measured"
    )


def register_model(tracking_uri: str, name: str, chosen: Chosen, folder: Path, sha256: dict[str, str] | None = None) -> str:
    """A new version of registered model ``name``: the ONNX model in MLflow's format, with the other files, each
    checked against the SHA-256 export wrote it with (``sha256``) before it is read.

    It is logged as an MLflow model of the trial's run, so the version links to
    the run and its metrics; the headline figures are also the version's tags.
    Returns the version number.
    """
    import mlflow
    import mlflow.onnx
    import onnx

    for file, digest in (sha256 or {}).items():
        problem = damage(folder / file, digest)
        if problem:
            raise UserError(f"--register {name!r}: {folder / file}: {problem}; nothing was registered. Export again into a new folder")
    point = chosen.point
    metric = point.metric_name
    tags = {
        metric: point.accuracy,
        "size_bytes": int(point.size_bytes),
        "latency_ms": point.latency_ms,
        **{key: point.extra[key] for key in (f"test_{metric}", f"onnx_{metric}", "size_ratio", "speedup") if key in point.extra},
        "recipe_summary": point.summary,
        "netshrink.search_run_id": chosen.search_run_id,
    }
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)  # log_model has no client argument
    try:
        info = mlflow.onnx.log_model(
            onnx.load(os.fspath(folder / ONNX_FILE)),
            name=name,
            run_id=point.run_id,
            registered_model_name=name,
            tags={key: str(value) for key, value in tags.items()},
            extra_files=[os.fspath(folder / file) for file in (ARTIFACT_FILE, RECIPE_FILE, CARD_FILE)],
            save_as_external_data=False,
            pip_requirements=["numpy", "onnxruntime"],
        )
    except mlflow.exceptions.MlflowException as error:
        raise UserError(f"--register {name!r}: MLflow refused it: {error.message}") from None
    finally:
        mlflow.set_tracking_uri(previous)
    version = str(info.registered_model_version)
    mlflow.MlflowClient(tracking_uri).update_model_version(name, version, description=(folder / CARD_FILE).read_text())
    return version
