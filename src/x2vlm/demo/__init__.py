"""The main job: pre-train on the generated world, fine-tune every task, print the paper's table."""

from x2vlm.demo.run import DEMO_TASKS, DemoSettings, run_demo

__all__ = ["DEMO_TASKS", "DemoSettings", "run_demo"]
