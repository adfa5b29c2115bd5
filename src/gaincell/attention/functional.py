"""Dispatch of ``analog_attention`` to an exact implementation (placeholder until reference lands)."""


def analog_attention(q, k, v, cfg, implementation="auto"):
    from .reference import analog_attention_dense

    return analog_attention_dense(q, k, v, cfg)
