import re
import xml.etree.ElementTree as ET

import pytest

from netshrink.search.constraints import Constraints
from netshrink.search.front import TrialPoint, pareto_front
from netshrink.search.hypervolume import hypervolume_history
from netshrink.search.plots import HYPERVOLUME_PNG, PARETO_HTML, PARETO_PNG, log_plots, write_plots, write_search_plots
from netshrink.search.report import LoadedFront
from netshrink.search.tracking import Tracker

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL = ["accuracy", "size_bytes", "latency_ms"]
BASELINE = {"accuracy": 0.98, "size_bytes": 250_000.0, "latency_ms": 0.12}


def point(number, accuracy, size, latency, summary="pruning ratio 0.5"):
    name = f"trial-{number:03d}"
    return TrialPoint(run_id=f"run{number}", name=name, accuracy=accuracy, size_bytes=size, latency_ms=latency, recipe="{}", summary=summary)


POINTS = [
    point(3, 0.90, 20_000, 0.05, summary="clustering 16 <huffman> & pruning"),
    point(0, 0.97, 60_000, 0.10),
    point(1, 0.95, 30_000, 0.11),
    point(2, 0.80, 100_000, 0.13),  # dominated by trial-000
]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plots") / "new"
    front = pareto_front(POINTS, ALL, ["max", "min", "min"])
    history = write_plots(folder, POINTS, front, BASELINE, ALL)
    return folder, front, history


def test_the_three_files_are_written_and_the_pngs_are_pngs(written):
    folder, _, _ = written
    for name in (PARETO_PNG, PARETO_HTML, HYPERVOLUME_PNG):
        assert (folder / name).stat().st_size > 1000, name
    for name in (PARETO_PNG, HYPERVOLUME_PNG):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC


def test_html_shows_every_trial_on_hover_and_needs_nothing_from_outside(written):
    folder, front, _ = written
    page = (folder / PARETO_HTML).read_text()
    svg = page[page.index("<svg") : page.index("</svg>") + len("</svg>")]
    root = ET.fromstring(svg)  # well-formed: the recipe summary's < and & were escaped
    titles = [element.text for element in root.iter("{http://www.w3.org/2000/svg}title")]
    for p in POINTS:
        on_hover = [text for text in titles if text.startswith(p.name)]
        assert len(on_hover) == 2, p.name  # one per panel
        assert p.summary in on_hover[0] and f"accuracy {p.accuracy:.2%}" in on_hover[0] and "KB" in on_hover[0] and "ms" in on_hover[0]
    assert sum("(Pareto front)" in text for text in titles) == 2 * len(front)
    assert any(text.startswith("baseline") for text in titles)
    assert not re.search(r"<script|<link|<img", page)


def test_history_is_in_start_order_whatever_order_the_points_come_in(written):
    _, _, history = written
    in_start_order = sorted(POINTS, key=lambda p: p.name)
    assert history == pytest.approx(hypervolume_history(in_start_order, ALL, BASELINE))
    assert history != pytest.approx(hypervolume_history(POINTS, ALL, BASELINE))


def test_trial_numbers_past_999_keep_their_order(tmp_path):
    late = [point(1000, 0.99, 10_000, 0.01), point(999, 0.90, 50_000, 0.10)]
    history = write_plots(tmp_path, late, late, BASELINE, ALL)
    assert history[0] < history[1]  # trial-999 first, then the better trial-1000


def test_an_empty_front_and_fewer_objectives_still_draw(tmp_path):
    history = write_plots(tmp_path, POINTS, [], BASELINE, ["accuracy", "latency_ms"], min_accuracy=0.99)
    assert history == [0.0] * len(POINTS)
    assert (tmp_path / PARETO_PNG).read_bytes()[:8] == PNG_MAGIC and (tmp_path / HYPERVOLUME_PNG).stat().st_size > 1000


def test_logged_into_the_search_run_and_drawn_again_from_its_record(tmp_path):
    """The search logs the pictures and the history; ``front --plot`` reads objectives and min_accuracy back."""
    objectives = ["accuracy", "size_bytes"]
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "exp.yaml").write_text("name: plots\n")
    record = tracker.start_search(
        tracker.experiment_id("plots"), "plots", "search", objectives=objectives, constraints=Constraints(min_accuracy=0.85), baseline=BASELINE,
        storage_url="sqlite:///unused.db", config_path=tmp_path / "exp.yaml", trials=4, params={},
    )
    parent = record.run_id
    front = pareto_front(POINTS, objectives, ["max", "min"], Constraints(min_accuracy=0.85))
    log_plots(tracker, parent, POINTS, front, BASELINE, objectives, min_accuracy=0.85)

    assert {a.path for a in tracker.client.list_artifacts(parent, "plots")} == {f"plots/{name}" for name in (PARETO_PNG, PARETO_HTML, HYPERVOLUME_PNG)}
    expected = hypervolume_history(sorted(POINTS, key=lambda p: p.name), objectives, BASELINE, min_accuracy=0.85)
    steps = sorted(tracker.client.get_metric_history(parent, "hypervolume"), key=lambda m: m.step)
    assert [m.step for m in steps] == [1, 2, 3, 4] and [m.value for m in steps] == pytest.approx(expected)
    assert tracker.client.get_run(parent).data.metrics["hypervolume"] == pytest.approx(expected[-1])

    loaded = LoadedFront(search=tracker.search_record(parent), front=front, points=POINTS)
    assert loaded.search.objectives == objectives and loaded.search.constraints == Constraints(min_accuracy=0.85) and loaded.baseline == BASELINE
    assert write_search_plots(tmp_path / "again", loaded) == pytest.approx(expected)
    assert (tmp_path / "again" / PARETO_HTML).stat().st_size > 1000


def test_the_accuracy_axis_covers_the_useful_region_with_the_rest_in_a_strip_and_no_labels_overlap():
    """Many front points crowded near the baseline, others far below: the axis starts just under min_accuracy,
    the far ones sit in the strip (hover keeps their accuracy), and the front's labels do not touch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from netshrink.search.plots import accuracy_window, pareto_figure

    crowded = [point(10 + i, 0.975 - 0.0005 * i, 20_000 * (1 + 0.02 * i), 0.05 * (1 + 0.01 * i)) for i in range(8)]
    far = [point(30, 0.20, 15_000, 0.04), point(31, 0.55, 18_000, 0.045)]
    points = crowded + far
    figure, tooltips = pareto_figure(points, crowded, BASELINE, ALL, min_accuracy=0.93)
    floor, top = accuracy_window(points, BASELINE, 0.93)
    assert floor == pytest.approx(0.92) and top < 1.0
    for axes in figure.axes[:2]:
        low, high = axes.get_ylim()
        assert low < floor < 0.93 < high and high == pytest.approx(top)
        strip = [c.get_offsets()[0][1] for c in axes.collections if len(c.get_offsets()) == 1 and c.get_offsets()[0][1] < floor]
        assert len(strip) == 2  # the two far trials, drawn in the strip
        renderer = FigureCanvasAgg(figure).get_renderer()
        boxes = [Text.get_window_extent(text, renderer) for text in axes.texts if text.get_text().startswith("trial-")]
        assert len(boxes) == len(crowded)
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert any("accuracy 20.00%" in text for text in tooltips.values())


def test_a_slimmable_trials_widths_are_drawn_as_one_series_in_both_panels():
    from netshrink.search.front import WIDTH_KEY
    from netshrink.search.plots import SERIES_STYLE, pareto_figure

    widths = [
        TrialPoint(run_id="slim", name=f"trial-009@{w:g}", accuracy=a, size_bytes=200_000, latency_ms=l, recipe="{}", summary="slimmable", extra={WIDTH_KEY: w})
        for w, a, l in ((0.25, 0.93, 0.03), (0.5, 0.96, 0.05), (1.0, 0.975, 0.12))
    ]
    points = [*POINTS, *widths]
    figure, _ = pareto_figure(points, pareto_front(points, ALL, ["max", "min", "min"]), BASELINE, ALL)
    for axes in figure.axes[:2]:
        series = [line for line in axes.get_lines() if line.get_color() == SERIES_STYLE["color"]]
        assert len(series) == 1 and len(series[0].get_xdata()) == 3  # one line through the trial's three widths
        assert list(series[0].get_ydata()) == [0.93, 0.96, 0.975]
    assert "widths of one slimmable artifact" in [text.get_text() for text in figure.axes[1].get_legend().get_texts()]
