"""The chaos suite: real broker processes, faults injected from outside."""
