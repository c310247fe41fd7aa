"""The benchmark harness of issue 4: a seeded photo corpus, one runner per way of
classifying a folder, and an orchestrator that times each as a whole process.

`make bench` (or `python -m benchmarks.run`) runs it all and writes benchmarks/RESULTS.md.
"""
