"""The built-in local solves, one file each; importing this package registers them."""

from hf_badm.optim.solves.adam import Adam
from hf_badm.optim.solves.newton_schulz import NewtonSchulz, ns_applies
from hf_badm.optim.solves.none import Plain
from hf_badm.optim.solves.normalized import Normalized
from hf_badm.optim.solves.normuon import NorMuon
from hf_badm.optim.solves.nsisa import NSISA
from hf_badm.optim.solves.second_moment import SecondMoment

__all__ = ["Adam", "Plain", "SecondMoment", "Normalized", "NewtonSchulz", "NSISA", "NorMuon", "ns_applies"]
