"""pgolf's command line: `python run.py [group=option ...] [key=value ...]`, `-m` for sweeps.

A thin Hydra entry: the composed config goes to `pgolf.build.train`, which turns it into
plain objects. Single runs are checked before Hydra creates a run directory, so a bad
override costs one line and leaves nothing behind.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pgolf.build import label_job
from pgolf.cli import precheck_argv, run_guarded, swept_keys


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    overrides = list(hc.overrides.task)
    if multirun:  # one W&B group per sweep (its config name and time), runs named by what the sweep varies
        swept = swept_keys(sys.argv[1:], dict(hc.sweeper.get("params") or {}))
        short = [o.lstrip("+~").split("=")[0].split(".")[-1] + "=" + o.split("=", 1)[1] for o in overrides
                 if "=" in o and o.lstrip("+~").split("=")[0] in swept]
        label_job(cfg, group=f"{hc.job.config_name}-{Path(hc.sweep.dir).name}", name=",".join(short) or "default",
                  job_type=hc.runtime.choices.get("experiment") or "default")
    return run_guarded(cfg, run_dir=hc.runtime.output_dir, multirun=multirun, overrides=overrides)


if __name__ == "__main__":
    sys.argv += precheck_argv(sys.argv[1:])
    main()
