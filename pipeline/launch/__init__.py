"""Running the chain: member lanes of `dvc repro` processes and the cost plan before anything runs."""
