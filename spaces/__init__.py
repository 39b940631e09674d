"""Search spaces: which techniques and knobs a search explores, and their translation to Optuna."""

from .knobs import Choice, Fixed, Knob, Range, parse_knob
from .space import TECHNIQUE_SPACES, SearchSpace, TechniqueSpace

__all__ = ["TECHNIQUE_SPACES", "Choice", "Fixed", "Knob", "Range", "SearchSpace", "TechniqueSpace", "parse_knob"]
