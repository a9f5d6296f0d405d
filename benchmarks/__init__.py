"""selfalign's benchmark suite (issue 6): `python -m benchmarks [--quick] [--cases ...]`.

suite.py runs the cases and writes benchmarks/results/<date>.json and .md; case_overhead.py (1 overhead,
4 resume), case_engine.py (2 llama.cpp server), case_vllm.py (3 offline vLLM), case_scale.py (5 scale).
instant_server.py, baselines.py, distilabel_env.py / distilabel_task.py and variants.py are the servers,
raw loops, peer and transport variants they compare against; workload.py makes the inputs.
"""
