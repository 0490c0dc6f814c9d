"""How a stage process runs: the stage environment, the warm worker, data-parallel
processes and allocator settings."""
