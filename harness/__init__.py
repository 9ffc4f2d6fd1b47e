"""Sweep InfoGAN settings with Optuna and track every trial in MLflow."""
