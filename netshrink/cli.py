"""The ``netshrink`` command line."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from netshrink.errors import UserError

app = typer.Typer(
    help="Find the best way to compress a neural network: a multi-objective search over "
    "compression pipelines (pruning, quantization, ...), run on Ray Tune, steered by Optuna, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (CI logs, `| tee`) gets a wide console so the front table does not fold.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


@app.command()
def search(
    config: Path = typer.Argument(..., help="Experiment YAML file (see spaces/digits.yaml for a commented example)."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Number of trials; overrides search.trials."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="Trials run at once; overrides search.max_concurrent."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join, e.g. 'auto' or 'ray://head:10001'. Default: start a local Ray."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI; overrides tracking_uri. Default: sqlite mlflow.db here."),
    resume: Optional[str] = typer.Option(
        None,
        "--resume",
        metavar="[RUN_ID]",
        help="Continue an interrupted search of this experiment (Ctrl-C, a killed driver, a lost server) in the same MLflow run and Optuna "
        "study: finished trials are kept, interrupted ones run again first, until the budget is done. Without RUN_ID the latest "
        "unfinished search; with it, that search (its parent run id). The experiment file must be unchanged.",
    ),
    abandon: Optional[str] = typer.Option(
        None,
        "--abandon",
        metavar="RUN_ID",
        help="Mark the unfinished search RUN_ID as ended (KILLED) instead of running one, so that --resume passes it by. "
        "Its finished trials stay in MLflow for front and export.",
    ),
) -> None:
    """Run a compression search and print the Pareto front of the task's metric, size and latency.

    The baseline model is trained once per task and cached in .netshrink/. Every
    trial samples a pipeline, applies it to the baseline, fine-tunes, and
    measures the validation metric (accuracy by default), the compressed file's size and ONNX Runtime
    latency. All of it goes to MLflow: a parent run per search, a child per trial.
    """
    from netshrink.validation import load_experiment

    experiment = load_experiment(config, log=partial(console.print, markup=False))
    from netshrink.search.runner import Overrides, run_search

    overrides = Overrides(trials=trials, concurrency=concurrency, address=address, tracking_uri=tracking_uri)
    if abandon is not None:
        from netshrink.search.runner import abandon_search

        abandon_search(experiment, config, abandon, overrides, console=console)
        return
    result = run_search(experiment, config, overrides, console=console, resume=resume)
    if not result.points and not result.closest:
        raise typer.Exit(code=1)  # every trial failed: nothing to show, and scripts should notice


@app.command()
def validate(config: Path = typer.Argument(..., help="Experiment YAML file.")) -> None:
    """Check an experiment file, reporting every problem at once; trains nothing, starts no Ray, logs nothing.

    Beyond the keys and their rules, it builds the task once: it imports your
    'module:factory' code and runs the dataset and model factories (your code
    runs, as it will in the search), passes one batch through the model, and
    exports the untrained model to ONNX once to check that ONNX Runtime computes
    what torch does. A few seconds for the built-in task.
    """

    from netshrink.validation import load_experiment

    experiment = load_experiment(config, log=partial(console.print, markup=False))
    for note in experiment.notes():
        console.print(f"[yellow]note: {note}[/yellow]")
    names = experiment.space.searched_names()
    console.print(f"{config}: valid. Searched knobs ({len(names)}): {', '.join(names) or 'none'}")
    if "early_exit" in experiment.space.techniques():
        from netshrink.validation import task_exit_points

        points = task_exit_points(experiment, str(config.resolve().parent))
        console.print(f"Cut points for early_exit.after, in forward order: {', '.join(points)}")


@app.command()
def schema(
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the schema to this file instead of printing it."),
) -> None:
    """Print the experiment file's JSON Schema, for editors that validate and complete YAML.

    With the YAML extension of VS Code (or any editor using yaml-language-server),
    a first line '# yaml-language-server: $schema=experiment.schema.json' in your
    experiment file points the editor at a schema saved beside it:

        netshrink schema -o experiment.schema.json

    The presets in spaces/ carry that line, and the schema beside them. The schema
    checks keys, types, bounds and the forms of each knob; 'netshrink validate'
    checks the rest (your factories, the model, the ONNX export).
    """
    import json

    from netshrink.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text)
        except OSError as error:
            raise UserError(f"--output {output}: cannot write it ({error.strerror or error}); name a file in a folder that exists") from None
        console.print(f"Schema written to {output}", markup=False, highlight=False)


@app.command()
def front(
    experiment: str = typer.Option(..., "--experiment", "-e", help="MLflow experiment name (the 'name' in the experiment file)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI. Default: sqlite mlflow.db here."),
    search_run: Optional[str] = typer.Option(None, "--search", help="Parent run id of one search. Default: the latest search."),
    as_json: bool = typer.Option(False, "--json", help="Print the front as JSON (run_id, the metric under its name, size_bytes, latency_ms, recipe, ...)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the front into this folder (created): pareto.png, pareto.html (hover for details), hypervolume.png."),
) -> None:
    """Print the Pareto front of a finished (or running) search, read back from MLflow."""
    from netshrink.search.report import load_front

    result = load_front(experiment, tracking_uri, search_run)
    from netshrink.search.front import front_json, print_front

    constraints = result.search.constraints
    if as_json:
        if result.front or not result.closest:
            print(front_json(result.front, result.baseline))
        else:  # no trial meets the constraints: the closest, each marked infeasible with what it misses
            print(front_json(result.closest, result.baseline, misses={p.run_id: constraints.misses(p.metrics()) for p in result.closest}))
    else:
        print_front(
            result.front, result.baseline, title=f"Pareto front of {experiment!r} (search {result.parent_run_id})", console=console,
            closest=result.closest, constraints=constraints,
        )
    if plot is not None:
        from netshrink.search.plots import write_search_plots

        history = write_search_plots(plot, result)
        # on stderr under --json, so that stdout stays one JSON document
        (errors if as_json else console).print(f"Plots in {plot}/ (hypervolume of the front: {history[-1]:.4f})")


@app.command()
def export(
    experiment: str = typer.Option(..., "--experiment", "-e", help="MLflow experiment name (the 'name' in the experiment file)."),
    pick: str = typer.Option(
        ...,
        "--pick",
        metavar="accuracy|smallest|fastest|knee|RUN_ID",
        help="Which trial: 'accuracy' (the best on the task's metric), 'smallest', 'fastest' or 'knee' (balanced, see above) on the Pareto front; "
        "or the MLflow run id (or a unique prefix of it, 4 characters or more) of any finished trial of the experiment, on the front or not: "
        "one that misses the search's constraints is exported with a warning, and its card says so.",
    ),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Folder to write; created. An existing folder must be empty: export never overwrites files."),
    min_accuracy: Optional[float] = typer.Option(
        None, "--min-metric", "--min-accuracy", metavar="X",
        help="Only trials whose validation metric is >= X are candidates; for accuracy a fraction in [0, 1] (0.95 for 95%). --min-accuracy: the old name",
    ),
    register: Optional[str] = typer.Option(
        None, "--register", metavar="NAME", help="Also register the ONNX model as a new version of this MLflow registered model, linked to the trial run, its metrics as tags."
    ),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI. Default: sqlite mlflow.db here."),
    search_run: Optional[str] = typer.Option(None, "--search", help="Parent run id of one search. Default: the latest search."),
    config: Optional[Path] = typer.Option(
        None,
        "--config",
        metavar="FILE",
        help="Your copy of the experiment file the search ran: the task is rebuilt from it, its folder is where 'module:factory' code "
        "imports from. It must be byte for byte the logged file (SHA-256 checked). Needed with a tracking server; "
        "with a local store the logged file is used by default.",
    ),
    trust_logged_code: bool = typer.Option(
        False,
        "--trust-logged-code",
        help="Rebuild the task from the experiment file logged on the tracking server, running the code it names. "
        "Only for a server whose writers you trust.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Write the model even when model.onnx scores other than the trial logged on the validation split (beyond 0.005); "
        "the card then says so. Without it, export refuses such a model.",
    ),
) -> None:
    """Write one trial of a search as files that ship: model.onnx, compressed.safetensors, recipe.json, MODEL_CARD.md.

    model.onnx runs with numpy and onnxruntime alone; compressed.safetensors is
    the artifact the trial logged (its size is the reported size); the model
    card gives the metrics next to the baseline's, the files' SHA-256 and how
    to load the model.

    Nothing wrong ships: the downloaded artifact must have the SHA-256 the trial
    logged, and model.onnx must score on the validation split what the trial
    logged for it; else export writes nothing and exits with code 2 (--force
    writes it anyway, and the card says so).

    The knee: each objective of the search is min-max normalised over the
    front (0 = the best value on the front, 1 = the worst); the knee is the
    trial nearest (Euclidean distance) to the ideal corner where all are 0.
    Ties go to the more accurate trial.

    Export rebuilds the model by running the task's dataset and model
    factories. With a local MLflow store (the default sqlite mlflow.db) it
    reads the task from the experiment file the search logged, and imports
    your own 'module:factory' code from that file's folder, as the search did.
    With a tracking server it does not run code named by a file others could
    have changed: pass --config FILE (checked against the logged SHA-256), or
    --trust-logged-code.
    """
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per small file would bury the summary
    from netshrink.search.export import export_model
    from netshrink.search.front import format_metric

    result = export_model(
        experiment, pick, out, min_accuracy=min_accuracy, register=register, tracking_uri=tracking_uri, search_run=search_run,
        config=config, trust_logged_code=trust_logged_code, force=force,
    )
    point = result.chosen.point
    if result.forced:
        errors.print(f"[yellow]warning (--force): {result.forced}[/yellow]", highlight=False)
    if result.chosen.infeasible:
        errors.print(f"[yellow]warning: this trial is infeasible: {result.chosen.infeasible}[/yellow]", highlight=False)
    from netshrink.deploy.slimmable_export import width_path
    from netshrink.search.front import WIDTH_KEY

    width = point.extra.get(WIDTH_KEY)
    graph = width_path(Path("model.onnx"), width).name if width is not None else "model.onnx"
    console.print(f"Exported {point.name} (run {point.run_id}), picked {result.chosen.pick}: {point.summary}")
    console.print(
        f"{point.metric_name} {format_metric(point.metric_name, point.accuracy)} "
        f"({graph} on the validation split: {format_metric(point.metric_name, result.onnx_accuracy)}), "
        f"{point.size_bytes / 1e3:.1f} KB, {point.latency_ms:.4f} ms"
    )
    for name, size in result.files.items():
        console.print(f"  {result.folder / name}  {size:,} bytes")
    console.print(f"  {result.folder / 'MODEL_CARD.md'}")
    if width is not None:
        graphs = ", ".join(name for name in result.files if name.endswith(".onnx"))
        console.print(
            f"A slimmable network: one set of weights (model.weights) that runs at each width; choose the width by the graph you "
            f"open ({graphs}), keeping the files together. MODEL_CARD.md gives each width's figures."
        )
    console.print(f"Run {result.folder / graph} with numpy and onnxruntime alone (from {result.folder}):")
    console.print(result.snippet.removeprefix("```python\n").removesuffix("\n```"), markup=False, highlight=False)
    if result.registered_version:
        console.print(f"Registered in MLflow as model {register!r}, version {result.registered_version}")


def optional_resume_value(argv: list[str]) -> list[str]:
    """``--resume`` with no run id after it (the next word is an option, the experiment file, or nothing) becomes
    ``--resume=latest``: click options take a value or none, not either."""
    out = list(argv)
    for index, word in enumerate(out):
        following = out[index + 1] if index + 1 < len(out) else None
        names_a_run = following is not None and not following.startswith("-") and not following.endswith((".yaml", ".yml")) and not Path(following).is_file()
        if word == "--resume" and not names_a_run:
            out[index] = "--resume=latest"
    return out


def main() -> None:
    try:
        app(args=optional_resume_value(sys.argv[1:]), prog_name="netshrink")
    except UserError as error:
        errors.print(f"[bold red]error:[/bold red] {error.render()}", highlight=False)
        sys.exit(2)
    except (KeyboardInterrupt, SystemExit) as stop:
        # Typer turns a Ctrl-C inside a command into a silent exit 130 (sys.exit from an Exit raised from the
        # KeyboardInterrupt): the interrupt is still in the exception chain, naming where it stopped (validation's phases).
        interrupt = stop
        while interrupt is not None and not isinstance(interrupt, KeyboardInterrupt):
            interrupt = interrupt.__cause__ or interrupt.__context__
        if interrupt is None:
            raise
        errors.print(f"interrupted ({interrupt})" if str(interrupt) else "interrupted", markup=False, highlight=False)
        sys.exit(130)
    except Exception as error:  # a full disk is no bug of ours: one line, where it was (errors.disk_full)
        from netshrink.errors import disk_full

        full = disk_full(error)
        if full is None:
            raise
        errors.print(f"[bold red]error:[/bold red] {full}; free some space and run the command again", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
