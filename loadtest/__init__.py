"""Load tester for OpenAI-compatible streaming servers: task mixes, TTFT/ITL/TPOT, routing accuracy."""
