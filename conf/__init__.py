"""cot2's Hydra configs; a package only so that they ship inside the wheel as `cot2cli.conf`."""
