"""pgolf's command line: `python run.py [group=option ...] [key=value ...]`, `-m` for sweeps.

A thin Hydra entry: the composed config goes to `pgolf.build.train`, which turns it into
plain objects. Single runs are checked before Hydra creates a run directory, so a bad
override costs one line and leaves nothing behind.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pgolf.cli import precheck_argv, run_guarded


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    return run_guarded(cfg, run_dir=hc.runtime.output_dir, multirun=hc.mode.name == "MULTIRUN")


if __name__ == "__main__":
    precheck_argv(sys.argv[1:])
    main()
