"""Reference for the data-pipeline benchmark: HF `tokenizers` `encode_batch` on the same
cleaned documents and the same tokenizer.json that `llmtool data build` used.

    llmtool data build CONFIG --force --dump-text docs.jsonl
    python bench/tokenize_ref.py docs.jsonl DATASET_DIR/tokenizer.json

Prints documents, bytes, tokens, the best wall time of `--repeat` runs and MB/s. Only the
tokenization is timed (not reading the file), which is what the Rust pipeline is compared to.
"""

import argparse
import json
import time

from tokenizers import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("docs", help="JSON lines, one string per document (--dump-text)")
    parser.add_argument("tokenizer", help="the dataset's tokenizer.json")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with open(args.docs, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    tokenizer = Tokenizer.from_file(args.tokenizer)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)

    best = float("inf")
    tokens = 0
    for _ in range(args.repeat):
        start = time.perf_counter()
        encodings = tokenizer.encode_batch(docs, add_special_tokens=False)
        best = min(best, time.perf_counter() - start)
        tokens = sum(len(e.ids) for e in encodings) + len(docs)  # + one EOS per document
    print(
        f"documents {len(docs)}  bytes {n_bytes}  tokens (with EOS) {tokens}  "
        f"encode_batch best of {args.repeat}: {best:.3f} s  {n_bytes / best / 1e6:.2f} MB/s"
    )


if __name__ == "__main__":
    main()
