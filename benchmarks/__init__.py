"""Benchmarks for default-moe: speed, memory, router-gradient fidelity and quality (issue 6).

    python -m benchmarks [--quick] [--only speed,fidelity,quality,conversion] [--out FILE]
    python -m benchmarks.report FILE...   # markdown tables (the ones in BENCHMARKS.md)

See BENCHMARKS.md for the measured numbers and how they were obtained.
"""
