"""The platform probe's measuring half; runs in the serving env (``python -m serving.engine._probe_vllm``).

For each variant (a model folder served in one dtype) it starts vLLM's offline engine once,
answers a few fixed prompts greedily (correctness: compared with the float32 answers), and times
decoding at batch 1 and at a small batch. One process for all variants, so vLLM is imported once.
``dtype: "probe"`` on a variant means the dtype chosen from the variants before it (float32, or
bfloat16 when it answered like float32 and was faster). Prints one JSON object on the last line.

Only the standard library and vLLM here, plus :mod:`ground.platform` (standard library only at import) for
the rules, so that both halves judge with the same code.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time

from ground.platform import can_be_chosen, pick_dtype


def _measure(llm, spec: dict, name: str, results: dict) -> dict:
    """The variant's answers, then its speed unless the answers already rule it out."""
    # lazy: vllm, the serving env only
    from vllm import SamplingParams

    chats = [[{"role": "user", "content": p}] for p in spec["prompts"]]
    greedy = SamplingParams(max_tokens=spec["check_tokens"], temperature=0)
    answers = [o.outputs[0].text for o in llm.chat(chats, greedy, use_tqdm=False)]
    if not can_be_chosen({**results, name: {"answers": answers}}, name):
        # Timing it could not change the choice (tens of seconds for a slow bfloat16 on AVX2).
        return {"answers": answers, "timing": "skipped: answered unlike float32"}
    timed = SamplingParams(max_tokens=spec["tokens"], temperature=0, ignore_eos=True)
    batch = [chats[i % len(chats)] for i in range(spec["batch"])]
    llm.chat(chats[:1], timed, use_tqdm=False)  # warm-up

    def tok_s(requests: list) -> float:
        t0 = time.perf_counter()
        outs = llm.chat(requests, timed, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)

    # Best of a few: other work on a shared machine only ever makes a run slower.
    c1 = max(tok_s(chats[:1]) for _ in range(spec["repeats"]))
    cb = max(tok_s(batch) for _ in range(spec["repeats"]))
    return {"answers": answers, "tok_s_c1": round(c1, 2), "tok_s_batch": round(cb, 2)}


def main(spec: dict) -> dict:
    # lazy: vllm, the serving env only
    from vllm import LLM

    results: dict[str, dict] = {}
    for variant in spec["variants"]:
        name, dtype = variant["name"], variant["dtype"]
        if dtype == "probe":
            dtype = pick_dtype(results)
        t0 = time.perf_counter()
        llm = None
        try:
            llm = LLM(model=variant["model"], dtype=dtype, enforce_eager=True, max_model_len=512,
                      seed=0, max_num_seqs=spec["batch"])
            load_s = time.perf_counter() - t0
            results[name] = {"dtype": dtype, "load_s": round(load_s, 1), **_measure(llm, spec, name, results)}
        except Exception as exc:  # noqa: BLE001 - a variant this machine cannot serve is a result
            results[name] = {"dtype": dtype, "error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            if llm is not None:  # best effort: the process ends soon anyway
                with contextlib.suppress(Exception):
                    llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
        print(f"probe: {name} ({dtype}): {results[name]}", file=sys.stderr, flush=True)
    return results


if __name__ == "__main__":  # vLLM's engine spawns processes: the guard is required
    print(json.dumps(main(json.loads(sys.argv[1]))))
