"""The sweep engine of `harness sweep`: an Optuna study from a study file, a parent MLflow run per study and
a child run per trial. The rooms, from the bottom up: spec (the study file), bookkeeping (counting and
retries), runs (a trial's runs as it ends), storage (the Optuna storage), study (opening the study), signals,
recovery (lost trials), plots, summary (the parent run), trial (running one), display, workers, coordinator."""
