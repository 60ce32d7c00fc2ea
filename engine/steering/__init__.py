"""Steering vectors: trained from contrastive pairs, added to decoder-layer outputs, stacked
in a rack with their own strengths, stored as safetensors.

A vector holds one direction per decoder layer, indexed as Hugging Face numbers the blocks
(0-based): direction L is added to the output of block L. Its metadata records the model
family and hidden size (a vector for another model is refused), how it was trained, and the
mean norm of the hidden state at each layer, so a strength can be given relative to it, and
the strength measured to be safe on that model (see ``recommend_strength``).

One module a job: ``vector`` (the type), ``train`` (from contrastive pairs), ``rack`` (the
vectors on the model, their strengths and hooks), ``measure`` (sweeps and the recommended
strength), ``merge``, ``io`` (kedit's safetensors file) and ``inputs`` (files and command
arguments). Other tools' files are ``kedit.engine.vector_io``.
"""

from kedit.engine.steering.inputs import parse_floats, parse_layers, parse_read, read_pairs, read_texts
from kedit.engine.steering.io import FORMAT, load_safetensors, save_safetensors
from kedit.engine.steering.measure import (
    BISECTIONS,
    NEUTRAL_TEXT,
    SEARCH_DOWN,
    SEARCH_UP,
    SweepRow,
    recommend_strength,
    sweep,
)
from kedit.engine.steering.merge import MERGE_MODES, merge_vectors
from kedit.engine.steering.rack import WHERE, Slot, SteeringRack
from kedit.engine.steering.train import METHODS, Pair, read_states, train_vector
from kedit.engine.steering.vector import Recommendation, SteeringVector

__all__ = [
    "BISECTIONS",
    "FORMAT",
    "MERGE_MODES",
    "METHODS",
    "NEUTRAL_TEXT",
    "SEARCH_DOWN",
    "SEARCH_UP",
    "WHERE",
    "Pair",
    "Recommendation",
    "Slot",
    "SteeringRack",
    "SteeringVector",
    "SweepRow",
    "load_safetensors",
    "merge_vectors",
    "parse_floats",
    "parse_layers",
    "parse_read",
    "read_pairs",
    "read_states",
    "read_texts",
    "recommend_strength",
    "save_safetensors",
    "sweep",
    "train_vector",
]
