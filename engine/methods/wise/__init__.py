"""WISE (Wang et al. 2024): edits go to a side copy of one MLP output projection, and a
router sends each input either to it or to the untouched main memory.

The side memory is W' = W + D, kept as the difference D (so a 4-bit or 8-bit W is never
touched or dequantized): at a position with input x the side output is W x + D x, and the
activation score of the paper, Δ_act(x) = ‖(W' − W) x‖, is ‖D x‖.

Routing. A position goes to the side memory when ‖D x‖ is above a threshold taken from
the edits: act_ratio × the lowest score any edit's own positions reached when it was
made. Routing is decided per position from the call's own input, so cached decoding
needs no state carried between calls.

Training one edit, with the model frozen, optimises a change Δ of the side memory:
  NLL of the target, with the side memory in force at the edit's positions
  + ReLU(‖D x_i‖ − α)         on irrelevant text (it must stay in the main memory),
                              averaged over the positions that break the margin
  + ReLU(β − ‖D x_e‖)         on the edit's positions (they must reach the side memory)
  + ReLU(γ − (mean ‖D x_e‖ − mean ‖D x_i‖))   (the two must stay apart)
  + ReLU(‖D x_o‖ − old_share · min ‖D x_e‖)    on the inputs of edits other side memories
                              hold (see WiseMemory), so this one does not claim them
(the first three are the paper's margin losses, α < β), with every entry of D kept within
±norm_constraint.

The edit's positions are those of the prompt and the target as plain text and, on a chat
model, also as the answer to chat requests (chat_asks of chat_forms, as ROME's value uses them;
kedit's addition, 0 gives the paper's WISE). Trained on plain text only, the fact world's side
memory claimed the chat answer's positions but did not change it: "Watts Humphrey attended" in
chat still got Illinois Institute of Technology after the edit to University of Michigan.

Knowledge sharding. The side memory has n_shards shards; shard i owns a fixed random
mask M_i covering mask_ratio of D's entries, and edits take turns on the shards. An edit
only changes its shard's masked entries (its gradient is masked). Each shard's delta τ_i
is the sum of its edits' changes, and D = TIES-merge(τ_1 … τ_k): trim each τ to its
largest ties_density share, elect each entry's sign by the sum, and average the τ that
agree with it (the disjoint mean).

Rollback. Each edit keeps its own change (the masked entries only) and its score.
Removing an edit recomputes its shard's sum of the remaining changes in the same order,
then the merge and the threshold. So rolling back the latest edit restores D and the
threshold bit for bit. Rolling back an earlier one removes exactly its recorded change;
the later edits keep theirs, though they were trained with it present, so D is the sum
of what the others recorded, not what training without the removed edit would have
given. With no edits left the hook is removed and the module is exactly as loaded.

Modules: ``params`` (settings), ``memory`` (side memories, shards, merge, routing, the
patch), ``train`` (optimising one edit's change), ``method`` (the EditMethod).
"""
