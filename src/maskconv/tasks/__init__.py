"""One room per CLI command that trains, evaluates or draws: ``pretrain``, ``classify`` (finetune / linprobe /
eval), ``export``, ``visualize``, ``zoo`` (``models``), ``demo``. Each holds the importable functions the command
runs (``run_*``) and, at its bottom, its ``COMMAND`` (``commands.Command``: help, arguments, run), which
``cli.COMMANDS`` lists. Commands whose function lives elsewhere keep their ``COMMAND`` beside it
(``pix2seq/task.py``, ``viz/roadmap.py``, ``data/scenes.py``). ``maskconv.api`` re-exports the functions.
"""
