"""Graph I/O names: the one place they are defined. Exporters write them into the manifest; every other
module (runtime, calibrator, builder) reads them from the manifest, never from here."""

VISION = {
    "inputs": ("pixel_values",),
    "outputs": ("image_embeds",),
}

TARGET = {
    # past_key/past_value: the runtime-owned fixed-capacity cache [layers, 1, kv_heads, capacity, head_dim];
    # attention_mask [1, T, P + T]: which of the first P cache slots (P <= capacity: the graph reads only
    # those) and which new rows each query sees.
    "inputs": ("inputs_embeds", "position_ids", "attention_mask", "past_key", "past_value", "logit_rows"),
    # hidden: final-norm states (the draft's features); new_key/new_value: this call's KV rows;
    # topk_*: verification signal at `logit_rows` only; row_logits: full logits at those rows (sampling).
    "outputs": ("hidden", "new_key", "new_value", "topk_ids", "topk_logprobs", "row_logits"),
    "optional_outputs": ("attn_importance", "taps"),
}

DRAFT = {
    "inputs": ("embeds", "positions", "self_mask", "self_key", "self_value", "cross_key", "cross_value",
               "new_feats", "cross_mask", "prev_feat"),
    "outputs": ("feature", "topk_ids", "topk_logprobs", "new_self_key", "new_self_value", "new_cross_key",
                "new_cross_value"),
}

DRAFT_CHAIN = {
    # A chain round in one call (CPU backends pay per call, not per node): the draft graph's context
    # pass (same inputs) then greedy steps; embed_table: the runtime's (scaled) token embeddings, read
    # by each step's argmax. chain_ids: the round's drafted tokens; new_*: the context rows to commit.
    "inputs": ("embeds", "positions", "self_mask", "self_key", "self_value", "cross_key", "cross_value",
               "new_feats", "cross_mask", "embed_table"),
    "outputs": ("chain_ids", "new_self_key", "new_self_value", "new_cross_key", "new_cross_value"),
}
