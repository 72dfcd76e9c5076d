"""Bytes per target token and gradient error of the store's codecs on synthetic teachers.

Teacher: at each position a Zipf distribution over a random permutation of a 128,256-token
vocabulary (Llama-3's), its exponent solved for an entropy; the entropies of the positions are
spread uniformly over [0.5 H, 1.5 H] around the profile's mean H in {0.5, 2, 4} nats (with one
fixed exponent every position's sorted log-probs would be identical and zstd would store them
for free). Each codec's output is written with the real ShardWriter and read back with the real
StoreReader; bytes are the shard files on disk.

Gradient error (forward KL w.r.t. student logits s is q - p): s = log p + N(0, 1), q = softmax(s);
with stored targets the gradient is q - p̂, where p̂ is the stored probability on each kept id
and the stored tail mass spread over all other ids in proportion to q (the tail-bucket loss).
    grad_l1      = mean over positions of ||p - p̂||_1 for one encoding
    grad_bias_l1 = mean ||p - E[p̂]||_1, E over the codec's randomness, computed exactly:
                   topk/topp/baseline are deterministic (= grad_l1); for `sampled`, E[count/N] is
                   the distribution drawn from, i.e. the teacher's top-256 probabilities and its
                   tail mass beyond them spread over the other ids in proportion to q.
The baseline ("int32 ids + fp16 log-probs, zstd") stores no tail; its p̂ spreads 1 - sum(p̂ kept).
Topk rows also give grad_l1_unquantized: the same k with exact log-probs and exact tail.

Last line: {"rows": [{"codec", "entropy_nats", "k", "bytes_per_token", "bytes_per_entry",
"grad_l1", "grad_bias_l1", ...}, ...]}
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from kdpipe.storage import CodecConfig, ShardWriter, StoreMeta, StoreReader, finalize_store
from kdpipe.storage.format import ZSTD_LEVEL

VOCAB = 128_256
SEQ = 500  # target positions per stored sequence
SAMPLED_FROM = 256


# ----------------------------------------------------------------------------------------------
# teachers in rank space: p_r for ranks r = 0..V-1; ids[i, r] = the token at rank r (top ranks only)


class Zipf:
    """p_r ∝ r^-a over ranks r = 1..V; log Z(a) by Euler-Maclaurin (exact to ~1e-15), so the top
    ranks of 10,000 positions need no V-wide arrays."""

    HEAD = 1024  # ranks summed exactly; the rest by Euler-Maclaurin

    def __init__(self, vocab: int = VOCAB) -> None:
        self.V = vocab
        self.lr = np.log(np.arange(1, vocab + 1, dtype=np.float64))
        self.grid = np.linspace(0.4, 8.0, 800)
        self.ent = np.array([self._entropy(a) for a in self.grid])  # decreasing in a

    def log_z(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a, dtype=np.float64)
        head = np.exp(-a[:, None] * self.lr[None, :self.HEAD]).sum(axis=1)
        m, V = self.HEAD + 1.0, float(self.V)
        L = np.log(V / m)
        u = (1.0 - a) * L
        ratio = np.where(np.abs(u) < 1e-8, 1.0 + u / 2, np.expm1(u) / np.where(u == 0, 1.0, u))
        integral = m ** (1.0 - a) * L * ratio  # ∫_m^V x^-a dx
        f = lambda x: x ** -a  # noqa: E731
        f1 = lambda x: -a * x ** (-a - 1)  # noqa: E731
        f3 = lambda x: -a * (a + 1) * (a + 2) * x ** (-a - 3)  # noqa: E731
        tail = integral + (f(m) + f(V)) / 2 + (f1(V) - f1(m)) / 12 - (f3(V) - f3(m)) / 720
        return np.log(head + tail)

    def logp_top(self, a: np.ndarray, width: int) -> np.ndarray:
        """[n] exponents -> [n, width] log-probs of the top ranks (sorted descending)."""
        return -a[:, None] * self.lr[None, :width] - self.log_z(a)[:, None]

    def logp_into(self, a: np.ndarray, out: np.ndarray) -> np.ndarray:
        """[c] exponents -> out [c, V] log-probs over all ranks, without temporaries."""
        np.multiply(-a[:, None], self.lr[None, :], out=out)
        out -= self.log_z(a)[:, None]
        return out

    def _entropy(self, a: float) -> float:
        lp = -a * self.lr - self.log_z(np.array([a]))[0]
        return float(-(np.exp(lp) * lp).sum())

    def exponent(self, h: np.ndarray) -> np.ndarray:
        return np.interp(h, self.ent[::-1], self.grid[::-1])


def profile(zipf: Zipf, mean_h: float, n: int, rng: np.random.Generator):
    """-> exponents [n], top ids [n, 256] (distinct random ids per position)."""
    h = mean_h * rng.uniform(0.5, 1.5, n)
    a = zipf.exponent(h)
    ids = np.empty((n, SAMPLED_FROM), dtype=np.int64)
    draws = rng.integers(0, VOCAB, (n, SAMPLED_FROM + 64))
    for i in range(n):  # first 256 distinct draws, in draw order (a random injection of ranks)
        _, first = np.unique(draws[i], return_index=True)
        ids[i] = draws[i][np.sort(first)[:SAMPLED_FROM]]
    return a, ids


# ----------------------------------------------------------------------------------------------


def meta_for(codec: CodecConfig) -> StoreMeta:
    return StoreMeta(teacher="zipf", teacher_revision=None, tokenizer_fingerprint="bench", vocab_size=VOCAB,
                     recipe="bench", recipe_params={}, codec=codec, dataset_fingerprint="bench", generation_params={})


def write_store(path: Path, codec: CodecConfig, lp_top: np.ndarray, ids: np.ndarray, tokens: np.ndarray, k_in: int) -> int:
    """Write the positions as sequences of SEQ targets; -> shard bytes on disk."""
    n = lp_top.shape[0]
    with ShardWriter(path, meta_for(codec)) as w:
        for s, start in enumerate(range(0, n, SEQ)):
            sl = slice(start, min(n, start + SEQ))
            P = sl.stop - sl.start
            input_ids = np.concatenate([[tokens[sl.start]], tokens[sl]])  # a BOS-like first token
            w.add(f"seq{s:05d}", input_ids, np.arange(1, P + 1), ids[sl, :k_in], lp_top[sl, :k_in].astype(np.float32))
    m = finalize_store(path)
    return sum(s["bytes"] for s in m["shards"])


def read_estimates(path: Path, ids: np.ndarray, width: int):
    """-> p̂ on the top-`width` ranks [n, width] (0 where not kept), kept mask, tail [n], entries."""
    n = ids.shape[0]
    phat = np.zeros((n, width))
    kept = np.zeros((n, width), dtype=bool)
    tail = np.zeros(n)
    entries = 0
    order = np.argsort(ids[:, :width], axis=1)
    sorted_ids = np.take_along_axis(ids[:, :width], order, axis=1)
    for rec in StoreReader(path, shuffle=False, verify=False):
        s = int(rec.sample_id[3:])
        for j in range(len(rec.target_positions)):
            i = s * SEQ + j
            valid = rec.ids[j] >= 0
            got = rec.ids[j][valid]
            r = order[i][np.searchsorted(sorted_ids[i], got)]
            assert (ids[i, r] == got).all(), "stored id outside the teacher's top ranks"
            phat[i, r] = np.exp(rec.logprobs[j][valid].astype(np.float64))
            kept[i, r] = True
            tail[i] = rec.tail[j]
            entries += int(valid.sum())
    return phat, kept, tail, entries


def baseline_bytes(lp_top: np.ndarray, ids: np.ndarray, tokens: np.ndarray, k: int) -> tuple[int, np.ndarray]:
    """int32 ids + fp16 log-probs (+ the same input_ids/positions), zstd Arrow IPC."""
    n = lp_top.shape[0]
    rows = {"input_ids": [], "target_positions": [], "ids": [], "logprobs": []}
    for start in range(0, n, SEQ):
        sl = slice(start, min(n, start + SEQ))
        P = sl.stop - sl.start
        rows["input_ids"].append(np.concatenate([[tokens[sl.start]], tokens[sl]]).astype(np.int32))
        rows["target_positions"].append(np.arange(1, P + 1, dtype=np.int32))
        rows["ids"].append(ids[sl, :k].astype(np.int32).ravel())
        rows["logprobs"].append(lp_top[sl, :k].astype(np.float16).ravel())
    batch = pa.RecordBatch.from_pydict({
        "input_ids": pa.array(rows["input_ids"], pa.list_(pa.int32())),
        "target_positions": pa.array(rows["target_positions"], pa.list_(pa.int32())),
        "ids": pa.array(rows["ids"], pa.list_(pa.int32())),
        "logprobs": pa.array(rows["logprobs"], pa.list_(pa.float16())),
    })
    sink = pa.BufferOutputStream()
    opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=ZSTD_LEVEL))
    with pa.ipc.new_file(sink, batch.schema, options=opts) as w:
        w.write_batch(batch)
    return sink.getvalue().size, np.exp(lp_top[:, :k].astype(np.float16).astype(np.float64))


class L1:
    """||p - p̂||_1 per position for a chunk, p̂ = stored probabilities on the kept top ranks and
    the tail mass spread ∝ q over every other rank; buffers reused (V floats per position)."""

    _bufs: dict = {}

    def __init__(self, lp: np.ndarray, q: np.ndarray) -> None:
        shape = lp.shape
        if L1._bufs.get("shape") != shape:
            L1._bufs = {"shape": shape, "p": np.empty(shape), "tmp": np.empty((shape[0], shape[1] - SAMPLED_FROM))}
        self.p = np.exp(lp, out=L1._bufs["p"])  # [c, V] rank space
        self.q = q
        self.tmp = L1._bufs["tmp"]
        self.q_rest = q[:, SAMPLED_FROM:].sum(axis=1)  # q mass beyond the top-256 ranks

    def __call__(self, phat_top: np.ndarray, kept: np.ndarray, tail: np.ndarray) -> np.ndarray:
        w = phat_top.shape[1]
        p, q = self.p, self.q
        q_top = q[:, :SAMPLED_FROM]
        not_kept = np.ones(q_top.shape, dtype=bool)
        not_kept[:, :w] = ~kept
        lam = tail / np.maximum(np.where(not_kept, q_top, 0.0).sum(axis=1) + self.q_rest, 1e-300)  # [c]
        phat = np.where(not_kept, lam[:, None] * q_top, 0.0)
        phat[:, :w] += np.where(kept, phat_top, 0.0)
        top = np.abs(p[:, :SAMPLED_FROM] - phat).sum(axis=1)
        t = self.tmp
        np.multiply(q[:, SAMPLED_FROM:], lam[:, None], out=t)
        np.subtract(p[:, SAMPLED_FROM:], t, out=t)
        np.abs(t, out=t)
        return top + t.sum(axis=1)


def run(positions: int, size_positions: int, seed: int, out: Path) -> list[dict]:
    zipf = Zipf()
    rows: list[dict] = []
    for H in (0.5, 2.0, 4.0):
        rng = np.random.default_rng([seed, int(H * 10)])
        n_all = max(size_positions, positions)
        a, ids = profile(zipf, H, n_all, rng)
        noise_seed = rng.integers(1 << 62)
        lp_top = zipf.logp_top(a, SAMPLED_FROM)  # [n, 256]
        # the sequences' tokens: drawn from the teacher (within its top 256 ranks, where the mass is)
        probs = np.exp(lp_top)
        ranks = (probs.cumsum(1) > rng.uniform(0, probs.sum(1))[:, None]).argmax(1)
        tokens = ids[np.arange(n_all), ranks]
        true_entropy = float(np.mean([zipf._entropy(x) for x in a[:200]]))

        codecs = [("topk", CodecConfig(top_k=k), k) for k in (16, 64, 128)]
        codecs.append(("topp", CodecConfig(top_k=128, top_p=0.95), 128))
        codecs.append(("sampled", CodecConfig(name="sampled", top_k=SAMPLED_FROM, draws=50, seed=seed), SAMPLED_FROM))
        results = {}
        n = positions
        for name, codec, k_in in codecs:
            path = out / f"H{H}-{name}-{k_in}"
            t0 = time.perf_counter()
            nbytes = write_store(path, codec, lp_top, ids, tokens, k_in)
            write_s = time.perf_counter() - t0
            phat, kept, tail, entries = read_estimates(path, ids, k_in)
            results[(name, k_in)] = (codec, nbytes, phat[:n], kept[:n], tail[:n], entries, write_s)
            shutil.rmtree(path)
        base = {k: baseline_bytes(lp_top, ids, tokens, k) for k in (16, 64, 128)}

        err = {key: np.zeros(n) for key in results}
        err_unq = {k: np.zeros(n) for k in (16, 64, 128)}
        err_base = {k: np.zeros(n) for k in (16, 64, 128)}
        bias_sampled = np.zeros(n)
        noise_rng = np.random.default_rng(noise_seed)
        C = 100
        lp_buf, q_buf = np.empty((C, VOCAB)), np.empty((C, VOCAB))  # reused: no V-wide temporaries
        for c0 in range(0, n, C):
            sl = slice(c0, min(n, c0 + C))
            c = sl.stop - sl.start
            lp = zipf.logp_into(a[sl], lp_buf[:c])  # [c, V] teacher log-probs in rank space
            q = q_buf[:c]
            noise_rng.standard_normal(out=q)
            q += lp  # student logits s = log p + N(0, 1)
            q -= q.max(axis=1, keepdims=True)
            np.exp(q, out=q)
            q /= q.sum(axis=1, keepdims=True)  # q = softmax(s)
            l1 = L1(lp, q)
            for key, (codec, nbytes, phat, kept, tail, entries, _) in results.items():
                err[key][sl] = l1(phat[sl], kept[sl], tail[sl])
            for k in (16, 64, 128):
                p_top = l1.p[:, :k]
                all_kept = np.ones(p_top.shape, dtype=bool)
                err_unq[k][sl] = l1(p_top, all_kept, 1.0 - p_top.sum(1))
                pb = base[k][1][sl]
                err_base[k][sl] = l1(pb, all_kept, np.clip(1.0 - pb.sum(1), 0, 1))
            p256 = l1.p[:, :SAMPLED_FROM]  # E[p̂] of `sampled`: its top-256 + tail distribution
            bias_sampled[sl] = l1(p256, np.ones(p256.shape, dtype=bool), 1.0 - p256.sum(1))
            del l1

        for (name, k_in), (codec, nbytes, phat, kept, tail, entries, write_s) in results.items():
            row = {
                "codec": name, "entropy_nats": H, "k": codec.top_k,
                "bytes_per_token": nbytes / n_all, "bytes_per_entry": nbytes / max(1, entries),
                "grad_l1": float(err[(name, k_in)].mean()),
                "grad_bias_l1": float(bias_sampled.mean()) if name == "sampled" else float(err[(name, k_in)].mean()),
                "mean_entries": entries / n_all, "mean_kept_mass": float((phat * kept).sum(1).mean()),
                "true_entropy_nats": true_entropy, "write_tokens_per_s": n_all / write_s,
            }
            if name == "topk":
                row["grad_l1_unquantized"] = float(err_unq[k_in].mean())
                row["quantization_cost"] = row["grad_l1"] / row["grad_l1_unquantized"] - 1
            if name == "topp":
                row["top_p"] = codec.top_p
            if name == "sampled":
                row["draws"] = codec.draws
            rows.append(row)
        for k in (16, 64, 128):
            nbytes = base[k][0]
            rows.append({"codec": "baseline", "entropy_nats": H, "k": k, "bytes_per_token": nbytes / n_all,
                         "bytes_per_entry": nbytes / (n_all * k), "grad_l1": float(err_base[k].mean()),
                         "grad_bias_l1": float(err_base[k].mean()), "layout": "int32 ids + fp16 log-probs, zstd"})
        for r in rows[-8:]:
            print(f"H={r['entropy_nats']:<4} {r['codec']:<8} k={r['k']:<4} {r['bytes_per_token']:8.2f} B/token "
                  f"{r['bytes_per_entry']:6.3f} B/entry  grad_l1={r['grad_l1']:.5f} bias={r['grad_bias_l1']:.5f}"
                  + (f"  (unquantized {r['grad_l1_unquantized']:.5f}, +{100 * r['quantization_cost']:.2f}%)" if "grad_l1_unquantized" in r else "")
                  + (f"  entries={r['mean_entries']:.2f}" if r["codec"] in ("sampled", "topp") else ""),
                  file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--positions", type=int, default=2000, help="positions per entropy profile for the gradient errors")
    ap.add_argument("--size-positions", type=int, default=10000,
                    help="positions per profile written for the byte counts (a store's fixed per-file bytes fade)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-storage-") as d:
        rows = run(args.positions, args.size_positions, args.seed, Path(d))
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
