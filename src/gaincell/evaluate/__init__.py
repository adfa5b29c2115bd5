"""Downstream evaluation through EleutherAI's lm-evaluation-harness.

``lm``     our GPT as a registered harness model (``GaincellLM``, name ``gaincell``), windowed scoring;
``tasks``  local stand-in tasks in the harness's YAML format, generated from held-out text;
``stage``  the ``evaluate`` stage (``run(cfg)``) and ``merge_results`` (all variants -> summary.csv).

Submodules are imported on use: importing lm-eval takes about a second.
"""
