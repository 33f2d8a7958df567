"""Files: compact save/load, entropy coding and interop with other checkpoint formats."""
