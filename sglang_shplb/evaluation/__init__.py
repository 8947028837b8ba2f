"""Quality of a plan where it counts: answers. ``python -m sglang_shplb eval`` (:func:`.runner.run_eval`)
sends long-context prompts in RULER's spirit (:mod:`.tasks`, haystacks from :mod:`.corpus`) to a stock dense
SGLang server and to the shplb server with the plan (:mod:`.servers`), scores the answers (:mod:`.scoring`)
and writes ``eval.json`` and ``eval.png`` (:mod:`.summary`). Servers run as subprocesses: this package
never imports the serving, scheduler or kernel code."""
