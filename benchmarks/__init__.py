"""Benchmarks of the project's training and evaluation paths against the Hugging Face Trainer pipeline."""
