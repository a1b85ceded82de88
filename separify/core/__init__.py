"""Core: pure decomposition math (decompose), the replacement modules (modules) and measurement (measure)."""
