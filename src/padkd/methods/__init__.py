"""What knowledge is matched: each method maps student/teacher tensors to per-sample discrepancies."""

from padkd.methods.base import METHODS, Method
from padkd.methods.contrastive import CRD
from padkd.methods.detection import FGFI, FpnL2, RoiKD
from padkd.methods.features import AB, AT, FSP, FT, NST, VID, FitNet, Hint
from padkd.methods.logits import CTKD, DIST, DKD, KD, MLKD, DISTPlus
from padkd.methods.ofd import OFD
from padkd.methods.relations import CC, PKT, RKD, SP
from padkd.methods.reviewkd import ReviewKD
from padkd.methods.similarity import Similarity
from padkd.methods.tokens import JSD, ForwardKL, ReverseKL, SkewKL, SkewReverseKL, TokenHint

__all__ = ["METHODS", "Method", "KD", "Hint", "FitNet", "AT", "NST", "AB", "FT", "FSP", "VID", "DKD", "DIST", "SP",
           "CC", "RKD", "PKT", "CRD", "Similarity", "FGFI", "FpnL2", "RoiKD", "MLKD", "CTKD", "DISTPlus", "ReviewKD",
           "OFD", "ForwardKL", "ReverseKL", "JSD", "SkewKL", "SkewReverseKL", "TokenHint"]
