"""Side by side, on the same weights: edgekit's runtime vs onnxruntime-genai, OpenVINO GenAI, transformers
eager and llama.cpp (llama-cpp-python), batch 1, the same prompt token ids, the same thread count, greedy.

    python scripts/compare_runtimes.py /tmp/ckpt --work /tmp/cmp --precisions fp32,int4 --threads 1 \
        --prompt-len 64 --new-tokens 64 --repeats 5 [--ceilings]

Preparation (cached in --work; delete a folder to rebuild it):
  hf/                 `edgekit export-hf` (LlamaForCausalLM folder)
  bundle/             `edgekit export --no-fp16` + `edgekit optimize` (fp32-fused, int4-fused, int8-fused)
  genai-P/            python -m onnxruntime_genai.models.builder -i hf -o genai-P -p P -e cpu
                      (int4/int8: MatMulNBits RTN symmetric, block 32, accuracy_level 4 - the builder's CPU defaults)
  ov-P/               OpenVINO GenAI folder: our exported fp32 ONNX read by OpenVINO, a beam_idx Gather on every
                      cache input, made stateful (apply_make_stateful_transformation) - what optimum-intel does,
                      without optimum (it would replace this environment's torch); int4/int8 by
                      nncf.compress_weights (INT4_SYM / INT8_SYM, group 32, all layers); tokenizer by openvino_tokenizers
  gguf-P.gguf         llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist, --llama-src) to F32,
                      then llama_model_quantize to Q4_0 / Q8_0 (block 32 symmetric, like the int4 / int8 above)

Waiting threads sleep in every runtime: ONNX Runtime session.intra_op.allow_spinning = 0 (edgekit's default, set
for onnxruntime-genai through its genai_config session_options), OMP_WAIT_POLICY=PASSIVE for the OpenMP pools
(torch, llama.cpp); OpenVINO's CPU plugin has its own (TBB) pool. On a shared machine a spinning pool with more
than one thread collapses (measured: genai int4 at 2 threads 662 tok/s spinning vs 2119 not).

Measurement: every runtime in its own subprocess (`--worker`), `toolkit.bench.time_decoding` (warm-up, then
median of --repeats x [prefill + first token, --new-tokens greedy steps]); OpenVINO GenAI's LLMPipeline
has no step API, so its row uses the pipeline's own perf metrics (TTFT, TPOT) over --repeats generate()
calls with min_new_tokens = max_new_tokens. Greedy tokens of every row are compared with edgekit's
(`match`: leading tokens equal). --ceilings adds a torch microbenchmark of sgemm throughput and memory
read bandwidth at the same thread count, and the floor time per token
max(2 x params / FLOP/s, weight bytes / bandwidth) of the fp32 model.
Writes WORK/report/compare.json and compare.md.

    python scripts/compare_runtimes.py --ab BUNDLE A=graph_a.onnx B=graph_b.onnx [--threads 2]
    python scripts/compare_runtimes.py --ab BUNDLE spin=g.onnx@session.intra_op.allow_spinning=1 nospin=g.onnx

A/B mode: decode speed of graph files with the bundle's config (the runtime's decode loop, or @decoder=shared |
plain; ONNX Runtime session config entries after @), interleaved rounds, each measurement in a fresh process
(BENCHMARKS.md history).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from toolkit.bench import MARK, WARMUP_STEPS, peak_rss_mb, pool, prompt_ids, time_decoding  # noqa: E402

DEFAULT_LLAMA_SRC = "/tmp/ek/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp"
RUNTIMES = ("edgekit", "ort-genai", "openvino-genai", "transformers", "llama.cpp")
GGUF_TYPES = {"fp32": None, "int4": 2, "int8": 7}  # llama_ftype: MOSTLY_Q4_0 = 2, MOSTLY_Q8_0 = 7
GGML_TYPES = {"int4": 2, "int8": 8}  # ggml_type Q4_0 = 2, Q8_0 = 8


def sh(cmd: list[str], log, **kw):
    log("  $ " + " ".join(map(str, cmd)))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {(proc.stderr.strip().splitlines() or [''])[-1]}")
    return proc


# --- preparation -----------------------------------------------------------------------------------------------
def prepare(ckpt: Path, work: Path, precisions: list[str], runtimes: list[str], llama_src: str, log) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    py, status = sys.executable, {}
    hf, bundle = work / "hf", work / "bundle"
    if not (hf / "config.json").is_file():
        sh([py, "-m", "toolkit", "export-hf", ckpt, "--out", hf, "--overwrite"], log)
    if not (bundle / "manifest.json").is_file():
        sh([py, "-m", "toolkit", "export", ckpt, "--out", bundle, "--no-fp16", "--overwrite"], log)
    have = {v["name"] for v in json.loads((bundle / "manifest.json").read_text())["variants"]}
    missing = [p for p in precisions if f"{p}-fused" not in have]
    if missing:
        sh([py, "-m", "toolkit", "optimize", bundle, "--precisions", ",".join(missing)], log)
    for p in precisions:
        if "ort-genai" in runtimes:
            out = work / f"genai-{p}"
            if not (out / "genai_config.json").is_file():
                try:
                    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
                    sh([py, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out, "-p", p, "-e", "cpu",
                        "-c", work / "genai-cache"], log, env=env)
                except Exception as exc:
                    status[f"ort-genai/{p}"] = str(exc)
        if "openvino-genai" in runtimes and not (work / f"ov-{p}" / "openvino_model.xml").is_file():
            try:
                build_openvino(bundle / "fp32" / "model.onnx", hf, work / f"ov-{p}", p, log)
            except Exception as exc:
                status[f"openvino-genai/{p}"] = f"{type(exc).__name__}: {exc}"
        if "llama.cpp" in runtimes and not (work / f"gguf-{p}.gguf").is_file():
            try:
                build_gguf(hf, work, p, llama_src, log)
            except Exception as exc:
                status[f"llama.cpp/{p}"] = f"{type(exc).__name__}: {exc}"
    return status


def build_openvino(onnx_path: Path, hf: Path, out: Path, precision: str, log):
    """A stateful OpenVINO GenAI folder from the exported fp32 ONNX graph (same weights)."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    log(f"  openvino: {onnx_path} -> {out} ({precision})")
    out.mkdir(parents=True, exist_ok=True)
    model = ov.Core().read_model(str(onnx_path))
    past = [p.get_any_name() for p in model.inputs if p.get_any_name().startswith("past_key_values.")]
    beam = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam.output(0).get_tensor().set_names({"beam_idx"})
    model.add_parameters([beam])
    for name in past:  # LLMPipeline reorders the cache rows through beam_idx (as optimum-intel's export does)
        port = model.input(name)
        users = list(port.get_target_inputs())
        chosen = ops.gather(port, beam, ops.constant(np.int64(0)))
        for u in users:
            u.replace_source_output(chosen.output(0))
    apply_make_stateful_transformation(model, {n: n.replace("past_key_values.", "present.") for n in past})
    model.validate_nodes_and_infer_types()
    if precision in ("int4", "int8"):
        import nncf

        mode = nncf.CompressWeightsMode.INT4_SYM if precision == "int4" else nncf.CompressWeightsMode.INT8_SYM
        kw = {"group_size": 32, "ratio": 1.0, "all_layers": True} if precision == "int4" else {}
        model = nncf.compress_weights(model, mode=mode, **kw)
    ov.save_model(model, str(out / "openvino_model.xml"))
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    tok, detok = convert_tokenizer(AutoTokenizer.from_pretrained(str(hf), local_files_only=True), with_detokenizer=True)
    ov.save_model(tok, str(out / "openvino_tokenizer.xml"))
    ov.save_model(detok, str(out / "openvino_detokenizer.xml"))
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf / f).is_file():
            shutil.copy(hf / f, out / f)


def build_gguf(hf: Path, work: Path, precision: str, llama_src: str, log):
    f32 = work / "gguf-fp32.gguf"
    if not f32.is_file():
        if not (Path(llama_src) / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"llama.cpp's convert_hf_to_gguf.py not found under {llama_src} (--llama-src)")
        code = (  # the toolkit tokenizer is GPT-2 style byte-level BPE; the ids are fed directly anyway
            "import sys, runpy\n"
            f"L = {llama_src!r}; sys.path[:0] = [L, L + '/gguf-py']\n"
            "import conversion.base as b, conversion.llama as ll\n"
            "b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2'\n"
            "ll.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()\n"
            f"sys.argv = ['convert', {str(hf)!r}, '--outfile', {str(f32)!r}, '--outtype', 'f32']\n"
            "runpy.run_path(L + '/convert_hf_to_gguf.py', run_name='__main__')\n")
        sh([sys.executable, "-c", code], log)
    if precision == "fp32":
        return
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[precision]
    params.nthread = 2
    for field in ("output_tensor_type", "token_embedding_type"):  # the tied table in Q4_0 / Q8_0 too
        if hasattr(params, field):
            setattr(params, field, GGML_TYPES[precision])
    out = work / f"gguf-{precision}.gguf"
    log(f"  llama.cpp quantize {f32.name} -> {out.name}")
    rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


# --- workers ---------------------------------------------------------------------------------------------------
def _capacity(spec):
    return len(spec["ids"]) + spec["new_tokens"] + WARMUP_STEPS + 2


def w_edgekit(spec):
    import dataclasses

    base = _rss()
    from toolkit import targets
    from toolkit.runtime import session as sessions

    t = targets.get("cpu")
    t = dataclasses.replace(t, options={**t.options, "intra_op_num_threads": spec["threads"]})
    t0 = time.perf_counter()
    s = sessions.load(spec["work"] + "/bundle", t, spec["precision"], variant=spec.get("variant"))
    load_s = time.perf_counter() - t0
    holder = {}

    def prefill(ids):
        holder["d"] = s.decoder(_capacity(spec))
        return holder["d"].prefill(ids)

    timing = time_decoding(prefill, lambda tok: holder["d"].step(tok), spec["ids"], spec["new_tokens"], spec["repeats"])
    return {**timing, "load_s": load_s, "rss_base_mb": base, "device": f"edgekit {s.variant.name} ({s.device})"}


def w_genai(spec):
    import onnxruntime_genai as og

    base = _rss()
    folder = Path(spec["work"]) / f"genai-{spec['precision']}"
    cfg_path = folder / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"], opts["inter_op_num_threads"] = spec["threads"], 1
    opts["session.intra_op.allow_spinning"] = "0"  # as edgekit's CPU sessions (a config entry genai passes on)
    cfg_path.write_text(json.dumps(cfg, indent=4))
    t0 = time.perf_counter()
    model = og.Model(str(folder))
    load_s = time.perf_counter() - t0
    holder = {}

    def prefill(ids):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=_capacity(spec), do_sample=False)
        holder["g"] = og.Generator(model, params)
        holder["g"].append_tokens(ids)
        return holder["g"].get_logits().reshape(-1)

    def step(tok):
        holder["g"].append_tokens([tok])
        return holder["g"].get_logits().reshape(-1)

    timing = time_decoding(prefill, step, spec["ids"], spec["new_tokens"], spec["repeats"])
    # its own loop (argmax in C++): generate_next_token() = sample + one forward for the token before
    native = []
    for _ in range(spec["repeats"]):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=_capacity(spec), do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(spec["ids"])
        g.generate_next_token()  # the first token, from the prefill logits
        t1 = time.perf_counter()
        for _ in range(spec["new_tokens"]):
            g.generate_next_token()
        native.append(spec["new_tokens"] / (time.perf_counter() - t1))
    return {**timing, "load_s": load_s, "rss_base_mb": base, "decode_tok_s_native_loop": statistics.median(native),
            "device": f"onnxruntime-genai {og.__version__ if hasattr(og, '__version__') else ''} CPU"}


def w_openvino(spec):
    import openvino as ov
    import openvino_genai as ovg

    base = _rss()
    folder = Path(spec["work"]) / f"ov-{spec['precision']}"
    props = {"INFERENCE_NUM_THREADS": spec["threads"]}
    if spec["precision"] == "fp32":
        props["INFERENCE_PRECISION_HINT"] = "f32"  # never the bf16 default on this CPU
    t0 = time.perf_counter()
    pipe = ovg.LLMPipeline(str(folder), "CPU", **props)
    load_s = time.perf_counter() - t0
    n = spec["new_tokens"] + 1
    cfg = ovg.GenerationConfig()
    cfg.max_new_tokens, cfg.min_new_tokens, cfg.do_sample = n, n, False
    ids = np.array([spec["ids"]], np.int64)
    inputs = ovg.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
    pipe.generate(inputs, cfg)  # warm-up
    ttft, decode, tokens = [], [], None
    for _ in range(spec["repeats"]):
        r = pipe.generate(inputs, cfg)
        m = r.perf_metrics
        ttft.append(m.get_ttft().mean)
        decode.append(1000.0 / m.get_tpot().mean)
        tokens = tokens or [int(t) for t in r.tokens[0]]
    med = statistics.median(ttft)
    return {"ttft_ms": med, "prefill_tok_s": len(spec["ids"]) / med * 1e3, "decode_tok_s": statistics.median(decode),
            "decode_tok_s_spread": max(decode) - min(decode), "decode_tok_s_all": decode, "ttft_ms_all": ttft, "tokens": tokens,
            "load_s": load_s, "rss_base_mb": base, "device": f"OpenVINO GenAI {ovg.__version__} LLMPipeline CPU",
            "timing": "LLMPipeline perf_metrics (TTFT, TPOT)"}


def w_transformers(spec):
    import torch

    torch.set_num_threads(spec["threads"])
    base = _rss()
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["work"] + "/hf", local_files_only=True, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    state = {}

    def prefill(ids):
        out = model(torch.tensor([ids]), use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1].numpy()

    def step(tok):
        out = model(torch.tensor([[tok]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1].numpy()

    with torch.inference_mode():
        timing = time_decoding(prefill, step, spec["ids"], spec["new_tokens"], spec["repeats"])
    import transformers

    return {**timing, "load_s": load_s, "rss_base_mb": base,
            "device": f"transformers {transformers.__version__} eager ({model.config._attn_implementation}), torch {torch.__version__}"}


def w_llamacpp(spec):
    base = _rss()
    import llama_cpp

    path = Path(spec["work"]) / f"gguf-{spec['precision']}.gguf"
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=_capacity(spec) + 8, n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_batch=max(64, len(spec["ids"])), logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0

    n_vocab = llm.n_vocab()

    def last_logits():  # the context's logits of the last evaluated token (Llama.scores needs logits_all)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def prefill(ids):
        llm.reset()
        llm.eval(ids)
        return last_logits()

    def step(tok):
        llm.eval([tok])
        return last_logits()

    timing = time_decoding(prefill, step, spec["ids"], spec["new_tokens"], spec["repeats"])
    return {**timing, "load_s": load_s, "rss_base_mb": base, "device": f"llama-cpp-python {llama_cpp.__version__}"}


def w_ceilings(spec):
    """sgemm FLOP/s and memory read bandwidth at the benchmark's thread count (torch)."""
    import torch

    torch.set_num_threads(spec["threads"])
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    flops = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        flops.append(5 * 2 * n ** 3 / (time.perf_counter() - t0))
    x = torch.ones(128 * 1024 * 1024 // 4 * 4)  # 512 MB of float32: far beyond the caches
    x.sum()
    bw = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum()
        bw.append(x.numel() * 4 / (time.perf_counter() - t0))
    # the decode-shaped product: one row times a weight matrix (GEMV), 768 x 2048 fp32, in cache or not
    w = torch.randn(768, 2048)
    v = torch.randn(1, 768)
    for _ in range(10):
        v @ w
    t0 = time.perf_counter()
    for _ in range(200):
        v @ w
    gemv = 200 * 2 * 768 * 2048 / (time.perf_counter() - t0)
    return {"matmul_gflops": max(flops) / 1e9, "matmul_gflops_median": statistics.median(flops) / 1e9,
            "read_gb_s": max(bw) / 1e9, "read_gb_s_median": statistics.median(bw) / 1e9,
            "gemv_in_cache_gflops": gemv / 1e9, "device": f"torch {torch.__version__}, {spec['threads']} threads"}


def w_ab(spec):
    """One graph file of an A/B: a bare ONNX file with the bundle's config, the runtime's decoder
    (in-place KV for a fused graph), optional ONNX Runtime session config entries."""
    import dataclasses

    from toolkit import targets
    from toolkit.bundle import Bundle
    from toolkit.runtime import session as sessions

    b = Bundle.open(spec["work"])
    config = dict(spec.get("session_config", {}))
    loop = config.pop("decoder", None)  # decoder=shared | plain forces the loop (e.g. an old fused graph)
    t = targets.get("cpu")
    t = dataclasses.replace(t, options={**t.options, "intra_op_num_threads": spec["threads"], "session_config": config})
    s = sessions.load_model_file(spec["path"], b.model_config, t, "fp32")
    make = {"shared": sessions.SharedKVDecoder, "plain": sessions.Decoder}.get(loop, None)
    holder = {}

    def prefill(ids):
        holder["d"] = make(s, _capacity(spec)) if make else s.decoder(_capacity(spec))
        return holder["d"].prefill(ids)

    timing = time_decoding(prefill, lambda tok: holder["d"].step(tok), spec["ids"], spec["new_tokens"], spec["repeats"])
    return {**timing, "load_s": 0.0, "rss_base_mb": 0.0, "device": type(holder["d"]).__name__}


def ab(argv):
    """--ab BUNDLE LABEL=GRAPH[@KEY=VALUE,...] ... : decode speed of graph files (e.g. two builds of one
    variant, or one graph under two session settings), interleaved rounds, each in a fresh process."""
    ap = argparse.ArgumentParser(prog="compare_runtimes.py --ab")
    ap.add_argument("bundle", help="the bundle whose config and tokenizer the graphs share")
    ap.add_argument("graphs", nargs="+", metavar="LABEL=GRAPH[@KEY=VALUE,...]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    from toolkit.bundle import Bundle
    from toolkit.tokenizer import load_tokenizer

    ids = prompt_ids(load_tokenizer(Bundle.open(a.bundle).tokenizer_path), a.prompt_len)
    specs = {}
    for item in a.graphs:
        label, _, rest = item.partition("=")
        path, _, cfg = rest.partition("@")
        config = dict(kv.split("=", 1) for kv in cfg.split(",") if kv)
        specs[label] = {"runtime": "ab", "work": a.bundle, "path": path, "session_config": config, "ids": ids,
                        "new_tokens": a.new_tokens, "repeats": a.repeats, "threads": a.threads}
    got = {label: [] for label in specs}
    for _ in range(a.rounds):
        for label, spec in specs.items():
            got[label].append(measure(spec))
    for label, results in got.items():
        r = pool(results)
        print(f"{label:24s} " + (f"decode {r['decode_tok_s']:8.1f} tok/s  (min {min(r['decode_tok_s_all']):.1f}, max "
                                 f"{max(r['decode_tok_s_all']):.1f}, n={len(r['decode_tok_s_all'])}, {r['device']})"
                                 if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason')}"))
    print(f"load average {os.getloadavg()}")


WORKERS = {"ab": w_ab, "edgekit": w_edgekit, "ort-genai": w_genai, "openvino-genai": w_openvino, "transformers": w_transformers,
           "llama.cpp": w_llamacpp, "ceilings": w_ceilings}


def _rss():
    from toolkit.bench import _rss_mb

    return _rss_mb()


def worker(spec_json: str):
    spec = json.loads(spec_json)
    try:
        res = {"status": "ok", **WORKERS[spec["runtime"]](spec), "peak_rss_mb": peak_rss_mb()}
    except Exception as exc:
        res = {"status": "error", "reason": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"}
    print("\n" + MARK + json.dumps(res), flush=True)


def measure(spec: dict, timeout: int = 3600) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": "timeout"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"status": "error", "reason": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1]}"}


# --- the run -----------------------------------------------------------------------------------------------------
def leading_match(a, b) -> int:
    n = 0
    for x, y in zip(a or [], b or []):
        if x != y:
            break
        n += 1
    return n


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":
        return worker(argv[1])
    if argv and argv[0] == "--ab":
        return ab(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="a llama-style toolkit checkpoint (or run folder)")
    ap.add_argument("--work", required=True, help="folder for the converted models and the report")
    ap.add_argument("--precisions", default="fp32,int4")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole sweep, pooling each row's repeats")
    ap.add_argument("--ceilings", action="store_true", help="measure sgemm FLOP/s and memory bandwidth; floor speed")
    ap.add_argument("--llama-src", default=DEFAULT_LLAMA_SRC, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--out", help="report folder (default WORK/report)")
    a = ap.parse_args(argv)
    log = lambda *x: print(*x, flush=True)  # noqa: E731
    work, precisions = Path(a.work).resolve(), [p for p in a.precisions.split(",") if p]
    runtimes = [r for r in a.runtimes.split(",") if r]
    prep = prepare(Path(a.checkpoint), work, precisions, runtimes, a.llama_src, log)
    from toolkit.bundle import Bundle
    from toolkit.tokenizer import load_tokenizer

    bundle = Bundle.open(work / "bundle")
    cfg = bundle.model_config
    ids = prompt_ids(load_tokenizer(bundle.tokenizer_path), a.prompt_len)
    common = {"work": str(work), "ids": ids, "new_tokens": a.new_tokens, "repeats": a.repeats, "threads": a.threads}
    load = os.getloadavg()
    pairs = [(p, rt) for p in precisions for rt in runtimes]
    raw = {pair: [] for pair in pairs}
    ceilings = []
    for r in range(a.rounds):
        log(f"round {r + 1}/{a.rounds}")
        if a.ceilings:  # measured in every round, between the rows, so load drifts hit both alike
            ceilings.append(measure({**common, "runtime": "ceilings"}))
            log(f"  ceilings: {json.dumps({k: round(v, 2) for k, v in ceilings[-1].items() if isinstance(v, float)})}")
        for p, rt in pairs:
            key = f"{rt}/{p}"
            if key in prep:
                res = {"status": "unavailable", "reason": prep[key]}
            elif rt == "transformers" and p != "fp32":
                res = {"status": "unavailable", "reason": "transformers eager is measured in fp32 only"}
            else:
                res = measure({**common, "runtime": rt, "precision": p, "variant": f"{p}-fused"})
            raw[(p, rt)].append(res)
            log(f"  {rt:15s} {p:5s} " + (f"decode {res['decode_tok_s']:8.1f} tok/s  ttft {res['ttft_ms']:7.1f} ms  "
                                         f"peak {res['peak_rss_mb']:6.0f} MB" if res["status"] == "ok"
                                         else f"{res['status']}: {res.get('reason')}"))
    rows = []
    for (p, rt), got in raw.items():
        res = pool(got)
        if res.get("status") == "ok" and rt == "ort-genai":
            res["decode_tok_s_native_loop"] = statistics.median(g["decode_tok_s_native_loop"] for g in got if g.get("status") == "ok")
        row = {"runtime": rt, "precision": p, **res}
        row.pop("ttft_ms_all", None)
        rows.append(row)
    ours = {r["precision"]: r for r in rows if r["runtime"] == "edgekit" and r["status"] == "ok"}
    for r in rows:
        mine = ours.get(r["precision"])
        if r["status"] == "ok" and mine:
            r["edgekit_vs_this"] = mine["decode_tok_s"] / r["decode_tok_s"]
            r["greedy_match_edgekit"] = f"{leading_match(mine.get('tokens'), r.get('tokens'))}/{len(mine.get('tokens') or [])}"
    report = {"checkpoint": str(a.checkpoint), "model": cfg.__dict__.copy(),
              "settings": {**{k: v for k, v in common.items() if k != "ids"}, "rounds": a.rounds},
              "prompt_len": a.prompt_len, "loadavg": [list(load), list(os.getloadavg())], "rows": rows}
    if a.ceilings:
        ok = [c for c in ceilings if c.get("status") == "ok"]
        c = dict(ok[0]) if ok else ceilings[0]
        for key in ("matmul_gflops", "read_gb_s", "gemv_in_cache_gflops", "matmul_gflops_median", "read_gb_s_median"):
            if ok:
                c[key] = statistics.median(x[key] for x in ok)
        c["rounds"] = len(ok)
        params = _params(cfg)
        if c.get("status") == "ok":
            floor_s = max(2 * params / (c["matmul_gflops"] * 1e9), 4 * params / (c["read_gb_s"] * 1e9))
            c.update(params=params, weight_bytes_fp32=4 * params, floor_ms_per_token=floor_s * 1e3,
                     floor_tok_s=1 / floor_s)
            for r in rows:
                if r["status"] == "ok" and r["precision"] == "fp32":
                    r["fraction_of_floor"] = r["decode_tok_s"] / c["floor_tok_s"]
        report["ceilings"] = c
        log(f"  ceilings: {json.dumps({k: v for k, v in c.items() if k != 'status'})}")
    out = Path(a.out) if a.out else work / "report"
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.pop("tokens", None)
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "compare.md").write_text(render(report))
    log(f"report: {out / 'compare.md'}")


def _params(cfg) -> int:
    C, F, V, L = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.n_layers
    attn = C * cfg.n_heads * cfg.head_dim + 2 * C * cfg.kv_heads * cfg.head_dim + cfg.n_heads * cfg.head_dim * C
    ffn = 3 * C * F if cfg.ffn_type == "swiglu" else 2 * C * F
    return L * (attn + ffn) + V * C  # matmul weights read per token (a tied table once, as the head)


def render(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Runtimes side by side — {report['checkpoint']}", "",
             f"batch 1, prompt {report['prompt_len']} tokens, {s['new_tokens']} greedy tokens, {s['threads']} thread(s), "
             f"median of {s['repeats']} repeats x {s.get('rounds', 1)} rounds (interleaved); load average {report['loadavg']}", "",
             "| runtime | precision | decode tok/s | spread | TTFT ms | load s | peak RSS MB | edgekit / this | greedy = edgekit | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['runtime']} | {r['precision']} | **{r['status']}**: {r.get('reason')} | | | | | | | |")
            continue
        extra = f" (own loop {r['decode_tok_s_native_loop']:.1f})" if r.get("decode_tok_s_native_loop") else ""
        lines.append(f"| {r['runtime']} | {r['precision']} | {r['decode_tok_s']:.1f}{extra} | {r['decode_tok_s_spread']:.1f} | "
                     f"{r['ttft_ms']:.1f} | {r['load_s']:.2f} | {r['peak_rss_mb']:.0f} | {r.get('edgekit_vs_this', float('nan')):.2f} | "
                     f"{r.get('greedy_match_edgekit', '-')} | {r.get('device', '')} |")
    c = report.get("ceilings")
    if c and c.get("status") == "ok":
        lines += ["", f"Ceilings ({c['device']}; per round the best of 7 trials, median over {c.get('rounds', 1)} round(s)): "
                  f"sgemm {c['matmul_gflops']:.1f} GFLOP/s, memory read {c['read_gb_s']:.1f} GB/s, in-cache GEMV "
                  f"{c['gemv_in_cache_gflops']:.1f} GFLOP/s; "
                  f"{c['params'] / 1e6:.1f} M matmul parameters = {c['weight_bytes_fp32'] / 1e6:.0f} MB fp32 → floor "
                  f"{c['floor_ms_per_token']:.2f} ms/token = {c['floor_tok_s']:.1f} tok/s."]
        for r in report["rows"]:
            if r.get("fraction_of_floor") is not None:
                lines.append(f"- {r['runtime']} fp32: {r['fraction_of_floor'] * 100:.0f}% of floor speed")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
