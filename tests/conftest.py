"""Shared pytest set-up: the embedded S3 fixtures, and an environment that never reaches the network."""
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

pytest_plugins = ["tests.conftest_s3"]
