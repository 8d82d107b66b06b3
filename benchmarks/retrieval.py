"""Benchmark: exact top-10 retrieval and MiniLM embedding, elm-jax against peers.

One run on one machine compares side by side:
- exact top-10 by inner product for 32 queries of dimension 384 against 30k, 300k
  and 3M library rows: the elm-jax Retriever (block maxima, then rescoring, see
  elm_jax/retrieval/retriever.py), a numpy reference, and FAISS `IndexFlatIP` with
  its default settings and with `distance_compute_blas_threshold = 20`, which sends
  32 queries down its BLAS path (the default threshold, 128000 in faiss-cpu 1.15,
  uses the slower scalar path for small query batches); results are checked for
  identical row indices;
- the achieved GFLOP/s of each against the machine's measured float32 matrix
  product peak (a large `jnp.dot` timed alone), and the rate of the bare product of
  the same shape (one `jnp.dot` of queries and keys, no top-k);
- the same elm-jax search with the rows sharded over one JAX CPU device per core
  (`--xla_force_host_platform_device_count=CORES --xla_cpu_multi_thread_eigen=false`),
  timed in a subprocess because XLA flags are fixed when JAX starts. The peak is
  measured in both settings and the larger one counts;
- MiniLM embedding throughput (sentences/s): the JAX embedder against
  sentence-transformers (PyTorch) on CPU.

Usage: python benchmarks/retrieval.py [--quick]   (--quick skips 3M rows)
Prints a Markdown section; --output also writes it to a file. The BLAS kernel that
numpy and FAISS load is printed with the figures: OPENBLAS_CORETYPE decides it, so
run with the one that is fastest for the peers on the machine (on AMD Zen 5,
`env -u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE=SkylakeX`; FAISS's bundled OpenBLAS
detects that CPU as Barcelona and runs at half speed without it). The 3M-row case keeps
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
import subprocess
import sys
import time

os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_TORCH", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from elm_jax import file_io
from elm_jax.data import fetch
from elm_jax.models import embedders
from elm_jax.retrieval import retriever as retriever_lib

DIM, QUERIES, K = 384, 32, 10
EMBEDDING_TASKS = ("strategyqa", "epistemic_reasoning", "timedial")


# Pause before each contender is timed. OpenBLAS, OpenMP (FAISS) and XLA keep their
# worker threads spinning for a while after a call, and without the pause those
# threads take CPU from whichever library runs next.
_SETTLE_SECONDS = 1.0


def _median_seconds(fn, repeats: int, min_seconds: float = 1.0) -> float:
  """Median time of `fn` over at least `repeats` runs and at least `min_seconds`."""
  time.sleep(_SETTLE_SECONDS)
  fn()  # Warm-up: compilation, caches.
  times = []
  while len(times) < repeats or sum(times) < min_seconds:
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


PER_CORE_FLAGS = ("--xla_force_host_platform_device_count={cores} "
                  "--xla_cpu_multi_thread_eigen=false")


def measure_peak() -> float:
  """GFLOP/s of a 2048^3 float32 jnp.dot, timed alone (rows split over all devices)."""
  n = 2048
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
  if len(jax.devices()) > 1:
    mesh = retriever_lib.rows_mesh()
    a = jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows")))
  dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  seconds = _median_seconds(lambda: dot(a, a).block_until_ready(), 5)
  return 2 * n ** 3 / seconds / 1e9


def per_core_worker(sizes: list[int], repeats: int, chunk_size: int,
                    block_size: int | None) -> None:
  """Prints one JSON line: the peak and the sharded search time for each size."""
  mesh = retriever_lib.rows_mesh()
  record = {"devices": len(jax.devices()), "peak": measure_peak(), "sizes": {}}
  for rows in sizes:
    keys = _random_unit_rows(rows, seed=rows)
    queries = _random_unit_rows(QUERIES, seed=1)
    _, reference = retriever_lib.numpy_top_k(queries, keys, K)
    retriever = retriever_lib.Retriever(keys, chunk_size=chunk_size, block_size=block_size,
                                        mesh=mesh)
    _, indices = retriever.search(queries, K)
    record["sizes"][rows] = {
        "seconds": _median_seconds(lambda: retriever.search(queries, K), repeats),
        "identical": bool((indices == reference).all())}
    del retriever, keys
    gc.collect()
  print(json.dumps(record))


def _run_worker(flag: str, sizes: list[int], repeats: int, chunk_size: int,
                block_size: int | None, env: dict[str, str]) -> dict:
  """Runs this script with `flag` in a subprocess and returns its JSON line."""
  command = [sys.executable, os.path.abspath(__file__), flag,
             "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats),
             "--chunk-size", str(chunk_size)]
  if block_size is not None:
    command += ["--block-size", str(block_size)]
  done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def run_per_core(sizes: list[int], repeats: int, chunk_size: int,
                 block_size: int | None) -> dict:
  """Runs `per_core_worker` in a subprocess with one JAX CPU device per core."""
  env = dict(os.environ, XLA_FLAGS=PER_CORE_FLAGS.format(cores=os.cpu_count()))
  record = _run_worker("--per-core-worker", sizes, repeats, chunk_size, block_size, env)
  record["sizes"] = {int(rows): value for rows, value in record["sizes"].items()}
  return record


def blas_kernels() -> str:
  """Returns the OpenBLAS builds numpy and FAISS loaded, with their kernels."""
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  found = [f"{os.path.basename(info['filepath']).split('-')[0]} "
           f"{info.get('architecture')}"
           for info in threadpoolctl.threadpool_info() if info["internal_api"] == "openblas"]
  return ", ".join(sorted(found)) or "none found"


def bench_size(rows: int, repeats: int, chunk_size: int, block_size: int | None) -> dict:
  import faiss  # pylint: disable=g-import-not-at-top
  keys = _random_unit_rows(rows, seed=rows)
  queries = _random_unit_rows(QUERIES, seed=1)
  flops = 2 * QUERIES * rows * DIM
  result = {"rows": rows}

  _, reference = retriever_lib.numpy_top_k(queries, keys, K)
  result["numpy"] = _median_seconds(lambda: retriever_lib.numpy_top_k(queries, keys, K),
                                    repeats)

  retriever = retriever_lib.Retriever(keys, chunk_size=chunk_size, block_size=block_size)
  _, jax_indices = retriever.search(queries, K)
  result["jax"] = _median_seconds(lambda: retriever.search(queries, K), repeats)
  result["jax_identical"] = bool((jax_indices == reference).all())
  product = jax.jit(lambda q, x: jax.lax.dot_general(
      x, q, (((1,), (1,)), ((), ())), precision=jax.lax.Precision.HIGHEST))
  device_queries = jnp.asarray(queries)
  result["product"] = _median_seconds(
      lambda: product(device_queries, retriever.keys).block_until_ready(), repeats)
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
  for name in ("numpy", "jax", "product", "faiss_default", "faiss_blas"):
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


def _range(values, fmt) -> str:
  low, high = min(values), max(values)
  return format(low, fmt) if format(low, fmt) == format(high, fmt) else (
      f"{format(low, fmt)}-{format(high, fmt)}")


def _verdict(met: list[bool]) -> str:
  if all(met):
    return "met"
  return f"met at {sum(met)} of {len(met)} sizes" if any(met) else "NOT met"


def goal_summary(results: list[dict], peak: float) -> str:
  """Returns Markdown lines stating, from the figures, whether each speed goal was met."""
  lines = ["Against the goals (at least as fast as FAISS `IndexFlatIP` on its BLAS path; "
           "at least 60% of the measured matrix-product peak):"]
  for name, key in (("one device", "jax"), ("one device per core", "per_core")):
    speedups = [r["faiss_blas"] / r[key] for r in results]
    shares = [r[key + "_gflops"] / peak for r in results]
    lines.append(
        f"- elm-jax, {name}: {_range(speedups, '.2f')}x the speed of FAISS BLAS "
        f"({_verdict([x >= 1 for x in speedups])}), {_range(shares, '.0%')} of peak "
        f"({_verdict([x >= 0.6 for x in shares])}).")
  of_product = [r["product"] / r["jax"] for r in results]
  lines.append(
      f"- On one device the search runs at {_range(of_product, '.2f')}x the speed of "
      f"one bare XLA product of the same shape (above 1 where the chunks keep the "
      f"scores in cache). That product, with only {QUERIES} columns on one side, "
      f"reaches about half of the square product's rate on this CPU, and the share of "
      f"peak cannot exceed it by much.")
  return "\n".join(lines)


def render(results: list[dict], peak: float, peaks: dict, devices: int,
           embedding: dict, argv: list[str]) -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  import faiss  # pylint: disable=g-import-not-at-top
  env_prefix = ""
  if "OPENBLAS_CORETYPE" in os.environ:
    env_prefix = ("env " + ("" if "OPENBLAS_L2_SIZE" in os.environ else "-u OPENBLAS_L2_SIZE ")
                  + f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} ")
  lines = [
      "## Retrieval: exact top-10 and MiniLM embedding",
      "",
      f"Command: `{env_prefix}python benchmarks/retrieval.py {' '.join(argv)}`".rstrip()
      + "  ",
      f"Machine: {cpu}, {os.cpu_count()} cores, {jax.devices()[0].platform} "
      f"({len(jax.devices())} JAX devices); jax {jax.__version__}, numpy "
      f"{np.__version__}, faiss-cpu {faiss.__version__}  ",
      f"Date: {datetime.date.today().isoformat()}; load average at the end "
      f"{os.getloadavg()[0]:.1f} (above the core count means other processes shared "
      "the CPU and the figures are noisy)  ",
      f"Measured float32 matmul peak (2048^3 `jnp.dot` alone): {peak:.0f} GFLOP/s, the "
      f"larger of {peaks['one device']:.0f} (one device, default flags) and "
      f"{peaks['per core']:.0f} (split over {devices} devices, one per core)  ",
      f"BLAS kernels loaded (numpy, FAISS): {blas_kernels()}",
      "",
      f"Exact top-{K}, {QUERIES} queries, dimension {DIM}; median seconds (GFLOP/s, "
      "share of peak). `bare product` is one `jnp.dot` of the queries and all keys on "
      f"one device, without top-k. `per core` shards the rows over {devices} JAX CPU "
      "devices, one thread each. `identical` compares row indices with the numpy "
      "reference.",
      "",
      "| rows | elm-jax | elm-jax per core | bare product | numpy | FAISS default "
      "| FAISS BLAS (threshold 20) | speed-up over FAISS BLAS (elm-jax, per core) "
      "| identical (jax, per core, faiss default, faiss BLAS) |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results:
    cells = [f"{r['rows']:,}"]
    for name in ("jax", "per_core", "product", "numpy", "faiss_default", "faiss_blas"):
      cells.append(f"{r[name] * 1e3:.1f} ms ({r[name + '_gflops']:.0f}, "
                   f"{r[name + '_gflops'] / peak:.0%})")
    cells.append(f"{r['faiss_blas'] / r['jax']:.2f}x, {r['faiss_blas'] / r['per_core']:.2f}x")
    cells.append(", ".join("yes" if r[n] else "NO" for n in
                           ("jax_identical", "per_core_identical",
                            "faiss_default_identical", "faiss_blas_identical")))
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
      goal_summary(results, peak),
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
  parser.add_argument("--chunk-size", type=int, default=retriever_lib.DEFAULT_CHUNK_SIZE)
  parser.add_argument("--block-size", type=int, help="rows per block (default: automatic)")
  parser.add_argument("--output", help="also write the Markdown section here")
  parser.add_argument("--per-core-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else
           [30_000, 300_000] + ([] if args.quick else [3_000_000]))

  if args.per_core_worker:
    per_core_worker(sizes, args.repeats, args.chunk_size, args.block_size)
    return 0

  peaks = {"one device": measure_peak()}
  results = []
  for rows in sizes:
    results.append(bench_size(rows, args.repeats, args.chunk_size, args.block_size))
    print(f"{rows} rows: " + json.dumps(results[-1]), file=sys.stderr, flush=True)
  per_core = run_per_core(sizes, args.repeats, args.chunk_size, args.block_size)
  print("per core: " + json.dumps(per_core), file=sys.stderr, flush=True)
  peaks["per core"] = per_core["peak"]
  for r in results:
    r["per_core"] = per_core["sizes"][r["rows"]]["seconds"]
    r["per_core_identical"] = per_core["sizes"][r["rows"]]["identical"]
    r["per_core_gflops"] = 2 * QUERIES * r["rows"] * DIM / r["per_core"] / 1e9
  embedding = bench_embedding(args.sentences)
  text = render(results, max(peaks.values()), peaks, per_core["devices"], embedding, argv)
  print(text)
  if args.output:
    file_io.write_text_atomic(args.output, text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
