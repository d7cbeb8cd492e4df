"""Your own training loop with graft.Checkpointer: see graft/templates/own_loop.py (what
`graft init` copies as train.py). This file only runs it, so the example and the template are one.

    accelerate launch --num_processes 2 examples/own_loop.py --out runs/own --epochs 10
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("graft.templates.own_loop", run_name="__main__", alter_sys=True)
