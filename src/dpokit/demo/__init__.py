"""The built-in demo: the whole dpokit workflow, offline on a CPU, with the built-in SmolLM2-135M-Instruct.

`task` holds the demo's prompts, its rule-based judge and its task metric; `workflow` runs the stages.
"""

from dpokit.demo.workflow import DemoSettings, run, run_demo

__all__ = ["DemoSettings", "run", "run_demo"]
