"""lm-evaluation-harness's own command line with the ``gaincell`` model registered.

    gaincell-lm-eval --model gaincell --model_args checkpoint=results/tiny/checkpoints/softmax/final.pt \\
        data_dir=results/tiny/data --tasks local_lambada --include_path results/tiny/eval/tasks
    python -m gaincell lm_eval ...          # the same, without the console script

lm-eval 0.4 resolves ``--model NAME`` in its own registry only: it has no plugin discovery for models
(entry points), so a plain ``lm_eval --model gaincell`` cannot see a model defined outside its source
tree. This command imports ``gaincell.evaluate.lm`` (which registers ``gaincell``) and hands every
argument to lm-eval's own CLI (``lm_eval.__main__.cli_evaluate``): all of lm-eval's flags work.
"""
from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import gaincell.evaluate.lm  # noqa: F401, PLC0415 (imports lm-evaluation-harness; registers the "gaincell" model)

    if argv is not None:
        sys.argv = ["gaincell-lm-eval"] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
