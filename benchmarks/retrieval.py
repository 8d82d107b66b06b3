"""Benchmark: exact top-10 retrieval and MiniLM embedding, elm-jax against peers.

One run on one machine compares side by side:
- exact top-10 by inner product for 32 queries of dimension 384 against 30k, 300k
  and 3M library rows: the elm-jax Retriever (JAX matrix product + `lax.top_k`,
  chunked), a numpy reference, and FAISS `IndexFlatIP` with its default settings and
  with `distance_compute_blas_threshold = 20`, which sends 32 queries down its BLAS
  path (the default threshold, 128000 in faiss-cpu 1.15, uses the slower scalar path
  for small query batches); results are checked for identical row indices;
- the achieved GFLOP/s of each against the machine's measured float32 matrix
  product peak (a large `jnp.dot` timed alone);
- MiniLM embedding throughput (sentences/s): the JAX embedder against
  sentence-transformers (PyTorch) on CPU.

Usage: python benchmarks/retrieval.py [--quick]   (--quick skips 3M rows)
Prints a Markdown section; --output also writes it to a file. The 3M-row case holds
two 4.6 GB copies of the keys at once (numpy and JAX, then numpy and FAISS), so it
needs about 10 GB of free memory.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_TORCH", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from elm_jax.data import fetch
from elm_jax.models import embedders
from elm_jax.retrieval import retriever as retriever_lib

DIM, QUERIES, K = 384, 32, 10
EMBEDDING_TASKS = ("strategyqa", "epistemic_reasoning", "timedial")


def _median_seconds(fn, repeats: int) -> float:
  fn()  # Warm-up: compilation, caches.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _random_unit_rows(rows: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  out = rng.standard_normal((rows, DIM), dtype=np.float32)
  for start in range(0, rows, 1 << 18):
    block = out[start:start + (1 << 18)]
    block /= np.linalg.norm(block, axis=1, keepdims=True)
  return out


def measure_peak() -> float:
  """GFLOP/s of a 2048^3 float32 jnp.dot, timed alone."""
  n = 2048
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
  dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  seconds = _median_seconds(lambda: dot(a, a).block_until_ready(), 5)
  return 2 * n ** 3 / seconds / 1e9


def bench_size(rows: int, repeats: int) -> dict:
  import faiss  # pylint: disable=g-import-not-at-top
  keys = _random_unit_rows(rows, seed=rows)
  queries = _random_unit_rows(QUERIES, seed=1)
  flops = 2 * QUERIES * rows * DIM
  result = {"rows": rows}

  _, reference = retriever_lib.numpy_top_k(queries, keys, K)
  result["numpy"] = _median_seconds(lambda: retriever_lib.numpy_top_k(queries, keys, K),
                                    repeats)

  retriever = retriever_lib.Retriever(keys, max_k=K)
  _, jax_indices = retriever.search(queries, K)
  result["jax"] = _median_seconds(lambda: retriever.search(queries, K), repeats)
  result["jax_identical"] = bool((jax_indices == reference).all())
  del retriever
  gc.collect()

  index = faiss.IndexFlatIP(DIM)
  index.add(keys)
  default_threshold = faiss.cvar.distance_compute_blas_threshold
  _, faiss_indices = index.search(queries, K)
  result["faiss_default"] = _median_seconds(lambda: index.search(queries, K), repeats)
  result["faiss_default_identical"] = bool((faiss_indices == reference).all())
  faiss.cvar.distance_compute_blas_threshold = 20
  _, faiss_indices = index.search(queries, K)
  result["faiss_blas"] = _median_seconds(lambda: index.search(queries, K), repeats)
  result["faiss_blas_identical"] = bool((faiss_indices == reference).all())
  faiss.cvar.distance_compute_blas_threshold = default_threshold
  result["faiss_default_threshold"] = default_threshold
  for name in ("numpy", "jax", "faiss_default", "faiss_blas"):
    result[f"{name}_gflops"] = flops / result[name] / 1e9
  del index, keys
  gc.collect()
  return result


def bench_embedding(count: int) -> dict:
  """Sentences/s of the JAX MiniLM and of sentence-transformers on real inputs."""
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  per_task = []
  for task in EMBEDDING_TASKS:
    with open(fetch.ensure("bigbench") / task / "task.json", encoding="utf-8") as f:
      per_task.append([e["input"] for e in json.load(f)["examples"]])
  # Interleaved, so short questions and longer premises share the set.
  texts = [t for group in zip(*per_task) for t in group][:count]
  model_dir = fetch.ensure("minilm")
  jax_model = embedders.load_minilm(model_dir)
  torch_model = SentenceTransformer(str(model_dir), device="cpu")
  tokens = [len(ids) for ids in jax_model.tokenize(texts, 256)]
  jax_seconds = _median_seconds(lambda: jax_model.embed(texts), 3)
  with torch.inference_mode():
    torch_seconds = _median_seconds(
        lambda: torch_model.encode(texts, batch_size=64, convert_to_numpy=True), 3)
  diff = float(np.abs(jax_model.embed(texts) - torch_model.encode(texts, batch_size=64)).max())
  return {"sentences": len(texts), "mean_tokens": float(np.mean(tokens)),
          "jax_per_s": len(texts) / jax_seconds, "torch_per_s": len(texts) / torch_seconds,
          "torch_threads": torch.get_num_threads(), "max_abs_diff": diff}


def render(results: list[dict], peak: float, embedding: dict, argv: list[str]) -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  import faiss  # pylint: disable=g-import-not-at-top
  lines = [
      "## Retrieval: exact top-10 and MiniLM embedding",
      "",
      f"Command: `python benchmarks/retrieval.py {' '.join(argv)}`".rstrip() + "  ",
      f"Machine: {cpu}, {os.cpu_count()} cores, {jax.devices()[0].platform} "
      f"({len(jax.devices())} JAX devices); jax {jax.__version__}, numpy "
      f"{np.__version__}, faiss-cpu {faiss.__version__}  ",
      f"Date: {datetime.date.today().isoformat()}; load average at the end "
      f"{os.getloadavg()[0]:.1f} (above the core count means other processes shared "
      "the CPU and the figures are noisy)  ",
      f"Measured float32 matmul peak (2048^3 `jnp.dot` alone): {peak:.0f} GFLOP/s",
      "",
      f"Exact top-{K}, {QUERIES} queries, dimension {DIM}; median seconds (GFLOP/s, "
      "share of peak). `identical` compares row indices with the numpy reference.",
      "",
      "| rows | elm-jax | numpy | FAISS default | FAISS BLAS (threshold 20) "
      "| FAISS BLAS / elm-jax | identical (jax, faiss default, faiss BLAS) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in results:
    cells = [f"{r['rows']:,}"]
    for name in ("jax", "numpy", "faiss_default", "faiss_blas"):
      cells.append(f"{r[name] * 1e3:.1f} ms ({r[name + '_gflops']:.0f}, "
                   f"{r[name + '_gflops'] / peak:.0%})")
    cells.append(f"{r['faiss_blas'] / r['jax']:.2f}x")
    cells.append(", ".join("yes" if r[n] else "NO" for n in
                           ("jax_identical", "faiss_default_identical",
                            "faiss_blas_identical")))
    lines.append("| " + " | ".join(cells) + " |")
  lines += [
      "",
      f"MiniLM embedding, {embedding['sentences']} BIG-bench inputs "
      f"({', '.join(EMBEDDING_TASKS)}; mean "
      f"{embedding['mean_tokens']:.0f} tokens), batch 64, CPU: elm-jax (JAX) "
      f"{embedding['jax_per_s']:.0f} sentences/s, sentence-transformers (PyTorch, "
      f"{embedding['torch_threads']} threads) {embedding['torch_per_s']:.0f} sentences/s, "
      f"ratio {embedding['jax_per_s'] / embedding['torch_per_s']:.2f}; max abs "
      f"difference {embedding['max_abs_diff']:.1e}.",
      "",
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="skip the 3M-row library")
  parser.add_argument("--sizes", help="comma-separated row counts (overrides the default)")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure")
  parser.add_argument("--sentences", type=int, default=512, help="sentences embedded")
  parser.add_argument("--output", help="also write the Markdown section here")
  args = parser.parse_args(argv)
  sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else
           [30_000, 300_000] + ([] if args.quick else [3_000_000]))

  peak = measure_peak()
  results = []
  for rows in sizes:
    results.append(bench_size(rows, args.repeats))
    print(f"{rows} rows: " + json.dumps(results[-1]), file=sys.stderr, flush=True)
  embedding = bench_embedding(args.sentences)
  text = render(results, peak, embedding, argv)
  print(text)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
