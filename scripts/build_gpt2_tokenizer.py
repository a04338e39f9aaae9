"""Build GPT-2's real byte-level BPE tokenizer (vocab.json + merges.txt) from openai-whisper's
sdist, and verify it against tiktoken on the whole Shakespeare corpus.

    python scripts/build_gpt2_tokenizer.py --out tests/data/gpt2_tokenizer
    python scripts/build_gpt2_tokenizer.py --sdist openai_whisper-20250625.tar.gz --out DIR

Why: the Hugging Face hub (where GPT-2's tokenizer files live) cannot always be reached, but
PyPI can, and `openai-whisper`'s source distribution ships GPT-2's BPE ranks as
`whisper/assets/gpt2.tiktoken` (one line per token: base64 of its bytes, then its rank). The
ranks are GPT-2's token ids; this script turns them into the standard GPT-2 files:

- vocab.json: each token's bytes written through GPT-2's byte-to-unicode map -> its rank, plus
  `<|endoftext|>` = 50256 (whisper's tokenizer.py numbers its first special token so too);
- merges.txt: `#version: 0.2`, then for every multi-byte token in rank order the pair that BPE
  with the lower ranks alone leaves of its bytes (BPE merges pairs into the token of lowest
  rank, so a token of rank r is made from the two parts the ranks below r reach).

Without --sdist the sdist is fetched with `pip download`. The tarball is read in place; nothing
is extracted. The checks: every vocab.json id is the token's rank; the tokenizer loaded from
--out by `create_tokenizer('gpt2', name_or_path=OUT)` encodes the whole Shakespeare corpus to
exactly the ids of a `tiktoken.Encoding` built from the same ranks with GPT-2's pattern (as
whisper's `get_encoding` builds it), and decodes them back to the text.
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHISPER_SDIST = "openai-whisper==20250625"
RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"  # inside the sdist's top-level directory
N_RANKS = 50256
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenization pattern, as whisper's tokenizer.py passes it to tiktoken.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
KNOWN_IDS = {"Hello world": [15496, 995]}  # GPT-2's ids, as published with the model


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character: the printable Latin-1 bytes map to
    themselves, the other 68 to chr(256), chr(257), ... in byte order (so that every token is a
    string of visible characters in vocab.json and merges.txt)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, next_char = {}, 256
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte], next_char = chr(next_char), next_char + 1
    return mapping


def download_sdist(directory: str) -> str:
    """`pip download` openai-whisper's sdist into `directory`; returns the tarball's path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
                    "--dest", directory, WHISPER_SDIST], check=True)
    found = glob.glob(os.path.join(directory, "openai_whisper-*.tar.gz"))
    if len(found) != 1:
        raise SystemExit(f"error: pip download left {found} in {directory}, expected one "
                         "openai_whisper-*.tar.gz: pass the sdist with --sdist")
    return found[0]


def read_ranks(sdist: str) -> dict[bytes, int]:
    """The token bytes -> rank table of gpt2.tiktoken, read from inside the sdist tarball."""
    fix = f"pass openai-whisper's sdist (pip download --no-deps {WHISPER_SDIST})"
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.endswith("/" + RANKS_MEMBER)]
            if len(members) != 1:
                raise SystemExit(f"error: {sdist} holds no single {RANKS_MEMBER}: {fix}")
            lines = tar.extractfile(members[0]).read().decode("ascii").splitlines()
    except tarfile.TarError as e:
        raise SystemExit(f"error: {sdist} is not a .tar.gz sdist ({e}): {fix}") from None
    ranks = {base64.b64decode(token): int(rank)
             for token, rank in (line.split() for line in lines if line)}
    if sorted(ranks.values()) != list(range(N_RANKS)):
        raise SystemExit(f"error: {RANKS_MEMBER} in {sdist} does not hold ranks 0..{N_RANKS - 1} "
                         f"once each ({len(ranks)} tokens): not GPT-2's ranks")
    return ranks


def bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """`token`'s bytes after rank-based BPE with the ranks below `max_rank`: repeatedly merge
    the adjacent pair whose concatenation has the lowest rank, while one below max_rank exists."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_index = max_rank, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_index = rank, i
        if best_index is None:
            break
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def build_files(ranks: dict[bytes, int], out: str) -> tuple[int, int]:
    """Write vocab.json and merges.txt to `out`; returns (vocab entries, merges)."""
    to_char = byte_to_unicode()
    text = lambda token: "".join(to_char[b] for b in token)
    by_rank = sorted(ranks, key=ranks.get)
    vocab = {text(token): ranks[token] for token in by_rank}
    vocab[ENDOFTEXT] = N_RANKS
    merges = []
    for token in by_rank:
        if len(token) < 2:
            continue
        parts = bpe_parts(token, ranks, ranks[token])
        if len(parts) != 2:
            raise SystemExit(f"error: BPE with the ranks below {ranks[token]} splits {token!r} "
                             f"into {len(parts)} parts, not 2: these ranks are not a BPE order")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8", newline="\n") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return len(vocab), len(merges)


def verify(ranks: dict[bytes, int], out: str) -> None:
    """The checks of the module docstring; raises SystemExit naming the first failure."""
    import tiktoken

    sys.path.insert(0, REPO)
    from cleangpt_jax.data.corpus import shakespeare_text
    from cleangpt_jax.tokenizers import create_tokenizer

    from_char = {c: b for b, c in byte_to_unicode().items()}
    with open(os.path.join(out, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    wrong = [(token, i) for token, i in vocab.items() if token != ENDOFTEXT
             and ranks.get(bytes(from_char[c] for c in token)) != i]
    if wrong or len(vocab) != N_RANKS + 1 or vocab.get(ENDOFTEXT) != N_RANKS:
        raise SystemExit(f"error: vocab.json ids differ from the ranks ({len(wrong)} tokens, e.g. "
                         f"{wrong[:3]}) or it lacks {ENDOFTEXT}={N_RANKS}")
    print(f"vocab.json: all {len(vocab) - 1} token ids equal their tiktoken ranks, "
          f"{ENDOFTEXT} = {vocab[ENDOFTEXT]}")

    reference = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={ENDOFTEXT: N_RANKS},
                                  explicit_n_vocab=N_RANKS + 1)
    tokenizer = create_tokenizer("gpt2", name_or_path=out)
    if tokenizer.vocab_size != N_RANKS + 1 or tokenizer.eos_token_id != N_RANKS:
        raise SystemExit(f"error: the loaded tokenizer has vocab_size {tokenizer.vocab_size} and "
                         f"eos {tokenizer.eos_token_id}, expected {N_RANKS + 1} and {N_RANKS}")
    for text, ids in KNOWN_IDS.items():
        got = (tokenizer.encode(text), reference.encode(text))
        if got != (ids, ids):
            raise SystemExit(f"error: {text!r} encodes to {got[0]} (ours) and {got[1]} "
                             f"(tiktoken), GPT-2's ids are {ids}")

    corpus = shakespeare_text()
    start = time.perf_counter()
    ours = tokenizer.encode(corpus)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = reference.encode(corpus, allowed_special={ENDOFTEXT})
    theirs_s = time.perf_counter() - start
    mismatches = sum(a != b for a, b in zip(ours, theirs)) + abs(len(ours) - len(theirs))
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                 min(len(ours), len(theirs)))
    if mismatches:
        raise SystemExit(f"error: Shakespeare encodes to {len(ours)} ids (ours) and {len(theirs)} "
                         f"(tiktoken), {mismatches} differ, the first at position {first}: "
                         f"{ours[first:first + 5]} vs {theirs[first:first + 5]}")
    start = time.perf_counter()
    decoded = tokenizer.decode(ours)
    decode_s = time.perf_counter() - start
    if decoded != corpus:
        raise SystemExit("error: decoding the Shakespeare ids does not give the corpus back")
    print(f"Shakespeare corpus ({len(corpus)} characters): {len(ours)} tokens compared with "
          f"tiktoken, 0 mismatches; encoding took {ours_s:.2f} s (ours) and {theirs_s:.2f} s "
          f"(tiktoken); decoding round-trips ({decode_s:.2f} s)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", help=f"openai-whisper's sdist tarball (default: pip download "
                                        f"{WHISPER_SDIST} into a temporary directory)")
    parser.add_argument("--out", required=True, help="directory to write vocab.json, merges.txt")
    args = parser.parse_args(argv)
    if args.sdist is not None and not os.path.isfile(args.sdist):
        raise SystemExit(f"error: --sdist {args.sdist!r} is not a file: pass the tarball that "
                         f"`pip download --no-deps {WHISPER_SDIST}` saves")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ranks = read_ranks(args.sdist or download_sdist(tmp))
    n_vocab, n_merges = build_files(ranks, args.out)
    print(f"wrote {args.out}: vocab.json ({n_vocab} tokens), merges.txt ({n_merges} merges) in "
          f"{time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    verify(ranks, args.out)
    print(f"verified in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
