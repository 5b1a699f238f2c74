"""TEMPORARY: public operator API routed to the reference; the fast path replaces this."""
from .naive import ntk_attention_naive, prefix_attention_naive, prefix_to_ntk_naive


def ntk_attention(q, k, v, z, kvec, *, feature_map="elu", causal=False, attn_mask=None, scale=None, dropout_p=0.0):
    return ntk_attention_naive(q, k, v, z, kvec, feature_map, causal, attn_mask, scale)


def prefix_attention(q, k, v, prefix_k, prefix_v, *, causal=False, attn_mask=None, scale=None):
    return prefix_attention_naive(q, k, v, prefix_k, prefix_v, causal, attn_mask, scale)


def prefix_to_ntk(prefix_k, prefix_v, *, feature_map="elu", scale=None):
    return prefix_to_ntk_naive(prefix_k, prefix_v, feature_map, scale)
