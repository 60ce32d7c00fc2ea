"""GRACE (Hartvigsen et al. 2023): a codebook of (key, value, radius) beside one layer.

The codebook sits on a layer's MLP output projection. Its keys are that module's input at
the last token of an edited prompt; when an input lies within a key's deferral radius ε,
the module's output there is replaced by the key's trained value, else the layer runs as
it was. Matching is done per position on every call, from the call's own input, so no
position or key is carried from one call to the next: a cached decode step is matched
like any other token.

Adding an edit (key h, label y), with the nearest key k at distance d:
- no key, or d > ε_k + ε_init: a new entry (h, value, ε_init);
- d ≤ ε_k + ε_init and k's label is y: k's radius grows to d, so it covers h;
- d ≤ ε_k + ε_init and the labels differ: both radii become d / 2 (split), new entry added.
  Where h is k itself (d ≈ 0), the new label takes the entry over instead.

Labels are the target's token ids, compared as sequences. Every change to an entry is a
revision on that entry's history, tagged with the edit that made it; the entry's current
state is its top revision. Rolling an edit back removes its revisions wherever they are, so the
codebook is exactly what the remaining edits made, and an entry with no revisions left is
gone. With no entries left the hook is removed and the module is exactly as loaded.

Modules: ``params`` (settings), ``codebook`` (entries, lookup, the patch, placing an edit),
``value`` (training the value an entry puts out), ``method`` (the EditMethod).
"""
