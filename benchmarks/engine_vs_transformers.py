"""Offline generation throughput: microserve's Engine (in process) vs Hugging Face `generate`.

Same model weights, same batch of token-id prompts, greedy, exactly --output-len new tokens per
sequence (ignore_eos for the engine; eos_token_id=[] in transformers' generation config, so EOS
ids may be generated and stop nothing on either side), same torch thread count, both in this one
process, one after the other. For each (model, threads, batch) both sides get a
warm-up run, then --repeats timed runs; the table reports the median and the min-max spread of
output tokens/s (batch * output_len / wall seconds of the whole generate call: prefill + decode).

Models:
  stories260K   the real checkpoint, a local Hugging Face directory given by --stories PATH
                (karpathy's tinyllamas stories260K, 0.26 M parameters; default ../shared/models/stories260K)
  dummy         a Llama config of ~58 M parameters (hidden 512, 8 layers, GQA 8/4, vocab 32000)
                written to a temp dir; the engine builds it with load_format="dummy", its weights
                are exported under Hugging Face names to model.safetensors, and transformers loads
                that file, so both run the very same weights.

    python benchmarks/engine_vs_transformers.py                       # the documented run
    python benchmarks/engine_vs_transformers.py --models dummy --batch-sizes 16 --profile

--ragged adds a mixed batch like a server sees: prompt lengths uniform in [prompt_len/4, 7*prompt_len/4]
and per-request output lengths uniform in [output_len/4, 7*output_len/4]. transformers gets the
batch left-padded (attention mask) and must run every row to the longest output; both sides are
credited only the tokens each request asked for (sum of its output lengths).

The engine runs with prefix caching off (repeats reuse the prompts; transformers has no cross-call
cache either) and kv_transport="none". It detokenizes incrementally when the model has a
tokenizer (stories260K), as it does when serving; transformers' generate does not.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

import torch

from microserve.bench.harness import STORIES, machine, machine_line
from microserve.config import EngineConfig
from microserve.engine.engine import Engine
from microserve.engine.sampling import SamplingParams

DUMMY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 512,
    "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 64, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}


# ---- models ---------------------------------------------------------------------------------------
def export_hf(engine: Engine, path: str) -> None:
    """Write the engine's weights under Hugging Face names (q/k/v and gate/up split back)."""
    from safetensors.torch import save_file
    m, mc = engine.model, engine.model_config
    out = {}
    for name, p in m.named_parameters():
        t = p.detach()
        if name.startswith("lm_head"):
            out["lm_head.weight"] = t
            continue
        for ours in ("qkv_proj", "gate_up_proj"):
            if f".{ours}." in name:
                theirs = ("q_proj", "k_proj", "v_proj") if ours == "qkv_proj" else ("gate_proj", "up_proj")
                for piece, hf in zip(t.split(m.shard_sizes(ours), dim=0), theirs):
                    out["model." + name.replace(ours, hf)] = piece
                break
        else:
            out["model." + name] = t
    if mc.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    save_file({k: v.contiguous().clone() for k, v in out.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def make_engine(model_dir: str, load_format: str, threads: int) -> Engine:
    return Engine(EngineConfig(model=model_dir, load_format=load_format, num_threads=threads,
                               enable_prefix_caching=False, kv_transport="none", kv_cache_memory_mb=256))


def load_hf(model_dir: str):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# ---- runs -----------------------------------------------------------------------------------------
def run_engine(engine: Engine, prompts: list[list[int]], out_len, tag: str) -> tuple[float, list[list[int]]]:
    lens = out_len if isinstance(out_len, list) else [out_len] * len(prompts)
    t0 = time.perf_counter()
    reqs = [engine.add_request(f"{tag}-{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for i, (p, n) in enumerate(zip(prompts, lens))]
    while engine.has_work():
        engine.step()
    dt = time.perf_counter() - t0
    return dt, [r.output_ids for r in reqs]


def run_hf(model, prompts: list[list[int]], out_len) -> tuple[float, list[list[int]]]:
    """One static batch; ragged prompts are left-padded, and every row runs to the longest output."""
    lens = out_len if isinstance(out_len, list) else [out_len] * len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    # ignore_eos as the engine (and vLLM) mean it: EOS may be generated and does not stop the row.
    # (min_new_tokens would instead forbid EOS ids, changing the greedy output whenever EOS is the argmax.)
    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id, gc.min_new_tokens, gc.max_new_tokens = [], None, max(lens)  # None falls back to the model's
    gc.do_sample, gc.pad_token_id = False, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, generation_config=gc)
    dt = time.perf_counter() - t0
    return dt, [row[:n] for row, n in zip(out[:, width:].tolist(), lens)]


def summarize(times: list[float], tokens: int) -> dict:
    tps = sorted(tokens / t for t in times)
    return {"median_tok_s": statistics.median(tps), "min_tok_s": tps[0], "max_tok_s": tps[-1],
            "median_s": statistics.median(times), "runs_s": [round(t, 4) for t in times]}


def bench_case(name, engine, hf, prompts, out_len, repeats, threads, counter) -> dict:
    torch.set_num_threads(threads)
    n_tokens = sum(out_len) if isinstance(out_len, list) else len(prompts) * out_len
    # warm-up both sides on the exact shapes, then time them interleaved so drifts in machine load
    # (the machine is shared) hit both alike
    _, e_out = run_engine(engine, prompts, out_len, f"w{next(counter)}")
    _, h_out = run_hf(hf, prompts, out_len)
    e_times, h_times = [], []
    for _ in range(repeats):
        e_times.append(run_engine(engine, prompts, out_len, f"r{next(counter)}")[0])
        h_times.append(run_hf(hf, prompts, out_len)[0])
    same = sum(a == b for a, b in zip(e_out, h_out))
    first = next((i for i, (a, b) in enumerate(zip(e_out[0], h_out[0])) if a != b), len(e_out[0]))
    e, h = summarize(e_times, n_tokens), summarize(h_times, n_tokens)
    return {"model": name, "threads": threads, "batch": len(prompts), "prompt_len": [len(p) for p in prompts],
            "output_len": out_len, "ragged": isinstance(out_len, list), "engine": e, "transformers": h,
            "speedup": e["median_tok_s"] / h["median_tok_s"],
            "greedy_identical_seqs": f"{same}/{len(prompts)}", "seq0_first_divergence": first,
            "load": os.getloadavg()[0]}


def profile_engine(engine, prompts, out_len, threads, top: int) -> str:
    torch.set_num_threads(threads)
    run_engine(engine, prompts, out_len, "pw")
    pr = cProfile.Profile()
    pr.enable()
    run_engine(engine, prompts, out_len, "pp")
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories260K,dummy")
    ap.add_argument("--stories", default=STORIES, help="the stories260K model directory (Hugging Face layout)")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", default=str(os.cpu_count() or 1),
                    help="comma-separated torch thread counts; each is used by both sides (default: nproc)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ragged", action="store_true",
                    help="also run each batch size > 1 with mixed prompt and output lengths (see the docstring)")
    ap.add_argument("--profile", action="store_true", help="also cProfile one engine run at the largest batch")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--json", default=None, help="write all results here")
    a = ap.parse_args()
    import transformers
    m = machine()
    print(f"# engine vs transformers {transformers.__version__}, torch {torch.__version__}, "
          f"prompt {a.prompt_len} tokens, output {a.output_len} tokens, {a.repeats} repeats after 1 warm-up\n"
          f"# {machine_line(m)}", flush=True)
    g = torch.Generator().manual_seed(a.seed)
    counter = iter(range(10**9))
    results, profiles = [], {}
    batches = [int(b) for b in a.batch_sizes.split(",")]
    threads_list = [int(t) for t in a.threads.split(",")]
    tmp = tempfile.TemporaryDirectory(prefix="bench-dummy-llama-")
    for name in a.models.split(","):
        if name == "stories260K":
            model_dir, load_format = a.stories, "safetensors"
            vocab = 512
        elif name == "dummy":
            model_dir, load_format = tmp.name, "dummy"
            with open(os.path.join(model_dir, "config.json"), "w") as f:
                json.dump(DUMMY_CONFIG, f)
            vocab = DUMMY_CONFIG["vocab_size"]
        else:
            raise SystemExit(f"unknown model {name!r}")
        engine = make_engine(model_dir, load_format, threads_list[0])
        if name == "dummy":
            export_hf(engine, model_dir)
        hf = load_hf(model_dir)
        n_params = sum(p.numel() for p in hf.parameters())
        print(f"## {name}: {n_params / 1e6:.2f} M parameters (transformers' count), dir {model_dir}", flush=True)
        for threads in threads_list:
            cases = []
            for b in batches:
                cases.append((b, torch.randint(3, vocab, (b, a.prompt_len), generator=g).tolist(), a.output_len))
                if a.ragged and b > 1:
                    plens = torch.randint(a.prompt_len // 4, 7 * a.prompt_len // 4 + 1, (b,), generator=g).tolist()
                    olens = torch.randint(a.output_len // 4, 7 * a.output_len // 4 + 1, (b,), generator=g).tolist()
                    cases.append((b, [torch.randint(3, vocab, (n,), generator=g).tolist() for n in plens], olens))
            for b, prompts, out_len in cases:
                r = bench_case(name, engine, hf, prompts, out_len, a.repeats, threads, counter)
                r["params_m"] = round(n_params / 1e6, 2)
                results.append(r)
                kind = " ragged" if r["ragged"] else ""
                print(f"  threads {threads} batch {b:3d}{kind}: engine {r['engine']['median_tok_s']:8.1f} tok/s "
                      f"[{r['engine']['min_tok_s']:.1f}-{r['engine']['max_tok_s']:.1f}]  transformers "
                      f"{r['transformers']['median_tok_s']:8.1f} tok/s [{r['transformers']['min_tok_s']:.1f}-"
                      f"{r['transformers']['max_tok_s']:.1f}]  x{r['speedup']:.2f}  greedy identical "
                      f"{r['greedy_identical_seqs']}  load {r['load']:.2f}", flush=True)
            if a.profile:
                prompts = torch.randint(3, vocab, (max(batches), a.prompt_len), generator=g).tolist()
                key = f"{name} threads={threads} batch={max(batches)}"
                profiles[key] = profile_engine(engine, prompts, a.output_len, threads, a.profile_top)
        del engine, hf
    print()
    print("| model | params | threads | batch | engine tok/s (median [min-max]) | transformers tok/s (median [min-max]) "
          "| engine / transformers | greedy outputs identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        e, h = r["engine"], r["transformers"]
        batch = f"{r['batch']} ragged" if r["ragged"] else str(r["batch"])
        print(f"| {r['model']} | {r['params_m']} M | {r['threads']} | {batch} | {e['median_tok_s']:.0f} "
              f"[{e['min_tok_s']:.0f}-{e['max_tok_s']:.0f}] | {h['median_tok_s']:.0f} [{h['min_tok_s']:.0f}-"
              f"{h['max_tok_s']:.0f}] | **{r['speedup']:.2f}x** | {r['greedy_identical_seqs']} |")
    for key, text in profiles.items():
        print(f"\n### cProfile of one engine run, {key} (sorted by tottime)\n```\n{text.strip()}\n```")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": m, "results": results, "profiles": profiles}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
