"""What another precision does to the vectors and the speed (docs/devices.md): all-MiniLM-L6-v2
on real BBC News articles (title + body, the demo's source text), encoded by the app's own
encoder (``encoders.load``, as a worker with ``EMBEDDINGS_PRECISION=P`` on ``--device``) at
float32, bfloat16 and float16; each precision's vectors against float32's on the same device
(cosine per article: minimum, 1st percentile, mean) and its rows/s against float32's (raw encode
of the same texts with the same texts per forward pass, fastest of ``--repeat`` interleaved runs).
On another device than the CPU, every precision's vectors are also compared with CPU float32's
(what a CPU worker or the web process computes for a float32 version).

Run: ``python -m benchmarks.precision [--device cuda] [--docs N]``.
"""

from __future__ import annotations

import argparse
import os
import time

from benchmarks import harness

PRECISIONS = ("float32", "bfloat16", "float16")


def measure(alias: str, docs: int, repeat: int) -> list[harness.Row]:
    import numpy as np

    from embeddings_app import devices, encoders
    from embeddings_app.config import get_config
    from embeddings_app.fields import SOURCE_SEPARATOR
    from project.news.corpus import iter_articles

    texts = [SOURCE_SEPARATOR.join(part for part in (a.title, a.body) if part)
             for a in iter_articles(docs)]
    spec = get_config().model(alias)
    loaded = {}
    for precision in PRECISIONS:
        os.environ[devices.PRECISION_ENV] = precision
        encoder = encoders.load(spec)
        assert encoder.precision == precision
        encoder.encode_documents(texts[:8])  # warm-up
        loaded[precision] = encoder
        encoders.clear_cache()  # the next precision loads its own model; this one stays here
    vectors: dict[str, np.ndarray] = {}
    seconds: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    for attempt in range(repeat):  # interleaved, so a load change on the machine hits all
        order = PRECISIONS if attempt % 2 == 0 else tuple(reversed(PRECISIONS))
        for precision in order:
            started = time.perf_counter()
            vectors[precision] = loaded[precision].encode_documents(texts)
            seconds[precision].append(time.perf_counter() - started)
    reference = vectors["float32"]
    device = loaded["float32"].device
    per_pass = loaded["float32"].encode_batch_size
    base_rate = docs / min(seconds["float32"])
    rows = []

    def agreement(precision: str, against: np.ndarray, name: str) -> harness.Row:
        other = vectors[precision]
        cosines = np.einsum("ij,ij->i", against, other) / (
            np.linalg.norm(against, axis=1) * np.linalg.norm(other, axis=1))
        figures = {"min": float(cosines.min()), "p01": float(np.percentile(cosines, 1)),
                   "mean": float(cosines.mean()), "seconds": seconds[precision],
                   "float32_seconds": seconds["float32"]}
        return harness.Row(
            "precision", f"{alias} at {precision} on {device}: min cosine with {name}, "
            f"{docs} articles", figures["min"], "cosine", "VERIFY_THRESHOLD", 0.999, None,
            ">= 0.999", figures["min"] >= 0.999, figures)

    if device != "cpu":
        os.environ[devices.DEVICE_ENV] = "cpu"
        os.environ[devices.PRECISION_ENV] = "float32"
        on_cpu = encoders.load(spec).encode_documents(texts)
        rows += [agreement(precision, on_cpu, "CPU float32") for precision in PRECISIONS]
    for precision in PRECISIONS[1:]:
        rate = docs / min(seconds[precision])
        rows.append(agreement(precision, reference, f"float32 on {device}"))
        rows.append(harness.Row(
            "precision", f"{alias} at {precision} on {device}, raw encode, {per_pass} texts "
            "per pass", rate, "rows/s", f"float32 on {device}", base_rate, rate / base_rate))
    return rows


def main(argv: list[str] | None = None) -> list[harness.Row]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="EMBEDDINGS_DEVICE: cpu, cuda, cuda:N")
    parser.add_argument("--docs", type=int, default=200, help="articles")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs of each side")
    parser.add_argument("--alias", default="minilm")
    args = parser.parse_args(argv)
    os.environ["EMBEDDINGS_DEVICE"] = args.device
    harness.setup_django()
    rows = measure(args.alias, args.docs, args.repeat)
    harness.print_table(rows)
    print("machine:", harness.machine())
    for row in rows:
        if row.unit == "cosine":
            print(f"{row.measure}: min {row.value:.7f}, p01 {row.extra['p01']:.7f}, "
                  f"mean {row.extra['mean']:.7f}")
    print("results:", harness.write_json("precision", rows, vars(args)))
    return rows


if __name__ == "__main__":
    main()
