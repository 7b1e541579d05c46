"""The ``krylov-influence demo``: find flipped labels in scikit-learn's digits by self-influence.

Run it from the command line (``krylov-influence demo``) or from Python::

    from krylov_influence.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(engine="numpy", seed=0))
    print(result.summary["results"]["detection_auc"])

scikit-learn and matplotlib (the ``demo`` extra) are imported when the demo runs, and each
framework only inside its own trainer.
"""

from krylov_influence.demo.runner import DemoConfig, DemoResult, run_demo
from krylov_influence.demo.training import DEMO_ENGINES, TrainingConfig

__all__ = ["DEMO_ENGINES", "DemoConfig", "DemoResult", "TrainingConfig", "run_demo"]
