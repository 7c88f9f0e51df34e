"""What knowledge is matched: each method maps student/teacher tensors to per-sample discrepancies."""

from padkd.methods.base import METHODS, Method
from padkd.methods.features import FitNet, Hint
from padkd.methods.logits import KD
from padkd.methods.similarity import Similarity

__all__ = ["METHODS", "Method", "KD", "Hint", "FitNet", "Similarity"]
