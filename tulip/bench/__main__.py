"""``python -m tulip.bench NAME [args]``: run one of Tulip's benchmarks (see docs/benchmarks.md)."""
import importlib
import sys

# Each benchmark is a module tulip.bench.<name> with a main(argv) function.
BENCHMARKS = {
    "regularizers": "tulip.bench.regularizers",
    "nn": "tulip.bench.nn",
    "attacks": "tulip.bench.attacks",
    "sweep": "tulip.bench.sweep",
    "epoch": "tulip.bench.epoch",
    "startup": "tulip.bench.startup",
    "memory": "tulip.bench.memory",
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHMARKS:
        sys.exit(f"usage: python -m tulip.bench {{{'|'.join(BENCHMARKS)}}} [args]")
    importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
