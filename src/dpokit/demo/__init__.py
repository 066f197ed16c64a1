"""The built-in demo: the whole dpokit workflow, offline on a CPU, with the built-in SmolLM2-135M-Instruct.

`task` holds the demo's prompts, its rule-based judge and its task metric.
"""
