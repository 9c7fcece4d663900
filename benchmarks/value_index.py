"""Checking candidates against every known value of a data set: the index and its peer.

``cfg-unlearn generate`` rejects a replacement that contains a known value of *any*
record (``other_pii``). The peer is the obvious loop: every value's pattern
(:func:`cfg_unlearn.pii.value_pattern`, all compiled up front) searched in the text.
:class:`cfg_unlearn.pii.ValueIndex` only tries the values that pass a cheap necessary
condition, and compiles a value's pattern when a text first points to it. Both run on
the same synthetic world's values and the same answer-like texts (a name, one of the
values, a phone that is nobody's) and must return the same items. The script prints,
for each, the one-off cost (the index's first pass over the texts, which compiles the
patterns they point to; the loop's compiling of every pattern) and the time per text
once compiled, with the ratios of both; then the cost of the other check, pieces of one
person's values (:class:`cfg_unlearn.pii.PieceIndex`), beside the value index's.

    python benchmarks/value_index.py [--people 2000] [--texts 200] [--peer-texts 50]

Timings are only meaningful against the peer measured in the same run.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cfg_unlearn.data.world import World, WorldConfig  # noqa: E402
from cfg_unlearn.pii import PieceIndex, ValueIndex, value_pattern  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=2000, help="people in the world (7 values each)")
    p.add_argument("--texts", type=int, default=200, help="texts checked through the index")
    p.add_argument("--peer-texts", type=int, default=50, help="of those, checked by the value-by-value loop too")
    a = p.parse_args()
    if a.texts < 1 or a.peer_texts < 1:
        p.error(f"--texts and --peer-texts must be >= 1, got {a.texts} and {a.peer_texts}")
    a.peer_texts = min(a.peer_texts, a.texts)
    world = World(WorldConfig(seed=0, n_people=a.people))
    t0 = time.perf_counter()
    index = ValueIndex(world.known_pii())
    build = time.perf_counter() - t0
    rng = random.Random(0)
    texts = [f"{rng.choice(world.people).name} lives at {rng.choice(index.items).value}, call (555) 010-2345."
             for _ in range(a.texts)]
    t0 = time.perf_counter()
    found = [index.find(t) for t in texts]
    first_pass = time.perf_counter() - t0  # compiles the patterns these texts point to
    t0 = time.perf_counter()
    again = [index.find(t) for t in texts]
    per_index = (time.perf_counter() - t0) / len(texts)
    t0 = time.perf_counter()
    patterns = [(it, value_pattern.__wrapped__(it.value, it.type)) for it in index.items]  # uncached: all of them
    compile_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer = [[it for it, pat in patterns if pat.search(t)] for t in texts[: a.peer_texts]]
    per_peer = (time.perf_counter() - t0) / max(1, len(peer))
    if found != again or found[: len(peer)] != peer:
        sys.exit("the index and the loop disagree")
    # the loop's cost for all the texts, had it checked them all: its compiling plus each search
    peer_total = compile_all + per_peer * len(texts)
    print(f"{len(index)} distinct values; index built in {build:.2f} s")
    print(f"one-off: index's first pass over {len(texts)} texts {first_pass:.2f} s (compiling what they point to); "
          f"compiling every value's pattern for the loop {compile_all:.2f} s")
    print(f"per text once compiled: index {per_index * 1e3:.2f} ms ({len(texts)} texts); value-by-value "
          f"{per_peer * 1e3:.1f} ms ({len(peer)} texts); ratio {per_peer / per_index:.0f}x")
    print(f"all {len(texts)} texts from scratch: index {first_pass:.2f} s, value-by-value {peer_total:.2f} s "
          f"(estimated from its {len(peer)}); ratio {peer_total / first_pass:.1f}x; same items found")
    # generate's other check, pieces of one person's values (other_partial_pii), looked up
    # in a dictionary: its cost beside the whole-value index's, on the same texts
    records = world.forget_records()
    t0 = time.perf_counter()
    pieces = PieceIndex((*r.pii, *r.known) for r in records)
    pieces_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in texts:
        pieces.find(t)
    per_pieces = (time.perf_counter() - t0) / len(texts)
    print(f"pieces of one person's values: {len(pieces)} pieces of {len(records)} records' values indexed in "
          f"{pieces_build:.2f} s; {per_pieces * 1e3:.3f} ms per text, {per_pieces / per_index:.2f}x the value index's")


if __name__ == "__main__":
    main()
