"""The Olmo 3 model family, in one place: ``model.py`` (Olmo 3 on megatron-core, the only model
implementation of the pipeline) and ``bridge.py`` (the provider: HF ``Olmo3Config`` -> megatron
config, pipeline split and parallel-size checks; and the one declarative table of HF <-> Megatron
weight mappings). Checkpoints, conversion and every stage import from here; nothing here imports
them. Another Llama-like family would be a sibling package with the same two modules."""
